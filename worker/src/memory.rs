//! Counting the bytes a forward pass holds for its backward pass, so memory
//! savings (activation checkpointing) are measured rather than estimated;
//! and the allocator policy the worker runs with.

/// Makes the C allocator keep freed memory for reuse instead of handing it
/// back to the kernel. Every training step (and every serving batch) frees
/// and then allocates the same activation buffers again; with glibc's
/// defaults the large ones are `mmap`ed afresh or trimmed off the heap, so
/// each step page-faults its activations in and the kernel zeroes every
/// page: 8-10% of an MoE layer's time, measured with `perf`. Buffers up to
/// 32 MiB (glibc's cap for this setting) now come from the heap, which is
/// never trimmed: the process keeps its peak, which a training or serving
/// process reaches every step anyway. Call once, at the start of `main`;
/// a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before the
    // process starts other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

/// Bytes of heap memory a value holds (buffers' capacities, not their lengths:
/// what is allocated is what is held).
pub trait HeldBytes {
    fn held_bytes(&self) -> usize;
}

impl<T> HeldBytes for Vec<T> {
    fn held_bytes(&self) -> usize {
        self.capacity() * std::mem::size_of::<T>()
    }
}

impl<H: HeldBytes> HeldBytes for Option<H> {
    fn held_bytes(&self) -> usize {
        self.as_ref().map_or(0, HeldBytes::held_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::HeldBytes;

    #[test]
    fn counts_allocated_elements_times_their_size() {
        assert_eq!(vec![0.0f32; 10].held_bytes(), 40);
        assert_eq!(Vec::<f64>::with_capacity(3).held_bytes(), 24);
        assert_eq!(Some(vec![0u8; 5]).held_bytes(), 5);
        assert_eq!(None::<Vec<u8>>.held_bytes(), 0);
    }
}
