//! The machine's measured FP32 FMA peak: the ceiling the matmul benchmark's
//! GFLOP/s are read against (`docs/benchmarks.md`).
//!
//! Each thread runs independent chains of 8-wide fused multiply-adds
//! (AVX2 + FMA), enough chains to cover the FMA latency on every port, so
//! the loop is bound by FMA throughput alone. One thread gives the per-core
//! peak; one per core the whole machine's. Prints one JSON line.
//!
//! ```sh
//! cargo run --release -p moe-worker --example fma_peak
//! ```

use std::time::Instant;

/// FMAs each chain runs per measurement.
const ITERATIONS: u64 = 200_000_000;
/// Independent accumulators: latency (4-5 cycles) × FMA ports (2), rounded up.
const CHAINS: usize = 12;
const LANES: usize = 8;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains(iterations: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); CHAINS];
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    for _ in 0..iterations {
        for c in acc.iter_mut() {
            *c = _mm256_fmadd_ps(*c, a, b);
        }
    }
    let mut lanes = [0.0f32; LANES];
    let sum = acc
        .iter()
        .fold(_mm256_set1_ps(0.0), |s, &c| _mm256_add_ps(s, c));
    // SAFETY: `lanes` holds exactly 8 f32s.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    lanes.iter().sum()
}

/// GFLOP/s of one thread (an FMA counts as two FLOPs).
fn one_thread() -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        let started = Instant::now();
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        let sink = unsafe { fma_chains(ITERATIONS / CHAINS as u64) };
        let seconds = started.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        let flops = 2.0 * (ITERATIONS / CHAINS as u64 * CHAINS as u64 * LANES as u64) as f64;
        return flops / seconds / 1e9;
    }
    panic!("this benchmark needs x86-64 with AVX2 and FMA");
}

fn main() {
    one_thread(); // warm up: clocks ramp
    let per_core = (0..3).map(|_| one_thread()).fold(0.0, f64::max);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let all_cores: f64 = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..cores).map(|_| scope.spawn(one_thread)).collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    });
    println!(
        "{{\"fp32FmaGflopsPerCore\": {per_core:.1}, \"cores\": {cores}, \"fp32FmaGflopsAllCores\": {all_cores:.1}}}"
    );
}
