//! Choosing the next token from the logits: greedy at temperature 0,
//! otherwise a draw from the temperature-scaled softmax restricted to the
//! `top_k` most likely tokens and then to the smallest set whose probability
//! reaches `top_p` (nucleus sampling, Holtzman et al., 2020). First, as
//! OpenAI defines them, `logit_bias` is added to its tokens' logits and the
//! presence and frequency penalties are taken off the tokens this request
//! has generated (`logit[t] -= count[t] · frequency + (count[t] > 0) ·
//! presence`), in both greedy and sampled decoding.
//!
//! Deterministic: a request with a seed draws from its own generator, so
//! the same request gives the same tokens however it is batched.

use crate::rng::SplitMix64;

/// How a request wants its tokens drawn (already validated by the API layer).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f64,
    /// In (0, 1]; 1 keeps every token.
    pub top_p: f64,
    /// 0 keeps every token.
    pub top_k: usize,
    pub seed: u64,
    /// Added to these tokens' logits (OpenAI's `logit_bias`, each in [-100, 100]).
    pub logit_bias: Vec<(u32, f32)>,
    /// Taken off each token generated before, once (in [-2, 2]).
    pub presence_penalty: f32,
    /// Taken off each token generated before, once per time (in [-2, 2]).
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            logit_bias: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// One request's sampler: its parameters, random stream, and how often it
/// drew each token (for the penalties).
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    drawn: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            rng: SplitMix64::new(params.seed),
            params,
            drawn: std::collections::HashMap::new(),
        }
    }

    /// The next token from `logits` (one per vocabulary entry the tokenizer
    /// can decode). Non-finite logits are never chosen unless all are.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_excluding(logits, &[])
    }

    /// [`Self::sample`] with `banned` tokens out of the running (their
    /// logits made -inf): the end-of-sequence tokens before `min_tokens`.
    pub fn sample_excluding(&mut self, logits: &[f32], banned: &[u32]) -> u32 {
        let adjusted = self.adjusted(logits, banned);
        let logits = adjusted.as_deref().unwrap_or(logits);
        let token = self.draw(logits);
        *self.drawn.entry(token).or_default() += 1;
        token
    }

    /// The logits with the bias and penalties applied and `banned` tokens
    /// excluded, when there is any of that to do.
    fn adjusted(&self, logits: &[f32], banned: &[u32]) -> Option<Vec<f32>> {
        let p = &self.params;
        let penalised = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        // Penalties need something drawn before to weigh on.
        let penalties_apply = penalised && !self.drawn.is_empty();
        if p.logit_bias.is_empty() && !penalties_apply && banned.is_empty() {
            return None;
        }
        let mut logits = logits.to_vec();
        for &token in banned {
            if let Some(l) = logits.get_mut(token as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        for &(token, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        if penalised {
            for (&token, &count) in &self.drawn {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        Some(logits)
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        // Candidates by descending logit, ties by ascending id (a total order,
        // so the draw is reproducible).
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&t| logits[t as usize].is_finite())
            .collect();
        if order.is_empty() {
            return 0;
        }
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if self.params.top_k > 0 {
            order.truncate(self.params.top_k);
        }
        let max = f64::from(logits[order[0] as usize]);
        let weights: Vec<f64> = order
            .iter()
            .map(|&t| ((f64::from(logits[t as usize]) - max) / self.params.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        // The nucleus: the shortest prefix whose probability reaches top_p.
        let mut kept = 0;
        let mut mass = 0.0;
        for w in &weights {
            kept += 1;
            mass += w / total;
            if mass >= self.params.top_p {
                break;
            }
        }
        let kept_total: f64 = weights[..kept].iter().sum();
        let mut u = self.rng.uniform() * kept_total;
        for (&t, &w) in order.iter().zip(&weights[..kept]) {
            if u < w {
                return t;
            }
            u -= w;
        }
        // Rounding can leave u a hair above the last weight.
        order[kept - 1]
    }
}

/// The most likely token; the lowest id among equals.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (t, &l) in logits.iter().enumerate() {
        if l > logits[best] || (logits[best].is_nan() && !l.is_nan()) {
            best = t;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_p: f64, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn logit_bias_moves_the_choice_and_penalties_weigh_on_repeats() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let with = |params: SamplingParams| Sampler::new(params);
        // Greedy: -100 on the best token, +100 on the worst.
        let mut s = with(SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..params(0.0, 1.0, 0, 0)
        });
        assert_eq!(s.sample(&logits), 2);
        let mut s = with(SamplingParams {
            logit_bias: vec![(3, 100.0)],
            ..params(0.0, 1.0, 0, 0)
        });
        assert_eq!(s.sample(&logits), 3);
        // Frequency 0.6: token 1 (3.0) wins, then 2.4, then 1.8 < 2.0, so
        // token 2 takes over; token 2 at 2.0 - 0.6 = 1.4 < 1.8 gives it back.
        let mut s = with(SamplingParams {
            frequency_penalty: 0.6,
            ..params(0.0, 1.0, 0, 0)
        });
        let drawn: Vec<u32> = (0..5).map(|_| s.sample(&logits)).collect();
        assert_eq!(drawn, [1, 1, 2, 1, 2]);
        // Presence 1.5: once drawn, a token is 1.5 lower however often.
        let mut s = with(SamplingParams {
            presence_penalty: 1.5,
            ..params(0.0, 1.0, 0, 0)
        });
        let drawn: Vec<u32> = (0..4).map(|_| s.sample(&logits)).collect();
        assert_eq!(drawn, [1, 2, 1, 1]);
    }

    fn frequencies(params: SamplingParams, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut sampler = Sampler::new(params);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(logits) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.5, 2.0, 2.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.0]), 1);
        let mut sampler = Sampler::new(params(0.0, 1.0, 0, 9));
        assert_eq!(sampler.sample(&[0.1, 0.3, 0.2]), 1);
    }

    #[test]
    fn temperature_one_draws_from_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let f = frequencies(params(1.0, 1.0, 0, 1), &logits, 40_000);
        for (fi, &l) in f.iter().zip(&logits) {
            let p = f64::from(l).exp() / z;
            assert!((fi - p).abs() < 0.01, "frequency {fi} vs probability {p}");
        }
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let f = frequencies(params(1.0, 1.0, 2, 2), &logits, 10_000);
        assert_eq!((f[2], f[3]), (0.0, 0.0), "top-k 2 keeps tokens 0 and 1");
        // Softmax of [3, 2, 1, 0] is about [0.64, 0.24, 0.09, 0.03]: top-p 0.8
        // keeps the first two (0.64 < 0.8 <= 0.88).
        let f = frequencies(params(1.0, 0.8, 0, 3), &logits, 10_000);
        assert_eq!((f[2], f[3]), (0.0, 0.0));
        assert!(f[1] > 0.2, "the second token stays in the nucleus");
    }

    #[test]
    fn a_seed_fixes_the_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(0.9, 0.95, 20, seed));
            (0..30).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    /// Banned tokens are never drawn, greedy or sampled, while any other
    /// token can be; the bias cannot bring them back.
    #[test]
    fn banned_tokens_are_never_drawn() {
        let logits = [5.0f32, 1.0, 0.5, 4.0];
        let mut greedy = Sampler::new(SamplingParams {
            temperature: 0.0,
            logit_bias: vec![(0, 100.0)],
            ..SamplingParams::default()
        });
        assert_eq!(greedy.sample_excluding(&logits, &[0]), 3);
        assert_eq!(greedy.sample(&logits), 0);
        let mut sampled = Sampler::new(SamplingParams {
            temperature: 2.0,
            seed: 5,
            ..SamplingParams::default()
        });
        let draws: Vec<u32> = (0..400)
            .map(|_| sampled.sample_excluding(&logits, &[0, 3]))
            .collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 2));
        assert!(draws.contains(&1) && draws.contains(&2));
    }
}
