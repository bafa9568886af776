// Empty: flash_attention_emu.cpp defines the nvcuda::wmma subset the kernels use.
