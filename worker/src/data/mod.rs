//! Training data: the corpus (built in or from a volume; text through the
//! byte-level tokenizer or a Hugging Face one, or token ids tokenized
//! beforehand), and a seeded, resumable stream of training windows.

pub mod corpus;
pub mod loader;
pub mod tiny;
pub mod tokenizer;
pub mod tokens;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::settings::DataSource;

pub use corpus::Corpus;
pub use loader::{Batch, DataLoader, DataPosition, held_out_start};

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
    /// A part of the corpus with no conversation in it: training's, when
    /// `training.evaluation` holds out the only one.
    NoConversations {
        source: String,
    },
    /// No conversation has an assistant token within a sequence of its
    /// start (`seq_len + 1` tokens): cut there, none trains anything.
    NoAnswerInReach {
        source: String,
        needed: usize,
        conversations: usize,
    },
    /// A pre-tokenized file that is not token ids as expected.
    TokenFile {
        path: PathBuf,
        error: tokens::TokenFileError,
    },
    /// A file a text tokenizer was to read is not UTF-8.
    NotText(PathBuf),
    /// The Hugging Face tokenizer could not be read, or not applied.
    Tokenizer {
        path: PathBuf,
        problem: String,
    },
    /// A line of `data.format: chat` that is not a conversation.
    Conversation {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    /// A token id the model has no embedding row for.
    OutOfVocabulary {
        source: String,
        position: usize,
        token: u32,
        vocab: usize,
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
            Self::NoConversations { source } => write!(
                f,
                "{source} has no conversation to draw from (training.evaluation.heldOutPercent holds out at least one: give the data more conversations, or evaluate on training.evaluation.path)"
            ),
            Self::NoAnswerInReach {
                source,
                needed,
                conversations,
            } => write!(
                f,
                "model.seqLen: none of the {conversations} conversations of {source} has an assistant token within its first seqLen + 1 = {needed} tokens, and each sequence is one conversation cut there: nothing would be trained; raise model.seqLen"
            ),
            Self::TokenFile { path, error } => {
                write!(f, "data.volume: {} {error}", path.display())
            }
            Self::NotText(path) => write!(
                f,
                "data.volume: {} is not UTF-8 text (token ids want data.tokenizer: pretokenized)",
                path.display()
            ),
            Self::Tokenizer { path, problem } => {
                write!(f, "data.tokenizerFile: {}: {problem}", path.display())
            }
            Self::Conversation {
                path,
                line,
                problem,
            } => write!(f, "data.format chat: {}:{line}: {problem}", path.display()),
            Self::OutOfVocabulary {
                source,
                position,
                token,
                vocab,
            } => write!(
                f,
                "{source}: token {position} is id {token}, but model.vocabSize is {vocab} (ids 0..{vocab}): \
                 raise model.vocabSize to the tokenizer's vocabulary"
            ),
        }
    }
}

impl std::error::Error for DataError {}

/// The training tokens of the configured source, each checked to be below
/// `vocab`: text through its tokenizer, or token ids as stored (mapped, not
/// read: [`Corpus::map`]).
pub fn load_tokens(source: &DataSource, vocab: usize) -> Result<Corpus, DataError> {
    let tokens: Corpus = match source {
        DataSource::Builtin(name) if name == "tiny" => tokenizer::encode(&tiny::corpus()).into(),
        DataSource::Builtin(name) => return Err(DataError::UnknownCorpus(name.clone())),
        DataSource::Volume(path) => {
            let mut bytes = Vec::new();
            for file in volume_files(path)? {
                bytes.extend(read(&file)?);
            }
            tokenizer::encode(&bytes).into()
        }
        DataSource::Tokens {
            path,
            token_bytes,
            tokenizer_file,
        } => Corpus::map(&data_files(path, tokenizer_file.as_deref())?, *token_bytes)?,
        DataSource::HuggingFace {
            path,
            tokenizer_file,
            chat: true,
        } => conversations(path, tokenizer_file)?,
        DataSource::HuggingFace {
            path,
            tokenizer_file,
            chat: false,
        } => {
            let problem = |problem: String| DataError::Tokenizer {
                path: tokenizer_file.clone(),
                problem,
            };
            let hf = tokenizers::Tokenizer::from_file(tokenizer_file)
                .map_err(|e| problem(format!("not a tokenizer.json: {e}")))?;
            // Each file a document, with the special tokens (a BOS) the
            // tokenizer adds to it as the server adds them to a prompt;
            // files side by side with `--threads`, joined in path order.
            let files = data_files(path, Some(tokenizer_file))?;
            let documents = crate::ops::pool_map(files, |_, file| {
                let text = String::from_utf8(read(&file)?)
                    .map_err(|_| DataError::NotText(file.clone()))?;
                let encoding = hf
                    .encode(text, true)
                    .map_err(|e| problem(format!("tokenizing {}: {e}", file.display())))?;
                Ok(encoding.get_ids().to_vec())
            });
            let mut ids = Vec::new();
            for document in documents {
                ids.extend(document?);
            }
            ids.into()
        }
    };
    // The counts the corpus took say whether any id is out of range; only
    // then is it read again, for the first such id's position.
    let out_of_range = tokens
        .counts()
        .max_id()
        .is_some_and(|id| id as usize >= vocab);
    if let Some((position, token)) = out_of_range
        .then(|| {
            tokens
                .iter()
                .enumerate()
                .find(|&(_, t)| t as usize >= vocab)
        })
        .flatten()
    {
        return Err(DataError::OutOfVocabulary {
            source: describe(source),
            position,
            token,
            vocab,
        });
    }
    Ok(tokens)
}

/// The source as logs and errors name it.
pub fn describe(source: &DataSource) -> String {
    match source {
        DataSource::Builtin(name) => format!("built-in corpus {name:?}"),
        DataSource::Volume(path) => format!("data.volume {}", path.display()),
        DataSource::Tokens { path, .. } => {
            format!("data.volume {} (pre-tokenized)", path.display())
        }
        DataSource::HuggingFace {
            path,
            tokenizer_file,
            chat,
        } => format!(
            "data.volume {} ({}tokenized by {})",
            path.display(),
            if *chat { "conversations " } else { "" },
            tokenizer_file.display()
        ),
    }
}

/// `data.format: chat`: every line of the files under `path` a conversation
/// (`{"messages": [{"role": …, "content": …}, …]}`), rendered through the
/// chat template beside `tokenizer_file` and joined in path order, only
/// the assistant's turns trained ([`crate::serve::hf::HfTokenizer::encode_conversation`]).
/// Each conversation with an assistant turn is one training sequence
/// ([`Corpus::conversations`]); one without has nothing to train and is
/// never drawn.
fn conversations(path: &Path, tokenizer_file: &Path) -> Result<Corpus, DataError> {
    #[derive(serde::Deserialize)]
    struct Line {
        messages: Vec<Message>,
    }
    #[derive(serde::Deserialize)]
    struct Message {
        role: String,
        content: String,
    }
    let problem = |problem: String| DataError::Tokenizer {
        path: tokenizer_file.to_path_buf(),
        problem,
    };
    // The template is read beside the tokenizer, under the names
    // `save_pretrained` gives them.
    if tokenizer_file.file_name() != Some(std::ffi::OsStr::new("tokenizer.json")) {
        return Err(problem(
            "data.format chat reads the chat template beside the tokenizer, which must then \
             be named tokenizer.json"
                .into(),
        ));
    }
    let dir = tokenizer_file.parent().unwrap_or(Path::new("."));
    let tokenizer =
        crate::serve::hf::HfTokenizer::read(dir, &[]).map_err(|e| problem(e.to_string()))?;
    let files = data_files(path, Some(tokenizer_file))?;
    let encoded = crate::ops::pool_map(files, |_, file| {
        let text = String::from_utf8(read(&file)?).map_err(|_| DataError::NotText(file.clone()))?;
        // Ids, trained flags, and each drawable conversation's range.
        let mut out = (Vec::new(), Vec::new(), Vec::new());
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |problem: String| DataError::Conversation {
                path: file.clone(),
                line: index + 1,
                problem,
            };
            let line: Line = serde_json::from_str(line).map_err(|e| {
                bad(format!(
                    "not {{\"messages\": [{{\"role\", \"content\"}}, ...]}}: {e}"
                ))
            })?;
            let messages: Vec<(String, String)> = line
                .messages
                .into_iter()
                .map(|m| (m.role, m.content))
                .collect();
            let (ids, trained) = tokenizer.encode_conversation(&messages).map_err(bad)?;
            if trained.contains(&true) {
                out.2.push(out.0.len()..out.0.len() + ids.len());
            }
            out.0.extend(ids);
            out.1.extend(trained);
        }
        Ok(out)
    });
    let (mut ids, mut trained, mut conversations) = (Vec::new(), Vec::new(), Vec::new());
    for file in encoded {
        let (file_ids, file_trained, file_conversations) = file?;
        let offset = ids.len();
        conversations.extend(
            file_conversations
                .into_iter()
                .map(|c: std::ops::Range<usize>| c.start + offset..c.end + offset),
        );
        ids.extend(file_ids);
        trained.extend(file_trained);
    }
    if conversations.is_empty() {
        return Err(DataError::Conversation {
            path: path.to_path_buf(),
            line: 0,
            problem: "no assistant turn to train on".into(),
        });
    }
    Ok(Corpus::with_conversations(ids, trained, conversations))
}

fn read(file: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(file).map_err(|error| DataError::Unreadable {
        path: file.to_path_buf(),
        error,
    })
}

/// Files of a Hugging Face tokenizer that sit beside its `tokenizer.json`:
/// its special tokens (the EOS a server stops at) and its chat template.
const TOKENIZER_COMPANIONS: [&str; 2] = ["tokenizer_config.json", "chat_template.jinja"];

/// A tokenizer's files: `tokenizer` itself (no name: it is kept as
/// `tokenizer.json` whatever it is called), then those of its companions
/// beside it that exist, with their names. Each checkpoint keeps them all.
pub fn tokenizer_files(tokenizer: &Path) -> Vec<(PathBuf, Option<&'static str>)> {
    let beside = tokenizer.parent().unwrap_or(Path::new("."));
    let companions = TOKENIZER_COMPANIONS
        .into_iter()
        .map(|name| (beside.join(name), Some(name)))
        .filter(|(file, _)| file.is_file());
    std::iter::once((tokenizer.to_path_buf(), None))
        .chain(companions)
        .collect()
}

/// [`volume_files`] without the tokenizer's files ([`tokenizer_files`]),
/// which may lie among the data.
fn data_files(path: &Path, tokenizer_file: Option<&Path>) -> Result<Vec<PathBuf>, DataError> {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let skip: Vec<PathBuf> = tokenizer_file
        .map(tokenizer_files)
        .unwrap_or_default()
        .iter()
        .map(|(file, _)| canonical(file))
        .collect();
    let mut files = volume_files(path)?;
    files.retain(|file| !skip.contains(&canonical(file)));
    Ok(files)
}

/// The file itself, or every file under a directory (recursively, in path
/// order, so the corpus does not depend on the file system's listing order).
fn volume_files(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let unreadable = |path: &Path| {
        let path = path.to_path_buf();
        move |error| DataError::Unreadable { path, error }
    };
    let metadata = std::fs::metadata(path).map_err(unreadable(path))?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_path_buf()]);
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
    Ok(files)
}
