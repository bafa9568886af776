//! `moe-worker fetch` against a fake Hugging Face Hub on loopback: the
//! Hub's API (revision, paged tree) and `resolve` redirects on one server,
//! the file storage they redirect to on another (another origin, as the
//! Hub's CDN is), serving the Mixtral fixture that the serving tests load.
//!
//! - A model is fetched, checked and loadable by the server; pickles and
//!   subdirectories are never requested; the token reaches the Hub and
//!   never the storage; a second fetch downloads nothing.
//! - An interrupted download resumes from its `.partial` with a range
//!   request.
//! - A corrupt file is deleted and named; nothing claims to be complete.
//! - A gated model without a token, or with one that has no access, fails
//!   with exit code 2 and a hint, never printing the token.
//! - A branch that moves gets a directory per commit; the revision's link
//!   switches only once the new commit is complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use moe_worker::fetch::{self, COMPLETE, FetchError, FetchRequest, RepoKind};
use moe_worker::serve;
use sha1::Sha1;
use sha2::{Digest, Sha256};

const BINARY: &str = env!("CARGO_BIN_EXE_moe-worker");
const REPO: &str = "mistral-tests/tiny-mixtral";
const TOKEN: &str = "hf_test_token_0123456789";

fn fixture_dir() -> PathBuf {
    fixture("mixtral")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// A request the fake storage received.
#[derive(Clone, Debug)]
struct Served {
    path: String,
    range: Option<String>,
    authorization: bool,
}

#[derive(Default)]
struct State {
    /// The commit `main` names, and each commit's files.
    main: String,
    commits: BTreeMap<String, Vec<(String, Vec<u8>)>>,
    /// A file served with a flipped byte.
    corrupt: Option<String>,
    /// Answer only requests with this token.
    token: Option<String>,
    /// What the Hub and the storage received (path, Authorization present).
    hub_log: Vec<(String, bool)>,
    storage_log: Vec<Served>,
    /// Serves REPO as a dataset (`/api/datasets/…`, `/datasets/…/resolve/…`).
    dataset: bool,
}

struct FakeHub {
    endpoint: String,
    state: Arc<Mutex<State>>,
}

fn header(request: &tiny_http::Request, name: &str) -> Option<String> {
    request
        .headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_string())
}

fn respond(request: tiny_http::Request, status: u16, body: Vec<u8>, headers: &[(&str, String)]) {
    let mut response = tiny_http::Response::from_data(body).with_status_code(status);
    for (name, value) in headers {
        response.add_header(tiny_http::Header::from_bytes(*name, value.as_bytes()).unwrap());
    }
    let _ = request.respond(response);
}

fn git_blob_sha1(bytes: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(format!("blob {}\0", bytes.len()).as_bytes());
    sha1.update(bytes);
    hex(&sha1.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl FakeHub {
    /// The fixture as commit `c0ffee…` of `main`, plus files serving must
    /// not fetch (a pickle, a subdirectory's weights).
    fn start() -> Self {
        Self::start_with(&fixture_dir())
    }

    /// `files` as commit `c0ffee…` of `main` of a dataset REPO.
    fn start_dataset(files: Vec<(String, Vec<u8>)>) -> Self {
        let hub = Self::start();
        {
            let mut state = hub.state.lock().unwrap();
            state.dataset = true;
            let commit = state.main.clone();
            state.commits.insert(commit, files);
        }
        hub
    }

    /// The model in `dir` as commit `c0ffee…` of `main` (with the extras above).
    fn start_with(dir: &Path) -> Self {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap() != "golden.json")
            .map(|p| {
                let name = p.file_name().unwrap().to_str().unwrap().to_string();
                (name, std::fs::read(&p).unwrap())
            })
            .collect();
        files.push(("pytorch_model.bin".into(), vec![7; 100]));
        // A second copy of the weights in another layout, as Mistral's
        // repos hold, and an adapter: not the model transformers loads.
        files.push(("consolidated.safetensors".into(), vec![9; 300]));
        files.push(("adapter_model.safetensors".into(), vec![6; 50]));
        files.push(("original/consolidated.00.pth".into(), vec![8; 100]));
        files.push(("README.md".into(), b"# tiny".to_vec()));
        files.sort();
        let commit = "c0ffee".repeat(6) + "abcd";
        let state = Arc::new(Mutex::new(State {
            main: commit.clone(),
            commits: BTreeMap::from([(commit, files)]),
            ..State::default()
        }));
        let storage = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let storage_url = format!("http://{}", storage.server_addr().to_ip().unwrap());
        let hub = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", hub.server_addr().to_ip().unwrap());
        let (s, e) = (Arc::clone(&state), endpoint.clone());
        std::thread::spawn(move || {
            for request in hub.incoming_requests() {
                Self::hub(&s, &e, &storage_url, request);
            }
        });
        let s = Arc::clone(&state);
        std::thread::spawn(move || {
            for request in storage.incoming_requests() {
                Self::storage(&s, request);
            }
        });
        Self { endpoint, state }
    }

    fn hub(state: &Mutex<State>, endpoint: &str, storage: &str, request: tiny_http::Request) {
        let url = request.url().to_string();
        let authorization = header(&request, "Authorization");
        let state = &mut *state.lock().unwrap();
        state.hub_log.push((url.clone(), authorization.is_some()));
        if let Some(token) = &state.token {
            match authorization {
                None => return respond(request, 401, b"{\"error\":\"gated\"}".to_vec(), &[]),
                Some(a) if a != format!("Bearer {token}") => {
                    return respond(request, 403, b"{\"error\":\"no access\"}".to_vec(), &[]);
                }
                Some(_) => {}
            }
        }
        let kind = if state.dataset { "datasets" } else { "models" };
        let api = format!("/api/{kind}/{REPO}/");
        if let Some(revision) = url.strip_prefix(&format!("{api}revision/")) {
            let sha = if revision == "main" {
                state.main.clone()
            } else {
                revision.to_string()
            };
            if !state.commits.contains_key(&sha) {
                return respond(request, 404, b"{}".to_vec(), &[]);
            }
            let body = serde_json::json!({"id": REPO, "sha": sha}).to_string();
            return respond(request, 200, body.into_bytes(), &[]);
        }
        if let Some(rest) = url.strip_prefix(&format!("{api}tree/")) {
            let (commit, query) = rest.split_once('?').unwrap();
            assert!(query.contains("recursive=true"), "{url}");
            let files = &state.commits[commit];
            let mut entries: Vec<serde_json::Value> = vec![serde_json::json!(
                {"type": "directory", "path": "original", "oid": "0".repeat(40), "size": 0}
            )];
            for (path, bytes) in files {
                let lfs = path.ends_with(".safetensors")
                    || path.ends_with(".bin")
                    || path.ends_with(".pth");
                let mut entry = serde_json::json!({
                    "type": "file", "path": path, "oid": git_blob_sha1(bytes),
                    "size": if lfs { 134 } else { bytes.len() },
                });
                if lfs {
                    entry["lfs"] = serde_json::json!({
                        "oid": hex(&Sha256::digest(bytes)), "size": bytes.len(), "pointerSize": 134
                    });
                }
                entries.push(entry);
            }
            // Two pages: the second behind a cursor, as the Hub pages.
            let half = entries.len() / 2;
            let (page, next) = if query.contains("cursor=2") {
                (entries[half..].to_vec(), None)
            } else {
                let next =
                    format!("<{endpoint}{api}tree/{commit}?recursive=true&cursor=2>; rel=\"next\"");
                (entries[..half].to_vec(), Some(next))
            };
            let headers: Vec<(&str, String)> = next.map(|n| ("Link", n)).into_iter().collect();
            return respond(request, 200, serde_json::to_vec(&page).unwrap(), &headers);
        }
        let files = if state.dataset { "/datasets" } else { "" };
        if let Some(rest) = url.strip_prefix(&format!("{files}/{REPO}/resolve/")) {
            let (commit, path) = rest.split_once('/').unwrap();
            let location = format!("{storage}/blobs/{commit}/{path}?signature=s3cr3t");
            return respond(request, 302, Vec::new(), &[("Location", location)]);
        }
        respond(request, 404, Vec::new(), &[]);
    }

    fn storage(state: &Mutex<State>, request: tiny_http::Request) {
        let url = request.url().to_string();
        let range = header(&request, "Range");
        let state = &mut *state.lock().unwrap();
        let (path, _) = url.split_once('?').unwrap_or((&url, ""));
        let (commit, file) = path
            .strip_prefix("/blobs/")
            .unwrap()
            .split_once('/')
            .unwrap();
        state.storage_log.push(Served {
            path: file.to_string(),
            range: range.clone(),
            authorization: header(&request, "Authorization").is_some(),
        });
        let Some((_, bytes)) = state.commits[commit].iter().find(|(p, _)| p == file) else {
            return respond(request, 404, Vec::new(), &[]);
        };
        let mut bytes = bytes.clone();
        if state.corrupt.as_deref() == Some(file) {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x55;
        }
        match range.and_then(|r| {
            r.strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse::<usize>()
                .ok()
        }) {
            Some(from) => {
                let total = bytes.len();
                let content_range = format!("bytes {from}-{}/{total}", total - 1);
                respond(
                    request,
                    206,
                    bytes[from..].to_vec(),
                    &[("Content-Range", content_range)],
                );
            }
            None => respond(request, 200, bytes, &[]),
        }
    }

    fn request(&self, into: &Path) -> FetchRequest {
        FetchRequest {
            repo: REPO.into(),
            revision: "main".into(),
            into: into.to_path_buf(),
            endpoint: self.endpoint.clone(),
            parallel: 3,
            kind: RepoKind::Model,
            include: Vec::new(),
        }
    }

    /// A push: commit `to` is `from` with another `generation_config.json`
    /// (`max_new_tokens` 7), and `main` names it.
    fn push_changed_generation_config(&self, from: &str, to: &str) {
        let mut state = self.state.lock().unwrap();
        let mut files = state.commits[from].clone();
        for (path, bytes) in &mut files {
            if path == "generation_config.json" {
                *bytes = br#"{"max_new_tokens": 7}"#.to_vec();
            }
        }
        state.commits.insert(to.to_string(), files);
        state.main = to.to_string();
    }

    fn storage_log(&self) -> Vec<Served> {
        self.state.lock().unwrap().storage_log.clone()
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("moe-fetch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The files a fetched directory holds, but its completion record.
fn present_files(dir: &Path) -> Vec<String> {
    let mut present: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
        .filter(|n| n != COMPLETE)
        .collect();
    present.sort();
    present
}

fn serving_files() -> Vec<String> {
    files_of(&fixture_dir())
}

/// Runs `moe-worker fetch` as `command` says; it must succeed. What it
/// printed: its report.
fn fetch_command(command: &mut Command) -> moe_crds::contract::FetchReport {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(out.stdout.trim_ascii()).unwrap()
}

/// Every file under `dir` at any depth (but the completion record), by
/// its path relative to `dir`, sorted.
fn tree_of(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.file_name().unwrap() != COMPLETE {
                let relative = path.strip_prefix(dir).unwrap();
                out.push(relative.to_str().unwrap().to_string());
            }
        }
    }
    out.sort();
    out
}

/// The files of a fixture the fetch must bring (all but the golden outputs).
fn files_of(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
        .filter(|n| n != "golden.json")
        .collect();
    names.sort();
    names
}

#[test]
fn a_model_is_fetched_checked_and_served_and_a_second_fetch_downloads_nothing() {
    let hub = FakeHub::start();
    let dir = TempDir::new("whole");
    let fetched = fetch::fetch(&hub.request(&dir.0), None).unwrap();
    let commit = hub.state.lock().unwrap().main.clone();
    assert_eq!(fetched.commit, commit);
    assert_eq!(fetched.dir, dir.0.join(REPO).join("main"));
    assert_eq!(
        std::fs::read_link(&fetched.dir).unwrap(),
        PathBuf::from(&commit)
    );
    let present = present_files(&fetched.dir);
    assert_eq!(
        present,
        serving_files(),
        "only what serving reads, nothing partial"
    );
    for name in serving_files() {
        assert_eq!(
            std::fs::read(fetched.dir.join(&name)).unwrap(),
            std::fs::read(fixture_dir().join(&name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(fetched.downloaded, fetched.bytes);
    let served = hub.storage_log();
    assert_eq!(served.len(), serving_files().len(), "{served:?}");
    assert!(
        served.iter().all(|s| !s.authorization),
        "the token stays with the Hub"
    );
    // The server loads it as any Hugging Face directory.
    let loaded = serve::load::load(&fetched.dir, None, None).unwrap();
    assert_eq!(loaded.path, fetched.dir);

    let again = fetch::fetch(&hub.request(&dir.0), None).unwrap();
    assert_eq!((again.downloaded, again.files), (0, fetched.files));
    assert_eq!(
        hub.storage_log().len(),
        served.len(),
        "nothing downloaded again"
    );
}

/// A sharded model: its index first, then only the shards it names (not
/// the second copy of the weights beside them), and the server loads it.
#[test]
fn a_sharded_model_brings_the_shards_its_index_names() {
    let qwen = fixture("qwen2_moe");
    let hub = FakeHub::start_with(&qwen);
    let dir = TempDir::new("sharded");
    let fetched = fetch::fetch(&hub.request(&dir.0), None).unwrap();
    let present = present_files(&fetched.dir);
    assert_eq!(present, files_of(&qwen));
    let served: Vec<String> = hub.storage_log().into_iter().map(|s| s.path).collect();
    assert!(
        served
            .iter()
            .all(|p| !p.contains("consolidated") && !p.contains("adapter")),
        "{served:?}"
    );
    assert_eq!(
        served.iter().filter(|p| p.as_str() == fetch::INDEX).count(),
        1
    );
    serve::load::load(&fetched.dir, None, None).unwrap();
}

#[test]
fn an_interrupted_download_resumes_from_its_partial() {
    let hub = FakeHub::start();
    let dir = TempDir::new("resume");
    let commit = hub.state.lock().unwrap().main.clone();
    let weights = std::fs::read(fixture_dir().join("model.safetensors")).unwrap();
    let half = weights.len() / 2;
    let commit_dir = dir.0.join(REPO).join(&commit);
    std::fs::create_dir_all(&commit_dir).unwrap();
    std::fs::write(
        commit_dir.join("model.safetensors.partial"),
        &weights[..half],
    )
    .unwrap();
    let fetched = fetch::fetch(&hub.request(&dir.0), None).unwrap();
    assert_eq!(
        std::fs::read(fetched.dir.join("model.safetensors")).unwrap(),
        weights
    );
    let served = hub.storage_log();
    let resumed = served
        .iter()
        .find(|s| s.path == "model.safetensors")
        .unwrap();
    assert_eq!(
        resumed.range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    assert_eq!(fetched.downloaded, fetched.bytes - half as u64);
    assert!(!commit_dir.join("model.safetensors.partial").exists());
}

#[test]
fn a_corrupt_file_is_deleted_and_named_and_nothing_claims_to_be_complete() {
    let hub = FakeHub::start();
    hub.state.lock().unwrap().corrupt = Some("model.safetensors".into());
    let dir = TempDir::new("corrupt");
    let request = FetchRequest {
        parallel: 1,
        kind: RepoKind::Model,
        include: Vec::new(),
        ..hub.request(&dir.0)
    };
    let error = fetch::fetch(&request, None).unwrap_err();
    assert!(matches!(error, FetchError::Corrupt(_)), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("model.safetensors") && text.contains("sha256"),
        "{text}"
    );
    let commit = hub.state.lock().unwrap().main.clone();
    let commit_dir = dir.0.join(REPO).join(&commit);
    assert!(!commit_dir.join("model.safetensors").exists());
    assert!(!commit_dir.join("model.safetensors.partial").exists());
    assert!(!commit_dir.join(COMPLETE).exists());
    assert!(
        !dir.0.join(REPO).join("main").exists(),
        "no revision link to a broken commit"
    );
    // Fixed at the source, a retry completes.
    hub.state.lock().unwrap().corrupt = None;
    fetch::fetch(&request, None).unwrap();
}

#[test]
fn a_gated_model_needs_a_token_and_the_token_is_never_printed() {
    let hub = FakeHub::start();
    hub.state.lock().unwrap().token = Some(TOKEN.into());
    let dir = TempDir::new("gated");
    let error = fetch::fetch(&hub.request(&dir.0), None).unwrap_err();
    assert_eq!(error.exit_code(), 2);
    assert!(
        error.to_string().contains("model.huggingface.tokenSecret"),
        "{error}"
    );
    let wrong = "hf_wrong_secret_987";
    let error = fetch::fetch(&hub.request(&dir.0), Some(wrong)).unwrap_err();
    assert!(error.to_string().contains("no access"), "{error}");
    // The command as an init container runs it: exit 2, a hint, no token.
    let out = Command::new(BINARY)
        .args(["fetch", "--repo", REPO, "--revision", "main", "--into"])
        .arg(&dir.0)
        .args(["--endpoint", &hub.endpoint])
        .env("HF_TOKEN", wrong)
        .env("MOE_TERMINATION_LOG", dir.0.join("termination-log"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("403"), "{stderr}");
    assert!(!stderr.contains(wrong), "the token was printed: {stderr}");
    let out = Command::new(BINARY)
        .args(["fetch", "--repo", REPO, "--revision", "main", "--into"])
        .arg(&dir.0)
        .args(["--endpoint", &hub.endpoint])
        .env("HF_TOKEN", TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains(TOKEN), "the token was printed: {stderr}");
    let log = hub.state.lock().unwrap().hub_log.clone();
    assert!(
        log.iter()
            .filter(|(u, _)| u.contains("/resolve/"))
            .all(|(_, auth)| *auth)
    );
    assert!(hub.storage_log().iter().all(|s| !s.authorization));
}

/// `moe-worker serve --model hf://…`: downloaded into the cache, served
/// under the repo's name, and a completion answers.
/// `method path` with `body` (JSON) sent to the server `server` listens
/// for on loopback `port` until it answers 200, within 60 s: the raw
/// response. Fails with the server's log if it exits.
fn until_ok(
    server: &mut std::process::Child,
    port: u16,
    method: &str,
    path: &str,
    body: &str,
) -> String {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Ok(Some(exit)) = server.try_wait() {
            let mut log = String::new();
            server
                .stderr
                .as_mut()
                .unwrap()
                .read_to_string(&mut log)
                .unwrap();
            panic!("the server exited: {exit}\n{log}");
        }
        if let Ok(mut stream) = std::net::TcpStream::connect(addr) {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(request.as_bytes()).unwrap();
            let mut raw = String::new();
            stream.read_to_string(&mut raw).unwrap();
            if raw.starts_with("HTTP/1.1 200") {
                return raw;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not serving within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn serve_takes_a_hub_model_by_its_uri() {
    let hub = FakeHub::start();
    let dir = TempDir::new("serve-uri");
    let port = moe_worker::dist::launch::free_local_port().unwrap();
    let mut server = Command::new(BINARY)
        .args([
            "serve",
            "--model",
            &format!("hf://{REPO}@main"),
            "--host",
            "127.0.0.1",
        ])
        .args(["--port", &port.to_string(), "--kv-cache-mib", "4"])
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("MOE_HF_CACHE", &dir.0)
        .env("MOE_STATUS_ADDR", "off")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let models = until_ok(&mut server, port, "GET", "/v1/models", "");
    let _ = server.kill();
    let _ = server.wait();
    assert!(models.contains(&format!("\"id\":\"{REPO}\"")), "{models}");
    let commit = hub.state.lock().unwrap().main.clone();
    // Which commit `main` named when it was fetched.
    assert!(
        models.contains(&format!("\"root\":\"huggingface/{REPO}@{commit}\"")),
        "{models}"
    );
    assert!(dir.0.join(REPO).join(&commit).join(COMPLETE).is_file());
}

#[test]
fn a_moved_branch_gets_its_own_directory_and_the_link_switches_when_it_is_complete() {
    let hub = FakeHub::start();
    let dir = TempDir::new("moved");
    let first = fetch::fetch(&hub.request(&dir.0), None).unwrap();
    let second_commit = "beef".repeat(10);
    hub.push_changed_generation_config(&first.commit, &second_commit);
    let second = fetch::fetch(&hub.request(&dir.0), None).unwrap();
    assert_eq!(second.commit, second_commit);
    assert_eq!(
        std::fs::read_link(&second.dir).unwrap(),
        PathBuf::from(&second_commit)
    );
    assert_eq!(
        std::fs::read(second.dir.join("generation_config.json")).unwrap(),
        br#"{"max_new_tokens": 7}"#
    );
    // The first commit is untouched: a server that loaded it keeps its files.
    assert!(
        dir.0
            .join(REPO)
            .join(&first.commit)
            .join(COMPLETE)
            .is_file()
    );
}

/// Two pods on a shared claim, each with its own `--link` (as the operator
/// runs the init container): the first fetches commit 1; the branch moves;
/// the second fetches commit 2. The revision's link follows the branch, but
/// the first pod's own link still names commit 1 — what its server reads,
/// even after a restart — and each fetch's report (stdout and termination
/// message, `FetchReport`) names the commit it resolved.
#[test]
fn each_pods_link_keeps_the_commit_its_own_fetch_resolved_and_its_report_names_it() {
    let hub = FakeHub::start();
    let dir = TempDir::new("links");
    let claim = dir.0.join("claim");
    let run = |pod: &str| -> (PathBuf, moe_crds::contract::FetchReport) {
        let link = dir.0.join(pod).join("model");
        let log = dir.0.join(format!("{pod}-termination-log"));
        std::fs::write(&log, "").unwrap();
        let printed = fetch_command(
            Command::new(BINARY)
                .args(["fetch", "--repo", REPO, "--into"])
                .arg(&claim)
                .args(["--endpoint", &hub.endpoint, "--link"])
                .arg(&link)
                .env("MOE_TERMINATION_LOG", &log),
        );
        let report: moe_crds::contract::FetchReport =
            serde_json::from_slice(&std::fs::read(&log).unwrap()).unwrap();
        assert_eq!(report, printed);
        (link, report)
    };
    let (first_link, first) = run("pod-a");
    assert_eq!(first.repo, REPO);
    assert!(first.downloaded > 0 && first.downloaded == first.bytes);
    assert_eq!(
        std::fs::read_link(&first_link).unwrap(),
        claim.join(REPO).join(&first.commit)
    );
    let second_commit = "beef".repeat(10);
    hub.push_changed_generation_config(&first.commit, &second_commit);
    let (second_link, second) = run("pod-b");
    assert_eq!(second.commit, second_commit);
    // Only the changed file came down: the rest is linked from commit 1.
    assert_eq!(second.downloaded, br#"{"max_new_tokens": 7}"#.len() as u64);
    assert_eq!(
        std::fs::read_link(claim.join(REPO).join("main")).unwrap(),
        PathBuf::from(&second_commit)
    );
    assert_eq!(
        std::fs::read_link(&first_link).unwrap(),
        claim.join(REPO).join(&first.commit),
        "pod a's server still reads what pod a fetched"
    );
    assert_eq!(
        std::fs::read(second_link.join("generation_config.json")).unwrap(),
        br#"{"max_new_tokens": 7}"#
    );
    assert_ne!(
        std::fs::read(first_link.join("generation_config.json")).unwrap(),
        br#"{"max_new_tokens": 7}"#
    );
    // A restarted pod a fetches again: the branch now names commit 2, and
    // its link follows (a new pod, a new download: what the operator sees).
    let (again_link, again) = run("pod-a");
    assert_eq!(again.commit, second_commit);
    assert_eq!(again.downloaded, 0, "the claim holds commit 2 already");
    assert_eq!(again_link, first_link);
    assert_eq!(
        std::fs::read_link(&again_link).unwrap(),
        claim.join(REPO).join(&second_commit)
    );
}

/// A Hub dataset (`data.huggingface`), as a training pod's init container
/// fetches it: only the files under the path asked for (at any depth), each
/// checked, behind the pod's own link; then the trainer reads them through
/// that link (`dataDir`), and only them: the text under `train/` has two
/// letters, so its unigram entropy is ln 2, which the other files (the
/// `val/` split, the README) would change.
#[test]
fn a_dataset_brings_the_files_under_its_path_and_training_reads_them_through_the_link() {
    let text = |pattern: &str, n: usize| pattern.repeat(n).into_bytes();
    let hub = FakeHub::start_dataset(vec![
        (".gitattributes".into(), b"*.bin filter=lfs".to_vec()),
        ("README.md".into(), b"# a corpus of two letters".to_vec()),
        ("train/part-0.txt".into(), text("ab", 3000)),
        ("train/more/part-1.txt".into(), text("ba", 3000)),
        ("val/part-0.txt".into(), text("xyz", 1000)),
    ]);
    let dir = TempDir::new("dataset");
    let claim = dir.0.join("claim");
    let link = dir.0.join("pod-0/data");
    let report = fetch_command(
        Command::new(BINARY)
            .args(["fetch", "--repo-type", "dataset", "--repo", REPO])
            .args(["--include", "train", "--into"])
            .arg(&claim)
            .args(["--endpoint", &hub.endpoint, "--link"])
            .arg(&link),
    );
    assert_eq!(report.files, 2);
    let commit_dir = claim.join("datasets").join(REPO).join(&report.commit);
    assert_eq!(std::fs::read_link(&link).unwrap(), commit_dir);
    assert_eq!(
        tree_of(&commit_dir),
        vec!["train/more/part-1.txt", "train/part-0.txt"]
    );
    // The Hub's dataset API and file paths, never the model's.
    let log = hub.state.lock().unwrap().hub_log.clone();
    assert!(
        log.iter()
            .all(|(u, _)| u.starts_with("/api/datasets/") || u.starts_with("/datasets/")),
        "{log:?}"
    );

    let config: moe_crds::WorkerConfig = serde_json::from_value(serde_json::json!({
        "job": "local/hub-data",
        "model": {"hiddenSize": 32, "layers": 2, "attentionHeads": 4, "kvHeads": 2, "seqLen": 32,
                  "moe": {"experts": 4, "topK": 2, "expertHiddenSize": 32}},
        "data": {"huggingface": {"repo": REPO, "path": "train"}},
        "training": {"steps": 3, "globalBatchSize": 4, "microBatchSize": 2},
        "parallelism": {},
        "checkpoint": {"dir": dir.0.join("ckpt"), "intervalSteps": 3, "keep": 1, "resume": "Never"},
        "device": "cpu",
        "dataDir": link,
        "outputDir": dir.0.join("out"),
    }))
    .unwrap();
    let summary =
        moe_worker::run::train(&config, &std::sync::atomic::AtomicBool::new(false)).unwrap();
    assert_eq!(summary.steps, 3);
    assert!(
        (summary.unigram_entropy - std::f64::consts::LN_2).abs() < 1e-3,
        "trained on other tokens than train/'s: unigram entropy {}",
        summary.unigram_entropy
    );
}

/// A PEFT adapter (`--repo-type adapter`): its config and safetensors
/// alone, from the model API, and the server serves it beside the model;
/// a repo with only the pickled weights, or no adapter config, is refused
/// naming what it lacks.
#[test]
fn an_adapter_brings_its_config_and_safetensors_and_is_served_beside_its_model() {
    let adapter = fixture("qwen3_moe_lora");
    let file = |name: &str| (name.to_string(), std::fs::read(adapter.join(name)).unwrap());
    let hub = FakeHub::start();
    let files = vec![
        file("adapter_config.json"),
        file("adapter_model.safetensors"),
        ("README.md".into(), b"# an adapter".to_vec()),
        ("adapter_model.bin".into(), vec![7; 64]),
        (
            "checkpoint-100/adapter_model.safetensors".into(),
            vec![9; 64],
        ),
    ];
    {
        let mut state = hub.state.lock().unwrap();
        let main = state.main.clone();
        state.commits.insert(main, files.clone());
    }
    let dir = TempDir::new("adapter");
    let link = dir.0.join("pod-0/adapter");
    let report = fetch_command(
        Command::new(BINARY)
            .args(["fetch", "--repo-type", "adapter", "--repo", REPO, "--into"])
            .arg(dir.0.join("claim"))
            .args(["--endpoint", &hub.endpoint, "--link"])
            .arg(&link),
    );
    assert_eq!(report.files, 2);
    assert_eq!(
        tree_of(&std::fs::canonicalize(&link).unwrap()),
        ["adapter_config.json", "adapter_model.safetensors"]
    );
    let log = hub.state.lock().unwrap().hub_log.clone();
    assert!(
        log.iter().all(|(u, _)| !u.starts_with("/api/datasets/")),
        "{log:?}"
    );
    // Served beside the model it adapts.
    let engine = moe_worker::serve::engine::Engine::serve(
        moe_worker::serve::load::load(&fixture("qwen3_moe"), None, None)
            .unwrap()
            .model
            .into_serve_model(),
    );
    let source = moe_worker::serve::adapters::AdapterSource {
        name: "tuned".into(),
        dir: link.clone(),
    };
    let loaded = moe_worker::serve::adapters::load(&source, &engine.adapter_shape()).unwrap();
    assert!(
        loaded.modules().iter().any(|m| m == "experts.up_proj"),
        "{:?}",
        loaded.modules()
    );
    // By hand: `--lora NAME=hf://…` downloads it into the cache first.
    let cache = TempDir::new("adapter-uri");
    let port = moe_worker::dist::launch::free_local_port().unwrap();
    let mut server = Command::new(BINARY)
        .arg("serve")
        .arg("--model")
        .arg(fixture("qwen3_moe"))
        .args([
            "--lora",
            &format!("tuned=hf://{REPO}@main"),
            "--host",
            "127.0.0.1",
        ])
        .args(["--port", &port.to_string(), "--kv-cache-mib", "4"])
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("MOE_HF_CACHE", &cache.0)
        .env("MOE_STATUS_ADDR", "off")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let body = r#"{"model": "tuned", "prompt": "Hello", "max_tokens": 3, "temperature": 0}"#;
    let reply = until_ok(&mut server, port, "POST", "/v1/completions", body);
    let _ = server.kill();
    let _ = server.wait();
    assert!(reply.contains("\"model\":\"tuned\""), "{reply}");
    let commit = hub.state.lock().unwrap().main.clone();
    assert!(cache.0.join(REPO).join(&commit).join(COMPLETE).is_file());

    for (without, says) in [
        ("adapter_model.safetensors", "adapter_model.bin only"),
        ("adapter_config.json", "has no adapter_config.json"),
    ] {
        {
            let mut state = hub.state.lock().unwrap();
            let main = state.main.clone();
            let kept = files
                .iter()
                .filter(|(p, _)| p != without)
                .cloned()
                .collect();
            state.commits.insert(main, kept);
        }
        let into = TempDir::new("adapter-refused");
        let request = FetchRequest {
            kind: RepoKind::Adapter,
            ..hub.request(&into.0)
        };
        let error = fetch::fetch(&request, None).unwrap_err();
        assert!(
            error.exit_code() == 2 && error.to_string().contains(says),
            "{without}: {error}"
        );
    }
}

/// What a dataset fetch refuses, naming it: a path the repo lacks (a typo
/// must not train on less), a path out of the repo, `--include` for a model
/// or none for a dataset, and a Hub listing a path that climbs out.
#[test]
fn a_dataset_fetch_refuses_missing_and_escaping_paths() {
    let hub = FakeHub::start_dataset(vec![("train/a.txt".into(), b"abc".to_vec())]);
    let dir = TempDir::new("dataset-refusals");
    let request = |include: &[&str], kind: RepoKind| FetchRequest {
        kind,
        include: include.iter().map(|s| s.to_string()).collect(),
        ..hub.request(&dir.0)
    };
    let error = fetch::fetch(&request(&["train", "tets"], RepoKind::Dataset), None).unwrap_err();
    assert_eq!(error.exit_code(), 2, "{error}");
    assert!(
        error
            .to_string()
            .contains("has no file or directory \"tets\""),
        "{error}"
    );
    for (include, kind, says) in [
        (
            &["../train"][..],
            RepoKind::Dataset,
            "not a path inside the repo",
        ),
        (
            &["/train"][..],
            RepoKind::Dataset,
            "not a path inside the repo",
        ),
        (&[][..], RepoKind::Dataset, "needs --include"),
        (&["train"][..], RepoKind::Model, "are what serving reads"),
    ] {
        let error = fetch::fetch(&request(include, kind), None).unwrap_err();
        assert!(
            matches!(error, FetchError::Invalid(_)) && error.to_string().contains(says),
            "{include:?}: {error}"
        );
    }
    // The Hub's listing becomes files here: a path out of the repo fails
    // the fetch before anything is written.
    {
        let mut state = hub.state.lock().unwrap();
        let main = state.main.clone();
        state
            .commits
            .get_mut(&main)
            .unwrap()
            .push(("train/../../../escaped.txt".into(), b"x".to_vec()));
    }
    let error = fetch::fetch(&request(&["train"], RepoKind::Dataset), None).unwrap_err();
    assert!(
        error.to_string().contains("no path inside the repo"),
        "{error}"
    );
    assert!(!dir.0.join("escaped.txt").exists());
    assert!(!dir.0.parent().unwrap().join("escaped.txt").exists());
}

/// A push that changes one file: the next fetch downloads that file only and
/// hard-links the rest from the commit already fetched (same inode, so no
/// second copy on the claim); a donor that changed since its record (here
/// truncated) is not linked but downloaded.
#[test]
fn a_new_commit_links_what_it_shares_with_a_fetched_one_and_downloads_the_rest() {
    use std::os::unix::fs::MetadataExt;
    let hub = FakeHub::start();
    let dir = TempDir::new("dedupe");
    let first = fetch::fetch(&hub.request(&dir.0), None).unwrap();
    let first_dir = dir.0.join(REPO).join(&first.commit);
    // A donor that is no longer what its record says.
    let damaged = "tokenizer.json";
    let bytes = std::fs::read(first_dir.join(damaged)).unwrap();
    std::fs::write(first_dir.join(damaged), &bytes[..bytes.len() / 2]).unwrap();
    let served_before = hub.storage_log().len();

    let second_commit = "beef".repeat(10);
    hub.push_changed_generation_config(&first.commit, &second_commit);
    let second = fetch::fetch(&hub.request(&dir.0), None).unwrap();
    let changed = br#"{"max_new_tokens": 7}"#.len() as u64;
    assert_eq!(second.downloaded, changed + bytes.len() as u64);
    let mut fetched_again: Vec<String> = hub.storage_log()[served_before..]
        .iter()
        .map(|s| s.path.clone())
        .collect();
    fetched_again.sort();
    assert_eq!(fetched_again, vec!["generation_config.json", damaged]);
    let second_dir = dir.0.join(REPO).join(&second_commit);
    for name in files_of(&second_dir) {
        let inode = |d: &Path| std::fs::metadata(d.join(&name)).unwrap().ino();
        let shared = inode(&first_dir) == inode(&second_dir);
        let expect = name != "generation_config.json" && name != damaged && name != COMPLETE;
        assert_eq!(shared, expect, "{name}");
    }
    assert_eq!(std::fs::read(second_dir.join(damaged)).unwrap(), bytes);
    // The second commit, served, is whole.
    assert!(fetch::fetched(&second.dir).is_some());
}
