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
