//! Counting the bytes a forward pass holds for its backward pass, so memory
//! savings (activation checkpointing) are measured rather than estimated.

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
