//! `state.safetensors`: weights, AdamW moments and MoE selection biases, all
//! FP32 in the model's canonical tensor order and names.

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::model::{Gradients, Model, ModelConfig};
use crate::train::TrainerState;

const WEIGHTS: &str = "weights";
const FIRST_MOMENT: &str = "adam_m";
const SECOND_MOMENT: &str = "adam_v";
const SELECTION_BIAS: &str = "selection_bias";

/// The tensors of `model` and its optimizer moments as safetensors bytes.
pub fn encode(
    model: &Model<f32>,
    first_moment: &Gradients<f32>,
    second_moment: &Gradients<f32>,
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
/// `step` and the data position come from the manifest.
pub fn decode(
    bytes: &[u8],
    config: &ModelConfig,
    step: u64,
    data: crate::data::DataPosition,
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
