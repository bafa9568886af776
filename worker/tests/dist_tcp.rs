//! The TCP collectives against references computed locally, over loopback
//! with ranks as threads (ephemeral ports only), and their failure
//! behaviour: mismatched or missing ranks at rendezvous, dead and hung peers
//! mid-collective, ranks calling different collectives.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use moe_worker::dist::layout::{Layout, make_groups};
use moe_worker::dist::rendezvous::Store;
use moe_worker::dist::{
    Collective, DistError, Solo, TcpCollective, TcpSetup, data_parallel, exchange_counts,
};
use moe_worker::linear::GemmPrecision;
use moe_worker::model::{Gradients, Model, ModelConfig};
use moe_worker::moe::{MoeConfig, ScoreFunction};
use moe_worker::rng::SplitMix64;

const RENDEZVOUS: Duration = Duration::from_secs(10);
/// Collective timeout of the correctness tests: generous, never reached.
const GENEROUS: Duration = Duration::from_secs(10);

#[derive(Clone, Copy)]
struct Identity {
    world_size: usize,
    config_hash: u64,
    attempt: u64,
}

fn identity(world_size: usize) -> Identity {
    Identity {
        world_size,
        config_hash: 0x5eed,
        attempt: 1,
    }
}

fn setup(
    rank: usize,
    who: Identity,
    coordinator: SocketAddr,
    store: Option<Store>,
    timeouts: (Duration, Duration),
) -> TcpSetup {
    TcpSetup {
        rank,
        world_size: who.world_size,
        attempt: who.attempt,
        config_hash: who.config_hash,
        coordinator: coordinator.to_string(),
        store,
        listen: "127.0.0.1:0".parse().expect("loopback address"),
        rendezvous_timeout: timeouts.0,
        collective_timeout: timeouts.1,
    }
}

/// Runs `body(rank, connect result)` on one thread per listed rank, with
/// `identities[rank]` (so tests can make one rank disagree); the `late`
/// ranks start connecting 300 ms after the others. Returns the results by
/// position in `ranks`.
fn run_ranks<T: Send>(
    ranks: &[usize],
    identities: &[Identity],
    timeouts: (Duration, Duration),
    late: &[usize],
    body: impl Fn(usize, Result<TcpCollective, DistError>) -> T + Sync,
) -> Vec<T> {
    let store = Store::bind("127.0.0.1:0").expect("bind store");
    let coordinator = store.local_addr().expect("store address");
    let store = Mutex::new(Some(store));
    thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .iter()
            .map(|&rank| {
                let store = if rank == 0 {
                    store.lock().unwrap().take()
                } else {
                    None
                };
                let setup = setup(rank, identities[rank], coordinator, store, timeouts);
                let body = &body;
                let delay = if late.contains(&rank) { 300 } else { 0 };
                scope.spawn(move || {
                    thread::sleep(Duration::from_millis(delay));
                    body(rank, TcpCollective::connect(setup))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

/// A healthy world of `n`: every rank connects, then runs `body`.
fn world<T: Send>(n: usize, body: impl Fn(&mut TcpCollective) -> T + Sync) -> Vec<T> {
    let ranks: Vec<usize> = (0..n).collect();
    run_ranks(
        &ranks,
        &vec![identity(n); n],
        (RENDEZVOUS, GENEROUS),
        &[],
        |rank, c| {
            let mut c = c.unwrap_or_else(|e| panic!("rank {rank} failed to connect: {e}"));
            assert_eq!((c.rank(), c.size()), (rank, n));
            body(&mut c)
        },
    )
}

/// Small integers: their sums are exact in f32 in any order, so results
/// must equal the reference bit for bit.
fn small_ints(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..len).map(|_| rng.below(17) as f32 - 8.0).collect()
}

fn floats(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..len)
        .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
        .collect()
}

const LENGTHS: &[usize] = &[0, 1, 2, 3, 5, 7, 64, 1001, 100_003];

#[test]
fn all_reduce_sums_exactly_for_uneven_lengths_and_world_sizes_1_to_4() {
    for n in 1..=4 {
        let results = world(n, |c| {
            LENGTHS
                .iter()
                .map(|&len| {
                    let mut data = small_ints(c.rank() as u64 * 1000 + len as u64, len);
                    c.all_reduce_sum(&mut data).expect("all_reduce");
                    data
                })
                .collect::<Vec<_>>()
        });
        for (i, &len) in LENGTHS.iter().enumerate() {
            let mut reference = vec![0f32; len];
            for r in 0..n {
                for (sum, v) in reference
                    .iter_mut()
                    .zip(small_ints(r as u64 * 1000 + len as u64, len))
                {
                    *sum += v;
                }
            }
            for (r, got) in results.iter().enumerate() {
                assert_eq!(got[i], reference, "world {n}, rank {r}, length {len}");
            }
        }
    }
}

#[test]
fn all_reduce_of_floats_is_close_to_f64_identical_on_every_rank_and_reproducible() {
    let len = 10_007;
    for n in 2..=4 {
        let run = || {
            world(n, |c| {
                let mut data = floats(77 + c.rank() as u64, len);
                c.all_reduce_sum(&mut data).expect("all_reduce");
                data
            })
        };
        let (first, second) = (run(), run());
        let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for r in 0..n {
            assert_eq!(
                bits(&first[r]),
                bits(&first[0]),
                "world {n}: rank {r} differs from rank 0"
            );
            assert_eq!(
                bits(&second[r]),
                bits(&first[r]),
                "world {n}: rank {r} differs between runs"
            );
        }
        let inputs: Vec<Vec<f32>> = (0..n).map(|r| floats(77 + r as u64, len)).collect();
        for (i, got) in first[0].iter().enumerate() {
            let exact: f64 = inputs.iter().map(|x| f64::from(x[i])).sum();
            // n−1 roundings of values below n in magnitude.
            let bound = n as f64 * n as f64 * f64::from(f32::EPSILON);
            assert!(
                (f64::from(*got) - exact).abs() <= bound,
                "element {i}: {got} vs {exact}"
            );
        }
    }
}

/// Per-rank counts with zeros and sizes unrelated to the world size.
fn uneven_counts(n: usize, salt: usize) -> Vec<usize> {
    (0..n).map(|r| (r * 7 + salt * 3) % 5).collect()
}

#[test]
fn reduce_scatter_gives_each_rank_its_segment_of_the_sum() {
    for n in 1..=4 {
        for salt in 0..4 {
            let counts = uneven_counts(n, salt);
            let total: usize = counts.iter().sum();
            let results = world(n, |c| {
                let input = small_ints(10 + c.rank() as u64, total);
                let mut out = vec![f32::NAN; counts[c.rank()]];
                c.reduce_scatter_sum(&input, &counts, &mut out)
                    .expect("reduce_scatter");
                out
            });
            let mut sum = vec![0f32; total];
            for r in 0..n {
                for (s, v) in sum.iter_mut().zip(small_ints(10 + r as u64, total)) {
                    *s += v;
                }
            }
            let mut at = 0;
            for (r, got) in results.iter().enumerate() {
                assert_eq!(
                    got,
                    &sum[at..at + counts[r]],
                    "world {n}, counts {counts:?}, rank {r}"
                );
                at += counts[r];
            }
        }
    }
}

#[test]
fn all_gather_concatenates_uneven_contributions_in_rank_order() {
    for n in 1..=4 {
        for salt in 0..4 {
            let counts = uneven_counts(n, salt);
            let total: usize = counts.iter().sum();
            let results = world(n, |c| {
                let mine = floats(500 + c.rank() as u64, counts[c.rank()]);
                let mut out = vec![f32::NAN; total];
                c.all_gather(&mine, &counts, &mut out).expect("all_gather");
                let bytes: Vec<u8> = (0..counts[c.rank()] * 3)
                    .map(|i| (c.rank() * 31 + i) as u8)
                    .collect();
                let byte_counts: Vec<usize> = counts.iter().map(|c| c * 3).collect();
                let mut gathered = vec![0u8; total * 3];
                c.all_gather_bytes(&bytes, &byte_counts, &mut gathered)
                    .expect("all_gather_bytes");
                (out, gathered)
            });
            let expected: Vec<f32> = (0..n)
                .flat_map(|r| floats(500 + r as u64, counts[r]))
                .collect();
            let expected_bytes: Vec<u8> = (0..n)
                .flat_map(|r| (0..counts[r] * 3).map(move |i| (r * 31 + i) as u8))
                .collect();
            for (r, (got, bytes)) in results.iter().enumerate() {
                assert_eq!(got, &expected, "world {n}, counts {counts:?}, rank {r}");
                assert_eq!(bytes, &expected_bytes, "bytes: world {n}, rank {r}");
            }
        }
    }
}

/// What rank `from` sends rank `to`: a value naming both and the position.
fn a2a_value(from: usize, to: usize, i: usize) -> f32 {
    (from * 1_000_000 + to * 10_000 + i) as f32
}

#[test]
fn all_to_all_delivers_uneven_and_empty_splits_to_the_right_ranks() {
    for n in 1..=4 {
        for salt in 0..3 {
            // counts[from][to], zeros included, sizes not divisible by n.
            let counts: Vec<Vec<usize>> = (0..n)
                .map(|from| {
                    (0..n)
                        .map(|to| (from * 5 + to * 3 + salt) % 4 * (1 + salt * 50))
                        .collect()
                })
                .collect();
            let results = world(n, |c| {
                let me = c.rank();
                let send: Vec<f32> = (0..n)
                    .flat_map(|to| (0..counts[me][to]).map(move |i| a2a_value(me, to, i)))
                    .collect();
                let recv_counts = exchange_counts(c, &counts[me]).expect("exchange_counts");
                let mut recv = vec![f32::NAN; recv_counts.iter().sum()];
                c.all_to_all(&send, &counts[me], &mut recv, &recv_counts)
                    .expect("all_to_all");
                // The same exchange as raw bytes (an FP8 payload would go this way).
                let send_bytes: Vec<u8> = (0..n)
                    .flat_map(|to| (0..counts[me][to]).map(move |i| (me * 16 + to + i) as u8))
                    .collect();
                let mut recv_bytes = vec![0u8; recv.len()];
                c.all_to_all_bytes(&send_bytes, &counts[me], &mut recv_bytes, &recv_counts)
                    .expect("all_to_all_bytes");
                (recv_counts, recv, recv_bytes)
            });
            for (me, (recv_counts, recv, recv_bytes)) in results.iter().enumerate() {
                let want_counts: Vec<usize> = (0..n).map(|from| counts[from][me]).collect();
                assert_eq!(recv_counts, &want_counts, "world {n}, rank {me}");
                let want: Vec<f32> = (0..n)
                    .flat_map(|from| (0..counts[from][me]).map(move |i| a2a_value(from, me, i)))
                    .collect();
                assert_eq!(recv, &want, "world {n}, rank {me}");
                let want_bytes: Vec<u8> = (0..n)
                    .flat_map(|from| (0..counts[from][me]).map(move |i| (from * 16 + me + i) as u8))
                    .collect();
                assert_eq!(recv_bytes, &want_bytes, "bytes: world {n}, rank {me}");
            }
        }
    }
}

#[test]
fn broadcast_copies_the_root_buffer_from_every_root_including_multi_segment() {
    // 3 MiB + 5 bytes: many 256 KiB segments and a ragged tail.
    for len in [0usize, 7, 3 * (1 << 20) + 5] {
        for n in 1..=4 {
            let results = world(n, |c| {
                (0..n)
                    .map(|root| {
                        let mut data: Vec<u8> = if c.rank() == root {
                            (0..len).map(|i| (i * 7 + root) as u8).collect()
                        } else {
                            vec![0xAA; len]
                        };
                        c.broadcast_bytes(&mut data, root).expect("broadcast");
                        let mut floats = if c.rank() == root {
                            small_ints(root as u64, 33)
                        } else {
                            vec![0.0; 33]
                        };
                        c.broadcast(&mut floats, root).expect("broadcast f32");
                        (data, floats)
                    })
                    .collect::<Vec<_>>()
            });
            for root in 0..n {
                let want: Vec<u8> = (0..len).map(|i| (i * 7 + root) as u8).collect();
                for (r, got) in results.iter().enumerate() {
                    assert!(
                        got[root].0 == want,
                        "len {len}, world {n}, root {root}, rank {r}"
                    );
                    assert_eq!(got[root].1, small_ints(root as u64, 33));
                }
            }
        }
    }
}

#[test]
fn barrier_lets_no_rank_leave_before_the_last_arrives() {
    for n in 1..=4 {
        let times = world(n, |c| {
            // Ranks arrive 40 ms apart, the last one last.
            thread::sleep(Duration::from_millis(40 * c.rank() as u64));
            let arrived = Instant::now();
            c.barrier().expect("barrier");
            (arrived, Instant::now())
        });
        let last_arrival = times.iter().map(|t| t.0).max().unwrap();
        for (r, (_, left)) in times.iter().enumerate() {
            assert!(
                *left >= last_arrival,
                "world {n}: rank {r} left the barrier early"
            );
        }
    }
}

#[test]
fn groups_reduce_over_their_members_only_and_interleave_with_the_world() {
    let results = world(4, |c| {
        let me = c.rank();
        // SP-like pairs {0,1},{2,3}; EP-like pairs {0,2},{1,3}; the world reversed.
        let mut sp = c
            .new_group(if me < 2 { &[0, 1] } else { &[2, 3] })
            .expect("sp group");
        let mut ep = c
            .new_group(if me % 2 == 0 { &[0, 2] } else { &[1, 3] })
            .expect("ep group");
        let mut reversed = c.new_group(&[3, 2, 1, 0]).expect("reversed group");
        let mut out = Vec::new();
        for round in 0..3u64 {
            let mut a = small_ints(me as u64 + round, 11);
            sp.all_reduce_sum(&mut a).expect("sp all_reduce");
            let mut b = small_ints(100 + me as u64 + round, 5);
            ep.all_reduce_sum(&mut b).expect("ep all_reduce");
            let mut w = small_ints(200 + me as u64 + round, 3);
            c.all_reduce_sum(&mut w).expect("world all_reduce");
            let mut gathered = vec![0f32; 4];
            reversed
                .all_gather(&[me as f32], &[1; 4], &mut gathered)
                .expect("reversed all_gather");
            out.push((sp.rank(), ep.rank(), reversed.rank(), a, b, w, gathered));
        }
        let not_member = c.new_group(&[(me + 1) % 4]).err().map(|e| e.to_string());
        let twice = c.new_group(&[me, me]).err().map(|e| e.to_string());
        (out, not_member, twice)
    });
    let sum = |ranks: &[usize], base: u64, round: u64, len: usize| {
        let mut s = vec![0f32; len];
        for &r in ranks {
            for (x, v) in s.iter_mut().zip(small_ints(base + r as u64 + round, len)) {
                *x += v;
            }
        }
        s
    };
    for (me, (rounds, not_member, twice)) in results.iter().enumerate() {
        let sp_ranks: &[usize] = if me < 2 { &[0, 1] } else { &[2, 3] };
        let ep_ranks: &[usize] = if me % 2 == 0 { &[0, 2] } else { &[1, 3] };
        for (round, (sp_rank, ep_rank, rev_rank, a, b, w, gathered)) in rounds.iter().enumerate() {
            let round = round as u64;
            assert_eq!((*sp_rank, *ep_rank, *rev_rank), (me % 2, me / 2, 3 - me));
            assert_eq!(a, &sum(sp_ranks, 0, round, 11), "rank {me} sp");
            assert_eq!(b, &sum(ep_ranks, 100, round, 5), "rank {me} ep");
            assert_eq!(w, &sum(&[0, 1, 2, 3], 200, round, 3), "rank {me} world");
            assert_eq!(
                gathered,
                &vec![3.0, 2.0, 1.0, 0.0],
                "rank {me}: group order is the listed order"
            );
        }
        assert!(
            not_member
                .as_deref()
                .is_some_and(|m| m.contains("only members")),
            "{not_member:?}"
        );
        assert!(
            twice.as_deref().is_some_and(|m| m.contains("twice")),
            "{twice:?}"
        );
    }
}

/// Frames carry at most 256 KiB (65 536 floats): sizes on both sides of
/// segment boundaries, uneven between ranks.
#[test]
fn large_buffers_cross_segment_boundaries_in_every_collective() {
    const SEG: usize = 65_536;
    let n = 3;
    let counts = [2 * SEG + 1, 0, SEG - 1];
    let total: usize = counts.iter().sum();
    let a2a = |from: usize, to: usize| [SEG + 7, 2 * SEG, 3, 0][(from + to) % 4];
    let results = world(n, |c| {
        let me = c.rank();
        let mut reduced = small_ints(me as u64, 3 * SEG + 5);
        c.all_reduce_sum(&mut reduced).expect("all_reduce");
        let mut scattered = vec![0f32; counts[me]];
        c.reduce_scatter_sum(&small_ints(50 + me as u64, total), &counts, &mut scattered)
            .expect("reduce_scatter");
        let mut gathered = vec![0f32; total];
        c.all_gather(&floats(60 + me as u64, counts[me]), &counts, &mut gathered)
            .expect("all_gather");
        let send_counts: Vec<usize> = (0..n).map(|to| a2a(me, to)).collect();
        let recv_counts: Vec<usize> = (0..n).map(|from| a2a(from, me)).collect();
        let send: Vec<f32> = (0..n)
            .flat_map(|to| (0..a2a(me, to)).map(move |i| a2a_value(me, to, i)))
            .collect();
        let mut exchanged = vec![0f32; recv_counts.iter().sum()];
        c.all_to_all(&send, &send_counts, &mut exchanged, &recv_counts)
            .expect("all_to_all");
        (reduced, scattered, gathered, exchanged)
    });
    let sum_of = |base: u64, len: usize| {
        let mut s = vec![0f32; len];
        for r in 0..n {
            for (x, v) in s.iter_mut().zip(small_ints(base + r as u64, len)) {
                *x += v;
            }
        }
        s
    };
    let reduced = sum_of(0, 3 * SEG + 5);
    let scattered = sum_of(50, total);
    let gathered: Vec<f32> = (0..n)
        .flat_map(|r| floats(60 + r as u64, counts[r]))
        .collect();
    let mut at = 0;
    for (me, (r, s, g, x)) in results.iter().enumerate() {
        assert!(r == &reduced, "all_reduce on rank {me}");
        assert!(
            s[..] == scattered[at..at + counts[me]],
            "reduce_scatter on rank {me}"
        );
        at += counts[me];
        assert!(g == &gathered, "all_gather on rank {me}");
        let want: Vec<f32> = (0..n)
            .flat_map(|from| (0..a2a(from, me)).map(move |i| a2a_value(from, me, i)))
            .collect();
        assert!(x == &want, "all_to_all on rank {me}");
    }
}

#[test]
fn all_reduce_max_takes_the_largest_value_on_every_rank() {
    for n in 1..=4 {
        let lengths = [0usize, 5, 100_003];
        let results = world(n, |c| {
            lengths
                .map(|len| {
                    let mut data = floats(900 + c.rank() as u64 + len as u64, len);
                    c.all_reduce_max(&mut data).expect("all_reduce_max");
                    data
                })
                .to_vec()
        });
        for (i, &len) in lengths.iter().enumerate() {
            let inputs: Vec<Vec<f32>> = (0..n)
                .map(|r| floats(900 + r as u64 + len as u64, len))
                .collect();
            let want: Vec<f32> = (0..len)
                .map(|j| {
                    inputs
                        .iter()
                        .map(|x| x[j])
                        .fold(f32::NEG_INFINITY, f32::max)
                })
                .collect();
            for (r, got) in results.iter().enumerate() {
                assert_eq!(got[i], want, "world {n}, rank {r}, length {len}");
            }
        }
    }
}

/// Tensor sizes around a 1000-float bucket: packed ones, ones that close a
/// bucket, and ones big enough to be reduced in place.
const TENSOR_SIZES: [usize; 8] = [3, 2000, 0, 7, 995, 1, 1000, 600];

#[test]
fn data_parallel_reductions_match_the_local_mean_and_sums() {
    let n = 3;
    let results = world(n, |c| {
        let me = c.rank() as u64;
        let mut grads: Vec<Vec<f32>> = TENSOR_SIZES
            .iter()
            .enumerate()
            .map(|(i, &len)| small_ints(me * 100 + i as u64, len))
            .collect();
        let mut refs: Vec<&mut Vec<f32>> = grads.iter_mut().collect();
        data_parallel::all_reduce_mean(c, &mut refs, 1000).expect("all_reduce_mean");
        let mut loads = vec![vec![me as usize, 2, 1 << 40], vec![5 * me as usize]];
        data_parallel::sum_counts(c, &mut loads).expect("sum_counts");
        let loss = data_parallel::mean(c, 1.5 + me as f64).expect("mean");
        (grads, loads, loss)
    });
    let want_grads: Vec<Vec<f32>> = TENSOR_SIZES
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut sum = vec![0f32; len];
            for r in 0..n as u64 {
                for (s, v) in sum.iter_mut().zip(small_ints(r * 100 + i as u64, len)) {
                    *s += v;
                }
            }
            sum.iter().map(|s| s / n as f32).collect()
        })
        .collect();
    for (r, (grads, loads, loss)) in results.iter().enumerate() {
        assert_eq!(grads, &want_grads, "rank {r}");
        assert_eq!(loads, &vec![vec![3, 6, 3 << 40], vec![15]], "rank {r}");
        assert_eq!(*loss, 2.5, "rank {r}");
    }
}

/// Two blocks (dense, then MoE with a shared expert) over a 16-token
/// vocabulary: every kind of parameter tensor, small enough to be fast.
fn tiny_model_config() -> ModelConfig {
    ModelConfig {
        vocab: 16,
        hidden: 8,
        layers: 2,
        dense_layers: 1,
        dense_hidden: 12,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        norm_eps: moe_worker::model::config::NORM_EPS,
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
            normalize_gates: true,
            routed_scaling_factor: 1.0,
            aux_loss_alpha: 0.0,
        },
        bias_update_rate: Some(0.01),
        gemm_precision: GemmPrecision::Fp32,
        head_precision: GemmPrecision::Fp32,
    }
}

/// Micro-batch `i`: two sequences of four tokens and their targets.
fn micro_batch(i: u64, vocab: usize) -> (Vec<u32>, Vec<u32>) {
    let mut rng = SplitMix64::new(1000 + i);
    let mut draw = || (0..8).map(|_| rng.below(vocab) as u32).collect::<Vec<_>>();
    (draw(), draw())
}

/// The data-parallel hook on the real model: two ranks each running one
/// micro-batch and averaging must give what one process gets accumulating
/// both (as `Trainer::step` does), for gradients, expert loads and loss.
#[test]
fn data_parallel_ranks_agree_with_one_rank_accumulating_their_micro_batches() {
    let config = tiny_model_config();
    let model = Model::<f32>::initial(config.clone(), 7);
    // One process, two micro-batches: summed gradients, then their mean.
    let mut reference = Gradients::zeros(&config);
    let mut loads: Vec<Vec<usize>> = Vec::new();
    let mut loss = 0.0;
    for i in 0..2 {
        let (tokens, targets) = micro_batch(i, config.vocab);
        let pass = model.forward(&tokens, &targets);
        model.backward(&pass, &mut reference);
        loss += pass.cross_entropy;
        let step_loads = pass.expert_loads();
        if loads.is_empty() {
            loads = step_loads;
        } else {
            for (total, layer) in loads.iter_mut().zip(step_loads) {
                total.iter_mut().zip(layer).for_each(|(t, l)| *t += l);
            }
        }
    }
    let reference: Vec<Vec<f32>> = reference
        .tensors_mut()
        .into_iter()
        .map(|t| t.iter().map(|g| g / 2.0).collect())
        .collect();
    let results = world(2, |c| {
        let (tokens, targets) = micro_batch(c.rank() as u64, config.vocab);
        let pass = model.forward(&tokens, &targets);
        let mut grads = Gradients::zeros(&config);
        model.backward(&pass, &mut grads);
        data_parallel::all_reduce_mean(c, &mut grads.tensors_mut(), data_parallel::BUCKET_FLOATS)
            .expect("gradients");
        let mut loads = pass.expert_loads();
        data_parallel::sum_counts(c, &mut loads).expect("loads");
        let loss = data_parallel::mean(c, pass.cross_entropy).expect("loss");
        let grads: Vec<Vec<f32>> = grads.tensors_mut().into_iter().map(|t| t.clone()).collect();
        (grads, loads, loss)
    });
    let bits = |g: &[Vec<f32>]| g.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&results[0].0),
        bits(&results[1].0),
        "replicas must hold identical gradients"
    );
    // Accumulating one batch's contributions into the other's sums changes
    // the rounding, not the value: within f32 rounding of the largest gradient.
    let scale = reference.iter().flatten().fold(0f32, |m, g| m.max(g.abs()));
    for (t, (got, want)) in results[0].0.iter().zip(&reference).enumerate() {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * scale,
                "tensor {t}[{i}]: {g} vs {w} (scale {scale})"
            );
        }
    }
    for (grads, got_loads, got_loss) in &results {
        assert_eq!(grads.len(), reference.len());
        assert_eq!(got_loads, &loads);
        assert_eq!(*got_loss, loss / 2.0);
    }
}

#[test]
fn solo_is_a_world_of_one() {
    let mut solo = Solo;
    let mut data = vec![1.0f32, -2.0];
    solo.all_reduce_sum(&mut data).expect("sum");
    solo.all_reduce_max(&mut data).expect("max");
    assert_eq!(data, [1.0, -2.0]);
    let mut out = [0f32; 2];
    solo.reduce_scatter_sum(&data, &[2], &mut out)
        .expect("reduce_scatter");
    assert_eq!(out, [1.0, -2.0]);
    solo.all_to_all(&data, &[2], &mut out, &[2])
        .expect("all_to_all");
    assert_eq!(exchange_counts(&mut solo, &[4]).expect("counts"), [4]);
    assert!(solo.all_gather(&data, &[1], &mut out).is_err());
    assert!(solo.broadcast(&mut data, 1).is_err());
    assert!(solo.new_group(&[0]).is_ok() && solo.new_group(&[1]).is_err());
    let mut grads = [vec![3.0f32]];
    let mut refs: Vec<&mut Vec<f32>> = grads.iter_mut().collect();
    data_parallel::all_reduce_mean(&mut solo, &mut refs, 10).expect("mean");
    assert_eq!(grads[0], [3.0]);
}

#[test]
fn layout_groups_reduce_over_the_ranks_the_layout_names() {
    // world 8 = 4 sequences × sp 2, ep 4 (the layout module's example).
    let layout = Layout::new(8, 2, 4).expect("layout");
    let results = world(8, |c| {
        let mut groups = make_groups(c, &layout).expect("groups");
        let me = c.rank() as f32;
        let mut out = Vec::new();
        for group in [
            &mut groups.sequence,
            &mut groups.expert,
            &mut groups.expert_replicas,
        ] {
            let mut v = vec![me];
            group.all_reduce_sum(&mut v).expect("group all_reduce");
            out.push(v[0]);
        }
        out
    });
    for (r, sums) in results.iter().enumerate() {
        let sum = |ranks: Vec<usize>| ranks.iter().sum::<usize>() as f32;
        let want = [
            sum(layout.sequence_group(r)),
            sum(layout.expert_group(r)),
            sum(layout.expert_replicas(r)),
        ];
        assert_eq!(sums[..], want, "rank {r}");
    }
    assert_eq!(
        results[5],
        [9.0, 22.0, 6.0],
        "sp {{4,5}}, ep {{4..7}}, replicas {{1,5}}"
    );
}

#[test]
fn invalid_arguments_are_refused_without_breaking_the_communicator() {
    let results = world(2, |c| {
        let bad = c.all_gather(&[1.0], &[1, 1, 1], &mut [0.0; 3]).unwrap_err();
        let good = {
            let mut v = vec![c.rank() as f32 + 1.0];
            c.all_reduce_sum(&mut v).map(|()| v[0])
        };
        (bad, good)
    });
    for (bad, good) in results {
        assert!(matches!(bad, DistError::InvalidArgument { .. }), "{bad}");
        assert_eq!(good.expect("communicator still works"), 3.0);
    }
}

// ---- failures

const SHORT: Duration = Duration::from_millis(1500);

#[test]
fn rendezvous_fails_for_everyone_when_a_rank_never_arrives() {
    let started = Instant::now();
    // World of 3; rank 2 never starts.
    let results = run_ranks(&[0, 1], &[identity(3); 3], (SHORT, SHORT), &[], |_, c| {
        c.err()
    });
    for (r, err) in results.iter().enumerate() {
        let err = err
            .as_ref()
            .unwrap_or_else(|| panic!("rank {r} connected without rank 2"));
        assert!(
            err.to_string().contains("missing ranks [2]"),
            "rank {r}: {err}"
        );
    }
    // Everyone hears by the store's deadline, not their own read timeouts.
    assert!(
        started.elapsed() < SHORT + Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn rendezvous_rejects_a_mismatched_world_size_config_hash_or_attempt() {
    type Disagree = fn(&mut Identity);
    let cases: [(Disagree, &str); 3] = [
        (|i| i.world_size = 5, "world size 5, rank 0 with 3"),
        (
            |i| i.config_hash = 0xbad,
            "config hash 0000000000000bad, rank 0 has 0000000000005eed",
        ),
        (|i| i.attempt = 0, "attempt 0, rank 0 to attempt 1"),
    ];
    // Also with the others arriving after the refusal (the store keeps
    // answering late ranks with the same verdict).
    let orders: [&[usize]; 3] = [&[], &[1], &[0, 1]];
    for ((mutate, needle), late) in cases
        .iter()
        .flat_map(|c| orders.iter().map(move |o| (c, o)))
    {
        let mut identities = vec![identity(3); 3];
        mutate(&mut identities[2]);
        let started = Instant::now();
        let results = run_ranks(
            &[0, 1, 2],
            &identities,
            (Duration::from_secs(5), SHORT),
            late,
            |_, c| c.err(),
        );
        for (r, err) in results.iter().enumerate() {
            let err = err
                .as_ref()
                .unwrap_or_else(|| panic!("rank {r} accepted a mismatched gang"));
            assert!(
                err.to_string().contains(needle),
                "rank {r} (late: {late:?}): {err} should say {needle:?}"
            );
        }
        // Fails fast: well before the 5 s rendezvous timeout.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }
}

/// Ranks 0, 1 and 2 start an all-reduce that rank 3 never joins: `rank_3`
/// decides what rank 3 does instead. Returns the others' errors and how
/// long they took. Rank 1 is no ring neighbour of rank 3: it can only learn
/// of the failure from its neighbours aborting.
fn abandoned_all_reduce(
    rank_3: impl Fn(TcpCollective) + Sync,
) -> Vec<(DistError, Duration, Option<DistError>)> {
    // Survivors keep their communicators open until all have failed, so
    // rank 1 learns of the failure from the others' abort, not from their
    // sockets closing on exit. Not a `std::sync::Barrier`: a survivor that
    // panicked would leave the others waiting forever (the test hung
    // instead of failing); they give up after a while and the panic fails
    // the test.
    let survivors = std::sync::atomic::AtomicUsize::new(0);
    let all_failed = || {
        survivors.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + RENDEZVOUS;
        while survivors.load(std::sync::atomic::Ordering::SeqCst) < 3 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    };
    let results = run_ranks(
        &[0, 1, 2, 3],
        &[identity(4); 4],
        (RENDEZVOUS, SHORT),
        &[],
        |rank, c| {
            let mut c = c.expect("connect");
            let mut warmup = vec![1.0f32; 1000];
            c.all_reduce_sum(&mut warmup)
                .expect("first all_reduce succeeds");
            assert_eq!(warmup[999], 4.0);
            // Every rank past the warm-up before rank 3 goes: a rank
            // closing its sockets with a message unread resets them, which
            // could cut a slower rank's last warm-up receive.
            c.barrier().expect("the warm-up barrier");
            if rank == 3 {
                rank_3(c);
                return None;
            }
            let mut big = vec![1.0f32; 1 << 20];
            let started = Instant::now();
            let err = c
                .all_reduce_sum(&mut big)
                .expect_err("all_reduce without rank 3 must fail");
            let took = started.elapsed();
            let after = c.barrier().err();
            all_failed();
            Some((err, took, after))
        },
    );
    results.into_iter().flatten().collect()
}

#[test]
fn a_peer_dying_mid_training_fails_the_others_fast() {
    // Rank 3 "dies": its communicator is dropped, closing its sockets.
    for (err, took, after) in abandoned_all_reduce(drop) {
        assert!(err.is_peer_failure(), "{err}");
        assert!(
            took < SHORT,
            "a closed connection must be noticed before the timeout: {took:?} ({err})"
        );
        assert!(
            matches!(after, Some(DistError::Aborted { .. })),
            "{after:?}"
        );
    }
}

#[test]
fn a_hung_peer_times_the_others_out_within_the_collective_timeout() {
    // Rank 3 stays connected but never calls the collective.
    let results = abandoned_all_reduce(|c| {
        thread::sleep(SHORT + Duration::from_millis(500));
        drop(c);
    });
    for (err, took, after) in results {
        assert!(err.is_peer_failure(), "{err}");
        assert!(
            took < SHORT + Duration::from_millis(500),
            "took {took:?}: {err}"
        );
        assert!(
            matches!(after, Some(DistError::Aborted { .. })),
            "{after:?}"
        );
    }
}

#[test]
fn a_widened_timeout_waits_for_a_slow_rank_and_a_narrow_one_does_not() {
    let base = Duration::from_millis(300);
    let results = run_ranks(
        &[0, 1],
        &[identity(2); 2],
        (RENDEZVOUS, base),
        &[],
        |rank, c| {
            let mut c = c.expect("connect");
            // Rank 0 "writes a checkpoint" for six base timeouts while rank
            // 1 broadcasts 96 MiB to it: more than loopback socket buffers
            // hold, so rank 1's writer must wait that long too. (A send
            // timeout bounds one blocked `send`, and one making partial
            // progress returns early: measured, the old timeout fails the
            // writer after about three.)
            c.set_timeout(base * 12).expect("widen");
            let mut data = vec![rank as u8; 96 << 20];
            if rank == 0 {
                thread::sleep(base * 6);
            }
            let widened = c.broadcast_bytes(&mut data, 1).and_then(|()| c.barrier());
            let received = data.iter().all(|&b| b == 1);
            c.set_timeout(Duration::from_millis(300)).expect("narrow");
            if rank == 0 {
                thread::sleep(Duration::from_millis(1000));
            }
            let narrowed = c.barrier();
            (widened, received, narrowed)
        },
    );
    for (r, (widened, received, narrowed)) in results.into_iter().enumerate() {
        assert!(widened.is_ok() && received, "rank {r}: {widened:?}");
        if r == 1 {
            assert!(
                matches!(narrowed, Err(DistError::Timeout { .. })),
                "{narrowed:?}"
            );
        }
    }
}

#[test]
fn ranks_calling_different_collectives_get_a_protocol_error_not_garbage() {
    let results = world(2, |c| {
        if c.rank() == 0 {
            let mut out = vec![0f32; 2];
            c.all_gather(&[1.0], &[1, 1], &mut out).err()
        } else {
            let mut data = vec![1.0f32; 2];
            c.all_reduce_sum(&mut data).err()
        }
    });
    let messages: Vec<String> = results
        .into_iter()
        .flatten()
        .map(|e| e.to_string())
        .collect();
    assert!(
        messages.iter().any(|m| m.contains("different orders")),
        "{messages:?}"
    );
}
