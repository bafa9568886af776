//! Shape and routing hyperparameters of one MoE feed-forward layer.

use std::fmt;

/// How router logits become per-expert affinity scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFunction {
    /// Softmax over all routed experts (DeepSeek-V2, Mixtral).
    Softmax,
    /// Independent sigmoid per expert (DeepSeek-V3). Gates are always
    /// normalised, since sigmoid scores do not sum to anything in particular.
    Sigmoid,
}

/// Group-limited (node-limited) routing: experts are split into `n_groups`
/// equal, contiguous groups (one per device or node in expert parallelism);
/// each token first picks `top_groups` groups, then its experts only from
/// those, which bounds how many devices one token's activations travel to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLimit {
    pub n_groups: usize,
    pub top_groups: usize,
}

/// One MoE feed-forward layer, DeepSeek-V3 style.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Model (residual stream) width.
    pub hidden: usize,
    pub n_routed_experts: usize,
    /// Intermediate width of each routed expert's SwiGLU MLP.
    pub expert_hidden: usize,
    /// Shared experts see every token. Being SwiGLU MLPs summed with weight 1,
    /// `n` of them equal one MLP of width `n * shared_expert_hidden`, which is
    /// how they are stored.
    pub n_shared_experts: usize,
    pub shared_expert_hidden: usize,
    /// Routed experts per token.
    pub top_k: usize,
    pub score_function: ScoreFunction,
    pub group_limit: Option<GroupLimit>,
    /// Rescale the selected scores to sum to 1 (forced for sigmoid scores).
    pub normalize_gates: bool,
    /// Multiplies every routed expert's gate (2.5 in DeepSeek-V3), so the
    /// routed output keeps its scale next to the shared experts'.
    pub routed_scaling_factor: f64,
    /// Coefficient of the sequence-wise auxiliary balance loss; 0 disables it
    /// (DeepSeek-V3 uses 1e-4, relying mainly on the selection bias).
    pub aux_loss_alpha: f64,
}

impl MoeConfig {
    /// Whether selected scores are rescaled to sum to 1 before the scaling factor.
    pub fn normalizes_gates(&self) -> bool {
        self.normalize_gates || self.score_function == ScoreFunction::Sigmoid
    }

    /// Total intermediate width of the shared experts (0 when there are none).
    pub fn shared_hidden(&self) -> usize {
        self.n_shared_experts * self.shared_expert_hidden
    }

    /// Checks the shapes are consistent; every other function in [`crate::moe`]
    /// assumes a validated config.
    pub fn validate(&self) -> Result<(), MoeConfigError> {
        use MoeConfigError::*;
        if self.hidden == 0 || self.expert_hidden == 0 || self.n_routed_experts == 0 {
            return Err(EmptyShape);
        }
        if self.n_shared_experts > 0 && self.shared_expert_hidden == 0 {
            return Err(EmptyShape);
        }
        if self.top_k == 0 || self.top_k > self.n_routed_experts {
            return Err(TopK {
                top_k: self.top_k,
                n_experts: self.n_routed_experts,
            });
        }
        if let Some(limit) = self.group_limit {
            if limit.n_groups == 0 || !self.n_routed_experts.is_multiple_of(limit.n_groups) {
                return Err(GroupsDoNotDivideExperts {
                    n_groups: limit.n_groups,
                    n_experts: self.n_routed_experts,
                });
            }
            let reachable = limit.top_groups * (self.n_routed_experts / limit.n_groups);
            if limit.top_groups == 0 || limit.top_groups > limit.n_groups || reachable < self.top_k
            {
                return Err(TooFewGroups {
                    top_groups: limit.top_groups,
                    reachable,
                    top_k: self.top_k,
                });
            }
        }
        let finite_non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !finite_non_negative(self.routed_scaling_factor)
            || !finite_non_negative(self.aux_loss_alpha)
        {
            return Err(BadCoefficient);
        }
        Ok(())
    }
}

/// Why a [`MoeConfig`] (or the weights given with it) is unusable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoeConfigError {
    EmptyShape,
    TopK {
        top_k: usize,
        n_experts: usize,
    },
    GroupsDoNotDivideExperts {
        n_groups: usize,
        n_experts: usize,
    },
    TooFewGroups {
        top_groups: usize,
        reachable: usize,
        top_k: usize,
    },
    BadCoefficient,
    /// The weights given to a layer do not have the sizes its config implies.
    ParamsDoNotMatch,
}

impl fmt::Display for MoeConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EmptyShape => write!(
                f,
                "hidden, expert and shared-expert widths and the expert count must be positive"
            ),
            Self::TopK { top_k, n_experts } => write!(
                f,
                "top_k {top_k} must be in 1..={n_experts} (the routed expert count)"
            ),
            Self::GroupsDoNotDivideExperts {
                n_groups,
                n_experts,
            } => {
                write!(
                    f,
                    "{n_groups} expert groups do not evenly divide {n_experts} routed experts"
                )
            }
            Self::TooFewGroups {
                top_groups,
                reachable,
                top_k,
            } => write!(
                f,
                "top_groups {top_groups} must be positive, at most n_groups, and reach at least top_k {top_k} experts (reaches {reachable})"
            ),
            Self::BadCoefficient => write!(
                f,
                "routed_scaling_factor and aux_loss_alpha must be finite and non-negative"
            ),
            Self::ParamsDoNotMatch => write!(
                f,
                "the MoE weights do not have the shapes the config implies"
            ),
        }
    }
}

impl std::error::Error for MoeConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MoeConfig {
        MoeConfig {
            hidden: 8,
            n_routed_experts: 8,
            expert_hidden: 4,
            n_shared_experts: 1,
            shared_expert_hidden: 4,
            top_k: 2,
            score_function: ScoreFunction::Softmax,
            group_limit: Some(GroupLimit {
                n_groups: 4,
                top_groups: 2,
            }),
            normalize_gates: false,
            routed_scaling_factor: 1.0,
            aux_loss_alpha: 0.0,
        }
    }

    #[test]
    fn accepts_a_consistent_config_and_names_each_inconsistency() {
        assert_eq!(config().validate(), Ok(()));
        let broken = [
            (
                MoeConfig {
                    top_k: 9,
                    ..config()
                },
                MoeConfigError::TopK {
                    top_k: 9,
                    n_experts: 8,
                },
            ),
            (
                MoeConfig {
                    group_limit: Some(GroupLimit {
                        n_groups: 3,
                        top_groups: 1,
                    }),
                    ..config()
                },
                MoeConfigError::GroupsDoNotDivideExperts {
                    n_groups: 3,
                    n_experts: 8,
                },
            ),
            (
                MoeConfig {
                    top_k: 5,
                    ..config()
                },
                MoeConfigError::TooFewGroups {
                    top_groups: 2,
                    reachable: 4,
                    top_k: 5,
                },
            ),
            (
                MoeConfig {
                    shared_expert_hidden: 0,
                    ..config()
                },
                MoeConfigError::EmptyShape,
            ),
            (
                MoeConfig {
                    aux_loss_alpha: f64::NAN,
                    ..config()
                },
                MoeConfigError::BadCoefficient,
            ),
        ];
        for (config, error) in broken {
            assert_eq!(config.validate(), Err(error));
        }
    }

    #[test]
    fn sigmoid_scores_always_normalise_gates() {
        assert!(!config().normalizes_gates());
        assert!(
            MoeConfig {
                score_function: ScoreFunction::Sigmoid,
                ..config()
            }
            .normalizes_gates()
        );
    }
}
