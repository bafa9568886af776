//! How the ranks of an expert-parallel replica run the same steps: rank 0
//! (the leader: HTTP, scheduler, sampling) broadcasts each step's plan
//! before running it, and the other ranks (followers) run exactly that
//! plan on their own engine and KV cache.
//!
//! ```text
//!  leader:   Scheduler::plan ─▶ broadcast header ─▶ broadcast plan ─▶ Engine::step (samples)
//!  follower:                    receive header  ─▶ receive plan   ─▶ Engine::step (no logits)
//!  idle:     every heartbeat ─▶ broadcast Idle ─▶ barrier  (both sides: a dead rank shows)
//!  rebalance: broadcast Rebalance ─▶ Engine::rebalance_experts on every rank (its own collectives)
//!  shutdown: broadcast Stop ─▶ barrier ─▶ followers exit 0
//! ```
//!
//! A plan names the KV pages of every chunk, so a follower keeps no
//! sequence state at all: pages are allocated and freed only by the
//! leader's scheduler, and a follower just writes and reads the pages a
//! plan names (a freed sequence is simply never named again). Its cache
//! stays identical to the leader's because it runs the same chunks.
//!
//! Wire format (little-endian), a fixed header then the payload:
//!
//! ```text
//!  header (16 bytes): magic "MOEP" u32 | kind u32 (1 step, 2 idle, 3 stop, 4 rebalance)
//!                     | payload bytes u64
//!  step payload:      chunks u32, then per chunk:
//!                     start u32 | tokens u32 | pages u32 | logits u8 (0 none, 1 the last row, 2 every row)
//!                     | adapter u32 (the engine's adapter index; u32::MAX: the base model)
//!                     | tokens × u32 | pages × u32
//! ```
//!
//! Only the pages covering the chunk's positions are sent (not the ones
//! its sequence holds for later tokens). Decoding checks every length, so
//! a corrupt plan is an error, never a panic or a wrong read.

use std::time::{Duration, Instant};

use crate::dist::{Collective, DistError};
use crate::serve::engine::{Chunk, Logits};
use crate::serve::kv_cache::{PageId, pages_for};

const MAGIC: u32 = u32::from_le_bytes(*b"MOEP");
const HEADER_LEN: usize = 16;
const CHUNK_HEADER_LEN: usize = 17;
/// The adapter word of a chunk run with the base model.
const NO_ADAPTER: u32 = u32::MAX;
const OP: &str = "serve plan";

/// What the leader tells its followers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Run this step.
    Step(StepPlan),
    /// Nothing to run: a heartbeat, answered by a barrier, so a rank that
    /// died while the replica is idle is noticed within a heartbeat.
    Idle,
    /// The leader is shutting down: exit 0. Answered by a barrier, so the
    /// leader exits only once every follower has it.
    Stop,
    /// Choose the expert copies again and move their weights
    /// (`serve/rebalance.rs`), every rank now.
    Rebalance,
}

/// One step: the chunks, in the order the engine runs them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub chunks: Vec<PlannedChunk>,
}

/// An owned [`Chunk`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedChunk {
    /// The pages covering positions `0..start + tokens.len()`, in order.
    pub pages: Vec<PageId>,
    pub start: usize,
    pub tokens: Vec<u32>,
    pub logits: Logits,
    /// The engine's adapter the chunk runs with (`None`: the base model).
    pub adapter: Option<usize>,
}

impl StepPlan {
    /// The plan of `chunks`, each with only the pages its positions reach.
    pub fn from_chunks(chunks: &[Chunk<'_>], page_size: usize) -> Self {
        let chunks = chunks
            .iter()
            .map(|c| {
                let needed = pages_for(c.start + c.tokens.len(), page_size).min(c.pages.len());
                PlannedChunk {
                    pages: c.pages[..needed].to_vec(),
                    start: c.start,
                    tokens: c.tokens.to_vec(),
                    logits: c.logits,
                    adapter: c.adapter,
                }
            })
            .collect();
        Self { chunks }
    }

    /// The chunks to run.
    pub fn chunks(&self) -> Vec<Chunk<'_>> {
        self.chunks
            .iter()
            .map(|c| Chunk {
                pages: &c.pages,
                start: c.start,
                tokens: &c.tokens,
                logits: c.logits,
                adapter: c.adapter,
            })
            .collect()
    }
}

/// Why bytes are not a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanError(pub String);

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PlanError {}

fn kind(message: &Message) -> u32 {
    match message {
        Message::Step(_) => 1,
        Message::Idle => 2,
        Message::Stop => 3,
        Message::Rebalance => 4,
    }
}

/// The header of a message whose payload is `payload` bytes.
pub fn encode_header(message: &Message, payload: usize) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&kind(message).to_le_bytes());
    out[8..16].copy_from_slice(&(payload as u64).to_le_bytes());
    out
}

/// The payload of a message (empty but for a step).
pub fn encode_payload(message: &Message) -> Result<Vec<u8>, PlanError> {
    let Message::Step(plan) = message else {
        return Ok(Vec::new());
    };
    let word = |n: usize, what: &str| {
        u32::try_from(n).map_err(|_| PlanError(format!("{what} {n} does not fit the plan format")))
    };
    let mut out = Vec::new();
    out.extend_from_slice(&word(plan.chunks.len(), "chunk count")?.to_le_bytes());
    for c in &plan.chunks {
        out.extend_from_slice(&word(c.start, "start position")?.to_le_bytes());
        out.extend_from_slice(&word(c.tokens.len(), "token count")?.to_le_bytes());
        out.extend_from_slice(&word(c.pages.len(), "page count")?.to_le_bytes());
        out.push(match c.logits {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All => 2,
        });
        let adapter = match c.adapter {
            Some(a) => u32::try_from(a)
                .ok()
                .filter(|&a| a != NO_ADAPTER)
                .ok_or_else(|| PlanError(format!("adapter {a} does not fit the plan")))?,
            None => NO_ADAPTER,
        };
        out.extend_from_slice(&adapter.to_le_bytes());
        for &t in &c.tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
        for &p in &c.pages {
            out.extend_from_slice(&p.to_le_bytes());
        }
    }
    Ok(out)
}

/// What a header announces: the message (without its payload) and the
/// payload's length.
pub fn decode_header(bytes: &[u8]) -> Result<(u32, usize), PlanError> {
    if bytes.len() != HEADER_LEN {
        return Err(PlanError(format!(
            "a plan header of {} bytes, not {HEADER_LEN}",
            bytes.len()
        )));
    }
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(PlanError(format!(
            "plan header magic {magic:#010x}: not a serving plan (ranks of different versions?)"
        )));
    }
    let kind = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let len = usize::try_from(len).map_err(|_| PlanError(format!("a payload of {len} bytes")))?;
    match (kind, len) {
        (1, _) | (2..=4, 0) => Ok((kind, len)),
        (2..=4, _) => Err(PlanError(format!(
            "message kind {kind} carries no payload, but {len} bytes are announced"
        ))),
        _ => Err(PlanError(format!("unknown message kind {kind}"))),
    }
}

/// The message of a header's `kind` with `payload`.
pub fn decode(kind: u32, payload: &[u8]) -> Result<Message, PlanError> {
    match kind {
        1 => decode_step(payload).map(Message::Step),
        2 if payload.is_empty() => Ok(Message::Idle),
        3 if payload.is_empty() => Ok(Message::Stop),
        4 if payload.is_empty() => Ok(Message::Rebalance),
        _ => Err(PlanError(format!(
            "message kind {kind} with {} payload bytes",
            payload.len()
        ))),
    }
}

/// A reader that fails, naming what was cut short, instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], PlanError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(PlanError(format!(
                "the plan ends at byte {} inside {what} (needs {n} bytes from byte {})",
                self.bytes.len(),
                self.at
            )));
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn word(&mut self, what: &str) -> Result<u32, PlanError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn words(&mut self, n: usize, what: &str) -> Result<Vec<u32>, PlanError> {
        let bytes = self.take(n.saturating_mul(4), what)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

fn decode_step(payload: &[u8]) -> Result<StepPlan, PlanError> {
    let mut r = Reader {
        bytes: payload,
        at: 0,
    };
    let count = r.word("the chunk count")? as usize;
    // Every chunk takes at least its header: a huge count cannot allocate.
    if count > payload.len() / CHUNK_HEADER_LEN {
        return Err(PlanError(format!(
            "{count} chunks announced in a plan of {} bytes",
            payload.len()
        )));
    }
    let mut chunks = Vec::with_capacity(count);
    for i in 0..count {
        let start = r.word("a chunk's start")? as usize;
        let tokens = r.word("a chunk's token count")? as usize;
        let pages = r.word("a chunk's page count")? as usize;
        let flags = r.take(1, "a chunk's logits")?[0];
        let logits = match flags {
            0 => Logits::None,
            1 => Logits::Last,
            2 => Logits::All,
            _ => {
                return Err(PlanError(format!(
                    "chunk {i} asks for logits {flags:#04x}, which is no known choice"
                )));
            }
        };
        let adapter = match r.word("a chunk's adapter")? {
            NO_ADAPTER => None,
            a => Some(a as usize),
        };
        let tokens = r.words(tokens, "a chunk's tokens")?;
        let pages = r.words(pages, "a chunk's pages")?;
        chunks.push(PlannedChunk {
            pages,
            start,
            tokens,
            adapter,
            logits,
        });
    }
    if r.at != payload.len() {
        return Err(PlanError(format!(
            "{} bytes after the plan's {count} chunks",
            payload.len() - r.at
        )));
    }
    Ok(StepPlan { chunks })
}

fn protocol(e: PlanError) -> DistError {
    DistError::Protocol {
        op: OP,
        detail: e.to_string(),
    }
}

/// One rank's end of the plan broadcast, over the replica's world.
pub struct Lockstep {
    world: Box<dyn Collective>,
    /// How often an idle leader sends [`Message::Idle`]; well inside the
    /// collective timeout a follower waits for the next message.
    heartbeat: Duration,
    last_sent: Instant,
    /// Payload bytes the leader sent (headers and plans, once per follower).
    bytes_sent: u64,
}

impl Lockstep {
    /// `heartbeat`: a quarter of the collective timeout is what the server uses.
    pub fn new(world: Box<dyn Collective>, heartbeat: Duration) -> Self {
        Self {
            world,
            heartbeat,
            last_sent: Instant::now(),
            bytes_sent: 0,
        }
    }

    pub fn rank(&self) -> usize {
        self.world.rank()
    }

    pub fn size(&self) -> usize {
        self.world.size()
    }

    /// Bytes of headers and plans the leader sent, counted once per follower.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Until the leader should send a heartbeat.
    pub fn until_heartbeat(&self) -> Duration {
        self.heartbeat.saturating_sub(self.last_sent.elapsed())
    }

    /// The leader: sends `message` to every follower (rank 0 only).
    pub fn send(&mut self, message: &Message) -> Result<(), DistError> {
        let payload = encode_payload(message).map_err(protocol)?;
        let mut header = encode_header(message, payload.len());
        self.world.broadcast_bytes(&mut header, 0)?;
        let mut payload = payload;
        if !payload.is_empty() {
            self.world.broadcast_bytes(&mut payload, 0)?;
        }
        let followers = self.size().saturating_sub(1) as u64;
        self.bytes_sent += (HEADER_LEN + payload.len()) as u64 * followers;
        if matches!(message, Message::Idle | Message::Stop) {
            self.world.barrier()?;
        }
        self.last_sent = Instant::now();
        Ok(())
    }

    /// The leader: a heartbeat if one is due.
    pub fn keep_alive(&mut self) -> Result<(), DistError> {
        if self.until_heartbeat().is_zero() {
            self.send(&Message::Idle)?;
        }
        Ok(())
    }

    /// A follower: the leader's next message (an `Idle` or `Stop` already answered).
    pub fn receive(&mut self) -> Result<Message, DistError> {
        let mut header = [0u8; HEADER_LEN];
        self.world.broadcast_bytes(&mut header, 0)?;
        let (kind, len) = decode_header(&header).map_err(protocol)?;
        let mut payload = vec![0u8; len];
        if len > 0 {
            self.world.broadcast_bytes(&mut payload, 0)?;
        }
        let message = decode(kind, &payload).map_err(protocol)?;
        match message {
            Message::Idle => self.world.barrier()?,
            // The Stop barrier is the leader's: it leaves only once every
            // follower has arrived. A peer that finished it may exit before
            // its last frame reaches this rank (the process ends with the
            // frame still queued); losing that peer now is the end the
            // leader asked for, not a failure.
            Message::Stop => match self.world.barrier() {
                Err(DistError::PeerLost { peer, detail, .. }) => {
                    tracing::debug!(peer, %detail, "a peer left after the stop");
                }
                done => done?,
            },
            Message::Step(_) | Message::Rebalance => {}
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> StepPlan {
        StepPlan {
            chunks: vec![
                PlannedChunk {
                    pages: vec![7, 3],
                    start: 0,
                    tokens: vec![1, 2, 3, 255, 17],
                    logits: Logits::All,
                    adapter: Some(2),
                },
                PlannedChunk {
                    pages: vec![0],
                    start: 12,
                    tokens: vec![u32::MAX],
                    logits: Logits::None,
                    adapter: None,
                },
                PlannedChunk {
                    pages: vec![9, 8, 5, 4],
                    start: 63,
                    tokens: vec![42],
                    logits: Logits::Last,
                    adapter: Some(0),
                },
            ],
        }
    }

    fn round_trip(message: &Message) -> Message {
        let payload = encode_payload(message).unwrap();
        let header = encode_header(message, payload.len());
        let (kind, len) = decode_header(&header).unwrap();
        assert_eq!(len, payload.len());
        decode(kind, &payload).unwrap()
    }

    #[test]
    fn every_message_round_trips() {
        for message in [
            Message::Step(plan()),
            Message::Step(StepPlan::default()),
            Message::Idle,
            Message::Stop,
            Message::Rebalance,
        ] {
            assert_eq!(round_trip(&message), message);
        }
        // 4 + 3 × 17 header bytes, 7 tokens and 7 pages.
        let payload = encode_payload(&Message::Step(plan())).unwrap();
        assert_eq!(payload.len(), 4 + 3 * CHUNK_HEADER_LEN + 14 * 4);
    }

    #[test]
    fn chunks_carry_only_the_pages_their_positions_reach() {
        let pages = [4, 9, 2, 6];
        let tokens = [5, 6, 7];
        let chunks = [
            // Positions 14..17 with pages of 16: the first two pages.
            Chunk {
                pages: &pages,
                start: 14,
                tokens: &tokens,
                logits: Logits::Last,
                adapter: Some(1),
            },
            // Position 0: one page.
            Chunk {
                pages: &pages,
                start: 0,
                tokens: &tokens[..1],
                logits: Logits::None,
                adapter: None,
            },
        ];
        let plan = StepPlan::from_chunks(&chunks, 16);
        assert_eq!(plan.chunks[0].pages, [4, 9]);
        assert_eq!(plan.chunks[1].pages, [4]);
        let back = plan.chunks();
        assert_eq!(
            (
                back[0].start,
                back[0].tokens,
                back[0].logits,
                back[0].adapter
            ),
            (14, &tokens[..], Logits::Last, Some(1))
        );
        assert_eq!(
            (back[1].start, back[1].tokens, back[1].adapter),
            (0, &tokens[..1], None)
        );
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_refused() {
        let payload = encode_payload(&Message::Step(plan())).unwrap();
        for cut in 0..payload.len() {
            let error = decode(1, &payload[..cut]).unwrap_err();
            assert!(
                error.0.contains("ends at byte") || error.0.contains("announced"),
                "cut at {cut}: {error}"
            );
        }
        let mut long = payload.clone();
        long.push(0);
        assert!(decode(1, &long).unwrap_err().0.contains("1 bytes after"));
        // A count no payload could hold is refused before allocating.
        let mut huge = payload;
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(1, &huge).unwrap_err().0.contains("announced"));
        // Unknown flags.
        let mut flags = encode_payload(&Message::Step(plan())).unwrap();
        flags[4 + 12] = 3;
        assert!(decode(1, &flags).unwrap_err().0.contains("no known choice"));
    }

    #[test]
    fn bad_headers_are_refused() {
        let good = encode_header(&Message::Idle, 0);
        assert_eq!(decode_header(&good), Ok((2, 0)));
        let mut magic = good;
        magic[0] ^= 1;
        assert!(decode_header(&magic).unwrap_err().0.contains("magic"));
        let mut kind = good;
        kind[4] = 9;
        assert!(decode_header(&kind).unwrap_err().0.contains("unknown"));
        let idle_with_payload = encode_header(&Message::Idle, 5);
        assert!(decode_header(&idle_with_payload).is_err());
        assert!(decode_header(&good[..15]).is_err());
        assert!(decode(3, &[1]).is_err());
    }
}
