//! Every kernel family compiles with NVRTC for Hopper (sm_90a) and Ampere
//! (sm_80), and ptxas reports each kernel's registers and spills. Needs no
//! GPU: NVRTC and ptxas come from `kernels/setup-cuda.sh` (PyPI wheels).
//!
//! Where NVRTC is missing the test says so and passes, unless `CI=true`,
//! where a missing toolchain is a broken setup and fails.

use moe_kernels::compile::{compile, compile_all};
use moe_kernels::ptxas;
use moe_kernels::registry::FAMILIES;
use moe_kernels::toolkit;

const ARCHES: &[&str] = &["sm_90a", "sm_80"];

fn toolchain_or_skip() -> Option<toolkit::CudaHome> {
    let nvrtc = toolkit::nvrtc_available();
    let home = toolkit::find_home();
    if nvrtc && home.is_some() {
        return home;
    }
    let message = format!(
        "NVRTC {} (found: {nvrtc}) or the CUDA headers (found: {}) are missing; \
         run kernels/setup-cuda.sh (searched {:?})",
        toolkit::CUDA_MAJOR,
        home.is_some(),
        toolkit::candidate_homes()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    eprintln!("skipping: {message}");
    None
}

#[test]
fn compile_all_kernels() {
    let Some(home) = toolchain_or_skip() else {
        return;
    };
    let ptxas_path = toolkit::find_ptxas();
    if ptxas_path.is_none() && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("ptxas is missing: run kernels/setup-cuda.sh");
    }
    let mut failures = Vec::new();
    let mut report = String::new();
    let families: Vec<_> = FAMILIES.iter().collect();
    for &arch in ARCHES {
        for (family, ptx) in FAMILIES.iter().zip(compile_all(&families, arch, &home)) {
            let ptx = match ptx {
                Ok(ptx) => ptx.to_src(),
                Err(error) => {
                    failures.push(error.to_string());
                    continue;
                }
            };
            for entry in family.entry_points {
                assert!(
                    ptx.contains(&format!(".entry {entry}(")),
                    "{}.cu compiled for {arch} but has no entry {entry}",
                    family.id
                );
            }
            let Some(ptxas_path) = &ptxas_path else {
                continue;
            };
            match ptxas::resources(ptxas_path, &ptx, arch) {
                Ok(kernels) => {
                    assert_eq!(
                        kernels.len(),
                        family.entry_points.len(),
                        "ptxas reported a different number of kernels for {}.cu",
                        family.id
                    );
                    for k in kernels {
                        report.push_str(&format!(
                            "{arch:<7} {:<32} {:>3} registers  {:>4} B stack  {:>4}/{:<4} B spill st/ld{}\n",
                            k.name,
                            k.registers,
                            k.stack_bytes,
                            k.spill_store_bytes,
                            k.spill_load_bytes,
                            if k.spills() { "  SPILLS" } else { "" }
                        ));
                    }
                }
                Err(error) => failures.push(format!("{}.cu for {arch}: {error}", family.id)),
            }
        }
    }
    // Printed for the log (cargo test --nocapture, or on failure).
    println!("{report}");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// NVRTC compiles the families side by side in a process's warm-up
/// (`compile::compile_all`): the same PTX as one at a time, every family,
/// twice over (a compiler whose concurrent use were unsafe would show it
/// as a crash or a difference).
#[test]
fn parallel_compilation_gives_the_sequential_ptx() {
    let Some(home) = toolchain_or_skip() else {
        return;
    };
    let families: Vec<_> = FAMILIES.iter().collect();
    let arch = ARCHES[0];
    let sequential: Vec<String> = FAMILIES
        .iter()
        .map(|family| compile(family, arch, &home).expect("compiles").to_src())
        .collect();
    for round in 0..2 {
        let parallel = compile_all(&families, arch, &home);
        for ((family, want), got) in FAMILIES.iter().zip(&sequential).zip(parallel) {
            let got = got.expect("compiles").to_src();
            assert!(
                &got == want,
                "{}.cu: the parallel compile (round {round}) differs from the sequential one",
                family.id
            );
        }
    }
}
