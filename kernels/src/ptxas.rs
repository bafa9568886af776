//! The resource report of `ptxas -v`: registers, spills and stack per
//! kernel, which NVRTC's PTX does not tell (register allocation happens in
//! ptxas, or in the driver's JIT at load time).

use std::path::Path;
use std::process::Command;

/// What ptxas allocated for one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

impl KernelResources {
    pub fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// Assembles `ptx` for `arch` (the output is discarded) and parses the report.
pub fn resources(ptxas: &Path, ptx: &str, arch: &str) -> Result<Vec<KernelResources>, String> {
    let dir = tempfile_dir()?;
    let input = dir.join("kernel.ptx");
    std::fs::write(&input, ptx).map_err(|e| format!("writing {}: {e}", input.display()))?;
    let output = Command::new(ptxas)
        .arg(format!("--gpu-name={arch}"))
        .arg("--verbose")
        .arg(&input)
        .arg("--output-file")
        .arg(dir.join("kernel.cubin"))
        .output()
        .map_err(|e| format!("running {}: {e}", ptxas.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let output = output?;
    let report = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(format!("ptxas failed ({}):\n{report}", output.status));
    }
    Ok(parse(&report))
}

fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "moe-ptxas-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Parses `ptxas --verbose` output: a "Compiling entry function 'NAME'" line,
/// then "N bytes stack frame, N bytes spill stores, N bytes spill loads" and
/// "Used N registers".
pub fn parse(report: &str) -> Vec<KernelResources> {
    let mut kernels: Vec<KernelResources> = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            kernels.push(KernelResources {
                name,
                ..Default::default()
            });
        } else if let Some(current) = kernels.last_mut() {
            if line.contains("bytes stack frame") {
                current.stack_bytes = number_before(line, "bytes stack frame");
                current.spill_store_bytes = number_before(line, "bytes spill stores");
                current.spill_load_bytes = number_before(line, "bytes spill loads");
            } else if line.contains("Used ") && line.contains(" registers") {
                current.registers = number_after(line, "Used ");
            }
        }
    }
    kernels
}

fn number_before(line: &str, label: &str) -> u32 {
    line.split(label)
        .next()
        .and_then(|head| head.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn number_after(line: &str, label: &str) -> u32 {
    line.split(label)
        .nth(1)
        .and_then(|tail| tail.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_verbose_report() {
        let report = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'router_topk_f32' for 'sm_90a'
ptxas info    : Function properties for router_topk_f32
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'adamw_f32' for 'sm_90a'
ptxas info    : Function properties for adamw_f32
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 0 barriers, 420 bytes cmem[0]
";
        let kernels = parse(report);
        assert_eq!(kernels.len(), 2);
        assert_eq!(
            kernels[0],
            KernelResources {
                name: "router_topk_f32".into(),
                registers: 40,
                stack_bytes: 8,
                spill_store_bytes: 4,
                spill_load_bytes: 12,
            }
        );
        assert!(kernels[0].spills());
        assert_eq!(kernels[1].registers, 18);
        assert!(!kernels[1].spills());
    }
}
