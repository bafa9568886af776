//! `state.safetensors`: weights, AdamW moments and MoE selection biases, all
//! FP32 in the model's canonical tensor order and names. With expert
//! parallelism the routed-expert tensors are left out of it and written by
//! their owners as expert shards (`experts-A-B.safetensors`: the same names,
//! experts `A..B` of each tensor, leading dimension `B - A`).

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use std::ops::Range;

use crate::dist::expert_parallel::is_expert_tensor;
use crate::model::{Gradients, Model, ModelConfig};
use crate::train::TrainerState;

const WEIGHTS: &str = "weights";
const FIRST_MOMENT: &str = "adam_m";
const SECOND_MOMENT: &str = "adam_v";
const SELECTION_BIAS: &str = "selection_bias";

/// The tensors of `model` and its optimizer moments as safetensors bytes;
/// without the routed-expert tensors when `experts_in_shards`.
pub fn encode(
    model: &Model<f32>,
    first_moment: &Gradients<f32>,
    second_moment: &Gradients<f32>,
    experts_in_shards: bool,
) -> Result<Vec<u8>, String> {
    let config = model.config();
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let groups = [
        (WEIGHTS, model.tensors()),
        (FIRST_MOMENT, first_moment.tensors(config)),
        (SECOND_MOMENT, second_moment.tensors(config)),
    ];
    for (prefix, tensors) in groups {
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
    first_moment: &Gradients<f32>,
    second_moment: &Gradients<f32>,
    experts: Range<usize>,
) -> Result<Vec<u8>, String> {
    let config = model.config();
    let n_experts = config.moe.n_routed_experts;
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let groups = [
        (WEIGHTS, model.tensors()),
        (FIRST_MOMENT, first_moment.tensors(config)),
        (SECOND_MOMENT, second_moment.tensors(config)),
    ];
    for (prefix, tensors) in groups {
        for t in tensors.into_iter().filter(|t| is_expert_tensor(&t.name)) {
            let per = t.values.len() / n_experts;
            let mut shape = t.shape;
            shape[0] = experts.len();
            let values = &t.values[experts.start * per..experts.end * per];
            named.push((format!("{prefix}/{}", t.name), shape, to_bytes(values)));
        }
    }
    serialize(&named)
}

/// Copies an expert shard's slices (experts `experts`) into `state`.
pub fn decode_experts_into(
    bytes: &[u8],
    experts: Range<usize>,
    state: &mut TrainerState,
) -> Result<(), String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let config = state.model.config().clone();
    let n_experts = config.moe.n_routed_experts;
    let names_and_shapes: Vec<(String, Vec<usize>)> = state
        .model
        .tensors()
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();
    let targets = [
        (WEIGHTS, state.model.weights.tensors_mut()),
        (FIRST_MOMENT, state.first_moment.tensors_mut()),
        (SECOND_MOMENT, state.second_moment.tensors_mut()),
    ];
    for (prefix, tensors) in targets {
        for (values, (name, shape)) in tensors.into_iter().zip(&names_and_shapes) {
            if !is_expert_tensor(name) {
                continue;
            }
            let per = values.len() / n_experts;
            let mut shape = shape.clone();
            shape[0] = experts.len();
            let slice = read(&file, &format!("{prefix}/{name}"), &shape)?;
            values[experts.start * per..experts.end * per].copy_from_slice(&slice);
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

/// The trainer state in `bytes`, every tensor checked against `config`.
/// `step` and the data position come from the manifest. With
/// `experts_in_shards` the routed-expert tensors are not in `bytes`: they
/// are left zero for [`decode_experts_into`].
pub fn decode(
    bytes: &[u8],
    config: &ModelConfig,
    step: u64,
    data: crate::data::DataPosition,
    experts_in_shards: bool,
) -> Result<TrainerState, String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut model =
        Model::new(config.clone(), Gradients::zeros(config)).map_err(|e| e.to_string())?;
    let mut first_moment = Gradients::zeros(config);
    let mut second_moment = Gradients::zeros(config);
    let names_and_shapes: Vec<(String, Vec<usize>)> = model
        .tensors()
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();
    let targets = [
        (WEIGHTS, model.weights.tensors_mut()),
        (FIRST_MOMENT, first_moment.tensors_mut()),
        (SECOND_MOMENT, second_moment.tensors_mut()),
    ];
    for (prefix, tensors) in targets {
        for (values, (name, shape)) in tensors.into_iter().zip(&names_and_shapes) {
            if experts_in_shards && is_expert_tensor(name) {
                continue;
            }
            *values = read(&file, &format!("{prefix}/{name}"), shape)?;
        }
    }
    let blocks: Vec<usize> = moe_blocks(config).collect();
    for (block, layer) in blocks.into_iter().zip(model.moe_layers_mut()) {
        let shape = [layer.selection_bias.len()];
        layer.selection_bias = read(&file, &format!("{SELECTION_BIAS}/blocks.{block}"), &shape)?;
    }
    Ok(TrainerState {
        model,
        first_moment,
        second_moment,
        step,
        data,
    })
}

/// Indices of the blocks with an MoE feed-forward layer.
fn moe_blocks(config: &ModelConfig) -> impl Iterator<Item = usize> + use<> {
    config.dense_layers..config.layers
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn read(file: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
    let view = file
        .tensor(name)
        .map_err(|_| format!("tensor {name} is missing"))?;
    if view.dtype() != Dtype::F32 || view.shape() != shape {
        return Err(format!(
            "tensor {name} is {:?} {:?}, expected F32 {shape:?}",
            view.dtype(),
            view.shape()
        ));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}
