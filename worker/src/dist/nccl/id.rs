//! The NCCL unique id through the rendezvous blob (pure). Rank 0 makes the
//! id (`ncclGetUniqueId`: the address of its bootstrap listener plus a
//! random magic) and registers it as its blob; every rank reads it back
//! from rank 0's roster entry. A tag and length check come first, so a
//! rank of another backend (an empty blob: a TCP rank, `device: cpu`) or
//! another build fails the gang with a sentence, never a garbled id.

use crate::dist::error::DistError;
use crate::dist::rendezvous::Roster;

/// `sizeof(ncclUniqueId)`: `NCCL_UNIQUE_ID_BYTES` in every NCCL 2.x.
pub const ID_BYTES: usize = 128;
/// "NCID" and a format version, ahead of the id's bytes.
const TAG: [u8; 5] = *b"NCID\x01";

/// The blob rank 0 registers.
pub fn encode(id: &[u8; ID_BYTES]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(TAG.len() + ID_BYTES);
    blob.extend_from_slice(&TAG);
    blob.extend_from_slice(id);
    blob
}

/// The id in `blob`, or why it is not one.
pub fn decode(blob: &[u8]) -> Result<[u8; ID_BYTES], DistError> {
    let protocol = |detail: String| DistError::Protocol {
        op: "nccl rendezvous",
        detail,
    };
    if blob.is_empty() {
        return Err(protocol(
            "rank 0 registered no NCCL id: it runs the TCP backend (is its worker \
             config's device cpu, or its worker built without CUDA?)"
                .into(),
        ));
    }
    let Some(id) = blob.strip_prefix(&TAG) else {
        return Err(protocol(format!(
            "rank 0's rendezvous blob ({} bytes) is not an NCCL id of this worker version",
            blob.len()
        )));
    };
    id.try_into().map_err(|_| {
        protocol(format!(
            "rank 0's NCCL id is {} bytes, expected {ID_BYTES}",
            id.len()
        ))
    })
}

/// The gang's id: rank 0's blob in the roster.
pub fn from_roster(roster: &Roster) -> Result<[u8; ID_BYTES], DistError> {
    let first = roster.peers.first().ok_or_else(|| DistError::Protocol {
        op: "nccl rendezvous",
        detail: "the roster is empty".into(),
    })?;
    decode(&first.blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::rendezvous::Peer;

    fn id() -> [u8; ID_BYTES] {
        std::array::from_fn(|i| (i * 7 + 3) as u8)
    }

    #[test]
    fn an_id_survives_the_blob_and_the_roster() {
        let blob = encode(&id());
        assert_eq!(blob.len(), 5 + ID_BYTES);
        assert_eq!(decode(&blob).unwrap(), id());
        let roster = Roster {
            session: 7,
            peers: vec![
                Peer {
                    addr: String::new(),
                    blob,
                },
                Peer {
                    addr: String::new(),
                    blob: Vec::new(),
                },
            ],
        };
        assert_eq!(from_roster(&roster).unwrap(), id());
    }

    #[test]
    fn blobs_that_are_not_an_id_say_why() {
        let message = |blob: &[u8]| decode(blob).unwrap_err().to_string();
        assert!(message(&[]).contains("TCP backend"), "{}", message(&[]));
        let foreign = vec![0u8; ID_BYTES];
        assert!(message(&foreign).contains("not an NCCL id"));
        let mut short = encode(&id());
        short.pop();
        assert!(message(&short).contains("127 bytes, expected 128"));
        let empty = Roster {
            session: 1,
            peers: Vec::new(),
        };
        assert!(from_roster(&empty).is_err());
    }
}
