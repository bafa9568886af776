// E4M3 quantisation with fine-grained scales, as worker/src/fp8/quantize.rs:
// scale = max(amax / 448, FLT_MIN) (1 for an all-zero or non-finite tile),
// code = e4m3(x / scale) rounded to nearest even and saturated to +-448,
// with a true division so the codes match the CPU emulation bit for bit.

__device__ __forceinline__ float scale_for_amax(float amax) {
    return (amax > 0.0f && amax <= 3.402823466e38f) ? fmaxf(amax / 448.0f, 1.175494351e-38f) : 1.0f;
}

__device__ __forceinline__ unsigned char encode_e4m3(float x, float scale) {
    return (unsigned char)__nv_cvt_float_to_fp8(x / scale, __NV_SATFINITE, __NV_E4M3);
}

// 1x128 tiles (activations): one warp per (row, tile), 4 values per lane.
// codes: [rows, cols]; scales: [rows, ceil(cols / 128)].
extern "C" __global__ void fp8_quantize_1x128_f32(unsigned char* codes, float* scales, const float* x, int rows,
                                                  int cols) {
    const int lane = threadIdx.x & 31;
    const int tiles_per_row = (cols + 127) / 128;
    const size_t tile = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (tile >= (size_t)rows * tiles_per_row) return;
    const size_t row = tile / tiles_per_row;
    const int col0 = (int)(tile % tiles_per_row) * 128;
    float v[4];
    float amax = 0.0f;
    for (int i = 0; i < 4; ++i) {
        const int col = col0 + lane + 32 * i;
        v[i] = col < cols ? x[row * cols + col] : 0.0f;
        amax = fmaxf(amax, fabsf(v[i]));  // fmaxf drops NaN, as the CPU's max does
    }
    const float scale = scale_for_amax(warp_max(amax));
    for (int i = 0; i < 4; ++i) {
        const int col = col0 + lane + 32 * i;
        if (col < cols) codes[row * cols + col] = encode_e4m3(v[i], scale);
    }
    if (lane == 0) scales[tile] = scale;
}

// 128x128 blocks (weights): one block of 256 threads per tile.
// scales: [ceil(rows / 128), ceil(cols / 128)].
extern "C" __global__ void fp8_quantize_128x128_f32(unsigned char* codes, float* scales, const float* w, int rows,
                                                    int cols) {
    __shared__ float scratch[32];
    const int tile_row = blockIdx.y, tile_col = blockIdx.x;
    const int r0 = tile_row * 128, c0 = tile_col * 128;
    const int r1 = min(r0 + 128, rows), c1 = min(c0 + 128, cols);
    const int width = c1 - c0, count = (r1 - r0) * width;
    float amax = 0.0f;
    for (int i = threadIdx.x; i < count; i += blockDim.x)
        amax = fmaxf(amax, fabsf(w[(size_t)(r0 + i / width) * cols + c0 + i % width]));
    const float scale = scale_for_amax(block_max(amax, scratch));
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const size_t at = (size_t)(r0 + i / width) * cols + c0 + i % width;
        codes[at] = encode_e4m3(w[at], scale);
    }
    if (threadIdx.x == 0) scales[tile_row * gridDim.x + tile_col] = scale;
}
