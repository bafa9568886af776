//! Where the CUDA pieces the worker loads at run time live: NVRTC (and its
//! builtins library), the CUDA headers NVRTC needs for `cuda_bf16.h` and
//! `cuda_fp8.h`, and `ptxas` for the resource report. Nothing here is
//! needed at build time.
//!
//! A "CUDA home" is a directory with `include/`, `lib/` and `bin/`: a CUDA
//! toolkit, or the PyPI wheels `kernels/setup-cuda.sh` installs (whose
//! `nvidia/cu13` directory has that layout). Searched in order:
//! `MOE_CUDA_HOME`, the setup script's directory, `CUDA_HOME`, `CUDA_PATH`,
//! `/usr/local/cuda`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// NVRTC's major version this build binds to (cudarc's `cuda-13000`).
pub const CUDA_MAJOR: u32 = 13;

/// The wheel versions `kernels/setup-cuda.sh` installs; the directory name
/// must agree with the script's.
pub const SETUP_DIR_NAME: &str = "cuda-13.0.88";

/// A directory laid out as a CUDA toolkit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaHome {
    pub root: PathBuf,
}

impl CudaHome {
    pub fn include_dir(&self) -> PathBuf {
        self.root.join("include")
    }

    pub fn ptxas(&self) -> PathBuf {
        self.root.join("bin").join("ptxas")
    }

    fn lib_candidates(&self, file: &str) -> Vec<PathBuf> {
        ["lib", "lib64", "targets/x86_64-linux/lib"]
            .iter()
            .map(|dir| self.root.join(dir).join(file))
            .collect()
    }

    /// Whether the headers NVRTC needs are here.
    pub fn has_headers(&self) -> bool {
        self.include_dir().join("cuda_bf16.h").is_file()
            && self.include_dir().join("cuda_fp8.h").is_file()
    }
}

/// The directory `kernels/setup-cuda.sh` installs into.
pub fn setup_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("MOE_CUDA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/moe-operator")))?;
    Some(cache.join(SETUP_DIR_NAME).join("nvidia/cu13"))
}

/// Candidate CUDA homes, most specific first (existing directories only).
pub fn candidate_homes() -> Vec<CudaHome> {
    let from_env = |name: &str| std::env::var_os(name).map(PathBuf::from);
    [
        from_env("MOE_CUDA_HOME"),
        setup_dir(),
        from_env("CUDA_HOME"),
        from_env("CUDA_PATH"),
        Some(PathBuf::from("/usr/local/cuda")),
    ]
    .into_iter()
    .flatten()
    .filter(|root| root.is_dir())
    .map(|root| CudaHome { root })
    .collect()
}

/// The first candidate home with the CUDA headers.
pub fn find_home() -> Option<CudaHome> {
    candidate_homes().into_iter().find(CudaHome::has_headers)
}

/// `ptxas` from the first home that has one.
pub fn find_ptxas() -> Option<PathBuf> {
    candidate_homes()
        .into_iter()
        .map(|home| home.ptxas())
        .find(|path| path.is_file())
}

/// Loads NVRTC (and its builtins library) from the first CUDA home that has
/// it, before cudarc asks the dynamic loader for it by name: once a library
/// with that soname is loaded, the loader hands it out again, so cudarc finds
/// the wheel's NVRTC without `LD_LIBRARY_PATH`. Where no home has it, the
/// loader's own search (system paths, `LD_LIBRARY_PATH`) applies as usual.
///
/// Returns the path loaded, if any. Idempotent.
pub fn preload_nvrtc() -> Option<&'static Path> {
    static LOADED: OnceLock<Option<PathBuf>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let builtins = format!("libnvrtc-builtins.so.{CUDA_MAJOR}.0");
            let nvrtc = format!("libnvrtc.so.{CUDA_MAJOR}");
            candidate_homes().iter().find_map(|home| {
                let nvrtc_path = home
                    .lib_candidates(&nvrtc)
                    .into_iter()
                    .find(|p| p.is_file())?;
                // Builtins first: NVRTC opens it by name during compilation.
                if let Some(builtins_path) = home
                    .lib_candidates(&builtins)
                    .into_iter()
                    .find(|p| p.is_file())
                {
                    keep_loaded(&builtins_path);
                }
                keep_loaded(&nvrtc_path).then_some(nvrtc_path)
            })
        })
        .as_deref()
}

/// Opens a library and never closes it (the process keeps it for its life,
/// like the loader's own dependencies).
fn keep_loaded(path: &Path) -> bool {
    // SAFETY: NVIDIA's libraries run no unsound initialisers; loading one is
    // what cudarc does a moment later anyway.
    match unsafe {
        libloading::os::unix::Library::open(
            Some(path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
        )
    } {
        Ok(library) => {
            std::mem::forget(library);
            true
        }
        Err(_) => false,
    }
}

/// Whether NVRTC can be loaded (after [`preload_nvrtc`]).
pub fn nvrtc_available() -> bool {
    preload_nvrtc();
    // SAFETY: only probes the loader for the library's names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver library can be loaded (a GPU host).
pub fn driver_available() -> bool {
    // SAFETY: only probes the loader for the library's names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}
