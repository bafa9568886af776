//! Expert-parallel serving: one replica as several processes (ranks), each
//! holding `1/P` of every MoE layer's routed experts and all the rest.
//!
//! ```text
//!  rank 0 (leader)                         ranks 1.. (followers)
//!  HTTP API, scheduler, sampling           /healthz, /readyz (local rank 0 of a pod)
//!  plan ──────── broadcast (Lockstep) ───▶ plan
//!  Engine::step ◀── per MoE layer: all-to-all, all-to-all, all-gather ──▶ Engine::step
//!  logits → tokens → clients               (no logits)
//! ```
//!
//! Every rank connects (the same rendezvous and collectives as training),
//! loads only its experts, then [`join`] checks that all of them loaded the
//! same model and cache (an all-gather of a fingerprint) before the leader
//! takes requests. From then on the ranks run the same steps in lockstep
//! (`serve/lockstep.rs`); any failure ends every rank within the collective
//! timeout (a leader's heartbeat keeps an idle replica's followers waiting
//! no longer than that), never a hang.
//!
//! With `device: cuda` ([`join_serving`], feature `cuda`) each rank runs the
//! GPU engine on its share (`crate::cuda::serve_ep`): the same steps, the
//! same exchanges (its rows staged through host memory), so GPU and CPU
//! ranks agree on every row. A model the GPU engine does not run is served
//! on the CPU with a warning, as for one process.

use std::ops::Range;
use std::time::Duration;

use crate::dist::env::Timeouts;
use crate::dist::expert_parallel::ExpertParallel;
use crate::dist::layout::Layout;
use crate::dist::schedule::fnv1a;
use crate::dist::{Collective, DistError, Solo};
use crate::serve::backend::Backend;
use crate::serve::engine::{Engine, StepError};
use crate::serve::load::{LoadedModel, LoadedWeights};
use crate::serve::lockstep::{Lockstep, Message};
use crate::serve::metrics::Metrics;
use crate::serve::model::{ServeFfn, ServeModel};
use crate::serve::runner::Failure;
use crate::serve::text::Tokenizer;
use crate::serve::{ServeError, ServeOptions};

/// Connects this rank to the rest of its replica (over TCP, also for GPU
/// ranks, which stage their rows through host memory): the world
/// communicator.
pub type Connect = Box<dyn FnOnce() -> Result<Box<dyn Collective>, DistError> + Send>;

/// This process's place in an expert-parallel replica.
pub struct ReplicaSetup {
    /// 0: the leader.
    pub rank: usize,
    /// Ranks in the replica: the expert-parallel size.
    pub size: usize,
    /// The rank within its pod: local rank 0 of a follower's pod answers
    /// the pod's probes on the serving port.
    pub local_rank: usize,
    pub timeouts: Timeouts,
    pub connect: Connect,
}

/// The routed experts rank `rank` of a replica of `size` holds, of `experts`
/// per MoE layer (training's rule: contiguous equal slices), or why none.
pub fn experts_of(rank: usize, size: usize, experts: usize) -> Result<Range<usize>, ServeError> {
    if size == 0 || !experts.is_multiple_of(size) {
        return Err(ServeError::Options(format!(
            "expertParallel {size} does not divide the model's {experts} routed experts per MoE \
             layer: every rank of a replica holds the same number of experts"
        )));
    }
    let layout = Layout::new(size, 1, size).map_err(|e| ServeError::Options(e.to_string()))?;
    Ok(layout.local_experts(rank, experts))
}

/// How often an idle leader sends a heartbeat: a quarter of the collective
/// timeout, so a follower waiting for the next plan never times out while
/// the leader lives, and a rank that died is noticed within this.
pub fn heartbeat(timeouts: &Timeouts) -> Duration {
    timeouts.collective / 4
}

/// A rank of a replica, joined: its engine and its end of the plan broadcast.
pub struct Joined {
    pub engine: Engine,
    pub lockstep: Lockstep,
    pub tokenizer: Tokenizer,
    pub kv_pages: usize,
    pub page_size: usize,
}

/// Bytes of routed-expert weights `model` holds (every MoE layer).
pub fn routed_expert_bytes(model: &ServeModel) -> usize {
    model
        .blocks
        .iter()
        .map(|b| match &b.ffn {
            ServeFfn::Moe { layer, .. } => layer.params.routed_expert_bytes(),
            ServeFfn::Dense(_) => 0,
        })
        .sum()
}

/// Routed experts per MoE layer of `model`; `None` without MoE layers.
fn routed_experts(model: &ServeModel) -> Option<usize> {
    model.blocks.iter().find_map(|b| match &b.ffn {
        ServeFfn::Moe { layer, .. } => Some(layer.config().n_routed_experts),
        ServeFfn::Dense(_) => None,
    })
}

/// What identifies a model across ranks: its shape and options, and a
/// sample of the replicated weights (so two checkpoints of one shape differ).
fn model_fingerprint(model: &ServeModel) -> u64 {
    let mut sample = format!("{:?}", model.config).into_bytes();
    sample.extend_from_slice(bytemuck::cast_slice(&model.final_norm));
    let head = model.embedding.len().min(4096);
    sample.extend_from_slice(bytemuck::cast_slice(&model.embedding[..head]));
    fnv1a(&sample)
}

/// Sets this rank up in its replica: the expert-parallel engine over
/// `world` (a follower's computes no logits), then the fingerprint check,
/// which also waits (up to the rendezvous timeout) for every rank to load.
/// Every rank of `world` must call it, having loaded its own experts. The
/// CPU engine, whatever `options.device` says ([`join_serving`] places it).
pub fn join(
    world: Box<dyn Collective>,
    loaded: LoadedModel,
    options: &ServeOptions,
    timeouts: &Timeouts,
) -> Result<Joined, ServeError> {
    let (engine, lockstep, tokenizer, kv_pages) =
        join_with(world, loaded, options, timeouts, false)?;
    match engine {
        RankEngine::Cpu(engine) => Ok(Joined {
            engine: *engine,
            lockstep,
            tokenizer,
            kv_pages,
            page_size: options.page_size,
        }),
        #[cfg(feature = "cuda")]
        RankEngine::Gpu(_) => Err(ServeError::Options(
            "the CPU engine was asked for, the GPU's was built".into(),
        )),
    }
}

/// A rank of a replica, joined, with the engine it serves on: the GPU's
/// with `device: cuda` where the build and the model allow it, else the
/// CPU's.
pub struct JoinedBackend {
    pub backend: Backend,
    pub lockstep: Lockstep,
    pub tokenizer: Tokenizer,
    pub kv_pages: usize,
}

impl From<Joined> for JoinedBackend {
    fn from(joined: Joined) -> Self {
        Self {
            backend: Backend::cpu(joined.engine, joined.page_size, joined.kv_pages),
            lockstep: joined.lockstep,
            tokenizer: joined.tokenizer,
            kv_pages: joined.kv_pages,
        }
    }
}

/// [`join`], the engine placed as `options.device` asks: with `cuda` (and
/// the `cuda` feature), each rank's share on its GPU (`serve/gpu.rs`,
/// falling back to the CPU engine with a warning for a model the GPU engine
/// does not run). A GPU rank and a CPU rank exchange the same rows, so the
/// replica works either way.
pub fn join_serving(
    world: Box<dyn Collective>,
    loaded: LoadedModel,
    options: &ServeOptions,
    timeouts: &Timeouts,
) -> Result<JoinedBackend, ServeError> {
    let (engine, lockstep, tokenizer, kv_pages) =
        join_with(world, loaded, options, timeouts, true)?;
    let backend = match engine {
        RankEngine::Cpu(engine) => Backend::cpu(*engine, options.page_size, kv_pages),
        #[cfg(feature = "cuda")]
        RankEngine::Gpu(backend) => *backend,
    };
    Ok(JoinedBackend {
        backend,
        lockstep,
        tokenizer,
        kv_pages,
    })
}

/// The engine a rank built.
enum RankEngine {
    Cpu(Box<Engine>),
    /// The GPU engine with its device cache allocated.
    #[cfg(feature = "cuda")]
    Gpu(Box<Backend>),
}

/// [`join`] and [`join_serving`]: `gpu` allows the GPU engine.
fn join_with(
    mut world: Box<dyn Collective>,
    loaded: LoadedModel,
    options: &ServeOptions,
    timeouts: &Timeouts,
    gpu: bool,
) -> Result<(RankEngine, Lockstep, Tokenizer, usize), ServeError> {
    let (rank, size) = (world.rank(), world.size());
    if let Some(expected) = &options.expected_model {
        loaded.check_spec(expected).map_err(ServeError::Load)?;
    }
    let step = loaded.step;
    let tokenizer = loaded.tokenizer;
    let model = match loaded.model {
        LoadedWeights::Native(model) => ServeModel::from_native(*model),
        LoadedWeights::HuggingFace(model) => *model,
    };
    let experts = routed_experts(&model).ok_or_else(|| {
        ServeError::Options(format!(
            "expert-parallel serving over {size} ranks, but the model has no MoE layer to split"
        ))
    })?;
    let everyone: Vec<usize> = (0..size).collect();
    let group = world.new_group(&everyone).map_err(ServeError::Dist)?;
    // One replica: no other rank holds the same experts.
    let ep = ExpertParallel::new(group, Box::new(Solo), experts).map_err(ServeError::Dist)?;
    let own = ep.local_experts();
    let fingerprint = model_fingerprint(&model);
    let expert_bytes = routed_expert_bytes(&model);
    let (engine, kv_pages, adapters) = build_engine(model, ep, options, rank, gpu)?;
    // What every rank must agree on (the fields of `check_same`).
    let mine = [
        fingerprint,
        step,
        kv_pages as u64,
        options.page_size as u64,
        adapters,
    ];
    check_same(world.as_mut(), &mine, timeouts)?;
    let device = match &engine {
        RankEngine::Cpu(_) => "cpu",
        #[cfg(feature = "cuda")]
        RankEngine::Gpu(_) => "cuda",
    };
    tracing::info!(
        rank,
        ranks = size,
        experts = ?own,
        of = experts,
        routed_expert_bytes = expert_bytes,
        kv_pages,
        device,
        "joined the expert-parallel replica"
    );
    Ok((
        engine,
        Lockstep::new(world, heartbeat(timeouts)),
        tokenizer,
        kv_pages,
    ))
}

/// This rank's engine over `ep`, the KV pages its cache holds and the
/// fingerprint of the adapters it serves beside the model
/// (`serve/adapters.rs`; every rank runs the same attention, adapters
/// included): on the GPU when `gpu` and `options.device` allow it, else
/// on the CPU.
fn build_engine(
    model: ServeModel,
    ep: ExpertParallel,
    options: &ServeOptions,
    rank: usize,
    gpu: bool,
) -> Result<(RankEngine, usize, u64), ServeError> {
    #[cfg(feature = "cuda")]
    let (model, ep) = if gpu && options.device == moe_crds::Device::Cuda {
        match super::gpu::place_share(model, ep, options, rank == 0)? {
            // The options refuse adapters on the GPU.
            super::gpu::SharePlacement::Gpu { backend, kv_pages } => {
                return Ok((RankEngine::Gpu(Box::new(backend)), kv_pages, 0));
            }
            super::gpu::SharePlacement::Cpu(model, ep) => (*model, ep),
        }
    } else {
        (model, ep)
    };
    #[cfg(not(feature = "cuda"))]
    let _ = gpu;
    let engine = Engine::serve(model);
    let adapters = super::load_adapters(options, &engine)?;
    let adapters_fingerprint = super::adapters::fingerprint(&adapters);
    let engine = engine
        .with_adapters(adapters)
        .with_weights(options.weights)
        .with_threads(options.threads)
        .map_err(|error| ServeError::Io {
            what: "starting the compute threads".into(),
            error,
        })?
        .with_expert_parallel(ep, options.redundant_experts / options.expert_parallel)
        .map_err(ServeError::Options)?;
    let engine = if rank == 0 {
        engine
    } else {
        engine.without_logits()
    };
    let kv_pages = super::kv_pages(engine.kv_shape(options.page_size), options)?;
    Ok((
        RankEngine::Cpu(Box::new(engine)),
        kv_pages,
        adapters_fingerprint,
    ))
}

/// All-gathers every rank's fingerprint and refuses any that differs from
/// rank 0's, naming the rank and the field. Bounded by the rendezvous
/// timeout: ranks load at different speeds.
fn check_same(
    world: &mut dyn Collective,
    mine: &[u64; 5],
    timeouts: &Timeouts,
) -> Result<(), ServeError> {
    let size = world.size();
    let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut all = vec![0u8; bytes.len() * size];
    world
        .set_timeout(timeouts.rendezvous)
        .map_err(ServeError::Dist)?;
    world
        .all_gather_bytes(&bytes, &vec![bytes.len(); size], &mut all)
        .map_err(ServeError::Dist)?;
    world
        .set_timeout(timeouts.collective)
        .map_err(ServeError::Dist)?;
    let words: Vec<u64> = all
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    let leader = &words[..FIELDS.len()];
    const FIELDS: [&str; 5] = [
        "model (shape, options or weights)",
        "checkpoint step",
        "KV cache pages",
        "KV page size",
        "adapters (names and weights)",
    ];
    for (rank, theirs) in words.chunks_exact(FIELDS.len()).enumerate().skip(1) {
        if let Some(i) = (0..FIELDS.len()).find(|&i| theirs[i] != leader[i]) {
            return Err(ServeError::Options(format!(
                "rank {rank} of the replica loaded a different {} than rank 0 ({} vs {}): every \
                 rank must serve the same checkpoint and adapters with the same --kv-cache-mib",
                FIELDS[i], theirs[i], leader[i]
            )));
        }
    }
    Ok(())
}

/// A follower: runs every step the leader plans until it says stop (`Ok`),
/// or the replica breaks. `joined` must be a follower's (rank > 0).
pub fn follow(joined: Joined, metrics: &Metrics) -> Result<(), ServeError> {
    follow_backend(joined.into(), metrics)
}

/// [`follow`] on whichever engine the rank joined with ([`join_serving`]).
pub fn follow_backend(joined: JoinedBackend, metrics: &Metrics) -> Result<(), ServeError> {
    let JoinedBackend {
        backend: mut engine,
        mut lockstep,
        kv_pages,
        ..
    } = joined;
    metrics.kv_pages_total.set(kv_pages as i64);
    let rank = lockstep.rank();
    let mut steps = 0u64;
    loop {
        match lockstep.receive().map_err(ServeError::Dist)? {
            Message::Step(plan) => {
                steps += 1;
                let chunks = plan.chunks();
                metrics.batch_size.observe(chunks.len() as f64);
                let tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
                metrics.batch_tokens.observe(tokens as f64);
                let stepped = engine.step(&chunks);
                let (exchanged, gathered) = engine.expert_parallel_bytes();
                metrics.set_collective_bytes("expert_exchange", exchanged);
                metrics.set_collective_bytes("all_gather", gathered);
                metrics.add_expert_rows(&engine.take_expert_rows());
                if let Err(e) = stepped {
                    if e.is_fatal() {
                        let peer = matches!(e, StepError::Collective { peer: true, .. });
                        return Err(ServeError::Replica(Failure {
                            message: e.to_string(),
                            peer,
                        }));
                    }
                    // The leader's engine refuses the same plan the same
                    // way and fails its requests.
                    tracing::warn!(rank, error = %e, "a planned step was refused");
                }
            }
            Message::Idle => {}
            Message::Rebalance => {
                let started = std::time::Instant::now();
                let report = engine.rebalance_experts().map_err(|e| {
                    ServeError::Replica(Failure {
                        peer: matches!(e, StepError::Collective { peer: true, .. }),
                        message: e.to_string(),
                    })
                })?;
                super::runner::log_rebalance(&report, started.elapsed());
                metrics.record_rebalance(&report);
            }
            Message::Stop => {
                let (exchanged, gathered) = engine.expert_parallel_bytes();
                tracing::info!(
                    rank,
                    steps,
                    exchanged_bytes = exchanged,
                    gathered_bytes = gathered,
                    "the leader stopped the replica"
                );
                return Ok(());
            }
        }
    }
}
