//! `moe-worker fetch`: a model from the Hugging Face Hub into a directory,
//! as a serving pod's init container runs it before the server starts
//! (`spec.model.huggingface`, docs/inference-services.md); a LoRA adapter
//! (`spec.adapters[].huggingface`: `adapter_config.json` and
//! `adapter_model.safetensors` alone) or a training job's dataset
//! (`data.huggingface`: the files it names) the same way.
//!
//! ```text
//!  GET {endpoint}/api/models/{repo}/revision/{revision}        → the commit the revision names
//!  GET {endpoint}/api/models/{repo}/tree/{commit}?recursive=1  → its files: sizes, LFS sha256
//!  GET {endpoint}/{repo}/resolve/{commit}/{file}               → each file serving reads, resumed
//!  {into}/{repo}/{commit}/…   then   {into}/{repo}/{revision} → {commit}  (a symlink, swapped atomically)
//! ```
//!
//! - **One commit.** A branch is resolved once; every file comes from that
//!   commit, into a directory of its own, and the revision's name (the path
//!   the server reads) is switched to it only once it is complete: a push
//!   during a download cannot mix two versions, and a server that already
//!   loaded keeps what it loaded.
//! - **Only what serving reads**: top-level `*.json` (config, tokenizer,
//!   safetensors index), `*.safetensors`, `*.jinja` (chat templates), `*.txt`
//!   and `tokenizer.model`. Never pickles (`*.bin`, `*.pt`: code, not data)
//!   and never subdirectories (`original/`, `onnx/`: other formats). Of the
//!   safetensors, the weights transformers would load ([`select`]): the
//!   shards the index names (it is fetched first), else `model.safetensors`;
//!   not a second copy in another layout (Mistral's
//!   `consolidated.safetensors`) or an adapter.
//! - **Checked, never half-written.** Each file is written to
//!   `<name>.partial`, resumed from its length after an interruption (an HTTP
//!   range request), checked against the Hub's size and hash (sha256 for
//!   LFS files, the git blob sha1 for the others), then renamed into place.
//!   A wrong file is deleted and the fetch fails, naming it. A complete
//!   commit directory holds `.moe-fetch.json`; a restarted pod, or another
//!   replica on a shared claim, finds it and downloads nothing. Pods on a
//!   shared claim take a file lock per file, so two never write one file.
//! - **Unchanged files are not downloaded again.** A complete commit
//!   records each file's content id (sha256 or git blob sha1); a later
//!   commit hard-links the files whose id it shares (a push that edits the
//!   README or one config re-downloads just that), falling back to a
//!   download where it cannot link.
//! - **The token** (`HF_TOKEN`, from the service's Secret) is sent to the
//!   Hub only (not to the storage its downloads redirect to), marked
//!   sensitive, and never logged.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Where models come from unless `--endpoint` or `HF_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// What a complete commit directory holds.
pub const COMPLETE: &str = ".moe-fetch.json";
/// Tries per file (a failed try resumes where the last stopped).
const TRIES: u32 = 4;

/// What to fetch, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit.
    pub revision: String,
    /// The directory models go under: `{into}/{repo}/{revision}`
    /// (datasets: `{into}/datasets/{repo}/{revision}`).
    pub into: PathBuf,
    pub endpoint: String,
    /// Files downloaded at once.
    pub parallel: usize,
    pub kind: RepoKind,
    /// For a dataset: the files to take, each a file of the repo or a
    /// directory whose files (at any depth) are taken. A model takes what
    /// serving reads instead ([`wanted`], [`select`]).
    pub include: Vec<String>,
}

/// What kind of Hub repository a fetch reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RepoKind {
    /// A model, for serving.
    #[default]
    Model,
    /// A dataset, for training (`data.huggingface`).
    Dataset,
    /// A PEFT LoRA adapter (a model repo), served beside a model
    /// (`adapters[].huggingface`).
    Adapter,
}

impl RepoKind {
    /// The Hub API's collection (`/api/{this}/…`).
    fn api(self) -> &'static str {
        match self {
            Self::Model | Self::Adapter => "models",
            Self::Dataset => "datasets",
        }
    }

    /// What precedes the repo in file URLs and local directories.
    fn prefix(self) -> &'static str {
        match self {
            Self::Model | Self::Adapter => "",
            Self::Dataset => "datasets/",
        }
    }

    /// The field of the resource that names the repo, for messages.
    fn field(self) -> &'static str {
        match self {
            Self::Model => "model.huggingface",
            Self::Dataset => "data.huggingface",
            Self::Adapter => "adapters[].huggingface",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Dataset => "dataset",
            Self::Adapter => "adapter",
        }
    }
}

impl FetchRequest {
    /// `{into}/{repo}` (a dataset's under `{into}/datasets/`): its commit
    /// directories and revision links.
    pub fn repo_dir(&self) -> PathBuf {
        self.into
            .join(format!("{}{}", self.kind.prefix(), self.repo))
    }
}

/// What a fetch did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The directory the server reads: `{into}/{repo}/{revision}`.
    pub dir: PathBuf,
    /// The commit it holds.
    pub commit: String,
    pub files: usize,
    /// Bytes the files hold, and those downloaded now (0: it was complete).
    pub bytes: u64,
    pub downloaded: u64,
}

/// Why a fetch failed.
#[derive(Debug)]
pub enum FetchError {
    /// The request itself is wrong (a repo that is no `org/name`, …).
    Invalid(String),
    /// The Hub refused or does not have it, in its words.
    Hub(String),
    /// A file arrived but is not the Hub's (size or hash).
    Corrupt(String),
    Io {
        what: String,
        error: io::Error,
    },
    Http(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(m) | Self::Hub(m) | Self::Corrupt(m) | Self::Http(m) => f.write_str(m),
            Self::Io { what, error } => write!(f, "{what}: {error}"),
        }
    }
}

impl std::error::Error for FetchError {}

impl FetchError {
    /// The worker's exit code: 2 for what a retry cannot fix (the spec,
    /// the Hub's refusal), 1 for the rest (the network, the disk).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Invalid(_) | Self::Hub(_) => 2,
            Self::Corrupt(_) | Self::Io { .. } | Self::Http(_) => 1,
        }
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> FetchError {
    let what = what.into();
    move |error| FetchError::Io { what, error }
}

/// One file of a commit, as the Hub's tree lists it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct TreeEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    #[serde(default)]
    pub size: u64,
    /// The git blob id (sha1 of `blob <size>\0<content>`).
    #[serde(default)]
    pub oid: String,
    #[serde(default)]
    pub lfs: Option<Lfs>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Lfs {
    /// The content's sha256.
    pub oid: String,
    pub size: u64,
}

impl TreeEntry {
    /// The content's size (an LFS file's tree size is its pointer's on
    /// some Hub versions; the LFS size is the content's).
    pub fn content_size(&self) -> u64 {
        self.lfs.as_ref().map_or(self.size, |l| l.size)
    }

    /// What names the content whatever its path or commit: its sha256
    /// (LFS files) or its git blob sha1.
    pub fn content_id(&self) -> String {
        match &self.lfs {
            Some(lfs) => format!("sha256:{}", lfs.oid.to_ascii_lowercase()),
            None => format!("sha1:{}", self.oid.to_ascii_lowercase()),
        }
    }
}

/// Whether serving reads `path` (see the module comment).
pub fn wanted(path: &str) -> bool {
    if path.contains('/') {
        return false;
    }
    path == "tokenizer.model"
        || [".json", ".safetensors", ".jinja", ".txt"]
            .iter()
            .any(|ext| path.ends_with(ext))
}

/// The safetensors index transformers loads a sharded model by.
pub const INDEX: &str = "model.safetensors.index.json";

/// Which of `files` to download, the index's shards known (`shards`, from
/// [`INDEX`]'s `weight_map`): of the safetensors, only the model's weights —
/// those the index names, else `model.safetensors`, else (weights named
/// otherwise) all of them — never a second copy in another layout
/// (Mistral's `consolidated.safetensors`) or an adapter. Everything else
/// [`wanted`] passes is kept. Fails naming a shard the index lists that
/// the commit lacks.
pub fn select(files: Vec<TreeEntry>, shards: Option<&[String]>) -> Result<Vec<TreeEntry>, String> {
    let is_weights = |p: &str| p.ends_with(".safetensors");
    let keep: Box<dyn Fn(&str) -> bool> = match shards {
        Some(shards) => {
            if let Some(missing) = shards.iter().find(|s| !files.iter().any(|f| &f.path == *s)) {
                return Err(format!(
                    "{INDEX} names {missing}, which the commit does not have"
                ));
            }
            Box::new(move |p: &str| shards.iter().any(|s| s == p))
        }
        None if files.iter().any(|f| f.path == "model.safetensors") => {
            Box::new(|p: &str| p == "model.safetensors")
        }
        None => Box::new(|_: &str| true),
    };
    Ok(files
        .into_iter()
        .filter(|f| !is_weights(&f.path) || keep(&f.path))
        .collect())
}

/// The shard files [`INDEX`] names (its `weight_map`'s values), once each.
pub fn index_shards(index: &[u8]) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index: Index =
        serde_json::from_slice(index).map_err(|e| format!("{INDEX} is not an index: {e}"))?;
    let mut shards: Vec<String> = index.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    if let Some(bad) = shards.iter().find(|s| s.contains('/') || !wanted(s)) {
        return Err(format!(
            "{INDEX} names {bad:?}, which is no top-level safetensors file"
        ));
    }
    Ok(shards)
}

/// Checks `repo` and `revision` can only name what they should: no path
/// tricks, since both become directories.
pub fn check(request: &FetchRequest) -> Result<(), FetchError> {
    let part = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let mut parts = request.repo.split('/');
    let valid_repo = matches!((parts.next(), parts.next(), parts.next()), (Some(o), Some(n), None) if part(o) && part(n));
    if !valid_repo {
        return Err(FetchError::Invalid(format!(
            "{}.repo {:?} is not `organization/name` (letters, digits, '-', '_', '.')",
            request.kind.field(),
            request.repo
        )));
    }
    if !part(&request.revision) {
        return Err(FetchError::Invalid(format!(
            "{}.revision {:?} is not a branch, tag or commit name this fetch \
             accepts (letters, digits, '-', '_', '.')",
            request.kind.field(),
            request.revision
        )));
    }
    if request.parallel == 0 {
        return Err(FetchError::Invalid("--parallel must be at least 1".into()));
    }
    match request.kind {
        RepoKind::Model | RepoKind::Adapter if !request.include.is_empty() => {
            Err(FetchError::Invalid(
                "--include chooses a dataset's files; a model's or an adapter's are what \
                 serving reads"
                    .into(),
            ))
        }
        RepoKind::Dataset if request.include.is_empty() => Err(FetchError::Invalid(
            "a dataset fetch needs --include: the files or directories of the repo to take \
             (data.huggingface.path)"
                .into(),
        )),
        _ => match request
            .include
            .iter()
            .find(|p| !safe_relative(p.trim_end_matches('/')))
        {
            Some(bad) => Err(FetchError::Invalid(format!(
                "{bad:?} is not a path inside the repo (no '..', no leading '/')"
            ))),
            None => Ok(()),
        },
    }
}

/// A relative path that stays where it is joined: no empty, `.` or `..`
/// parts, no leading `/`, no backslash. What the Hub lists is held to it
/// too, since its paths become files here.
pub fn safe_relative(path: &str) -> bool {
    !path.contains('\\')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Whether `path` is one of `include`, or lies under one of them.
pub fn included(path: &str, include: &[String]) -> bool {
    include.iter().any(|i| {
        let i = i.trim_end_matches('/');
        path == i
            || path
                .strip_prefix(i)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// `hf://organization/name` or `hf://organization/name@revision` (`moe-worker
/// serve --model`): the repo and revision (default `main`).
pub fn parse_uri(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("hf://")?;
    let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
    Some((repo.trim_end_matches('/').to_string(), revision.to_string()))
}

/// Where `moe-worker serve --model hf://…` keeps models: `$MOE_HF_CACHE`,
/// else `$XDG_CACHE_HOME/moe-worker/huggingface`, else
/// `$HOME/.cache/moe-worker/huggingface`.
pub fn cache_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("MOE_HF_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("moe-worker/huggingface")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/moe-worker/huggingface")))
        .unwrap_or_else(|| std::env::temp_dir().join("moe-worker/huggingface"))
}

/// The Hub's address: `$HF_ENDPOINT`, else [`DEFAULT_ENDPOINT`].
pub fn endpoint_from_env() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
}

/// The Hub's client: the token on requests to the Hub only.
struct Hub {
    client: reqwest::blocking::Client,
    endpoint: String,
    token: Option<reqwest::header::HeaderValue>,
    /// What it fetches, for the hints in its errors.
    kind: RepoKind,
}

impl Hub {
    fn new(endpoint: &str, token: Option<&str>, kind: RepoKind) -> Result<Self, FetchError> {
        // The ring provider kube already links, for every TLS connection.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::blocking::Client::builder()
            .user_agent(concat!("moe-worker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // The blocking client bounds each read (and connect, and write)
            // by this, not a whole body: a 5 GB shard takes minutes.
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| FetchError::Http(format!("cannot start an HTTP client: {e}")))?;
        let token = match token.filter(|t| !t.trim().is_empty()) {
            Some(t) => {
                let mut value =
                    reqwest::header::HeaderValue::from_str(&format!("Bearer {}", t.trim()))
                        .map_err(|_| {
                            FetchError::Invalid(
                                "HF_TOKEN holds characters no HTTP header may carry".into(),
                            )
                        })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Self {
            client,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            kind,
            token,
        })
    }

    fn get(&self, url: &str) -> reqwest::blocking::RequestBuilder {
        let request = self.client.get(url);
        match &self.token {
            // reqwest drops it on a redirect to another host (the CDN).
            Some(token) => request.header(reqwest::header::AUTHORIZATION, token.clone()),
            None => request,
        }
    }

    /// The response, or the Hub's refusal in words a user can act on.
    fn send(
        &self,
        request: reqwest::blocking::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::blocking::Response, FetchError> {
        let response = request
            .send()
            .map_err(|e| FetchError::Http(format!("{what}: {}", without_url(e))))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let (field, noun) = (self.kind.field(), self.kind.noun());
        let hint = match status.as_u16() {
            401 | 403 if self.token.is_none() => format!(
                " (gated or private: put a token with access in a Secret and name it in \
                 {field}.tokenSecret)"
            ),
            401 | 403 => format!(
                " (the token has no access: accept the {noun}'s terms on the Hub, or use another \
                 token)"
            ),
            404 => format!(
                " (no such {noun} or revision, or it is private and the token cannot see it)"
            ),
            429 => " (rate limited: a token raises the limit)".into(),
            _ => String::new(),
        };
        let error = format!("{what}: the Hub answered {status}{hint}");
        Err(if status.is_server_error() || status.as_u16() == 429 {
            FetchError::Http(error)
        } else {
            FetchError::Hub(error)
        })
    }

    /// The commit `revision` names.
    fn commit(&self, kind: RepoKind, repo: &str, revision: &str) -> Result<String, FetchError> {
        #[derive(Deserialize)]
        struct Info {
            sha: String,
        }
        let url = format!(
            "{}/api/{}/{repo}/revision/{revision}",
            self.endpoint,
            kind.api()
        );
        let what = format!("resolving {repo} at {revision} on {}", self.endpoint);
        let info: Info = self
            .send(self.get(&url), &what)?
            .json()
            .map_err(|e| FetchError::Http(format!("{what}: {}", without_url(e))))?;
        if info.sha.len() < 7 || !info.sha.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(FetchError::Hub(format!(
                "{what}: the Hub named commit {:?}",
                info.sha
            )));
        }
        Ok(info.sha)
    }

    /// Every file of `commit` (the tree is paged: a `Link: <…>; rel="next"`).
    fn tree(&self, kind: RepoKind, repo: &str, commit: &str) -> Result<Vec<TreeEntry>, FetchError> {
        let mut url = format!(
            "{}/api/{}/{repo}/tree/{commit}?recursive=true",
            self.endpoint,
            kind.api()
        );
        let what = format!("listing {repo} at {commit}");
        let mut entries = Vec::new();
        loop {
            let response = self.send(self.get(&url), &what)?;
            let next = response
                .headers()
                .get_all(reqwest::header::LINK)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(next_link);
            let page: Vec<TreeEntry> = response
                .json()
                .map_err(|e| FetchError::Http(format!("{what}: {}", without_url(e))))?;
            entries.extend(page);
            match next {
                Some(next) => url = next,
                None => return Ok(entries),
            }
        }
    }
}

/// The `rel="next"` target of a `Link` header.
pub fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|link| {
        let (target, params) = link.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"")
            .then(|| {
                target
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

/// An error's text, its causes included, without its URL (a redirect's
/// may carry a signed query).
fn without_url(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The record a complete commit directory holds.
#[derive(Debug, serde::Serialize, Deserialize, PartialEq, Eq)]
struct Complete {
    repo: String,
    commit: String,
    files: Vec<String>,
    bytes: u64,
    /// Each file's [`TreeEntry::content_id`], checked when it was fetched:
    /// what a later commit may link instead of downloading again.
    #[serde(default)]
    ids: BTreeMap<String, String>,
}

/// Fetches `request` (see the module comment); `token` from `HF_TOKEN`.
pub fn fetch(request: &FetchRequest, token: Option<&str>) -> Result<Fetched, FetchError> {
    check(request)?;
    let hub = Hub::new(&request.endpoint, token, request.kind)?;
    let repo_dir = request.repo_dir();
    let served = repo_dir.join(&request.revision);
    let commit = hub.commit(request.kind, &request.repo, &request.revision)?;
    let commit_dir = repo_dir.join(&commit);
    if let Some(done) = read_complete(&commit_dir) {
        point(&served, &commit)?;
        tracing::info!(repo = %request.repo, %commit, files = done.files.len(), bytes = done.bytes, "already fetched");
        return Ok(Fetched {
            dir: served,
            commit,
            files: done.files.len(),
            bytes: done.bytes,
            downloaded: 0,
        });
    }
    let listed: Vec<TreeEntry> = hub
        .tree(request.kind, &request.repo, &commit)?
        .into_iter()
        .filter(|e| e.kind == "file")
        .collect();
    // Its paths become files here.
    if let Some(bad) = listed.iter().find(|e| !safe_relative(&e.path)) {
        return Err(FetchError::Hub(format!(
            "{} at {commit}: the Hub listed {:?}, which is no path inside the repo",
            request.repo, bad.path
        )));
    }
    let url = |path: &str| {
        format!(
            "{}/{}{}/resolve/{commit}/{path}",
            hub.endpoint,
            request.kind.prefix(),
            request.repo
        )
    };
    let files = match request.kind {
        RepoKind::Model => model_files(&hub, request, &commit, &commit_dir, listed, &url)?,
        RepoKind::Dataset => dataset_files(request, &commit, listed)?,
        RepoKind::Adapter => adapter_files(request, &commit, listed)?,
    };
    fs::create_dir_all(&commit_dir)
        .map_err(io_error(format!("creating {}", commit_dir.display())))?;
    // A new commit of a repo mostly repeats the last one (a README edit,
    // one changed config): what another complete commit holds is linked,
    // not downloaded again.
    let donors = donors(&repo_dir, &commit);
    let total: u64 = files.iter().map(TreeEntry::content_size).sum();
    tracing::info!(repo = %request.repo, revision = %request.revision, %commit, files = files.len(), bytes = total, "fetching");
    let started = Instant::now();
    let queue = Mutex::new(files.iter());
    let progress = Progress::default();
    let linked = AtomicU64::new(0);
    let failure: Mutex<Option<FetchError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        // Every 30 s, how far it got: a large model takes a while.
        scope.spawn(|| progress.report(total, started));
        let workers: Vec<_> = (0..request.parallel.min(files.len()).max(1))
            .map(|_| {
                scope.spawn(|| {
                    while failure.lock().is_ok_and(|f| f.is_none()) {
                        let Some(entry) = queue.lock().ok().and_then(|mut q| q.next()) else {
                            return;
                        };
                        if let Some(donor) = donors.get(&entry.content_id())
                            && link_donor(donor, &commit_dir.join(&entry.path), entry)
                        {
                            linked.fetch_add(entry.content_size(), Ordering::Relaxed);
                            continue;
                        }
                        if let Err(e) =
                            fetch_file(&hub, &url(&entry.path), entry, &commit_dir, &progress)
                            && let Ok(mut f) = failure.lock()
                        {
                            f.get_or_insert(e);
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            let _ = worker.join();
        }
        progress.finish();
    });
    if let Some(error) = failure.into_inner().ok().flatten() {
        return Err(error);
    }
    let downloaded = progress.bytes();
    let complete = Complete {
        repo: request.repo.clone(),
        commit: commit.clone(),
        files: files.iter().map(|f| f.path.clone()).collect(),
        bytes: total,
        ids: files
            .iter()
            .map(|f| (f.path.clone(), f.content_id()))
            .collect(),
    };
    write_atomically(
        &commit_dir.join(COMPLETE),
        &serde_json::to_vec_pretty(&complete).unwrap_or_default(),
    )?;
    point(&served, &commit)?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        repo = %request.repo, %commit, files = files.len(), bytes = total, downloaded,
        linked_from_other_commits = linked.into_inner(),
        seconds = format!("{seconds:.1}"),
        mib_per_second = format!("{:.1}", downloaded as f64 / (1 << 20) as f64 / seconds.max(1e-3)),
        "fetched"
    );
    Ok(Fetched {
        dir: served,
        commit,
        files: files.len(),
        bytes: total,
        downloaded,
    })
}

/// Of a model's `listed` files, those serving reads ([`wanted`], then
/// [`select`]; a sharded model's index is fetched first, into `commit_dir`).
fn model_files(
    hub: &Hub,
    request: &FetchRequest,
    commit: &str,
    commit_dir: &Path,
    listed: Vec<TreeEntry>,
    url: &dyn Fn(&str) -> String,
) -> Result<Vec<TreeEntry>, FetchError> {
    let files: Vec<TreeEntry> = listed.into_iter().filter(|e| wanted(&e.path)).collect();
    if !files.iter().any(|f| f.path == "config.json") {
        return Err(FetchError::Hub(format!(
            "{} at {commit} has no config.json: not a transformers model this server reads",
            request.repo
        )));
    }
    // A sharded model: its index first, which says which shards to take.
    let shards = match files.iter().find(|f| f.path == INDEX) {
        Some(index) => {
            fs::create_dir_all(commit_dir)
                .map_err(io_error(format!("creating {}", commit_dir.display())))?;
            fetch_file(hub, &url(INDEX), index, commit_dir, &Progress::default())?;
            let bytes =
                fs::read(commit_dir.join(INDEX)).map_err(io_error(format!("reading {INDEX}")))?;
            Some(
                index_shards(&bytes)
                    .map_err(|e| FetchError::Hub(format!("{}: {e}", request.repo)))?,
            )
        }
        None => None,
    };
    select(files, shards.as_deref())
        .map_err(|e| FetchError::Hub(format!("{} at {commit}: {e}", request.repo)))
}

/// Of a dataset's `listed` files, those `request.include` names. Each path
/// asked for must be there: a typo fails the fetch rather than a job
/// training on less than it was told to.
fn dataset_files(
    request: &FetchRequest,
    commit: &str,
    listed: Vec<TreeEntry>,
) -> Result<Vec<TreeEntry>, FetchError> {
    let files: Vec<TreeEntry> = listed
        .into_iter()
        .filter(|e| included(&e.path, &request.include))
        .collect();
    match request.include.iter().find(|i| {
        !files
            .iter()
            .any(|f| included(&f.path, std::slice::from_ref(*i)))
    }) {
        Some(missing) => Err(FetchError::Hub(format!(
            "the dataset {} at {commit} has no file or directory {missing:?}",
            request.repo
        ))),
        None => Ok(files),
    }
}

/// The files a PEFT adapter is served from: `adapter_config.json` and
/// `adapter_model.safetensors` (never the pickled `adapter_model.bin`).
pub const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Of an adapter repo's `listed` files, [`ADAPTER_FILES`]; fails naming
/// what is missing.
fn adapter_files(
    request: &FetchRequest,
    commit: &str,
    listed: Vec<TreeEntry>,
) -> Result<Vec<TreeEntry>, FetchError> {
    let pickled = listed.iter().any(|f| f.path == "adapter_model.bin");
    let files: Vec<TreeEntry> = listed
        .into_iter()
        .filter(|e| ADAPTER_FILES.contains(&e.path.as_str()))
        .collect();
    match ADAPTER_FILES
        .iter()
        .find(|want| !files.iter().any(|f| f.path == **want))
    {
        Some(&"adapter_model.safetensors") if pickled => Err(FetchError::Hub(format!(
            "{} at {commit} holds adapter_model.bin only: pickled weights are code, not data, \
             and are not read; save the adapter with safe_serialization (PEFT's default)",
            request.repo
        ))),
        Some(missing) => Err(FetchError::Hub(format!(
            "{} at {commit} has no {missing}: not a PEFT LoRA adapter this server reads",
            request.repo
        ))),
        None => Ok(files),
    }
}

/// The repo and commit of a directory a fetch completed (its revision's
/// link or its commit directory), if it is one.
pub fn fetched(dir: &Path) -> Option<(String, String)> {
    let done = read_complete(dir)?;
    Some((done.repo, done.commit))
}

/// The files of `repo_dir`'s complete commits but `except`, by content id.
/// Revision links are skipped (they name commit directories listed anyway).
fn donors(repo_dir: &Path, except: &str) -> HashMap<String, PathBuf> {
    let mut out = HashMap::new();
    let Ok(entries) = fs::read_dir(repo_dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || entry.file_name() == except {
            continue;
        }
        let dir = entry.path();
        if let Some(done) = read_complete(&dir) {
            for (path, id) in done.ids {
                out.entry(id).or_insert_with(|| dir.join(path));
            }
        }
    }
    out
}

/// Puts a hard link to `donor` (a file another commit holds, checked when
/// it was fetched, never written since: files are renamed into place
/// whole) at `path`, if its size is `entry`'s. False when it cannot (the
/// donor changed, a filesystem without hard links): then it is downloaded.
fn link_donor(donor: &Path, path: &Path, entry: &TreeEntry) -> bool {
    if fs::metadata(donor).map(|m| m.len()).ok() != Some(entry.content_size()) {
        return false;
    }
    if let Some(parent) = path.parent()
        && fs::create_dir_all(parent).is_err()
    {
        return false;
    }
    let temporary = partial_path(path).with_extension(format!("link-{}", std::process::id()));
    let _ = fs::remove_file(&temporary);
    fs::hard_link(donor, &temporary).is_ok() && fs::rename(&temporary, path).is_ok()
}

fn read_complete(commit_dir: &Path) -> Option<Complete> {
    let bytes = fs::read(commit_dir.join(COMPLETE)).ok()?;
    let done: Complete = serde_json::from_slice(&bytes).ok()?;
    // A file removed by hand since makes it incomplete again.
    done.files
        .iter()
        .all(|f| commit_dir.join(f).is_file())
        .then_some(done)
}

/// Points `served` (a symlink named as the revision) at `commit`, atomically.
fn point(served: &Path, commit: &str) -> Result<(), FetchError> {
    if served.file_name().and_then(|n| n.to_str()) == Some(commit) {
        return Ok(());
    }
    symlink_atomically(Path::new(commit), served)
}

/// Points `link` at the commit `fetched` holds (an absolute path), creating
/// its directory: `moe-worker fetch --link`. A pod's server reads its own
/// link, so it loads the commit its own download resolved even when another
/// pod on a shared claim later moves the revision's link to a newer commit
/// (and even when its container restarts, which does not rerun the fetch).
pub fn pin(fetched: &Fetched, link: &Path) -> Result<(), FetchError> {
    let parent = fetched.dir.parent().unwrap_or(Path::new("."));
    let commit_dir = std::path::absolute(parent.join(&fetched.commit))
        .map_err(io_error(format!("resolving {}", parent.display())))?;
    if let Some(dir) = link.parent() {
        fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
    }
    symlink_atomically(&commit_dir, link)
}

/// Makes `link` a symlink to `target`, replacing what is there in one rename.
fn symlink_atomically(target: &Path, link: &Path) -> Result<(), FetchError> {
    let parent = link.parent().unwrap_or(Path::new("."));
    let temporary = parent.join(format!(
        ".{}.link-{}",
        link.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("revision"),
        std::process::id()
    ));
    let _ = fs::remove_file(&temporary);
    std::os::unix::fs::symlink(target, &temporary)
        .map_err(io_error(format!("linking {}", temporary.display())))?;
    fs::rename(&temporary, link).map_err(io_error(format!(
        "pointing {} at {} (a directory of that name is in the way?)",
        link.display(),
        target.display()
    )))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), FetchError> {
    let partial = partial_path(path);
    let mut file =
        File::create(&partial).map_err(io_error(format!("creating {}", partial.display())))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_error(format!("writing {}", partial.display())))?;
    fs::rename(&partial, path).map_err(io_error(format!("renaming {}", partial.display())))
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Bytes downloaded so far by every thread of a fetch, and when it is over.
#[derive(Default)]
struct Progress {
    bytes: AtomicU64,
    over: AtomicBool,
}

impl Progress {
    fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn finish(&self) {
        self.over.store(true, Ordering::Relaxed);
    }

    /// Logs the bytes so far every 30 s until [`Self::finish`].
    fn report(&self, total: u64, started: Instant) {
        let mut next = started + Duration::from_secs(30);
        while !self.over.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if Instant::now() >= next {
                let (bytes, seconds) = (self.bytes(), started.elapsed().as_secs_f64());
                tracing::info!(
                    downloaded_mib = bytes >> 20,
                    of_mib = total >> 20,
                    mib_per_second = format!("{:.1}", bytes as f64 / (1 << 20) as f64 / seconds),
                    "downloading"
                );
                next += Duration::from_secs(30);
            }
        }
    }
}

/// Downloads one file into `dir` (resuming, checked, renamed into place),
/// counting the bytes it downloads into `progress`.
fn fetch_file(
    hub: &Hub,
    url: &str,
    entry: &TreeEntry,
    dir: &Path,
    progress: &Progress,
) -> Result<(), FetchError> {
    let path = dir.join(&entry.path);
    // A dataset's files may lie in directories.
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_error(format!("creating {}", parent.display())))?;
    }
    let partial = partial_path(&path);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&partial)
        .map_err(io_error(format!("opening {}", partial.display())))?;
    // Another pod on a shared claim may be writing it: wait for it, then
    // find the file in place.
    lock(&file).map_err(io_error(format!("locking {}", partial.display())))?;
    if let Ok(meta) = fs::metadata(&path)
        && meta.len() == entry.content_size()
    {
        let _ = fs::remove_file(&partial);
        return Ok(());
    }
    let size = entry.content_size();
    let mut tries = 0;
    loop {
        tries += 1;
        match download(hub, url, entry, &mut file, progress) {
            Ok(()) => break,
            Err(e) if tries < TRIES && !matches!(e, FetchError::Hub(_)) => {
                tracing::warn!(file = %entry.path, error = %e, tries, "retrying");
                std::thread::sleep(Duration::from_secs(1 << tries));
            }
            Err(e) => return Err(e),
        }
    }
    file.sync_all()
        .map_err(io_error(format!("syncing {}", partial.display())))?;
    if let Err(problem) = verify(&mut file, entry) {
        drop(file);
        let _ = fs::remove_file(&partial);
        return Err(FetchError::Corrupt(format!(
            "{} ({size} bytes) is not the Hub's: {problem}; it was deleted, and a retry \
             downloads it again",
            entry.path
        )));
    }
    fs::rename(&partial, &path).map_err(io_error(format!("renaming {}", partial.display())))
}

/// Appends the rest of the file to `file` (from its current length, with a
/// range request), counting what arrives into `progress`.
fn download(
    hub: &Hub,
    url: &str,
    entry: &TreeEntry,
    file: &mut File,
    progress: &Progress,
) -> Result<(), FetchError> {
    let size = entry.content_size();
    let have = file
        .metadata()
        .map_err(io_error(format!("reading {}.partial", entry.path)))?
        .len();
    if have == size {
        return Ok(());
    }
    let what = format!("downloading {}", entry.path);
    let mut request = hub.get(url);
    if have > 0 && have < size {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut response = hub.send(request, &what)?;
    let start = if response.status() == reqwest::StatusCode::PARTIAL_CONTENT {
        have
    } else {
        // The whole file (a server without ranges, or a partial too long).
        0
    };
    file.set_len(start)
        .and_then(|()| file.seek(io::SeekFrom::Start(start)).map(|_| ()))
        .map_err(io_error(format!("rewinding {}.partial", entry.path)))?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut received = 0u64;
    loop {
        let n = response
            .read(&mut buffer)
            .map_err(|e| FetchError::Http(format!("{what}: {e}")))?;
        if n == 0 {
            break;
        }
        if start + received + n as u64 > size {
            return Err(FetchError::Corrupt(format!(
                "{what}: more than the {size} bytes the Hub listed"
            )));
        }
        file.write_all(&buffer[..n])
            .map_err(io_error(format!("writing {}.partial", entry.path)))?;
        received += n as u64;
        progress.add(n as u64);
    }
    if start + received != size {
        return Err(FetchError::Http(format!(
            "{what}: the connection ended at byte {} of {size}",
            start + received
        )));
    }
    Ok(())
}

/// Checks `file` against the Hub's size and hash for `entry`.
pub fn verify(file: &mut File, entry: &TreeEntry) -> Result<(), String> {
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if size != entry.content_size() {
        return Err(format!(
            "{size} bytes, the Hub lists {}",
            entry.content_size()
        ));
    }
    file.seek(io::SeekFrom::Start(0))
        .map_err(|e| e.to_string())?;
    let (got, want, kind) = match &entry.lfs {
        Some(lfs) => (
            hash(Sha256::new(), file)?,
            lfs.oid.to_ascii_lowercase(),
            "sha256",
        ),
        None => {
            let mut sha1 = Sha1::new();
            sha1.update(format!("blob {size}\0").as_bytes());
            (
                hash(sha1, file)?,
                entry.oid.to_ascii_lowercase(),
                "git blob sha1",
            )
        }
    };
    if got != want {
        return Err(format!("its {kind} is {got}, the Hub's {want}"));
    }
    Ok(())
}

fn hash(mut digest: impl Digest, file: &mut File) -> Result<String, String> {
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        digest.update(&buffer[..n]);
    }
    Ok(digest
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// An exclusive lock on `file`, waiting for it (flock(2): on NFS, a POSIX
/// lock the server holds, so pods on other nodes see it too).
fn lock(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor this File owns; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_files_are_wanted_pickles_and_subdirectories_not() {
        for path in [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "chat_template.jinja",
            "merges.txt",
            "tokenizer.model",
        ] {
            assert!(wanted(path), "{path}");
        }
        for path in [
            "pytorch_model.bin",
            "model.pt",
            "original/consolidated.00.pth",
            "onnx/model.onnx",
            "original/params.json",
            "README.md",
            ".gitattributes",
        ] {
            assert!(!wanted(path), "{path}");
        }
    }

    #[test]
    fn a_datasets_files_are_those_under_its_paths_and_paths_stay_inside() {
        let include = vec!["train".to_string(), "tok/tokenizer.json".to_string()];
        for (path, taken) in [
            ("train", true),
            ("train/a.bin", true),
            ("train/deep/er/b.bin", true),
            ("training/a.bin", false),
            ("trainx", false),
            ("val/a.bin", false),
            ("tok/tokenizer.json", true),
            ("tok/tokenizer_config.json", false),
            ("README.md", false),
        ] {
            assert_eq!(included(path, &include), taken, "{path}");
        }
        assert!(included("train/a.bin", &["train/".to_string()]));
        for (path, safe) in [
            ("a", true),
            ("a/b.c/.hidden", true),
            ("..", false),
            ("a/../b", false),
            ("./a", false),
            ("/a", false),
            ("a//b", false),
            ("a\\b", false),
            ("", false),
        ] {
            assert_eq!(safe_relative(path), safe, "{path:?}");
        }
    }

    #[test]
    fn repos_and_revisions_cannot_escape_the_directory() {
        let request = |repo: &str, revision: &str| FetchRequest {
            repo: repo.into(),
            revision: revision.into(),
            into: "/models".into(),
            endpoint: DEFAULT_ENDPOINT.into(),
            parallel: 4,
            kind: RepoKind::Model,
            include: Vec::new(),
        };
        assert!(check(&request("Qwen/Qwen3-30B-A3B-FP8", "main")).is_ok());
        assert!(check(&request("deepseek-ai/DeepSeek-V3", "v1.0")).is_ok());
        for (repo, revision) in [
            ("../etc", "main"),
            ("org/../x", "main"),
            ("org", "main"),
            ("org/name/extra", "main"),
            ("org/name", ".."),
            ("org/name", "refs/pr/1"),
            ("org/name", ""),
        ] {
            let error = check(&request(repo, revision)).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{repo} {revision}: {error}");
        }
    }

    fn entries(paths: &[&str]) -> Vec<TreeEntry> {
        paths
            .iter()
            .map(|p| TreeEntry {
                kind: "file".into(),
                path: (*p).into(),
                size: 1,
                oid: String::new(),
                lfs: None,
            })
            .collect()
    }

    fn paths(files: &[TreeEntry]) -> Vec<&str> {
        files.iter().map(|f| f.path.as_str()).collect()
    }

    /// Only the model's weights: the index's shards, else model.safetensors,
    /// else every safetensors file; never Mistral's second copy or an adapter.
    #[test]
    fn the_weights_are_what_transformers_would_load() {
        let sharded = entries(&[
            "config.json",
            INDEX,
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "consolidated.safetensors",
            "tokenizer.json",
        ]);
        let shards = index_shards(
            br#"{"metadata": {"total_size": 2}, "weight_map": {
                "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                "c": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            paths(&select(sharded.clone(), Some(&shards)).unwrap()),
            [
                "config.json",
                INDEX,
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "tokenizer.json"
            ]
        );
        let single = entries(&[
            "config.json",
            "model.safetensors",
            "consolidated.safetensors",
            "adapter_model.safetensors",
        ]);
        assert_eq!(
            paths(&select(single, None).unwrap()),
            ["config.json", "model.safetensors"]
        );
        let other = entries(&[
            "config.json",
            "weights-a.safetensors",
            "weights-b.safetensors",
        ]);
        assert_eq!(select(other.clone(), None).unwrap(), other);
        // An index naming a shard the commit lacks, or a path.
        let missing = ["model-00003-of-00003.safetensors".to_string()];
        assert!(
            select(sharded, Some(&missing))
                .unwrap_err()
                .contains("model-00003")
        );
        assert!(index_shards(br#"{"weight_map": {"a": "../x.safetensors"}}"#).is_err());
        assert!(index_shards(b"[]").is_err());
    }

    #[test]
    fn hub_uris_name_a_repo_and_a_revision() {
        assert_eq!(
            parse_uri("hf://allenai/OLMoE-1B-7B-0924"),
            Some(("allenai/OLMoE-1B-7B-0924".into(), "main".into()))
        );
        assert_eq!(
            parse_uri("hf://Qwen/Qwen3-30B-A3B-FP8@v1.0"),
            Some(("Qwen/Qwen3-30B-A3B-FP8".into(), "v1.0".into()))
        );
        assert_eq!(parse_uri("runs/tiny"), None);
    }

    #[test]
    fn the_next_page_is_read_from_the_link_header() {
        assert_eq!(
            next_link(r#"<https://huggingface.co/api/models/a/b/tree/c?cursor=xyz>; rel="next""#),
            Some("https://huggingface.co/api/models/a/b/tree/c?cursor=xyz".into())
        );
        assert_eq!(next_link(r#"<https://x/prev>; rel="prev""#), None);
        assert_eq!(
            next_link(r#"<https://x/prev>; rel="prev", <https://x/next>; rel="next""#),
            Some("https://x/next".into())
        );
    }

    #[test]
    fn files_are_checked_by_size_and_hash() {
        let dir = std::env::temp_dir().join(format!("moe-fetch-verify-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        fs::write(&path, b"hello\n").unwrap();
        let mut file = File::open(&path).unwrap();
        // `git hash-object` of "hello\n", and its sha256.
        let blob = TreeEntry {
            kind: "file".into(),
            path: "f".into(),
            size: 6,
            oid: "ce013625030ba8dba906f756967f9e9ca394464a".into(),
            lfs: None,
        };
        verify(&mut file, &blob).unwrap();
        let lfs = TreeEntry {
            lfs: Some(Lfs {
                oid: "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03".into(),
                size: 6,
            }),
            size: 134,
            ..blob.clone()
        };
        verify(&mut file, &lfs).unwrap();
        let wrong = TreeEntry {
            oid: "0".repeat(40),
            ..blob.clone()
        };
        assert!(
            verify(&mut file, &wrong)
                .unwrap_err()
                .contains("git blob sha1")
        );
        let short = TreeEntry { size: 7, ..blob };
        assert!(verify(&mut file, &short).unwrap_err().contains("7"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
