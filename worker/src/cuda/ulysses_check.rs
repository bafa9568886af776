//! The check group "sequence parallel": the device's Ulysses layout
//! switches ([`super::sequence_parallel`]) against the CPU's
//! ([`SequenceParallel::to_heads`] and [`SequenceParallel::to_tokens`]),
//! two ranks in this process on their own threads over a loopback TCP world
//! (the device's rows through host memory, as ranks sharing one GPU move
//! them). Data movement only: the results must be the CPU's bit for bit.

use super::check::{Check, exact};
use super::sequence_parallel::{to_heads, to_tokens};
use super::serve_replica_check::{loopback_world, on_rank_threads};
use super::{Gpu, GpuError, Result};
use crate::dist::sequence_parallel::SequenceParallel;
use crate::rng::SplitMix64;

const RANKS: usize = 2;

/// Per switch (to heads, back to tokens): the device's bits and the CPU's.
type Switched = [(Vec<u32>, Vec<u32>); 2];

pub fn check_sequence_parallel(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    // (sequences, seq_len, heads, head_dim): GQA-like head counts, a head
    // width that is not a multiple of 4, one sequence.
    for (sequences, seq_len, heads, head_dim) in [(2, 8, 4, 16), (1, 6, 2, 3), (3, 4, 8, 8)] {
        let case =
            format!("{RANKS} ranks, {sequences} x {seq_len} tokens, {heads} heads of {head_dim}");
        let worlds = loopback_world(RANKS).map_err(|e| GpuError::Unsupported(e.to_string()))?;
        let run_rank = |rank: usize, world| -> std::result::Result<Switched, String> {
            let text = |e: &dyn std::fmt::Display| e.to_string();
            let sp = SequenceParallel::new(Box::new(world), seq_len).map_err(|e| text(&e))?;
            let local = sequences * sp.local_len() * heads * head_dim;
            let x: Vec<f32> = SplitMix64::new(400 + rank as u64).normal_vec(local, 1.0);
            let cpu_heads = sp.to_heads(&x, heads, head_dim);
            let cpu_back = sp.to_tokens(&cpu_heads, heads, head_dim);
            let x_d = gpu.upload(&x).map_err(|e| text(&e))?;
            let heads_d = to_heads(gpu, &sp, &x_d, heads, head_dim).map_err(|e| text(&e))?;
            let back_d = to_tokens(gpu, &sp, &heads_d, heads, head_dim).map_err(|e| text(&e))?;
            sp.take_failure().map_err(|e| text(&e))?;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let down = |d| gpu.download(d).map_err(|e| text(&e));
            Ok([
                (bits(&down(&heads_d)?), bits(&cpu_heads)),
                (bits(&down(&back_d)?), bits(&cpu_back)),
            ])
        };
        let results = on_rank_threads(worlds, &run_rank);
        for (rank, result) in results.into_iter().enumerate() {
            let case = format!("{case}, rank {rank}");
            match result {
                Ok([(heads_d, heads_cpu), (back_d, back_cpu)]) => {
                    checks.push(exact("ulysses.to_heads", &case, &heads_d, &heads_cpu));
                    checks.push(exact("ulysses.to_tokens", &case, &back_d, &back_cpu));
                }
                Err(error) => checks.push(Check {
                    op: "ulysses.run",
                    case,
                    passed: false,
                    error,
                    bound: "-".into(),
                }),
            }
        }
    }
    Ok(checks)
}
