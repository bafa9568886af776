//! Low-rank adapters (LoRA) served beside their base model: `--lora
//! name=dir` loads a PEFT adapter directory (`adapter_config.json`,
//! `adapter_model.safetensors`: what `moe-worker export` writes under
//! `adapter/`, and what PEFT's `save_pretrained` writes), and a request
//! naming `name` as its `model` runs the base model with the adapter's
//! `scale · B·A` added to each adapted projection, row by row: one batch
//! mixes requests for the base model and for any adapter.
//!
//! Why per row and not merged: merging `W₀ + s·B·A` would need a copy of
//! every adapted weight per adapter; the low-rank product costs
//! `2·r·(in + out)` per row and projection next to the weight's
//! `2·in·out`, and the base weights stay shared (vLLM's multi-LoRA and
//! S-LoRA serve adapters the same way).
//!
//! Served: the attention projections (`q_proj`, `k_proj`, `v_proj`,
//! `o_proj`) of grouped-query attention, the default targets of
//! `training.lora` and of PEFT, and the MLP projections (`gate_proj`,
//! `up_proj`, `down_proj`) of dense layers, of routed experts (applied to
//! the rows each expert computes, for the tokens routed to it) and of the
//! shared experts: every module a training job's export holds adapters of.
//! An adapter of any other module (the router, an embedding) is refused at
//! startup naming the tensor; its merged model (which the export writes
//! beside the adapter) serves it. Expert-parallel replicas serve them too:
//! every rank runs attention and the dense layers with them, and a row sent
//! to another rank's expert carries its index in the step, by which that
//! rank finds its adapter (`serve/expert_parallel.rs`).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use crate::model::pretrained::interleave_rope_rows;
use crate::ops::vector;
use crate::serve::hf::weights::TensorStore;
use crate::serve::model::{RopeLayout, ServeConfig};

/// An adapter to load: the name requests use and its PEFT directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSource {
    pub name: String,
    pub dir: PathBuf,
}

impl AdapterSource {
    /// `name=dir`, as `--lora` takes it. The name is a model id: no
    /// whitespace or commas (metrics list adapters comma-separated).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, dir) = text
            .split_once('=')
            .filter(|(name, dir)| !name.is_empty() && !dir.is_empty())
            .ok_or_else(|| format!("--lora {text:?} is not NAME=DIR"))?;
        if name.contains(|c: char| c.is_whitespace() || c == ',') {
            return Err(format!(
                "--lora {text:?}: the name {name:?} holds whitespace or a comma; name the \
                 adapter as requests will (e.g. support-v2)"
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            dir: PathBuf::from(dir),
        })
    }
}

/// One adapted projection's update: `out += scale · B·(A·x)` per row.
#[derive(Clone, Debug, PartialEq)]
pub struct LowRank {
    rank: usize,
    input: usize,
    output: usize,
    /// `[rank, input]`.
    a: Vec<f32>,
    /// `Bᵀ`, `[rank, output]`: the update is `rank` whole-row multiply-adds.
    bt: Vec<f32>,
    scale: f32,
}

impl LowRank {
    /// `scale · B·A` with `a: [rank, input]`, `b: [output, rank]`.
    fn new(a: Vec<f32>, b: &[f32], input: usize, output: usize, scale: f32) -> Self {
        let rank = a.len() / input;
        let mut bt = vec![0.0; rank * output];
        for (o, row) in b.chunks_exact(rank).enumerate() {
            for (k, &value) in row.iter().enumerate() {
                bt[k * output + o] = value;
            }
        }
        Self {
            rank,
            input,
            output,
            a,
            bt,
            scale,
        }
    }

    /// Adds the update of every row of `x` (`[rows, input]`) to the
    /// matching row of `out`, each `stride` wide with the projection's
    /// outputs at `offset` (q, k and v share one product's rows).
    pub fn add_rows(&self, out: &mut [f32], stride: usize, offset: usize, x: &[f32]) {
        let mut low = vec![0.0f32; self.rank];
        for (x, out) in x.chunks_exact(self.input).zip(out.chunks_exact_mut(stride)) {
            for (l, a) in low.iter_mut().zip(self.a.chunks_exact(self.input)) {
                *l = self.scale * vector::dot_f32(a, x);
            }
            let out = &mut out[offset..offset + self.output];
            for (&l, bt) in low.iter().zip(self.bt.chunks_exact(self.output)) {
                vector::axpy(out, l, bt);
            }
        }
    }

    fn bytes(&self) -> usize {
        (self.a.len() + self.bt.len()) * size_of::<f32>()
    }
}

/// One SwiGLU MLP's adapted projections: a dense layer's, a routed
/// expert's, or a MoE layer's shared experts'.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MlpAdapter {
    pub gate: Option<LowRank>,
    pub up: Option<LowRank>,
    pub down: Option<LowRank>,
}

impl MlpAdapter {
    fn projections(&self) -> [&Option<LowRank>; 3] {
        [&self.gate, &self.up, &self.down]
    }

    /// Whether it adapts nothing.
    pub fn is_empty(&self) -> bool {
        self.projections().iter().all(|p| p.is_none())
    }
}

/// The projections of one block an adapter changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockAdapter {
    pub q: Option<LowRank>,
    pub k: Option<LowRank>,
    pub v: Option<LowRank>,
    pub o: Option<LowRank>,
    /// A dense layer's MLP.
    pub mlp: MlpAdapter,
    /// A MoE layer's routed experts, by expert (empty: none adapted).
    pub experts: Vec<MlpAdapter>,
    /// A MoE layer's shared experts (fused, or Qwen2-MoE's gated one).
    pub shared: MlpAdapter,
}

impl BlockAdapter {
    /// Every adapted projection, with where it is.
    fn projections(&self) -> impl Iterator<Item = (Site, Projection, &LowRank)> {
        let attention = [
            (Projection::Q, &self.q),
            (Projection::K, &self.k),
            (Projection::V, &self.v),
            (Projection::O, &self.o),
        ]
        .into_iter()
        .map(|(p, low)| (Site::Attention, p, low));
        attention
            .chain(mlp(Site::Mlp, &self.mlp))
            .chain(
                self.experts
                    .iter()
                    .enumerate()
                    .flat_map(move |(e, m)| mlp(Site::Expert(e), m)),
            )
            .chain(mlp(Site::Shared, &self.shared))
            .filter_map(|(site, p, low)| low.as_ref().map(|low| (site, p, low)))
    }

    /// Whether it adapts a MoE layer's experts (routed or shared).
    pub fn adapts_experts(&self) -> bool {
        !self.shared.is_empty() || self.experts.iter().any(|e| !e.is_empty())
    }

    fn slot(&mut self, site: Site, projection: Projection, experts: usize) -> &mut Option<LowRank> {
        let mlp = match site {
            Site::Attention => {
                return match projection {
                    Projection::Q => &mut self.q,
                    Projection::K => &mut self.k,
                    Projection::V => &mut self.v,
                    _ => &mut self.o,
                };
            }
            Site::Mlp => &mut self.mlp,
            Site::Shared => &mut self.shared,
            Site::Expert(e) => {
                if self.experts.is_empty() {
                    self.experts = vec![MlpAdapter::default(); experts];
                }
                &mut self.experts[e]
            }
        };
        match projection {
            Projection::Gate => &mut mlp.gate,
            Projection::Up => &mut mlp.up,
            _ => &mut mlp.down,
        }
    }
}

/// `mlp`'s projections at `site`.
fn mlp(site: Site, mlp: &MlpAdapter) -> impl Iterator<Item = (Site, Projection, &Option<LowRank>)> {
    [Projection::Gate, Projection::Up, Projection::Down]
        .into_iter()
        .zip(mlp.projections())
        .map(move |(p, low)| (site, p, low))
}

/// Where an adapted projection is in a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Site {
    Attention,
    /// A dense layer's MLP.
    Mlp,
    /// Routed expert `e` of a MoE layer.
    Expert(usize),
    /// A MoE layer's shared experts.
    Shared,
}

/// Which projection, by Hugging Face's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    fn name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }
}

/// A block's feed-forward layer, as adapters see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnShape {
    Dense {
        width: usize,
    },
    Moe {
        experts: usize,
        expert_width: usize,
        /// The shared experts' (fused) width, if any.
        shared_width: Option<usize>,
    },
}

/// What adapters are loaded for: the model's config, and each block's
/// feed-forward layer.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterShape {
    pub config: ServeConfig,
    pub ffn: Vec<FfnShape>,
}

impl AdapterShape {
    /// `(input, output)` of `projection` at `site` of block `layer`, if the
    /// model has it.
    fn dims(&self, layer: usize, site: Site, projection: Projection) -> Option<(usize, usize)> {
        let c = &self.config;
        let (h, qw, kv) = (c.hidden, c.q_width(), c.kv_width());
        let width = match (site, self.ffn.get(layer)?) {
            (Site::Attention, _) => {
                return Some(match projection {
                    Projection::Q => (h, qw),
                    Projection::K | Projection::V => (h, kv),
                    _ => (qw, h),
                });
            }
            (Site::Mlp, FfnShape::Dense { width }) => *width,
            (
                Site::Expert(e),
                FfnShape::Moe {
                    experts,
                    expert_width,
                    ..
                },
            ) if e < *experts => *expert_width,
            (
                Site::Shared,
                FfnShape::Moe {
                    shared_width: Some(width),
                    ..
                },
            ) => *width,
            _ => return None,
        };
        Some(match projection {
            Projection::Down => (width, h),
            _ => (h, width),
        })
    }
}

/// A loaded adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    pub name: String,
    pub dir: PathBuf,
    /// One per block of the model (blocks it leaves alone are empty).
    pub blocks: Vec<BlockAdapter>,
}

impl Adapter {
    /// Bytes of its matrices.
    pub fn bytes(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(BlockAdapter::projections)
            .map(|(_, _, low)| low.bytes())
            .sum()
    }

    /// The adapted modules (`"q_proj"`, `"experts.gate_proj"`,
    /// `"shared_experts.down_proj"`…), each once, for the log.
    pub fn modules(&self) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for (site, projection, _) in self.blocks.iter().flat_map(BlockAdapter::projections) {
            let name = match site {
                Site::Attention | Site::Mlp => projection.name().to_owned(),
                Site::Expert(_) => format!("experts.{}", projection.name()),
                Site::Shared => format!("shared_experts.{}", projection.name()),
            };
            if !seen.contains(&name) {
                seen.push(name);
            }
        }
        seen
    }
}

/// The fields of `adapter_config.json` serving reads; the ones that would
/// change the arithmetic and are not implemented are refused by name.
#[derive(Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    bias: Option<String>,
    modules_to_save: Option<Value>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, Value>,
}

/// Loads every source for a model of `shape`; the names must differ from
/// each other and from `base` (the base model's name).
pub fn load_all(
    sources: &[AdapterSource],
    base: &str,
    shape: &AdapterShape,
) -> Result<Vec<Adapter>, String> {
    let mut names = HashSet::from([base]);
    for source in sources {
        if !names.insert(&source.name) {
            return Err(format!(
                "adapter name {:?} is used twice (the base model is served as {base:?}); \
                 requests tell models apart by name",
                source.name
            ));
        }
    }
    sources.iter().map(|s| load(s, shape)).collect()
}

/// Loads `source` for a model of `shape`, refusing what it cannot serve
/// exactly (naming the file, the field or the tensor).
pub fn load(source: &AdapterSource, shape: &AdapterShape) -> Result<Adapter, String> {
    let config = &shape.config;
    let dir = &source.dir;
    let refuse =
        |problem: String| format!("adapter {:?} ({}): {problem}", source.name, dir.display());
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read(&config_path)
        .map_err(|e| refuse(format!("cannot read adapter_config.json: {e}")))?;
    let peft: PeftConfig = serde_json::from_slice(&text).map_err(|e| {
        refuse(format!(
            "adapter_config.json is not a PEFT LoRA config: {e}"
        ))
    })?;
    check_config(&peft).map_err(|p| refuse(format!("adapter_config.json: {p}")))?;
    if config.latent.is_some() {
        return Err(refuse(
            "the model uses multi-head latent attention, whose projections adapters are not \
             served on; serve the merged model instead"
                .into(),
        ));
    }
    let scale = if peft.use_rslora {
        peft.lora_alpha / (peft.r as f64).sqrt()
    } else {
        peft.lora_alpha / peft.r as f64
    } as f32;
    let weights = dir.join("adapter_model.safetensors");
    let mut store = TensorStore::read_single(&weights).map_err(|e| refuse(e.to_string()))?;
    let mut blocks = vec![BlockAdapter::default(); config.layers];
    let names: Vec<String> = store.left().into_iter().map(str::to_owned).collect();
    for name in names.iter().filter(|n| n.ends_with(".lora_A.weight")) {
        let module = name.strip_suffix(".lora_A.weight").expect("filtered");
        let served = served_module(module, config.layers).and_then(|(layer, site, projection)| {
            let (input, output) = shape.dims(layer, site, projection)?;
            Some((layer, site, projection, input, output))
        });
        let (layer, site, projection, input, output) = served.ok_or_else(|| {
            refuse(format!(
                "tensor {name} adapts a module this model does not have where it says, or one \
                 serving does not adapt: adapters are served on self_attn's q_proj, k_proj, \
                 v_proj and o_proj, and on the gate_proj, up_proj and down_proj of dense \
                 layers' mlp, of MoE layers' experts (mlp.experts.<e>, or Mixtral's \
                 block_sparse_moe.experts.<e> w1, w3, w2) and shared experts, in layers 0 to \
                 {}; serve the merged model instead (moe-worker export writes it beside the \
                 adapter)",
                config.layers.saturating_sub(1)
            ))
        })?;
        let r = peft.r;
        let a = store
            .take(name, &[r, input])
            .map_err(|e| refuse(e.to_string()))?;
        let b_name = format!("{module}.lora_B.weight");
        let mut b = store
            .take(&b_name, &[output, r])
            .map_err(|e| refuse(e.to_string()))?;
        // PEFT's B rows are in Hugging Face's RoPE layout (halves); the
        // worker's own model rotates pairs, so q's and k's rows are
        // reordered as its weights were when it was trained from one:
        // P·(W₀ + s·B·A) = P·W₀ + s·(P·B)·A.
        if config.rope_layout == RopeLayout::Interleaved
            && matches!(projection, Projection::Q | Projection::K)
        {
            b = interleave_rope_rows(&b, output / config.head_dim, config.head_dim, r);
        }
        let low = LowRank::new(a, &b, input, output, scale);
        let experts = match shape.ffn[layer] {
            FfnShape::Moe { experts, .. } => experts,
            FfnShape::Dense { .. } => 0,
        };
        *blocks[layer].slot(site, projection, experts) = Some(low);
    }
    if let Some(left) = store.left().into_iter().next() {
        return Err(refuse(format!(
            "tensor {left} is not the lora_B of a lora_A in the file (a LoRA adapter holds \
             …lora_A.weight and …lora_B.weight of each module, nothing else)"
        )));
    }
    let adapter = Adapter {
        name: source.name.clone(),
        dir: dir.clone(),
        blocks,
    };
    if adapter.bytes() == 0 {
        return Err(refuse(format!("{} holds no adapter", weights.display())));
    }
    Ok(adapter)
}

/// What every rank of a replica must agree on: each adapter's name, shape
/// and values, in order.
pub fn fingerprint(adapters: &[Adapter]) -> u64 {
    let mut bytes = Vec::new();
    for adapter in adapters {
        bytes.extend_from_slice(adapter.name.as_bytes());
        bytes.push(0);
        for (layer, block) in adapter.blocks.iter().enumerate() {
            for (site, projection, low) in block.projections() {
                bytes.extend_from_slice(format!("{layer}.{site:?}.{projection:?}").as_bytes());
                bytes.extend_from_slice(&low.scale.to_le_bytes());
                for value in low.a.iter().chain(&low.bt) {
                    bytes.extend_from_slice(&value.to_le_bytes());
                }
            }
        }
    }
    crate::dist::schedule::fnv1a(&bytes)
}

/// The config's fields that change what an adapter computes, refused when
/// set to what is not implemented.
fn check_config(peft: &PeftConfig) -> Result<(), String> {
    let peft_type = peft.peft_type.as_deref().unwrap_or("LORA");
    let refusal = if peft_type != "LORA" {
        Some(format!(
            "peft_type is {peft_type}; only LORA adapters are served"
        ))
    } else if peft.r == 0 {
        Some("r is 0".to_owned())
    } else if !peft.lora_alpha.is_finite() {
        Some(format!("lora_alpha is {}", peft.lora_alpha))
    } else if peft.use_dora {
        Some("use_dora is true; DoRA adapters are not served".to_owned())
    } else if peft.fan_in_fan_out {
        Some("fan_in_fan_out is true (Conv1D layers, GPT-2's); not served".to_owned())
    } else if peft.bias.as_deref().is_some_and(|b| b != "none") {
        Some(format!(
            "bias is {:?}; adapters that train biases are not served",
            peft.bias.as_deref().unwrap_or_default()
        ))
    } else if peft
        .modules_to_save
        .as_ref()
        .is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty()))
    {
        Some("modules_to_save is set; adapters carrying whole modules are not served".to_owned())
    } else if !peft.rank_pattern.is_empty() || !peft.alpha_pattern.is_empty() {
        Some(
            "rank_pattern or alpha_pattern is set; per-module ranks and alphas are not served"
                .to_owned(),
        )
    } else {
        None
    };
    refusal.map_or(Ok(()), Err)
}

/// Where a PEFT module is: `[base_model.model.]model.layers.{i}.` then
/// `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj` (a dense layer),
/// `mlp.experts.{e}.{gate,up,down}_proj` or Mixtral's
/// `block_sparse_moe.experts.{e}.{w1,w3,w2}` (a routed expert), or
/// `mlp.shared_experts.…` / `mlp.shared_expert.…` (the shared experts).
fn served_module(module: &str, layers: usize) -> Option<(usize, Site, Projection)> {
    let module = module.strip_prefix("base_model.model.").unwrap_or(module);
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok().filter(|&l| l < layers)?;
    let (path, leaf) = rest.rsplit_once('.')?;
    let projection = match leaf {
        "q_proj" => Projection::Q,
        "k_proj" => Projection::K,
        "v_proj" => Projection::V,
        "o_proj" => Projection::O,
        "gate_proj" | "w1" => Projection::Gate,
        "up_proj" | "w3" => Projection::Up,
        "down_proj" | "w2" => Projection::Down,
        _ => return None,
    };
    let mixtral = matches!(leaf, "w1" | "w2" | "w3");
    let attention = matches!(
        projection,
        Projection::Q | Projection::K | Projection::V | Projection::O
    );
    let expert = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|e| e.parse::<usize>().ok())
    };
    let site = match path {
        "self_attn" if attention => Site::Attention,
        _ if attention => return None,
        "mlp" if !mixtral => Site::Mlp,
        "mlp.shared_experts" | "mlp.shared_expert" if !mixtral => Site::Shared,
        _ if mixtral => Site::Expert(expert("block_sparse_moe.experts.")?),
        _ => Site::Expert(expert("mlp.experts.")?),
    };
    Some((layer, site, projection))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Rows updated together get the bits each gets alone.
    #[test]
    fn a_run_of_rows_is_updated_as_each_row_alone() {
        let (rank, input, output, rows) = (3, 40, 24, 5);
        let mut rng = SplitMix64::new(9);
        let a = rng.normal_vec(rank * input, 1.0);
        let b = rng.normal_vec(output * rank, 1.0);
        let low = LowRank::new(a, &b, input, output, 0.7);
        let x = rng.normal_vec(rows * input, 1.0);
        // q, k, v stacked: the update goes to the middle of each row.
        let stride = output + 10;
        let start = rng.normal_vec(rows * stride, 1.0);
        let mut together = start.clone();
        low.add_rows(&mut together, stride, 4, &x);
        let mut alone = start.clone();
        for i in 0..rows {
            let out = &mut alone[i * stride..(i + 1) * stride];
            low.add_rows(out, stride, 4, &x[i * input..(i + 1) * input]);
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&together), bits(&alone));
        assert_ne!(bits(&together), bits(&start));
        assert_eq!(together[..4], start[..4], "outside the offset untouched");
    }
}
