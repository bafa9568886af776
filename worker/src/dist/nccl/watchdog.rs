//! Bounding NCCL operations in time. NCCL calls only enqueue work (and,
//! on a non-blocking communicator, may return before even that is done);
//! a peer that died or hung leaves this rank's kernels spinning forever,
//! and `cudaStreamSynchronize` would wait with them. So every operation is
//! watched instead: poll the communicator's state
//! (`ncclCommGetAsyncError`) and the stream's progress (an event) until
//! both say done, an error appears, or the deadline passes; then
//! `ncclCommAbort` stops the kernels and the caller gets the same
//! [`DistError::Timeout`] the TCP backend returns.
//!
//! The decision is pure ([`decide`]); the loop ([`watch`]) polls whatever
//! implements [`Watched`], so both are tested without a GPU.

use std::time::{Duration, Instant};

use crate::dist::error::DistError;

/// What `ncclCommGetAsyncError` said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// `ncclSuccess`: nothing pending on the host side, no error.
    Ok,
    /// `ncclInProgress`: a non-blocking call is still being carried out.
    InProgress,
    /// Anything else. `remote` for `ncclRemoteError` (another rank failed).
    Failed { detail: String, remote: bool },
}

/// One look at an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Poll {
    pub health: Health,
    /// The device work enqueued for the operation has finished (always
    /// true while waiting only for a host-side call, such as an init).
    pub work_done: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Finished,
    Wait,
    /// Abort the communicator: past the deadline, or NCCL failed.
    Abort(Reason),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    TimedOut,
    Failed { detail: String, remote: bool },
}

/// An error wins over completion (the results cannot be trusted), and
/// completion over the deadline (work that finished in time is not
/// thrown away because the look came late).
pub fn decide(poll: &Poll, elapsed: Duration, timeout: Duration) -> Verdict {
    match &poll.health {
        Health::Failed { detail, remote } => Verdict::Abort(Reason::Failed {
            detail: detail.clone(),
            remote: *remote,
        }),
        Health::Ok if poll.work_done => Verdict::Finished,
        _ if elapsed >= timeout => Verdict::Abort(Reason::TimedOut),
        _ => Verdict::Wait,
    }
}

/// How long to sleep after `polls` looks: spin (yield) first, since most
/// collectives finish in microseconds, then back off to 1 ms, which bounds
/// both the CPU a long wait burns and the latency it adds.
pub fn pause(polls: u32) -> Duration {
    match polls {
        0..64 => Duration::ZERO,
        n => Duration::from_micros((20u64 << ((n - 64) / 16).min(6)).min(1000)),
    }
}

/// An operation being waited for.
pub trait Watched {
    fn poll(&mut self) -> Poll;
    /// Aborts the communicator (once; the watch ends right after).
    fn abort(&mut self, why: &str);
}

/// Waits for `target` until it finishes or `deadline` passes (`timeout`
/// is the bound the deadline came from, for the error). Aborts on a
/// timeout or an NCCL error, and returns the error the caller reports.
pub fn watch(
    op: &'static str,
    target: &mut dyn Watched,
    started: Instant,
    timeout: Duration,
) -> Result<(), DistError> {
    let mut polls = 0u32;
    loop {
        let poll = target.poll();
        match decide(&poll, started.elapsed(), timeout) {
            Verdict::Finished => return Ok(()),
            Verdict::Wait => {
                let pause = pause(polls);
                if pause.is_zero() {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(pause);
                }
                polls = polls.saturating_add(1);
            }
            Verdict::Abort(reason) => {
                let error = match reason {
                    Reason::TimedOut => DistError::Timeout {
                        op,
                        peer: None,
                        after: timeout,
                    },
                    Reason::Failed { detail, remote } => DistError::Library { op, detail, remote },
                };
                target.abort(&error.to_string());
                return Err(error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(100);

    fn poll(health: Health, work_done: bool) -> Poll {
        Poll { health, work_done }
    }

    #[test]
    fn decisions() {
        let early = Duration::from_millis(10);
        let late = Duration::from_millis(150);
        assert_eq!(decide(&poll(Health::Ok, true), early, T), Verdict::Finished);
        assert_eq!(decide(&poll(Health::Ok, true), late, T), Verdict::Finished);
        assert_eq!(decide(&poll(Health::Ok, false), early, T), Verdict::Wait);
        // A non-blocking call still in progress is not done, even with an
        // idle stream (its kernels may not be enqueued yet).
        assert_eq!(
            decide(&poll(Health::InProgress, true), early, T),
            Verdict::Wait
        );
        assert_eq!(
            decide(&poll(Health::InProgress, true), late, T),
            Verdict::Abort(Reason::TimedOut)
        );
        assert_eq!(
            decide(&poll(Health::Ok, false), T, T),
            Verdict::Abort(Reason::TimedOut)
        );
        let failed = Health::Failed {
            detail: "remote".into(),
            remote: true,
        };
        assert_eq!(
            decide(&poll(failed, true), early, T),
            Verdict::Abort(Reason::Failed {
                detail: "remote".into(),
                remote: true
            })
        );
    }

    #[test]
    fn the_pause_spins_then_backs_off_to_a_millisecond() {
        assert_eq!(pause(0), Duration::ZERO);
        assert_eq!(pause(63), Duration::ZERO);
        assert_eq!(pause(64), Duration::from_micros(20));
        assert!((64..10_000).all(|n| pause(n) <= pause(n + 1)));
        assert_eq!(pause(u32::MAX), Duration::from_millis(1));
    }

    /// Finishes after `after` polls, or never; counts aborts.
    struct Fake {
        polls: usize,
        after: Option<usize>,
        health: Health,
        aborts: Vec<String>,
    }

    impl Watched for Fake {
        fn poll(&mut self) -> Poll {
            self.polls += 1;
            let done = self.after.is_some_and(|n| self.polls >= n);
            Poll {
                health: self.health.clone(),
                work_done: done,
            }
        }
        fn abort(&mut self, why: &str) {
            self.aborts.push(why.to_string());
        }
    }

    fn fake(after: Option<usize>, health: Health) -> Fake {
        Fake {
            polls: 0,
            after,
            health,
            aborts: Vec::new(),
        }
    }

    #[test]
    fn work_that_finishes_is_not_aborted() {
        let mut f = fake(Some(500), Health::Ok);
        watch(
            "all_reduce",
            &mut f,
            Instant::now(),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!((f.polls, f.aborts.len()), (500, 0));
    }

    #[test]
    fn a_hung_operation_is_aborted_at_the_deadline_with_the_tcp_error() {
        let mut f = fake(None, Health::Ok);
        let started = Instant::now();
        let timeout = Duration::from_millis(40);
        let error = watch("all_to_all", &mut f, started, timeout).unwrap_err();
        let waited = started.elapsed();
        assert!(waited >= timeout && waited < timeout * 10, "{waited:?}");
        assert!(matches!(
            error,
            DistError::Timeout {
                op: "all_to_all",
                peer: None,
                ..
            }
        ));
        assert!(error.is_peer_failure());
        assert_eq!(f.aborts.len(), 1);
        assert!(f.aborts[0].contains("timed out"), "{}", f.aborts[0]);
    }

    #[test]
    fn an_nccl_error_aborts_at_once() {
        let mut f = fake(
            None,
            Health::Failed {
                detail: "ncclRemoteError: a peer failed".into(),
                remote: true,
            },
        );
        let started = Instant::now();
        let error = watch("broadcast", &mut f, started, Duration::from_secs(10)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(error.is_peer_failure(), "{error}");
        assert_eq!((f.polls, f.aborts.len()), (1, 1));
        let mut local = fake(
            None,
            Health::Failed {
                detail: "ncclUnhandledCudaError".into(),
                remote: false,
            },
        );
        let error = watch("broadcast", &mut local, started, Duration::from_secs(10)).unwrap_err();
        assert!(!error.is_peer_failure(), "{error}");
    }
}
