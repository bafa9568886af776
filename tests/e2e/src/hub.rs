//! A Hugging Face Hub on loopback, for tests that play the kubelet for a
//! pod's `download` init container (the real `moe-worker fetch`): one
//! repository, a model or a dataset, whose `main` names a commit the test
//! can move; or a Hub that refuses everything, as it answers for a gated
//! repository asked without a token. It speaks the part of the Hub's API the
//! fetch uses (worker/src/fetch.rs): a revision's commit, a commit's tree
//! with each file's git blob sha1, and the files.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use serde_json::json;
use sha1::Digest;

/// Files by path, of one commit.
pub type Files = Vec<(String, Vec<u8>)>;

#[derive(Default)]
struct State {
    main: String,
    commits: BTreeMap<String, Files>,
    refuse: bool,
}

pub struct FakeHub {
    /// `http://127.0.0.1:<port>`, for `spec.…huggingface.endpoint`.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    /// A Hub whose `main` is `commit`, holding `files`.
    pub fn start(commit: &str, files: Files) -> Result<Self> {
        Self::serve(State {
            main: commit.into(),
            commits: BTreeMap::from([(commit.to_string(), files)]),
            refuse: false,
        })
    }

    /// A Hub that answers 401 to everything.
    pub fn refusing() -> Result<Self> {
        Self::serve(State {
            refuse: true,
            ..State::default()
        })
    }

    /// Adds `commit` holding `files` and points `main` at it (a push).
    pub fn push(&self, commit: &str, files: Files) {
        if let Ok(mut state) = self.state.lock() {
            state.commits.insert(commit.into(), files);
            state.main = commit.into();
        }
    }

    fn serve(state: State) -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(state));
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // The headers: none matters here.
                let mut header = String::new();
                while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                    header.clear();
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let (status, body) = match shared.lock() {
                    Ok(state) => answer(&state, &path),
                    Err(_) => ("500 Internal Server Error", b"{}".to_vec()),
                };
                let mut stream = &stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
            }
        });
        Ok(Self { endpoint, state })
    }
}

/// `blob <size>\0<content>`'s sha1, as the Hub lists a file that is not LFS.
fn git_blob_sha1(bytes: &[u8]) -> String {
    let mut blob = sha1::Sha1::new();
    blob.update(format!("blob {}\0", bytes.len()).as_bytes());
    blob.update(bytes);
    blob.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn answer(state: &State, path: &str) -> (&'static str, Vec<u8>) {
    if state.refuse {
        return ("401 Unauthorized", b"{}".to_vec());
    }
    let path = path.split('?').next().unwrap_or("");
    if path.contains("/revision/") {
        return (
            "200 OK",
            json!({"sha": state.main}).to_string().into_bytes(),
        );
    }
    if let Some((_, commit)) = path.split_once("/tree/") {
        let Some(files) = state.commits.get(commit) else {
            return ("404 Not Found", b"{}".to_vec());
        };
        let tree: Vec<_> = files
            .iter()
            .map(|(path, bytes)| {
                json!({"type": "file", "path": path, "size": bytes.len(), "oid": git_blob_sha1(bytes)})
            })
            .collect();
        return ("200 OK", json!(tree).to_string().into_bytes());
    }
    if let Some((_, rest)) = path.split_once("/resolve/")
        && let Some((commit, file)) = rest.split_once('/')
        && let Some((_, bytes)) = state
            .commits
            .get(commit)
            .and_then(|files| files.iter().find(|(p, _)| p == file))
    {
        return ("200 OK", bytes.clone());
    }
    ("404 Not Found", b"{}".to_vec())
}
