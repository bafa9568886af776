//! `moe-gpu-check`: every CUDA op against its CPU reference, then the GPU
//! benchmarks, on this host's GPU; writes a Markdown and a JSON report.
//! Exits 1 when any check fails, 2 when the GPU or CUDA libraries are
//! missing. Run by kernels/gpu-check.sh on a GPU machine.

use clap::Parser;
use moe_worker::cuda::{Gpu, bench, check};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Checks every CUDA op against the CPU reference and benchmarks the GPU")]
struct Args {
    /// Directory for gpu-report.md and gpu-report.json.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Skip the benchmarks (correctness checks only).
    #[arg(long)]
    checks_only: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Run only the check groups whose names contain one of these
    /// (comma-separated, e.g. `fp8,flash`); every group by default.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// Only the selected groups after this one (its whole name): how a run
    /// whose CUDA context a group broke goes on, in a fresh process.
    #[arg(long)]
    after: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    let selected = check::select_groups(&args.groups).and_then(|groups| match &args.after {
        Some(after) => check::groups_after(groups, after),
        None => Ok(groups),
    });
    let groups = match selected {
        Ok(groups) => groups,
        Err(error) => {
            eprintln!("moe-gpu-check: {error}");
            return ExitCode::from(2);
        }
    };
    let gpu = match Gpu::new(args.device) {
        Ok(gpu) => gpu,
        Err(error) => {
            eprintln!("moe-gpu-check: {error}");
            return ExitCode::from(2);
        }
    };
    let mut md = String::new();
    let name = gpu.name().unwrap_or_else(|e| format!("unknown ({e})"));
    md.push_str(&format!(
        "# moe-gpu-check\n\ndevice: {name}, kernels compiled for {}\n\n",
        gpu.arch()
    ));
    let compile_started = Instant::now();
    if let Err(error) = gpu.warm_up() {
        eprintln!("moe-gpu-check: {error}");
        return ExitCode::from(2);
    }
    md.push_str(&format!(
        "NVRTC compile + load of every family: {:.2} s\n\nlibraries: {}\n\n",
        compile_started.elapsed().as_secs_f64(),
        gpu.libraries()
    ));
    print!("{md}");
    // The routed experts' grouped GEMMs and expert streams are unproven on
    // a GPU: every group but their own ("grouped gemm" and "expert
    // streams", which hold them to the plain loop) runs the per-expert loop
    // on the main stream, so that a fault in them cannot cost the others;
    // the benchmarks use each only once its checks have passed.
    gpu.set_grouped_gemm(false);
    let streams = gpu.set_expert_streams(1);

    // Each group's outcome as it ends (and its failures), so a run cut
    // short by a timeout still shows what it finished.
    let (checks, end) = check::run_groups(&gpu, &groups, |name, results, elapsed| {
        let failed: Vec<_> = results.iter().filter(|c| !c.passed).collect();
        println!(
            "group {name}: {} passed, {} failed ({:.1} s)",
            results.len() - failed.len(),
            failed.len(),
            elapsed.as_secs_f64()
        );
        for check in failed {
            println!("  {check}");
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    });
    let failed = checks.iter().filter(|c| !c.passed).count();
    let proven = |prefix: &str| {
        let mine: Vec<_> = checks.iter().filter(|c| c.op.starts_with(prefix)).collect();
        !mine.is_empty() && mine.iter().all(|c| c.passed)
    };
    gpu.set_grouped_gemm(proven("grouped_gemm"));
    // Proven, the benchmarks run what a tuned job would: the grouped GEMMs
    // where cuBLASLt has them, else the per-expert GEMMs over 4 streams.
    gpu.set_expert_streams(if proven("expert_streams") {
        streams.max(4)
    } else {
        1
    });
    let mut section = format!(
        "## Checks vs the CPU reference: {} passed, {failed} failed\n\n```\n",
        checks.len() - failed
    );
    for c in &checks {
        section.push_str(&format!("{c}\n"));
    }
    section.push_str("```\n\n");
    print!("{section}");
    md.push_str(&section);
    // The checks' report now, in case the benchmarks do not finish.
    if let Err(error) = std::fs::create_dir_all(&args.out)
        .and_then(|()| std::fs::write(args.out.join("gpu-report.md"), &md))
    {
        eprintln!(
            "moe-gpu-check: writing the report to {}: {error}",
            args.out.display()
        );
    }

    // A group broke the context: the groups after it, and the benchmarks,
    // run in a fresh process (its own report beside this one).
    let rest = match end {
        check::GroupsEnd::Finished => None,
        check::GroupsEnd::ContextLost(after) => Some(run_the_rest(&args, after)),
    };
    if let Some(rest) = &rest {
        println!("{rest}");
        md.push_str(&format!("{rest}\n\n"));
    }

    let mut figures = Vec::new();
    if !args.checks_only && rest.is_none() {
        let mut failures = Vec::new();
        match bench::run_all(&gpu) {
            Ok((f, failed)) => {
                figures = f;
                failures = failed;
            }
            Err(error) => failures.push(format!("CUDA error during the benchmarks: {error}")),
        }
        let mut section = String::from(
            "## Benchmarks\n\n| benchmark | ms | value | vs same-run baseline | of H200 datasheet |\n|---|---|---|---|---|\n",
        );
        for f in &figures {
            section.push_str(&format!(
                "| {} | {:.3} | {:.1} {} | {} | {} |\n",
                f.name,
                f.ms,
                f.value,
                f.unit,
                f.ratio
                    .as_ref()
                    .map_or("-".into(), |(base, r)| format!("{r:.2}x {base}")),
                f.of_datasheet
                    .map_or("-".into(), |r| format!("{:.0}%", r * 100.0)),
            ));
        }
        for failure in &failures {
            section.push_str(&format!("\nbenchmark failed: {failure}\n"));
        }
        print!("{section}");
        md.push_str(&section);
    }
    md.push_str(&format!(
        "\nwall time {:.1} s\n",
        started.elapsed().as_secs_f64()
    ));

    let json = serde_json::json!({
        "device": name,
        "arch": gpu.arch(),
        "checks": checks.iter().map(|c| serde_json::json!({
            "op": c.op, "case": c.case, "passed": c.passed, "error": c.error, "bound": c.bound,
        })).collect::<Vec<_>>(),
        "benchmarks": figures.iter().map(|f| serde_json::json!({
            "name": f.name, "ms": f.ms, "value": f.value, "unit": f.unit,
            "ratio": f.ratio.as_ref().map(|(b, r)| serde_json::json!({"baseline": b, "ratio": r})),
            "of_datasheet": f.of_datasheet,
        })).collect::<Vec<_>>(),
        "wall_s": started.elapsed().as_secs_f64(),
    });
    let written = std::fs::create_dir_all(&args.out)
        .and_then(|()| std::fs::write(args.out.join("gpu-report.md"), &md))
        .and_then(|()| {
            std::fs::write(
                args.out.join("gpu-report.json"),
                serde_json::to_string_pretty(&json).unwrap_or_default(),
            )
        });
    if let Err(error) = written {
        eprintln!(
            "moe-gpu-check: writing the report to {}: {error}",
            args.out.display()
        );
    }
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs this program again, in a fresh process with a fresh CUDA context,
/// on the selected groups after `after` (and the benchmarks, unless
/// checks only), its report in `<out>/after-<group>/`; says how it went.
fn run_the_rest(args: &Args, after: &str) -> String {
    let out = args
        .out
        .join(format!("after-{}", after.replace([' ', '+'], "-")));
    println!(
        "moe-gpu-check: group {after} left the CUDA context unusable; the groups after it run in a \
         fresh process, reporting to {}",
        out.display()
    );
    let mut command = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe),
        Err(error) => return format!("the groups after {after} did not run: {error}"),
    };
    command
        .arg("--out")
        .arg(&out)
        .args(["--device", &args.device.to_string(), "--after", after]);
    if !args.groups.is_empty() {
        command.args(["--groups", &args.groups.join(",")]);
    }
    if args.checks_only {
        command.arg("--checks-only");
    }
    match command.status() {
        Ok(status) => format!(
            "The groups after {after} ran in a fresh process ({status}): see {}/gpu-report.md.",
            out.display()
        ),
        Err(error) => format!("the groups after {after} did not run: {error}"),
    }
}
