//! Kernels run on the host where there is no GPU: `kernels/emu/` compiles a
//! kernel family's CUDA C as C++ with a thread per CUDA thread, barriers for
//! its synchronisation and an emulation of the wmma fragments it uses (see
//! the header of each emulator), and checks its outputs against an f64
//! reference. NVRTC only proves the kernels compile; this runs their
//! indexing, masking, tiling and synchronisation. A C++20 compiler (`CXX`,
//! else `g++`) is required when `CI=true`, skipped with a note otherwise.

use std::path::Path;
use std::process::Command;

fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Builds `emu/<name>.cpp` and runs it; panics unless it exits 0.
fn run_emulator(name: &str) {
    let emu = Path::new(env!("CARGO_MANIFEST_DIR")).join("emu");
    let exe = std::env::temp_dir().join(format!("moe-{name}-{}", std::process::id()));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".to_owned());
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-w"])
        .arg(format!("-I{}", emu.join("include").display()))
        .arg(emu.join(format!("{name}.cpp")))
        .arg("-o")
        .arg(&exe)
        .status();
    match built {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("{cxx} failed to build emu/{name}.cpp: {status}"),
        Err(e) if !required() => {
            eprintln!(
                "skipping emu/{name}.cpp: no C++ compiler ({cxx}: {e}); CI=true makes this a failure"
            );
            return;
        }
        Err(e) => panic!("{cxx}: {e}"),
    }
    let run = Command::new(&exe).output().expect("the emulator runs");
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "emu/{name}: {}\n{stdout}{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn flash_attention_kernels_match_an_f64_reference_on_the_host() {
    run_emulator("flash_attention_emu");
}

#[test]
fn fp8_operand_quantisers_match_the_kernels_checked_on_a_gpu() {
    run_emulator("fp8_emu");
}

#[test]
fn serving_kv_write_and_paged_attention_match_an_f64_reference_on_the_host() {
    run_emulator("paged_attention_emu");
}

#[test]
fn embedding_backward_and_rope_slices_match_plain_loops_on_the_host() {
    run_emulator("embedding_rope_emu");
}

#[test]
fn dispatch_sort_permutes_and_overwriting_backward_kernels_match_plain_loops_on_the_host() {
    run_emulator("dispatch_emu");
}
