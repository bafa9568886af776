//! `MoETrainingJob`: one distributed training run of a Mixture-of-Experts
//! transformer, run by a gang of worker pods (one per node, one worker process
//! per GPU) and restarted as a gang from the newest checkpoint on failure.
//!
//! Everything that can never run is rejected at admission by CEL rules in the
//! schema (see the `x_kube(validation)` attributes), each naming its field.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Placement, WorkerSpec};
use crate::inference::SecretKey;

/// Longest `metadata.name`: the Job of attempt N is `<name>-a<N>` and its pods'
/// hostnames are `<name>-a<N>-<index>`, which must fit a 63-character DNS label
/// with room for 4-digit attempts and indices.
pub const MAX_NAME_LEN: usize = 40;

/// Specification of a MoETrainingJob.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "moe.dev",
    version = "v1alpha1",
    kind = "MoETrainingJob",
    plural = "moetrainingjobs",
    shortname = "mtj",
    category = "moe",
    namespaced,
    cel,
    status = "MoETrainingJobStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".spec.parallelism.nodes"),
    printcolumn(name = "Workers", type_ = "integer", json_path = ".status.workers.expected", priority = 1),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress.display"),
    printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restarts"),
    printcolumn(name = "Loss", type_ = "number", json_path = ".status.progress.loss", priority = 1),
    printcolumn(name = "Eval Loss", type_ = "number", json_path = ".status.progress.evalLoss", priority = 1),
    printcolumn(name = "Export", type_ = "string", json_path = ".status.output.phase", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 40")
        .message("metadata.name must be at most 40 characters: pod hostnames <name>-a<attempt>-<index> must fit a 63-character DNS label"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter): it names the headless Service"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    // Parallel sizes against the world size (nodes × processesPerNode).
    validation = Rule::new("(self.parallelism.nodes * self.parallelism.processesPerNode) % self.parallelism.sequenceParallel == 0")
        .message("parallelism.sequenceParallel must divide the world size (nodes × processesPerNode)")
        .field_path(".parallelism.sequenceParallel"),
    validation = Rule::new("(self.parallelism.nodes * self.parallelism.processesPerNode) % self.parallelism.expertParallel == 0")
        .message("parallelism.expertParallel must divide the world size (nodes × processesPerNode)")
        .field_path(".parallelism.expertParallel"),
    validation = Rule::new("!has(self.parallelism.fabricCheck) || self.parallelism.nodes * self.parallelism.processesPerNode > 1")
        .message("parallelism.fabricCheck needs more than one rank (nodes × processesPerNode): one process has no fabric to measure")
        .field_path(".parallelism.fabricCheck"),
    // Ulysses sequence parallelism shards tokens, then attention heads.
    validation = Rule::new("self.model.attentionHeads % self.parallelism.sequenceParallel == 0")
        .message("model.attentionHeads must be divisible by parallelism.sequenceParallel (attention is sharded by head)")
        .field_path(".model.attentionHeads"),
    validation = Rule::new("self.model.kvHeads % self.parallelism.sequenceParallel == 0")
        .message("model.kvHeads must be divisible by parallelism.sequenceParallel (attention is sharded by head)")
        .field_path(".model.kvHeads"),
    validation = Rule::new("self.model.seqLen % self.parallelism.sequenceParallel == 0")
        .message("model.seqLen must be divisible by parallelism.sequenceParallel (each rank holds seqLen/sequenceParallel tokens)")
        .field_path(".model.seqLen"),
    // Kueue places slices of pods: a group must be whole nodes, more than one.
    validation = Rule::new("!has(self.placement.topology) || !has(self.placement.topology.expertGroups) || (has(self.placement.queueName) && self.parallelism.expertParallel > self.parallelism.processesPerNode && self.parallelism.expertParallel % self.parallelism.processesPerNode == 0)")
        .message("placement.topology.expertGroups needs placement.queueName (Kueue places the groups) and expert-parallel groups of whole nodes: parallelism.expertParallel a multiple of processesPerNode, above it")
        .field_path(".placement.topology.expertGroups"),
    validation = Rule::new("!has(self.training.evaluation) || !has(self.training.evaluation.path) || !has(self.data.builtin)")
        .message("training.evaluation.path is a file or directory beside the training data, in data.volume's claim or data.huggingface's repo: the built-in corpus has none")
        .field_path(".training.evaluation.path"),
    validation = Rule::new("!has(self.training.evaluation) || !has(self.training.evaluation.keepBest) || !self.training.evaluation.keepBest || self.checkpoint.intervalSteps % self.training.evaluation.intervalSteps == 0")
        .message("training.evaluation.keepBest needs every checkpoint evaluated: checkpoint.intervalSteps must be a multiple of training.evaluation.intervalSteps")
        .field_path(".training.evaluation.keepBest"),
    validation = Rule::new("!has(self.training.lora) || !has(self.training.lora.routedExperts) || !self.training.lora.routedExperts || self.parallelism.expertParallel == 1")
        .message("training.lora.routedExperts needs parallelism.expertParallel 1: the routed experts' adapters are not sharded")
        .field_path(".training.lora.routedExperts"),
    validation = Rule::new("self.model.moe.experts % self.parallelism.expertParallel == 0")
        .message("model.moe.experts must be divisible by parallelism.expertParallel (each rank owns experts/expertParallel experts)")
        .field_path(".model.moe.experts"),
    validation = Rule::new("self.training.globalBatchSize % (self.training.microBatchSize * ((self.parallelism.nodes * self.parallelism.processesPerNode) / self.parallelism.sequenceParallel)) == 0")
        .message("training.globalBatchSize must be a multiple of microBatchSize × data-parallel size (nodes × processesPerNode / sequenceParallel)")
        .field_path(".training.globalBatchSize"),
    // A text corpus needs its tokenizer; a fine-tuning job has the model's.
    validation = Rule::new("self.data.tokenizer != 'huggingface' || has(self.data.tokenizerFile) || has(self.model.initFrom)")
        .message("data.tokenizer huggingface needs data.tokenizerFile, the tokenizer.json in data.volume or data.huggingface (or model.initFrom, whose tokenizer.json it then reads)")
        .field_path(".data.tokenizer"),
    // An elastic gang's smallest size must be a layout the worker can train.
    validation = Rule::new("!has(self.parallelism.elastic) || self.parallelism.elastic.minNodes < self.parallelism.nodes")
        .message("parallelism.elastic.minNodes must be below parallelism.nodes")
        .field_path(".parallelism.elastic.minNodes"),
    validation = Rule::new("!has(self.parallelism.elastic) || (self.parallelism.elastic.minNodes * self.parallelism.processesPerNode) % self.parallelism.sequenceParallel == 0")
        .message("parallelism.sequenceParallel must divide the smallest world size (elastic.minNodes × processesPerNode)")
        .field_path(".parallelism.elastic.minNodes"),
    validation = Rule::new("!has(self.parallelism.elastic) || (self.parallelism.elastic.minNodes * self.parallelism.processesPerNode) % self.parallelism.expertParallel == 0")
        .message("parallelism.expertParallel must divide the smallest world size (elastic.minNodes × processesPerNode)")
        .field_path(".parallelism.elastic.minNodes"),
    // (Left to the rule above when sequenceParallel does not divide it: the quotient would be 0.)
    validation = Rule::new("!has(self.parallelism.elastic) || (self.parallelism.elastic.minNodes * self.parallelism.processesPerNode) % self.parallelism.sequenceParallel != 0 || self.training.globalBatchSize % (self.training.microBatchSize * ((self.parallelism.elastic.minNodes * self.parallelism.processesPerNode) / self.parallelism.sequenceParallel)) == 0")
        .message("training.globalBatchSize must be a multiple of microBatchSize × the smallest data-parallel size (elastic.minNodes × processesPerNode / sequenceParallel)")
        .field_path(".parallelism.elastic.minNodes"),
    validation = Rule::new("!has(self.parallelism.elastic) || !has(self.parallelism.fabricCheck) || self.parallelism.elastic.minNodes * self.parallelism.processesPerNode > 1")
        .message("parallelism.fabricCheck needs more than one rank: elastic.minNodes × processesPerNode is 1")
        .field_path(".parallelism.elastic.minNodes"),
    // The Hugging Face export (output.huggingface) must have an architecture
    // that computes this model (the worker's `hf_export::architecture_for`).
    validation = Rule::new("!has(self.output) || !has(self.output.huggingface) || !has(self.output.huggingface.adapterOnly) || !self.output.huggingface.adapterOnly || has(self.training.lora)")
        .message("output.huggingface.adapterOnly exports a LoRA run's adapters: it needs training.lora")
        .field_path(".output.huggingface.adapterOnly"),
    validation = Rule::new("!has(self.output) || !has(self.output.huggingface) || has(self.checkpoint.claimName)")
        .message("output.huggingface needs checkpoint.claimName: the export reads the final checkpoint from that claim")
        .field_path(".output.huggingface"),
    validation = Rule::new("!has(self.output) || !has(self.output.huggingface) || self.model.moe.router == 'softmax'")
        .message("output.huggingface needs model.moe.router softmax: Mixtral, Qwen3-MoE and OLMoE route by softmax")
        .field_path(".model.moe.router"),
    validation = Rule::new("!has(self.output) || !has(self.output.huggingface) || self.model.moe.sharedExperts == 0")
        .message("output.huggingface needs model.moe.sharedExperts 0: Mixtral, Qwen3-MoE and OLMoE have no shared experts")
        .field_path(".model.moe.sharedExperts"),
    validation = Rule::new("!has(self.output) || !has(self.output.huggingface) || self.model.moe.groups == 1")
        .message("output.huggingface needs model.moe.groups 1: Mixtral, Qwen3-MoE and OLMoE route without expert groups")
        .field_path(".model.moe.groups"),
    validation = Rule::new("!has(self.output) || !has(self.output.huggingface) || self.model.moe.routedScalingFactor == 1.0")
        .message("output.huggingface needs model.moe.routedScalingFactor 1: Mixtral, Qwen3-MoE and OLMoE do not scale the routed experts")
        .field_path(".model.moe.routedScalingFactor"),
    validation = Rule::new("!has(self.output) || !has(self.output.huggingface) || !self.model.moe.balancing.auxLossFree.enabled")
        .message("output.huggingface needs model.moe.balancing.auxLossFree.enabled false: the architectures have no selection bias, so a model trained with one would route differently")
        .field_path(".model.moe.balancing.auxLossFree.enabled"),
    validation = Rule::new("!has(self.output) || !has(self.output.huggingface) || self.model.denseLayers == 0 || (has(self.model.qkNorm) && self.model.qkNorm == 'perHead')")
        .message("output.huggingface needs model.denseLayers 0 unless model.qkNorm is perHead: only Qwen3-MoE has dense layers")
        .field_path(".model.denseLayers"),
    validation = Rule::new("!has(self.output) || !has(self.output.huggingface) || has(self.model.qkNorm) || self.model.moe.normalizeTopK")
        .message("output.huggingface needs model.moe.normalizeTopK true without model.qkNorm: Mixtral renormalises the chosen experts' gates")
        .field_path(".model.moe.normalizeTopK"),
    validation = Rule::new("!has(self.output) || !has(self.output.huggingface) || !has(self.model.qkNorm) || self.model.qkNorm != 'whole' || !has(self.model.headDim) || self.model.headDim * self.model.attentionHeads == self.model.hiddenSize")
        .message("output.huggingface with model.qkNorm whole needs model.headDim × attentionHeads = hiddenSize: OLMoE's heads are hiddenSize / attentionHeads wide")
        .field_path(".model.headDim"),
    // FP8 tensor cores exist on Hopper only; the CPU worker emulates FP8 exactly.
    validation = Rule::new("!self.training.precision.fp8.enabled || self.worker.device == 'cpu' || (has(self.placement.gpuType) && self.placement.gpuType in ['H100', 'H200'])")
        .message("training.precision.fp8 needs Hopper GPUs: set placement.gpuType to H100 or H200 (or worker.device to cpu, which emulates FP8)")
        .field_path(".training.precision.fp8.enabled"),
    // What a running gang was started with cannot change under it; suspend first.
    validation = Rule::new("oldSelf.runPolicy.suspend || self.model == oldSelf.model")
        .message("model is immutable while the job is not suspended")
        .field_path(".model"),
    validation = Rule::new("oldSelf.runPolicy.suspend || self.parallelism == oldSelf.parallelism")
        .message("parallelism is immutable while the job is not suspended")
        .field_path(".parallelism"),
    validation = Rule::new("oldSelf.runPolicy.suspend || self.training == oldSelf.training")
        .message("training is immutable while the job is not suspended")
        .field_path(".training"),
    validation = Rule::new("oldSelf.runPolicy.suspend || self.data == oldSelf.data")
        .message("data is immutable while the job is not suspended")
        .field_path(".data"),
    validation = Rule::new("self.checkpoint == oldSelf.checkpoint")
        .message("checkpoint is immutable: resuming needs the same storage")
        .field_path(".checkpoint"),
    // `has()` on both sides: the rule also runs on status writes, where an absent queueName must pass.
    validation = Rule::new("oldSelf.runPolicy.suspend || (has(self.placement.queueName) == has(oldSelf.placement.queueName) && (!has(self.placement.queueName) || self.placement.queueName == oldSelf.placement.queueName))")
        .message("placement.queueName is immutable while the job is not suspended")
        .field_path(".placement.queueName"),
)]
pub struct MoETrainingJobSpec {
    /// The transformer and its Mixture-of-Experts layers.
    pub model: ModelSpec,
    /// Training data.
    #[serde(default)]
    pub data: DataSpec,
    /// Optimisation: steps, batch, optimizer, precision.
    pub training: TrainingSpec,
    /// How the world (nodes × processesPerNode ranks) is split.
    #[serde(default)]
    pub parallelism: ParallelismSpec,
    /// Where and how often checkpoints are written; attempts resume from the newest.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// Where worker pods are scheduled.
    #[serde(default)]
    pub placement: Placement,
    /// Suspension, retries, deadlines and clean-up.
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// The worker container and its pod.
    #[serde(default)]
    pub worker: WorkerSpec,
    /// What the job leaves besides its checkpoints, written once it succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputSpec>,
}

/// What a training job leaves besides its checkpoints.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// The trained model as a Hugging Face model directory (`config.json`,
    /// safetensors, the run's tokenizer), written by a pod running `moe-worker
    /// export` from the final checkpoint once the job succeeds: what
    /// `transformers`, vLLM or SGLang load, and what an MoEInferenceService
    /// serves from a volume. The model must be one Mixtral, Qwen3-MoE or
    /// OLMoE computes (softmax routing to unshared, ungrouped experts, no
    /// trained selection bias); admission names the field that is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huggingface: Option<HuggingFaceOutput>,
}

/// Where and how the Hugging Face export is written.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!self.path.matches('(^|/)[.][.]?(/|$)') && !self.path.contains('//')")
        .message("output.huggingface.path is a directory inside the claim: no '.' or '..' parts, no empty ones")
        .field_path(".path"),
)]
pub struct HuggingFaceOutput {
    /// The PersistentVolumeClaim the model directory is written to.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Directory inside the claim; the model goes to `<path>/<namespace>/<name>`.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub path: String,
    /// The weights' number type: `bf16` (what releases ship) or `fp32`
    /// (the master weights exactly).
    #[serde(default)]
    pub precision: ExportPrecision,
    /// With `training.lora`: write the adapters alone (PEFT's layout, with
    /// the tokenizer), not the merged model — megabytes instead of the
    /// model's size. Default: the merged model, its adapters in `adapter/`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adapter_only: bool,
    /// The export pod's resources. Default: 1 CPU, and memory for one 2 GB
    /// shard, twelve bytes per value of the largest tensor and 1 GiB (the
    /// export reads the checkpoint one tensor at a time, never the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

/// The number type of exported weights.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportPrecision {
    #[default]
    Bf16,
    Fp32,
}

/// Transformer shape. Attention is causal with RoPE and grouped-query heads.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.headDim) || self.hiddenSize % self.attentionHeads == 0")
        .message("model.hiddenSize must be divisible by model.attentionHeads (or set model.headDim)")
        .field_path(".hiddenSize"),
    validation = Rule::new("has(self.headDim) || (self.hiddenSize / self.attentionHeads) % 2 == 0")
        .message("model.hiddenSize / model.attentionHeads (the head dimension) must be even for rotary embeddings")
        .field_path(".hiddenSize"),
    validation = Rule::new("!has(self.headDim) || self.headDim % 2 == 0")
        .message("model.headDim must be even for rotary embeddings")
        .field_path(".headDim"),
    // (A rule, not a minimum: the apiserver compared 0 against `minimum: 1e-12` as if it were 0.)
    validation = Rule::new("!has(self.normEpsilon) || self.normEpsilon > 0.0")
        .message("model.normEpsilon must be positive: it keeps an all-zero row's norm finite")
        .field_path(".normEpsilon"),
    validation = Rule::new("self.attentionHeads % self.kvHeads == 0")
        .message("model.attentionHeads must be a multiple of model.kvHeads (grouped-query attention)")
        .field_path(".kvHeads"),
    validation = Rule::new("self.denseLayers < self.layers")
        .message("model.denseLayers must be less than model.layers (at least one MoE layer)")
        .field_path(".denseLayers"),
)]
pub struct ModelSpec {
    /// Vocabulary size. 256 with the byte-level tokenizer.
    #[serde(default = "default_vocab")]
    #[schemars(range(min = 2, max = 1048576))]
    pub vocab_size: i32,
    /// Width of the residual stream.
    #[schemars(range(min = 2, max = 65536))]
    pub hidden_size: i32,
    /// Transformer blocks.
    #[schemars(range(min = 1, max = 1024))]
    pub layers: i32,
    /// Leading blocks with a dense feed-forward layer instead of MoE (DeepSeek-V3 uses 3).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1024))]
    pub dense_layers: i32,
    /// Hidden size of the dense feed-forward layers. Default: 4 × hiddenSize.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub dense_hidden_size: Option<i32>,
    /// Query heads.
    #[schemars(range(min = 1, max = 1024))]
    pub attention_heads: i32,
    /// Key/value heads (grouped-query attention).
    #[schemars(range(min = 1, max = 1024))]
    pub kv_heads: i32,
    /// Width of each attention head. Default: hiddenSize / attentionHeads;
    /// Qwen3 widens it (hiddenSize 2048 with 32 heads of 128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 1024))]
    pub head_dim: Option<i32>,
    /// RMS-norms each query and key after its projection, before RoPE:
    /// `perHead` (Qwen3: one gain of headDim shared by the heads) or `whole`
    /// (OLMoE: a token's whole projection). Unset: no q/k norms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_norm: Option<QkNormSpec>,
    /// Epsilon of every RMSNorm. Default: 1e-5 (Qwen3 uses 1e-6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 0.1))]
    pub norm_epsilon: Option<f64>,
    /// Training sequence length in tokens.
    #[schemars(range(min = 2, max = 1048576))]
    pub seq_len: i32,
    /// Base of the rotary position embedding.
    #[serde(default = "default_rope_theta")]
    #[schemars(range(min = 1.0))]
    pub rope_theta: f64,
    /// The Mixture-of-Experts feed-forward layers.
    pub moe: MoeSpec,
    /// Start from a pretrained model's weights instead of random ones
    /// (fine-tuning). Its `config.json` must describe this `model`, field by
    /// field (the worker refuses it otherwise, naming the field). Unset:
    /// random weights from `training.seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<ModelInit>,
}

impl ModelSpec {
    /// The `transformers` class `output.huggingface` writes this model as:
    /// Qwen3-MoE for per-head q/k norms, OLMoE for whole ones, Mixtral for
    /// none (the worker's `hf_export` decides the same).
    pub fn export_architecture(&self) -> &'static str {
        match self.qk_norm {
            Some(QkNormSpec::PerHead) => "Qwen3MoeForCausalLM",
            Some(QkNormSpec::Whole) => "OlmoeForCausalLM",
            None => "MixtralForCausalLM",
        }
    }

    /// Every field where `other` differs from this model, by its path
    /// (`model.moe.experts`), with this model's value and `other`'s (JSON),
    /// in the order of the paths. `initFrom` counts only when `with_init`:
    /// a job starting from another's checkpoint names it, that one not.
    pub fn differences(
        &self,
        other: &ModelSpec,
        with_init: bool,
    ) -> Vec<(String, serde_json::Value, serde_json::Value)> {
        let as_value = |spec: &ModelSpec| {
            let mut spec = spec.clone();
            if !with_init {
                spec.init_from = None;
            }
            serde_json::to_value(spec).unwrap_or(serde_json::Value::Null)
        };
        let mut out = Vec::new();
        json_differences("model", &as_value(self), &as_value(other), &mut out);
        out
    }
}

fn json_differences(
    path: &str,
    this: &serde_json::Value,
    other: &serde_json::Value,
    out: &mut Vec<(String, serde_json::Value, serde_json::Value)>,
) {
    use serde_json::Value;
    match (this, other) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let (x, y) = (
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                );
                json_differences(&format!("{path}.{key}"), x, y, out);
            }
        }
        (a, b) if a != b => out.push((path.to_string(), a.clone(), b.clone())),
        _ => {}
    }
}

/// Pretrained weights a training job starts from: a Hugging Face model
/// directory (`config.json`, `tokenizer.json`, safetensors), from the Hub
/// or a volume, for the first attempt to start from; later attempts resume
/// from the job's checkpoints. The training model holds Mixtral
/// (`MixtralForCausalLM`), Qwen3-MoE (`Qwen3MoeForCausalLM`: set headDim,
/// qkNorm perHead, normEpsilon) and OLMoE without clip_qkv: RMSNorm,
/// grouped-query attention without biases, plain RoPE, SwiGLU experts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.huggingface), has(self.volume), has(self.fromTrainingJob)].filter(x, x).size() == 1")
        .message("model.initFrom needs exactly one source: huggingface, volume or fromTrainingJob"),
)]
pub struct ModelInit {
    /// A model on the Hugging Face Hub, downloaded by each worker pod's
    /// init container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huggingface: Option<crate::HuggingFaceModel>,
    /// A model directory on a PersistentVolumeClaim (mounted read-only): an
    /// air-gapped cluster's copy, what `huggingface-cli download` or
    /// `save_pretrained` left, or a checkpoint of another MoETrainingJob of
    /// the same model (its `step-N` directory: only its weights are
    /// taken). `path` is the directory inside the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeData>,
    /// A checkpoint of another MoETrainingJob in this namespace, e.g. a
    /// pretraining run before fine-tuning: the job waits until that one has
    /// Succeeded, then starts from its model (its best checkpoint with
    /// `training.evaluation.keepBest`, else its final one; or the step
    /// `checkpoint` names), read from its checkpoint claim. Its model must
    /// be this one's, its tokenizer this job's `data.tokenizer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_training_job: Option<crate::TrainingJobModel>,
}

fn default_vocab() -> i32 {
    256
}
fn default_rope_theta() -> f64 {
    10000.0
}

/// Mixture-of-Experts layer: a router picks `topK` of `experts` routed
/// experts per token (optionally within `topGroups` of `groups` groups);
/// `sharedExperts` see every token.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.topK <= self.experts")
        .message("model.moe.topK must be at most model.moe.experts")
        .field_path(".topK"),
    validation = Rule::new("self.experts % self.groups == 0")
        .message("model.moe.groups must divide model.moe.experts")
        .field_path(".groups"),
    validation = Rule::new("self.topGroups <= self.groups")
        .message("model.moe.topGroups must be at most model.moe.groups")
        .field_path(".topGroups"),
    validation = Rule::new("self.topK <= self.topGroups * (self.experts / self.groups)")
        .message("model.moe.topK must be at most topGroups × experts/groups (the experts left after group-limited routing)")
        .field_path(".topK"),
)]
pub struct MoeSpec {
    /// Routed experts per MoE layer.
    #[schemars(range(min = 1, max = 4096))]
    pub experts: i32,
    /// Routed experts each token is sent to.
    #[schemars(range(min = 1, max = 64))]
    pub top_k: i32,
    /// Experts every token goes through, beside the routed ones.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub shared_experts: i32,
    /// Hidden size of each (routed and shared) expert's SwiGLU MLP.
    #[schemars(range(min = 1, max = 65536))]
    pub expert_hidden_size: i32,
    /// Score function of the router.
    #[serde(default)]
    pub router: RouterScore,
    /// Expert groups for group-limited routing (1: no grouping).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub groups: i32,
    /// Groups a token may route into.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub top_groups: i32,
    /// Multiplier of the routed experts' gate weights.
    #[serde(default = "default_scaling")]
    #[schemars(range(min = 0.0))]
    pub routed_scaling_factor: f64,
    /// Rescale the chosen experts' softmax scores to sum to 1 before they
    /// gate the experts (Mixtral; `norm_topk_prob` in Hugging Face configs).
    /// A sigmoid router always does (DeepSeek-V3).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub normalize_top_k: bool,
    /// Load balancing.
    #[serde(default)]
    pub balancing: BalancingSpec,
}

fn one() -> i32 {
    1
}
fn default_scaling() -> f64 {
    1.0
}

/// How queries and keys are RMS-normed (`model.qkNorm`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum QkNormSpec {
    /// Each head on its own, one `[headDim]` gain per projection (Qwen3).
    PerHead,
    /// A token's whole projection, gains `[attentionHeads × headDim]` and
    /// `[kvHeads × headDim]` (OLMoE).
    Whole,
}

/// Router score function.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RouterScore {
    /// Softmax over experts (Mixtral, DeepSeek-V2).
    Softmax,
    /// Independent sigmoid per expert, gates renormalised over the chosen ones (DeepSeek-V3).
    #[default]
    Sigmoid,
}

/// Expert load balancing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalancingSpec {
    /// Aux-loss-free balancing: a per-expert bias added to the scores for
    /// selection only, moved by `biasUpdateRate` toward balance after each step.
    #[serde(default)]
    pub aux_loss_free: AuxLossFree,
    /// Coefficient of the sequence-level auxiliary balance loss (0: off).
    /// Works with sequence parallelism: each sequence's routing statistics
    /// are summed over its ranks.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sequence_aux_loss_coef: f64,
}

impl Default for BalancingSpec {
    fn default() -> Self {
        Self {
            aux_loss_free: AuxLossFree::default(),
            sequence_aux_loss_coef: 0.0,
        }
    }
}

/// Aux-loss-free balancing settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuxLossFree {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Step of the selection-bias update (DeepSeek-V3 uses 0.001).
    #[serde(default = "default_bias_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub bias_update_rate: f64,
}

impl Default for AuxLossFree {
    fn default() -> Self {
        Self {
            enabled: true,
            bias_update_rate: default_bias_rate(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_bias_rate() -> f64 {
    0.001
}

/// Where training tokens come from. Exactly one source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.builtin), has(self.volume), has(self.huggingface)].filter(x, x).size() == 1")
        .message("data needs exactly one source: builtin, volume or huggingface"),
    validation = Rule::new("self.tokenizer != 'pretokenized' || !has(self.builtin)")
        .message("data.tokenizer pretokenized reads token files, which come from data.volume or data.huggingface")
        .field_path(".tokenizer"),
    validation = Rule::new("!has(self.tokenBytes) || self.tokenizer == 'pretokenized'")
        .message("data.tokenBytes is the width of pre-tokenized ids: it needs tokenizer: pretokenized")
        .field_path(".tokenBytes"),
    validation = Rule::new("!has(self.tokenBytes) || self.tokenBytes == 2 || self.tokenBytes == 4")
        .message("data.tokenBytes must be 2 (uint16 ids) or 4 (uint32 ids)")
        .field_path(".tokenBytes"),
    validation = Rule::new("!has(self.tokenizerFile) || (!has(self.builtin) && self.tokenizer != 'byte')")
        .message("data.tokenizerFile is a tokenizer.json in data.volume or data.huggingface, for tokenizer huggingface (text) or pretokenized (the ids it produced)")
        .field_path(".tokenizerFile"),
    validation = Rule::new("self.format != 'chat' || self.tokenizer == 'huggingface'")
        .message("data.format chat renders conversations through a Hugging Face tokenizer's chat template: it needs tokenizer huggingface")
        .field_path(".format"),
    validation = Rule::new("!has(self.packing) || !self.packing || self.format == 'chat'")
        .message("data.packing packs conversations several to a sequence: it needs format chat (text sequences are whole windows, never padded)")
        .field_path(".packing"),
)]
pub struct DataSpec {
    /// A corpus shipped inside the worker image (demos, tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinData>,
    /// Token files on a PersistentVolumeClaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeData>,
    /// Files of a dataset on the Hugging Face Hub, downloaded by each
    /// worker pod's init container before training starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huggingface: Option<HuggingFaceDataset>,
    /// How the data becomes tokens: `byte` reads text, one token per byte;
    /// `pretokenized` reads token ids (see [`Tokenizer`]).
    #[serde(default)]
    pub tokenizer: Tokenizer,
    /// Bytes per token id in pre-tokenized files without a header: 2
    /// (uint16, the default; vocabularies up to 65536) or 4 (uint32).
    /// llm.c's files carry the width in their header, which must agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_bytes: Option<i32>,
    /// A Hugging Face `tokenizer.json`, by its path inside `data.volume`'s
    /// claim (or `data.huggingface`'s repo, which downloads it too): what
    /// `tokenizer: huggingface` tokenizes the text with, or what produced
    /// `pretokenized` ids. Each checkpoint keeps a copy, so the
    /// model can be served with it. Never read as training data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub tokenizer_file: Option<String>,
    /// What the files hold: `text` (each file a document, every token
    /// trained) or `chat` (supervised fine-tuning: JSON Lines of
    /// `{"messages": [{"role", "content"}, …]}`, each conversation rendered
    /// through the tokenizer's chat template, the model trained only on
    /// the assistant's turns).
    #[serde(default)]
    pub format: DataFormat,
    /// With `format: chat`: pack several whole conversations into each
    /// training sequence (as many as fit, in the epoch's order), each
    /// attending only to itself with positions from its own start, rather
    /// than one conversation per sequence padded to `model.seqLen`. Less
    /// padding, so more of each step trains; the loss and its gradient per
    /// conversation are those of the conversation alone. A conversation
    /// longer than a sequence still fills one alone, cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub packing: bool,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            builtin: Some(BuiltinData::default()),
            volume: None,
            huggingface: None,
            tokenizer: Tokenizer::default(),
            token_bytes: None,
            tokenizer_file: None,
            format: DataFormat::default(),
            packing: false,
        }
    }
}

/// What training files hold (`data.format`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Documents; the model is trained on every token.
    #[default]
    Text,
    /// Conversations (JSON Lines of `{"messages": [...]}`); the model is
    /// trained on the assistant's turns only.
    Chat,
}

/// A corpus bundled with the worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuiltinData {
    /// Name of the bundled corpus.
    #[serde(default = "default_corpus")]
    #[schemars(length(min = 1, max = 63))]
    pub corpus: String,
}

impl Default for BuiltinData {
    fn default() -> Self {
        Self {
            corpus: default_corpus(),
        }
    }
}

fn default_corpus() -> String {
    "tiny".into()
}

/// Training data on a PersistentVolumeClaim, mounted read-only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeData {
    /// The claim holding the data.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Path of the data file or directory inside the claim.
    #[serde(default)]
    pub path: String,
}

/// Training data from a dataset repository on the Hugging Face Hub (or a
/// mirror): the files under `path`, at one commit, checked against the
/// Hub's hashes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!self.path.matches('(^|/)[.][.]?(/|$)') && !self.path.contains('//')")
        .message("data.huggingface.path is a file or directory of the repo: no '.' or '..' parts, no empty ones")
        .field_path(".path"),
)]
pub struct HuggingFaceDataset {
    /// `organization/name` of the dataset, e.g. `HuggingFaceFW/fineweb-edu`.
    #[schemars(
        length(min = 3, max = 200),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub repo: String,
    /// A branch, tag or commit. A commit pins the data; a branch is
    /// resolved when each worker pod starts.
    #[serde(default = "main_revision")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    pub revision: String,
    /// The file or directory of the repo to train on (a directory's files
    /// at any depth, read in path order), e.g. `sample/10BT` or
    /// `train.bin`. Only these files (and `data.tokenizerFile`) are
    /// downloaded.
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^[^/\\](.*[^/])?$"))]
    pub path: String,
    /// A key of a Secret holding a Hub token, for gated and private datasets
    /// (given to the download only, as `HF_TOKEN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<SecretKey>,
    /// A claim to keep the files on, shared by the job's pods (ReadWriteMany
    /// across nodes) and its restarts: each commit is downloaded once. Unset:
    /// every pod downloads into an emptyDir of its own, again on each restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub cache_claim_name: Option<String>,
    /// The Hub's address (a mirror, or a Hub inside the cluster). Default:
    /// `https://huggingface.co`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub endpoint: Option<String>,
}

fn main_revision() -> String {
    "main".into()
}

/// Tokenizer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tokenizer {
    /// One token per byte (vocabulary 256).
    #[default]
    Byte,
    /// The files are token ids already, tokenized before training:
    /// little-endian arrays as nanoGPT writes them (`tokenBytes` wide), or
    /// llm.c's shards (a 1 KiB header: magic 20240520, version 1 for
    /// uint16 or 2 for uint32 ids, the token count). Every id must be below
    /// `model.vocabSize`. Without `tokenizerFile` the job carries no
    /// tokenizer, so it cannot be served.
    Pretokenized,
    /// Text through a Hugging Face tokenizer (`tokenizerFile`), each file a
    /// document with the special tokens the tokenizer adds (as a served
    /// prompt gets them); every id must be below `model.vocabSize`.
    Huggingface,
}

/// Optimisation settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.optimizer.warmupSteps <= self.steps")
        .message("training.optimizer.warmupSteps must be at most training.steps")
        .field_path(".optimizer.warmupSteps"),
    validation = Rule::new("self.globalBatchSize >= self.microBatchSize")
        .message("training.globalBatchSize must be at least training.microBatchSize")
        .field_path(".globalBatchSize"),
)]
pub struct TrainingSpec {
    /// Optimizer steps to run.
    #[schemars(range(min = 1))]
    pub steps: i64,
    /// Sequences per optimizer step, over all data-parallel ranks.
    #[schemars(range(min = 1))]
    pub global_batch_size: i32,
    /// Sequences per forward/backward on one rank; the rest is gradient accumulation.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub micro_batch_size: i32,
    /// AdamW and its schedule.
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    /// Numeric precision.
    #[serde(default)]
    pub precision: PrecisionSpec,
    /// Recompute each layer's forward pass in backward instead of keeping activations.
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// Seed of parameter initialisation and data order.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub seed: i64,
    /// Steps between progress reports and metric lines.
    #[serde(default = "default_log_interval")]
    #[schemars(range(min = 1))]
    pub log_interval_steps: i32,
    /// The loss on data held out of training (a share of `data` never
    /// trained on), every `intervalSteps` steps and after the last: in
    /// `metrics.jsonl` (`evalLoss`), the worker's `/progress` and
    /// `/metrics`, and its summary. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvaluationSpec>,
    /// Low-rank adaptation (LoRA, Hu et al. 2021): train small adapters
    /// instead of the model. Every other weight is frozen (the MoE
    /// selection biases too); each targeted linear layer's weight becomes
    /// `W + (alpha / rank) · B·A`, `A` of `rank` rows, `B` starting at
    /// zero, so step 0 is the model as loaded (usually `model.initFrom`).
    /// Checkpoints hold the merged weights, which is what is served and
    /// exported, beside the adapters. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
}

/// Low-rank adapters (`training.lora`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.routedExperts) || !self.routedExperts || self.targets.exists(t, t in ['gate_proj', 'up_proj', 'down_proj'])")
        .message("training.lora.routedExperts adapts the routed experts' MLP projections: targets must name gate_proj, up_proj or down_proj")
        .field_path(".routedExperts"),
)]
pub struct LoraSpec {
    /// The adapters' rank `r`.
    #[serde(default = "default_lora_rank")]
    #[schemars(range(min = 1, max = 1024))]
    pub rank: i32,
    /// The update's scale numerator: `B·A` is multiplied by `alpha / rank`.
    #[serde(default = "default_lora_alpha")]
    #[schemars(range(min = 0.0, max = 65536.0))]
    pub alpha: f64,
    /// The linear layers adapted, by their Hugging Face names: the
    /// attention projections `q_proj`, `k_proj`, `v_proj`, `o_proj`, and
    /// the MLP projections `gate_proj`, `up_proj`, `down_proj` of the dense
    /// layers and the shared experts (of the routed experts too with
    /// `routedExperts`). The router is never adapted.
    #[serde(default = "default_lora_targets")]
    #[schemars(length(min = 1, max = 7), extend("x-kubernetes-list-type" = "set"))]
    pub targets: Vec<LoraTarget>,
    /// Adapt each routed expert's targeted MLP projections too (one adapter
    /// per expert and projection).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub routed_experts: bool,
    /// Rank-stabilised scaling (rsLoRA, Kalajdzievski 2023; PEFT's
    /// `use_rslora`): the update is multiplied by `alpha / √rank` instead of
    /// `alpha / rank`, so higher ranks keep learning as fast.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rank_stabilized: bool,
}

/// A linear layer `training.lora` adapts, by its Hugging Face module name.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum LoraTarget {
    #[serde(rename = "q_proj")]
    QProj,
    #[serde(rename = "k_proj")]
    KProj,
    #[serde(rename = "v_proj")]
    VProj,
    #[serde(rename = "o_proj")]
    OProj,
    #[serde(rename = "gate_proj")]
    GateProj,
    #[serde(rename = "up_proj")]
    UpProj,
    #[serde(rename = "down_proj")]
    DownProj,
}

impl LoraTarget {
    /// The Hugging Face module name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }
}

fn default_lora_rank() -> i32 {
    8
}

fn default_lora_alpha() -> f64 {
    16.0
}

fn default_lora_targets() -> Vec<LoraTarget> {
    vec![
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
    ]
}

fn default_log_interval() -> i32 {
    10
}

/// Evaluation on held-out data (`training.evaluation`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.path) || (!self.path.matches('(^|/)[.][.]?(/|$)') && !self.path.contains('//'))")
        .message("training.evaluation.path is a file or directory beside the training data: no '.' or '..' parts, no empty ones")
        .field_path(".path"),
)]
pub struct EvaluationSpec {
    /// Steps between evaluations (the last step is always evaluated).
    #[schemars(range(min = 1))]
    pub interval_steps: i32,
    /// Percent of the data held out of training: the last conversations
    /// of the files (`format: chat`), or the last tokens (text).
    #[serde(default = "default_held_out_percent")]
    #[schemars(range(min = 1, max = 50))]
    pub held_out_percent: i32,
    /// Global batches (`globalBatchSize` sequences each) of held-out data
    /// each evaluation reads: the same sequences every time, so the
    /// losses compare across steps.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub batches: i32,
    /// Evaluate on these files instead of holding a share out (then
    /// `heldOutPercent` is not used, and training reads all of `data`): a
    /// file or directory in `data.volume`'s claim, or in
    /// `data.huggingface`'s repo (downloaded with the training files),
    /// read as the training data is (format, tokenizer), e.g. a dataset's
    /// `validation` split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^[^/\\](.*[^/])?$"))]
    pub path: Option<String>,
    /// Stop early, checkpointed and successful, once this many evaluations
    /// in a row have not lowered the best held-out loss so far (training
    /// has started to memorise). Unset: train every step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub patience: Option<i32>,
    /// Keep the checkpoint with the lowest held-out loss, beyond
    /// `checkpoint.keep`, and make it the job's model: what a service of
    /// the job serves and what `output.huggingface` exports (its step in
    /// `status.progress.bestCheckpointStep`). Every checkpoint is then
    /// evaluated: `checkpoint.intervalSteps` must be a multiple of
    /// `intervalSteps`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_best: bool,
}

fn default_held_out_percent() -> i32 {
    5
}

/// AdamW with linear warm-up and cosine decay to `minLearningRate`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minLearningRate <= self.learningRate")
    .message("training.optimizer.minLearningRate must be at most learningRate")
    .field_path(".minLearningRate"))]
pub struct OptimizerSpec {
    #[serde(default = "default_lr")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub learning_rate: f64,
    #[serde(default = "default_min_lr")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub min_learning_rate: f64,
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub warmup_steps: i64,
    #[serde(default = "default_wd")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub epsilon: f64,
    /// Global gradient-norm clip (0: off).
    #[serde(default = "default_clip")]
    #[schemars(range(min = 0.0))]
    pub grad_clip: f64,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self {
            learning_rate: default_lr(),
            min_learning_rate: default_min_lr(),
            warmup_steps: 0,
            weight_decay: default_wd(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            epsilon: default_eps(),
            grad_clip: default_clip(),
        }
    }
}

fn default_lr() -> f64 {
    3e-4
}
fn default_min_lr() -> f64 {
    3e-5
}
fn default_wd() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}

/// Numeric precision. Master weights and optimizer state are always FP32.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrecisionSpec {
    /// Precision of activations and of the GEMMs not run in FP8.
    #[serde(default)]
    pub compute: ComputePrecision,
    /// FP8 (E4M3) GEMMs for experts and projections.
    #[serde(default)]
    pub fp8: Fp8Spec,
}

/// Compute precision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComputePrecision {
    #[default]
    Fp32,
    Bf16,
}

/// FP8 training.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fp8Spec {
    #[serde(default)]
    pub enabled: bool,
    /// Scaling recipe.
    #[serde(default)]
    pub recipe: Fp8Recipe,
}

/// FP8 scaling recipe.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Fp8Recipe {
    /// Fine-grained scales: 1×128 activation tiles, 128×128 weight blocks (DeepSeek-V3).
    #[default]
    Blockwise,
    /// One delayed scale per tensor (for comparison).
    Tensorwise,
}

/// How the world of `nodes × processesPerNode` ranks is split. Data
/// parallelism takes what sequence parallelism leaves; expert parallel groups
/// are carved out of the same ranks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParallelismSpec {
    /// Worker pods (one per node).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 4096))]
    pub nodes: i32,
    /// Worker processes per pod: one per GPU for CUDA workers.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub processes_per_node: i32,
    /// Ranks a sequence is split across (Ulysses style).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub sequence_parallel: i32,
    /// Ranks the experts of each layer are split across.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 4096))]
    pub expert_parallel: i32,
    /// Measure the gang's all-to-all bandwidth before training, and refuse to
    /// train below a floor: a gang placed on a degraded fabric (a link down,
    /// RDMA silently fallen back to TCP) fails fast instead of training at a
    /// fraction of its speed. Unset: no check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric_check: Option<FabricCheck>,
    /// Train on fewer nodes when the whole gang cannot be placed, rather
    /// than wait. Unset: an attempt waits for all `nodes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elastic: Option<ElasticSpec>,
}

impl Default for ParallelismSpec {
    fn default() -> Self {
        Self {
            nodes: 1,
            processes_per_node: 1,
            sequence_parallel: 1,
            expert_parallel: 1,
            fabric_check: None,
            elastic: None,
        }
    }
}

/// An elastic gang size. An attempt that the scheduler (or Kueue) has not
/// placed whole for `shrinkAfterSeconds` is replaced by one on fewer nodes,
/// down to `minNodes`: the most that fit, as far as the cluster said
/// (pods placed), among the sizes whose layout is valid. The global batch
/// stays `training.globalBatchSize` (each rank runs more micro-batches), so
/// the job trains the same model on any size; it resumes from the newest
/// checkpoint. Every attempt after a failure, disruption or resume asks for
/// `nodes` again, and with `grow` a smaller one grows back when there is
/// room.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ElasticSpec {
    /// The fewest worker pods the job trains on. Below `nodes`, and a valid
    /// layout itself (the same rules as `nodes`).
    #[schemars(range(min = 1, max = 4096))]
    pub min_nodes: i32,
    /// How long an attempt's gang may wait unplaced before the next, smaller
    /// attempt replaces it.
    #[serde(default = "default_shrink_after")]
    #[schemars(range(min = 0, max = 86400))]
    pub shrink_after_seconds: i32,
    /// While a smaller attempt trains, ask the scheduler for the missing
    /// nodes with spare pods (a Job `<name>-a<attempt>-spare`: the workers'
    /// resources and placement, running nothing); once they all run, stop
    /// the gang (it checkpoints at the next step) and restart it on all
    /// `nodes`. Under Kueue (`placement.queueName`) the spares wait in the
    /// queue for quota. Not with a `placement.topology.required` under
    /// Kueue or the Workload API (they would place the spares in a domain
    /// of their own): there an attempt grows back when it restarts.
    #[serde(default = "yes")]
    pub grow: bool,
}

fn default_shrink_after() -> i32 {
    300
}

/// The all-to-all preflight: every rank sends `messageMiB` per exchange,
/// split evenly over all ranks (the pattern of expert dispatch), one warm-up
/// and five timed exchanges; the figure is the bus bandwidth of the slowest
/// rank, as NCCL's tests count it (`bytes / time × (ranks − 1) / ranks`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FabricCheck {
    /// Bytes each rank sends per exchange, in MiB.
    #[serde(default = "default_fabric_message", rename = "messageMiB")]
    #[schemars(range(min = 1, max = 4096))]
    pub message_mib: i32,
    /// Bus bandwidth floor in MB/s (10⁶ bytes). Below it every rank exits
    /// with code 4 (`FABRIC_BELOW_FLOOR_EXIT_CODE`) before training; the
    /// attempt is restarted, counted, unless a failure rule says otherwise.
    /// Unset: measure and report only.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "minAllToAllMBps"
    )]
    #[schemars(range(min = 1))]
    pub min_all_to_all_mbps: Option<i64>,
}

fn default_fabric_message() -> i32 {
    64
}

impl ParallelismSpec {
    /// Total worker processes.
    pub fn world_size(&self) -> i32 {
        self.nodes * self.processes_per_node
    }
}

/// Checkpoints: a directory per step, written under a temporary name and
/// renamed when complete.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// PersistentVolumeClaim (ReadWriteMany for more than one node) holding checkpoints.
    /// Unset: a pod-local emptyDir, so a gang restart starts from scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: Option<String>,
    /// Directory inside the claim; each job writes under `<path>/<namespace>/<name>`.
    #[serde(default)]
    pub path: String,
    /// Steps between checkpoints.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1))]
    pub interval_steps: i64,
    /// Newest complete checkpoints kept.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep: i32,
    /// Whether an attempt resumes from the newest complete checkpoint.
    #[serde(default)]
    pub resume: ResumePolicy,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            claim_name: None,
            path: String::new(),
            interval_steps: default_interval(),
            keep: default_keep(),
            resume: ResumePolicy::default(),
        }
    }
}

fn default_interval() -> i64 {
    100
}
fn default_keep() -> i32 {
    3
}

/// Resume policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ResumePolicy {
    /// Resume from the newest complete checkpoint if there is one.
    #[default]
    Auto,
    /// Always start from step 0 (existing checkpoints are left alone).
    Never,
}

/// Suspension, retries, deadlines and clean-up.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Suspended: no worker pods exist; resuming starts a new attempt from the newest checkpoint.
    #[serde(default)]
    pub suspend: bool,
    /// Gang restarts allowed after failures before the job is Failed. Restarts
    /// caused by disruptions (preemption, node loss) do not count.
    #[serde(default = "default_backoff")]
    #[schemars(range(min = 0, max = 1000))]
    pub backoff_limit: i32,
    /// Wall-clock limit of the whole job while not suspended, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Hang watchdog: once every worker pod runs, a gang whose rank 0 reports
    /// no new step (or checkpoint) for this many seconds is judged hung (a
    /// collective that never completes, a deadlocked data loader) and
    /// restarted from its newest checkpoint, counted against backoffLimit
    /// (reason `ProgressDeadlineExceeded`). It must cover start-up to the
    /// first step (loading a checkpoint, compiling kernels) and the longest
    /// step or checkpoint write. Unset: no watchdog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30))]
    pub progress_deadline_seconds: Option<i32>,
    /// Seconds after Succeeded or Failed before the job (and its children) is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Rules on worker exit codes, checked in order; the first match decides.
    /// Unmatched failures restart the gang and count against backoffLimit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub failure_rules: Vec<FailureRule>,
}

impl Default for RunPolicy {
    fn default() -> Self {
        Self {
            suspend: false,
            backoff_limit: default_backoff(),
            active_deadline_seconds: None,
            progress_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            failure_rules: Vec::new(),
        }
    }
}

fn default_backoff() -> i32 {
    3
}

/// What to do when a worker fails with matching exit codes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureRule {
    pub action: FailureAction,
    /// Exit codes of the worker container that this rule matches.
    pub on_exit_codes: ExitCodes,
}

/// Action of a failure rule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FailureAction {
    /// Fail the job now, with no further attempts (e.g. a configuration error).
    FailJob,
    /// Restart the gang without using the backoffLimit budget.
    Ignore,
    /// Restart the gang and count it against backoffLimit (the default).
    Count,
}

/// A set of exit codes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExitCodes {
    pub operator: ExitCodeOperator,
    #[schemars(length(min = 1, max = 255))]
    pub values: Vec<i32>,
}

/// How `values` are matched.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ExitCodeOperator {
    In,
    NotIn,
}

impl ExitCodes {
    pub fn matches(&self, code: i32) -> bool {
        let listed = self.values.contains(&code);
        match self.operator {
            ExitCodeOperator::In => listed,
            ExitCodeOperator::NotIn => !listed,
        }
    }
}

/// Observed state of a MoETrainingJob.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoETrainingJobStatus {
    /// `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Lifecycle phase (a summary of the conditions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TrainingPhase>,
    /// Current attempt, from 0; each gang restart starts a new one.
    #[serde(default)]
    pub attempt: i32,
    /// Gang restarts counted against `runPolicy.backoffLimit`.
    #[serde(default)]
    pub restarts: i32,
    /// Gang restarts caused by disruptions (preemption, node loss), not counted.
    #[serde(default)]
    pub disruptions: i32,
    /// Worker pods of the current attempt.
    #[serde(default)]
    pub workers: WorkerCounts,
    /// kstatus conditions (`Ready`, `Reconciling`, `Stalled`) and lifecycle
    /// conditions (`Created`, `Running`, `Restarting`, `Suspended`, `Succeeded`, `Failed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// For a Hub dataset (`data.huggingface`): the commits the current
    /// attempt's pods downloaded its revision as, once every pod has said
    /// (their downloads' reports); one, unless the branch moved while they
    /// started. Cleared when a new attempt starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_commits: Vec<String>,
    /// The Hugging Face export (`output.huggingface`), once the job succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputStatus>,
    /// `model.initFrom.fromTrainingJob`, once resolved: the checkpoint
    /// every attempt starts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_checkpoint: Option<InitCheckpoint>,
    /// Training progress as reported by rank 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TrainingProgress>,
}

/// The checkpoint of another MoETrainingJob a job starts from
/// (`model.initFrom.fromTrainingJob`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitCheckpoint {
    /// `namespace/name` of that job.
    pub job: String,
    /// Its uid: a job of the same name made later is another job.
    pub uid: String,
    pub step: i64,
    /// The claim holding it (mounted read-only).
    pub claim_name: String,
    /// The step's directory inside the claim.
    pub path: String,
}

/// Where the export of a succeeded job stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputStatus {
    pub phase: OutputPhase,
    /// The model directory inside `output.huggingface.claimName`.
    pub path: String,
    /// The `transformers` class it is written as (`Qwen3MoeForCausalLM`).
    pub architecture: String,
    /// Why the export failed, from its pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The export's phase.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OutputPhase {
    /// Its pod is being created or runs.
    #[default]
    Exporting,
    /// The directory is complete.
    Exported,
    /// The export pod failed (its message says why); the checkpoints remain.
    Failed,
}

/// Lifecycle phase.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TrainingPhase {
    /// Accepted; worker pods are being created or scheduled.
    Pending,
    /// Every worker pod is running.
    Running,
    /// The gang is being torn down to start the next attempt.
    Restarting,
    /// Suspended by the user or by Kueue; no worker pods.
    Suspended,
    /// Training finished.
    Succeeded,
    /// Out of retries, past the deadline, or a FailJob rule matched.
    Failed,
}

impl TrainingPhase {
    pub fn is_finished(self) -> bool {
        matches!(self, TrainingPhase::Succeeded | TrainingPhase::Failed)
    }
}

/// Worker pod counts of the current attempt.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCounts {
    /// The attempt's gang: `parallelism.nodes`, or fewer after an elastic
    /// job shrank it.
    pub expected: i32,
    pub active: i32,
    pub ready: i32,
    pub succeeded: i32,
    pub failed: i32,
}

/// Training progress.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingProgress {
    pub step: i64,
    pub total_steps: i64,
    /// `step/totalSteps (percent%)`, with `, ETA <time>` once rank 0 has
    /// timed its steps, or `, stopped early`: the printer column.
    pub display: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// The steps left times rank 0's last measured time per step
    /// (checkpoint writes included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_remaining_seconds: Option<i64>,
    /// Model FLOPs utilisation of the gang's GPUs (0 to 1): training FLOPs
    /// per token (6 per active parameter, plus attention) times tokens per
    /// second, over the GPUs' dense bf16 peak. GPU runs on a known GPU only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint_step: Option<i64>,
    /// How evenly the last step routed tokens to experts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_load: Option<ExpertLoad>,
    /// What the attempt's fabric check (`parallelism.fabricCheck`) measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric: Option<FabricMeasurement>,
    /// The loss on held-out data at the last evaluation
    /// (`training.evaluation`), in nats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// The job ended before `totalSteps`: its held-out loss stopped
    /// improving (`training.evaluation.patience`). Its final checkpoint is
    /// at `lastCheckpointStep`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped_early: bool,
    /// With `training.evaluation.keepBest`: the step of the checkpoint with
    /// the lowest held-out loss so far (the job's model once it succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_checkpoint_step: Option<i64>,
    /// When the report last changed (the hang watchdog's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<Time>,
}

/// The all-to-all bandwidth the gang measured before training
/// (`parallelism.fabricCheck`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FabricMeasurement {
    /// Bus bandwidth of the slowest rank, in MB/s (10⁶ bytes), as NCCL's
    /// tests count it for an all-to-all.
    #[serde(rename = "allToAllMBps")]
    pub all_to_all_mbps: i64,
    pub ranks: i32,
    /// Bytes each rank sent per exchange.
    pub message_bytes: i64,
}

/// Expert-load balance of one training step, over every replica's tokens:
/// the worst MoE layer's maximal violation, `MaxVio = max load / mean load
/// − 1` (0 is perfectly even; 1 means the busiest expert got twice its
/// share). The figure the auxiliary-loss-free balancing paper and
/// DeepSeek-V3 report; the busiest expert sets an expert-parallel step's pace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExpertLoad {
    pub max_violation: f64,
    /// The decoder layer (0-based) with that violation.
    pub layer: i32,
}
