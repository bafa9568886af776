//! The check group "nccl": the NCCL backend with a world of one rank (one
//! GPU cannot host several ranks of one communicator), every collective
//! against its local reference — in a world of one each is the identity
//! or a copy, so the comparisons are bit for bit and what they test is the
//! staging, the plans, the grouped send/recv and the watch around NCCL —
//! plus a sub-group, a refused call that must not abort, and the timeout
//! path: a kernel that spins past the collective's deadline on its stream,
//! which the watchdog must abort with `Timeout`, after which the
//! communicator answers `Aborted`.

use std::time::{Duration, Instant};

use moe_kernels::cudarc::driver::{LaunchConfig, PushKernelArg};

use super::check::{Check, exact};
use super::{Gpu, Result, data_parallel};
use crate::dist::Collective;
use crate::dist::error::DistError;
use crate::dist::nccl::{self, NcclCollective, collective::Reduce};

/// Spins for `ns` nanoseconds of the GPU's global timer.
const SPIN: &str = r#"
extern "C" __global__ void moe_spin(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < ns);
}
"#;

fn outcome(op: &'static str, case: &str, result: std::result::Result<(), String>) -> Check {
    Check {
        op,
        case: case.to_string(),
        passed: result.is_ok(),
        error: result.err().unwrap_or_else(|| "ok".into()),
        bound: "-".into(),
    }
}

fn failed(op: &'static str, case: &str, error: impl std::fmt::Display) -> Check {
    outcome(op, case, Err(error.to_string()))
}

/// Small integers, so every sum is exact.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + seed * 13) % 31) as f32 - 15.0)
        .collect()
}

fn bytes(n: usize, seed: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 + seed) as u8).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

pub fn check_nccl(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let version = match nccl::nccl_library() {
        Ok(v) => v,
        Err(e) => {
            checks.push(failed("nccl.library", "libnccl", e));
            return Ok(checks);
        }
    };
    checks.push(outcome(
        "nccl.library",
        &format!("version code {version}"),
        Ok(()),
    ));
    let started = Instant::now();
    let mut comm = match NcclCollective::single(gpu.context(), Duration::from_secs(60)) {
        Ok(comm) => comm,
        Err(e) => {
            checks.push(failed("nccl.init", "world 1", e));
            return Ok(checks);
        }
    };
    checks.push(outcome(
        "nccl.init",
        &format!("world 1, {:.0} ms", started.elapsed().as_secs_f64() * 1e3),
        Ok(()),
    ));
    collectives(&mut comm, &mut checks);
    device_entry_points(gpu, &mut comm, &mut checks);
    match comm.new_group(&[0]) {
        Ok(mut group) => {
            let data = values(1000, 9);
            let mut got = data.clone();
            let r = group.all_reduce_sum(&mut got).map_err(|e| e.to_string());
            checks.push(outcome("nccl.new_group", "split [0], all_reduce", r));
            checks.push(exact(
                "nccl.new_group",
                "all_reduce result",
                &bits(&got),
                &bits(&data),
            ));
        }
        Err(e) => checks.push(failed("nccl.new_group", "split [0]", e)),
    }
    // A refused call is the caller's bug: reported, nothing aborted.
    let refused = comm.all_to_all_bytes(&[1, 2], &[3], &mut [0, 0], &[2]);
    let still = comm.barrier();
    checks.push(outcome(
        "nccl.invalid_argument",
        "counts that do not add up",
        match (refused, still) {
            (Err(DistError::InvalidArgument { .. }), Ok(())) => Ok(()),
            (r, s) => Err(format!("refused {r:?}, then barrier {s:?}")),
        },
    ));
    overlapped_mean(gpu, &comm, &mut checks);
    expert_parallel_reduce(gpu, &mut comm, &mut checks);
    timeout_path(gpu, &mut comm, &mut checks);
    Ok(checks)
}

/// The expert-parallel gradient reduction over NCCL, device to device, in a
/// world of one whose expert group is a communicator split from it (the
/// sums are the tensors, the division by 1 keeps their bits) and whose
/// replicas are one rank: the tensors keep their bits and the squared norm
/// is their sum of squares.
fn expert_parallel_reduce(gpu: &Gpu, comm: &mut NcclCollective, checks: &mut Vec<Check>) {
    use crate::dist::expert_parallel::ExpertParallel;
    let case = "3 replicated + 2 expert tensors, world 1";
    let tensors: Vec<Vec<f32>> = [5usize, 4099, 0, 300, 17]
        .iter()
        .enumerate()
        .map(|(i, &n)| values(n, 40 + i))
        .collect();
    let is_expert = [false, true, false, true, false];
    let result = (|| -> std::result::Result<(Vec<u32>, f64), String> {
        let text = |e: &dyn std::fmt::Display| e.to_string();
        let group = comm.new_group(&[0]).map_err(|e| text(&e))?;
        let ep =
            ExpertParallel::new(group, Box::new(crate::dist::Solo), 4).map_err(|e| text(&e))?;
        let mut device = tensors
            .iter()
            .map(|t| gpu.upload(t))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| text(&e))?;
        let mut refs: Vec<_> = device.iter_mut().collect();
        let squares = data_parallel::reduce_expert_parallel(gpu, comm, &ep, &mut refs, &is_expert)
            .map_err(|e| text(&e))?;
        let mut all = Vec::new();
        for d in &device {
            all.extend(bits(&gpu.download(d).map_err(|e| text(&e))?));
        }
        Ok((all, squares))
    })();
    let expected: f64 = tensors
        .iter()
        .flatten()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    match result {
        Ok((got, squares)) => {
            checks.push(exact(
                "nccl.expert_parallel_reduce",
                case,
                &got,
                &bits(&tensors.concat()),
            ));
            checks.push(outcome(
                "nccl.expert_parallel_reduce",
                "squared norm",
                if (squares - expected).abs() <= 1e-9 * expected {
                    Ok(())
                } else {
                    Err(format!("{squares} vs {expected}"))
                },
            ));
        }
        Err(e) => checks.push(failed("nccl.expert_parallel_reduce", case, e)),
    }
}

/// The data-parallel mean overlapped with the backward pass, in a world of
/// one (each sum is the tensor, the division by 1 keeps its bits): every
/// gradient tensor is handed over exactly once, NCCL's stream waits for
/// the writes it reduces, and the gradients keep the bits of a plain pass.
fn overlapped_mean(gpu: &Gpu, comm: &NcclCollective, checks: &mut Vec<Check>) {
    use super::model::{DeviceGradients, DeviceModel, DeviceTensors};
    let case = "3-block model, world 1";
    let result = (|| -> std::result::Result<(Vec<u32>, Vec<u32>, usize, usize), String> {
        let config = super::train_check::config();
        let model = crate::model::Model::<f32>::initial(config.clone(), 7);
        let device = DeviceModel::upload(gpu, &model).map_err(|e| e.to_string())?;
        let tokens: Vec<u32> = (0..4 * config.seq_len)
            .map(|i| (i * 37 % 256) as u32)
            .collect();
        let pass = device
            .forward(gpu, &tokens, &tokens)
            .map_err(|e| e.to_string())?;
        let grads_bits = |grads: &DeviceGradients| -> std::result::Result<Vec<u32>, String> {
            let mut all = Vec::new();
            for t in grads.tensors() {
                all.extend(bits(&gpu.download(t).map_err(|e| e.to_string())?));
            }
            Ok(all)
        };
        let zeros =
            || DeviceGradients::zeros_like(gpu, device.weights()).map_err(|e| e.to_string());
        let mut plain = zeros()?;
        device
            .backward(gpu, &pass, &mut plain)
            .map_err(|e| e.to_string())?;
        let mut overlapped = zeros()?;
        let expected_tensors = overlapped.tensors().len();
        let mut handed = 0;
        {
            let mut mean = data_parallel::OverlappedMean::new(gpu, comm);
            device
                .backward_handing_over(
                    gpu,
                    &pass,
                    &mut overlapped,
                    Default::default(),
                    &mut |tensors| {
                        handed += tensors.len();
                        mean.start(tensors);
                        Ok(())
                    },
                )
                .map_err(|e| e.to_string())?;
            mean.finish().map_err(|e| e.to_string())?;
        }
        Ok((
            grads_bits(&overlapped)?,
            grads_bits(&plain)?,
            handed,
            expected_tensors,
        ))
    })();
    match result {
        Ok((got, expected, handed, tensors)) => {
            checks.push(exact("nccl.overlapped_mean", case, &got, &expected));
            checks.push(exact(
                "nccl.overlapped_mean",
                "tensors handed over",
                &[handed],
                &[tensors],
            ));
        }
        Err(e) => checks.push(failed("nccl.overlapped_mean", case, e)),
    }
}

fn collectives(comm: &mut NcclCollective, checks: &mut Vec<Check>) {
    for n in [0usize, 1, 7, 4099, (1 << 20) + 3] {
        let case = format!("{n} elements");
        let data = values(n, n);
        for (op, max) in [
            ("nccl.all_reduce_sum", false),
            ("nccl.all_reduce_max", true),
        ] {
            let mut got = data.clone();
            let r = if max {
                comm.all_reduce_max(&mut got)
            } else {
                comm.all_reduce_sum(&mut got)
            };
            checks.push(match r {
                Ok(()) => exact(op, &case, &bits(&got), &bits(&data)),
                Err(e) => failed(op, &case, e),
            });
        }
        let mut out = vec![f32::NAN; n];
        checks.push(match comm.reduce_scatter_sum(&data, &[n], &mut out) {
            Ok(()) => exact("nccl.reduce_scatter", &case, &bits(&out), &bits(&data)),
            Err(e) => failed("nccl.reduce_scatter", &case, e),
        });
        let raw = bytes(n, 3);
        let mut out = vec![0u8; n];
        checks.push(match comm.all_gather_bytes(&raw, &[n], &mut out) {
            Ok(()) => exact("nccl.all_gather", &case, &out, &raw),
            Err(e) => failed("nccl.all_gather", &case, e),
        });
        let mut out = vec![0u8; n];
        checks.push(match comm.all_to_all_bytes(&raw, &[n], &mut out, &[n]) {
            Ok(()) => exact("nccl.all_to_all", &case, &out, &raw),
            Err(e) => failed("nccl.all_to_all", &case, e),
        });
        let mut out = raw.clone();
        checks.push(match comm.broadcast_bytes(&mut out, 0) {
            Ok(()) => exact("nccl.broadcast", &case, &out, &raw),
            Err(e) => failed("nccl.broadcast", &case, e),
        });
    }
    let r = comm.barrier().map_err(|e| e.to_string());
    checks.push(outcome("nccl.barrier", "world 1", r));
}

fn device_entry_points(gpu: &Gpu, comm: &mut NcclCollective, checks: &mut Vec<Check>) {
    let data = values((1 << 16) + 5, 4);
    let case = format!("{} f32 on the device", data.len());
    let result = gpu
        .upload(&data)
        .map_err(|e| e.to_string())
        .and_then(|mut d| {
            comm.all_reduce_device(&mut d, Reduce::Sum)
                .map_err(|e| e.to_string())?;
            gpu.download(&d).map_err(|e| e.to_string())
        });
    checks.push(match result {
        Ok(got) => exact("nccl.all_reduce_device", &case, &bits(&got), &bits(&data)),
        Err(e) => failed("nccl.all_reduce_device", &case, e),
    });
    let raw = bytes(12_345, 5);
    let result = (|| -> std::result::Result<Vec<u8>, String> {
        let send = gpu.upload(&raw).map_err(|e| e.to_string())?;
        let mut recv = gpu.zeros::<u8>(raw.len()).map_err(|e| e.to_string())?;
        comm.all_to_all_device(&send, &[raw.len()], &mut recv, &[raw.len()])
            .map_err(|e| e.to_string())?;
        gpu.download(&recv).map_err(|e| e.to_string())
    })();
    checks.push(match result {
        Ok(got) => exact("nccl.all_to_all_device", "12345 bytes", &got, &raw),
        Err(e) => failed("nccl.all_to_all_device", "12345 bytes", e),
    });
    // The device trainer's data-parallel mean over NCCL (a world of one:
    // the sum is the tensor, the division by 1 keeps its bits), over
    // tensors of several sizes, an empty one included.
    let tensors: Vec<Vec<f32>> = [3usize, 0, 70_001, 128]
        .iter()
        .enumerate()
        .map(|(i, &n)| values(n, 20 + i))
        .collect();
    let case = "4 gradient tensors, world 1";
    let result = (|| -> std::result::Result<Vec<Vec<f32>>, String> {
        let mut device = tensors
            .iter()
            .map(|t| gpu.upload(t))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let mut refs: Vec<_> = device.iter_mut().collect();
        data_parallel::mean_over_nccl(gpu, comm, &mut refs).map_err(|e| e.to_string())?;
        device
            .iter()
            .map(|d| gpu.download(d).map_err(|e| e.to_string()))
            .collect()
    })();
    checks.push(match result {
        Ok(got) => exact(
            "nccl.data_parallel_mean",
            case,
            &bits(&got.concat()),
            &bits(&tensors.concat()),
        ),
        Err(e) => failed("nccl.data_parallel_mean", case, e),
    });
}

/// A 3 s kernel ahead of an all-reduce bounded at 300 ms: the watchdog
/// must abort at about 300 ms with `Timeout`, and later calls get
/// `Aborted`. Runs last: it ends the communicator.
fn timeout_path(gpu: &Gpu, comm: &mut NcclCollective, checks: &mut Vec<Check>) {
    let op = "nccl.timeout";
    let case = "3 s kernel ahead, 300 ms bound";
    let spin = moe_kernels::cudarc::nvrtc::compile_ptx(SPIN)
        .map_err(|e| format!("NVRTC: {e:?}"))
        .and_then(|ptx| {
            let module = gpu.context().load_module(ptx).map_err(|e| e.to_string())?;
            module.load_function("moe_spin").map_err(|e| e.to_string())
        });
    let spin = match spin {
        Ok(f) => f,
        Err(e) => return checks.push(failed(op, case, e)),
    };
    if let Err(e) = comm.set_timeout(Duration::from_millis(300)) {
        return checks.push(failed(op, case, e));
    }
    let mut data = match gpu.upload(&values(1024, 1)) {
        Ok(d) => d,
        Err(e) => return checks.push(failed(op, case, e)),
    };
    let ns: u64 = 3_000_000_000;
    let config = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = comm.stream().clone();
    let mut launch = stream.launch_builder(&spin);
    launch.arg(&ns);
    // SAFETY: the kernel takes one u64 and touches no memory.
    if let Err(e) = unsafe { launch.launch(config) } {
        return checks.push(failed(op, case, e));
    }
    let started = Instant::now();
    let result = comm.all_reduce_device(&mut data, Reduce::Sum);
    let waited = started.elapsed();
    checks.push(outcome(
        op,
        case,
        match &result {
            Err(DistError::Timeout { peer: None, .. })
                if waited >= Duration::from_millis(300) && waited < Duration::from_millis(2500) =>
            {
                Ok(())
            }
            other => Err(format!("after {waited:?}: {other:?}")),
        },
    ));
    let later = comm.barrier();
    checks.push(outcome(
        "nccl.aborted",
        "a call after the timeout",
        match later {
            Err(DistError::Aborted { .. }) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    ));
    // Let the spinning kernel end before the buffers and stream go.
    let _ = stream.synchronize();
}
