//! Activation checkpointing (`training.activationCheckpointing`): the
//! forward pass keeps only each block's input, and the backward pass reruns
//! one block's forward at a time to get the activations it needs. Memory
//! for activations drops from every block's to the blocks' inputs plus one
//! block's, for one more forward pass of compute.
//!
//! The rerun is the same deterministic function of the same input and
//! weights (routing included: the selection bias moves only between steps;
//! FP8 amax observations are a max, so seeing a tensor twice changes
//! nothing), so gradients are bit-identical to keeping everything.

use crate::memory::HeldBytes;
use crate::model::block::{BlockPass, FeedForwardPass};

/// What a forward pass keeps of each block for the backward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActivationMemory {
    /// Every activation; the backward pass reads them back.
    #[default]
    KeepAll,
    /// Each block's input only; the backward pass recomputes the rest.
    RecomputeBlocks,
}

/// One block's share of a forward pass.
#[derive(Clone, Debug)]
pub(crate) enum BlockActivations<T> {
    /// Boxed: a pass is a few hundred bytes of buffer headers, an input one.
    Kept(Box<BlockPass<T>>),
    /// The input, and the routing choice the trainer reads after the step
    /// (a few bytes per token) when the block is MoE.
    Checkpointed {
        input: Vec<T>,
        routing: Option<RoutingSummary>,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct RoutingSummary {
    /// `[tokens, top_k]`.
    pub experts: Vec<usize>,
    /// Tokens per expert.
    pub load: Vec<usize>,
}

impl<T> BlockActivations<T> {
    /// Keeps `pass` whole or only its input, as `memory` says.
    pub fn keep(pass: BlockPass<T>, memory: ActivationMemory) -> Self {
        match memory {
            ActivationMemory::KeepAll => Self::Kept(Box::new(pass)),
            ActivationMemory::RecomputeBlocks => {
                let routing = pass.ffn.routing().map(|(routing, load)| RoutingSummary {
                    experts: routing.experts.clone(),
                    load,
                });
                Self::Checkpointed {
                    input: pass.into_input(),
                    routing,
                }
            }
        }
    }

    /// The block's routing choice, `[tokens, top_k]`, if it is MoE.
    pub fn selected_experts(&self) -> Option<&[usize]> {
        match self {
            Self::Kept(pass) => match &pass.ffn {
                FeedForwardPass::Moe(moe) => Some(&moe.routing.experts),
                FeedForwardPass::MoeParallel(moe) => Some(&moe.routing.experts),
                FeedForwardPass::Dense(_) => None,
            },
            Self::Checkpointed { routing, .. } => routing.as_ref().map(|r| r.experts.as_slice()),
        }
    }

    /// Tokens per expert, if the block is MoE.
    pub fn expert_load(&self) -> Option<Vec<usize>> {
        match self {
            Self::Kept(pass) => pass.ffn.routing().map(|(_, load)| load),
            Self::Checkpointed { routing, .. } => routing.as_ref().map(|r| r.load.clone()),
        }
    }
}

impl<T> HeldBytes for BlockActivations<T> {
    fn held_bytes(&self) -> usize {
        match self {
            Self::Kept(pass) => pass.held_bytes(),
            Self::Checkpointed { input, routing } => {
                input.held_bytes()
                    + routing
                        .as_ref()
                        .map_or(0, |r| r.experts.held_bytes() + r.load.held_bytes())
            }
        }
    }
}
