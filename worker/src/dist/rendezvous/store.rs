//! Rank 0's side of the rendezvous: the store that admits registrations
//! and answers every rank with the roster or the reason it failed.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use super::{Expectation, Hello, PROTOCOL, Peer, Verdict};
use crate::dist::error::DistError;
use crate::dist::frame::{ReadError, read_message, write_message};
use crate::dist::schedule::fnv1a;

/// How long the store waits for one connection's registration, so a client
/// that connects and says nothing cannot stall the others for the whole timeout.
const REGISTRATION_READ: Duration = Duration::from_secs(10);

/// Whether the store accepts `hello`, given the ranks already registered.
/// The message names the rank, both values and the likely cause.
fn admit(expect: &Expectation, hello: &Hello, taken: &[bool]) -> Result<(), String> {
    let r = hello.rank;
    if hello.protocol != PROTOCOL {
        return Err(format!(
            "rank {r} speaks rendezvous protocol {}, rank 0 speaks {PROTOCOL} (different moe-worker versions in one gang?)",
            hello.protocol
        ));
    }
    if hello.little_endian != cfg!(target_endian = "little") {
        return Err(format!(
            "rank {r} has a different byte order from rank 0; payloads are sent in native order"
        ));
    }
    if hello.world_size != expect.world_size {
        return Err(format!(
            "rank {r} was started with world size {}, rank 0 with {} (MOE_WORLD_SIZE differs between pods)",
            hello.world_size, expect.world_size
        ));
    }
    if hello.attempt != expect.attempt {
        return Err(format!(
            "rank {r} belongs to attempt {}, rank 0 to attempt {} (a pod of another gang attempt reached this coordinator)",
            hello.attempt, expect.attempt
        ));
    }
    if hello.config_hash != expect.config_hash {
        return Err(format!(
            "rank {r} has config hash {:016x}, rank 0 has {:016x} (the worker config differs between pods)",
            hello.config_hash, expect.config_hash
        ));
    }
    if r >= expect.world_size {
        return Err(format!(
            "rank {r} is out of range for world size {}",
            expect.world_size
        ));
    }
    if taken[r] {
        return Err(format!(
            "rank {r} registered twice (two pods with the same MOE_NODE_RANK, or a restarted process?)"
        ));
    }
    Ok(())
}

/// Rank 0's store, bound but not yet serving. Binding separately lets a
/// caller bind port 0 and learn the port before the other ranks start.
pub struct Store {
    listener: TcpListener,
}

impl Store {
    pub fn bind(addr: impl ToSocketAddrs) -> Result<Self, DistError> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| DistError::io("cannot bind the rendezvous store", e))?;
        Ok(Self { listener })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, DistError> {
        self.listener
            .local_addr()
            .map_err(|e| DistError::io("rendezvous store address", e))
    }

    /// Serves one rendezvous on a thread: until every rank has registered,
    /// a registration is refused, or `timeout` passes. After a failure the
    /// thread stays until the deadline, giving ranks that register late the
    /// same explanation instead of a refused connection.
    pub fn spawn(self, expect: Expectation, timeout: Duration) -> StoreHandle {
        let (outcome, result) = mpsc::channel();
        thread::spawn(move || serve(&self.listener, expect, timeout, &outcome));
        StoreHandle(result)
    }
}

/// A serving store; [`StoreHandle::wait`] returns its outcome as soon as it
/// is known.
pub struct StoreHandle(mpsc::Receiver<Result<(), DistError>>);

impl StoreHandle {
    pub fn wait(self) -> Result<(), DistError> {
        self.0.recv().unwrap_or_else(|_| {
            Err(DistError::Rejected {
                reason: "the rendezvous store stopped without an outcome".into(),
            })
        })
    }
}

struct Registered {
    stream: TcpStream,
    hello: Hello,
    from: SocketAddr,
}

fn serve(
    listener: &TcpListener,
    expect: Expectation,
    timeout: Duration,
    outcome: &mpsc::Sender<Result<(), DistError>>,
) {
    let deadline = Instant::now() + timeout;
    if let Err(e) = listener.set_nonblocking(true) {
        let _ = outcome.send(Err(DistError::io("rendezvous store", e)));
        return;
    }
    let mut slots: Vec<Option<Registered>> = (0..expect.world_size).map(|_| None).collect();
    let failure = loop {
        if slots.iter().all(Option::is_some) {
            break None;
        }
        if Instant::now() >= deadline {
            let missing: Vec<usize> = (0..slots.len()).filter(|&r| slots[r].is_none()).collect();
            break Some(DistError::RendezvousTimeout {
                waited: timeout,
                registered: slots.len() - missing.len(),
                world_size: expect.world_size,
                missing,
            });
        }
        let Some(Registered {
            mut stream,
            hello,
            from,
        }) = next_registration(listener, deadline)
        else {
            continue;
        };
        let taken: Vec<bool> = slots.iter().map(Option::is_some).collect();
        if let Err(reason) = admit(&expect, &hello, &taken) {
            let _ = write_message(
                &mut stream,
                &Verdict::Rejected {
                    reason: reason.clone(),
                },
            );
            break Some(DistError::Rejected { reason });
        }
        tracing::debug!(rank = hello.rank, %from, "rendezvous: rank registered");
        let rank = hello.rank;
        slots[rank] = Some(Registered {
            stream,
            hello,
            from,
        });
    };
    let mut registered: Vec<Registered> = slots.into_iter().flatten().collect();
    let Some(error) = failure else {
        let verdict = Verdict::Roster {
            session: new_session(listener),
            peers: registered
                .iter()
                .map(|r| Peer {
                    addr: reachable_addr(&r.hello.listen, r.from.ip()),
                    blob: r.hello.blob.clone(),
                })
                .collect(),
        };
        for r in &mut registered {
            if let Err(e) = write_message(&mut r.stream, &verdict) {
                // That rank will time out or fail on its own; the others go on.
                tracing::warn!(rank = r.hello.rank, error = %e, "rendezvous store: could not send the roster");
            }
        }
        let _ = outcome.send(Ok(()));
        return;
    };
    let verdict = Verdict::Rejected {
        reason: error.to_string(),
    };
    for r in &mut registered {
        let _ = write_message(&mut r.stream, &verdict);
    }
    let _ = outcome.send(Err(error));
    // Ranks still on their way get the same verdict, not a refused
    // connection and a vaguer error at their own deadline.
    while Instant::now() < deadline {
        if let Some(mut late) = next_registration(listener, deadline) {
            let _ = write_message(&mut late.stream, &verdict);
        }
    }
}

/// The next connection's registration, or `None` after a short wait for
/// one. Connections without a valid registration (a probe, a scanner, a rank
/// that died mid-hello) are logged and dropped.
fn next_registration(listener: &TcpListener, deadline: Instant) -> Option<Registered> {
    // std has no accept timeout: poll a non-blocking listener. The
    // rendezvous happens once per attempt, so 5 ms of latency is nothing.
    let (mut stream, from) = match listener.accept() {
        Ok(accepted) => accepted,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            thread::sleep(Duration::from_millis(5));
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "rendezvous store: accept failed");
            thread::sleep(Duration::from_millis(50));
            return None;
        }
    };
    let hello = stream
        .set_nonblocking(false)
        .map_err(ReadError::Io)
        .and_then(|()| {
            read_message::<Hello>(
                &mut stream,
                deadline.min(Instant::now() + REGISTRATION_READ),
            )
        });
    match hello {
        Ok(hello) => Some(Registered {
            stream,
            hello,
            from,
        }),
        Err(e) => {
            tracing::warn!(%from, error = %e.detail(), "rendezvous store: dropped a connection without a valid registration");
            None
        }
    }
}

/// `listen` with an unspecified IP replaced by `seen` (the address the rank
/// connected from), so ranks can listen on `0.0.0.0` without knowing their IP.
fn reachable_addr(listen: &str, seen: IpAddr) -> String {
    match listen.parse::<SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => SocketAddr::new(seen, addr.port()).to_string(),
        _ => listen.to_string(),
    }
}

/// A session id that differs between rendezvous: time, process and port.
fn new_session(listener: &TcpListener) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let port = listener.local_addr().map_or(0, |a| a.port());
    let mut bytes = nanos.to_le_bytes().to_vec();
    bytes.extend_from_slice(&std::process::id().to_le_bytes());
    bytes.extend_from_slice(&port.to_le_bytes());
    fnv1a(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(rank: usize) -> Hello {
        Hello {
            protocol: PROTOCOL,
            little_endian: cfg!(target_endian = "little"),
            rank,
            world_size: 4,
            config_hash: 7,
            attempt: 2,
            listen: "127.0.0.1:1".into(),
            blob: vec![],
        }
    }

    const EXPECT: Expectation = Expectation {
        world_size: 4,
        config_hash: 7,
        attempt: 2,
    };

    #[test]
    fn admit_names_the_mismatch_and_both_values() {
        let free = [false; 4];
        assert_eq!(admit(&EXPECT, &hello(3), &free), Ok(()));
        let cases: Vec<(Hello, &str)> = vec![
            (
                Hello {
                    world_size: 8,
                    ..hello(1)
                },
                "world size 8, rank 0 with 4",
            ),
            (
                Hello {
                    attempt: 1,
                    ..hello(1)
                },
                "attempt 1, rank 0 to attempt 2",
            ),
            (
                Hello {
                    config_hash: 9,
                    ..hello(1)
                },
                "config hash 0000000000000009, rank 0 has 0000000000000007",
            ),
            (
                Hello {
                    protocol: 0,
                    ..hello(1)
                },
                "protocol 0",
            ),
            (hello(4), "out of range"),
        ];
        for (h, needle) in cases {
            let err = admit(&EXPECT, &h, &free).unwrap_err();
            assert!(err.contains(needle), "{err:?} should contain {needle:?}");
        }
        let taken = [false, true, false, false];
        assert!(
            admit(&EXPECT, &hello(1), &taken)
                .unwrap_err()
                .contains("twice")
        );
    }

    #[test]
    fn unspecified_listen_ip_becomes_the_seen_one() {
        let seen: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(reachable_addr("0.0.0.0:555", seen), "10.1.2.3:555");
        assert_eq!(reachable_addr("127.0.0.1:555", seen), "127.0.0.1:555");
        assert_eq!(reachable_addr("pod-0.svc:555", seen), "pod-0.svc:555");
    }
}
