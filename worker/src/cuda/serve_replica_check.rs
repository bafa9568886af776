//! The GPU's expert-parallel serving engine against the CPU's single
//! process, in one process on one GPU: part of the check group "serve"
//! ([`super::serve_check`]).
//!
//! Each model of the serve check with an even number of routed experts is
//! split over a replica of two ranks, each a [`DeviceEngine`] holding its
//! half of every MoE layer's experts (sliced from the full model as
//! `load_experts` would load them), its rows exchanged over a TCP world on
//! loopback through host memory ([`DeviceExchange`]): the
//! path `moe-worker serve --device cuda --expert-parallel 2` takes over TCP,
//! minus the processes. Two ranks share one GPU here because their
//! exchanges never touch NCCL. Each model runs again as a replica of one
//! rank over an NCCL communicator ([`DeviceExchange`] over NCCL: its
//! device-to-device exchange, every row sent to the rank itself).
//! Rank 1 steps on a second thread, in lockstep with rank 0, through the
//! serve check's schedule; rank 0's logits are compared with the CPU
//! engine's under the same TF32 bound, and rank 1 must return none.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use super::check::Check;
use super::serve::{DeviceEngine, DeviceKvCache};
use super::serve_check::{PAGE_SIZE, outcome_checks, run_schedule};
use super::serve_ep::DeviceExchange;
use super::{Gpu, GpuError, Result};
use crate::dist::expert_parallel::ExpertParallel;
use crate::dist::nccl::NcclCollective;
use crate::dist::rendezvous::Store;
use crate::dist::{Collective, DistError, Solo, TcpCollective, TcpSetup};
use crate::serve::engine::{Chunk, Engine};
use crate::serve::kv_cache::KvStore;
use crate::serve::model::{ServeFfn, ServeModel};
use crate::serve::replica::experts_of;

/// Ranks of the replica the check builds.
const RANKS: usize = 2;

/// The replica check of every model that splits over [`RANKS`] ranks.
pub fn check_replicas(
    gpu: &Gpu,
    models: Vec<(&'static str, std::result::Result<ServeModel, String>)>,
) -> Vec<Check> {
    let mut checks = Vec::new();
    for (name, model) in models {
        let case = format!("{name}, {RANKS} ranks");
        let checked = model.and_then(|model| match routed_experts(&model) {
            Some(experts) if experts.is_multiple_of(RANKS) => {
                let mut checks =
                    check_replica(gpu, &case, model.clone(), experts).map_err(|e| e.to_string())?;
                // The NCCL exchange, device to device: a world of one (all
                // one GPU can host), so its rows go to this rank itself.
                let nccl = format!("{name}, 1 rank over NCCL");
                checks.extend(
                    check_nccl_replica(gpu, &nccl, model, experts).map_err(|e| e.to_string())?,
                );
                Ok(checks)
            }
            _ => Ok(Vec::new()),
        });
        match checked {
            Ok(results) => checks.extend(results),
            Err(error) => checks.push(Check {
                op: "serve.replica",
                case,
                passed: false,
                error,
                bound: "-".to_string(),
            }),
        }
    }
    checks
}

/// Routed experts per MoE layer, `None` without MoE layers.
fn routed_experts(model: &ServeModel) -> Option<usize> {
    model.blocks.iter().find_map(|b| match &b.ffn {
        ServeFfn::Moe { layer, .. } => Some(layer.config().n_routed_experts),
        ServeFfn::Dense(_) => None,
    })
}

/// `model` holding only routed experts `experts` of every MoE layer: what
/// a rank of a replica loads.
pub(crate) fn share_of(model: &ServeModel, experts: &Range<usize>) -> ServeModel {
    let mut share = model.clone();
    for block in &mut share.blocks {
        if let ServeFfn::Moe { layer, .. } = &mut block.ffn {
            let config = layer.config().clone();
            layer.params.keep_experts(&config, experts.clone());
        }
    }
    share
}

/// A TCP world of `ranks` on loopback, its ranks connected concurrently
/// (each waits for the others).
pub(crate) fn loopback_world(ranks: usize) -> std::result::Result<Vec<TcpCollective>, DistError> {
    let store = Store::bind("127.0.0.1:0")?;
    let coordinator: SocketAddr = store.local_addr()?;
    let store = Mutex::new(Some(store));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let setup = TcpSetup {
                    rank,
                    world_size: ranks,
                    attempt: 0,
                    config_hash: 1,
                    coordinator: coordinator.to_string(),
                    store: if rank == 0 {
                        store.lock().unwrap_or_else(|e| e.into_inner()).take()
                    } else {
                        None
                    },
                    listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                    rendezvous_timeout: Duration::from_secs(20),
                    collective_timeout: Duration::from_secs(20),
                };
                scope.spawn(move || TcpCollective::connect(setup))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(DistError::invalid(
                        "loopback world",
                        "a rank's thread panicked",
                    ))
                })
            })
            .collect()
    })
}

/// `run(rank, world)` for each world of `worlds` on its own thread, all at
/// once (the ranks of one group wait for each other): each rank's result,
/// in rank order, or why it failed.
pub(crate) fn on_rank_threads<W: Send, T: Send>(
    worlds: Vec<W>,
    run: &(dyn Fn(usize, W) -> std::result::Result<T, String> + Sync),
) -> Vec<std::result::Result<T, String>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = worlds
            .into_iter()
            .enumerate()
            .map(|(rank, world)| scope.spawn(move || run(rank, world)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("the rank panicked".into())))
            .collect()
    })
}

/// Rank `rank`'s step: its logits (none for a follower), or why it failed.
pub(crate) type RankStep<'a> =
    dyn Fn(usize, &[Chunk<'_>]) -> std::result::Result<Vec<f32>, String> + Sync + 'a;

/// One step on every rank of a replica, rank 0 on this thread and the
/// others each on their own, in lockstep: rank 0's logits, or the first
/// rank's failure. `step(rank, chunks)` runs rank `rank`'s engine.
pub(crate) fn step_replica(
    ranks: usize,
    chunks: &[Chunk<'_>],
    step: &RankStep<'_>,
) -> std::result::Result<Vec<f32>, String> {
    std::thread::scope(|scope| {
        let followers: Vec<_> = (1..ranks)
            .map(|rank| scope.spawn(move || step(rank, chunks)))
            .collect();
        let led = step(0, chunks).map_err(|e| format!("rank 0: {e}"));
        for (i, follower) in followers.into_iter().enumerate() {
            let rank = i + 1;
            match follower.join() {
                Ok(Ok(logits)) if logits.is_empty() => {}
                Ok(Ok(logits)) => {
                    return Err(format!("rank {rank} returned {} logits", logits.len()));
                }
                Ok(Err(e)) => return Err(format!("rank {rank}: {e}")),
                Err(_) => return Err(format!("rank {rank} panicked")),
            }
        }
        led
    })
}

/// The serve check's schedule on the CPU engine (all experts) and on a
/// replica of [`RANKS`] device engines.
fn check_replica(gpu: &Gpu, name: &str, model: ServeModel, experts: usize) -> Result<Vec<Check>> {
    let worlds = loopback_world(RANKS).map_err(|e| GpuError::Unsupported(e.to_string()))?;
    let worlds = worlds
        .into_iter()
        .map(|w| Box::new(w) as Box<dyn Collective>)
        .collect();
    check_replica_over(gpu, name, model, experts, worlds)
}

/// The serve check's schedule on a one-rank replica whose group is an
/// NCCL communicator (the device-to-device [`DeviceExchange`]).
fn check_nccl_replica(
    gpu: &Gpu,
    name: &str,
    model: ServeModel,
    experts: usize,
) -> Result<Vec<Check>> {
    let world = NcclCollective::single(gpu.context(), Duration::from_secs(60))
        .map_err(|e| GpuError::Unsupported(e.to_string()))?;
    check_replica_over(gpu, name, model, experts, vec![Box::new(world)])
}

/// The schedule on the CPU engine (all experts) and on a replica of one
/// device engine per world in `worlds` (rank order), each holding its share.
fn check_replica_over(
    gpu: &Gpu,
    name: &str,
    model: ServeModel,
    experts: usize,
    worlds: Vec<Box<dyn Collective>>,
) -> Result<Vec<Check>> {
    let vocab = model.config.vocab;
    let pages = 16;
    let cpu = Engine::serve(model.clone());
    let mut store = KvStore::new(cpu.kv_shape(PAGE_SIZE), pages);
    let unsupported = |e: String| GpuError::Unsupported(e);
    let size = worlds.len();
    let mut ranks: Vec<(DeviceEngine<'_>, Mutex<DeviceKvCache>)> = Vec::new();
    for (rank, world) in worlds.into_iter().enumerate() {
        let own = experts_of(rank, size, experts).map_err(|e| unsupported(e.to_string()))?;
        let ep = ExpertParallel::new(world, Box::new(Solo), experts)
            .map_err(|e| unsupported(e.to_string()))?;
        let engine =
            DeviceEngine::expert_parallel(gpu, &share_of(&model, &own), DeviceExchange::new(ep))?;
        let engine = if rank == 0 {
            engine
        } else {
            engine.without_logits()
        };
        let cache = engine.cache(PAGE_SIZE, pages)?;
        ranks.push((engine, Mutex::new(cache)));
    }
    let step = |rank: usize, chunks: &[Chunk<'_>]| {
        let (engine, cache) = &ranks[rank];
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        engine.step(&mut cache, chunks).map_err(|e| e.to_string())
    };
    let ran = run_schedule(
        name,
        vocab,
        &mut |chunks| cpu.step(&mut store, chunks).map_err(|e| e.to_string()),
        &mut |chunks| step_replica(size, chunks, &step),
    );
    Ok(match ran {
        Ok(outcome) => outcome_checks(name, &outcome),
        Err(error) => vec![Check {
            op: "serve.replica.step",
            case: name.to_string(),
            passed: false,
            error,
            bound: "-".to_string(),
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::replica::routed_expert_bytes;

    /// The harness without a GPU: a replica of two CPU engines over the
    /// same loopback world, in the same lockstep, matches the single CPU
    /// engine to the bit on every model (as the CPU replica promises), so
    /// the device check cannot fail the GPU for the harness's mistakes;
    /// and each share holds half the experts' bytes.
    #[test]
    fn a_cpu_replica_in_the_harness_matches_one_process() {
        for (name, model) in super::super::serve_check::models() {
            let model = model.unwrap_or_else(|e| panic!("{name}: {e}"));
            let experts = routed_experts(&model).expect("a MoE model");
            if !experts.is_multiple_of(RANKS) {
                continue;
            }
            let vocab = model.config.vocab;
            let single = Engine::serve(model.clone());
            let mut store = KvStore::new(single.kv_shape(PAGE_SIZE), 16);
            let worlds = loopback_world(RANKS).unwrap();
            let ranks: Vec<(Engine, Mutex<KvStore>)> = worlds
                .into_iter()
                .enumerate()
                .map(|(rank, world)| {
                    let own = experts_of(rank, RANKS, experts).unwrap();
                    let share = share_of(&model, &own);
                    assert_eq!(
                        2 * routed_expert_bytes(&share),
                        routed_expert_bytes(&model),
                        "{name}"
                    );
                    let ep = ExpertParallel::new(Box::new(world), Box::new(Solo), experts).unwrap();
                    let engine = Engine::serve(share).with_expert_parallel(ep, 0).unwrap();
                    let engine = if rank == 0 {
                        engine
                    } else {
                        engine.without_logits()
                    };
                    let store = KvStore::new(engine.kv_shape(PAGE_SIZE), 16);
                    (engine, Mutex::new(store))
                })
                .collect();
            let step = |rank: usize, chunks: &[Chunk<'_>]| {
                let (engine, store) = &ranks[rank];
                let mut store = store.lock().unwrap();
                engine.step(&mut store, chunks).map_err(|e| e.to_string())
            };
            let outcome = run_schedule(
                name,
                vocab,
                &mut |chunks| single.step(&mut store, chunks).map_err(|e| e.to_string()),
                &mut |chunks| step_replica(RANKS, chunks, &step),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert!(outcome.logits_passed && outcome.tokens_passed, "{name}");
            assert_eq!((outcome.near_ties, outcome.worst_ratio), (0, 0.0), "{name}");
        }
    }
}
