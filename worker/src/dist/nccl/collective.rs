//! [`NcclCollective`]: the [`Collective`] trait over NCCL.
//!
//! The trait works on host slices (what the CPU trainers and the smoke
//! test hold), so each operation stages: host → device buffers this
//! communicator keeps and reuses, the NCCL call, device → host. That is
//! correct but pays two PCIe copies; the CUDA trainer, once it runs with
//! several ranks, calls the device entry points
//! ([`NcclCollective::all_reduce_device`],
//! [`NcclCollective::all_to_all_device`]) on its own buffers instead.
//!
//! Ordering keeps the watchdog's bound honest: an operation starts with
//! the stream idle (the previous one was watched to completion), so the
//! host → device copies never wait behind a hung kernel; the device → host
//! copies are issued only after the NCCL work was watched to completion.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_kernels::cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, sys as cu,
};
use moe_kernels::cudarc::nccl::{result, sys};

use super::comm::{self, Family, FamilyState, Raw};
use super::id::ID_BYTES;
use super::plan::{self, Padded};
use super::watchdog::{self, Health, Poll, Watched};
use crate::dist::collective::{Collective, check_counts, check_own_count};
use crate::dist::error::DistError;

/// Which element-wise reduction an all-reduce applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    Max,
}

impl Reduce {
    fn nccl(self) -> sys::ncclRedOp_t {
        match self {
            Self::Sum => sys::ncclRedOp_t::ncclSum,
            Self::Max => sys::ncclRedOp_t::ncclMax,
        }
    }
}

/// A group of ranks over NCCL (the world, or a group split from it).
pub struct NcclCollective {
    family: Arc<Family>,
    /// This communicator in the family.
    key: u64,
    stream: Arc<CudaStream>,
    /// World ranks of the members, by group rank.
    members: Vec<usize>,
    rank: usize,
    /// Reused device buffers for staging host data (grown, never shrunk).
    staging: [Option<CudaSlice<u8>>; 2],
}

fn driver(op: &'static str, error: DriverError) -> DistError {
    DistError::Library {
        op,
        detail: format!("CUDA driver: {error}"),
        remote: false,
    }
}

/// The CUDA driver, before cudarc would panic looking for it.
pub(super) fn driver_present() -> Result<(), DistError> {
    if moe_kernels::toolkit::driver_available() {
        return Ok(());
    }
    Err(DistError::Library {
        op: "nccl",
        detail: "the CUDA driver library (libcuda.so.1) was not found: this host has no NVIDIA \
                 driver; NCCL needs a GPU (run with device: cpu, which uses the TCP backend)"
            .into(),
        remote: false,
    })
}

impl NcclCollective {
    /// Opens GPU `ordinal` and joins the world as rank `rank` of `world`
    /// with the gang's NCCL id (from [`super::id`]), waiting at most
    /// `init_timeout` for every rank; collectives are bounded by
    /// `timeout`. Without the driver or NCCL: a clear error, no panic.
    pub fn init(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: &[u8; ID_BYTES],
        init_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        driver_present()?;
        comm::nccl_library()?;
        let context = CudaContext::new(ordinal).map_err(|e| driver("nccl", e))?;
        Self::on_context(&context, rank, world, id, init_timeout, timeout)
    }

    /// A world of one on `context` (the GPU smoke test: one GPU cannot
    /// host several NCCL ranks of one communicator).
    pub fn single(context: &Arc<CudaContext>, timeout: Duration) -> Result<Self, DistError> {
        driver_present()?;
        comm::nccl_library()?;
        let id = new_id()?;
        Self::on_context(context, 0, 1, &id, timeout, timeout)
    }

    /// Joins with `id` on an opened context.
    pub fn on_context(
        context: &Arc<CudaContext>,
        rank: usize,
        world: usize,
        id: &[u8; ID_BYTES],
        init_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        if rank >= world {
            return Err(DistError::invalid(
                "nccl init",
                format!("rank {rank} in a world of {world}"),
            ));
        }
        context
            .bind_to_thread()
            .map_err(|e| driver("nccl init", e))?;
        // Its own stream, so the watch sees only collective work (and what
        // the device entry points' buffers were waiting for).
        let stream = context.new_stream().map_err(|e| driver("nccl init", e))?;
        let raw = comm::init_rank(world, rank, id, init_timeout)?;
        let family = Family::new(timeout);
        let key = family.lock().add(raw);
        Ok(Self {
            family,
            key,
            stream,
            members: (0..world).collect(),
            rank,
            staging: [None, None],
        })
    }

    /// The stream every operation of this communicator runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// World ranks of this group's members, by group rank.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// Runs one operation: `enqueue` issues the NCCL calls on the stream;
    /// then the watch waits for NCCL to accept them and for the stream to
    /// finish them, within the timeout, counted from entry. Any failure
    /// aborts every communicator of the family.
    fn run(
        &self,
        op: &'static str,
        enqueue: impl FnOnce(Raw, cu::CUstream) -> Result<(), DistError>,
    ) -> Result<(), DistError> {
        self.start(op, enqueue, Vec::new())?.finish().map(drop)
    }

    /// The first half of [`Self::run`]: enqueues the operation and waits
    /// for NCCL to accept it, then returns while its kernels may still run
    /// on the stream, holding `buffers` (the device memory it reads and
    /// writes) until [`InFlight::finish`] has watched it to the end. The
    /// timeout counts from here; operations started one after another run
    /// in that order on the stream.
    fn start<'a>(
        &'a self,
        op: &'static str,
        enqueue: impl FnOnce(Raw, cu::CUstream) -> Result<(), DistError>,
        buffers: Vec<&'a mut CudaSlice<f32>>,
    ) -> Result<InFlight<'a>, DistError> {
        let started = Instant::now();
        let mut state = self.family.lock();
        let comm = state.comm(self.key)?;
        let timeout = state.timeout;
        let outcome = self
            .stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver(op, e))
            .and_then(|()| enqueue(comm, self.stream.cu_stream()))
            .and_then(|()| {
                // Accepted: on a non-blocking communicator the kernels may
                // not be on the stream until NCCL stops saying "in progress".
                let mut accepting = Accepting { comm };
                watchdog::watch(op, &mut accepting, started, timeout)?;
                self.stream
                    .record_event(Some(cu::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                    .map_err(|e| driver(op, e))
            });
        match outcome {
            Ok(event) => Ok(InFlight {
                collective: self,
                op,
                started,
                event: Some(event),
                buffers,
            }),
            Err(error) => {
                abort_unless_done(&mut state, &error);
                Err(error)
            }
        }
    }

    /// Device buffer `slot`, at least `len` bytes.
    fn staging(&mut self, slot: usize, len: usize) -> Result<&mut CudaSlice<u8>, DistError> {
        let fits = self.staging[slot].as_ref().is_some_and(|b| b.len() >= len);
        if !fits {
            // Drop the old one first: buffers can be large.
            self.staging[slot] = None;
            let buffer = self
                .stream
                .alloc_zeros::<u8>(len.max(1))
                .map_err(|e| driver("staging", e))?;
            self.staging[slot] = Some(buffer);
        }
        self.staging[slot]
            .as_mut()
            .ok_or_else(|| DistError::invalid("staging", "no buffer"))
    }

    /// Copies `host` into staging buffer `slot`.
    fn upload(&mut self, slot: usize, host: &[u8]) -> Result<(), DistError> {
        let stream = Arc::clone(&self.stream);
        let buffer = self.staging(slot, host.len())?;
        if !host.is_empty() {
            stream
                .memcpy_htod(host, &mut buffer.slice_mut(..host.len()))
                .map_err(|e| driver("staging", e))?;
        }
        Ok(())
    }

    /// Copies the first `host.len()` bytes of staging buffer `slot` back.
    fn download(&self, slot: usize, host: &mut [u8]) -> Result<(), DistError> {
        if host.is_empty() {
            return Ok(());
        }
        let buffer = self.staging[slot]
            .as_ref()
            .ok_or_else(|| DistError::invalid("staging", "nothing staged"))?;
        self.stream
            .memcpy_dtoh(&buffer.slice(..host.len()), host)
            .map_err(|e| driver("staging", e))?;
        // Only the copy is on the stream now (the NCCL work was watched).
        self.stream.synchronize().map_err(|e| driver("staging", e))
    }

    /// Device pointer of staging buffer `slot` (allocated by `upload` or
    /// `staging`).
    fn staged_ptr(&self, slot: usize) -> Result<cu::CUdeviceptr, DistError> {
        let buffer = self.staging[slot]
            .as_ref()
            .ok_or_else(|| DistError::invalid("staging", "nothing staged"))?;
        let (ptr, _record) = buffer.device_ptr(&self.stream);
        Ok(ptr)
    }

    /// In-place all-reduce of `count` f32 at `ptr`.
    fn all_reduce_raw(
        &self,
        op: &'static str,
        ptr: cu::CUdeviceptr,
        count: usize,
        reduce: Reduce,
    ) -> Result<(), DistError> {
        if count == 0 {
            return Ok(());
        }
        // `ptr` holds `count` f32 on this communicator's device and lives
        // until the watch ends (the caller borrows it).
        self.run(op, |comm, stream| {
            enqueue_all_reduce(op, comm, stream, ptr, count, reduce)
        })
    }

    /// The all-to-all of `plan` between device buffers at `send` and `recv`.
    fn all_to_all_raw(
        &self,
        plan: &plan::AllToAll,
        send: cu::CUdeviceptr,
        recv: cu::CUdeviceptr,
    ) -> Result<(), DistError> {
        let op = "all_to_all";
        self.run(op, |comm, stream| {
            let (from, to) = &plan.local;
            if !from.is_empty() {
                // SAFETY: both ranges lie inside the caller's buffers
                // (checked by the plan); stream-ordered like the rest.
                unsafe {
                    moe_kernels::cudarc::driver::result::memcpy_dtod_async(
                        recv + to.start as u64,
                        send + from.start as u64,
                        from.len(),
                        stream,
                    )
                }
                .map_err(|e| driver(op, e))?;
            }
            if plan.transfers.is_empty() {
                return Ok(());
            }
            comm::enqueued(op, comm, result::group_start())?;
            let mut outcome = Ok(());
            for t in &plan.transfers {
                let peer = t.peer as i32;
                // SAFETY: as above; NCCL reads/writes only inside the ranges.
                let calls = unsafe {
                    [
                        (!t.send.is_empty()).then(|| {
                            result::send(
                                (send + t.send.start as u64) as *const _,
                                t.send.len(),
                                sys::ncclDataType_t::ncclUint8,
                                peer,
                                comm.0,
                                stream as sys::cudaStream_t,
                            )
                        }),
                        (!t.recv.is_empty()).then(|| {
                            result::recv(
                                (recv + t.recv.start as u64) as *mut _,
                                t.recv.len(),
                                sys::ncclDataType_t::ncclUint8,
                                peer,
                                comm.0,
                                stream as sys::cudaStream_t,
                            )
                        }),
                    ]
                };
                for call in calls.into_iter().flatten() {
                    if outcome.is_ok() {
                        outcome = comm::enqueued(op, comm, call);
                    }
                }
            }
            // The group is closed whatever happened inside it.
            let end = comm::enqueued(op, comm, result::group_end());
            outcome.and(end)
        })
    }

    /// Element-wise sum or maximum of a device buffer over the group, in
    /// place (for the CUDA trainer: no staging).
    pub fn all_reduce_device(
        &mut self,
        data: &mut CudaSlice<f32>,
        reduce: Reduce,
    ) -> Result<(), DistError> {
        let count = data.len();
        let (ptr, _record) = data.device_ptr_mut(&self.stream);
        self.all_reduce_raw("all_reduce", ptr, count, reduce)
    }

    /// [`Self::all_reduce_device`] of every buffer of `data`, as one NCCL
    /// group: one watched operation (one wait for its end) instead of one
    /// per buffer, and NCCL free to fuse the small ones (a model's norms
    /// and biases). Every rank passes buffers of the same lengths in the
    /// same order.
    pub fn all_reduce_device_many(
        &mut self,
        data: &mut [&mut CudaSlice<f32>],
        reduce: Reduce,
    ) -> Result<(), DistError> {
        let buffers = data.iter_mut().map(|b| &mut **b).collect();
        self.start_all_reduce_many(buffers, reduce)?
            .finish()
            .map(drop)
    }

    /// [`Self::all_reduce_device_many`] started but not waited for: the
    /// reduction runs on this communicator's stream while the caller
    /// enqueues more work on its own (the data-parallel gradients of the
    /// blocks whose backward pass is done, while the earlier blocks'
    /// runs). The buffers come back from [`InFlight::finish`]. The caller
    /// has made this stream wait for whatever wrote them (an event).
    pub fn start_all_reduce_many<'a>(
        &'a self,
        mut data: Vec<&'a mut CudaSlice<f32>>,
        reduce: Reduce,
    ) -> Result<InFlight<'a>, DistError> {
        let op = "all_reduce";
        let stream = &self.stream;
        // The pointers; each guard records the buffer's write on this
        // stream once dropped, right after the pointers are taken: the
        // buffers themselves stay borrowed by the InFlight until finish.
        let buffers: Vec<(cu::CUdeviceptr, usize)> = data
            .iter_mut()
            .filter(|b| !b.is_empty())
            .map(|buffer| {
                let count = buffer.len();
                let (ptr, _guard) = buffer.device_ptr_mut(stream);
                (ptr, count)
            })
            .collect();
        if buffers.is_empty() {
            return Ok(InFlight {
                collective: self,
                op,
                started: Instant::now(),
                event: None,
                buffers: data,
            });
        }
        self.start(
            op,
            |comm, stream| {
                comm::enqueued(op, comm, result::group_start())?;
                let mut outcome = Ok(());
                // Each `ptr` holds `count` f32 on this communicator's device and
                // outlives the watch (the guards above).
                for &(ptr, count) in &buffers {
                    outcome = enqueue_all_reduce(op, comm, stream, ptr, count, reduce);
                    if outcome.is_err() {
                        break;
                    }
                }
                // The group is closed whatever happened inside it.
                let end = comm::enqueued(op, comm, result::group_end());
                outcome.and(end)
            },
            data,
        )
    }

    /// [`Collective::all_to_all_bytes`] between device buffers (expert
    /// dispatch and combine; FP8 rows travel as their bytes, f32 rows as
    /// theirs), counts in elements of `T`. Views are taken, so a rank with
    /// nothing to send (or receive) passes an empty view of any buffer.
    pub fn all_to_all_device<T, S, R>(
        &mut self,
        send: &S,
        send_counts: &[usize],
        recv: &mut R,
        recv_counts: &[usize],
    ) -> Result<(), DistError>
    where
        S: DevicePtr<T>,
        R: DevicePtrMut<T>,
    {
        self.check_group("all_to_all", send_counts.len())?;
        let width = size_of::<T>();
        let bytes = |counts: &[usize]| counts.iter().map(|c| c * width).collect::<Vec<_>>();
        let plan = plan::all_to_all(
            self.rank,
            &bytes(send_counts),
            send.num_bytes(),
            &bytes(recv_counts),
            recv.num_bytes(),
        )?;
        let (s, _record_send) = send.device_ptr(&self.stream);
        let (r, _record_recv) = recv.device_ptr_mut(&self.stream);
        self.all_to_all_raw(&plan, s, r)
    }

    fn check_group(&self, op: &'static str, counts: usize) -> Result<(), DistError> {
        if counts != self.members.len() {
            return Err(DistError::invalid(
                op,
                format!("{counts} counts for a group of {}", self.members.len()),
            ));
        }
        Ok(())
    }

    /// Sets the bound of every communicator of the family (testing the
    /// timeout path needs a short one on one communicator too).
    fn set_family_timeout(&self, timeout: Duration) {
        self.family.lock().timeout = timeout;
    }
}

/// An operation NCCL accepted whose kernels may still be running on the
/// communicator's stream ([`NcclCollective::start_all_reduce_many`]).
/// Dropped without [`Self::finish`], it is not waited for: the buffers
/// are released to a caller that must not touch them before synchronising
/// the stream (a failed step does not).
#[must_use = "an operation in flight must be finished"]
pub struct InFlight<'a> {
    collective: &'a NcclCollective,
    op: &'static str,
    started: Instant,
    /// Recorded after the operation's kernels; `None` when nothing ran.
    event: Option<CudaEvent>,
    buffers: Vec<&'a mut CudaSlice<f32>>,
}

impl<'a> InFlight<'a> {
    /// Watches the operation to its end (within the timeout, counted from
    /// its start; any failure aborts every communicator of the family) and
    /// hands back its buffers.
    pub fn finish(self) -> Result<Vec<&'a mut CudaSlice<f32>>, DistError> {
        let Some(event) = self.event else {
            return Ok(self.buffers);
        };
        let c = self.collective;
        let mut state = c.family.lock();
        let outcome = state.comm(c.key).and_then(|comm| {
            let mut running = Running { comm, event };
            watchdog::watch(self.op, &mut running, self.started, state.timeout)
        });
        match outcome {
            Ok(()) => Ok(self.buffers),
            Err(error) => {
                abort_unless_done(&mut state, &error);
                Err(error)
            }
        }
    }
}

/// Enqueues an in-place `ncclAllReduce` of `count` f32 at `ptr`, which must
/// hold them on `comm`'s device until the operation's watch ends.
fn enqueue_all_reduce(
    op: &'static str,
    comm: Raw,
    stream: cu::CUstream,
    ptr: cu::CUdeviceptr,
    count: usize,
    reduce: Reduce,
) -> Result<(), DistError> {
    // SAFETY: the caller keeps `count` f32 at `ptr` on this device alive
    // and unaliased until the operation's watch ends.
    let call = unsafe {
        result::all_reduce(
            ptr as *const _,
            ptr as *mut _,
            count,
            sys::ncclDataType_t::ncclFloat32,
            reduce.nccl(),
            comm.0,
            stream as sys::cudaStream_t,
        )
    };
    comm::enqueued(op, comm, call)
}

/// Aborts the family after `error`, unless it already is (or the error is
/// the caller's and nothing was issued).
fn abort_unless_done(state: &mut FamilyState, error: &DistError) {
    if !matches!(
        error,
        DistError::Aborted { .. } | DistError::InvalidArgument { .. }
    ) {
        state.abort_all(&error.to_string());
    }
}

/// NCCL accepting a non-blocking call.
struct Accepting {
    comm: Raw,
}

impl Watched for Accepting {
    fn poll(&mut self) -> Poll {
        Poll {
            health: comm::health(self.comm),
            work_done: true,
        }
    }

    /// The caller aborts the whole family right after.
    fn abort(&mut self, _why: &str) {}
}

/// The operation's kernels running on the stream.
struct Running {
    comm: Raw,
    event: CudaEvent,
}

impl Watched for Running {
    fn poll(&mut self) -> Poll {
        match self.event.try_is_complete() {
            Ok(done) => Poll {
                health: comm::health(self.comm),
                work_done: done,
            },
            Err(e) => Poll {
                health: Health::Failed {
                    detail: format!("CUDA driver: {e}"),
                    remote: false,
                },
                work_done: false,
            },
        }
    }

    /// The caller aborts the whole family right after.
    fn abort(&mut self, _why: &str) {}
}

/// A fresh NCCL unique id (rank 0 only: it starts NCCL's bootstrap
/// listener, which the id names).
pub(super) fn new_id() -> Result<[u8; ID_BYTES], DistError> {
    let id = result::get_uniqueid().map_err(|e| DistError::Library {
        op: "nccl",
        detail: format!("ncclGetUniqueId failed: {:?}", e.0),
        remote: false,
    })?;
    Ok(id.internal.map(|c| c as u8))
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn as_nccl(&mut self) -> Option<&mut NcclCollective> {
        Some(self)
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), DistError> {
        self.all_reduce_host("all_reduce", data, Reduce::Sum)
    }

    fn all_reduce_max(&mut self, data: &mut [f32]) -> Result<(), DistError> {
        self.all_reduce_host("all_reduce_max", data, Reduce::Max)
    }

    fn reduce_scatter_sum(
        &mut self,
        input: &[f32],
        counts: &[usize],
        output: &mut [f32],
    ) -> Result<(), DistError> {
        let op = "reduce_scatter";
        check_counts(op, counts, self.members.len(), input.len())?;
        check_own_count(op, "output", output.len(), counts[self.rank])?;
        let padded = Padded::new(counts);
        if padded.is_empty() {
            return Ok(());
        }
        let wide = if padded.is_identity() {
            input.to_vec()
        } else {
            padded.pad(input)
        };
        let stride = padded.stride();
        self.upload(0, bytemuck::cast_slice(&wide))?;
        self.staging(1, stride * size_of::<f32>())?;
        let (send, recv) = (self.staged_ptr(0)?, self.staged_ptr(1)?);
        self.run(op, |comm, stream| {
            // SAFETY: staging 0 holds p·stride f32, staging 1 at least
            // stride; both live until the watch ends.
            let call = unsafe {
                result::reduce_scatter(
                    send as *const _,
                    recv as *mut _,
                    stride,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm.0,
                    stream as sys::cudaStream_t,
                )
            };
            comm::enqueued(op, comm, call)
        })?;
        self.download(1, bytemuck::cast_slice_mut(output))
    }

    fn all_gather_bytes(
        &mut self,
        input: &[u8],
        counts: &[usize],
        output: &mut [u8],
    ) -> Result<(), DistError> {
        let op = "all_gather";
        check_counts(op, counts, self.members.len(), output.len())?;
        check_own_count(op, "input", input.len(), counts[self.rank])?;
        let padded = Padded::new(counts);
        if padded.is_empty() {
            return Ok(());
        }
        let stride = padded.stride();
        let mut mine = input.to_vec();
        mine.resize(stride, 0);
        self.upload(0, &mine)?;
        self.staging(1, padded.len())?;
        let (send, recv) = (self.staged_ptr(0)?, self.staged_ptr(1)?);
        self.run(op, |comm, stream| {
            // SAFETY: staging 0 holds `stride` bytes, staging 1 p·stride.
            let call = unsafe {
                result::all_gather(
                    send as *const _,
                    recv as *mut _,
                    stride,
                    sys::ncclDataType_t::ncclUint8,
                    comm.0,
                    stream as sys::cudaStream_t,
                )
            };
            comm::enqueued(op, comm, call)
        })?;
        if padded.is_identity() {
            return self.download(1, output);
        }
        let mut wide = vec![0u8; padded.len()];
        self.download(1, &mut wide)?;
        padded.unpad(&wide, output);
        Ok(())
    }

    fn all_to_all_bytes(
        &mut self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<(), DistError> {
        self.check_group("all_to_all", send_counts.len())?;
        let plan = plan::all_to_all(self.rank, send_counts, send.len(), recv_counts, recv.len())?;
        self.upload(0, send)?;
        self.staging(1, recv.len())?;
        let (s, r) = (self.staged_ptr(0)?, self.staged_ptr(1)?);
        self.all_to_all_raw(&plan, s, r)?;
        self.download(1, recv)
    }

    fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<(), DistError> {
        let op = "broadcast";
        let size = self.members.len();
        if root >= size {
            return Err(DistError::invalid(
                op,
                format!("root {root} in a group of {size}"),
            ));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.upload(0, data)?;
        let ptr = self.staged_ptr(0)?;
        let len = data.len();
        self.run(op, |comm, stream| {
            // SAFETY: staging 0 holds `len` bytes, live until the watch ends.
            let call = unsafe {
                result::broadcast(
                    ptr as *const _,
                    ptr as *mut _,
                    len,
                    sys::ncclDataType_t::ncclUint8,
                    root as i32,
                    comm.0,
                    stream as sys::cudaStream_t,
                )
            };
            comm::enqueued(op, comm, call)
        })?;
        self.download(0, data)
    }

    /// An all-reduce of one value: NCCL has no barrier, and this one
    /// returns only once every rank's contribution arrived.
    fn barrier(&mut self) -> Result<(), DistError> {
        self.upload(0, &1f32.to_ne_bytes())?;
        let ptr = self.staged_ptr(0)?;
        self.all_reduce_raw("barrier", ptr, 1, Reduce::Sum)
    }

    fn set_timeout(&mut self, timeout: Duration) -> Result<(), DistError> {
        if timeout.is_zero() {
            return Err(DistError::invalid("set_timeout", "a zero timeout"));
        }
        self.set_family_timeout(timeout);
        Ok(())
    }

    /// Over NCCL a group is made by `ncclCommSplit`, which is collective
    /// over this (the parent) communicator: **every** rank of it must call
    /// `new_group` at the same point, each naming its own group, and the
    /// groups must not overlap — as [`crate::dist::layout::make_groups`]
    /// does (each family of groups partitions the world). Members of one
    /// group share a color (its lowest world rank); the listed order is the
    /// key, so it numbers the group. A rank that names a group the others
    /// do not agree on ends up in a group of another size, which is
    /// reported, not used.
    fn new_group(&self, ranks: &[usize]) -> Result<Box<dyn Collective>, DistError> {
        let op = "new_group";
        let size = self.members.len();
        if let Some(&bad) = ranks.iter().find(|&&r| r >= size) {
            return Err(DistError::invalid(
                op,
                format!("rank {bad} in a group of {size}"),
            ));
        }
        let mut seen = vec![false; size];
        for &r in ranks {
            if std::mem::replace(&mut seen[r], true) {
                return Err(DistError::invalid(op, format!("rank {r} listed twice")));
            }
        }
        let key = ranks.iter().position(|&r| r == self.rank).ok_or_else(|| {
            DistError::invalid(
                op,
                format!(
                    "rank {} is not in {ranks:?}; over NCCL every rank names its own group",
                    self.rank
                ),
            )
        })?;
        let members: Vec<usize> = ranks.iter().map(|&r| self.members[r]).collect();
        let color = members.iter().copied().min().unwrap_or(0);
        let mut state = self.family.lock();
        let parent = state.comm(self.key)?;
        let timeout = state.timeout;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver(op, e))?;
        let child = match comm::split(parent, color, key, timeout) {
            Ok(child) => child,
            Err(error) => {
                abort_unless_done(&mut state, &error);
                return Err(error);
            }
        };
        let child_key = state.add(child);
        let (count, rank) = match comm::count_and_rank(child) {
            Ok(found) => found,
            Err(error) => {
                state.release(child_key);
                return Err(error);
            }
        };
        if (count, rank) != (members.len(), key) {
            state.release(child_key);
            return Err(DistError::Protocol {
                op,
                detail: format!(
                    "NCCL made a group of {count} with this rank at {rank}, but {ranks:?} asks \
                     for {} at {key}: ranks named different groups",
                    members.len()
                ),
            });
        }
        drop(state);
        let stream = self
            .stream
            .context()
            .new_stream()
            .map_err(|e| driver(op, e))?;
        Ok(Box::new(Self {
            family: Arc::clone(&self.family),
            key: child_key,
            stream,
            members,
            rank: key,
            staging: [None, None],
        }))
    }
}

impl NcclCollective {
    fn all_reduce_host(
        &mut self,
        op: &'static str,
        data: &mut [f32],
        reduce: Reduce,
    ) -> Result<(), DistError> {
        if data.is_empty() {
            return Ok(());
        }
        self.upload(0, bytemuck::cast_slice(data))?;
        let ptr = self.staged_ptr(0)?;
        self.all_reduce_raw(op, ptr, data.len(), reduce)?;
        self.download(0, bytemuck::cast_slice_mut(data))
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // Nothing of ours may still run on the stream when NCCL frees the
        // communicator; every operation was watched to its end or aborted.
        self.family.lock().release(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nccl_present() -> bool {
        // SAFETY: only probes the loader for the library's names.
        unsafe { sys::is_culib_present() }
    }

    /// On a host without the driver or NCCL (CI), joining is a clear
    /// error naming the missing library and the way out, not a panic
    /// inside cudarc's loader. On a GPU host with NCCL a world of one opens.
    #[test]
    fn joining_without_the_driver_or_nccl_is_a_clear_error() {
        let second = Duration::from_secs(1);
        let result = NcclCollective::init(0, 0, 1, &[0; ID_BYTES], second, second);
        if moe_kernels::toolkit::driver_available() && nccl_present() {
            return; // a GPU host: the id is not real, init may fail; the GPU check covers it
        }
        let error = result.err().expect("no driver or no NCCL: no communicator");
        let message = error.to_string();
        assert!(
            matches!(error, DistError::Library { remote: false, .. }),
            "{message}"
        );
        assert!(!error.is_peer_failure());
        assert!(
            message.contains("libcuda.so.1") || message.contains("libnccl.so"),
            "{message}"
        );
        assert!(message.contains("device: cpu"), "{message}");
    }

    #[test]
    fn a_missing_nccl_library_is_named() {
        if nccl_present() {
            assert!(comm::nccl_library().is_ok_and(|v| v >= comm::MIN_VERSION));
            return;
        }
        let message = comm::nccl_library().unwrap_err().to_string();
        assert!(
            message.contains("libnccl.so") && message.contains("LD_LIBRARY_PATH"),
            "{message}"
        );
    }
}
