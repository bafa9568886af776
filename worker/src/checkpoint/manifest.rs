//! `manifest.json`: what a checkpoint holds and what it was written for.
//! It is written last, so a directory with a valid manifest is complete.

use serde::{Deserialize, Serialize};

use moe_crds::{ModelSpec, Tokenizer};

use crate::data::DataPosition;

fn is_byte(tokenizer: &Tokenizer) -> bool {
    *tokenizer == Tokenizer::Byte
}

/// Bumped whenever the layout of the directory or of its tensors changes.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// The model shape the weights belong to; a resume must match it.
    pub model: ModelSpec,
    /// `training.seed` of the run (a different seed on resume only changes
    /// nothing already drawn, so it is reported, not refused).
    pub seed: u64,
    /// Where the data stream stands, including its generator state.
    pub data: DataPosition,
    /// How the training data became tokens; absent for the byte tokenizer
    /// (manifests from before the field). A server refuses a checkpoint
    /// trained on pre-tokenized ids: it has no tokenizer for them.
    #[serde(default, skip_serializing_if = "is_byte")]
    pub tokenizer: Tokenizer,
    /// Loss of the run's first step, so a resumed run's summary still compares against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_loss: Option<f64>,
    /// Loss of the checkpoint's own step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// The loss on held-out data at the checkpoint's own step, when that
    /// step was evaluated (`training.evaluation`): what
    /// `training.evaluation.keepBest` ranks checkpoints by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Where `training.evaluation.patience` stood: the best held-out loss
    /// so far and the evaluations since it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patience: Option<crate::settings::Patience>,
    pub state_file: String,
    pub state_bytes: u64,
    /// FNV-1a (64-bit, hex) of the state file: catches truncation and bit rot.
    pub state_fnv1a: String,
    /// With expert parallelism: the files holding the routed-expert tensors,
    /// which the state file then leaves out. Together they cover every
    /// expert exactly once, in order. Empty (and absent) otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expert_shards: Vec<ExpertShard>,
    /// With `training.lora`: the adapters' file (the state file's weights
    /// are then the merged ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraFile>,
}

/// The adapters of a `training.lora` run and what they were made for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoraFile {
    /// `training.lora` as the run had it: a resume must ask for the same.
    pub settings: moe_crds::LoraSpec,
    pub file: String,
    pub bytes: u64,
    pub fnv1a: String,
}

/// One rank's routed experts `first..end` of every MoE layer (weights and
/// AdamW moments), written by that rank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExpertShard {
    pub file: String,
    pub first: usize,
    pub end: usize,
    pub bytes: u64,
    pub fnv1a: String,
}

/// FNV-1a, 64-bit: not cryptographic, but any accidental change of a few bytes shows.
pub fn fnv1a(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Every field where the two model specs differ, as
/// `model.hiddenSize is 64 in the checkpoint but 128 in the config`
/// (`initFrom` too when `with_init`).
pub fn model_differences(
    checkpoint: &ModelSpec,
    config: &ModelSpec,
    with_init: bool,
) -> Vec<String> {
    checkpoint
        .differences(config, with_init)
        .into_iter()
        .map(|(path, a, b)| format!("{path} is {a} in the checkpoint but {b} in the config"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_known_vectors() {
        assert_eq!(fnv1a(b""), "cbf29ce484222325");
        assert_eq!(fnv1a(b"a"), "af63dc4c8601ec8c");
    }
}
