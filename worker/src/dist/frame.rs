//! Bytes on the wire: the fixed header in front of every collective payload,
//! the length-prefixed JSON of the rendezvous, and reads bounded by a
//! deadline (a socket read timeout bounds one `read` call, not a message).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// "MOE1": the first field of every collective frame; anything else on a
/// mesh connection is a stray or a newer protocol.
const MAGIC: u32 = 0x4d4f_4531;
pub(crate) const HEADER_LEN: usize = 32;

/// What a payload belongs to. The receiver knows all four fields before it
/// reads, so a frame from a different collective, group or call is caught
/// instead of being summed into the wrong buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// Which collective ([`crate::dist::tcp`] numbers them).
    pub op: u32,
    /// Hash of the group's global ranks.
    pub group: u64,
    /// How many collectives this group ran before this one.
    pub seq: u64,
    /// Payload bytes.
    pub len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.op.to_le_bytes());
        out[8..16].copy_from_slice(&self.group.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, String> {
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(format!(
                "bad frame magic {magic:#010x} (not a moe-worker peer, or a different protocol version)"
            ));
        }
        Ok(Self {
            op: u32_at(4),
            group: u64_at(8),
            seq: u64_at(16),
            len: u64_at(24),
        })
    }
}

/// Why a bounded read did not fill its buffer.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The deadline passed first.
    TimedOut,
    /// The peer closed the connection (end of stream).
    Closed,
    Io(io::Error),
}

impl ReadError {
    pub fn detail(&self) -> String {
        match self {
            Self::TimedOut => "timed out".into(),
            Self::Closed => "connection closed by the peer".into(),
            Self::Io(e) => e.to_string(),
        }
    }
}

/// Fills `buf` from `stream` or fails by `deadline`. The socket timeout is
/// reset to the time left before each `read`, so a peer trickling bytes
/// cannot stretch the wait past the deadline.
pub(crate) fn read_exact_by(
    stream: &mut TcpStream,
    mut buf: &mut [u8],
    deadline: Instant,
) -> Result<(), ReadError> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::TimedOut);
        }
        stream.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
        match stream.read(buf) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(n) => buf = &mut buf[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::TimedOut);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(())
}

/// Rendezvous messages are small; anything longer is not ours (an HTTP
/// probe, a port scanner) and is refused before allocating.
const MAX_MESSAGE: u32 = 1 << 20;

/// Writes `message` as a little-endian `u32` length and its JSON.
pub(crate) fn write_message<T: Serialize>(stream: &mut TcpStream, message: &T) -> io::Result<()> {
    let json = serde_json::to_vec(message).map_err(io::Error::other)?;
    let len = u32::try_from(json.len())
        .ok()
        .filter(|&n| n <= MAX_MESSAGE)
        .ok_or_else(|| io::Error::other("rendezvous message too large"))?;
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&json);
    stream.write_all(&out)?;
    stream.flush()
}

/// Reads one [`write_message`] frame by `deadline`.
pub(crate) fn read_message<T: DeserializeOwned>(
    stream: &mut TcpStream,
    deadline: Instant,
) -> Result<T, ReadError> {
    let mut len = [0u8; 4];
    read_exact_by(stream, &mut len, deadline)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(ReadError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes is not a rendezvous message"),
        )));
    }
    let mut json = vec![0u8; len as usize];
    read_exact_by(stream, &mut json, deadline)?;
    serde_json::from_slice(&json)
        .map_err(|e| ReadError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_foreign_bytes() {
        let h = Header {
            op: 3,
            group: 0xdead_beef_0123_4567,
            seq: 42,
            len: 1 << 40,
        };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let mut http = [0u8; HEADER_LEN];
        http[..16].copy_from_slice(b"GET / HTTP/1.1\r\n");
        assert!(Header::decode(&http).unwrap_err().contains("magic"));
    }
}
