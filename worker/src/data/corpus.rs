//! The training tokens: in memory (text tokenized at start), or mapped
//! read-only from pre-tokenized files, so that a corpus larger than memory
//! trains, and the ranks on a node share one copy in the page cache.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use crate::data::DataError;
use crate::data::tokenizer::TokenCounts;
use crate::data::tokens::{self, Layout};

/// The tokens of a run, in order, with their counts (taken in the one
/// pass that building it makes). Cheap to clone (shared).
#[derive(Clone)]
pub struct Corpus {
    storage: Arc<Storage>,
    len: usize,
    counts: Arc<TokenCounts>,
    /// Which tokens the model is trained to predict (supervised
    /// fine-tuning: the assistant's turns); `None`: every one.
    trained: Option<Arc<Vec<bool>>>,
    /// Supervised fine-tuning's conversations, each a range of positions:
    /// a training sequence is one of them from its start
    /// ([`crate::data::DataLoader`]); `None`: windows start anywhere.
    conversations: Option<Arc<Vec<Range<usize>>>>,
}

enum Storage {
    Owned(Vec<u32>),
    /// One entry per file with tokens; `ends[i]` is the corpus position
    /// after file `i`.
    Mapped {
        files: Vec<MappedFile>,
        ends: Vec<usize>,
    },
}

struct MappedFile {
    map: memmap2::Mmap,
    layout: Layout,
}

impl MappedFile {
    fn id(&self, i: usize) -> u32 {
        tokens::id(&self.map, self.layout, i)
    }
}

impl fmt::Debug for Corpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match *self.storage {
            Storage::Owned(_) => "in memory",
            Storage::Mapped { .. } => "mapped",
        };
        write!(f, "Corpus({} tokens, {kind})", self.len)
    }
}

impl From<Vec<u32>> for Corpus {
    fn from(tokens: Vec<u32>) -> Self {
        Self::with_counts(Storage::Owned(tokens))
    }
}

impl Corpus {
    /// Maps pre-tokenized `files` in order ([`tokens::layout`] checks each;
    /// `token_bytes` is `data.tokenBytes`).
    pub fn map(files: &[PathBuf], token_bytes: Option<usize>) -> Result<Self, DataError> {
        let mut mapped = Vec::new();
        let mut ends = Vec::new();
        let mut len = 0;
        for path in files {
            let unreadable = |error| DataError::Unreadable {
                path: path.clone(),
                error,
            };
            let file = std::fs::File::open(path).map_err(unreadable)?;
            if file.metadata().map_err(unreadable)?.len() == 0 {
                continue;
            }
            // SAFETY: the map is read-only, and the file must not shrink
            // while it is mapped (reading past its end would fault). Pods
            // mount the data claim read-only; a local run's data is the
            // user's to leave alone for the run, as any input file is.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(unreadable)?;
            let layout =
                tokens::layout(&map, token_bytes).map_err(|error| DataError::TokenFile {
                    path: path.clone(),
                    error,
                })?;
            if layout.count == 0 {
                continue;
            }
            len += layout.count;
            ends.push(len);
            mapped.push(MappedFile { map, layout });
        }
        debug_assert_eq!(ends.last().copied().unwrap_or(0), len);
        Ok(Self::with_counts(Storage::Mapped {
            files: mapped,
            ends,
        }))
    }

    /// Tokens of which only those marked in `trained` are predicted in
    /// training (the others are read as context); one flag per token.
    pub fn with_trained(tokens: Vec<u32>, trained: Vec<bool>) -> Self {
        assert_eq!(tokens.len(), trained.len(), "one flag per token");
        let mut corpus = Self::with_counts(Storage::Owned(tokens));
        corpus.trained = Some(Arc::new(trained));
        corpus
    }

    /// [`Self::with_trained`], made of `conversations` (ranges of
    /// positions, in order, not overlapping): each training sequence is
    /// one of them, never a window across two.
    pub fn with_conversations(
        tokens: Vec<u32>,
        trained: Vec<bool>,
        conversations: Vec<Range<usize>>,
    ) -> Self {
        assert!(
            conversations
                .iter()
                .all(|c| c.start < c.end && c.end <= tokens.len()),
            "conversations within the tokens"
        );
        let mut corpus = Self::with_trained(tokens, trained);
        corpus.conversations = Some(Arc::new(conversations));
        corpus
    }

    /// The conversations a training sequence is drawn from, if the corpus
    /// is made of them.
    pub fn conversations(&self) -> Option<&[Range<usize>]> {
        self.conversations.as_deref().map(Vec::as_slice)
    }

    /// Whether the token at `position` is one the model is trained to predict.
    pub fn is_trained(&self, position: usize) -> bool {
        self.trained.as_ref().is_none_or(|t| t[position])
    }

    fn with_counts(storage: Storage) -> Self {
        let mut corpus = Self {
            storage: Arc::new(storage),
            len: 0,
            counts: Arc::default(),
            trained: None,
            conversations: None,
        };
        let counts = TokenCounts::of(corpus.iter());
        corpus.len = counts.total();
        corpus.counts = Arc::new(counts);
        corpus
    }

    /// How often each id occurs.
    pub fn counts(&self) -> &TokenCounts {
        &self.counts
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends tokens `start..start + count` to `out`, across files.
    pub fn extend_window(&self, start: usize, count: usize, out: &mut Vec<u32>) {
        assert!(start + count <= self.len, "window past the corpus");
        match &*self.storage {
            Storage::Owned(tokens) => out.extend_from_slice(&tokens[start..start + count]),
            Storage::Mapped { files, ends } => {
                let (mut at, end) = (start, start + count);
                // The first file that ends after `start`.
                let mut file = ends.partition_point(|&e| e <= at);
                while at < end {
                    let first = if file == 0 { 0 } else { ends[file - 1] };
                    let stop = ends[file].min(end);
                    out.extend((at..stop).map(|p| files[file].id(p - first)));
                    at = stop;
                    file += 1;
                }
            }
        }
    }

    /// Every token, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let (owned, mapped) = match &*self.storage {
            Storage::Owned(tokens) => (Some(tokens.iter().copied()), None),
            Storage::Mapped { files, .. } => (
                None,
                Some(
                    files
                        .iter()
                        .flat_map(|f| (0..f.layout.count).map(|i| f.id(i))),
                ),
            ),
        };
        owned
            .into_iter()
            .flatten()
            .chain(mapped.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shards of `ids` (uint16, the first with llm.c's header, the others
    /// headerless) of the given sizes, with an empty file among them.
    fn shards(dir: &std::path::Path, ids: &[u16], sizes: &[usize]) -> Vec<PathBuf> {
        std::fs::create_dir_all(dir).unwrap();
        let mut files = Vec::new();
        let mut rest = ids;
        for (i, &size) in sizes.iter().enumerate() {
            let (shard, tail) = rest.split_at(size);
            rest = tail;
            let mut bytes = Vec::new();
            if i == 0 {
                let mut header = [0i32; 256];
                header[..3].copy_from_slice(&[20240520, 1, size as i32]);
                bytes.extend(header.iter().flat_map(|h| h.to_le_bytes()));
            }
            bytes.extend(shard.iter().flat_map(|t| t.to_le_bytes()));
            let path = dir.join(format!("shard-{i}.bin"));
            std::fs::write(&path, bytes).unwrap();
            files.push(path);
        }
        assert!(rest.is_empty());
        files
    }

    #[test]
    fn mapped_shards_read_as_the_tokens_in_memory() {
        let dir = std::env::temp_dir().join(format!("moe-corpus-{}", std::process::id()));
        let ids: Vec<u16> = (0..100u16).map(|i| i * 7 + 300).collect();
        let files = shards(&dir, &ids, &[13, 0, 1, 40, 46]);
        let mapped = Corpus::map(&files, None).unwrap();
        let owned = Corpus::from(ids.iter().map(|&t| u32::from(t)).collect::<Vec<_>>());
        assert_eq!(mapped.len(), 100);
        assert!(mapped.iter().eq(owned.iter()));
        // Every window, including those across files (13|14|54) and the one
        // that starts exactly on a boundary.
        for start in 0..90 {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            mapped.extend_window(start, 11, &mut a);
            owned.extend_window(start, 11, &mut b);
            assert_eq!(a, b, "window at {start}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
