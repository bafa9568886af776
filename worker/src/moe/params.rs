//! The trainable weights of one MoE layer, each tensor a flat row-major `Vec`.
//!
//! A layer may hold only some of its routed experts: a rank of an
//! expert-parallel group keeps just the experts it owns (weights, gradients
//! and optimizer moments alike), which is what lets a model larger than one
//! device train on many. Experts are always named by their global index;
//! [`MoeParams::experts`] says which ones the stacked tensors hold.

use std::ops::Range;

use crate::linear::Linears;
use crate::memory::HeldBytes;
use crate::moe::config::MoeConfig;
use crate::moe::expert::{SwiGluGrads, SwiGluMlp};
use crate::rng::SplitMix64;
use crate::scalar::Scalar;

/// Weights (or, with the same layout, their gradients) of one MoE layer.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeParams<T> {
    /// The routed experts (global indices) the stacked expert tensors hold:
    /// `0..n_routed_experts`, or an expert-parallel rank's own slice.
    pub experts: Range<usize>,
    /// `[n_routed_experts, hidden]`.
    pub router: Vec<T>,
    /// Routed experts stacked: `[experts.len(), expert_hidden, hidden]`.
    pub experts_w1: Vec<T>,
    /// `[experts.len(), expert_hidden, hidden]`.
    pub experts_w3: Vec<T>,
    /// `[experts.len(), hidden, expert_hidden]`.
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
        Self::zeros_with_experts(config, 0..config.n_routed_experts)
    }

    /// [`Self::zeros`] holding only routed experts `experts`.
    pub fn zeros_with_experts(config: &MoeConfig, experts: Range<usize>) -> Self {
        assert!(
            experts.start <= experts.end && experts.end <= config.n_routed_experts,
            "experts {experts:?} of {}",
            config.n_routed_experts
        );
        let [router, _, shared] = tensor_sizes(config);
        let expert = experts.len() * expert_size(config);
        Self {
            experts,
            router: vec![T::ZERO; router],
            experts_w1: vec![T::ZERO; expert],
            experts_w3: vec![T::ZERO; expert],
            experts_w2: vec![T::ZERO; expert],
            shared_w1: vec![T::ZERO; shared],
            shared_w3: vec![T::ZERO; shared],
            shared_w2: vec![T::ZERO; shared],
        }
    }

    /// Keeps only routed experts `experts` (global indices, among those
    /// held): what an expert-parallel rank holds of a whole layer.
    pub fn keep_experts(&mut self, config: &MoeConfig, experts: Range<usize>) {
        assert!(
            self.holds(&experts),
            "experts {experts:?} are not among the held {:?}",
            self.experts
        );
        let size = expert_size(config);
        let first = self.experts.start;
        let range = (experts.start - first) * size..(experts.end - first) * size;
        for tensor in [
            &mut self.experts_w1,
            &mut self.experts_w3,
            &mut self.experts_w2,
        ] {
            *tensor = tensor[range.clone()].to_vec();
        }
        self.experts = experts;
    }

    /// Every weight drawn from N(0, std^2) (DeepSeek-V3 uses std 0.006).
    pub fn random(config: &MoeConfig, rng: &mut SplitMix64, std: f64) -> Self {
        let [router, expert, shared] = tensor_sizes(config);
        Self {
            experts: 0..config.n_routed_experts,
            router: rng.normal_vec(router, std),
            experts_w1: rng.normal_vec(expert, std),
            experts_w3: rng.normal_vec(expert, std),
            experts_w2: rng.normal_vec(expert, std),
            shared_w1: rng.normal_vec(shared, std),
            shared_w3: rng.normal_vec(shared, std),
            shared_w2: rng.normal_vec(shared, std),
        }
    }

    /// Whether every tensor has the size `config` implies for the experts held.
    pub fn matches(&self, config: &MoeConfig) -> bool {
        let [router, _, shared] = tensor_sizes(config);
        let expert = self.experts.len() * expert_size(config);
        self.experts.start <= self.experts.end
            && self.experts.end <= config.n_routed_experts
            && self.router.len() == router
            && [&self.experts_w1, &self.experts_w3, &self.experts_w2]
                .iter()
                .all(|t| t.len() == expert)
            && [&self.shared_w1, &self.shared_w3, &self.shared_w2]
                .iter()
                .all(|t| t.len() == shared)
    }

    /// Whether the tensors hold every routed expert (one process, or no
    /// expert parallelism).
    pub fn holds_all(&self, config: &MoeConfig) -> bool {
        self.experts == (0..config.n_routed_experts)
    }

    /// Whether the tensors hold every expert of `experts`.
    pub fn holds(&self, experts: &Range<usize>) -> bool {
        experts.is_empty()
            || (self.experts.start <= experts.start && experts.end <= self.experts.end)
    }

    /// Routed expert `e`'s MLP (`e` global; it must be held).
    pub fn expert<'a>(&'a self, config: &MoeConfig, e: usize) -> SwiGluMlp<'a, T> {
        let range = self.expert_range(config, e);
        SwiGluMlp {
            w1: &self.experts_w1[range.clone()],
            w3: &self.experts_w3[range.clone()],
            w2: &self.experts_w2[range],
            model: config.hidden,
            hidden: config.expert_hidden,
            linears: Linears::FP32,
        }
    }

    /// Gradient slices for routed expert `e` (global; it must be held);
    /// empty for a frozen tensor (kept empty: `training.lora`).
    pub fn expert_grads<'a>(&'a mut self, config: &MoeConfig, e: usize) -> SwiGluGrads<'a, T> {
        let range = self.expert_range(config, e);
        let part = |t: &'a mut Vec<T>| -> &'a mut [T] {
            match t.is_empty() {
                true => &mut [],
                false => &mut t[range.clone()],
            }
        };
        SwiGluGrads {
            w1: part(&mut self.experts_w1),
            w3: part(&mut self.experts_w3),
            w2: part(&mut self.experts_w2),
        }
    }

    /// Gradient slices of every held routed expert, in order (disjoint,
    /// so the experts' backward passes can run side by side).
    pub fn routed_expert_grads(&mut self, config: &MoeConfig) -> Vec<SwiGluGrads<'_, T>> {
        let size = expert_size(config).max(1);
        let n = self.experts.len();
        per_expert(&mut self.experts_w1, n, size)
            .into_iter()
            .zip(per_expert(&mut self.experts_w3, n, size))
            .zip(per_expert(&mut self.experts_w2, n, size))
            .map(|((w1, w3), w2)| SwiGluGrads { w1, w3, w2 })
            .collect()
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

/// Each of `n` experts' part (`size` values) of an expert tensor; an empty
/// slice each for a frozen tensor (kept empty: `training.lora`).
fn per_expert<T>(t: &mut [T], n: usize, size: usize) -> Vec<&mut [T]> {
    match t.is_empty() {
        true => (0..n).map(|_| <&mut [T]>::default()).collect(),
        false => t.chunks_mut(size).collect(),
    }
}

impl<T> MoeParams<T> {
    /// Where global expert `e` lies in each stacked expert tensor.
    fn expert_range(&self, config: &MoeConfig, e: usize) -> Range<usize> {
        assert!(
            self.experts.contains(&e),
            "expert {e} is not held here (this layer holds experts {:?})",
            self.experts
        );
        let size = expert_size(config);
        let local = e - self.experts.start;
        local * size..(local + 1) * size
    }

    /// Bytes held by the routed experts' tensors: the part expert
    /// parallelism divides by the group size.
    pub fn routed_expert_bytes(&self) -> usize {
        self.experts_w1.held_bytes() + self.experts_w3.held_bytes() + self.experts_w2.held_bytes()
    }
}

impl<T> HeldBytes for MoeParams<T> {
    fn held_bytes(&self) -> usize {
        self.router.held_bytes()
            + self.routed_expert_bytes()
            + self.shared_w1.held_bytes()
            + self.shared_w3.held_bytes()
            + self.shared_w2.held_bytes()
    }
}

/// Values of one routed expert in each stacked expert tensor.
pub fn expert_size(config: &MoeConfig) -> usize {
    config.expert_hidden * config.hidden
}

/// Element counts of the router, of each stacked expert tensor (every
/// expert), and of each shared tensor.
fn tensor_sizes(config: &MoeConfig) -> [usize; 3] {
    [
        config.n_routed_experts * config.hidden,
        config.n_routed_experts * expert_size(config),
        config.shared_hidden() * config.hidden,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::ScoreFunction;

    #[test]
    fn keeping_experts_keeps_their_values_under_their_global_indices() {
        let config = MoeConfig {
            hidden: 4,
            n_routed_experts: 6,
            expert_hidden: 3,
            n_shared_experts: 0,
            shared_expert_hidden: 0,
            top_k: 2,
            score_function: ScoreFunction::Softmax,
            group_limit: None,
            normalize_gates: false,
            routed_scaling_factor: 1.0,
            aux_loss_alpha: 0.0,
        };
        let whole = MoeParams::<f32>::random(&config, &mut SplitMix64::new(3), 1.0);
        let mut share = whole.clone();
        share.keep_experts(&config, 2..4);
        let mut again = share.clone();
        again.keep_experts(&config, 3..4);
        for (held, e) in [(&share, 2), (&share, 3), (&again, 3)] {
            let (h, w) = (held.expert(&config, e), whole.expert(&config, e));
            assert_eq!((h.w1, h.w3, h.w2), (w.w1, w.w3, w.w2), "expert {e}");
        }
        assert_eq!((share.experts.clone(), again.experts.clone()), (2..4, 3..4));
        assert_eq!(share.experts_w1.len(), 2 * expert_size(&config));
        assert_eq!(share.router, whole.router);
    }
}
