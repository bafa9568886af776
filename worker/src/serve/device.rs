//! What the GPU serving engine (`crate::cuda::serve`, behind the `cuda`
//! feature) needs from the host, kept here as plain functions so the CPU
//! build tests them: which models it runs, and the flat per-step arrays it
//! uploads (tokens, positions, cache slots, page tables, the rows whose
//! logits are wanted).
//!
//! The host stays the bookkeeper: the scheduler's `PageAllocator` hands out
//! page ids as for the CPU engine, and the device's page pool is indexed by
//! the same ids, so a step is fully described by these arrays.

use std::ops::Range;

use crate::serve::engine::Chunk;
use crate::serve::kv_cache::pages_for;
use crate::serve::model::{ServeFfn, ServeModel};

/// Threads per block of the paged attention kernel: its `PA_WARPS` (4)
/// warps (kernels/cuda/paged_attention.cu).
pub const PAGED_ATTENTION_THREADS: u32 = 128;
/// The widest head the paged attention kernel holds in registers (8 values
/// per lane): `PA_MAX_HEAD_DIM` in kernels/cuda/paged_attention.cu.
pub const PAGED_ATTENTION_MAX_HEAD_DIM: usize = 256;
/// Experts per MoE layer the device dispatch handles (its offset scan runs
/// in one block of at most 1024 threads; see `cuda::dispatch`).
pub const MAX_DEVICE_EXPERTS: usize = 1024;
/// Expert groups the device router handles (one 32-bit group mask).
pub const MAX_DEVICE_GROUPS: usize = 32;

/// Why the device engine cannot serve `model`, or `None` when it can. The
/// caller serves such a model on the CPU and logs this reason.
pub fn unsupported(model: &ServeModel) -> Option<String> {
    unsupported_share(model, None)
}

/// [`unsupported`] for one rank of an expert-parallel replica, whose MoE
/// layers must hold exactly the routed experts `held` (`None`: all of them).
pub fn unsupported_share(model: &ServeModel, held: Option<&Range<usize>>) -> Option<String> {
    let config = &model.config;
    if config.latent.is_some() {
        return Some(
            "multi-head latent attention (DeepSeek-V3) has no device path yet: its absorbed \
             attention and latent cache run on the CPU engine only"
                .into(),
        );
    }
    if config.head_dim > PAGED_ATTENTION_MAX_HEAD_DIM || !config.head_dim.is_multiple_of(2) {
        return Some(format!(
            "head_dim {} is not an even width of at most {PAGED_ATTENTION_MAX_HEAD_DIM}, which \
             the paged attention kernel holds in registers",
            config.head_dim
        ));
    }
    if config.kv_heads == 0 || !config.heads.is_multiple_of(config.kv_heads) {
        return Some(format!(
            "{} query heads are not whole groups of {} key/value heads",
            config.heads, config.kv_heads
        ));
    }
    for (layer, block) in model.blocks.iter().enumerate() {
        let ServeFfn::Moe { layer: moe, .. } = &block.ffn else {
            continue;
        };
        let c = moe.config();
        match held {
            None if !moe.params.holds_all(c) => {
                return Some(format!(
                    "layer {layer} holds only experts {:?} (an expert-parallel rank's share)",
                    moe.params.experts
                ));
            }
            Some(held) if moe.params.experts != *held => {
                return Some(format!(
                    "layer {layer} holds experts {:?}, but this rank owns {held:?}",
                    moe.params.experts
                ));
            }
            _ => {}
        }
        // Rows are permuted to and from the experts as 16-byte vectors.
        if !c.hidden.is_multiple_of(4) {
            return Some(format!(
                "hidden size {} is not a multiple of 4 (the device permutes rows as 16-byte \
                 vectors)",
                c.hidden
            ));
        }
        if c.n_routed_experts > MAX_DEVICE_EXPERTS {
            return Some(format!(
                "layer {layer} has {} routed experts; the device dispatch handles at most \
                 {MAX_DEVICE_EXPERTS}",
                c.n_routed_experts
            ));
        }
        if let Some(limit) = c.group_limit
            && limit.n_groups > MAX_DEVICE_GROUPS
        {
            return Some(format!(
                "layer {layer} routes within {} expert groups; the device router handles at \
                 most {MAX_DEVICE_GROUPS}",
                limit.n_groups
            ));
        }
    }
    None
}

/// One step's rows, flattened for the device: row `r` is token
/// `tokens[r]` of some chunk, at `positions[r]`; its key and value go to
/// cache row `slots[r]` of each layer's pool (`page * page_size + position %
/// page_size`), and its sequence's pages start at `page_table[table_offsets[r]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepLayout {
    pub tokens: Vec<u32>,
    pub positions: Vec<i32>,
    pub slots: Vec<i32>,
    pub table_offsets: Vec<i32>,
    /// Each chunk's pages up to the one holding its last position, chunk
    /// after chunk (pages past it are not read: attention is causal).
    pub page_table: Vec<i32>,
    /// The rows whose next-token logits are wanted (each chunk's
    /// [`Logits::rows`](crate::serve::engine::Logits::rows)), in row order (the order
    /// [`crate::serve::engine::Engine::step`] returns logits in).
    pub logit_rows: Vec<i32>,
}

impl StepLayout {
    /// The layout of `chunks`, which [`crate::serve::engine::check_chunks`]
    /// has accepted (non-empty, their pages covering every position).
    pub fn new(chunks: &[Chunk<'_>], page_size: usize) -> Self {
        let rows: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let mut layout = Self {
            tokens: Vec::with_capacity(rows),
            positions: Vec::with_capacity(rows),
            slots: Vec::with_capacity(rows),
            table_offsets: Vec::with_capacity(rows),
            page_table: Vec::new(),
            logit_rows: Vec::new(),
        };
        for chunk in chunks {
            let first = layout.tokens.len();
            layout.logit_rows.extend(
                chunk
                    .logits
                    .rows(chunk.tokens.len())
                    .map(|r| index(first + r)),
            );
            let offset = index(layout.page_table.len());
            let end = chunk.start + chunk.tokens.len();
            let used = pages_for(end, page_size);
            layout
                .page_table
                .extend(chunk.pages[..used].iter().map(|&p| index(p as usize)));
            for (i, &token) in chunk.tokens.iter().enumerate() {
                let position = chunk.start + i;
                let page = chunk.pages[position / page_size] as usize;
                layout.tokens.push(token);
                layout.positions.push(index(position));
                layout
                    .slots
                    .push(index(page * page_size + position % page_size));
                layout.table_offsets.push(offset);
            }
        }
        layout
    }

    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    /// `0..rows`: every row's attention output (the layers before the last).
    pub fn all_rows(&self) -> Vec<i32> {
        (0..self.rows()).map(index).collect()
    }
}

/// Cache rows (`pages * page_size`) a layer's device pool may hold: the
/// kernels index rows with `int`.
pub fn pool_fits(pages: usize, page_size: usize) -> bool {
    pages
        .checked_mul(page_size)
        .is_some_and(|rows| rows <= i32::MAX as usize)
}

/// The paged attention kernel's launch shape for `out_rows` query rows of
/// `heads` heads: `(grid, block)`, one block per (row, head), the row on
/// the grid's x axis (up to 2³¹ − 1: a long prefill's rows), the head on y
/// (at most 65 535).
pub fn paged_attention_launch(out_rows: usize, heads: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
    let rows = u32::try_from(out_rows).expect("query rows exceed the grid");
    assert!(heads <= 65_535, "more heads than a grid's y axis holds");
    ((rows, heads as u32, 1), (PAGED_ATTENTION_THREADS, 1, 1))
}

/// A value as the kernels' `int` (a step's rows, positions and pages stay
/// far below 2³¹; [`pool_fits`] bounds the cache rows).
fn index(value: usize) -> i32 {
    i32::try_from(value).expect("a step index exceeds i32")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::engine::Logits;

    #[test]
    fn a_mixed_step_flattens_rows_slots_and_page_tables() {
        // Page size 4. Sequence A prefills positions 0..6 on pages [7, 2]
        // (position 5 is slot 1 of page 2); sequence B decodes position 9 on
        // pages [5, 0, 3] (third page, slot 1); sequence C is a chunk in the
        // middle of a prompt (positions 4..6 of pages [1, 6, 4]), no logits.
        let a_tokens = [10, 11, 12, 13, 14, 15];
        let chunks = [
            Chunk {
                pages: &[7, 2],
                start: 0,
                tokens: &a_tokens,
                logits: Logits::Last,
                adapter: None,
            },
            Chunk {
                pages: &[5, 0, 3],
                start: 9,
                tokens: &[20],
                logits: Logits::Last,
                adapter: None,
            },
            Chunk {
                pages: &[1, 6, 4],
                start: 4,
                tokens: &[30, 31],
                logits: Logits::None,
                adapter: None,
            },
            // D scores a prompt: every row's logits.
            Chunk {
                pages: &[8],
                start: 0,
                tokens: &[40, 41, 42],
                logits: Logits::All,
                adapter: None,
            },
        ];
        let layout = StepLayout::new(&chunks, 4);
        assert_eq!(layout.rows(), 12);
        assert_eq!(
            layout.tokens,
            [10, 11, 12, 13, 14, 15, 20, 30, 31, 40, 41, 42]
        );
        assert_eq!(layout.positions, [0, 1, 2, 3, 4, 5, 9, 4, 5, 0, 1, 2]);
        assert_eq!(
            layout.slots,
            [28, 29, 30, 31, 8, 9, 13, 24, 25, 32, 33, 34],
            "page * 4 + position % 4"
        );
        // C's third page is past its last position: not in the table.
        assert_eq!(layout.page_table, [7, 2, 5, 0, 3, 1, 6, 8]);
        assert_eq!(layout.table_offsets, [0, 0, 0, 0, 0, 0, 2, 5, 5, 7, 7, 7]);
        assert_eq!(layout.logit_rows, [5, 6, 9, 10, 11]);
        assert_eq!(layout.all_rows(), (0..12).collect::<Vec<_>>());
        // Every row's slot is the page its table names for its position.
        for r in 0..layout.rows() {
            let (p, offset) = (layout.positions[r], layout.table_offsets[r]);
            let page = layout.page_table[(offset + p / 4) as usize];
            assert_eq!(layout.slots[r], page * 4 + p % 4, "row {r}");
        }
    }

    #[test]
    fn launch_shapes_and_pool_bounds() {
        assert_eq!(
            paged_attention_launch(8192, 32),
            ((8192, 32, 1), (PAGED_ATTENTION_THREADS, 1, 1))
        );
        assert_eq!(PAGED_ATTENTION_THREADS % 32, 0);
        assert!(pool_fits(1 << 20, 16));
        assert!(!pool_fits(1 << 28, 16), "2^32 rows overflow int");
        assert!(!pool_fits(usize::MAX, 2));
    }

    #[test]
    fn latent_attention_and_wide_heads_are_refused_by_name() {
        let native = crate::model::Model::<f32>::initial(tiny_config(), 1);
        let mut model = crate::serve::model::ServeModel::from_native(native);
        assert_eq!(unsupported(&model), None);
        model.config.head_dim = 512;
        assert!(unsupported(&model).unwrap().contains("head_dim 512"));
        model.config.head_dim = 16;
        model.config.latent = Some(crate::serve::model::LatentShape {
            q_lora_rank: None,
            kv_lora_rank: 8,
            qk_nope_dim: 8,
            qk_rope_dim: 8,
            v_head_dim: 8,
            softmax_scale: 0.25,
        });
        assert!(
            unsupported(&model)
                .unwrap()
                .contains("multi-head latent attention")
        );
        // An expert-parallel rank's share of the experts.
        let share = crate::model::Model::<f32>::initial_with_experts(tiny_config(), 1, 0..2);
        let share = crate::serve::model::ServeModel::from_native(share);
        assert!(
            unsupported(&share)
                .unwrap()
                .contains("holds only experts 0..2")
        );
        // As a replica's rank, the share it owns is served; another is not.
        assert_eq!(unsupported_share(&share, Some(&(0..2))), None);
        assert!(
            unsupported_share(&share, Some(&(2..4)))
                .unwrap()
                .contains("this rank owns 2..4")
        );
    }

    fn tiny_config() -> crate::model::ModelConfig {
        let spec: moe_crds::ModelSpec = serde_json::from_value(serde_json::json!({
            "vocabSize": 256, "hiddenSize": 32, "layers": 2, "attentionHeads": 4,
            "kvHeads": 2, "seqLen": 16,
            "moe": {"experts": 4, "topK": 2, "expertHiddenSize": 16}
        }))
        .expect("a valid model spec");
        crate::model::ModelConfig::from_spec(&spec).expect("a valid model config")
    }
}
