//! Downloads from a Hugging Face Hub: a local HTTP server answers the routes the Hub
//! serves (the revision's file list, HEAD of a file with its etag and a redirect, ranges,
//! a 401 for a gated dataset, a transfer cut short), and `corpusdb ingest --download`
//! fetches into the cache layout and imports from it.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use corpusdb::hub::{Hub, HubError, RemoteFile};

use crate::util::{corpusdb, run_ok};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_secret";

fn train_bytes() -> Vec<u8> {
    (0..40)
        .map(|i| {
            format!(
                "{{\"instruction\": \"Add {i} and {i}.\", \"output\": \"{}\"}}\n",
                2 * i
            )
        })
        .collect::<String>()
        .into_bytes()
}

fn test_bytes() -> Vec<u8> {
    b"{\"instruction\": \"Name a colour.\", \"output\": \"Blue.\"}\n".to_vec()
}

/// What the server saw: each request's method, path and Range/Authorization headers.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    range: Option<String>,
    authorization: Option<String>,
}

struct Server {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// A Hub on 127.0.0.1: `org/chat` (public; `data/train.jsonl` is a large file behind a
/// redirect whose first full transfer stops halfway, `data/test.jsonl` a small one, and a
/// README that is not data) and `org/gated` (401 without the token).
fn serve() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut cut_once = true;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = answer(stream, &log, &mut cut_once);
        }
    });
    Server { url, seen }
}

fn answer(
    mut stream: TcpStream,
    log: &Mutex<Vec<Seen>>,
    cut_once: &mut bool,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let (mut range, mut authorization) = (None, None);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((&header, ""));
        match name.trim().to_ascii_lowercase().as_str() {
            "range" => range = Some(value.trim().to_string()),
            "authorization" => authorization = Some(value.trim().to_string()),
            _ => {}
        }
    }
    log.lock().unwrap().push(Seen {
        path: path.clone(),
        range: range.clone(),
        authorization: authorization.clone(),
    });
    let head = method == "HEAD";
    let mut reply = |status: &str, headers: &[(&str, String)], body: &[u8], send: usize| {
        let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (name, value) in headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        {
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        out.push_str("\r\n");
        stream.write_all(out.as_bytes())?;
        if !head {
            stream.write_all(&body[..send.min(body.len())])?;
        }
        stream.flush()
    };
    let listing = |files: &[&str]| {
        let siblings: Vec<_> = files
            .iter()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string()
    };
    let train = train_bytes();
    let test = test_bytes();
    let resolve = format!("/datasets/org/chat/resolve/{COMMIT}/");
    match path.as_str() {
        "/api/datasets/org/chat/revision/main" => {
            let body = listing(&["README.md", "data/train.jsonl", "data/test.jsonl"]);
            reply("200 OK", &[], body.as_bytes(), usize::MAX)
        }
        "/api/datasets/org/gated/revision/main" => {
            if authorization.as_deref() == Some(&format!("Bearer {TOKEN}")) {
                let body = listing(&["data.jsonl"]);
                reply("200 OK", &[], body.as_bytes(), usize::MAX)
            } else {
                reply("401 Unauthorized", &[], b"", 0)
            }
        }
        p if p == format!("{resolve}data/train.jsonl") => reply(
            "302 Found",
            &[
                ("Location", "/cdn/train-blob".into()),
                ("X-Repo-Commit", COMMIT.into()),
                ("X-Linked-Etag", "\"sha256-train\"".into()),
                ("X-Linked-Size", train.len().to_string()),
            ],
            b"",
            0,
        ),
        p if p == format!("{resolve}data/test.jsonl") => reply(
            "200 OK",
            &[("ETag", "\"test-etag\"".into())],
            &test,
            usize::MAX,
        ),
        "/cdn/train-blob" => match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
            Some(from) => {
                let from: usize = from.trim_end_matches('-').parse().unwrap();
                let rest = &train[from..];
                reply(
                    "206 Partial Content",
                    &[(
                        "Content-Range",
                        format!("bytes {from}-{}/{}", train.len() - 1, train.len()),
                    )],
                    rest,
                    usize::MAX,
                )
            }
            None => {
                // The first full transfer stops halfway: the connection closes early.
                let send = if std::mem::take(cut_once) {
                    train.len() / 2
                } else {
                    usize::MAX
                };
                reply("200 OK", &[], &train, send)
            }
        },
        _ => reply("404 Not Found", &[], b"", 0),
    }
}

#[test]
fn a_download_fills_the_cache_layout_and_resumes_a_cut_transfer() {
    let server = serve();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(&server.url, None);
    let (commit, files) = hub.dataset_files("org/chat", "main").unwrap();
    assert_eq!(commit, COMMIT);
    let wanted: Vec<RemoteFile> = files
        .into_iter()
        .filter(|f| corpusdb::registry::hub_file_wanted("**", &f.path))
        .collect();
    assert_eq!(
        wanted.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["data/train.jsonl", "data/test.jsonl"],
        "the README is not data"
    );

    // The first attempt stops halfway through the large file and keeps its bytes.
    let error = hub
        .download(
            cache.path(),
            "org/chat",
            "main",
            &commit,
            &wanted,
            |_, _| {},
        )
        .unwrap_err();
    assert!(matches!(error, HubError::Transport { .. }), "{error}");
    assert!(error.to_string().contains("run again"), "{error}");
    let dataset = cache.path().join("datasets--org--chat");
    let partial = dataset.join("blobs/sha256-train.incomplete");
    let half = std::fs::metadata(&partial).unwrap().len();
    assert_eq!(half, train_bytes().len() as u64 / 2);

    // The second asks for the rest only.
    let paths = hub
        .download(
            cache.path(),
            "org/chat",
            "main",
            &commit,
            &wanted,
            |_, _| {},
        )
        .unwrap();
    let seen = server.seen.lock().unwrap().clone();
    let ranges: Vec<_> = seen
        .iter()
        .filter(|s| s.path == "/cdn/train-blob")
        .map(|s| s.range.clone())
        .collect();
    assert_eq!(ranges, [None, Some(format!("bytes={half}-"))]);
    assert!(
        seen.iter().all(|s| s.authorization.is_none()),
        "no token, none sent"
    );

    // The layout `huggingface_hub` writes: blobs by etag, snapshot links, the ref.
    let snapshot = dataset.join("snapshots").join(COMMIT);
    assert_eq!(
        paths,
        [
            snapshot.join("data/train.jsonl"),
            snapshot.join("data/test.jsonl")
        ]
    );
    assert_eq!(std::fs::read(&paths[0]).unwrap(), train_bytes());
    assert_eq!(std::fs::read(&paths[1]).unwrap(), test_bytes());
    assert_eq!(
        std::fs::read_link(&paths[0]).unwrap(),
        std::path::Path::new("../../../blobs/sha256-train")
    );
    assert!(!partial.exists());
    assert_eq!(
        std::fs::read_to_string(dataset.join("refs/main")).unwrap(),
        COMMIT
    );
    // What the cache reader finds is what was downloaded.
    let found = corpusdb::registry::hub_cache_files(cache.path(), "org/chat").unwrap();
    assert_eq!(found.len(), 2);

    // A third run fetches nothing: the snapshot has both files.
    let before = server.seen.lock().unwrap().len();
    hub.download(
        cache.path(),
        "org/chat",
        "main",
        &commit,
        &wanted,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(server.seen.lock().unwrap().len(), before);
}

#[test]
fn a_gated_dataset_needs_the_token_and_says_so() {
    let server = serve();
    let error = Hub::new(&server.url, None)
        .dataset_files("org/gated", "main")
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("401") && message.contains("HF_TOKEN"),
        "{message}"
    );
    let (_, files) = Hub::new(&server.url, Some(TOKEN.into()))
        .dataset_files("org/gated", "main")
        .unwrap();
    assert_eq!(
        files,
        [RemoteFile {
            path: "data.jsonl".into()
        }]
    );
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(
        seen.last().unwrap().authorization.as_deref(),
        Some("Bearer hf_secret")
    );
}

#[test]
fn ingest_download_fetches_then_imports_and_the_counts_add_up() {
    let server = serve();
    let dir = tempfile::tempdir().unwrap();
    let (store, cache) = (dir.path().join("store"), dir.path().join("hub"));
    let ingest = |extra: &[&str]| {
        let mut cmd = corpusdb(&store);
        cmd.env("HF_ENDPOINT", &server.url)
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_TOKEN")
            .args([
                "ingest",
                "hf:org/chat/data",
                "--source",
                "chat",
                "--category",
                "general",
            ])
            .args(extra);
        cmd.output().unwrap()
    };
    // Without --download the cache is empty and the message says how to fill it.
    let output = ingest(&[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--download"), "{stderr}");
    // The first download is cut short: the command fails and says to run again.
    let output = ingest(&["--download"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("run again"), "{stderr}");
    // The second resumes and imports all 41 records.
    let output = ingest(&["--download"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stats = run_ok(corpusdb(&store).args(["stats", "--json"]));
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["examples"], 41, "{stats}");
}

#[test]
fn hub_paths_pick_readable_files_under_the_pattern() {
    use corpusdb::registry::hub_file_wanted;
    assert!(hub_file_wanted("**", "data/train-00000-of-00002.parquet"));
    assert!(hub_file_wanted("main", "main/test.jsonl"));
    assert!(hub_file_wanted("main/*.parquet", "main/test-0.parquet"));
    assert!(!hub_file_wanted("main", "socratic/test.jsonl"));
    assert!(!hub_file_wanted("**", "README.md"));
    assert!(!hub_file_wanted("**", ".gitattributes"));
}

#[test]
fn a_registry_downloads_its_missing_hub_sources() {
    let server = serve();
    let dir = tempfile::tempdir().unwrap();
    let (store, cache, data) = (
        dir.path().join("store"),
        dir.path().join("hub"),
        dir.path().join("data"),
    );
    std::fs::create_dir(&data).unwrap();
    let registry = crate::util::write(
        dir.path(),
        "sources.yaml",
        b"sources:\n  - name: chat\n    hub: org/chat/data\n    category: general\n",
    );
    let run = || {
        let mut cmd = corpusdb(&store);
        cmd.env("HF_ENDPOINT", &server.url)
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_TOKEN")
            .arg("ingest")
            .arg("--registry")
            .arg(&registry)
            .arg("--data-dir")
            .arg(&data)
            .arg("--download");
        cmd.output().unwrap()
    };
    // Cut short once, then resumed and imported.
    assert!(!run().status.success());
    let output = run();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stats = run_ok(corpusdb(&store).args(["stats", "--json"]));
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["examples"], 41, "{stats}");
}
