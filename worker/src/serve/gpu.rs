//! `device: cuda` (feature `cuda`): the GPU engine (`crate::cuda::serve`)
//! where the model allows it, else the CPU engine with a warning that names
//! why; for one process ([`place`]) or for each rank of an expert-parallel
//! replica, holding its share of the experts ([`place_share`]). A GPU that
//! cannot be opened (no driver, no cuBLASLt) is an error naming the
//! library, as in training: asking for a GPU and silently computing on the
//! CPU would hide a broken node.

use crate::cuda::serve::DeviceEngine;
use crate::cuda::serve_ep::DeviceExchange;
use crate::dist::expert_parallel::ExpertParallel;
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
    let gpu = open(options)?;
    let engine = DeviceEngine::new(gpu, &model).map_err(device_error)?;
    drop(model);
    let (backend, kv_pages, weight_bytes) = with_cache(engine, options)?;
    Ok(Placement::Gpu {
        backend,
        kv_pages,
        weight_bytes,
    })
}

/// Where a rank of an expert-parallel replica serves its share.
pub(crate) enum SharePlacement {
    /// On this rank's GPU, its cache of `kv_pages` pages allocated.
    Gpu { backend: Backend, kv_pages: usize },
    /// On the CPU (the share and the exchanges are handed back).
    Cpu(Box<ServeModel>, ExpertParallel),
}

/// [`place`] for one rank of an expert-parallel replica, `model` holding
/// `ep`'s experts: the GPU engine exchanging its rows over `ep`'s
/// communicator, device to device over NCCL, else through host memory
/// ([`DeviceExchange`]). The decision depends on the model alone, so every rank of a replica takes
/// the same one (and a GPU rank and a CPU rank would agree anyway: both
/// exchange the same rows). `leader`: rank 0, the one that computes logits.
pub(crate) fn place_share(
    model: ServeModel,
    ep: ExpertParallel,
    options: &ServeOptions,
    leader: bool,
) -> Result<SharePlacement, ServeError> {
    let own = ep.local_experts();
    if let Some(why) = device::unsupported_share(&model, Some(&own)) {
        tracing::warn!("device cuda: this expert-parallel rank is served on the CPU: {why}");
        return Ok(SharePlacement::Cpu(Box::new(model), ep));
    }
    let gpu = open(options)?;
    let engine = DeviceEngine::expert_parallel(gpu, &model, DeviceExchange::new(ep))
        .map_err(device_error)?;
    drop(model);
    let engine = if leader {
        engine
    } else {
        engine.without_logits()
    };
    let (backend, kv_pages, weight_bytes) = with_cache(engine, options)?;
    tracing::info!(
        experts = ?own,
        kv_pages,
        weight_mib = weight_bytes >> 20,
        "this rank's share is on the GPU; its rows are exchanged through host memory"
    );
    Ok(SharePlacement::Gpu { backend, kv_pages })
}

fn device_error(e: crate::cuda::GpuError) -> ServeError {
    match e {
        // A tuning variable the worker cannot run with: an options error
        // (exit 2), as training treats it.
        crate::cuda::GpuError::Settings(problem) => {
            ServeError::Options(format!("worker environment: {problem}"))
        }
        e => ServeError::Device(e.to_string()),
    }
}

/// The process's GPU, opened and warmed, after the notes on the options
/// the GPU engine does not apply.
fn open(options: &ServeOptions) -> Result<&'static crate::cuda::Gpu, ServeError> {
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
    Ok(gpu)
}

/// The engine with its device cache as the options size it: the backend,
/// its pages and the weights' bytes. The cache is allocated here, before
/// the replica's ranks agree, so a GPU without room fails at startup.
fn with_cache(
    engine: DeviceEngine<'static>,
    options: &ServeOptions,
) -> Result<(Backend, usize, usize), ServeError> {
    let weight_bytes = engine.weight_bytes();
    let kv_pages = super::kv_pages(engine.kv_shape(options.page_size), options)?;
    let backend = Backend::cuda(engine, options.page_size, kv_pages).map_err(device_error)?;
    Ok((backend, kv_pages, weight_bytes))
}
