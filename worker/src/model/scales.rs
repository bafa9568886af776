//! Which of a block's GEMMs run in FP8, and the tensorwise recipe's delayed
//! scales for them: one [`LinearScales`] per FP8-eligible linear layer, in
//! the order the block hands them out ([`BlockLinears`]).

use crate::fp8::{Fp8Recipe, LinearScales};
use crate::linear::{GemmPrecision, Linears};
use crate::model::config::ModelConfig;
use crate::moe::MoeLayer;
use crate::moe::expert::MLP_LINEARS;

/// Positions of the attention projections in [`BlockLinears::attention`].
pub(crate) const WQ: usize = 0;
pub(crate) const WK: usize = 1;
pub(crate) const WV: usize = 2;
pub(crate) const WO: usize = 3;
pub(crate) const ATTENTION_LINEARS: usize = 4;

/// How one block's FP8-eligible linear layers compute.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockLinears<'a> {
    /// `wq, wk, wv, wo`.
    pub attention: Linears<'a>,
    /// The dense MLP's `w1, w3, w2`, or the MoE layer's (see [`MoeLayer::linear_count`]).
    pub ffn: Linears<'a>,
}

/// One block's delayed scales; empty unless the recipe is tensorwise.
#[derive(Clone, Debug, Default)]
pub(crate) struct BlockScales {
    attention: Vec<LinearScales>,
    ffn: Vec<LinearScales>,
}

impl BlockScales {
    /// Fresh (history-less) scales for every block when `config` trains
    /// with the tensorwise recipe; empty ones otherwise.
    pub fn for_model(config: &ModelConfig) -> Vec<Self> {
        let tensorwise = config.gemm_precision == GemmPrecision::Fp8(Fp8Recipe::Tensorwise);
        (0..config.layers)
            .map(|block| {
                if !tensorwise {
                    return Self::default();
                }
                let ffn = if config.is_moe_block(block) {
                    MoeLayer::<f32>::linear_count(&config.moe)
                } else {
                    MLP_LINEARS
                };
                Self {
                    attention: vec![LinearScales::default(); ATTENTION_LINEARS],
                    ffn: vec![LinearScales::default(); ffn],
                }
            })
            .collect()
    }

    pub fn linears(&self, precision: GemmPrecision) -> BlockLinears<'_> {
        BlockLinears {
            attention: Linears::new(precision, &self.attention),
            ffn: Linears::new(precision, &self.ffn),
        }
    }

    /// Each linear layer's scales, attention's then the feed-forward layer's.
    pub fn layers(&self) -> impl Iterator<Item = &LinearScales> {
        self.attention.iter().chain(&self.ffn)
    }

    /// Ends a training step: each amax observed joins its history.
    pub fn advance(&mut self) {
        for scales in self.attention.iter_mut().chain(&mut self.ffn) {
            scales.advance();
        }
    }

    /// Forgets the amaxes observed since the last step.
    pub fn forget_observed(&mut self) {
        for scales in self.attention.iter_mut().chain(&mut self.ffn) {
            scales.forget_observed();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::fp8::quantize::amax;
    use crate::fp8::{DelayedScale, Fp8Recipe, LinearScales};
    use crate::linear::GemmPrecision;
    use crate::model::weights::FeedForward;
    use crate::model::{Gradients, Model, ModelConfig};
    use crate::moe::{MoeConfig, ScoreFunction};
    use crate::rng::SplitMix64;

    fn tensorwise_config() -> ModelConfig {
        ModelConfig {
            vocab: 16,
            hidden: 8,
            layers: 2,
            dense_layers: 1,
            dense_hidden: 12,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            norm_eps: crate::model::config::NORM_EPS,
            qk_norm: None,
            seq_len: 4,
            rope_theta: 100.0,
            moe: MoeConfig {
                hidden: 8,
                n_routed_experts: 4,
                expert_hidden: 6,
                n_shared_experts: 1,
                shared_expert_hidden: 6,
                top_k: 2,
                score_function: ScoreFunction::Sigmoid,
                group_limit: None,
                normalize_gates: false,
                routed_scaling_factor: 1.0,
                aux_loss_alpha: 0.0,
            },
            bias_update_rate: None,
            gemm_precision: GemmPrecision::Fp8(Fp8Recipe::Tensorwise),
            head_precision: GemmPrecision::Fp32,
        }
    }

    fn history(scale: &DelayedScale) -> Vec<f32> {
        scale.history().collect()
    }

    /// Each layer's weight history holds that very weight's amax (so every
    /// GEMM reached its own slot), and its input and output-gradient
    /// histories were filled by the forward and backward passes.
    fn assert_layer(what: &str, scales: &LinearScales, weight: &[f32]) {
        assert_eq!(history(&scales.weight), [amax(weight)], "{what} weight");
        assert_eq!(history(&scales.input).len(), 1, "{what} input");
        assert_eq!(history(&scales.grad_output).len(), 1, "{what} grad");
    }

    #[test]
    fn every_fp8_gemm_records_into_its_own_layers_scales() {
        let config = tensorwise_config();
        let mut model = Model::<f32>::initial(config.clone(), 5);
        let mut rng = SplitMix64::new(6);
        // Enough tokens that every expert gets some.
        let tokens: Vec<u32> = (0..32).map(|_| rng.below(config.vocab) as u32).collect();
        let pass = model.forward(&tokens, &tokens);
        model.backward(&pass, &mut Gradients::zeros(&config));
        assert!(pass.expert_loads()[0].iter().all(|&load| load > 0));
        model.advance_fp8_scales();

        for (b, (block, scales)) in model.weights.blocks.iter().zip(&model.scales).enumerate() {
            let projections = [&block.wq, &block.wk, &block.wv, &block.wo];
            assert_eq!(scales.attention.len(), projections.len());
            for (i, weight) in projections.into_iter().enumerate() {
                assert_layer(
                    &format!("block {b} attention {i}"),
                    &scales.attention[i],
                    weight,
                );
            }
            let mlps: Vec<[&[f32]; 3]> = match &block.ffn {
                FeedForward::Dense(dense) => vec![[&dense.w1, &dense.w3, &dense.w2]],
                FeedForward::Moe(layer) => {
                    let moe = &layer.params;
                    let size = config.moe.expert_hidden * config.hidden;
                    let mut mlps: Vec<[&[f32]; 3]> = (0..config.moe.n_routed_experts)
                        .map(|e| {
                            let r = e * size..(e + 1) * size;
                            [
                                &moe.experts_w1[r.clone()],
                                &moe.experts_w3[r.clone()],
                                &moe.experts_w2[r],
                            ]
                        })
                        .collect();
                    mlps.push([&moe.shared_w1, &moe.shared_w3, &moe.shared_w2]);
                    mlps
                }
            };
            assert_eq!(scales.ffn.len(), 3 * mlps.len(), "block {b}");
            for (m, weights) in mlps.iter().enumerate() {
                for (i, weight) in weights.iter().enumerate() {
                    let what = format!("block {b} mlp {m} matrix {i}");
                    assert_layer(&what, &scales.ffn[3 * m + i], weight);
                }
            }
        }
    }

    #[test]
    fn only_the_tensorwise_recipe_keeps_scales() {
        let mut config = tensorwise_config();
        for precision in [
            GemmPrecision::Fp32,
            GemmPrecision::Fp8(Fp8Recipe::Blockwise),
        ] {
            config.gemm_precision = precision;
            let scales = super::BlockScales::for_model(&config);
            assert_eq!(scales.len(), config.layers);
            assert!(
                scales
                    .iter()
                    .all(|s| s.attention.is_empty() && s.ffn.is_empty())
            );
        }
    }
}
