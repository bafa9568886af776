//! The MoE feed-forward layer's forward pass on the device; CPU reference:
//! [`crate::moe::layer::MoeLayer::forward`]. Router GEMM → fused routing
//! kernel → dispatch (counting sort) → permute → each expert's SwiGLU MLP on
//! its contiguous segment of rows (cuBLASLt, TF32 or bf16) → unpermute with the gates
//! → plus the shared experts. Dropless: every routed row is computed.

use super::matmul::{self, Arithmetic, Derived, Prepared, WeightCache};
use super::{Gpu, Result, dispatch, expert_grouped, routing, swiglu, vector};
use crate::dist::sequence_parallel::SequenceParallel;
use crate::moe::Sequences;
use crate::moe::balance::{self, SequenceRoutingSums, SlicedBalanceLoss};
use crate::moe::config::MoeConfig;
use crate::moe::expert::{MLP_LINEARS, W1, W2, W3};
use crate::moe::layer::MoeLayer;
use crate::moe::routing::{Routing, scores_backward};
use moe_kernels::cudarc::driver::CudaSlice;
use std::ops::Range;
use std::rc::Rc;

/// A layer's weights and selection bias on the device.
pub struct DeviceMoeLayer {
    pub config: MoeConfig,
    /// The routed experts held (global indices): all of them, or an
    /// expert-parallel rank's share ([`super::moe_ep`]).
    pub experts: Range<usize>,
    router: CudaSlice<f32>,
    w1: CudaSlice<f32>,
    w3: CudaSlice<f32>,
    w2: CudaSlice<f32>,
    shared_w1: CudaSlice<f32>,
    shared_w3: CudaSlice<f32>,
    shared_w2: CudaSlice<f32>,
    selection_bias: CudaSlice<f32>,
    /// The expert weights as the step's GEMMs read them (bf16 or FP8),
    /// cleared whenever the weights can change (`&mut self`).
    derived: WeightCache,
}

/// The forward pass's output and what a backward pass will need.
pub struct DeviceMoeForward {
    /// `[tokens, hidden]`.
    pub output: CudaSlice<f32>,
    /// The rows routed and sorted by expert (`routed.load`: rows per expert).
    pub(crate) routed: Routed,
    /// The routed experts' activations and outputs, expert-major.
    pub(crate) mlps: ExpertMlps,
    /// The shared experts' activations (a, b, h), when there are any.
    pub shared: Option<[CudaSlice<f32>; 3]>,
    /// The sequence-wise balance loss (0 without `aux_loss_alpha`), and
    /// the routing it was computed from, on the host (see [`BalanceLoss`]).
    pub aux_loss: f64,
    balance: Option<BalanceLoss>,
    /// Real tokens routed to each expert ([`Routed::real_load`]).
    load: Vec<usize>,
}

impl DeviceMoeForward {
    /// Real tokens routed to each expert (padding is computed, not counted).
    pub fn expert_load(&self) -> &[usize] {
        &self.load
    }
}

/// The sequence-wise balance loss of one pass, computed on the host by
/// the CPU layer's own functions ([`balance::sequence_balance_loss`] and
/// its backward): its inputs are small (a score per token and expert, the
/// chosen experts), its arithmetic a few operations per score, so one read
/// back per layer and pass costs less than a kernel of our own would save,
/// and the values are the CPU's for the same scores.
pub(crate) struct BalanceLoss {
    routing: Routing<f32>,
    sequences: Sequences,
    /// With sequence parallelism: the loss of the whole sequences, their
    /// statistics summed over the group, as the CPU layer takes it.
    sliced: Option<SlicedBalanceLoss>,
}

impl BalanceLoss {
    /// The loss of `routing` (this rank's tokens, laid out as `sequences`:
    /// slices of them under `sequence`).
    pub(crate) fn of(
        gpu: &Gpu,
        c: &MoeConfig,
        routing: &routing::DeviceRouting,
        sequences: &Sequences,
        sequence: Option<&SequenceParallel>,
    ) -> Result<Self> {
        let experts = gpu.download(&routing.experts)?;
        let routing = Routing {
            n_experts: routing.n_experts,
            top_k: routing.top_k,
            scores: gpu.download(&routing.scores)?,
            experts: experts.iter().map(|&e| e as usize).collect(),
            gates: gpu.download(&routing.gates)?,
        };
        let sliced = match sequence {
            Some(sp) if sp.size() > 1 => {
                let mut sums = SequenceRoutingSums::of(&routing, sequences);
                sp.sum_over_group(sums.values_mut());
                Some(SlicedBalanceLoss::new(&sums, sp.size(), c.aux_loss_alpha))
            }
            _ => None,
        };
        Ok(Self {
            routing,
            sequences: sequences.clone(),
            sliced,
        })
    }

    pub(crate) fn loss(&self, alpha: f64) -> f64 {
        match &self.sliced {
            Some(sliced) => sliced.loss,
            None => f64::from(balance::sequence_balance_loss(
                &self.routing,
                &self.sequences,
                alpha,
            )),
        }
    }

    /// Adds the loss's gradient with respect to the router logits into
    /// `dlogits` (the scores' gradient, then through the score function).
    fn add_gradient(&self, gpu: &Gpu, c: &MoeConfig, dlogits: &mut CudaSlice<f32>) -> Result<()> {
        let r = &self.routing;
        let mut dscores = vec![0.0f32; r.scores.len()];
        match &self.sliced {
            Some(sliced) => sliced.add_score_gradient(&mut dscores, r, &self.sequences),
            None => balance::sequence_balance_loss_backward(
                &mut dscores,
                r,
                &self.sequences,
                c.aux_loss_alpha,
            ),
        }
        let mut from_balance = vec![0.0f32; r.scores.len()];
        scores_backward(
            c.score_function,
            &mut from_balance,
            &dscores,
            &r.scores,
            r.n_experts,
        );
        vector::add(gpu, dlogits, &gpu.upload(&from_balance)?)
    }
}

/// Gradients of a layer's weights, laid out as [`crate::moe::params::MoeParams`].
pub struct DeviceMoeGrads {
    pub router: CudaSlice<f32>,
    pub w1: CudaSlice<f32>,
    pub w3: CudaSlice<f32>,
    pub w2: CudaSlice<f32>,
    pub shared_w1: CudaSlice<f32>,
    pub shared_w3: CudaSlice<f32>,
    pub shared_w2: CudaSlice<f32>,
}

impl DeviceMoeGrads {
    pub fn zeros(gpu: &Gpu, layer: &DeviceMoeLayer) -> Result<Self> {
        Ok(Self {
            router: gpu.zeros(layer.router.len())?,
            w1: gpu.zeros(layer.w1.len())?,
            w3: gpu.zeros(layer.w3.len())?,
            w2: gpu.zeros(layer.w2.len())?,
            shared_w1: gpu.zeros(layer.shared_w1.len())?,
            shared_w3: gpu.zeros(layer.shared_w3.len())?,
            shared_w2: gpu.zeros(layer.shared_w2.len())?,
        })
    }
}

impl DeviceMoeLayer {
    pub fn upload(gpu: &Gpu, layer: &MoeLayer<f32>) -> Result<Self> {
        let p = &layer.params;
        Ok(Self {
            config: layer.config().clone(),
            experts: p.experts.clone(),
            router: gpu.upload(&p.router)?,
            w1: gpu.upload(&p.experts_w1)?,
            w3: gpu.upload(&p.experts_w3)?,
            w2: gpu.upload(&p.experts_w2)?,
            shared_w1: gpu.upload(&p.shared_w1)?,
            shared_w3: gpu.upload(&p.shared_w3)?,
            shared_w2: gpu.upload(&p.shared_w2)?,
            selection_bias: gpu.upload(&layer.selection_bias)?,
            derived: WeightCache::default(),
        })
    }

    /// Runs the layer on `x: [tokens, hidden]` (hidden a multiple of 4: rows
    /// are permuted as 16-byte vectors), laid out as `sequences` (the unit
    /// of the sequence-wise balance loss; with `sequence`, this rank's
    /// slices of them; padding left out of it and of the loads). The
    /// experts' GEMMs multiply in `arithmetic`; the router's is always exact f32.
    pub fn forward(
        &self,
        gpu: &Gpu,
        arithmetic: Arithmetic,
        x: &CudaSlice<f32>,
        sequences: &Sequences,
        sequence: Option<&SequenceParallel>,
    ) -> Result<DeviceMoeForward> {
        let c = &self.config;
        assert!(
            self.experts == (0..c.n_routed_experts),
            "a layer holding experts {:?} runs expert-parallel only",
            self.experts
        );
        let RoutedExperts {
            mut output,
            routed,
            mlps,
        } = routed_experts(gpu, arithmetic, c, &self.weights(), x)?;
        // output += shared(x), accumulated by the GEMM itself.
        let shared = gpu.span("fwd.moe.shared", || {
            self.shared_forward(gpu, arithmetic, x, &mut output)
        })?;
        let balance = if c.aux_loss_alpha > 0.0 {
            Some(gpu.span("fwd.moe.balance", || {
                BalanceLoss::of(gpu, c, &routed.routing, sequences, sequence)
            })?)
        } else {
            None
        };
        let load = routed.real_load(gpu, sequences)?;
        Ok(DeviceMoeForward {
            output,
            routed,
            mlps,
            shared,
            aux_loss: balance.as_ref().map_or(0.0, |b| b.loss(c.aux_loss_alpha)),
            balance,
            load,
        })
    }
}

/// A MoE layer's routed-expert weights on the device, as
/// [`crate::moe::params::MoeParams`] holds them.
pub(crate) struct RoutedWeights<'a> {
    pub router: &'a CudaSlice<f32>,
    pub selection_bias: &'a CudaSlice<f32>,
    /// `[experts, width, hidden]` (w1, w3) and `[experts, hidden, width]` (w2).
    pub w1: &'a CudaSlice<f32>,
    pub w3: &'a CudaSlice<f32>,
    pub w2: &'a CudaSlice<f32>,
    /// The layer's cache of what GEMMs derive from these weights, if kept.
    pub derived: Option<&'a WeightCache>,
}

impl RoutedWeights<'_> {
    /// `w` (one of these weights) as GEMMs in `arithmetic` read it: from
    /// the layer's cache when it keeps one, else made here.
    pub(crate) fn derived(
        &self,
        gpu: &Gpu,
        arithmetic: Arithmetic<'_>,
        w: &CudaSlice<f32>,
    ) -> Result<Rc<Derived>> {
        match self.derived {
            Some(cache) => cache.get(gpu, arithmetic, w),
            None => Ok(Rc::new(Derived::of(gpu, arithmetic, w)?)),
        }
    }
}

/// The routed experts' pass over `x`, and what a backward pass needs.
pub(crate) struct RoutedExperts {
    /// `[tokens, hidden]`: each token's gated sum of its experts' outputs.
    pub output: CudaSlice<f32>,
    pub(crate) routed: Routed,
    pub(crate) mlps: ExpertMlps,
}

/// Router (exact f32, as the CPU: a TF32 logit could flip a near-tie in
/// top-k) → routing → dispatch → permute → each expert's SwiGLU MLP on its
/// contiguous rows (cuBLASLt) → unpermute with the gates: the training
/// layer's forward and the serving engine's, which add their shared experts
/// after it.
pub(crate) fn routed_experts(
    gpu: &Gpu,
    arithmetic: Arithmetic,
    c: &MoeConfig,
    weights: &RoutedWeights<'_>,
    x: &CudaSlice<f32>,
) -> Result<RoutedExperts> {
    let hidden = c.hidden;
    let tokens = x.len() / hidden;
    let routed = route_rows(gpu, c, weights, x)?;
    let segments = expert_segments(&routed.offsets);
    let mlps = expert_mlps(gpu, arithmetic, c, weights, &routed.permuted, &segments)?;
    let mut output = gpu.output::<f32>(tokens * hidden)?;
    gpu.span("fwd.moe.combine", || {
        dispatch::unpermute(
            gpu,
            &mut output,
            &mlps.out,
            &routed.routing.gates,
            &routed.dispatch,
            hidden,
        )
    })?;
    Ok(RoutedExperts {
        output,
        routed,
        mlps,
    })
}

/// A layer's rows routed and sorted by expert.
pub(crate) struct Routed {
    pub routing: routing::DeviceRouting,
    pub dispatch: dispatch::DeviceDispatch,
    /// `[experts + 1]`: expert `e`'s rows are `offsets[e]..offsets[e + 1]`.
    pub offsets: Vec<i32>,
    /// Rows per expert (read back once per pass to size the GEMMs).
    pub load: Vec<usize>,
    /// `[tokens * top_k, hidden]`, expert-major.
    pub permuted: CudaSlice<f32>,
}

impl Routed {
    /// Real tokens routed to each expert: [`Self::load`] unless `sequences`
    /// have padding, which every row's count includes; then counted on the
    /// host from the choices (`[tokens, top_k]` indices, read back once).
    pub fn real_load(&self, gpu: &Gpu, sequences: &Sequences) -> Result<Vec<usize>> {
        if !sequences.is_padded() {
            return Ok(self.load.clone());
        }
        let experts: Vec<usize> = gpu
            .download(&self.routing.experts)?
            .into_iter()
            .map(|e| e as usize)
            .collect();
        let (top_k, n_experts) = (self.routing.top_k, self.routing.n_experts);
        Ok(sequences.real_load(&experts, top_k, n_experts))
    }
}

/// Router (exact f32) → routing → dispatch → permute, for `x: [tokens,
/// hidden]` with at least one token.
pub(crate) fn route_rows(
    gpu: &Gpu,
    c: &MoeConfig,
    weights: &RoutedWeights<'_>,
    x: &CudaSlice<f32>,
) -> Result<Routed> {
    let (hidden, n_experts, top_k) = (c.hidden, c.n_routed_experts, c.top_k);
    let tokens = x.len() / hidden;
    let route_span = gpu.span_start("fwd.moe.route")?;
    let mut logits = gpu.output::<f32>(tokens * n_experts)?;
    matmul::forward_exact(gpu, &mut logits, x, weights.router, hidden, n_experts)?;
    let routing = routing::route(gpu, c, &logits, weights.selection_bias)?;
    let dispatch = dispatch::dispatch(gpu, &routing.experts, top_k, n_experts)?;
    let offsets: Vec<i32> = gpu.download(&dispatch.offsets)?;
    let load: Vec<usize> = offsets.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
    gpu.span_end(route_span)?;
    // Every row is one slot's: the permute writes them all.
    let mut permuted = gpu.output::<f32>(tokens * top_k * hidden)?;
    gpu.span("fwd.moe.permute", || {
        dispatch::permute(gpu, &mut permuted, x, &dispatch, hidden)
    })?;
    Ok(Routed {
        routing,
        dispatch,
        offsets,
        load,
        permuted,
    })
}

/// The SwiGLU activations and outputs of [`expert_mlps`], `[rows, ...]`.
pub(crate) struct ExpertMlps {
    pub a: CudaSlice<f32>,
    pub b: CudaSlice<f32>,
    pub h: CudaSlice<f32>,
    pub out: CudaSlice<f32>,
}

/// Each expert's SwiGLU MLP on its contiguous rows of `permuted: [rows,
/// hidden]`: `segments` lists `(expert, first row, rows)`, the expert
/// indexing the stacked weights (a global expert for a layer holding all
/// of them, a local one for an expert-parallel rank's share). Rows outside
/// every segment are left zero. One cuBLASLt GEMM per segment and
/// projection (in `arithmetic`), so each expert's rows share one weight read;
/// in bf16, where cuBLASLt runs grouped GEMMs, one call per projection for
/// all of them ([`expert_grouped`]).
pub(crate) fn expert_mlps(
    gpu: &Gpu,
    arithmetic: Arithmetic,
    c: &MoeConfig,
    weights: &RoutedWeights<'_>,
    permuted: &CudaSlice<f32>,
    segments: &[(usize, usize, usize)],
) -> Result<ExpertMlps> {
    let grouped = expert_grouped::usable(gpu, arithmetic, c);
    let (hidden, inner) = (c.hidden, c.expert_hidden);
    let rows = permuted.len() / hidden;
    let rows_of = segment_rows(gpu, rows, segments);
    let mut a = rows_of(inner)?;
    let mut b = rows_of(inner)?;
    // SwiGLU writes every element (zero where `a` and `b` are).
    let mut h = gpu.output::<f32>(rows * inner)?;
    let mut expert_out = rows_of(hidden)?;
    let size = inner * hidden;
    // The weights as the GEMMs read them (made once a step: WeightCache).
    let derive = |w| weights.derived(gpu, arithmetic, w);
    let (w1, w3, w2) = (
        derive(weights.w1)?,
        derive(weights.w3)?,
        derive(weights.w2)?,
    );
    // Each expert's rows feed its gate and up projections: rounded once.
    let gate_up_span = gpu.span_start("fwd.moe.gate_up")?;
    let x = Prepared::of(gpu, arithmetic, permuted)?;
    let fan_rows = lane_rows(arithmetic, rows);
    if let Some(lt) = grouped {
        expert_grouped::gate_up(gpu, lt, c, segments, &x, [&w1, &w3], [&mut a, &mut b])?;
    } else {
        gpu.fan_out(fan_rows, |fan| {
            for (i, &(e, start, len)) in segments.iter().enumerate() {
                fan.on(i, || {
                    for (out, w, derived, linear) in
                        [(&mut a, weights.w1, &w1, W1), (&mut b, weights.w3, &w3, W3)]
                    {
                        matmul::forward_view(
                            gpu,
                            arithmetic.at(MLP_LINEARS * e + linear),
                            &mut out.slice_mut(start * inner..(start + len) * inner),
                            x.input(start * hidden..(start + len) * hidden),
                            derived.input(w, e * size..(e + 1) * size),
                            hidden,
                            inner,
                            false,
                        )?;
                    }
                    Ok(())
                })?;
            }
            Ok(())
        })?;
    }
    drop(x);
    gpu.span_end(gate_up_span)?;
    gpu.span("fwd.moe.swiglu", || swiglu::forward(gpu, &mut h, &a, &b))?;
    let down_span = gpu.span_start("fwd.moe.down")?;
    let h_in = Prepared::of(gpu, arithmetic, &h)?;
    if let Some(lt) = grouped {
        expert_grouped::down(gpu, lt, c, segments, &h_in, &w2, &mut expert_out)?;
    } else {
        gpu.fan_out(fan_rows, |fan| {
            for (i, &(e, start, len)) in segments.iter().enumerate() {
                fan.on(i, || {
                    matmul::forward_view(
                        gpu,
                        arithmetic.at(MLP_LINEARS * e + W2),
                        &mut expert_out.slice_mut(start * hidden..(start + len) * hidden),
                        h_in.input(start * inner..(start + len) * inner),
                        w2.input(weights.w2, e * size..(e + 1) * size),
                        inner,
                        hidden,
                        false,
                    )
                })?;
            }
            Ok(())
        })?;
    }
    drop(h_in);
    gpu.span_end(down_span)?;
    Ok(ExpertMlps {
        a,
        b,
        h,
        out: expert_out,
    })
}

/// A `[rows, width]` buffer whose segments' rows GEMMs overwrite: zeroed
/// only when some row lies outside every segment (an expert-parallel
/// rank's rows of experts it does not hold), as those must read as zeros.
/// A layer holding all experts has every row in a segment, and skips the
/// memset (the permuted rows alone are `tokens · top_k · hidden` floats).
pub(crate) fn segment_rows<'a>(
    gpu: &'a Gpu,
    rows: usize,
    segments: &[(usize, usize, usize)],
) -> impl Fn(usize) -> Result<CudaSlice<f32>> + 'a {
    let covered = segments.iter().map(|&(_, _, len)| len).sum::<usize>() == rows;
    move |width| {
        if covered {
            gpu.output::<f32>(rows * width)
        } else {
            gpu.zeros::<f32>(rows * width)
        }
    }
}

/// The rows a per-expert GEMM loop spreads over the expert lanes
/// ([`super::lanes`]): its rows in TF32 and bf16, whose GEMMs read operands
/// prepared before the loop; none in FP8, whose GEMMs quantise on the main
/// stream as they go.
fn lane_rows(arithmetic: Arithmetic, rows: usize) -> usize {
    match arithmetic {
        Arithmetic::Tf32 | Arithmetic::Bf16 => rows,
        Arithmetic::Fp8 | Arithmetic::Fp8Delayed(..) => 0,
    }
}

/// `(expert, first row, rows)` of every expert with rows, from the
/// dispatch's `[experts + 1]` offsets.
pub(crate) fn expert_segments(offsets: &[i32]) -> Vec<(usize, usize, usize)> {
    offsets
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] > w[0])
        .map(|(e, w)| (e, w[0] as usize, (w[1] - w[0]) as usize))
        .collect()
}

impl DeviceMoeLayer {
    /// The shared experts' first linear layer in the layer's numbering
    /// (`w1, w3, w2` of each routed expert, then the shared experts'), as
    /// [`MoeLayer::linear_count`] counts them.
    pub(crate) fn shared_linears(&self) -> usize {
        MLP_LINEARS * self.config.n_routed_experts
    }

    /// `arithmetic` (the layer's) for this layer's share of the routed
    /// experts, whose local expert `e` is the layer's `experts.start + e`.
    pub(crate) fn routed<'a>(&self, arithmetic: Arithmetic<'a>) -> Arithmetic<'a> {
        arithmetic.at(MLP_LINEARS * self.experts.start)
    }

    /// The routed experts' weights (this layer's share of them).
    pub(crate) fn weights(&self) -> RoutedWeights<'_> {
        RoutedWeights {
            router: &self.router,
            selection_bias: &self.selection_bias,
            w1: &self.w1,
            w3: &self.w3,
            w2: &self.w2,
            derived: Some(&self.derived),
        }
    }

    /// The shared experts on `x`, their output added into `output` (by the
    /// down projection's GEMM); their activations, when there are any.
    pub(crate) fn shared_forward(
        &self,
        gpu: &Gpu,
        arithmetic: Arithmetic,
        x: &CudaSlice<f32>,
        output: &mut CudaSlice<f32>,
    ) -> Result<Option<[CudaSlice<f32>; 3]>> {
        let (hidden, width) = (self.config.hidden, self.config.shared_hidden());
        if width == 0 {
            return Ok(None);
        }
        let tokens = x.len() / hidden;
        // Each written whole by its GEMM or SwiGLU.
        let mut sa = gpu.output::<f32>(tokens * width)?;
        let mut sb = gpu.output::<f32>(tokens * width)?;
        let mut sh = gpu.output::<f32>(tokens * width)?;
        let x = Prepared::of(gpu, arithmetic, x)?;
        let at = |i| arithmetic.at(self.shared_linears() + i);
        let derive = |w| self.derived.get(gpu, arithmetic, w);
        for (out, w, linear) in [
            (&mut sa, &self.shared_w1, W1),
            (&mut sb, &self.shared_w3, W3),
        ] {
            let w_derived = derive(w)?;
            matmul::forward_view(
                gpu,
                at(linear),
                &mut out.slice_mut(..),
                x.whole(),
                w_derived.whole(w),
                hidden,
                width,
                false,
            )?;
        }
        swiglu::forward(gpu, &mut sh, &sa, &sb)?;
        let w2 = derive(&self.shared_w2)?;
        matmul::forward_view(
            gpu,
            at(W2),
            &mut output.slice_mut(..),
            &sh.slice(..),
            w2.whole(&self.shared_w2),
            width,
            hidden,
            true,
        )?;
        Ok(Some([sa, sb, sh]))
    }

    /// As [`MoeLayer::backward`]: adds d loss / d x into `dx` and the weight
    /// gradients into `grads`, given `dout` = d loss / d output, for
    /// `loss = downstream(output) + aux_loss`.
    /// The experts' GEMMs in `arithmetic`, as the forward pass; the
    /// router's in TF32 (the CPU's router backward is f32 whatever the
    /// linear layers' precision).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        gpu: &Gpu,
        arithmetic: Arithmetic,
        pass: &DeviceMoeForward,
        x: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut DeviceMoeGrads,
    ) -> Result<()> {
        let c = &self.config;
        let hidden = c.hidden;
        let (routed, mlps) = (&pass.routed, &pass.mlps);
        let (dy, dgates) = gpu.span("bwd.moe.combine", || {
            combine_backward(gpu, routed, dout, &mlps.out, hidden)
        })?;
        let segments = expert_segments(&routed.offsets);
        let dxp = expert_mlps_backward(
            gpu,
            arithmetic,
            c,
            &self.weights(),
            grads,
            &dy,
            &routed.permuted,
            mlps,
            &segments,
        )?;
        gpu.span("bwd.moe.permute", || {
            dispatch::permute_backward(gpu, dx, &dxp, &routed.dispatch, hidden)
        })?;
        if let Some(shared) = &pass.shared {
            gpu.span("bwd.moe.shared", || {
                self.shared_backward(gpu, arithmetic, shared, x, dout, dx, grads)
            })?;
        }
        gpu.span("bwd.moe.router", || {
            self.router_backward(
                gpu,
                &routed.routing,
                pass.balance.as_ref(),
                &dgates,
                x,
                dx,
                grads,
            )
        })
    }

    /// The shared experts' backward pass: adds into `dx` and their weights'
    /// gradients, from their activations `[a, b, h]` on `x`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn shared_backward(
        &self,
        gpu: &Gpu,
        arithmetic: Arithmetic,
        [sa, sb, sh]: &[CudaSlice<f32>; 3],
        x: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut DeviceMoeGrads,
    ) -> Result<()> {
        let (hidden, width) = (self.config.hidden, self.config.shared_hidden());
        let tokens = x.len() / hidden;
        let mut dsh = gpu.output::<f32>(tokens * width)?;
        // Every operand below but the weights and `sh` feeds two GEMMs.
        let (dout, x) = (
            Prepared::of(gpu, arithmetic, dout)?,
            Prepared::of(gpu, arithmetic, x)?,
        );
        let at = |i| arithmetic.at(self.shared_linears() + i);
        let derive = |w| self.derived.get(gpu, arithmetic, w);
        let w2 = derive(&self.shared_w2)?;
        matmul::gemm(
            gpu,
            at(W2),
            &mut dsh.slice_mut(..),
            dout.whole(),
            false,
            w2.whole(&self.shared_w2),
            false,
            (tokens, width, hidden),
            false,
        )?;
        matmul::gemm(
            gpu,
            at(W2),
            &mut grads.shared_w2.slice_mut(..),
            dout.whole(),
            true,
            &sh.slice(..),
            false,
            (hidden, width, tokens),
            true,
        )?;
        let mut dsa = gpu.output::<f32>(tokens * width)?;
        let mut dsb = gpu.output::<f32>(tokens * width)?;
        swiglu::backward(gpu, &mut dsa, &mut dsb, &dsh, sa, sb, false)?;
        for (d, w, g, linear) in [
            (&dsa, &self.shared_w1, &mut grads.shared_w1, W1),
            (&dsb, &self.shared_w3, &mut grads.shared_w3, W3),
        ] {
            let d = Prepared::of(gpu, arithmetic, d)?;
            let w_derived = derive(w)?;
            matmul::gemm(
                gpu,
                at(linear),
                &mut dx.slice_mut(..),
                d.whole(),
                false,
                w_derived.whole(w),
                false,
                (tokens, hidden, width),
                true,
            )?;
            matmul::gemm(
                gpu,
                at(linear),
                &mut g.slice_mut(..),
                d.whole(),
                true,
                x.whole(),
                false,
                (width, hidden, tokens),
                true,
            )?;
        }
        Ok(())
    }

    /// Gates → scores → logits → the router's weights and input: adds into
    /// `dx` and `grads.router`, the balance loss's gradient included. TF32
    /// (the CPU's router backward is f32 whatever the linear layers'
    /// precision).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn router_backward(
        &self,
        gpu: &Gpu,
        routing: &routing::DeviceRouting,
        balance: Option<&BalanceLoss>,
        dgates: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut DeviceMoeGrads,
    ) -> Result<()> {
        let c = &self.config;
        let (hidden, n_experts) = (c.hidden, c.n_routed_experts);
        let tokens = x.len() / hidden;
        // The fused routing backward overwrites every logit's gradient.
        let mut dlogits = gpu.output::<f32>(tokens * n_experts)?;
        routing::backward(gpu, c, &mut dlogits, dgates, routing)?;
        if let Some(balance) = balance {
            balance.add_gradient(gpu, c, &mut dlogits)?;
        }
        let dlogits_v = dlogits.slice(..);
        matmul::gemm(
            gpu,
            Arithmetic::Tf32,
            &mut dx.slice_mut(..),
            &dlogits_v,
            false,
            &self.router.slice(..),
            false,
            (tokens, hidden, n_experts),
            true,
        )?;
        matmul::gemm(
            gpu,
            Arithmetic::Tf32,
            &mut grads.router.slice_mut(..),
            &dlogits_v,
            true,
            &x.slice(..),
            false,
            (n_experts, hidden, tokens),
            true,
        )?;
        Ok(())
    }
}

/// The backward pass of the gated combine (unpermute) of `routed`'s rows:
/// each row's output gradient (`gate · dout` of its token) and each gate's
/// (`dout · y`, with `y` the expert outputs in dispatch order).
pub(crate) fn combine_backward(
    gpu: &Gpu,
    routed: &Routed,
    dout: &CudaSlice<f32>,
    y: &CudaSlice<f32>,
    hidden: usize,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let rows = routed.dispatch.rows();
    let mut dy = gpu.output::<f32>(rows * hidden)?;
    let mut dgates = gpu.output::<f32>(rows)?;
    dispatch::unpermute_backward(
        gpu,
        &mut dy,
        &mut dgates,
        dout,
        y,
        &routed.routing.gates,
        &routed.dispatch,
        hidden,
        false,
    )?;
    Ok((dy, dgates))
}

/// The backward pass of [`expert_mlps`] over the same `segments`: given
/// `dy`, the gradient of its output rows, adds each segment's expert's
/// weight gradients into `grads` (indexed as the weights are) and returns
/// the gradient of its input rows `input` (zero outside every segment).
#[allow(clippy::too_many_arguments)]
pub(crate) fn expert_mlps_backward(
    gpu: &Gpu,
    arithmetic: Arithmetic,
    c: &MoeConfig,
    weights: &RoutedWeights<'_>,
    grads: &mut DeviceMoeGrads,
    dy: &CudaSlice<f32>,
    input: &CudaSlice<f32>,
    mlps: &ExpertMlps,
    segments: &[(usize, usize, usize)],
) -> Result<CudaSlice<f32>> {
    let grouped = expert_grouped::usable(gpu, arithmetic, c);
    let (hidden, inner) = (c.hidden, c.expert_hidden);
    let rows = input.len() / hidden;
    let size = inner * hidden;
    let rows_of = segment_rows(gpu, rows, segments);
    let down_span = gpu.span_start("bwd.moe.down")?;
    // Down projection, segment by segment; `dy` feeds both its GEMMs, as
    // `da`, `db` and `input` feed two each below: each rounded once.
    let mut dh = rows_of(inner)?;
    let dy = Prepared::of(gpu, arithmetic, dy)?;
    // The weights as the GEMMs read them (made once a step: WeightCache).
    let derive = |w| weights.derived(gpu, arithmetic, w);
    let (w1, w3, w2) = (
        derive(weights.w1)?,
        derive(weights.w3)?,
        derive(weights.w2)?,
    );
    // mlps.h feeds the weight gradient of every expert's down projection.
    let h = Prepared::of(gpu, arithmetic, &mlps.h)?;
    let fan_rows = lane_rows(arithmetic, rows);
    if let Some(lt) = grouped {
        expert_grouped::down_backward(gpu, lt, c, segments, &dy, &h, &w2, &mut dh, &mut grads.w2)?;
    } else {
        gpu.fan_out(fan_rows, |fan| {
            for (i, &(e, start, len)) in segments.iter().enumerate() {
                fan.on(i, || {
                    let dy_e = dy.input(start * hidden..(start + len) * hidden);
                    let w2_e = w2.input(weights.w2, e * size..(e + 1) * size);
                    let h_e = h.input(start * inner..(start + len) * inner);
                    let mut dh_e = dh.slice_mut(start * inner..(start + len) * inner);
                    let down = arithmetic.at(MLP_LINEARS * e + W2);
                    matmul::gemm(
                        gpu,
                        down,
                        &mut dh_e,
                        dy_e.clone(),
                        false,
                        w2_e,
                        false,
                        (len, inner, hidden),
                        false,
                    )?;
                    let mut dw2_e = grads.w2.slice_mut(e * size..(e + 1) * size);
                    matmul::gemm(
                        gpu,
                        down,
                        &mut dw2_e,
                        dy_e,
                        true,
                        h_e,
                        false,
                        (hidden, inner, len),
                        true,
                    )
                })?;
            }
            Ok(())
        })?;
    }
    drop(h);
    drop(dy);
    gpu.span_end(down_span)?;
    // SwiGLU, then the up projections.
    let mut da = gpu.output::<f32>(rows * inner)?;
    let mut db = gpu.output::<f32>(rows * inner)?;
    gpu.span("bwd.moe.swiglu", || {
        swiglu::backward(gpu, &mut da, &mut db, &dh, &mlps.a, &mlps.b, false)
    })?;
    let gate_up_span = gpu.span_start("bwd.moe.gate_up")?;
    let mut dinput = rows_of(hidden)?;
    let (x, da, db) = (
        Prepared::of(gpu, arithmetic, input)?,
        Prepared::of(gpu, arithmetic, &da)?,
        Prepared::of(gpu, arithmetic, &db)?,
    );
    if let Some(lt) = grouped {
        let grads = [&mut grads.w1, &mut grads.w3];
        expert_grouped::up_backward(
            gpu,
            lt,
            c,
            segments,
            &x,
            [&da, &db],
            [&w1, &w3],
            &mut dinput,
            grads,
        )?;
    } else {
        gpu.fan_out(fan_rows, |fan| {
            for (lane, &(e, start, len)) in segments.iter().enumerate() {
                fan.on(lane, || {
                    let wide = start * hidden..(start + len) * hidden;
                    let mut dx_e = dinput.slice_mut(wide.clone());
                    for (i, (d, (w, derived), g, linear)) in [
                        (&da, (weights.w1, &w1), &mut grads.w1, W1),
                        (&db, (weights.w3, &w3), &mut grads.w3, W3),
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        let d_e = d.input(start * inner..(start + len) * inner);
                        let up = arithmetic.at(MLP_LINEARS * e + linear);
                        matmul::gemm(
                            gpu,
                            up,
                            &mut dx_e,
                            d_e.clone(),
                            false,
                            derived.input(w, e * size..(e + 1) * size),
                            false,
                            (len, hidden, inner),
                            i > 0,
                        )?;
                        matmul::gemm(
                            gpu,
                            up,
                            &mut g.slice_mut(e * size..(e + 1) * size),
                            d_e,
                            true,
                            x.input(wide.clone()),
                            false,
                            (inner, hidden, len),
                            true,
                        )?;
                    }
                    Ok(())
                })?;
            }
            Ok(())
        })?;
    }
    drop((x, da, db));
    gpu.span_end(gate_up_span)?;
    Ok(dinput)
}

impl DeviceMoeLayer {
    /// Replaces the selection bias (the balancing update runs on the host:
    /// one value per expert, once per step).
    pub fn set_selection_bias(&mut self, gpu: &Gpu, bias: &[f32]) -> Result<()> {
        assert_eq!(
            bias.len(),
            self.selection_bias.len(),
            "selection bias shape"
        );
        Ok(gpu.stream().memcpy_htod(bias, &mut self.selection_bias)?)
    }
}

/// A layer's weights and its gradients (or AdamW moments) share one field
/// layout; both list their tensors in the CPU's canonical order, shared
/// experts only when there are any.
macro_rules! moe_tensors {
    ($type:ty) => {
        impl super::model::DeviceTensors for $type {
            fn tensors(&self) -> Vec<&CudaSlice<f32>> {
                let mut list = vec![&self.router, &self.w1, &self.w3, &self.w2];
                if !self.shared_w1.is_empty() {
                    list.extend([&self.shared_w1, &self.shared_w3, &self.shared_w2]);
                }
                list
            }

            fn tensors_mut(&mut self) -> Vec<&mut CudaSlice<f32>> {
                self.weights_may_change();
                let mut list = vec![&mut self.router, &mut self.w1, &mut self.w3, &mut self.w2];
                if !self.shared_w1.is_empty() {
                    list.extend([
                        &mut self.shared_w1,
                        &mut self.shared_w3,
                        &mut self.shared_w2,
                    ]);
                }
                list
            }
        }
    };
}

moe_tensors!(DeviceMoeLayer);
moe_tensors!(DeviceMoeGrads);

impl DeviceMoeLayer {
    /// Forgets what the GEMMs derived from the weights (they, or the FP8
    /// scales their codes were made with, are about to change).
    pub(crate) fn forget_derived(&mut self) {
        self.derived.clear();
    }

    fn weights_may_change(&mut self) {
        self.forget_derived();
    }
}

impl DeviceMoeGrads {
    /// Nothing is derived from gradients.
    fn weights_may_change(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_skip_experts_without_rows() {
        assert_eq!(
            expert_segments(&[0, 3, 3, 7, 8]),
            [(0, 0, 3), (2, 3, 4), (3, 7, 1)]
        );
        assert!(expert_segments(&[0, 0, 0]).is_empty());
    }
}
