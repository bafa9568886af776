//! The paged key/value cache: a fixed pool of pages, each holding the keys
//! and values of `page_size` consecutive positions of one sequence (or of a
//! prefix several sequences share) in every layer, handed out by the [`PagePool`](super::prefix_cache::PagePool)
//! and returned when the sequence ends (or kept for its prefix).
//!
//! A position's key and value rows have their own widths: both
//! `kv_heads * head_dim` for grouped-query attention; for multi-head latent
//! attention (DeepSeek) the key row is the latent `[c_kv | k_pe]` and there
//! is no value row (the values are read from the latent too).
//!
//! Why pages: sequences of very different lengths share one memory budget
//! without fragmentation, and a finished (or cancelled) sequence returns its
//! memory at once. The pool is pure bookkeeping (unit-tested apart from
//! the storage); [`KvStore`] is the storage the engine reads and writes.

/// Index of a page in the pool.
pub type PageId = u32;

/// Pages needed to hold `tokens` positions.
pub fn pages_for(tokens: usize, page_size: usize) -> usize {
    tokens.div_ceil(page_size)
}

/// The cache's shape: what one page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    /// One position's key row in one layer (`kv_heads * head_dim`, or
    /// MLA's `kv_lora_rank + qk_rope_head_dim`).
    pub key_width: usize,
    /// One position's value row in one layer (0 for MLA).
    pub value_width: usize,
    pub page_size: usize,
}

impl KvShape {
    /// Bytes of one page: keys and values, every layer, f32.
    pub fn page_bytes(&self) -> usize {
        self.layers * self.page_size * (self.key_width + self.value_width) * size_of::<f32>()
    }

    /// Pages a budget of `bytes` affords.
    pub fn pages_within(&self, bytes: usize) -> usize {
        bytes / self.page_bytes().max(1)
    }
}

/// Keys and values for `pages` pages, laid out `[layer][page][slot][width]`
/// (keys and values apart) so one layer's attention reads each page as one
/// contiguous block.
#[derive(Clone, Debug)]
pub struct KvStore {
    shape: KvShape,
    pages: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvStore {
    pub fn new(shape: KvShape, pages: usize) -> Self {
        let slots = shape.layers * pages * shape.page_size;
        Self {
            shape,
            pages,
            keys: vec![0.0; slots * shape.key_width],
            values: vec![0.0; slots * shape.value_width],
        }
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Pages in the pool.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Slot of `position` of the sequence holding `pages` in `layer` (the
    /// row index into keys or values).
    fn slot(&self, layer: usize, pages: &[PageId], position: usize) -> usize {
        let page_size = self.shape.page_size;
        let page = pages[position / page_size] as usize;
        (layer * self.pages + page) * page_size + position % page_size
    }

    /// Stores one position's key and value rows (`key_width` and `value_width`).
    pub fn write(&mut self, layer: usize, pages: &[PageId], position: usize, k: &[f32], v: &[f32]) {
        let slot = self.slot(layer, pages, position);
        let (kw, vw) = (self.shape.key_width, self.shape.value_width);
        self.keys[slot * kw..(slot + 1) * kw].copy_from_slice(k);
        self.values[slot * vw..(slot + 1) * vw].copy_from_slice(v);
    }

    /// One position's key row in `layer`.
    pub fn key(&self, layer: usize, pages: &[PageId], position: usize) -> &[f32] {
        let width = self.shape.key_width;
        let at = self.slot(layer, pages, position) * width;
        &self.keys[at..at + width]
    }

    /// The pages of a sequence holding `pages` that hold its positions
    /// `0..positions`: `(page, its first position, positions in it)`, in
    /// order — how attention walks the cache a page at a time.
    pub fn spans<'a>(
        &self,
        pages: &'a [PageId],
        positions: usize,
    ) -> impl Iterator<Item = (PageId, usize, usize)> + 'a {
        let page_size = self.shape.page_size;
        pages[..positions.div_ceil(page_size)]
            .iter()
            .enumerate()
            .map(move |(p, &page)| {
                let first = p * page_size;
                (page, first, page_size.min(positions - first))
            })
    }

    /// The first `rows` key rows of `page` in `layer`, consecutive (a page
    /// holds consecutive positions): what attention reads page by page.
    pub fn key_rows(&self, layer: usize, page: PageId, rows: usize) -> &[f32] {
        let width = self.shape.key_width;
        let at = (layer * self.pages + page as usize) * self.shape.page_size * width;
        &self.keys[at..at + rows * width]
    }

    /// The first `rows` value rows of `page` in `layer`, as [`Self::key_rows`].
    pub fn value_rows(&self, layer: usize, page: PageId, rows: usize) -> &[f32] {
        let width = self.shape.value_width;
        let at = (layer * self.pages + page as usize) * self.shape.page_size * width;
        &self.values[at..at + rows * width]
    }

    /// One position's value row in `layer` (empty without value rows).
    pub fn value(&self, layer: usize, pages: &[PageId], position: usize) -> &[f32] {
        let width = self.shape.value_width;
        let at = self.slot(layer, pages, position) * width;
        &self.values[at..at + width]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_map_through_the_page_table() {
        let shape = KvShape {
            layers: 2,
            key_width: 3,
            value_width: 3,
            page_size: 2,
        };
        let mut store = KvStore::new(shape, 4);
        // A sequence holding pages 3 and 1, in that order.
        let pages = [3, 1];
        for position in 0..4 {
            let k = [position as f32; 3];
            let v = [10.0 + position as f32; 3];
            store.write(1, &pages, position, &k, &v);
        }
        for position in 0..4 {
            assert_eq!(store.key(1, &pages, position), [position as f32; 3]);
            assert_eq!(
                store.value(1, &pages, position),
                [10.0 + position as f32; 3]
            );
            assert_eq!(
                store.key(0, &pages, position),
                [0.0; 3],
                "layer 0 untouched"
            );
        }
        // Position 2 is the first slot of the sequence's second page (page 1).
        assert_eq!(store.slot(1, &pages, 2), (4 + 1) * 2);
        assert_eq!(pages_for(5, 2), 3);
        assert_eq!(shape.page_bytes(), 2 * 2 * 2 * 3 * 4);
    }

    #[test]
    fn latent_rows_have_keys_only() {
        // MLA: a 5-wide latent per position, no value row.
        let shape = KvShape {
            layers: 2,
            key_width: 5,
            value_width: 0,
            page_size: 2,
        };
        assert_eq!(shape.page_bytes(), 2 * 2 * 5 * 4);
        assert_eq!(shape.pages_within(shape.page_bytes() * 3 + 1), 3);
        let mut store = KvStore::new(shape, 2);
        let pages = [1, 0];
        for position in 0..4 {
            store.write(0, &pages, position, &[position as f32; 5], &[]);
        }
        for position in 0..4 {
            assert_eq!(store.key(0, &pages, position), [position as f32; 5]);
            assert!(store.value(0, &pages, position).is_empty());
        }
    }
}
