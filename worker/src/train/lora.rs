//! Low-rank adaptation (`training.lora`; Hu et al., 2021): the model is
//! frozen and each targeted linear layer's weight becomes
//!
//! ```text
//! W = W₀ + s · B·A        A: [r, in], B: [out, r], s = alpha / r
//! ```
//!
//! with `A` drawn uniform in ±1/√in (PEFT's default) and `B` zero, so step 0
//! computes exactly the model as loaded.
//!
//! The adapters reparameterise the weights rather than adding a branch to
//! every layer: after each update the merged `W` is written into the model,
//! whose forward and backward passes (every precision, attention kernel,
//! parallel layout) are then those of full training, and the gradient of a
//! weight `G = ∂L/∂W` gives the adapters' by the chain rule,
//!
//! ```text
//! ∂L/∂B = s · G·Aᵀ        ∂L/∂A = s · Bᵀ·G
//! ```
//!
//! (two GEMMs of rank `r` per matrix). Only the adapters have AdamW moments;
//! every other weight, the norms' gains and the MoE selection biases stay as
//! loaded, and the frozen weights' gradients are neither computed nor held
//! ([`Gradients::zeros_keeping`]). What it does not save is an adapted
//! weight's full gradient `G`, which the backward pass computes for the
//! projection. The merged weights are what checkpoints, serving and export
//! read, with no adapter to apply.

use moe_crds::{LoraSpec, LoraTarget};

use crate::model::{Gradients, Model, ModelConfig, NamedTensor};
use crate::ops::matmul;
use crate::rng::SplitMix64 as Rng;
use crate::scalar::Scalar;
use crate::train::optimizer::AdamWStep;

/// `training.lora`, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSettings {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<LoraTarget>,
    /// The routed experts' MLP projections too.
    pub routed_experts: bool,
    /// `alpha / √rank` rather than `alpha / rank` (rsLoRA).
    pub rank_stabilized: bool,
}

impl LoraSettings {
    /// `training.lora` checked; the error names the field.
    pub fn from_spec(spec: &LoraSpec) -> Result<Self, crate::settings::SettingsError> {
        use crate::settings::SettingsError;
        let rank = usize::try_from(spec.rank)
            .ok()
            .filter(|&r| r >= 1)
            .ok_or_else(|| {
                SettingsError::new(
                    "training.lora.rank",
                    format!("is {}, but must be at least 1", spec.rank),
                )
            })?;
        if !(spec.alpha.is_finite() && spec.alpha >= 0.0) {
            return Err(SettingsError::new(
                "training.lora.alpha",
                format!("is {}, but must be a finite number, at least 0", spec.alpha),
            ));
        }
        if spec.targets.is_empty() {
            return Err(SettingsError::new(
                "training.lora.targets",
                "is empty: name at least one projection".to_owned(),
            ));
        }
        let mlp = [
            LoraTarget::GateProj,
            LoraTarget::UpProj,
            LoraTarget::DownProj,
        ];
        if spec.routed_experts && !spec.targets.iter().any(|t| mlp.contains(t)) {
            return Err(SettingsError::new(
                "training.lora.routedExperts",
                "adapts the routed experts' MLP projections, but training.lora.targets names none of gate_proj, up_proj, down_proj".to_owned(),
            ));
        }
        let mut targets = Vec::new();
        for &t in &spec.targets {
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        Ok(Self {
            rank,
            alpha: spec.alpha,
            targets,
            routed_experts: spec.routed_experts,
            rank_stabilized: spec.rank_stabilized,
        })
    }

    /// As `training.lora` would say it (what a checkpoint records).
    pub fn spec(&self) -> LoraSpec {
        LoraSpec {
            rank: self.rank as i32,
            alpha: self.alpha,
            targets: self.targets.clone(),
            routed_experts: self.routed_experts,
            rank_stabilized: self.rank_stabilized,
        }
    }

    /// The update's scale: `alpha / rank`, or `alpha / √rank` rank-stabilised.
    pub fn scale(&self) -> f64 {
        let rank = self.rank as f64;
        match self.rank_stabilized {
            true => self.alpha / rank.sqrt(),
            false => self.alpha / rank,
        }
    }

    /// The adapted projection the model tensor `name` (as
    /// [`crate::model::Weights::tensors`] names it) is, if it is adapted.
    pub fn target_of(&self, name: &str) -> Option<LoraTarget> {
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let (target, routed) = match leaf {
            "wq" => (LoraTarget::QProj, false),
            "wk" => (LoraTarget::KProj, false),
            "wv" => (LoraTarget::VProj, false),
            "wo" => (LoraTarget::OProj, false),
            // Dense MLPs (`dense.w1`) and the shared experts.
            "w1" | "shared_w1" => (LoraTarget::GateProj, false),
            "w3" | "shared_w3" => (LoraTarget::UpProj, false),
            "w2" | "shared_w2" => (LoraTarget::DownProj, false),
            "experts_w1" => (LoraTarget::GateProj, true),
            "experts_w3" => (LoraTarget::UpProj, true),
            "experts_w2" => (LoraTarget::DownProj, true),
            _ => return None,
        };
        (self.targets.contains(&target) && (!routed || self.routed_experts)).then_some(target)
    }
}

/// A trained tensor and its two AdamW moments.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub values: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Param {
    fn new(values: Vec<f32>) -> Self {
        let n = values.len();
        Self {
            values,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

/// The adapters of one model tensor: one `(A, B)` pair per matrix (a
/// routed-expert tensor holds one matrix per expert).
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    /// The model tensor's name (`blocks.0.wq`).
    pub name: String,
    /// Its place in the model's canonical tensor order.
    pub tensor: usize,
    pub matrices: usize,
    /// Each matrix's output and input widths.
    pub rows: usize,
    pub cols: usize,
    /// The frozen weights `W₀`, as loaded.
    pub base: Vec<f32>,
    /// `[matrices, rank, cols]`.
    pub a: Param,
    /// `[matrices, rows, rank]`.
    pub b: Param,
}

/// The gradients of one [`Adapter`]'s `A` and `B`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterGrads<T> {
    pub a: Vec<T>,
    pub b: Vec<T>,
}

/// Every adapter of a model, in its tensor order.
#[derive(Clone, Debug, PartialEq)]
pub struct Lora {
    settings: LoraSettings,
    adapters: Vec<Adapter>,
}

impl Lora {
    /// Fresh adapters on `model`'s current weights (which become `W₀`):
    /// `A` from `seed`, `B` zero. The model is unchanged.
    pub fn new(settings: LoraSettings, model: &Model<f32>, seed: u64) -> Self {
        // A stream of its own: the model's initialisation and the data
        // order draw from `seed` as they would without adapters.
        let mut rng = Rng::new(seed ^ 0x4c6f_5241_6164_6170);
        let r = settings.rank;
        let adapters = model
            .tensors()
            .iter()
            .enumerate()
            .filter(|(_, t)| settings.target_of(&t.name).is_some())
            .map(|(tensor, t)| {
                let (matrices, rows, cols) = matrix_shape(t);
                let bound = 1.0 / (cols as f64).sqrt();
                let a = (0..matrices * r * cols)
                    .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                    .collect();
                Adapter {
                    name: t.name.clone(),
                    tensor,
                    matrices,
                    rows,
                    cols,
                    base: t.values.to_vec(),
                    a: Param::new(a),
                    b: Param::new(vec![0.0; matrices * rows * r]),
                }
            })
            .collect();
        Self { settings, adapters }
    }

    /// Adapters restored from a checkpoint (laid out by [`Self::new`] for
    /// the settings it recorded, their values read from it).
    pub fn from_parts(settings: LoraSettings, adapters: Vec<Adapter>) -> Self {
        Self { settings, adapters }
    }

    pub fn settings(&self) -> &LoraSettings {
        &self.settings
    }

    pub fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }

    /// The adapters' values and moments, for a device trainer bringing
    /// its host copy up to date (their shapes are not to change).
    pub fn adapters_mut(&mut self) -> impl Iterator<Item = (&mut Param, &mut Param)> {
        self.adapters.iter_mut().map(|a| (&mut a.a, &mut a.b))
    }

    /// Bytes held: the frozen weights, `A`, `B` and their moments.
    pub fn bytes(&self) -> usize {
        let values: usize = self
            .adapters
            .iter()
            .map(|a| a.base.len() + 3 * (a.a.values.len() + a.b.values.len()))
            .sum();
        values * std::mem::size_of::<f32>()
    }

    /// Values trained: every `A` and `B`.
    pub fn trainable_parameters(&self) -> usize {
        self.adapters
            .iter()
            .map(|a| a.a.values.len() + a.b.values.len())
            .sum()
    }

    /// The adapters' gradients from the model's weight gradients `grads`.
    pub fn gradients<T: Scalar>(
        &self,
        grads: &Gradients<T>,
        config: &ModelConfig,
    ) -> Vec<AdapterGrads<T>> {
        let tensors = grads.tensors(config);
        self.adapters
            .iter()
            .map(|adapter| {
                let a = convert::<T>(&adapter.a.values);
                let b = convert::<T>(&adapter.b.values);
                project(
                    adapter,
                    &a,
                    &b,
                    tensors[adapter.tensor].values,
                    self.scale(),
                )
            })
            .collect()
    }

    /// One AdamW update of every `A` and `B` from `grads` (as
    /// [`Self::gradients`] made them; `step` carries the gradient scale).
    pub fn update(&mut self, step: AdamWStep, grads: &[AdapterGrads<f32>]) {
        for (adapter, grad) in self.adapters.iter_mut().zip(grads) {
            let (a, b) = (&mut adapter.a, &mut adapter.b);
            step.apply(&mut a.values, &mut a.m, &mut a.v, &grad.a);
            step.apply(&mut b.values, &mut b.m, &mut b.v, &grad.b);
        }
    }

    /// Writes `W₀ + s · B·A` into each adapted tensor of `model`.
    pub fn merge_into(&self, model: &mut Model<f32>) {
        let mut tensors = model.weights.tensors_mut();
        for adapter in &self.adapters {
            merge(
                adapter,
                &adapter.base,
                &adapter.a.values,
                &adapter.b.values,
                self.scale(),
                tensors[adapter.tensor],
            );
        }
    }

    fn scale(&self) -> f64 {
        self.settings.scale()
    }
}

/// `(matrices, rows, cols)` of a weight tensor `[.., rows, cols]`.
fn matrix_shape<T>(t: &NamedTensor<'_, T>) -> (usize, usize, usize) {
    let n = t.shape.len();
    let (rows, cols) = (t.shape[n - 2], t.shape[n - 1]);
    (t.shape[..n - 2].iter().product(), rows, cols)
}

fn convert<T: Scalar>(values: &[f32]) -> Vec<T> {
    values.iter().map(|&v| T::from_f64(f64::from(v))).collect()
}

/// `∂L/∂A = s · Bᵀ·G` and `∂L/∂B = s · G·Aᵀ` for each matrix of `adapter`,
/// `g` the weight's gradient.
pub fn project<T: Scalar>(
    adapter: &Adapter,
    a: &[T],
    b: &[T],
    g: &[T],
    scale: f64,
) -> AdapterGrads<T> {
    let (rows, cols) = (adapter.rows, adapter.cols);
    let r = a.len() / (adapter.matrices * cols);
    let mut grads = AdapterGrads {
        a: vec![T::from_f64(0.0); a.len()],
        b: vec![T::from_f64(0.0); b.len()],
    };
    for k in 0..adapter.matrices {
        let g = &g[k * rows * cols..(k + 1) * rows * cols];
        let a = &a[k * r * cols..(k + 1) * r * cols];
        let b = &b[k * rows * r..(k + 1) * rows * r];
        // G [rows, cols] @ Aᵀ: A is the `[out = r, in = cols]` weight.
        matmul::forward(
            &mut grads.b[k * rows * r..(k + 1) * rows * r],
            g,
            a,
            cols,
            r,
        );
        // Bᵀ [r, rows] @ G: the weight gradient of an output `B` over `rows` rows.
        matmul::backward_weight(
            &mut grads.a[k * r * cols..(k + 1) * r * cols],
            b,
            g,
            cols,
            r,
        );
    }
    let s = T::from_f64(scale);
    for v in grads.a.iter_mut().chain(grads.b.iter_mut()) {
        *v *= s;
    }
    grads
}

/// `out = base + s · B·A`, matrix by matrix.
pub fn merge<T: Scalar>(
    adapter: &Adapter,
    base: &[T],
    a: &[T],
    b: &[T],
    scale: f64,
    out: &mut [T],
) {
    let (rows, cols) = (adapter.rows, adapter.cols);
    let r = a.len() / (adapter.matrices * cols);
    let s = T::from_f64(scale);
    out.fill(T::from_f64(0.0));
    for k in 0..adapter.matrices {
        let (a, b) = (
            &a[k * r * cols..(k + 1) * r * cols],
            &b[k * rows * r..(k + 1) * rows * r],
        );
        // B [rows, r] @ A [r, cols]: A as the `[out = r, in = cols]` weight
        // of an input-gradient GEMM.
        matmul::backward_input(
            &mut out[k * rows * cols..(k + 1) * rows * cols],
            b,
            a,
            cols,
            r,
        );
    }
    for (w, &w0) in out.iter_mut().zip(base) {
        *w = w0 + s * *w;
    }
}

/// The L2 norm of every adapter gradient together.
pub fn global_norm(grads: &[AdapterGrads<f32>]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.a.iter().chain(&g.b))
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}
