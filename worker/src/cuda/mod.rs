//! The CUDA backend (feature `cuda`): one module per op family, each a
//! launcher with the CPU reference's arguments over device slices
//! (`ops::rmsnorm::forward` ↔ `cuda::rmsnorm::forward`), so the two are
//! checked against each other op by op ([`check`]) and a model can move
//! between them. Kernels come from `moe-kernels`, compiled by NVRTC for the
//! device on first use; cuBLASLt does the GEMMs. Libraries load at run time:
//! on a host without them, [`Gpu::new`] returns a clear error and the CPU
//! path is untouched.

pub mod adamw;
pub mod attention;
pub mod bench;
pub mod check;
pub mod cross_entropy;
pub mod data_parallel;
pub mod dispatch;
pub mod embedding;
pub mod expert_gemm_check;
pub mod expert_grouped;
pub mod flash_attention;
pub mod fp8;
pub mod fp8_delayed;
pub mod fp8_gemm;
pub mod grouped_gemm;
pub mod lanes;
pub mod lora;
pub mod lt_plan;
pub mod matmul;
pub mod model;
pub mod moe_ep;
pub mod moe_ep_check;
pub mod moe_layer;
pub mod nccl_check;
pub mod paged_attention;
pub mod profile;
pub mod rmsnorm;
pub mod rope;
pub mod routing;
pub mod sequence_parallel;
pub mod serve;
pub mod serve_check;
pub mod serve_ep;
pub mod serve_replica_check;
pub mod swiglu;
pub mod train_bench;
pub mod train_check;
pub mod trainer;
pub mod ulysses_check;
pub mod vector;

use moe_kernels::cache::{KernelError, ModuleCache};
use moe_kernels::cudarc::cublaslt::CudaBlasLT;
use moe_kernels::cudarc::cublaslt::result::CublasError;
use moe_kernels::cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig,
    ValidAsZeroBits,
};
use moe_kernels::registry::Family;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "the CUDA driver library (libcuda.so.1) was not found: this host has no NVIDIA driver; \
         run with device: cpu, or on a GPU node"
    )]
    DriverMissing,
    #[error(
        "cuBLASLt (libcublasLt.so.13) was not found: install the CUDA 13 cuBLAS libraries \
         (the worker image ships them) or add their directory to LD_LIBRARY_PATH"
    )]
    BlasMissing,
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("cuBLASLt: {0:?}")]
    Blas(CublasError),
    #[error("not supported on the device yet: {0}")]
    Unsupported(String),
    #[error("cuBLASLt grouped GEMM: {0}")]
    Grouped(String),
    #[error("{0}")]
    Settings(String),
}

impl From<CublasError> for GpuError {
    fn from(error: CublasError) -> Self {
        Self::Blas(error)
    }
}

pub type Result<T> = std::result::Result<T, GpuError>;

/// One device: its context, the stream every op runs on, the compiled
/// kernel families and (created on first GEMM) a cuBLASLt handle.
pub struct Gpu {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: ModuleCache,
    blas: Mutex<Option<Arc<CudaBlasLT>>>,
    /// cuBLASLt workspace for the calls that bypass cudarc's safe API.
    workspace: std::sync::OnceLock<CudaSlice<u8>>,
    /// f32 GEMM plans by shape ([`lt_plan`]).
    plans: lt_plan::Plans,
    /// FP8 GEMM algorithms by shape ([`fp8_gemm`]).
    fp8_algos: fp8_gemm::Fp8Algos,
    profile: profile::Profile,
    /// cuBLASLt's grouped GEMM, or why it is not used ([`grouped_gemm`]);
    /// probed on first use.
    grouped: std::sync::OnceLock<std::result::Result<grouped_gemm::GroupedLt, String>>,
    /// Whether the routed experts use the grouped GEMM where it runs:
    /// `MOE_CUDA_GROUPED_GEMM` (off by default until proven on a GPU); the
    /// checks and benchmarks set it to compare.
    grouped_on: std::sync::atomic::AtomicBool,
    /// How many streams the per-expert GEMM loop spreads over ([`lanes`]),
    /// and those streams, made on first use.
    expert_streams: std::sync::atomic::AtomicUsize,
    lanes: std::sync::OnceLock<std::result::Result<Vec<lanes::Lane>, String>>,
}

/// Each cuBLASLt workspace's size: NVIDIA's recommendation on Hopper.
pub(crate) const WORKSPACE_BYTES: usize = 32 << 20;

impl Gpu {
    /// Opens device `ordinal`. Fails with [`GpuError::DriverMissing`] on a
    /// host without the driver, before cudarc would panic looking for it.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !moe_kernels::toolkit::driver_available() {
            return Err(GpuError::DriverMissing);
        }
        let setting = |name| std::env::var(name).ok();
        let expert_streams = lanes::stream_count(setting(lanes::STREAMS_VAR).as_deref())
            .map_err(GpuError::Settings)?;
        let grouped_on = grouped_gemm::enabled(setting(grouped_gemm::ENABLE_VAR).as_deref())
            .map_err(GpuError::Settings)?;
        let context = CudaContext::new(ordinal)?;
        if context.has_async_alloc() {
            keep_freed_memory(&context)?;
        }
        let stream = context.default_stream();
        let kernels = ModuleCache::new(context.clone())?;
        Ok(Self {
            context,
            stream,
            kernels,
            blas: Mutex::new(None),
            workspace: std::sync::OnceLock::new(),
            plans: lt_plan::Plans::default(),
            fp8_algos: fp8_gemm::Fp8Algos::default(),
            profile: profile::Profile::default(),
            grouped: std::sync::OnceLock::new(),
            grouped_on: std::sync::atomic::AtomicBool::new(grouped_on),
            expert_streams: std::sync::atomic::AtomicUsize::new(expert_streams),
            lanes: std::sync::OnceLock::new(),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The architecture the kernels are compiled for (e.g. `sm_90a`).
    pub fn arch(&self) -> &'static str {
        self.kernels.arch()
    }

    pub fn name(&self) -> Result<String> {
        Ok(self.context.name()?)
    }

    /// Compiles every family now, so timings never include NVRTC.
    pub fn warm_up(&self) -> Result<()> {
        Ok(self.kernels.warm_up(moe_kernels::registry::FAMILIES)?)
    }

    pub(crate) fn function(&self, family: &Family, entry: &str) -> Result<CudaFunction> {
        Ok(self.kernels.function(family, entry)?)
    }

    pub(crate) fn blas(&self) -> Result<Arc<CudaBlasLT>> {
        let mut blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = blas.as_ref() {
            return Ok(handle.clone());
        }
        // SAFETY: only probes the loader for the library's names.
        if !unsafe { moe_kernels::cudarc::cublaslt::sys::is_culib_present() } {
            return Err(GpuError::BlasMissing);
        }
        let handle = Arc::new(CudaBlasLT::new(self.stream.clone())?);
        *blas = Some(handle.clone());
        Ok(handle)
    }

    /// cuBLASLt's grouped GEMM when this GPU and library run it and it is
    /// not turned off; else why not.
    pub(crate) fn grouped_gemm(&self) -> std::result::Result<&grouped_gemm::GroupedLt, String> {
        use std::sync::atomic::Ordering;
        if !self.grouped_on.load(Ordering::Relaxed) {
            return Err(format!("off ({}=1 turns it on)", grouped_gemm::ENABLE_VAR));
        }
        self.grouped_gemm_support()
    }

    /// cuBLASLt's grouped GEMM if this GPU and library run it, whether or
    /// not the routed experts use it now; else why not.
    pub fn grouped_gemm_support(&self) -> std::result::Result<&grouped_gemm::GroupedLt, String> {
        let probed = self.grouped.get_or_init(|| match self.blas() {
            Ok(_) => grouped_gemm::GroupedLt::probe(self.arch()),
            Err(error) => Err(error.to_string()),
        });
        probed.as_ref().map_err(Clone::clone)
    }

    /// Lets the routed experts use the grouped GEMM where it runs, or keeps
    /// them on the per-expert loop (the checks and the benchmark run both);
    /// returns the previous setting.
    pub fn set_grouped_gemm(&self, on: bool) -> bool {
        self.grouped_on
            .swap(on, std::sync::atomic::Ordering::Relaxed)
    }

    /// How many streams the per-expert GEMM loop spreads over (1: the
    /// main stream only); `MOE_CUDA_EXPERT_STREAMS`, 1 by default.
    pub fn expert_streams(&self) -> usize {
        self.expert_streams
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets [`Self::expert_streams`] (the checks and the benchmark compare
    /// counts); returns the previous count.
    pub fn set_expert_streams(&self, count: usize) -> usize {
        self.expert_streams
            .swap(count.max(1), std::sync::atomic::Ordering::Relaxed)
    }

    /// The first `wanted` lanes (made on first use: at least four, so a
    /// comparison with fewer asked for can still run four).
    pub(crate) fn lanes(&self, wanted: usize) -> Result<&[lanes::Lane]> {
        let made = self.lanes.get_or_init(|| {
            (0..wanted.max(4))
                .map(|_| lanes::Lane::new(self))
                .collect::<Result<Vec<_>>>()
                .map_err(|e| e.to_string())
        });
        match made {
            Ok(lanes) => Ok(&lanes[..wanted.min(lanes.len())]),
            Err(error) => Err(GpuError::Unsupported(format!("expert streams: {error}"))),
        }
    }

    pub(crate) fn lanes_made(&self) -> Option<&std::result::Result<Vec<lanes::Lane>, String>> {
        self.lanes.get()
    }

    /// The CUDA libraries this process runs on, for reports: the driver's
    /// CUDA version, cuBLASLt's and NVRTC's, and whether the routed
    /// experts' GEMMs are grouped (and if not, why).
    pub fn libraries(&self) -> String {
        use moe_kernels::cudarc::{driver, nvrtc};
        let mut driver_version = 0;
        // SAFETY: the driver is loaded (this Gpu has a context); the call
        // writes one int.
        let driver = unsafe { driver::sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_or_else(
                |e| format!("unknown ({e:?})"),
                |()| format!("{}.{}", driver_version / 1000, driver_version % 1000 / 10),
            );
        let (mut major, mut minor) = (0, 0);
        // SAFETY: NVRTC is loaded (the kernels compiled); writes two ints.
        let nvrtc = unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_or_else(
                |e| format!("unknown ({e:?})"),
                |()| format!("{major}.{minor}"),
            );
        let cublaslt = match self.blas() {
            // SAFETY: cuBLASLt is loaded (a handle exists).
            Ok(_) => grouped_gemm::version_string(unsafe {
                moe_kernels::cudarc::cublaslt::sys::cublasLtGetVersion()
            }),
            Err(error) => format!("missing ({error})"),
        };
        let grouped = match (self.grouped_gemm_support(), self.grouped_gemm()) {
            (Ok(_), Ok(_)) => "runs here, in use".to_string(),
            (Ok(_), Err(why)) => format!("runs here, {why}"),
            (Err(why), _) => format!("not here: {why}"),
        };
        format!(
            "driver CUDA {driver}, cuBLASLt {cublaslt}, NVRTC {nvrtc}; grouped expert GEMMs: \
             {grouped}; per-expert GEMMs over {} stream(s)",
            self.expert_streams()
        )
    }

    pub(crate) fn plans(&self) -> &lt_plan::Plans {
        &self.plans
    }

    pub(crate) fn fp8_algos(&self) -> &fp8_gemm::Fp8Algos {
        &self.fp8_algos
    }

    /// 32 MiB of cuBLASLt workspace (NVIDIA's recommendation on Hopper).
    pub(crate) fn workspace(&self) -> Result<&CudaSlice<u8>> {
        if let Some(workspace) = self.workspace.get() {
            return Ok(workspace);
        }
        let buffer = self.zeros::<u8>(WORKSPACE_BYTES)?;
        Ok(self.workspace.get_or_init(|| buffer))
    }

    /// Copies host values to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, values: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(values)?)
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: DeviceRepr>(&self, values: &CudaSlice<T>) -> Result<Vec<T>> {
        let host = self.stream.clone_dtoh(values)?;
        self.stream.synchronize()?;
        Ok(host)
    }

    /// A buffer the next kernel writes in full, so it is not zeroed first:
    /// a memset costs as much bandwidth as the memory-bound kernels it would
    /// precede. Only for outputs that kernel writes element by element
    /// before anything reads them.
    pub(crate) fn output<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: uninitialised device memory is unsafe only to read, and
        // callers overwrite all of it first (see above).
        Ok(unsafe { self.stream.alloc::<T>(len) }?)
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros(len)?)
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Whether the context still answers: the stream drains and a value
    /// makes the round trip. After a kernel fault (an illegal address, a
    /// trap) every call on the context fails, so this does too.
    pub fn healthy(&self) -> Result<()> {
        self.synchronize()?;
        let probe = self.download(&self.upload(&[1.5f32, -2.0])?)?;
        if probe == [1.5, -2.0] {
            Ok(())
        } else {
            Err(GpuError::Unsupported(format!(
                "the health probe read back {probe:?}"
            )))
        }
    }
}

/// The process's GPU, for the process's lifetime (one training run or one
/// server per process, so it is leaked rather than threaded through as a
/// borrow): the local rank's (`MOE_LOCAL_RANK`, set by the launcher; with
/// more local ranks than GPUs they take turns, see
/// [`crate::dist::env::gpu_ordinal`]), else device 0. Returns the ordinal too.
pub fn open_process_gpu() -> Result<(&'static Gpu, usize)> {
    let local_rank = std::env::var(moe_crds::contract::env::LOCAL_RANK)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    if !moe_kernels::toolkit::driver_available() {
        return Err(GpuError::DriverMissing);
    }
    let devices = usize::try_from(CudaContext::device_count()?).unwrap_or(0);
    let ordinal = crate::dist::env::gpu_ordinal(local_rank, devices);
    if ordinal != local_rank {
        tracing::warn!(
            local_rank,
            devices,
            ordinal,
            "more local ranks than GPUs: this rank shares GPU {ordinal} (NCCL refuses that; \
             MOE_COLLECTIVE_BACKEND=tcp runs it)"
        );
    }
    let gpu = Gpu::new(ordinal)?;
    Ok((Box::leak(Box::new(gpu)), ordinal))
}

/// Buffers come from the device's stream-ordered memory pool
/// (`cuMemAllocAsync`), which by default hands freed memory back to the
/// driver at every synchronisation — and a training step synchronises once
/// per MoE layer (to size the expert GEMMs), so each layer's activations
/// would be mapped afresh. Keeping freed memory in the pool makes the
/// step's allocations cheap after the first.
fn keep_freed_memory(context: &CudaContext) -> Result<()> {
    use moe_kernels::cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` receives the device's default pool, which lives as long
    // as the context; the attribute takes a u64 byte count.
    unsafe {
        context.bind_to_thread()?;
        sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()?;
    }
    Ok(())
}

/// A 1-D launch over `blocks` blocks of `threads` threads.
pub(crate) fn grid(blocks: usize, threads: u32, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (u32::try_from(blocks).expect("grid too large"), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes,
    }
}

/// Enough blocks of 256 threads for a grid-stride loop over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    grid(n.div_ceil(256).clamp(1, 65_535), 256, 0)
}

/// A dimension as the kernels' `int`.
pub(crate) fn int(n: usize) -> i32 {
    i32::try_from(n).expect("dimension exceeds i32")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a host without the NVIDIA driver (CI), opening a GPU is a clear
    /// error, not a panic inside cudarc's loader. On a GPU host it opens.
    #[test]
    fn opening_a_gpu_without_the_driver_is_a_clear_error() {
        let result = Gpu::new(0);
        if moe_kernels::toolkit::driver_available() {
            // A GPU host: opening succeeds unless NVRTC or the headers are missing.
            if let Ok(gpu) = result {
                assert!(gpu.arch().starts_with("sm_"));
            }
            return;
        }
        // No driver (CI): exactly this error, naming the library and the way out.
        let error = result.err().expect("a host without the driver has no GPU");
        assert!(matches!(error, GpuError::DriverMissing), "{error}");
        let message = error.to_string();
        assert!(
            message.contains("libcuda.so.1") && message.contains("device: cpu"),
            "{message}"
        );
    }
}
