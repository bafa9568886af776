//! Raw NCCL communicators and the family they belong to. cudarc's safe
//! `Comm` is not used: it initialises with the blocking
//! `ncclCommInitRank` (no deadline), keeps the raw handle private (so
//! nothing can poll `ncclCommGetAsyncError` or abort it) and panics in
//! `Drop` when an abort fails. Here every communicator is non-blocking
//! (every call returns at once; [`super::watchdog`] bounds the wait), and
//! all communicators made from one world share a [`Family`]: the first
//! failure aborts them all, as the TCP backend's shared mesh does.

use std::ffi::{CStr, c_int};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use moe_kernels::cudarc::nccl::{result, sys};

use super::id::ID_BYTES;
use super::watchdog::{self, Health, Poll, Watched};
use crate::dist::error::DistError;

/// `ncclCommSplit` (sub-groups) arrived in NCCL 2.18; non-blocking
/// communicators in 2.14. `NCCL_VERSION(2, 18, 0)`.
pub const MIN_VERSION: i32 = 21800;
/// `ncclConfig_t` of the headers cudarc's bindings come from (NCCL 2.30):
/// an older library reads only the prefix it knows (it takes `size` and
/// `version` from the struct).
const CONFIG_VERSION: u32 = 23000;
const CONFIG_MAGIC: u32 = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: "NCCL's default" for every field we leave.
const UNDEF: c_int = c_int::MIN;

fn library_error(op: &'static str, detail: String) -> DistError {
    DistError::Library {
        op,
        detail,
        remote: false,
    }
}

fn version_text(code: i32) -> String {
    format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
}

/// Checks that `libnccl` loads and is new enough, before anything calls
/// into it (cudarc panics on a missing library or symbol); returns its
/// version code.
pub fn nccl_library() -> Result<i32, DistError> {
    // SAFETY: only probes the loader for the library's names.
    if !unsafe { sys::is_culib_present() } {
        return Err(library_error(
            "nccl",
            "NCCL (libnccl.so) was not found: install NCCL 2.18 or newer for CUDA 13 and make \
             `libnccl.so` loadable (the worker image links it to libnccl.so.2; elsewhere add its \
             directory to LD_LIBRARY_PATH), or train with device: cpu over TCP"
                .into(),
        ));
    }
    let version = result::get_nccl_version()
        .map_err(|e| library_error("nccl", format!("ncclGetVersion failed: {}", describe(e.0))))?;
    if version < MIN_VERSION {
        return Err(library_error(
            "nccl",
            format!(
                "NCCL {} is too old: the worker needs {} or newer (ncclCommSplit)",
                version_text(version),
                version_text(MIN_VERSION)
            ),
        ));
    }
    Ok(version)
}

/// NCCL's name for `code`.
fn describe(code: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static C string for any code.
    let text = unsafe { sys::ncclGetErrorString(code) };
    if text.is_null() {
        return format!("{code:?}");
    }
    // SAFETY: non-null, NUL-terminated, static.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    format!("{code:?} ({text})")
}

/// [`describe`] plus the communicator's last error message, which names
/// the failing call or peer where NCCL knows it.
fn describe_on(code: sys::ncclResult_t, comm: sys::ncclComm_t) -> String {
    let mut text = describe(code);
    if !comm.is_null() {
        // SAFETY: `comm` is a live communicator; the result is a C string
        // owned by NCCL, copied at once.
        let last = unsafe { sys::ncclGetLastError(comm) };
        if !last.is_null() {
            // SAFETY: non-null and NUL-terminated (see above).
            let last = unsafe { CStr::from_ptr(last) }.to_string_lossy();
            if !last.is_empty() {
                text.push_str(": ");
                text.push_str(&last);
            }
        }
    }
    text
}

/// A communicator handle (a pointer NCCL owns). Moving it between threads
/// is allowed by NCCL; using it from two at once is prevented by the
/// family's lock, which every operation holds.
#[derive(Clone, Copy, Debug)]
pub(super) struct Raw(pub(super) sys::ncclComm_t);

// SAFETY: see above: NCCL communicators are not tied to a thread, and all
// use goes through `Family`'s mutex.
unsafe impl Send for Raw {}

fn config() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: size_of::<sys::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        // The point: every call returns at once, so a dead peer cannot
        // block this thread where no deadline can reach it.
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// `ncclCommGetAsyncError` as the watchdog reads it.
pub(super) fn health(comm: Raw) -> Health {
    let mut state = sys::ncclResult_t::ncclSuccess;
    // SAFETY: `comm` is live (the family's lock is held by the caller).
    let code = unsafe { sys::ncclCommGetAsyncError(comm.0, &mut state) };
    if code != sys::ncclResult_t::ncclSuccess {
        return Health::Failed {
            detail: format!("ncclCommGetAsyncError: {}", describe(code)),
            remote: false,
        };
    }
    match state {
        sys::ncclResult_t::ncclSuccess => Health::Ok,
        sys::ncclResult_t::ncclInProgress => Health::InProgress,
        other => Health::Failed {
            detail: describe_on(other, comm.0),
            remote: other == sys::ncclResult_t::ncclRemoteError,
        },
    }
}

/// The result of an enqueueing call: success or "in progress" go on to the
/// watch; anything else is the operation's error.
pub(super) fn enqueued(
    op: &'static str,
    comm: Raw,
    call: Result<result::NcclStatus, result::NcclError>,
) -> Result<(), DistError> {
    call.map(|_| ()).map_err(|e| DistError::Library {
        op,
        detail: describe_on(e.0, comm.0),
        remote: e.0 == sys::ncclResult_t::ncclRemoteError,
    })
}

/// A communicator being created (init or split): done when NCCL no longer
/// says "in progress"; on a deadline it is aborted, which frees it.
struct Creating {
    comm: Raw,
    aborted: bool,
}

impl Watched for Creating {
    fn poll(&mut self) -> Poll {
        Poll {
            health: health(self.comm),
            work_done: true,
        }
    }

    fn abort(&mut self, _why: &str) {
        // SAFETY: `comm` is live and used by no one else yet.
        let _ = unsafe { result::comm_abort(self.comm.0) };
        self.aborted = true;
    }
}

/// Waits for a communicator NCCL is still creating; on failure it is
/// freed and the error returned.
fn finish_creating(
    op: &'static str,
    comm: Raw,
    started: Instant,
    timeout: Duration,
) -> Result<Raw, DistError> {
    let mut creating = Creating {
        comm,
        aborted: false,
    };
    match watchdog::watch(op, &mut creating, started, timeout) {
        Ok(()) => Ok(comm),
        Err(error) => {
            if !creating.aborted {
                // SAFETY: as in `Creating::abort`.
                let _ = unsafe { result::comm_abort(comm.0) };
            }
            Err(error)
        }
    }
}

/// `ncclCommInitRankConfig` for rank `rank` of `world`, bounded by
/// `timeout` (every rank must arrive: this is NCCL's own rendezvous,
/// through rank 0's bootstrap listener named in the id).
pub(super) fn init_rank(
    world: usize,
    rank: usize,
    id: &[u8; ID_BYTES],
    timeout: Duration,
) -> Result<Raw, DistError> {
    let op = "nccl init";
    let started = Instant::now();
    let (world, rank) = (as_int(op, world)?, as_int(op, rank)?);
    let id = sys::ncclUniqueId {
        internal: id.map(|b| b as std::ffi::c_char),
    };
    let mut config = config();
    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: `comm` and `config` outlive the call; NCCL copies the id.
    let call = unsafe { result::comm_init_rank_config(&mut comm, world, id, rank, &mut config) };
    if let Err(e) = call {
        if !comm.is_null() {
            // SAFETY: a handle NCCL returned, used by no one else.
            let _ = unsafe { result::comm_abort(comm) };
        }
        return Err(library_error(op, describe(e.0)));
    }
    finish_creating(op, Raw(comm), started, timeout)
}

/// `ncclCommSplit` of `parent`: members of one group pass the same
/// `color`; `key` orders them.
pub(super) fn split(
    parent: Raw,
    color: usize,
    key: usize,
    timeout: Duration,
) -> Result<Raw, DistError> {
    let op = "new_group";
    let started = Instant::now();
    let (color, key) = (as_int(op, color)?, as_int(op, key)?);
    let mut config = config();
    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: `parent` is live (family lock held); `comm`, `config` outlive the call.
    let code = unsafe { sys::ncclCommSplit(parent.0, color, key, &mut comm, &mut config) };
    match code {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => {}
        code => {
            if !comm.is_null() {
                // SAFETY: a handle NCCL returned, used by no one else.
                let _ = unsafe { result::comm_abort(comm) };
            }
            return Err(DistError::Library {
                op,
                detail: describe_on(code, parent.0),
                remote: code == sys::ncclResult_t::ncclRemoteError,
            });
        }
    }
    if comm.is_null() {
        // The parent may still be carrying the split out (non-blocking).
        let mut waiting = Creating {
            comm: parent,
            aborted: false,
        };
        watchdog::watch(op, &mut waiting, started, timeout)?;
        if comm.is_null() {
            return Err(DistError::Protocol {
                op,
                detail: "ncclCommSplit gave this rank no communicator".into(),
            });
        }
    }
    finish_creating(op, Raw(comm), started, timeout)
}

/// (ranks, this rank) as NCCL counts them.
pub(super) fn count_and_rank(comm: Raw) -> Result<(usize, usize), DistError> {
    // SAFETY: `comm` is live.
    let count = unsafe { result::comm_count(comm.0) };
    // SAFETY: as above.
    let rank = unsafe { result::comm_user_rank(comm.0) };
    match (count, rank) {
        (Ok(count), Ok(rank)) => Ok((count as usize, rank as usize)),
        (Err(e), _) | (_, Err(e)) => Err(library_error("new_group", describe(e.0))),
    }
}

fn as_int(op: &'static str, n: usize) -> Result<c_int, DistError> {
    c_int::try_from(n).map_err(|_| DistError::invalid(op, format!("{n} exceeds NCCL's int")))
}

/// Every communicator made from one world, the shared timeout, and
/// whether they were aborted.
pub(super) struct Family {
    state: Mutex<FamilyState>,
}

pub(super) struct FamilyState {
    /// Live communicators by key.
    comms: Vec<(u64, Raw)>,
    next_key: u64,
    aborted: Option<String>,
    pub(super) timeout: Duration,
}

impl Family {
    pub(super) fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(FamilyState {
                comms: Vec::new(),
                next_key: 0,
                aborted: None,
                timeout,
            }),
        })
    }

    /// Held for the whole of every operation (see [`Raw`]).
    pub(super) fn lock(&self) -> MutexGuard<'_, FamilyState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl FamilyState {
    pub(super) fn add(&mut self, comm: Raw) -> u64 {
        let key = self.next_key;
        self.next_key += 1;
        self.comms.push((key, comm));
        key
    }

    /// The live communicator `key`, or [`DistError::Aborted`].
    pub(super) fn comm(&self, key: u64) -> Result<Raw, DistError> {
        if let Some(cause) = &self.aborted {
            return Err(DistError::Aborted {
                cause: cause.clone(),
            });
        }
        self.comms
            .iter()
            .find(|(k, _)| *k == key)
            .map(|&(_, comm)| comm)
            .ok_or_else(|| DistError::Aborted {
                cause: "the communicator was released".into(),
            })
    }

    /// Aborts (and so frees) every live communicator: their kernels stop,
    /// their peers' operations fail, and later calls return `Aborted`.
    pub(super) fn abort_all(&mut self, why: &str) {
        for (_, comm) in self.comms.drain(..) {
            // SAFETY: live until now; removed from the list, so never used again.
            let _ = unsafe { result::comm_abort(comm.0) };
        }
        if self.aborted.is_none() {
            self.aborted = Some(why.to_string());
        }
    }

    /// Frees communicator `key` when its handle is dropped: finalized
    /// (pending work flushed) within the timeout, then destroyed; aborted
    /// if that fails. Nothing if an abort freed it already.
    pub(super) fn release(&mut self, key: u64) {
        let Some(at) = self.comms.iter().position(|(k, _)| *k == key) else {
            return;
        };
        let (_, comm) = self.comms.swap_remove(at);
        // SAFETY: live, removed from the list, so used by no one after this.
        if unsafe { result::comm_finalize(comm.0) }.is_err() {
            // SAFETY: finalize failed at once, so it is still live.
            let _ = unsafe { result::comm_abort(comm.0) };
            return;
        }
        // On a failure or timeout the watch has aborted (freed) it.
        if finish_creating("release", comm, Instant::now(), self.timeout).is_ok() {
            // SAFETY: finalized and still live; destroy frees it.
            let _ = unsafe { result::comm_destroy(comm.0) };
        }
    }
}
