//! MoE layer forward + backward throughput on the CPU, in GFLOP/s of the
//! layer's GEMMs. `worker/benches/moe_layer_vs_torch.py` runs it beside the
//! same layer in PyTorch; prints one JSON line.
//!
//! ```sh
//! cargo run --release -p moe-worker --example moe_layer_bench -- --tokens 4096
//! # the same pass on 1 thread and on a pool of 2, alternating; the ratio, and
//! # a check that both give the same bits:
//! cargo run --release -p moe-worker --example moe_layer_bench -- --tokens 4096 --threads 2
//! ```

use std::time::Instant;

use clap::Parser;
use moe_worker::moe::{MoeConfig, MoeLayer, MoeParams, ScoreFunction};
use moe_worker::rng::SplitMix64;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    #[arg(long, default_value_t = 64)]
    experts: usize,
    #[arg(long, default_value_t = 8)]
    top_k: usize,
    #[arg(long, default_value_t = 1)]
    shared: usize,
    #[arg(long, default_value_t = 256)]
    expert_hidden: usize,
    /// Leave glibc's allocator at its defaults (returning freed memory to the
    /// kernel) instead of the worker's policy, `memory::keep_freed_memory`.
    #[arg(long)]
    default_malloc: bool,
    /// Timed forward + backward passes (after one untimed warm-up); the best is reported.
    #[arg(long, default_value_t = 3)]
    iterations: usize,
    /// Above 1: each iteration runs the pass on one thread and then inside
    /// a rayon pool of this many (`moe-worker train --threads`), and the
    /// line reports both, their ratio, and whether their bits agree.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// Multiply-adds × 2 of every GEMM in one forward + backward: the router,
/// each token's `top_k` routed experts and the shared experts, three
/// matrices per expert; the backward pass has two GEMMs per forward GEMM
/// (input and weight gradients). Elementwise work is not counted.
fn flops(a: &Args) -> f64 {
    let (t, h) = (a.tokens as f64, a.hidden as f64);
    let router = 2.0 * t * h * a.experts as f64;
    let expert_rows = t * (a.top_k + a.shared) as f64;
    let experts = expert_rows * 3.0 * 2.0 * h * a.expert_hidden as f64;
    3.0 * (router + experts)
}

/// This thread's CPU time in seconds (Linux, 10 ms resolution): on a
/// shared machine it leaves out the time other processes held the core.
fn thread_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => (user + system) / 100.0,
        _ => f64::NAN,
    }
}

fn main() {
    let args = Args::parse();
    if !args.default_malloc {
        // As `moe-worker` runs.
        moe_worker::memory::keep_freed_memory();
    }
    let config = MoeConfig {
        hidden: args.hidden,
        n_routed_experts: args.experts,
        expert_hidden: args.expert_hidden,
        n_shared_experts: args.shared,
        shared_expert_hidden: args.expert_hidden,
        top_k: args.top_k,
        score_function: ScoreFunction::Sigmoid,
        group_limit: None,
        normalize_gates: true,
        routed_scaling_factor: 1.0,
        aux_loss_alpha: 0.0,
    };
    let mut rng = SplitMix64::new(1);
    let std = 1.0 / (args.hidden as f64).sqrt();
    let params = MoeParams::<f32>::random(&config, &mut rng, std);
    let layer = MoeLayer::new(config.clone(), params).expect("valid benchmark shapes");
    let x: Vec<f32> = rng.normal_vec(args.tokens * args.hidden, 1.0);
    let dout: Vec<f32> = rng.normal_vec(args.tokens * args.hidden, 1.0);

    // As in training (and the PyTorch side): weight gradients live across
    // steps and are zeroed at the start of each. One pass: its wall and CPU
    // seconds, and what it computed.
    let pass = |grads: &mut MoeParams<f32>| {
        let started = Instant::now();
        let cpu_started = thread_cpu_seconds();
        for g in [
            &mut grads.router,
            &mut grads.experts_w1,
            &mut grads.experts_w3,
            &mut grads.experts_w2,
            &mut grads.shared_w1,
            &mut grads.shared_w3,
            &mut grads.shared_w2,
        ] {
            g.fill(0.0);
        }
        let pass = layer.forward(&x, args.tokens);
        let mut dx = vec![0.0f32; x.len()];
        layer.backward(&pass, &x, &dout, &mut dx, grads);
        let seconds = started.elapsed().as_secs_f64();
        let cpu_seconds = thread_cpu_seconds() - cpu_started;
        let load_max = pass.expert_load().into_iter().max().unwrap_or(0);
        (seconds, cpu_seconds, dx, load_max)
    };
    let pool = (args.threads > 1).then(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(args.threads)
            .build()
            .expect("a thread pool")
    });
    let mut grads = MoeParams::zeros(&config);
    let mut pooled_grads = MoeParams::zeros(&config);
    let (mut best, mut best_cpu, mut best_pooled) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let (mut load_max, mut same_bits) = (0, true);
    for i in 0..=args.iterations {
        let (seconds, cpu_seconds, dx, load) = pass(&mut grads);
        std::hint::black_box((&dx, &grads));
        load_max = load;
        if let Some(pool) = &pool {
            let (pooled, _, pooled_dx, _) = pool.install(|| pass(&mut pooled_grads));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            same_bits &= bits(&dx) == bits(&pooled_dx)
                && bits(&grads.experts_w1) == bits(&pooled_grads.experts_w1)
                && bits(&grads.experts_w2) == bits(&pooled_grads.experts_w2)
                && bits(&grads.router) == bits(&pooled_grads.router);
            if i > 0 {
                best_pooled = best_pooled.min(pooled);
            }
        }
        if i > 0 {
            best = best.min(seconds);
            best_cpu = best_cpu.min(cpu_seconds);
        }
    }
    let gflop = flops(&args) / 1e9;
    let pooled = if pool.is_some() {
        format!(
            ", \"pool\": {{\"threads\": {}, \"seconds\": {best_pooled:.4}, \"gflops\": {:.2}, \
             \"speedup\": {:.2}, \"sameBits\": {same_bits}}}",
            args.threads,
            gflop / best_pooled,
            best / best_pooled
        )
    } else {
        String::new()
    };
    println!(
        "{{\"implementation\": \"moe-worker\", \"threads\": 1, \"tokens\": {}, \"gflop\": {gflop:.3}, \
         \"seconds\": {best:.4}, \"gflops\": {:.2}, \"cpuSeconds\": {best_cpu:.2}, \"cpuGflops\": {:.2}, \
         \"expertLoadMax\": {load_max}{pooled}}}",
        args.tokens,
        gflop / best,
        gflop / best_cpu
    );
    if !same_bits {
        eprintln!("moe_layer_bench: the pool's pass gave other bits than one thread's");
        std::process::exit(1);
    }
}
