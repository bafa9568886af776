//! Training windows drawn at seeded random offsets.
//!
//! Each sequence starts at a uniformly random token, so every offset (not
//! just multiples of `seq_len`) is seen; or, in a corpus of conversations
//! (supervised fine-tuning), is one conversation from its start, cut or
//! padded to `seq_len`, in epochs: each conversation once per epoch, in an
//! order shuffled from the seed and the epoch. The whole position in the stream
//! is the generator's state plus a count, which a checkpoint stores: a
//! resumed run draws exactly the windows the uninterrupted run would have.

use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::data::{Corpus, DataError};
use crate::rng::SplitMix64;

/// Mixed into the training seed so the data order is not the same stream
/// as the weight initialisation.
const DATA_STREAM: u64 = 0xDA7A_0D3E_5EED_0001;

/// Where the stream stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataPosition {
    /// Sequences drawn so far (for logs; the state alone determines the future).
    pub sequences: u64,
    /// The SplitMix64 state that draws the next offset.
    pub rng_state: u64,
    /// Conversations drawn so far when sequences pack several
    /// (`data.packing`; absent otherwise): where the next one is.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub conversations: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `inputs[i]` is followed by `targets[i]` in the corpus; both `[sequences * seq_len]`.
/// A target the model is not trained to predict (a prompt's token, in
/// supervised fine-tuning) is [`crate::ops::cross_entropy::IGNORED`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Tokens of each sequence in `inputs` (a sequence-parallel rank's
    /// slice of one; fewer than the model's `seqLen` once
    /// [`Self::trim_padding`] cut padding every sequence has).
    pub seq_len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// Each sequence's real tokens, from its start: the rest is padding (a
    /// conversation shorter than the sequence), which the MoE layers leave
    /// out of their loads and balance loss ([`crate::moe::Sequences`]).
    /// Every token for text.
    pub real: Vec<usize>,
    /// Packed sequences (`data.packing`): per token, the position in its
    /// sequence where its document (conversation) starts; attention stays
    /// within it and RoPE counts from it. Always the whole sequences', even
    /// when `inputs` are a sequence-parallel rank's slices. `None`: each
    /// sequence is one document.
    pub documents: Option<Vec<u32>>,
}

impl Batch {
    /// Cuts the padding at the end of every sequence that every sequence
    /// has: each becomes as long as the longest one's real tokens, as a
    /// collator padding to the batch's longest does. Causal attention kept
    /// every real position from the padding after it, and padding trains
    /// nothing, so the loss and gradients are the same (up to the order of
    /// sums over tokens) for a fraction of the work: a batch of short
    /// conversations is mostly padding. Not for packed sequences, whose
    /// documents are laid out along the whole sequence.
    pub fn trim_padding(&mut self) {
        self.trim_padding_to(1);
    }

    /// [`Self::trim_padding`] to a whole number of `multiple` tokens (at
    /// most the sequences' length): a GPU then sees a few lengths, not
    /// every one, and whole tiles.
    pub fn trim_padding_to(&mut self, multiple: usize) {
        let longest = self.real.iter().copied().max().unwrap_or(0).max(1);
        let longest = longest.next_multiple_of(multiple.max(1)).min(self.seq_len);
        if longest >= self.seq_len || self.documents.is_some() {
            return;
        }
        let keep = |values: &[u32]| -> Vec<u32> {
            values
                .chunks_exact(self.seq_len)
                .flat_map(|sequence| &sequence[..longest])
                .copied()
                .collect()
        };
        self.inputs = keep(&self.inputs);
        self.targets = keep(&self.targets);
        self.seq_len = longest;
    }
}

#[derive(Clone, Debug)]
pub struct DataLoader {
    tokens: Corpus,
    /// The corpus positions this stream draws from ([`Self::new_in`]).
    part: Range<usize>,
    /// A corpus of conversations: those with an assistant token within a
    /// sequence of their start, which each sequence is one of.
    conversations: Option<Arc<[Range<usize>]>>,
    /// The current epoch's order of the conversations (computed from the
    /// seed and the epoch, so a position's sequence count restores it).
    order: Option<(u64, Vec<usize>)>,
    seed: u64,
    seq_len: usize,
    sequences: u64,
    /// Several whole conversations per sequence ([`Self::packed`]).
    packing: bool,
    /// Conversations drawn so far, when packing.
    conversations_drawn: u64,
    rng: SplitMix64,
}

impl DataLoader {
    /// A stream over `tokens` from the start of `seed`'s order. `source`
    /// names the data in the error when it is shorter than one window.
    pub fn new(
        tokens: impl Into<Corpus>,
        seq_len: usize,
        seed: u64,
        source: &str,
    ) -> Result<Self, DataError> {
        let tokens = tokens.into();
        let all = 0..tokens.len();
        Self::new_in(tokens, all, seq_len, seed, source)
    }

    /// [`Self::new`] drawing only from the corpus positions `part`: its
    /// windows (text), or the conversations that start in it. Training
    /// and evaluation read disjoint parts ([`held_out_start`]).
    pub fn new_in(
        tokens: Corpus,
        part: Range<usize>,
        seq_len: usize,
        seed: u64,
        source: &str,
    ) -> Result<Self, DataError> {
        assert!(part.end <= tokens.len(), "a part within the corpus");
        // A conversation of any length makes a sequence (padded), but one
        // cut before its first answer trains nothing: never drawn.
        let conversations = tokens.conversations().map(|all| {
            all.iter()
                .filter(|c| part.contains(&c.start))
                .filter(|c| {
                    let reach = c.start + 1..c.end.min(c.start + seq_len + 1);
                    reach.into_iter().any(|p| tokens.is_trained(p))
                })
                .cloned()
                .collect::<Arc<[_]>>()
        });
        let in_part = tokens
            .conversations()
            .map_or(0, |c| c.iter().filter(|c| part.contains(&c.start)).count());
        if conversations.is_some() && in_part == 0 {
            return Err(DataError::NoConversations {
                source: source.to_owned(),
            });
        }
        if let Some(drawn) = &conversations
            && drawn.is_empty()
        {
            return Err(DataError::NoAnswerInReach {
                source: source.to_owned(),
                needed: seq_len + 1,
                conversations: in_part,
            });
        }
        if conversations.is_none() && part.len() <= seq_len {
            return Err(DataError::TooShort {
                source: source.to_owned(),
                tokens: part.len(),
                needed: seq_len + 1,
            });
        }
        Ok(Self {
            tokens,
            part,
            conversations,
            order: None,
            seed,
            seq_len,
            sequences: 0,
            packing: false,
            conversations_drawn: 0,
            rng: SplitMix64::new(seed ^ DATA_STREAM),
        })
    }

    /// Packs several whole conversations into each sequence
    /// (`data.packing`), when the corpus is made of them: as many as fit,
    /// in the epochs' order, each attending only to itself
    /// ([`Batch::documents`]); a conversation longer than a sequence fills
    /// one alone, cut. Less padding, so more of each step trains.
    pub fn packed(mut self) -> Self {
        self.packing = self.conversations.is_some();
        self
    }

    /// Whether its sequences are one conversation each, padded at the end
    /// when shorter (a corpus of conversations, not packed).
    pub fn pads(&self) -> bool {
        self.conversations.is_some() && !self.packing
    }

    /// The corpus this stream draws from (all of it, not only its part).
    pub fn corpus(&self) -> &Corpus {
        &self.tokens
    }

    /// When packing: one epoch's sequences and their real tokens (the
    /// rest padding), as the stream will draw them from the start.
    pub fn packing_fill(&self) -> Option<(usize, usize)> {
        let n = self
            .conversations
            .as_deref()
            .filter(|_| self.packing)?
            .len();
        let mut epoch = self.clone();
        epoch.restore(DataPosition {
            sequences: 0,
            rng_state: 0,
            conversations: 0,
        });
        let (mut sequences, mut real) = (0, 0);
        while epoch.conversations_drawn < n as u64 {
            real += epoch
                .next_packed()
                .iter()
                .map(|c| c.len() - 1)
                .sum::<usize>();
            sequences += 1;
        }
        Some((sequences, real))
    }

    pub fn position(&self) -> DataPosition {
        DataPosition {
            sequences: self.sequences,
            rng_state: self.rng.state(),
            conversations: self.conversations_drawn,
        }
    }

    /// Continues from a saved position.
    pub fn restore(&mut self, position: DataPosition) {
        self.sequences = position.sequences;
        self.rng = SplitMix64::new(position.rng_state);
        self.conversations_drawn = position.conversations;
    }

    /// The next `sequences` windows.
    pub fn next_batch(&mut self, sequences: usize) -> Batch {
        let n = sequences * self.seq_len;
        let mut batch = Batch {
            seq_len: self.seq_len,
            inputs: Vec::with_capacity(n),
            targets: Vec::with_capacity(n),
            real: Vec::with_capacity(sequences),
            documents: self.packing.then(|| Vec::with_capacity(n)),
        };
        let mut window = Vec::with_capacity(self.seq_len + 1);
        for k in 0..sequences as u64 {
            let mut filled = 0;
            for part in self.next_windows(self.sequences + k) {
                window.clear();
                self.tokens
                    .extend_window(part.start, part.len(), &mut window);
                let inputs = part.len() - 1;
                batch.inputs.extend_from_slice(&window[..inputs]);
                batch
                    .targets
                    .extend(window[1..].iter().enumerate().map(|(i, &t)| {
                        if self.tokens.is_trained(part.start + 1 + i) {
                            t
                        } else {
                            crate::ops::cross_entropy::IGNORED
                        }
                    }));
                if let Some(documents) = &mut batch.documents {
                    documents.extend(std::iter::repeat_n(filled as u32, inputs));
                }
                filled += inputs;
            }
            // A short conversation (or the last of a packed sequence) is
            // padded at the end, where causal attention keeps the padding
            // out of every real position; its targets are left out of the
            // loss. Any id would do as input.
            let padding = self.seq_len - filled;
            batch.real.push(filled);
            batch
                .inputs
                .extend(std::iter::repeat_n(window[window.len() - 1], padding));
            batch.targets.extend(std::iter::repeat_n(
                crate::ops::cross_entropy::IGNORED,
                padding,
            ));
            if let Some(documents) = &mut batch.documents {
                documents.extend(std::iter::repeat_n(filled as u32, padding));
            }
        }
        self.sequences += sequences as u64;
        batch
    }

    /// The corpus windows sequence `index` is made of, each one more
    /// token than it gives inputs (the last one's target): a random window
    /// of text; one conversation from its start (its first turns are the
    /// context of its answers, and nothing of another conversation is in
    /// it), cut to a sequence; or, packed, as many whole conversations as
    /// fit ([`Self::next_packed`]).
    fn next_windows(&mut self, index: u64) -> Vec<Range<usize>> {
        let window = |start: usize, len: usize| start..start + len;
        match self.conversations.clone() {
            None => vec![window(
                self.part.start + self.rng.below(self.part.len() - self.seq_len),
                self.seq_len + 1,
            )],
            Some(_) if self.packing => self.next_packed(),
            Some(conversations) => {
                let c = &conversations[self.conversation(index)];
                vec![window(c.start, c.len().min(self.seq_len + 1))]
            }
        }
    }

    /// The next packed sequence's conversations, in the epochs' order: as
    /// many as fit whole, and at least one (a conversation longer than a
    /// sequence fills one alone, cut).
    fn next_packed(&mut self) -> Vec<Range<usize>> {
        let conversations = self
            .conversations
            .clone()
            .expect("a corpus of conversations");
        let (mut packed, mut filled) = (Vec::new(), 0);
        while filled < self.seq_len {
            let c = conversations[self.conversation(self.conversations_drawn)].clone();
            let inputs = c.len() - 1;
            if !packed.is_empty() && filled + inputs > self.seq_len {
                break;
            }
            let taken = inputs.min(self.seq_len);
            packed.push(c.start..c.start + taken + 1);
            filled += taken;
            self.conversations_drawn += 1;
        }
        packed
    }

    /// Advances past the next `sequences` windows without reading them:
    /// a data-parallel rank skips the windows of the other ranks' shards
    /// (see [`crate::train::Shard`]). Draws exactly what [`Self::next_batch`]
    /// would, so the position afterwards is the same.
    pub fn skip(&mut self, sequences: usize) {
        if self.packing {
            for _ in 0..sequences {
                self.next_packed();
            }
        } else if self.conversations.is_none() {
            // Window starts in 0..len - seq_len of the part, so the last
            // target is in it.
            let starts = self.part.len() - self.seq_len;
            for _ in 0..sequences {
                self.rng.below(starts);
            }
        }
        self.sequences += sequences as u64;
    }
}

/// Where the last `percent` of `corpus` starts (`training.evaluation`'s
/// held-out part): at a conversation's start, the last `percent` of the
/// conversations (at least one), or the last `percent` of the tokens.
pub fn held_out_start(corpus: &Corpus, percent: usize) -> usize {
    match corpus.conversations() {
        Some(all) if !all.is_empty() => {
            let held = (all.len() * percent).div_ceil(100).clamp(1, all.len());
            all[all.len() - held].start
        }
        _ => corpus.len() - (corpus.len() * percent / 100).max(1).min(corpus.len()),
    }
}

impl DataLoader {
    /// Which conversation is sequence `index` of the stream: epoch
    /// `index / n` goes through all `n` once, in its own order (a
    /// Fisher–Yates shuffle seeded by the seed and the epoch), so every
    /// conversation trains as often as every other, as supervised
    /// fine-tuning's epochs do, and a position is its sequence count.
    fn conversation(&mut self, index: u64) -> usize {
        let n = self.conversations.as_deref().map_or(0, <[_]>::len);
        let epoch = index / n as u64;
        let order = match &mut self.order {
            Some((at, order)) if *at == epoch => order,
            slot => {
                let mut rng = SplitMix64::new(
                    self.seed ^ DATA_STREAM ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                let mut order: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    order.swap(i, rng.below(i + 1));
                }
                &mut slot.insert((epoch, order)).1
            }
        };
        order[(index % n as u64) as usize]
    }

    /// In a corpus of conversations, how many a sequence is drawn from:
    /// those with an assistant token within `seq_len + 1` of their start.
    pub fn conversations_in_reach(&self) -> Option<usize> {
        self.conversations.as_deref().map(<[_]>::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_inputs_shifted_and_restore_replays_the_stream() {
        let tokens: Vec<u32> = (0..100).collect();
        let mut loader = DataLoader::new(tokens, 5, 3, "test").unwrap();
        let first = loader.next_batch(2);
        for (input, target) in first.inputs.iter().zip(&first.targets) {
            assert_eq!(input + 1, *target);
        }
        let saved = loader.position();
        assert_eq!(saved.sequences, 2);
        let next = loader.next_batch(4);
        loader.restore(saved);
        assert_eq!(loader.next_batch(4), next);
        assert_ne!(next.inputs[..5], first.inputs[..5]);
    }

    #[test]
    fn skipping_lands_where_reading_does() {
        let tokens: Vec<u32> = (0..100).collect();
        let mut read = DataLoader::new(tokens, 5, 3, "test").unwrap();
        let mut skipped = read.clone();
        read.next_batch(3);
        skipped.skip(3);
        assert_eq!(skipped.position(), read.position());
        assert_eq!(skipped.next_batch(2), read.next_batch(2));
    }

    #[test]
    fn targets_the_corpus_does_not_train_are_ignored() {
        let tokens: Vec<u32> = (0..100).collect();
        // Tokens 10..20 and 50..60 are trained (assistant turns).
        let trained = (0..100).map(|i| (10..20).contains(&i) || (50..60).contains(&i));
        let corpus = Corpus::with_trained(tokens, trained.collect());
        let mut loader = DataLoader::new(corpus, 5, 3, "test").unwrap();
        let batch = loader.next_batch(40);
        let mut seen = (0, 0);
        for (input, target) in batch.inputs.iter().zip(&batch.targets) {
            let next = input + 1;
            if (10..20).contains(&next) || (50..60).contains(&next) {
                assert_eq!(*target, next);
                seen.0 += 1;
            } else {
                assert_eq!(*target, crate::ops::cross_entropy::IGNORED);
                seen.1 += 1;
            }
        }
        assert!(seen.0 > 0 && seen.1 > 0, "{seen:?}");
    }

    /// Packed, a sequence holds whole conversations in the epoch's order,
    /// each its own document from its start, then padding; one longer than
    /// a sequence fills one alone, cut. Each is drawn once per epoch;
    /// skipping and restoring land where reading does.
    #[test]
    fn packed_sequences_hold_whole_conversations_each_its_own_document() {
        use crate::ops::cross_entropy::IGNORED;
        // Conversations of 4, 9, 20, 3 and 6 tokens (ids are positions +
        // 100), every token after the first trained.
        let ranges = [0..4, 4..13, 13..33, 33..36, 36..42];
        let tokens: Vec<u32> = (100..142).collect();
        let trained = (0..42).map(|p| !ranges.iter().any(|c| c.start == p));
        let corpus = Corpus::with_conversations(tokens, trained.collect(), ranges.to_vec());
        let seq_len = 8;
        let mut loader = DataLoader::new(corpus, seq_len, 3, "test")
            .unwrap()
            .packed();
        let mut skipped = loader.clone();
        let batch = loader.next_batch(20);
        let documents = batch.documents.as_ref().expect("packed");
        let mut drawn = Vec::new();
        for s in 0..20 {
            let at = s * seq_len..(s + 1) * seq_len;
            let (inputs, targets) = (&batch.inputs[at.clone()], &batch.targets[at.clone()]);
            let starts = &documents[at];
            let mut t = 0;
            while t < batch.real[s] {
                assert_eq!(
                    starts[t] as usize, t,
                    "sequence {s}: a document starts at {t}"
                );
                let c = ranges
                    .iter()
                    .find(|c| c.start as u32 + 100 == inputs[t])
                    .expect("every document starts a conversation");
                let len = (c.len() - 1).min(seq_len);
                assert!(
                    len == c.len() - 1 || (t == 0 && batch.real[s] == seq_len),
                    "only a conversation alone in its sequence is cut"
                );
                for i in 0..len {
                    assert_eq!(inputs[t + i], (c.start + i) as u32 + 100);
                    assert_eq!(targets[t + i], inputs[t + i] + 1, "within its conversation");
                    assert_eq!(starts[t + i] as usize, t);
                }
                drawn.push(c.start);
                t += len;
            }
            assert_eq!(t, batch.real[s]);
            for i in t..seq_len {
                assert_eq!(targets[i], IGNORED, "padding is never trained");
                assert_eq!(starts[i] as usize, t, "padding is a document of its own");
            }
            if t < seq_len {
                // The next conversation would not have fit whole.
                let next = *ranges
                    .iter()
                    .find(|c| {
                        let following = batch.inputs.get((s + 1) * seq_len).copied();
                        following == Some(c.start as u32 + 100)
                    })
                    .map(|c| c.len() - 1)
                    .get_or_insert(usize::MAX);
                assert!(t + next > seq_len || s == 19, "sequence {s} closed early");
            }
        }
        // Epoch by epoch, every conversation once.
        for epoch in drawn.chunks_exact(5) {
            let mut starts = epoch.to_vec();
            starts.sort_unstable();
            assert_eq!(starts, [0, 4, 13, 33, 36]);
        }
        assert!(
            drawn.len() > 20,
            "{} conversations in 20 sequences",
            drawn.len()
        );
        // Skipping draws what reading does; a position replays the stream.
        skipped.skip(20);
        assert_eq!(skipped.position(), loader.position());
        let saved = loader.position();
        let next = loader.next_batch(3);
        assert_eq!(skipped.next_batch(3), next);
        loader.restore(saved);
        assert_eq!(loader.next_batch(3), next);
        // One epoch: 5 conversations, 3 + 8 + 19 + 2 + 5 inputs, 26 real
        // (the one of 20 cut to 8), in fewer sequences than conversations.
        let (sequences, real) = loader.packing_fill().expect("packed");
        assert!(
            real >= 26 && sequences < 5,
            "{sequences} sequences, {real} real"
        );
    }

    /// The held-out part starts at a conversation's start, the last 10 %
    /// of them (at least one); the two parts draw disjoint conversations.
    #[test]
    fn held_out_conversations_are_the_last_ones_and_never_trained() {
        let ranges: Vec<Range<usize>> = (0..25).map(|c| c * 4..c * 4 + 4).collect();
        let trained = (0..100).map(|p| p % 4 != 0).collect();
        let corpus = Corpus::with_conversations((0..100).collect(), trained, ranges);
        let start = held_out_start(&corpus, 10);
        assert_eq!(start, 88, "3 of 25 conversations (10 %, rounded up)");
        assert_eq!(held_out_start(&corpus, 1), 96, "at least one");
        // A part without conversations is named as such.
        let only = Corpus::with_conversations(
            vec![1, 2, 3],
            vec![false, true, true],
            vec![Range { start: 0, end: 3 }],
        );
        let all_held_out = held_out_start(&only, 5);
        let error = DataLoader::new_in(only.clone(), 0..all_held_out, 8, 3, "chats").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("chats has no conversation to draw from"),
            "{error}"
        );
        let first = |part: Range<usize>| {
            let mut loader = DataLoader::new_in(corpus.clone(), part, 8, 3, "test").unwrap();
            let batch = loader.next_batch(50);
            batch
                .inputs
                .chunks(8)
                .map(|s| s[0])
                .collect::<std::collections::BTreeSet<u32>>()
        };
        let training = first(0..start);
        let held_out = first(start..100);
        assert_eq!(training.len(), 22);
        assert!(training.iter().all(|&t| (t as usize) < start));
        assert_eq!(held_out.into_iter().collect::<Vec<_>>(), [88, 92, 96]);
    }

    #[test]
    fn a_conversation_is_a_sequence_from_its_start_cut_or_padded() {
        use crate::ops::cross_entropy::IGNORED;
        // Conversations of 4, 9 and 20 tokens (ids are positions + 100);
        // the second token of each and everything from the sixth on is
        // trained (the answers).
        let ranges = [0..4, 4..13, 13..33];
        let tokens: Vec<u32> = (100..133).collect();
        let trained = (0..33)
            .map(|p| {
                let c = ranges.iter().find(|c| c.contains(&p)).unwrap();
                p - c.start == 1 || p - c.start >= 5
            })
            .collect();
        let corpus = Corpus::with_conversations(tokens, trained, ranges.to_vec());
        let seq_len = 8;
        let mut loader = DataLoader::new(corpus, seq_len, 3, "test").unwrap();
        let mut skipped = loader.clone();
        let batch = loader.next_batch(30);
        let mut seen = [false; 3];
        assert_eq!(batch.real.len(), 30, "a real-token count per sequence");
        for ((inputs, targets), &said) in batch
            .inputs
            .chunks_exact(seq_len)
            .zip(batch.targets.chunks_exact(seq_len))
            .zip(&batch.real)
        {
            let which = ranges
                .iter()
                .position(|c| c.start as u32 + 100 == inputs[0])
                .expect("every sequence starts a conversation");
            seen[which] = true;
            let c = &ranges[which];
            // Real tokens: the conversation's own, in order, as far as
            // they go (at most seq_len inputs and their targets).
            let real = (c.len() - 1).min(seq_len);
            assert_eq!(said, real, "conversation {which}'s real tokens");
            for i in 0..real {
                assert_eq!(inputs[i], (c.start + i) as u32 + 100);
                let trained = i + 1 == 1 || i + 1 >= 5;
                let want = if trained { inputs[i] + 1 } else { IGNORED };
                assert_eq!(targets[i], want, "conversation {which}, position {i}");
            }
            // Then padding: never a token of the next conversation, never trained.
            for i in real..seq_len {
                assert_eq!(inputs[i], (c.start + real) as u32 + 100);
                assert_eq!(targets[i], IGNORED);
            }
        }
        assert_eq!(seen, [true; 3], "every conversation drawn");
        // Skipping draws what reading does.
        skipped.skip(30);
        assert_eq!(skipped.position(), loader.position());
        assert_eq!(skipped.next_batch(2), loader.next_batch(2));
        // A conversation shorter than a sequence still makes one.
        let short = Corpus::with_conversations(
            vec![1, 2, 3],
            vec![false, true, true],
            std::iter::once(0..3).collect(),
        );
        assert!(DataLoader::new(short, 8, 0, "short").is_ok());
    }

    /// Supervised fine-tuning goes through its conversations in epochs:
    /// each once per epoch, the order shuffled anew every epoch, and the
    /// same from a restored position, or for a rank that skipped there.
    #[test]
    fn conversations_are_drawn_once_per_epoch_in_a_shuffled_order() {
        let n = 7;
        let tokens: Vec<u32> = (0..3 * n as u32).collect();
        let ranges: Vec<_> = (0..n).map(|c| 3 * c..3 * c + 3).collect();
        let trained = (0..3 * n).map(|p| p % 3 == 2).collect();
        let corpus = Corpus::with_conversations(tokens, trained, ranges);
        let mut loader = DataLoader::new(corpus, 4, 9, "chats").unwrap();
        let mut skipped = loader.clone();
        let first_of = |batch: &Batch| -> Vec<u32> {
            batch.inputs.chunks_exact(4).map(|s| s[0] / 3).collect()
        };
        let epochs: Vec<Vec<u32>> = (0..3).map(|_| first_of(&loader.next_batch(n))).collect();
        for order in &epochs {
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, (0..n as u32).collect::<Vec<_>>(), "{epochs:?}");
        }
        assert!(
            epochs[0] != epochs[1] || epochs[1] != epochs[2],
            "{epochs:?}"
        );
        // Mid-epoch: a restored position and a rank that skipped go on alike.
        let mut reader = loader.clone();
        reader.next_batch(3);
        let at = reader.position();
        let next = reader.next_batch(9);
        reader.restore(at);
        assert_eq!(reader.next_batch(9), next);
        skipped.skip(3 * n + 3);
        assert_eq!(skipped.position(), at);
        assert_eq!(skipped.next_batch(9), next);
    }

    #[test]
    fn a_conversation_cut_before_its_answer_is_never_drawn() {
        // Answers at positions 2 and 9..12 (conversation 0..12), and 14
        // (conversation 13..16): the first is in reach of a sequence of 4,
        // so is the second; with an answer only at 9..12 the first is not.
        let tokens: Vec<u32> = (0..16).collect();
        let answers = |at: &[usize]| (0..16).map(|p| at.contains(&p)).collect::<Vec<_>>();
        let ranges = vec![0..12, 13..16];
        let both = Corpus::with_conversations(
            tokens.clone(),
            answers(&[2, 9, 10, 11, 14]),
            ranges.clone(),
        );
        let loader = DataLoader::new(both, 4, 1, "chats").unwrap();
        assert_eq!(loader.conversations_in_reach(), Some(2));
        let late =
            Corpus::with_conversations(tokens.clone(), answers(&[9, 10, 11, 14]), ranges.clone());
        let mut loader = DataLoader::new(late, 4, 1, "chats").unwrap();
        assert_eq!(loader.conversations_in_reach(), Some(1));
        let batch = loader.next_batch(10);
        assert!(batch.inputs.chunks_exact(4).all(|s| s[0] == 13));
        // None in reach: an error that says what to raise.
        let none = Corpus::with_conversations(tokens, answers(&[9, 10, 11]), ranges);
        let error = DataLoader::new(none, 4, 1, "chats")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("model.seqLen") && error.contains("none of the 2 conversations"),
            "{error}"
        );
    }

    #[test]
    fn too_short_corpus_is_an_error() {
        let error = DataLoader::new(vec![1, 2, 3], 3, 0, "corpus x").unwrap_err();
        assert!(
            error.to_string().contains("corpus x has 3 tokens"),
            "{error}"
        );
    }
}
