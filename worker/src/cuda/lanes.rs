//! Side streams ("lanes") for the per-expert GEMM loop: where cuBLASLt has
//! no grouped GEMM ([`super::grouped_gemm`]; before 13.4 on Hopper) the
//! routed experts' GEMMs are one call per expert, each too small to fill
//! the GPU (an expert of 512 columns over 2048 rows is 64 tiles of
//! 128 × 128 for 132 SMs). Spread over a few streams they run side by
//! side, as Transformer Engine's grouped linear layer does without a
//! grouped GEMM.
//!
//! Scope and ordering: [`Gpu::fan_out`] makes every lane wait for the main
//! stream's work so far, runs the loop — [`Fan::on`] sends expert `i`'s
//! cuBLASLt calls to lane `i mod lanes` (a thread-local, so a GPU shared
//! by several threads keeps each thread's loop its own) — and makes the
//! main stream wait for every lane before anything else runs on it, the
//! frees of the buffers the lanes read included. Inside a lane only
//! cuBLASLt runs: an operand the GEMM would round or quantise first
//! (kernels on the main stream) is refused, so the loops hand over
//! operands prepared before the fan-out. Each lane has its own cuBLASLt
//! workspace. The lanes are plain CUDA streams unknown to cudarc, which
//! therefore stays in its single-stream mode (no event per buffer use).

use super::{Gpu, Result};
use moe_kernels::cudarc::driver::{CudaSlice, result, sys};
use std::cell::Cell;

/// The worker's environment variable for the number of lanes: 1 (the
/// default until a GPU run has passed the "expert streams" checks) runs
/// every expert GEMM on the main stream; Transformer Engine spreads its
/// grouped linear layers over 4.
pub const STREAMS_VAR: &str = "MOE_CUDA_EXPERT_STREAMS";

const DEFAULT_STREAMS: usize = 1;

/// Loops over fewer rows than this stay on the main stream: a decode
/// step's GEMMs are launch-bound, and the fork and join would only add.
pub(crate) const MIN_ROWS: usize = 4096;

/// The lane count `value` (the environment variable's) asks for.
pub fn stream_count(value: Option<&str>) -> std::result::Result<usize, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(DEFAULT_STREAMS),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=16).contains(n))
            .ok_or_else(|| {
                format!(
                    "{STREAMS_VAR}={v}: expected 1 to 16 (1 runs every expert GEMM on the main stream)"
                )
            }),
    }
}

/// One side stream and its cuBLASLt workspace.
pub(crate) struct Lane {
    stream: sys::CUstream,
    workspace: CudaSlice<u8>,
}

// SAFETY: a CUstream handle may be used from any thread of its context.
unsafe impl Send for Lane {}
unsafe impl Sync for Lane {}

impl Drop for Lane {
    fn drop(&mut self) {
        // SAFETY: the stream was created for this lane and is destroyed once;
        // CUDA releases it when its pending work is done.
        unsafe {
            let _ = result::stream::destroy(self.stream);
        }
    }
}

impl Lane {
    pub(crate) fn new(gpu: &Gpu) -> Result<Self> {
        gpu.context().bind_to_thread()?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)?;
        Ok(Self {
            stream,
            // Zeroed on the main stream before any fork, which orders it.
            workspace: gpu.zeros::<u8>(super::WORKSPACE_BYTES)?,
        })
    }
}

thread_local! {
    /// The lane this thread's cuBLASLt calls go to: (the GPU's address,
    /// lane + 1), 0 for the main stream.
    static CURRENT: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// The lanes of one fan-out ([`Gpu::fan_out`]); none when it runs on the
/// main stream.
pub(crate) struct Fan<'g> {
    gpu: &'g Gpu,
    lanes: &'g [Lane],
}

impl Fan<'_> {
    /// Runs `f`, sending its cuBLASLt calls to lane `index mod lanes`.
    pub(crate) fn on<R>(&self, index: usize, f: impl FnOnce() -> Result<R>) -> Result<R> {
        if self.lanes.is_empty() {
            return f();
        }
        let lane = (address(self.gpu), index % self.lanes.len() + 1);
        let previous = CURRENT.replace(lane);
        let result = f();
        CURRENT.set(previous);
        result
    }
}

fn address(gpu: &Gpu) -> usize {
    gpu as *const Gpu as usize
}

/// One event recorded on `on` that every stream of `waiters` waits for.
///
/// # Safety
/// The streams belong to the current context.
unsafe fn order(waiters: &[sys::CUstream], on: sys::CUstream) -> Result<()> {
    let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
    // SAFETY: the event is fresh; destroying it after the waits are
    // enqueued is allowed (CUDA keeps it until they complete).
    unsafe {
        let ordered = result::event::record(event, on).and_then(|()| {
            waiters.iter().try_for_each(|&waiter| {
                result::stream::wait_event(
                    waiter,
                    event,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            })
        });
        let _ = result::event::destroy(event);
        ordered?;
    }
    Ok(())
}

impl Gpu {
    /// Runs `run` with the expert GEMMs it sends through [`Fan::on`] spread
    /// over the lanes (see the module's notes): when more than one lane is
    /// asked for and the loop covers `rows` ≥ [`MIN_ROWS`] rows; else on
    /// the main stream. The caller's loop may only issue cuBLASLt GEMMs on
    /// operands prepared before it (TF32 or bf16 ones).
    pub(crate) fn fan_out<R>(
        &self,
        rows: usize,
        run: impl FnOnce(&Fan<'_>) -> Result<R>,
    ) -> Result<R> {
        let wanted = self.expert_streams();
        if wanted < 2 || rows < MIN_ROWS {
            return run(&Fan {
                gpu: self,
                lanes: &[],
            });
        }
        let lanes = self.lanes(wanted)?;
        let main = self.stream().cu_stream();
        self.context().bind_to_thread()?;
        let streams: Vec<sys::CUstream> = lanes.iter().map(|lane| lane.stream).collect();
        // SAFETY: the lanes and the main stream are this context's.
        unsafe { order(&streams, main) }?;
        let result = run(&Fan { gpu: self, lanes });
        // Whatever `run` did, the main stream waits for every lane before
        // it runs (or frees) anything else.
        let mut joined = Ok(());
        for &lane in &streams {
            // SAFETY: as above.
            if let Err(error) = unsafe { order(&[main], lane) } {
                joined = Err(error);
            }
        }
        let value = result?;
        joined.map(|()| value)
    }

    /// The stream and cuBLASLt workspace this thread's next GEMM uses:
    /// its lane's inside [`Fan::on`], else the main stream's.
    pub(crate) fn gemm_target(&self) -> Result<(sys::CUstream, &CudaSlice<u8>)> {
        let (gpu, lane) = CURRENT.get();
        if lane > 0
            && gpu == address(self)
            && let Some(Ok(lanes)) = self.lanes_made()
        {
            let lane = &lanes[lane - 1];
            return Ok((lane.stream, &lane.workspace));
        }
        Ok((self.stream().cu_stream(), self.workspace()?))
    }

    /// Whether this thread's GEMMs go to a lane now.
    pub(crate) fn on_lane(&self) -> bool {
        let (gpu, lane) = CURRENT.get();
        lane > 0 && gpu == address(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lane_count_defaults_to_one_and_refuses_nonsense() {
        assert_eq!(stream_count(None), Ok(1));
        assert_eq!(stream_count(Some(" ")), Ok(1));
        assert_eq!(stream_count(Some("1")), Ok(1));
        assert_eq!(stream_count(Some("8")), Ok(8));
        for bad in ["0", "17", "four", "-2"] {
            let error = stream_count(Some(bad)).expect_err(bad);
            assert!(
                error.contains(STREAMS_VAR) && error.contains(bad),
                "{error}"
            );
        }
    }
}
