//! YaRN RoPE scaling (Peng et al., 2023) as `transformers` computes it
//! (`_compute_yarn_parameters` in `modeling_rope_utils.py`, and DeepSeek-V3's
//! `yarn_apply_mscale`): how a model trained on `original_context`
//! positions serves `factor` times as many.
//!
//! Three things change against plain RoPE:
//! - the frequencies: high-frequency pairs (many turns within the original
//!   context) keep theirs, low-frequency pairs are slowed by `factor`, and a
//!   linear ramp blends the pairs in between;
//! - cosines and sines are multiplied by an attention factor, which scales
//!   the rotated part of every query-key product by its square;
//! - DeepSeek-V3 also multiplies the softmax scale by `mscale(factor,
//!   mscale_all_dim)²`, which reaches the unrotated dimensions too.

use std::f64::consts::PI;

/// The `rope_parameters` (or `rope_scaling`) of a `"yarn"` model.
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    /// `original_max_position_embeddings`: the context trained on.
    pub original_context: f64,
    /// The ramp's ends, in turns within the original context (32 and 1 by default).
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// An explicit `attention_factor`, else derived from the mscales.
    pub attention_factor: Option<f64>,
    /// Whether the ramp's ends are rounded outwards to whole pairs (`truncate`, default true).
    pub truncate: bool,
}

/// YaRN's magnitude correction for a context `scale` times longer.
fn mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl Yarn {
    /// The frequency of each of the `dim / 2` pairs of a `dim`-wide rotary
    /// head with base `theta`, in radians per position.
    pub fn inv_freq(&self, dim: usize, theta: f64) -> Vec<f64> {
        let pairs = dim / 2;
        let d = dim as f64;
        // The pair index at which a frequency turns `rotations` times
        // within the original context.
        let correction_dim = |rotations: f64| {
            d * (self.original_context / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (
            correction_dim(self.beta_fast),
            correction_dim(self.beta_slow),
        );
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let mut high = high.min(d - 1.0);
        if low == high {
            // transformers' guard against dividing by zero.
            high += 0.001;
        }
        (0..pairs)
            .map(|i| {
                let extrapolation = 1.0 / theta.powf((2 * i) as f64 / d);
                let interpolation = extrapolation / self.factor;
                // 0 below `low` (fast pairs: kept), 1 above `high` (slowed).
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                interpolation * ramp + extrapolation * (1.0 - ramp)
            })
            .collect()
    }

    /// The factor cosines and sines are multiplied by.
    pub fn attention_factor(&self) -> f64 {
        if let Some(factor) = self.attention_factor {
            return factor;
        }
        match (self.mscale, self.mscale_all_dim) {
            // transformers tests both for truthiness: 0 counts as unset.
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                mscale(self.factor, m) / mscale(self.factor, all)
            }
            _ => mscale(self.factor, 1.0),
        }
    }

    /// What DeepSeek-V3 multiplies its softmax scale by: `mscale(factor,
    /// mscale_all_dim)²` when `mscale_all_dim` is set (and not 0), else 1.
    pub fn softmax_scale_factor(&self) -> f64 {
        match self.mscale_all_dim {
            Some(all) if all != 0.0 => {
                let m = mscale(self.factor, all);
                m * m
            }
            _ => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yarn(factor: f64, original_context: f64, mscale_all_dim: f64) -> Yarn {
        Yarn {
            factor,
            original_context,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(1.0),
            mscale_all_dim: Some(mscale_all_dim),
            attention_factor: None,
            truncate: true,
        }
    }

    fn assert_close(what: &str, ours: &[f64], theirs: &[f64]) {
        assert_eq!(ours.len(), theirs.len(), "{what}");
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            // transformers computes the frequencies in f32.
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{what}: pair {i}: {a} vs transformers' {b}"
            );
        }
    }

    /// The numbers are transformers 5.24's, printed by (per case):
    /// ```text
    /// c = transformers.DeepseekV3Config(qk_rope_head_dim=DIM, max_position_embeddings=MPE, rope_parameters=RP)
    /// inv, af = transformers.modeling_rope_utils._compute_yarn_parameters(c)
    /// print(inv.tolist(), af, transformers.models.deepseek_v3.modeling_deepseek_v3.yarn_apply_mscale(c.rope_parameters, QK_HEAD_DIM ** -0.5))
    /// ```
    /// with RP = `{"rope_type": "yarn", "rope_theta": 10000.0, "factor": F,
    /// "mscale": 1.0, "mscale_all_dim": M, "original_max_position_embeddings":
    /// O, "beta_fast": 32, "beta_slow": 1}`.
    #[test]
    fn the_yarn_table_is_transformers() {
        // DeepSeek-V3's own: DIM 64, MPE 163840, F 40, M 1.0, O 4096, QK_HEAD_DIM 192.
        let v3 = yarn(40.0, 4096.0, 1.0);
        let theirs = [
            1.0,
            0.749894202,
            0.562341332,
            0.421696514,
            0.316227764,
            0.237137362,
            0.177827939,
            0.133352146,
            0.100000001,
            0.0749894157,
            0.0562341288,
            0.0390069261,
            0.0268793609,
            0.0183781441,
            0.012447956,
            0.0083345091,
            0.00550000044,
            0.00356199732,
            0.00224936521,
            0.00137051346,
            0.000790569407,
            0.000414990413,
            0.00017782794,
            3.3338034e-05,
            2.49999994e-05,
            1.87473543e-05,
            1.40585325e-05,
            1.05424124e-05,
            7.90569447e-06,
            5.92843435e-06,
            4.44569832e-06,
            3.33380353e-06,
        ];
        assert_close("DeepSeek-V3", &v3.inv_freq(64, 10_000.0), &theirs);
        assert_eq!(v3.attention_factor(), 1.0);
        let scale = 192f64.powf(-0.5) * v3.softmax_scale_factor();
        assert!((scale - 0.1352337788608801).abs() < 1e-12, "{scale}");

        // The fixture's: DIM 8, MPE 256, F 4, M 0.8, O 64, QK_HEAD_DIM 24.
        let tiny = yarn(4.0, 64.0, 0.8);
        assert_close(
            "the fixture",
            &tiny.inv_freq(8, 10_000.0),
            &[1.0, 0.0625, 0.00249999994, 0.000250000012],
        );
        assert!((tiny.attention_factor() - 1.0249579607969668).abs() < 1e-12);
        let scale = 24f64.powf(-0.5) * tiny.softmax_scale_factor();
        assert!((scale - 0.25191097422871067).abs() < 1e-12, "{scale}");
    }

    #[test]
    fn without_mscale_all_dim_the_softmax_scale_is_plain() {
        let mut y = yarn(4.0, 64.0, 0.0);
        assert_eq!(y.softmax_scale_factor(), 1.0);
        // transformers: mscale(factor) = 0.1 ln 4 + 1.
        assert!((y.attention_factor() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        y.attention_factor = Some(0.5);
        assert_eq!(y.attention_factor(), 0.5);
    }
}
