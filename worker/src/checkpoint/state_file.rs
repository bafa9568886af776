//! `state.safetensors`: weights, AdamW moments and MoE selection biases, all
//! FP32 in the model's canonical tensor order and names. With expert
//! parallelism the routed-expert tensors are left out of it and written by
//! their owners as expert shards (`experts-A-B.safetensors`: the same names,
//! experts `A..B` of each tensor, leading dimension `B - A`).
//!
//! A model may hold only some routed experts (an expert-parallel rank's):
//! it writes those as its shard, and decoding for it copies only those out
//! of whatever files hold them.

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use std::ops::Range;

use crate::dist::expert_parallel::is_expert_tensor;
use crate::model::{Gradients, Model, ModelConfig};
use crate::train::TrainerState;
use crate::train::lora::{Lora, LoraSettings};

const WEIGHTS: &str = "weights";
const FIRST_MOMENT: &str = "adam_m";
const SECOND_MOMENT: &str = "adam_v";
const SELECTION_BIAS: &str = "selection_bias";

/// The optimizer's first and second moments, when the model's weights are
/// trained (a `training.lora` run trains only its adapters, whose moments
/// are in `lora.safetensors`).
pub type Moments<'a> = Option<[&'a Gradients<f32>; 2]>;

/// The tensors of `model` and its optimizer moments as safetensors bytes;
/// without the routed-expert tensors when `experts_in_shards`.
pub fn encode(
    model: &Model<f32>,
    moments: Moments<'_>,
    experts_in_shards: bool,
) -> Result<Vec<u8>, String> {
    let config = model.config();
    let held = model.held_experts();
    let holds_all = held == (0..config.moe.n_routed_experts);
    if !experts_in_shards && !holds_all && model.moe_layers().next().is_some() {
        return Err(format!(
            "a model holding only experts {held:?} writes them as a shard, not in the state file"
        ));
    }
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (prefix, tensors) in groups(model, moments) {
        for t in tensors {
            if experts_in_shards && is_expert_tensor(&t.name) {
                continue;
            }
            named.push((format!("{prefix}/{}", t.name), t.shape, to_bytes(t.values)));
        }
    }
    for (block, layer) in moe_blocks(config).zip(model.moe_layers()) {
        let bias = &layer.selection_bias;
        named.push((
            format!("{SELECTION_BIAS}/blocks.{block}"),
            vec![bias.len()],
            to_bytes(bias),
        ));
    }
    serialize(&named)
}

/// Experts `experts` of every routed-expert tensor (weights and moments):
/// one expert shard.
pub fn encode_experts(
    model: &Model<f32>,
    moments: Moments<'_>,
    experts: Range<usize>,
) -> Result<Vec<u8>, String> {
    let held = model.held_experts();
    if experts.start < held.start || experts.end > held.end {
        return Err(format!(
            "experts {experts:?} are not all held here (only {held:?})"
        ));
    }
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (prefix, tensors) in groups(model, moments) {
        for t in tensors.into_iter().filter(|t| is_expert_tensor(&t.name)) {
            let per = t.values.len() / held.len();
            let mut shape = t.shape;
            shape[0] = experts.len();
            let local = experts.start - held.start..experts.end - held.start;
            let values = &t.values[local.start * per..local.end * per];
            named.push((format!("{prefix}/{}", t.name), shape, to_bytes(values)));
        }
    }
    serialize(&named)
}

/// Copies the experts an expert shard (experts `experts`) has in common
/// with `state` into it; the moments too `with_moments`.
pub fn decode_experts_into(
    bytes: &[u8],
    experts: Range<usize>,
    state: &mut TrainerState,
    with_moments: bool,
) -> Result<(), String> {
    if !with_moments {
        return decode_expert_weights_into(bytes, experts, &mut state.model);
    }
    let file = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let (held, names_and_shapes) = layout(&state.model);
    let targets = [
        (WEIGHTS, state.model.weights.tensors_mut()),
        (FIRST_MOMENT, state.first_moment.tensors_mut()),
        (SECOND_MOMENT, state.second_moment.tensors_mut()),
    ];
    copy_experts(&file, experts, held, &names_and_shapes, targets)
}

/// The weights' tensors, then each moment's, by prefix.
fn groups<'m>(
    model: &'m Model<f32>,
    moments: Moments<'m>,
) -> Vec<(&'static str, Vec<crate::model::NamedTensor<'m, f32>>)> {
    let config = model.config();
    let mut groups = vec![(WEIGHTS, model.tensors())];
    if let Some([first, second]) = moments {
        groups.push((FIRST_MOMENT, first.tensors(config)));
        groups.push((SECOND_MOMENT, second.tensors(config)));
    }
    groups
}

/// [`decode_experts_into`] for the model alone, the moments not read.
pub fn decode_expert_weights_into(
    bytes: &[u8],
    experts: Range<usize>,
    model: &mut Model<f32>,
) -> Result<(), String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let (held, names_and_shapes) = layout(model);
    let targets = [(WEIGHTS, model.weights.tensors_mut())];
    copy_experts(&file, experts, held, &names_and_shapes, targets)
}

/// The experts `model` holds, and its tensors' names and (held) shapes.
fn layout(model: &Model<f32>) -> (Range<usize>, Vec<(String, Vec<usize>)>) {
    let names_and_shapes = model
        .tensors()
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();
    (model.held_experts(), names_and_shapes)
}

/// Copies the experts the shard `file` (experts `experts`) has in common
/// with `held` into each group of `targets` (tensors in `names_and_shapes` order).
fn copy_experts<const N: usize>(
    file: &SafeTensors<'_>,
    experts: Range<usize>,
    held: Range<usize>,
    names_and_shapes: &[(String, Vec<usize>)],
    targets: [(&str, Vec<&mut Vec<f32>>); N],
) -> Result<(), String> {
    let common = experts.start.max(held.start)..experts.end.min(held.end);
    for (prefix, tensors) in targets {
        for (values, (name, shape)) in tensors.into_iter().zip(names_and_shapes) {
            if !is_expert_tensor(name) {
                continue;
            }
            let mut shape = shape.clone();
            shape[0] = experts.len();
            let name = format!("{prefix}/{name}");
            if common.is_empty() {
                // Still checked, so a shard is valid or not whoever reads it.
                read_rows(file, &name, &shape, 0..0)?;
                continue;
            }
            let per = values.len() / held.len();
            let slice = read_rows(
                file,
                &name,
                &shape,
                common.start - experts.start..common.end - experts.start,
            )?;
            values[(common.start - held.start) * per..(common.end - held.start) * per]
                .copy_from_slice(&slice);
        }
    }
    Ok(())
}

fn serialize(named: &[(String, Vec<usize>, Vec<u8>)]) -> Result<Vec<u8>, String> {
    let views = named
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
                .map_err(|e| format!("tensor {name}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

/// The trainer state in `bytes`, every tensor checked against `config`,
/// holding routed experts `experts` only. `step` and the data position come
/// from the manifest. With `experts_in_shards` the routed-expert tensors
/// are not in `bytes`: they are left zero for [`decode_experts_into`];
/// otherwise the held experts' rows are read out of the whole tensors.
/// Without `with_moments` (a LoRA run's) the moments are zero.
pub fn decode(
    bytes: &[u8],
    config: &ModelConfig,
    step: u64,
    data: crate::data::DataPosition,
    experts_in_shards: bool,
    experts: Range<usize>,
    with_moments: bool,
) -> Result<TrainerState, String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let model = model_from(&file, config, experts_in_shards, experts.clone())?;
    let names_and_shapes = whole_shapes(&model);
    let zeros = || Gradients::zeros_with_experts(config, experts.clone());
    let mut first_moment = zeros();
    let mut second_moment = zeros();
    let targets = [
        (FIRST_MOMENT, first_moment.tensors_mut()),
        (SECOND_MOMENT, second_moment.tensors_mut()),
    ];
    for (prefix, tensors) in targets.into_iter().filter(|_| with_moments) {
        read_tensors(
            &file,
            prefix,
            tensors,
            &names_and_shapes,
            experts_in_shards,
            &experts,
        )?;
    }
    Ok(TrainerState {
        model,
        first_moment,
        second_moment,
        step,
        data,
        lora: None,
    })
}

/// The model alone in `bytes` (weights and selection biases, as
/// [`decode`] reads them), the optimizer moments not read: what serving
/// and export need, in a third of the memory.
pub fn decode_model(
    bytes: &[u8],
    config: &ModelConfig,
    experts_in_shards: bool,
    experts: Range<usize>,
) -> Result<Model<f32>, String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    model_from(&file, config, experts_in_shards, experts)
}

fn model_from(
    file: &SafeTensors<'_>,
    config: &ModelConfig,
    experts_in_shards: bool,
    experts: Range<usize>,
) -> Result<Model<f32>, String> {
    let zeros = Gradients::zeros_with_experts(config, experts.clone());
    let mut model = Model::new(config.clone(), zeros).map_err(|e| e.to_string())?;
    let names_and_shapes = whole_shapes(&model);
    read_tensors(
        file,
        WEIGHTS,
        model.weights.tensors_mut(),
        &names_and_shapes,
        experts_in_shards,
        &experts,
    )?;
    let blocks: Vec<usize> = moe_blocks(config).collect();
    for (block, layer) in blocks.into_iter().zip(model.moe_layers_mut()) {
        let shape = [layer.selection_bias.len()];
        layer.selection_bias = read(file, &format!("{SELECTION_BIAS}/blocks.{block}"), &shape)?;
    }
    Ok(model)
}

/// Names and whole shapes of `model`'s tensors: an expert tensor's leading
/// dimension is every expert, whichever it holds.
fn whole_shapes(model: &Model<f32>) -> Vec<(String, Vec<usize>)> {
    let experts = model.config().moe.n_routed_experts;
    model
        .tensors()
        .into_iter()
        .map(|mut t| {
            if is_expert_tensor(&t.name) {
                t.shape[0] = experts;
            }
            (t.name, t.shape)
        })
        .collect()
}

/// Reads the `prefix` group into `tensors` (in `names_and_shapes` order):
/// the held experts' rows of whole expert tensors, or none of them when
/// they are in shards.
fn read_tensors(
    file: &SafeTensors<'_>,
    prefix: &str,
    tensors: Vec<&mut Vec<f32>>,
    names_and_shapes: &[(String, Vec<usize>)],
    experts_in_shards: bool,
    experts: &Range<usize>,
) -> Result<(), String> {
    for (values, (name, shape)) in tensors.into_iter().zip(names_and_shapes) {
        let name = format!("{prefix}/{name}");
        *values = match (is_expert_tensor(&name), experts_in_shards) {
            (false, _) => read(file, &name, shape)?,
            (true, true) => continue,
            (true, false) => read_rows(file, &name, shape, experts.clone())?,
        };
    }
    Ok(())
}

/// Indices of the blocks with an MoE feed-forward layer.
fn moe_blocks(config: &ModelConfig) -> impl Iterator<Item = usize> + use<> {
    config.dense_layers..config.layers
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn read(file: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
    read_rows(file, name, shape, 0..shape.first().copied().unwrap_or(1))
}

/// Rows `rows` (along the leading dimension) of tensor `name`, whose shape
/// must be `shape`: a rank reads its experts out of a whole tensor without
/// converting the rest.
fn read_rows(
    file: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
    rows: Range<usize>,
) -> Result<Vec<f32>, String> {
    let view = file
        .tensor(name)
        .map_err(|_| format!("tensor {name} is missing"))?;
    f32_rows(name, (view.dtype(), view.shape()), view.data(), shape, rows)
}

/// Rows `rows` of the f32 tensor `name` stored as `stored` (dtype, shape)
/// in `data`, once its shape is checked to be `shape`.
fn f32_rows(
    name: &str,
    stored: (Dtype, &[usize]),
    data: &[u8],
    shape: &[usize],
    rows: Range<usize>,
) -> Result<Vec<f32>, String> {
    if stored.0 != Dtype::F32 || stored.1 != shape {
        return Err(format!(
            "tensor {name} is {:?} {:?}, expected F32 {shape:?}",
            stored.0, stored.1
        ));
    }
    let row_bytes = 4 * shape.iter().skip(1).product::<usize>();
    Ok(data[rows.start * row_bytes..rows.end * row_bytes]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// A state file or an expert shard, mapped, its header parsed once: export
/// reads the weights one tensor at a time, so it holds one tensor, never
/// the model.
pub struct MappedTensors {
    map: memmap2::Mmap,
    data_start: usize,
    metadata: safetensors::tensor::Metadata,
}

impl MappedTensors {
    pub fn new(map: memmap2::Mmap) -> Result<Self, String> {
        let (header, metadata) = SafeTensors::read_metadata(&map).map_err(|e| e.to_string())?;
        Ok(Self {
            data_start: 8 + header,
            metadata,
            map,
        })
    }

    /// Rows `rows` of weight tensor `name` (the model's name for it),
    /// whose shape in this file must be `shape`.
    pub fn weight_rows(
        &self,
        name: &str,
        shape: &[usize],
        rows: Range<usize>,
    ) -> Result<Vec<f32>, String> {
        self.rows(&format!("{WEIGHTS}/{name}"), shape, rows)
    }

    /// Rows `rows` of part `part` (`a`, `b`, ...) of the adapter on model
    /// tensor `name` in a `lora.safetensors` ([`encode_lora`]).
    pub fn adapter_rows(
        &self,
        name: &str,
        part: &str,
        shape: &[usize],
        rows: Range<usize>,
    ) -> Result<Vec<f32>, String> {
        self.rows(&format!("{name}/{part}"), shape, rows)
    }

    /// The selection biases of MoE block `block` (`experts` of them).
    pub fn selection_bias(&self, block: usize, experts: usize) -> Result<Vec<f32>, String> {
        self.rows(
            &format!("{SELECTION_BIAS}/blocks.{block}"),
            &[experts],
            0..experts,
        )
    }

    fn rows(&self, name: &str, shape: &[usize], rows: Range<usize>) -> Result<Vec<f32>, String> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| format!("tensor {name} is missing"))?;
        let (start, end) = info.data_offsets;
        let data = &self.map[self.data_start + start..self.data_start + end];
        f32_rows(name, (info.dtype, &info.shape), data, shape, rows)
    }
}

/// `lora.safetensors`: every adapter of `lora` — its frozen weights `W₀`,
/// `A`, `B` and their AdamW moments — named after the model tensor it
/// adapts (`blocks.0.wq/a`).
pub fn encode_lora(lora: &Lora) -> Result<Vec<u8>, String> {
    let mut named = Vec::new();
    for adapter in lora.adapters() {
        let r = lora.settings().rank;
        let (n, rows, cols) = (adapter.matrices, adapter.rows, adapter.cols);
        let parts: [(&str, Vec<usize>, &[f32]); 7] = [
            ("base", vec![n, rows, cols], &adapter.base),
            ("a", vec![n, r, cols], &adapter.a.values),
            ("a_m", vec![n, r, cols], &adapter.a.m),
            ("a_v", vec![n, r, cols], &adapter.a.v),
            ("b", vec![n, rows, r], &adapter.b.values),
            ("b_m", vec![n, rows, r], &adapter.b.m),
            ("b_v", vec![n, rows, r], &adapter.b.v),
        ];
        for (part, shape, values) in parts {
            named.push((format!("{}/{part}", adapter.name), shape, to_bytes(values)));
        }
    }
    serialize(&named)
}

/// The adapters `settings` puts on `model` (its tensors' names and
/// shapes), their values read from `bytes` as [`encode_lora`] wrote them.
pub fn decode_lora(
    bytes: &[u8],
    settings: LoraSettings,
    model: &Model<f32>,
) -> Result<Lora, String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut adapters = Lora::new(settings.clone(), model, 0).adapters().to_vec();
    let r = settings.rank;
    for adapter in &mut adapters {
        let (n, rows, cols) = (adapter.matrices, adapter.rows, adapter.cols);
        let name = |part: &str| format!("{}/{part}", adapter.name);
        adapter.base = read(&file, &name("base"), &[n, rows, cols])?;
        for (param, part, shape) in [
            (&mut adapter.a, "a", [n, r, cols]),
            (&mut adapter.b, "b", [n, rows, r]),
        ] {
            param.values = read(&file, &name(part), &shape)?;
            param.m = read(&file, &name(&format!("{part}_m")), &shape)?;
            param.v = read(&file, &name(&format!("{part}_v")), &shape)?;
        }
    }
    let expected = 7 * adapters.len();
    if file.len() != expected {
        return Err(format!(
            "it holds {} tensors, the adapters of training.lora are {expected}",
            file.len()
        ));
    }
    Ok(Lora::from_parts(settings, adapters))
}
