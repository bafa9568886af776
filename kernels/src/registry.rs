//! Every kernel family: its id, its CUDA C source and the entry points a
//! launcher may ask for. Sources are embedded at build time, so the worker
//! binary carries them and needs no files beside it.

/// Prepended to every family's source (NVRTC compiles each family as one
/// translation unit and has no include path for our own headers).
pub const COMMON: &str = include_str!("../cuda/common.cuh");

/// One `.cu` file: a family of kernels compiled together into one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    /// The file's stem; also the module's name in the per-device cache.
    pub id: &'static str,
    source: &'static str,
    /// The `extern "C" __global__` functions of the family.
    pub entry_points: &'static [&'static str],
}

impl Family {
    /// The source NVRTC compiles: the common prelude, then the family.
    pub fn source(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", self.id, self.source)
    }

    /// The family's own source, without the prelude.
    pub fn own_source(&self) -> &'static str {
        self.source
    }
}

macro_rules! family {
    ($id:literal, [$($entry:literal),+ $(,)?]) => {
        Family {
            id: $id,
            source: include_str!(concat!("../cuda/", $id, ".cu")),
            entry_points: &[$($entry),+],
        }
    };
}

pub const RMSNORM: Family = family!(
    "rmsnorm",
    [
        "rmsnorm_forward_f32",
        "rmsnorm_backward_input_f32",
        "rmsnorm_backward_weight_partial_f32",
        "rmsnorm_backward_weight_f32",
    ]
);
pub const SWIGLU: Family = family!("swiglu", ["swiglu_forward_f32", "swiglu_backward_f32"]);
pub const CROSS_ENTROPY: Family = family!(
    "cross_entropy",
    ["cross_entropy_forward_f32", "cross_entropy_backward_f32"]
);
pub const ROPE: Family = family!("rope", ["rope_f32", "rope_positions_f32"]);
pub const ADAMW: Family = family!("adamw", ["adamw_f32"]);
pub const ROUTER: Family = family!("router", ["router_topk_f32", "router_backward_f32"]);
pub const PERMUTE: Family = family!(
    "permute",
    [
        "moe_chunk_counts",
        "moe_scan_offsets",
        "moe_scatter_slots",
        "moe_permute_rows",
        "moe_permute_backward_f32",
        "moe_unpermute_f32",
        "moe_unpermute_bf16",
        "moe_unpermute_backward_f32",
    ]
);
pub const FP8: Family = family!(
    "fp8",
    [
        "fp8_quantize_1x128_f32",
        "fp8_quantize_1x128_t_f32",
        "fp8_quantize_128x128_f32",
        "fp8_quantize_128x128_t_f32",
        "fp8_quantize_128x1_f32",
        "fp8_gemm_abt_f32",
        "fp8_unpad_rows_f32",
        "fp8_amax_f32",
        "fp8_delayed_scale_f32",
        "fp8_advance_histories",
    ]
);
pub const ATTENTION: Family = family!(
    "attention",
    [
        "attention_forward_f32",
        "attention_backward_query_f32",
        "attention_backward_key_value_f32",
        "attention_to_head_major_f32",
        "attention_to_token_major_f32",
        "attention_softmax_causal_f32",
        "attention_softmax_backward_f32",
    ]
);
pub const FLASH_ATTENTION: Family = family!(
    "flash_attention",
    [
        "flash_attention_forward_f32",
        "flash_attention_backward_delta_f32",
        "flash_attention_backward_key_value_f32",
        "flash_attention_backward_query_f32",
    ]
);
pub const GEMM: Family = family!("gemm", ["gemm_abt_f32_exact"]);
pub const EMBEDDING: Family = family!(
    "embedding",
    ["embedding_forward_f32", "embedding_backward_f32"]
);
pub const VECTOR: Family = family!(
    "vector",
    [
        "add_f32",
        "sum_squares_f32",
        "add_bias_rows_f32",
        "clamp_f32",
        "gather_rows_f32",
        "add_sigmoid_gated_f32",
        "divide_f32",
        "to_bf16_f32",
        "scale_f32",
        "lora_merge_f32",
    ]
);
pub const PAGED_ATTENTION: Family =
    family!("paged_attention", ["kv_write_f32", "paged_attention_f32"]);

/// All families, in the order the compile check reports them.
pub const FAMILIES: &[Family] = &[
    RMSNORM,
    SWIGLU,
    CROSS_ENTROPY,
    ROPE,
    ADAMW,
    ROUTER,
    PERMUTE,
    FP8,
    ATTENTION,
    FLASH_ATTENTION,
    EMBEDDING,
    GEMM,
    VECTOR,
    PAGED_ATTENTION,
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The kernel names a source defines, read from its text.
    fn defined_kernels(source: &str) -> BTreeSet<String> {
        let marker = "extern \"C\" __global__ void ";
        source
            .match_indices(marker)
            .map(|(at, _)| {
                let rest = &source[at + marker.len()..];
                rest[..rest.find('(').expect("kernel signature")]
                    .trim()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn entry_points_are_exactly_the_kernels_each_source_defines() {
        for family in FAMILIES {
            let listed: BTreeSet<String> =
                family.entry_points.iter().map(|s| s.to_string()).collect();
            assert_eq!(
                listed,
                defined_kernels(family.own_source()),
                "{}: registry and source disagree",
                family.id
            );
        }
    }

    #[test]
    fn every_source_file_is_registered() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/cuda");
        let on_disk: BTreeSet<String> = std::fs::read_dir(dir)
            .expect("kernels/cuda")
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".cu").map(str::to_string)
            })
            .collect();
        let registered: BTreeSet<String> = FAMILIES.iter().map(|f| f.id.to_string()).collect();
        assert_eq!(on_disk, registered);
    }

    #[test]
    fn entry_point_names_are_unique_across_families() {
        let mut seen = BTreeSet::new();
        for family in FAMILIES {
            for entry in family.entry_points {
                assert!(seen.insert(*entry), "{entry} defined twice");
            }
        }
    }
}
