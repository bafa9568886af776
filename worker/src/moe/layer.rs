//! The MoE feed-forward layer: route, dispatch by expert, run each expert
//! over its tokens, scatter-add the gated outputs back, add the shared experts.

use crate::dist::sequence_parallel::SequenceParallel;
use crate::linear::Linears;
use crate::memory::HeldBytes;
use crate::moe::balance::{self, SequenceRoutingSums, SlicedBalanceLoss};
use crate::moe::config::{MoeConfig, MoeConfigError};
use crate::moe::dispatch::Dispatch;
use crate::moe::expert::{MLP_LINEARS, SwiGluActivations, SwiGluGrads, SwiGluMlp};
use crate::moe::params::MoeParams;
use crate::moe::routing::{self, Routing};
use crate::moe::sequences::Sequences;
use crate::ops::{self, matmul};
use crate::scalar::Scalar;

/// One MoE layer: validated config, weights and the load-balancing bias.
#[derive(Clone, Debug)]
pub struct MoeLayer<T> {
    config: MoeConfig,
    pub params: MoeParams<T>,
    /// Per-expert bias added to the scores for top-k selection only; moved by
    /// [`MoeLayer::update_selection_bias`], never by gradients.
    pub selection_bias: Vec<T>,
}

/// The forward pass's output and everything its backward needs.
#[derive(Clone, Debug)]
pub struct MoeForward<T> {
    /// `[tokens, hidden]`.
    pub output: Vec<T>,
    pub routing: Routing<T>,
    pub dispatch: Dispatch,
    /// The sequence-wise balance loss (0 when `aux_loss_alpha` is 0); part of
    /// the training objective, and [`MoeLayer::backward`] includes its gradient.
    /// With sequence parallelism, the whole sequences' (see [`SlicedBalanceLoss`]).
    pub aux_loss: T,
    /// How the pass's tokens split into sequences (or this rank's slices
    /// of them), and which are padding.
    sequences: Sequences,
    /// The whole sequences' balance statistics when this pass held slices
    /// of them (sequence parallelism); `None` when every token of each
    /// sequence is here or the loss is off.
    sliced_balance: Option<SlicedBalanceLoss>,
    routed: Vec<ExpertPass<T>>,
    shared: Option<SwiGluActivations<T>>,
}

/// One routed expert's batch: its gathered input rows, activations and output rows.
#[derive(Clone, Debug)]
struct ExpertPass<T> {
    input: Vec<T>,
    activations: SwiGluActivations<T>,
    output: Vec<T>,
}

impl<T> MoeForward<T> {
    /// Real tokens routed to each expert in this pass (for metrics and the
    /// bias update): padding is computed, but not counted.
    pub fn expert_load(&self) -> Vec<usize> {
        if self.sequences.is_padded() {
            let r = &self.routing;
            self.sequences.real_load(&r.experts, r.top_k, r.n_experts)
        } else {
            self.dispatch.load()
        }
    }
}

impl<T> HeldBytes for MoeForward<T> {
    fn held_bytes(&self) -> usize {
        let routed: usize = self
            .routed
            .iter()
            .map(|e| e.input.held_bytes() + e.activations.held_bytes() + e.output.held_bytes())
            .sum();
        self.output.held_bytes()
            + self.routing.held_bytes()
            + self.dispatch.held_bytes()
            + routed
            + self.routed.held_bytes()
            + self.shared.held_bytes()
            + self.sliced_balance.held_bytes()
    }
}

impl<T: Scalar> MoeLayer<T> {
    /// A layer with a zero selection bias.
    pub fn new(config: MoeConfig, params: MoeParams<T>) -> Result<Self, MoeConfigError> {
        config.validate()?;
        if !params.matches(&config) {
            return Err(MoeConfigError::ParamsDoNotMatch);
        }
        let selection_bias = vec![T::ZERO; config.n_routed_experts];
        Ok(Self {
            config,
            params,
            selection_bias,
        })
    }

    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// Linear layers in [`Self::forward_with`]'s `linears`: `w1, w3, w2` of
    /// each routed expert in order, then of the fused shared experts.
    pub fn linear_count(config: &MoeConfig) -> usize {
        let shared = usize::from(config.shared_hidden() > 0);
        MLP_LINEARS * (config.n_routed_experts + shared)
    }

    /// Routed expert `e`'s MLP, computing as `linears` say.
    pub(crate) fn expert<'a>(&'a self, linears: Linears<'a>, e: usize) -> SwiGluMlp<'a, T> {
        self.params
            .expert(&self.config, e)
            .with_linears(linears.sub(MLP_LINEARS * e, MLP_LINEARS))
    }

    /// The fused shared experts' MLP, if any, computing as `linears` say.
    pub(crate) fn shared<'a>(&'a self, linears: Linears<'a>) -> Option<SwiGluMlp<'a, T>> {
        let start = MLP_LINEARS * self.config.n_routed_experts;
        self.params
            .shared(&self.config)
            .map(|mlp| mlp.with_linears(linears.sub(start, MLP_LINEARS)))
    }

    /// Adds the shared experts' output for `x` into `output` (every token
    /// goes through them); their activations, for the backward pass.
    pub(crate) fn shared_forward(
        &self,
        linears: Linears<'_>,
        x: &[T],
        output: &mut [T],
    ) -> Option<SwiGluActivations<T>> {
        self.shared(linears).map(|mlp| {
            let mut shared_output = vec![T::ZERO; x.len()];
            let activations = mlp.forward(&mut shared_output, x);
            for (o, s) in output.iter_mut().zip(shared_output) {
                *o += s;
            }
            activations
        })
    }

    /// The sequence-level balance loss of `routing` (zero when its
    /// coefficient is), over `sequences` all here.
    pub(crate) fn aux_loss(&self, routing: &Routing<T>, sequences: &Sequences) -> T {
        if self.config.aux_loss_alpha > 0.0 {
            balance::sequence_balance_loss(routing, sequences, self.config.aux_loss_alpha)
        } else {
            T::ZERO
        }
    }

    /// [`Self::aux_loss`] when `routing` covers `sequences` (slices of
    /// them, split over `sequence`'s ranks, or whole). Split, every rank of
    /// the group sums its slices' routing statistics with the others' (one
    /// all-reduce of `2 · n_experts + 1` values per sequence: every rank of the
    /// group must call it at the same point) and gets the whole sequences'
    /// loss, plus what its backward pass needs. One process pays nothing.
    pub(crate) fn aux_loss_in(
        &self,
        routing: &Routing<T>,
        sequences: &Sequences,
        sequence: Option<&SequenceParallel>,
    ) -> (T, Option<SlicedBalanceLoss>) {
        let alpha = self.config.aux_loss_alpha;
        match sequence {
            Some(sp) if alpha > 0.0 && sp.size() > 1 => {
                let mut sums = SequenceRoutingSums::of(routing, sequences);
                sp.sum_over_group(sums.values_mut());
                let sliced = SlicedBalanceLoss::new(&sums, sp.size(), alpha);
                (T::from_f64(sliced.loss), Some(sliced))
            }
            _ => (self.aux_loss(routing, sequences), None),
        }
    }

    /// Runs the layer on `x: [tokens, hidden]`, made of whole sequences of
    /// `seq_len` tokens (the unit the balance loss is computed over), every
    /// GEMM in f32.
    pub fn forward(&self, x: &[T], seq_len: usize) -> MoeForward<T> {
        self.forward_with(Linears::FP32, x, seq_len)
    }

    /// [`Self::forward`] with the experts' GEMMs computed as `linears` say
    /// (see [`Self::linear_count`]); the router's is always f32.
    pub fn forward_with(&self, linears: Linears<'_>, x: &[T], seq_len: usize) -> MoeForward<T> {
        let sequences = Sequences::whole(x.len() / self.config.hidden, seq_len);
        self.forward_in(linears, x, &sequences, None)
    }

    /// [`Self::forward_with`] on `sequences` (padding left out of the
    /// loads and the balance loss), which, with `sequence`, are this
    /// rank's slices: the balance loss is then the whole sequences'
    /// ([`Self::aux_loss_in`]).
    pub fn forward_in(
        &self,
        linears: Linears<'_>,
        x: &[T],
        sequences: &Sequences,
        sequence: Option<&SequenceParallel>,
    ) -> MoeForward<T> {
        let (config, hidden) = (&self.config, self.config.hidden);
        assert!(
            self.params.holds_all(config),
            "a layer holding only experts {:?} runs expert-parallel (moe::expert_parallel)",
            self.params.experts
        );
        assert_eq!(x.len() % hidden, 0, "MoE input is not [tokens, hidden]");
        let tokens = x.len() / hidden;
        assert_eq!(
            tokens,
            sequences.tokens(),
            "MoE input is not whole sequences of seq_len tokens"
        );

        let n_experts = config.n_routed_experts;
        let mut logits = vec![T::ZERO; tokens * n_experts];
        matmul::forward(&mut logits, x, &self.params.router, hidden, n_experts);
        let routing = routing::route(config, &logits, &self.selection_bias);
        let dispatch = Dispatch::new(&routing.experts, config.top_k, n_experts);

        // The experts run side by side across the pool with `--threads`;
        // their gated outputs are added in expert order, the same bits.
        let routed: Vec<ExpertPass<T>> = ops::pool_map((0..n_experts).collect(), |_, e| {
            self.routed_expert_forward(self.expert(linears, e), e, x, &dispatch)
        });
        let mut output = vec![T::ZERO; x.len()];
        let rows = routed.iter().enumerate().flat_map(|(e, pass)| {
            let slots = dispatch.slots(e).iter().copied();
            slots.zip(pass.output.chunks_exact(hidden))
        });
        dispatch.add_rows(&mut output, rows, Some(&routing.gates));
        let shared = self.shared_forward(linears, x, &mut output);
        let (aux_loss, sliced_balance) = self.aux_loss_in(&routing, sequences, sequence);
        MoeForward {
            output,
            routing,
            dispatch,
            aux_loss,
            sequences: sequences.clone(),
            sliced_balance,
            routed,
            shared,
        }
    }

    /// Gathers expert `e`'s tokens and runs the expert on them as one
    /// batch (the caller adds the gated rows into the layer's output).
    fn routed_expert_forward(
        &self,
        expert: SwiGluMlp<'_, T>,
        e: usize,
        x: &[T],
        dispatch: &Dispatch,
    ) -> ExpertPass<T> {
        let hidden = self.config.hidden;
        let input = dispatch.gather_rows(x, dispatch.slots(e).iter().copied(), hidden);
        let mut expert_output = vec![T::ZERO; input.len()];
        let activations = expert.forward(&mut expert_output, &input);
        ExpertPass {
            input,
            activations,
            output: expert_output,
        }
    }

    /// Adds d loss / d x into `dx` and the weight gradients into `grads`, given
    /// `dout` = d loss / d output, for `loss = downstream(output) + aux_loss`.
    ///
    /// Gradients reach the router only through the gate values (and the
    /// balance loss); the top-k choice itself is piecewise constant.
    pub fn backward(
        &self,
        pass: &MoeForward<T>,
        x: &[T],
        dout: &[T],
        dx: &mut [T],
        grads: &mut MoeParams<T>,
    ) {
        self.backward_with(Linears::FP32, pass, x, dout, dx, grads);
    }

    /// [`Self::backward`] for a pass of [`Self::forward_with`] with the same `linears`.
    pub fn backward_with(
        &self,
        linears: Linears<'_>,
        pass: &MoeForward<T>,
        x: &[T],
        dout: &[T],
        dx: &mut [T],
        grads: &mut MoeParams<T>,
    ) {
        let config = &self.config;
        assert!(
            dout.len() == x.len() && dx.len() == x.len(),
            "MoE gradient shapes"
        );
        assert!(
            grads.holds_all(config),
            "the gradients of a single-rank pass hold every expert"
        );
        // The experts side by side, as in the forward pass: each writes its
        // own weight gradients; their input gradients are added into `dx`
        // in expert order, and each gate's gradient belongs to one expert.
        let hidden = config.hidden;
        let expert_grads = grads.routed_expert_grads(config);
        let routed = ops::pool_map(expert_grads, |e, expert_grads| {
            self.routed_expert_backward(self.expert(linears, e), e, pass, dout, expert_grads)
        });
        let dispatch = &pass.dispatch;
        let mut dgates = vec![T::ZERO; pass.routing.gates.len()];
        for (e, (expert_dgates, _)) in routed.iter().enumerate() {
            for (&slot, &dgate) in dispatch.slots(e).iter().zip(expert_dgates) {
                dgates[slot] = dgate;
            }
        }
        let rows = routed.iter().enumerate().flat_map(|(e, (_, dinput))| {
            let slots = dispatch.slots(e).iter().copied();
            slots.zip(dinput.chunks_exact(hidden))
        });
        dispatch.add_rows(dx, rows, None);
        if let (Some(mlp), Some(activations)) = (self.shared(linears), &pass.shared) {
            mlp.backward(dx, grads.shared_grads(), dout, x, activations);
        }
        self.router_backward(
            &pass.routing,
            &pass.sequences,
            pass.sliced_balance.as_ref(),
            x,
            &dgates,
            dx,
            &mut grads.router,
        );
    }

    /// Backward of [`Self::routed_expert_forward`]: adds expert `e`'s weight
    /// gradients into `grads`; returns d loss / d gate of each of its slots
    /// (`dout_row . expert_output_row`) and the gradient of its gathered
    /// input rows, for the caller to scatter.
    fn routed_expert_backward(
        &self,
        expert_mlp: SwiGluMlp<'_, T>,
        e: usize,
        pass: &MoeForward<T>,
        dout: &[T],
        grads: SwiGluGrads<'_, T>,
    ) -> (Vec<T>, Vec<T>) {
        let hidden = self.config.hidden;
        let (expert, slots) = (&pass.routed[e], pass.dispatch.slots(e));
        let mut dexpert_output = vec![T::ZERO; expert.output.len()];
        let rows = slots
            .iter()
            .zip(expert.output.chunks_exact(hidden))
            .zip(dexpert_output.chunks_exact_mut(hidden))
            .map(|((&slot, y), dy)| (slot, y, dy));
        let dgates = pass.dispatch.gate_backward(rows, dout, &pass.routing.gates);
        let mut dinput = vec![T::ZERO; expert.input.len()];
        expert_mlp.backward(
            &mut dinput,
            grads,
            &dexpert_output,
            &expert.input,
            &expert.activations,
        );
        (dgates, dinput)
    }

    /// From d loss / d gates (plus the balance loss) back to the scores, the
    /// logits, and finally the router weights and the input. The balance
    /// loss's gradient comes from `sliced_balance` when the pass held
    /// slices of the sequences, else from `routing` itself.
    #[allow(clippy::too_many_arguments)] // the pass's routing parts, then the gradients
    pub(crate) fn router_backward(
        &self,
        routing: &Routing<T>,
        sequences: &Sequences,
        sliced_balance: Option<&SlicedBalanceLoss>,
        x: &[T],
        dgates: &[T],
        dx: &mut [T],
        drouter: &mut [T],
    ) {
        let config = &self.config;
        let (n_experts, k) = (config.n_routed_experts, config.top_k);
        let mut dscores = vec![T::ZERO; routing.scores.len()];
        let per_token = dscores
            .chunks_exact_mut(n_experts)
            .zip(routing.scores.chunks_exact(n_experts))
            .zip(dgates.chunks_exact(k).zip(routing.experts.chunks_exact(k)));
        for ((dscores_row, scores_row), (dgates_row, experts_row)) in per_token {
            routing::gates_backward(config, dscores_row, dgates_row, scores_row, experts_row);
        }
        match sliced_balance {
            Some(sliced) => sliced.add_score_gradient(&mut dscores, routing, sequences),
            None if config.aux_loss_alpha > 0.0 => balance::sequence_balance_loss_backward(
                &mut dscores,
                routing,
                sequences,
                config.aux_loss_alpha,
            ),
            None => {}
        }
        let mut dlogits = vec![T::ZERO; dscores.len()];
        routing::scores_backward(
            config.score_function,
            &mut dlogits,
            &dscores,
            &routing.scores,
            n_experts,
        );
        matmul::backward(
            dx,
            drouter,
            &dlogits,
            x,
            &self.params.router,
            config.hidden,
            n_experts,
        );
    }

    /// The auxiliary-loss-free balancing step, run once per training step with
    /// the step's [`MoeForward::expert_load`]: see [`balance::update_selection_bias`].
    pub fn update_selection_bias(&mut self, load: &[usize], rate: T) {
        balance::update_selection_bias(&mut self.selection_bias, load, rate);
    }
}
