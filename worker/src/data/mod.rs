//! Training data: the corpus (built in or from a volume), the byte-level
//! tokenizer, and a seeded, resumable stream of training windows.

pub mod loader;
pub mod tiny;
pub mod tokenizer;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::settings::DataSource;

pub use loader::{Batch, DataLoader, DataPosition};

/// Why the training text could not be loaded.
#[derive(Debug)]
pub enum DataError {
    UnknownCorpus(String),
    Unreadable {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Fewer tokens than one training window (`seq_len + 1`).
    TooShort {
        source: String,
        tokens: usize,
        needed: usize,
    },
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownCorpus(name) => write!(
                f,
                "data.builtin.corpus: unknown built-in corpus {name:?} (available: \"tiny\")"
            ),
            Self::Unreadable { path, error } => {
                write!(f, "data.volume: cannot read {}: {error}", path.display())
            }
            Self::TooShort {
                source,
                tokens,
                needed,
            } => write!(
                f,
                "{source} has {tokens} tokens, fewer than one training window of seqLen + 1 = {needed}"
            ),
        }
    }
}

impl std::error::Error for DataError {}

/// The raw bytes of the configured source.
pub fn load_corpus(source: &DataSource) -> Result<Vec<u8>, DataError> {
    match source {
        DataSource::Builtin(name) if name == "tiny" => Ok(tiny::corpus()),
        DataSource::Builtin(name) => Err(DataError::UnknownCorpus(name.clone())),
        DataSource::Volume(path) => read_volume(path),
    }
}

/// A file's bytes, or the bytes of every file under a directory
/// (recursively, in path order so the corpus does not depend on the
/// file system's listing order).
fn read_volume(path: &Path) -> Result<Vec<u8>, DataError> {
    let unreadable = |path: &Path| {
        let path = path.to_path_buf();
        move |error| DataError::Unreadable { path, error }
    };
    let metadata = std::fs::metadata(path).map_err(unreadable(path))?;
    if !metadata.is_dir() {
        return std::fs::read(path).map_err(unreadable(path));
    }
    let mut files = Vec::new();
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(unreadable(&dir))? {
            let entry = entry.map_err(unreadable(&dir))?;
            let entry_path = entry.path();
            if entry_path.is_dir() {
                pending.push(entry_path);
            } else {
                files.push(entry_path);
            }
        }
    }
    files.sort();
    let mut bytes = Vec::new();
    for file in files {
        bytes.extend(std::fs::read(&file).map_err(unreadable(&file))?);
    }
    Ok(bytes)
}
