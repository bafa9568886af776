//! One NVRTC options builder and the compile step, shared by the per-device
//! module cache and the compile check.

use crate::registry::Family;
use crate::toolkit::CudaHome;
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

/// The architecture NVRTC targets for a device of this compute capability:
/// the `a` variants on Hopper and Blackwell, where the arch-specific
/// instructions (wgmma, setmaxnreg) live.
pub fn arch_for(major: i32, minor: i32) -> Result<&'static str, CompileFailure> {
    Ok(match (major, minor) {
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90a",
        (10, 0) => "sm_100a",
        (10, 3) => "sm_103a",
        (12, 0) => "sm_120a",
        _ => {
            return Err(CompileFailure::UnsupportedArch { major, minor });
        }
    })
}

/// The options every family is compiled with.
pub fn options(arch: &'static str, home: &CudaHome, family: &Family) -> CompileOptions {
    CompileOptions {
        arch: Some(arch),
        include_paths: vec![home.include_dir().display().to_string()],
        // Line info costs nothing at run time and lets profilers map SASS to source.
        options: vec!["--std=c++17".into(), "--generate-line-info".into()],
        name: Some(format!("{}.cu", family.id)),
        ..Default::default()
    }
}

/// Compiles one family to PTX.
pub fn compile(
    family: &Family,
    arch: &'static str,
    home: &CudaHome,
) -> Result<Ptx, CompileFailure> {
    compile_ptx_with_opts(family.source(), options(arch, home, family)).map_err(|error| {
        CompileFailure::Nvrtc {
            family: family.id,
            arch,
            log: match &error {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().into_owned()
                }
                other => other.to_string(),
            },
        }
    })
}

/// Compiles `families` side by side, a thread each up to the host's
/// parallelism (NVRTC compiles separate programs concurrently; the test
/// `parallel_compilation_gives_the_sequential_ptx` holds the results to a
/// one-at-a-time compile): a process's first kernels cost the slowest
/// family's compile instead of the sum of all (about 3 s on a GPU host).
/// The results are in `families`' order.
pub fn compile_all(
    families: &[&Family],
    arch: &'static str,
    home: &CudaHome,
) -> Vec<Result<Ptx, CompileFailure>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, families.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<Result<Ptx, CompileFailure>>> =
        families.iter().map(|_| None).collect();
    let done = std::sync::Mutex::new(&mut results);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(family) = families.get(i) else {
                        break;
                    };
                    let result = compile(family, arch, home);
                    done.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|result| result.expect("every family was compiled"))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum CompileFailure {
    #[error("NVRTC could not compile {family}.cu for {arch}:\n{log}")]
    Nvrtc {
        family: &'static str,
        arch: &'static str,
        log: String,
    },
    #[error("compute capability {major}.{minor} is not supported (the kernels need 8.0 or newer)")]
    UnsupportedArch { major: i32, minor: i32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopper_gets_the_arch_specific_target() {
        assert_eq!(arch_for(9, 0).unwrap(), "sm_90a");
        assert_eq!(arch_for(8, 0).unwrap(), "sm_80");
        let error = arch_for(7, 5).unwrap_err().to_string();
        assert!(error.contains("7.5") && error.contains("8.0"), "{error}");
    }
}
