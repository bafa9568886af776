//! Loopback bandwidth of each TCP collective, next to a plain memcpy of the
//! same bytes measured in the same run. Ranks are threads of this process,
//! connected over 127.0.0.1 exactly as separate processes would be.
//!
//! ```sh
//! cargo run --release -p moe-worker --example collective_bench -- --ranks 4
//! ```
//!
//! Bandwidths follow the nccl-tests convention: `algbw = bytes / time`
//! (bytes = one rank's buffer), and `busbw = algbw × factor`, the factor
//! being what each rank must move over its links per byte of buffer for the
//! best possible algorithm (all-reduce `2(p−1)/p`; reduce-scatter,
//! all-gather, all-to-all `(p−1)/p`; broadcast `1`), so busbw is comparable
//! across collectives and with the memcpy figure. Time runs from the first
//! rank's start to the last rank's end (after a barrier), best of
//! `--iterations` after one warm-up. `tcp` is one loopback
//! TCP stream of the same bytes (one writer thread, one reader): the
//! transport's ceiling on this machine.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use moe_worker::dist::rendezvous::Store;
use moe_worker::dist::{Collective, DistError, TcpCollective, TcpSetup};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    /// Buffer sizes per rank, in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 16, 64])]
    mib: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    iterations: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    AllReduce,
    ReduceScatter,
    AllGather,
    AllToAll,
    Broadcast,
}

const OPS: [Op; 5] = [
    Op::AllReduce,
    Op::ReduceScatter,
    Op::AllGather,
    Op::AllToAll,
    Op::Broadcast,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllGather => "all_gather",
            Op::AllToAll => "all_to_all",
            Op::Broadcast => "broadcast",
        }
    }

    fn bus_factor(self, p: usize) -> f64 {
        let p = p as f64;
        match self {
            Op::AllReduce => 2.0 * (p - 1.0) / p,
            Op::ReduceScatter | Op::AllGather | Op::AllToAll => (p - 1.0) / p,
            Op::Broadcast => 1.0,
        }
    }

    /// Runs the collective once on a buffer of `n` floats per rank.
    fn run(self, c: &mut TcpCollective, buf: &mut [f32], out: &mut [f32]) -> Result<(), DistError> {
        let p = c.size();
        let n = buf.len();
        let even = vec![n / p; p];
        match self {
            Op::AllReduce => c.all_reduce_sum(buf),
            Op::ReduceScatter => c.reduce_scatter_sum(buf, &even, &mut out[..n / p]),
            Op::AllGather => c.all_gather(&buf[..n / p], &even, out),
            Op::AllToAll => c.all_to_all(buf, &even, out, &even),
            Op::Broadcast => c.broadcast(buf, 0),
        }
    }
}

/// Best time of copying `bytes` bytes between two buffers (the same bytes
/// a collective moves, through the same memory system, in the same run).
fn memcpy_seconds(bytes: usize, iterations: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // fault the pages in first
    (0..iterations)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Best time of pushing `bytes` bytes through one loopback TCP connection
/// (a writer thread, this thread reading): the transport's own ceiling.
fn tcp_stream_seconds(bytes: usize, iterations: usize) -> std::io::Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut writer = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (mut reader, _) = listener.accept()?;
    let payload = vec![1u8; bytes];
    let mut sink = vec![0u8; bytes];
    let mut best = f64::INFINITY;
    thread::scope(|scope| -> std::io::Result<()> {
        let sender = scope.spawn(move || -> std::io::Result<()> {
            for _ in 0..=iterations {
                writer.write_all(&payload)?;
            }
            Ok(())
        });
        for i in 0..=iterations {
            let t = Instant::now();
            reader.read_exact(&mut sink)?;
            if i > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
        sender
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("writer panicked")))
    })?;
    Ok(best)
}

fn connect(
    rank: usize,
    ranks: usize,
    coordinator: SocketAddr,
    store: Option<Store>,
) -> Result<TcpCollective, DistError> {
    TcpCollective::connect(TcpSetup {
        rank,
        world_size: ranks,
        attempt: 0,
        config_hash: 0,
        coordinator: coordinator.to_string(),
        store,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rendezvous_timeout: Duration::from_secs(30),
        collective_timeout: Duration::from_secs(120),
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let p = args.ranks;
    let sizes: Vec<usize> = args.mib.iter().map(|m| m * (1 << 20) / 4 / p * p).collect();
    let store = Store::bind("127.0.0.1:0")?;
    let coordinator = store.local_addr()?;
    let store = Mutex::new(Some(store));
    // spans[rank][(op, size)][iteration]: when the rank started and ended.
    type Spans = Vec<Vec<(Instant, Instant)>>;
    let times: Vec<Result<Spans, DistError>> = thread::scope(|scope| {
        let handles: Vec<_> = (0..p)
            .map(|rank| {
                let store = if rank == 0 {
                    store.lock().ok().and_then(|mut s| s.take())
                } else {
                    None
                };
                let sizes = &sizes;
                let iterations = args.iterations;
                scope.spawn(move || -> Result<Spans, DistError> {
                    let mut c = connect(rank, p, coordinator, store)?;
                    let mut results = Vec::new();
                    for &n in sizes {
                        let mut buf = vec![1.0f32; n];
                        let mut out = vec![0.0f32; n];
                        for op in OPS {
                            let mut samples = Vec::new();
                            for i in 0..=iterations {
                                c.barrier()?;
                                let t = Instant::now();
                                op.run(&mut c, &mut buf, &mut out)?;
                                if i > 0 {
                                    samples.push((t, Instant::now()));
                                }
                                buf.fill(1.0); // keep all-reduce sums from growing
                            }
                            results.push(samples);
                        }
                    }
                    Ok(results)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(DistError::Aborted {
                        cause: "rank thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let times = times.into_iter().collect::<Result<Vec<_>, _>>()?;
    println!(
        "{:<15} {:>9} {:>9} {:>11} {:>11} {:>12} {:>7} {:>9} {:>7}",
        "collective",
        "MiB/rank",
        "time ms",
        "algbw GB/s",
        "busbw GB/s",
        "memcpy GB/s",
        "/memcpy",
        "tcp GB/s",
        "/tcp"
    );
    for (s, &n) in sizes.iter().enumerate() {
        let bytes = n * 4;
        let memcpy = bytes as f64 / memcpy_seconds(bytes, args.iterations) / 1e9;
        let tcp = bytes as f64 / tcp_stream_seconds(bytes, args.iterations)? / 1e9;
        for (o, op) in OPS.iter().enumerate() {
            let k = s * OPS.len() + o;
            // Per iteration from the first rank's start to the last rank's
            // end (a root returns once its sends are queued; its receivers
            // may start late and find the data waiting), then the best.
            let best = (0..args.iterations)
                .map(|i| {
                    let start = times.iter().map(|t| t[k][i].0).min();
                    let end = times.iter().map(|t| t[k][i].1).max();
                    match (start, end) {
                        (Some(start), Some(end)) => (end - start).as_secs_f64(),
                        _ => f64::NAN,
                    }
                })
                .fold(f64::INFINITY, f64::min);
            let algbw = bytes as f64 / best / 1e9;
            let busbw = algbw * op.bus_factor(p);
            println!(
                "{:<15} {:>9.1} {:>9.2} {:>11.2} {:>11.2} {:>12.2} {:>7.3} {:>9.2} {:>7.3}",
                op.name(),
                bytes as f64 / (1 << 20) as f64,
                best * 1e3,
                algbw,
                busbw,
                memcpy,
                busbw / memcpy,
                tcp,
                busbw / tcp
            );
        }
    }
    Ok(())
}
