//! How evenly a step routed its tokens to the experts: per MoE layer,
//! `MaxVio = max_e load_e / mean − 1`, with the mean `tokens × topK /
//! experts` (routing is dropless: every token reaches exactly `topK`
//! experts). Published on rank 0's status endpoint, in `metrics.jsonl` and
//! in the MoETrainingJob's status.

use moe_crds::ExpertLoad;

/// The per-layer violations of one step and the worst of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Balance {
    /// `(decoder layer, MaxVio)` for each MoE layer, in order.
    pub layers: Vec<(usize, f64)>,
}

impl Balance {
    /// `loads`: tokens per expert, one list per MoE layer (the step's
    /// `StepReport::expert_loads`); the MoE layers follow `dense_layers`
    /// dense ones. `None` when the step routed nothing.
    pub fn of(
        loads: &[Vec<usize>],
        tokens: usize,
        top_k: usize,
        dense_layers: usize,
    ) -> Option<Self> {
        let layers: Vec<(usize, f64)> = loads
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_empty() && tokens > 0)
            .map(|(i, l)| {
                let mean = (tokens * top_k) as f64 / l.len() as f64;
                let max = l.iter().copied().max().unwrap_or(0) as f64;
                (dense_layers + i, max / mean - 1.0)
            })
            .collect();
        (!layers.is_empty()).then_some(Self { layers })
    }

    /// The worst layer (the first of equals).
    pub fn worst(&self) -> ExpertLoad {
        let (layer, max_violation) = self
            .layers
            .iter()
            .copied()
            .reduce(|a, b| if b.1 > a.1 { b } else { a })
            .expect("a Balance has a layer");
        ExpertLoad {
            max_violation,
            layer: layer as i32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_violation_is_the_busiest_expert_over_its_fair_share() {
        // 8 tokens × top-2 over 4 experts: a fair share is 4 rows each.
        let even = vec![vec![4, 4, 4, 4]];
        let skewed = vec![vec![8, 4, 2, 2], vec![6, 6, 2, 2]];
        assert_eq!(Balance::of(&even, 8, 2, 0).unwrap().layers, vec![(0, 0.0)]);
        let b = Balance::of(&skewed, 8, 2, 3).unwrap();
        // 8 / 4 − 1 and 6 / 4 − 1, layers counted after 3 dense ones.
        assert_eq!(b.layers, vec![(3, 1.0), (4, 0.5)]);
        assert_eq!(
            b.worst(),
            ExpertLoad {
                max_violation: 1.0,
                layer: 3
            }
        );
    }

    #[test]
    fn every_token_on_one_expert_is_the_most_a_layer_can_violate() {
        // 5 tokens × top-1 over 4 experts, all to one: 5 / 1.25 − 1 = experts − 1.
        let b = Balance::of(&[vec![0, 5, 0, 0]], 5, 1, 0).unwrap();
        assert_eq!(b.worst().max_violation, 3.0);
    }

    #[test]
    fn a_step_that_routed_nothing_has_no_balance() {
        assert_eq!(Balance::of(&[], 8, 2, 0), None);
        assert_eq!(Balance::of(&[vec![0, 0]], 0, 2, 0), None);
    }
}
