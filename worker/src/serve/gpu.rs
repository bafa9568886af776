//! `device: cuda` for a one-process server (feature `cuda`): the GPU
//! engine (`crate::cuda::serve`) where the model allows it, else the CPU
//! engine with a warning that names why. A GPU that cannot be opened (no
//! driver, no cuBLASLt) is an error naming the library, as in training:
//! asking for a GPU and silently computing on the CPU would hide a broken
//! node.

use crate::cuda::serve::DeviceEngine;
use crate::ops::packed_linear::WeightPrecision;
use crate::serve::backend::Backend;
use crate::serve::model::ServeModel;
use crate::serve::{ServeError, ServeOptions, device};

/// Where a model is served.
pub(crate) enum Placement {
    /// On the GPU: the engine with its device cache of `kv_pages` pages,
    /// and the bytes of its weights.
    Gpu {
        backend: Backend,
        kv_pages: usize,
        weight_bytes: usize,
    },
    /// On the CPU (the model is handed back).
    Cpu(Box<ServeModel>),
}

pub(crate) fn place(model: ServeModel, options: &ServeOptions) -> Result<Placement, ServeError> {
    if let Some(why) = device::unsupported(&model) {
        tracing::warn!("device cuda: this model is served on the CPU: {why}");
        return Ok(Placement::Cpu(Box::new(model)));
    }
    if options.weights != WeightPrecision::F32 {
        tracing::warn!(
            precision = ?options.weights,
            "device cuda: the GPU engine keeps weights in f32 (TF32 GEMMs); the serving \
             precision applies to the CPU engine only so far"
        );
    }
    if options.threads > 1 {
        tracing::info!("device cuda: --threads does not apply to the GPU engine");
    }
    let device_error = |e: crate::cuda::GpuError| ServeError::Device(e.to_string());
    let (gpu, ordinal) = crate::cuda::open_process_gpu().map_err(device_error)?;
    tracing::info!(
        device = %gpu.name().unwrap_or_default(),
        arch = gpu.arch(),
        ordinal,
        "serving on the GPU"
    );
    // NVRTC and cuBLASLt are opened lazily; here, so a node without them
    // fails at startup naming the library rather than on the first request
    // (which would also pay the kernels' compile time, ~3 s).
    gpu.warm_up().map_err(device_error)?;
    gpu.blas().map_err(device_error)?;
    let engine = DeviceEngine::new(gpu, &model).map_err(device_error)?;
    drop(model);
    let weight_bytes = engine.weight_bytes();
    let kv_pages = super::kv_pages(engine.kv_shape(options.page_size), options)?;
    let backend = Backend::cuda(engine, options.page_size, kv_pages).map_err(device_error)?;
    Ok(Placement::Gpu {
        backend,
        kv_pages,
        weight_bytes,
    })
}
