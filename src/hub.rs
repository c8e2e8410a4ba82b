//! Downloads from the Hugging Face Hub into the cache layout the Python libraries use, so
//! that `hf:ORG/NAME` finds them afterwards and `datasets`/`huggingface_hub` reuse them:
//!
//! ```text
//! <cache>/datasets--ORG--NAME/refs/<revision>            the commit the revision names
//! <cache>/datasets--ORG--NAME/blobs/<etag>               one file's bytes
//! <cache>/datasets--ORG--NAME/snapshots/<commit>/<path>  a relative link to its blob
//! ```
//!
//! The routes are the Hub's: `GET /api/datasets/ORG/NAME/revision/REV` (the commit and the
//! file list), `HEAD /datasets/ORG/NAME/resolve/REV/PATH` (the blob's etag, size and, for
//! large files, a redirect to where the bytes are), then `GET` of the bytes. A transfer
//! that stops keeps its bytes in `blobs/<etag>.incomplete` and the next run asks for the
//! rest with a `Range` header. `HF_ENDPOINT` replaces `https://huggingface.co`; `HF_TOKEN`
//! (else the token file `HF_HOME/token`) is sent to the endpoint, never to the host a
//! redirect names.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What can go wrong talking to the Hub, with the URL or path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{url}: {status} {reason}{hint}")]
    Status {
        url: String,
        status: u16,
        reason: String,
        hint: &'static str,
    },
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{url}: {message}")]
    Invalid { url: String, message: String },
}

/// One file of a dataset repository, as the Hub lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    pub path: String,
}

/// A client of the Hub's dataset routes.
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// Redirects followed for one file before giving up.
const MAX_REDIRECTS: usize = 5;

impl Hub {
    /// The endpoint of `HF_ENDPOINT` (default `https://huggingface.co`) with the token of
    /// `HF_TOKEN`, else of the token file in `HF_HOME` (`~/.cache/huggingface/token`).
    pub fn from_env() -> Hub {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
        let token = var("HF_TOKEN").or_else(|| {
            let home = var("HF_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")))?;
            std::fs::read_to_string(home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        Hub::new(&endpoint, token)
    }

    pub fn new(endpoint: &str, token: Option<String>) -> Hub {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(120))
            .user_agent(concat!("corpusdb/", env!("CARGO_PKG_VERSION")))
            .build();
        Hub {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let request = self.agent.request(method, url);
        match &self.token {
            // The token goes to the endpoint only, not to a host a redirect names.
            Some(token) if url.starts_with(&self.endpoint) => {
                request.set("Authorization", &format!("Bearer {token}"))
            }
            _ => request,
        }
    }

    fn call(&self, request: ureq::Request, url: &str) -> Result<ureq::Response, HubError> {
        match request.call() {
            Ok(response) => Ok(response),
            Err(ureq::Error::Status(status, response)) if (300..400).contains(&status) => {
                Ok(response)
            }
            Err(ureq::Error::Status(status, response)) => Err(HubError::Status {
                url: url.to_string(),
                status,
                reason: response.status_text().to_string(),
                hint: match status {
                    401 | 403 => {
                        " (a gated or private dataset: accept its terms on the Hub and set HF_TOKEN)"
                    }
                    404 => " (no such dataset, revision or file)",
                    _ => "",
                },
            }),
            Err(error) => Err(HubError::Transport {
                url: url.to_string(),
                message: error.to_string(),
            }),
        }
    }

    /// The commit `revision` names in dataset `repo` (`ORG/NAME`) and the files it holds.
    pub fn dataset_files(
        &self,
        repo: &str,
        revision: &str,
    ) -> Result<(String, Vec<RemoteFile>), HubError> {
        let url = format!("{}/api/datasets/{repo}/revision/{revision}", self.endpoint);
        let response = self.call(self.request("GET", &url), &url)?;
        let invalid = |message: String| HubError::Invalid {
            url: url.clone(),
            message,
        };
        let info: serde_json::Value = serde_json::from_reader(response.into_reader())
            .map_err(|e| invalid(format!("not a JSON answer: {e}")))?;
        let commit = info["sha"]
            .as_str()
            .ok_or_else(|| invalid("the answer names no commit (`sha`)".into()))?
            .to_string();
        let files = info["siblings"]
            .as_array()
            .ok_or_else(|| invalid("the answer lists no files (`siblings`)".into()))?
            .iter()
            .filter_map(|s| s["rfilename"].as_str())
            .map(|path| RemoteFile { path: path.into() })
            .collect();
        Ok((commit, files))
    }

    /// Downloads `files` of dataset `repo` at `commit` into `cache` (skipping those its
    /// snapshot already has, resuming an interrupted blob) and points `refs/<revision>` at
    /// the commit. Returns the snapshot paths, in the order of `files`; `progress` hears
    /// each file's path and size before its bytes.
    pub fn download(
        &self,
        cache: &Path,
        repo: &str,
        revision: &str,
        commit: &str,
        files: &[RemoteFile],
        mut progress: impl FnMut(&str, Option<u64>),
    ) -> Result<Vec<PathBuf>, HubError> {
        let dataset = cache.join(format!("datasets--{}", repo.replace('/', "--")));
        let snapshot = dataset.join("snapshots").join(commit);
        let mut out = Vec::with_capacity(files.len());
        for file in files {
            if file
                .path
                .split('/')
                .any(|part| part == ".." || part.is_empty())
            {
                return Err(HubError::Invalid {
                    url: repo.to_string(),
                    message: format!("a file path that leaves the dataset: {}", file.path),
                });
            }
            let target = snapshot.join(&file.path);
            if !target.exists() {
                let url = format!(
                    "{}/datasets/{repo}/resolve/{commit}/{}",
                    self.endpoint, file.path
                );
                self.fetch_file(&dataset, &url, &target, &file.path, &mut progress)?;
            }
            out.push(target);
        }
        let refs = dataset.join("refs");
        create_dir(&refs)?;
        let refs_file = refs.join(revision);
        std::fs::write(&refs_file, commit).map_err(|source| HubError::Io {
            path: refs_file,
            source,
        })?;
        Ok(out)
    }

    /// One file: its blob's etag and size from a `HEAD` of `url`, the bytes into
    /// `blobs/<etag>` (resumed from `<etag>.incomplete`), then the snapshot's link.
    fn fetch_file(
        &self,
        dataset: &Path,
        url: &str,
        target: &Path,
        name: &str,
        progress: &mut impl FnMut(&str, Option<u64>),
    ) -> Result<(), HubError> {
        let head = self.call(self.request("HEAD", url), url)?;
        let header = |name: &str| head.header(name).map(str::to_string);
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
            .filter(|e| !e.is_empty() && !e.contains(['/', '\\']))
            .ok_or_else(|| HubError::Invalid {
                url: url.into(),
                message: "the answer has no ETag to name the file's blob".into(),
            })?;
        let size = header("x-linked-size")
            .or_else(|| header("content-length"))
            .and_then(|s| s.parse::<u64>().ok());
        let location = match head.status() {
            300..=399 => Some(resolve_location(
                url,
                &header("location").unwrap_or_default(),
            )),
            _ => None,
        };
        progress(name, size);
        let blobs = dataset.join("blobs");
        create_dir(&blobs)?;
        let blob = blobs.join(&etag);
        if !blob.exists() {
            let partial = blobs.join(format!("{etag}.incomplete"));
            self.fetch_bytes(location.as_deref().unwrap_or(url), &partial, size)?;
            std::fs::rename(&partial, &blob).map_err(|source| HubError::Io {
                path: blob.clone(),
                source,
            })?;
        }
        link_blob(&blob, target)
    }

    /// The bytes at `url` appended to `partial` from its current length (a `Range`
    /// request when it has some), following redirects; checks the total against `size`.
    fn fetch_bytes(&self, url: &str, partial: &Path, size: Option<u64>) -> Result<(), HubError> {
        let io = |source| HubError::Io {
            path: partial.to_owned(),
            source,
        };
        let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        if size.is_some_and(|size| have >= size) {
            return Ok(());
        }
        let mut url = url.to_string();
        let response = 'redirects: {
            for _ in 0..=MAX_REDIRECTS {
                let mut request = self.request("GET", &url);
                if have > 0 {
                    request = request.set("Range", &format!("bytes={have}-"));
                }
                let response = self.call(request, &url)?;
                if (300..400).contains(&response.status()) {
                    let location = response.header("location").unwrap_or_default().to_string();
                    url = resolve_location(&url, &location);
                    continue;
                }
                break 'redirects response;
            }
            return Err(HubError::Invalid {
                url,
                message: format!("more than {MAX_REDIRECTS} redirects"),
            });
        };
        // 206: the rest after `have`; 200: the whole file again (the server ignored Range).
        let append = response.status() == 206 && have > 0;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(partial)
            .map_err(io)?;
        let mut reader = response.into_reader();
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let n = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    file.flush().map_err(io)?;
                    return Err(HubError::Transport {
                        url,
                        message: format!(
                            "the transfer stopped ({error}); run again to resume from {} bytes",
                            std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0)
                        ),
                    });
                }
            };
            file.write_all(&buffer[..n]).map_err(io)?;
        }
        file.flush().map_err(io)?;
        drop(file);
        let got = std::fs::metadata(partial).map_err(io)?.len();
        if let Some(size) = size {
            if got != size {
                return Err(HubError::Transport {
                    url,
                    message: format!(
                        "the transfer ended at {got} of {size} bytes; run again to resume"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// A redirect's target: absolute, or relative to `base`'s host.
fn resolve_location(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{}", &base[..host_end], location.trim_start_matches('/'))
}

fn create_dir(dir: &Path) -> Result<(), HubError> {
    std::fs::create_dir_all(dir).map_err(|source| HubError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// The snapshot's entry for a blob: a relative link (`../../blobs/<etag>` from the top of
/// the snapshot) as `huggingface_hub` makes it, or a copy where links are not allowed.
fn link_blob(blob: &Path, target: &Path) -> Result<(), HubError> {
    let io = |source| HubError::Io {
        path: target.to_owned(),
        source,
    };
    if let Some(parent) = target.parent() {
        create_dir(parent)?;
    }
    let _ = std::fs::remove_file(target);
    #[cfg(unix)]
    {
        // target = <dataset>/snapshots/<commit>/<path>: up to <dataset>, then blobs/<etag>.
        let dataset = blob
            .parent()
            .and_then(Path::parent)
            .expect("blobs/<etag> inside the dataset");
        let depth = target
            .strip_prefix(dataset)
            .map(|p| p.components().count())
            .unwrap_or(3);
        let mut relative = PathBuf::new();
        for _ in 1..depth {
            relative.push("..");
        }
        relative.push("blobs");
        relative.push(blob.file_name().expect("a blob has a name"));
        if std::os::unix::fs::symlink(&relative, target).is_ok() {
            return Ok(());
        }
    }
    std::fs::copy(blob, target).map(|_| ()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::resolve_location;

    #[test]
    fn redirects_resolve_against_the_host() {
        assert_eq!(
            resolve_location("http://127.0.0.1:9/datasets/a/b/resolve/main/x", "/cdn/1"),
            "http://127.0.0.1:9/cdn/1"
        );
        assert_eq!(
            resolve_location("https://hf.co/x", "https://cdn.example/y?z=1"),
            "https://cdn.example/y?z=1"
        );
    }
}
