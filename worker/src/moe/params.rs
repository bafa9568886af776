//! The trainable weights of one MoE layer, each tensor a flat row-major `Vec`.

use crate::linear::Linears;
use crate::moe::config::MoeConfig;
use crate::moe::expert::{SwiGluGrads, SwiGluMlp};
use crate::rng::SplitMix64;
use crate::scalar::Scalar;

/// Weights (or, with the same layout, their gradients) of one MoE layer.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeParams<T> {
    /// `[n_routed_experts, hidden]`.
    pub router: Vec<T>,
    /// Routed experts stacked: `[n_routed_experts, expert_hidden, hidden]`.
    pub experts_w1: Vec<T>,
    /// `[n_routed_experts, expert_hidden, hidden]`.
    pub experts_w3: Vec<T>,
    /// `[n_routed_experts, hidden, expert_hidden]`.
    pub experts_w2: Vec<T>,
    /// All shared experts fused: `[shared_hidden, hidden]` (empty without shared experts).
    pub shared_w1: Vec<T>,
    /// `[shared_hidden, hidden]`.
    pub shared_w3: Vec<T>,
    /// `[hidden, shared_hidden]`.
    pub shared_w2: Vec<T>,
}

impl<T: Scalar> MoeParams<T> {
    /// All zeros: the starting point for gradient accumulation.
    pub fn zeros(config: &MoeConfig) -> Self {
        let [router, expert, shared] = tensor_sizes(config);
        Self {
            router: vec![T::ZERO; router],
            experts_w1: vec![T::ZERO; expert],
            experts_w3: vec![T::ZERO; expert],
            experts_w2: vec![T::ZERO; expert],
            shared_w1: vec![T::ZERO; shared],
            shared_w3: vec![T::ZERO; shared],
            shared_w2: vec![T::ZERO; shared],
        }
    }

    /// Every weight drawn from N(0, std^2) (DeepSeek-V3 uses std 0.006).
    pub fn random(config: &MoeConfig, rng: &mut SplitMix64, std: f64) -> Self {
        let [router, expert, shared] = tensor_sizes(config);
        Self {
            router: rng.normal_vec(router, std),
            experts_w1: rng.normal_vec(expert, std),
            experts_w3: rng.normal_vec(expert, std),
            experts_w2: rng.normal_vec(expert, std),
            shared_w1: rng.normal_vec(shared, std),
            shared_w3: rng.normal_vec(shared, std),
            shared_w2: rng.normal_vec(shared, std),
        }
    }

    /// Whether every tensor has the size `config` implies.
    pub fn matches(&self, config: &MoeConfig) -> bool {
        let [router, expert, shared] = tensor_sizes(config);
        self.router.len() == router
            && [&self.experts_w1, &self.experts_w3, &self.experts_w2]
                .iter()
                .all(|t| t.len() == expert)
            && [&self.shared_w1, &self.shared_w3, &self.shared_w2]
                .iter()
                .all(|t| t.len() == shared)
    }

    /// Routed expert `e`'s MLP.
    pub fn expert<'a>(&'a self, config: &MoeConfig, e: usize) -> SwiGluMlp<'a, T> {
        let range = expert_range(config, e);
        SwiGluMlp {
            w1: &self.experts_w1[range.clone()],
            w3: &self.experts_w3[range.clone()],
            w2: &self.experts_w2[range],
            model: config.hidden,
            hidden: config.expert_hidden,
            linears: Linears::FP32,
        }
    }

    /// Gradient slices for routed expert `e`.
    pub fn expert_grads<'a>(&'a mut self, config: &MoeConfig, e: usize) -> SwiGluGrads<'a, T> {
        let range = expert_range(config, e);
        SwiGluGrads {
            w1: &mut self.experts_w1[range.clone()],
            w3: &mut self.experts_w3[range.clone()],
            w2: &mut self.experts_w2[range],
        }
    }

    /// The fused shared experts' MLP, if the layer has any.
    pub fn shared<'a>(&'a self, config: &MoeConfig) -> Option<SwiGluMlp<'a, T>> {
        (config.shared_hidden() > 0).then_some(SwiGluMlp {
            w1: &self.shared_w1,
            w3: &self.shared_w3,
            w2: &self.shared_w2,
            model: config.hidden,
            hidden: config.shared_hidden(),
            linears: Linears::FP32,
        })
    }

    /// Gradient slices for the fused shared experts.
    pub fn shared_grads(&mut self) -> SwiGluGrads<'_, T> {
        SwiGluGrads {
            w1: &mut self.shared_w1,
            w3: &mut self.shared_w3,
            w2: &mut self.shared_w2,
        }
    }
}

/// Element counts of the router, of each stacked expert tensor, and of each shared tensor.
fn tensor_sizes(config: &MoeConfig) -> [usize; 3] {
    let expert = config.expert_hidden * config.hidden;
    [
        config.n_routed_experts * config.hidden,
        config.n_routed_experts * expert,
        config.shared_hidden() * config.hidden,
    ]
}

fn expert_range(config: &MoeConfig, e: usize) -> std::ops::Range<usize> {
    let size = config.expert_hidden * config.hidden;
    e * size..(e + 1) * size
}
