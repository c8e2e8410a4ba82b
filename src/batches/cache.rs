//! The token cache: every example's rendered token ids and loss mask for one tokenizer
//! and template, written sequentially by `corpusdb tokenize` and read in place by
//! `batches` and `train`, so that streaming a plan does no random reads on the store and
//! no tokenizing.
//!
//! One directory per [`ChatTokenizer::fingerprint`] under `<store>/tokens/`:
//!
//! - `tokens.bin`: little-endian u32 per token, the id with bit 31 set when the token is
//!   trained, examples one after another in ordinal order;
//! - `offsets.bin`: little-endian u64, `examples + 1` token offsets (example `o` is
//!   `tokens[offsets[o]..offsets[o + 1]]`);
//! - `skipped.jsonl`: the examples that could not be encoded, with the reason (they
//!   have no tokens);
//! - `meta.json`: how many examples and tokens are covered, the hashes of the first and
//!   last covered examples (a cache of another store is not used), what made it.
//!
//! Ordinals only grow, so a later `tokenize` extends the cache with the examples imported
//! since; examples past its end are encoded from the store on the fly. Data files are
//! synced before `meta.json` is replaced, and a reader or a resumed `tokenize` trusts only
//! what `meta.json` covers, so a killed `tokenize` loses at most its last chunk.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{ChatTokenizer, Tokenized};
use crate::conversation::ContentHash;
use crate::store::{self, Store};

const TRAINED_BIT: u32 = 1 << 31;
/// Examples read, encoded and appended together.
const CHUNK: usize = 8192;
/// Examples between two syncs of the data files and `meta.json`.
const SYNC_EVERY: u64 = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("token cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token cache {path} is being written by another process")]
    Busy { path: PathBuf },
    #[error("tokenizer {origin}: token id {id} does not fit the cache's 31 bits")]
    IdTooLarge { origin: String, id: u32 },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Meta {
    version: u32,
    fingerprint: String,
    /// Examples covered: ordinals `0..examples`.
    examples: u64,
    tokens: u64,
    skipped: u64,
    /// Hex hashes at ordinal 0 and `examples - 1`.
    first_hash: String,
    last_hash: String,
    /// The template's origin, for people reading the file.
    tokenizer: String,
}

const META_VERSION: u32 = 1;

/// The directory of `tokenizer`'s cache for the store at `store_path`.
pub fn cache_dir(store_path: &Path, tokenizer: &ChatTokenizer) -> PathBuf {
    store_path.join("tokens").join(tokenizer.fingerprint())
}

/// A token cache open for reading; covers ordinals `0..examples()`.
pub struct TokenCache {
    dir: PathBuf,
    meta: Meta,
    /// `None` when the cache holds no tokens (an empty file cannot be mapped).
    tokens: Option<Mmap>,
    offsets: Mmap,
    skipped: HashMap<u64, String>,
}

impl TokenCache {
    /// The cache of `tokenizer` for `store`, if one was written and belongs to this
    /// store; `None` otherwise (the batches then encode from the store).
    pub fn open(store: &Store, tokenizer: &ChatTokenizer) -> Result<Option<TokenCache>, Error> {
        let dir = cache_dir(store.path(), tokenizer);
        let Some(meta) = read_meta(&dir)? else {
            return Ok(None);
        };
        if meta.examples == 0 || !covers_this_store(store, &meta)? {
            return Ok(None);
        }
        let map = |name: &str, len: u64| -> Result<Option<Mmap>, Error> {
            let path = dir.join(name);
            let file = File::open(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let size = file.metadata().map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            if size.len() < len {
                return Err(Error::Io {
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{} bytes, meta.json covers {len}", size.len()),
                    ),
                });
            }
            if len == 0 {
                return Ok(None);
            }
            // Safety: the files are only appended to (by `tokenize`, under its lock) and
            // truncated back to what `meta.json` covered, never below what this map
            // reads; another program shortening them would be a damaged cache.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io { path, source })?;
            Ok(Some(map))
        };
        let offsets = map("offsets.bin", (meta.examples + 1) * 8)?.expect("at least one offset");
        // Read whole, ahead (8 bytes an example): every batch looks up offsets at random.
        let _ = offsets.advise(Advice::WillNeed);
        let tokens = map("tokens.bin", meta.tokens * 4)?;
        if let Some(tokens) = &tokens {
            let _ = tokens.advise(Advice::Random);
        }
        let skipped = read_skipped(&dir, meta.examples)?;
        Ok(Some(TokenCache {
            dir,
            meta,
            tokens,
            offsets,
            skipped,
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Examples covered: ordinals `0..examples()`.
    pub fn examples(&self) -> u64 {
        self.meta.examples
    }

    pub fn tokens(&self) -> u64 {
        self.meta.tokens
    }

    fn range(&self, ordinal: u64) -> (usize, usize) {
        let at = |i: u64| {
            let i = i as usize * 8;
            u64::from_le_bytes(self.offsets[i..i + 8].try_into().expect("8 bytes")) as usize
        };
        (at(ordinal), at(ordinal + 1))
    }

    /// Tokens of a covered example (0 for one that could not be encoded).
    pub fn len(&self, ordinal: u64) -> usize {
        let (start, end) = self.range(ordinal);
        end - start
    }

    /// Asks the kernel to read the examples' tokens ahead, all at once (a cold cache then
    /// costs one round of parallel reads per batch, not one read after another).
    pub fn prefetch(&self, ordinals: &[u64]) {
        let Some(tokens) = &self.tokens else { return };
        for &ordinal in ordinals {
            if ordinal < self.meta.examples {
                let (start, end) = self.range(ordinal);
                if end > start {
                    let _ = tokens.advise_range(Advice::WillNeed, start * 4, (end - start) * 4);
                }
            }
        }
    }

    /// The example's tokens, or why it could not be encoded; `None` past the cache's end.
    pub fn get(&self, ordinal: u64) -> Option<Result<Tokenized, String>> {
        if ordinal >= self.meta.examples {
            return None;
        }
        if let Some(reason) = self.skipped.get(&ordinal) {
            return Some(Err(reason.clone()));
        }
        let (start, end) = self.range(ordinal);
        let bytes = match &self.tokens {
            Some(tokens) => &tokens[start * 4..end * 4],
            None => &[][..],
        };
        let mut ids = Vec::with_capacity(end - start);
        let mut trained = Vec::with_capacity(end - start);
        for word in bytes.chunks_exact(4) {
            let word = u32::from_le_bytes(word.try_into().expect("4 bytes"));
            ids.push(word & !TRAINED_BIT);
            trained.push(word & TRAINED_BIT != 0);
        }
        Some(Ok(Tokenized { ids, trained }))
    }
}

/// What [`tokenize`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TokenizeReport {
    pub dir: PathBuf,
    /// Examples the cache held before and holds now.
    pub examples_before: u64,
    pub examples: u64,
    pub tokens: u64,
    /// Examples that could not be encoded (in the whole cache).
    pub skipped: u64,
    /// Whether an existing cache could not be used (another store's, or damaged) and was
    /// written again.
    pub rewritten: bool,
}

/// Writes `tokenizer`'s cache for `store`, or extends it with the examples stored since
/// it was written. `progress(done, total)` counts examples encoded in this call.
pub fn tokenize(
    store: &Store,
    tokenizer: &ChatTokenizer,
    progress: &dyn Fn(u64, u64),
) -> Result<TokenizeReport, Error> {
    let dir = cache_dir(store.path(), tokenizer);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let lock_path = dir.join("lock");
    let lock = File::create(&lock_path).map_err(io(&lock_path))?;
    if lock.try_lock().is_err() {
        return Err(Error::Busy { path: dir });
    }
    let mut meta = read_meta(&dir)?.unwrap_or_default();
    let mut rewritten = false;
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    if meta.version != META_VERSION
        || meta.fingerprint != tokenizer.fingerprint()
        || !covers_this_store(store, &meta)?
        || size("tokens.bin") < meta.tokens * 4
        || size("offsets.bin") < (meta.examples + 1) * 8
    {
        rewritten = meta.examples > 0;
        meta = Meta {
            version: META_VERSION,
            fingerprint: tokenizer.fingerprint(),
            tokenizer: tokenizer.origin().to_string(),
            ..Meta::default()
        };
    }
    let examples_before = meta.examples;
    // Back to what meta.json covers: a killed run may have appended more.
    let tokens_path = dir.join("tokens.bin");
    let offsets_path = dir.join("offsets.bin");
    let skipped_path = dir.join("skipped.jsonl");
    let open = |path: &Path, len: u64| -> Result<File, Error> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(path))?;
        file.set_len(len).map_err(io(path))?;
        Ok(file)
    };
    let tokens_file = open(&tokens_path, meta.tokens * 4)?;
    let offsets_file = open(
        &offsets_path,
        if meta.examples == 0 {
            0
        } else {
            (meta.examples + 1) * 8
        },
    )?;
    let mut skipped = read_skipped(&dir, meta.examples)?;
    let mut skipped_order: Vec<u64> = skipped.keys().copied().collect();
    skipped_order.sort_unstable();
    {
        // Rewritten without entries past the covered examples.
        let mut out = BufWriter::new(File::create(&skipped_path).map_err(io(&skipped_path))?);
        for ordinal in &skipped_order {
            write_skipped(&mut out, *ordinal, &skipped[ordinal]).map_err(io(&skipped_path))?;
        }
        out.flush().map_err(io(&skipped_path))?;
    }
    let mut skipped_file = BufWriter::new(
        OpenOptions::new()
            .append(true)
            .open(&skipped_path)
            .map_err(io(&skipped_path))?,
    );
    let mut tokens_out = BufWriter::with_capacity(1 << 20, &tokens_file);
    let mut offsets_out = BufWriter::with_capacity(1 << 16, &offsets_file);
    tokens_out.seek_to_end(&tokens_path)?;
    offsets_out.seek_to_end(&offsets_path)?;
    if meta.examples == 0 {
        offsets_out
            .write_all(&0u64.to_le_bytes())
            .map_err(io(&offsets_path))?;
    }
    let total = store.counters()?.examples;
    let todo = total.saturating_sub(meta.examples);
    let mut done = 0u64;
    let mut since_sync = 0u64;
    let mut ordinals = store.ordinals_from(meta.examples);
    let mut last_hash = None;
    loop {
        let mut chunk: Vec<(u64, ContentHash)> = Vec::with_capacity(CHUNK);
        for item in ordinals.by_ref() {
            let (ordinal, hash) = item?;
            if ordinal >= total {
                break;
            }
            chunk.push((ordinal, hash));
            if chunk.len() == CHUNK {
                break;
            }
        }
        let finished = chunk.is_empty();
        let encoded = encode_chunk(store, tokenizer, &chunk)?;
        for ((ordinal, hash), result) in chunk.iter().zip(encoded) {
            if *ordinal != meta.examples {
                return Err(store::Error::Corrupt {
                    path: store.path().to_owned(),
                    detail: format!("ordinal {} is missing", meta.examples),
                }
                .into());
            }
            match result {
                Ok(tokenized) => {
                    for (&id, &trained) in tokenized.ids.iter().zip(&tokenized.trained) {
                        if id & TRAINED_BIT != 0 {
                            return Err(Error::IdTooLarge {
                                origin: tokenizer.origin().to_string(),
                                id,
                            });
                        }
                        let word = if trained { id | TRAINED_BIT } else { id };
                        tokens_out
                            .write_all(&word.to_le_bytes())
                            .map_err(io(&tokens_path))?;
                    }
                    meta.tokens += tokenized.ids.len() as u64;
                }
                Err(reason) => {
                    write_skipped(&mut skipped_file, *ordinal, &reason)
                        .map_err(io(&skipped_path))?;
                    skipped.insert(*ordinal, reason);
                }
            }
            offsets_out
                .write_all(&meta.tokens.to_le_bytes())
                .map_err(io(&offsets_path))?;
            if meta.examples == 0 {
                meta.first_hash = hash.to_hex();
            }
            meta.examples += 1;
            last_hash = Some(*hash);
        }
        done += chunk.len() as u64;
        since_sync += chunk.len() as u64;
        progress(done, todo);
        if finished || since_sync >= SYNC_EVERY {
            since_sync = 0;
            sync(
                &dir,
                &mut meta,
                last_hash,
                skipped.len(),
                [
                    (&mut tokens_out, &tokens_path),
                    (&mut offsets_out, &offsets_path),
                ],
                &mut skipped_file,
                &skipped_path,
            )?;
        }
        if finished {
            break;
        }
    }
    Ok(TokenizeReport {
        dir,
        examples_before,
        examples: meta.examples,
        tokens: meta.tokens,
        skipped: meta.skipped,
        rewritten,
    })
}

trait SeekToEnd {
    fn seek_to_end(&mut self, path: &Path) -> Result<(), Error>;
}

impl SeekToEnd for BufWriter<&File> {
    fn seek_to_end(&mut self, path: &Path) -> Result<(), Error> {
        use std::io::Seek;
        self.seek(std::io::SeekFrom::End(0))
            .map(|_| ())
            .map_err(|source| Error::Io {
                path: path.to_owned(),
                source,
            })
    }
}

/// Syncs the data files, then replaces `meta.json` so that it covers what they hold.
fn sync(
    dir: &Path,
    meta: &mut Meta,
    last_hash: Option<ContentHash>,
    skipped: usize,
    data: [(&mut BufWriter<&File>, &PathBuf); 2],
    skipped_file: &mut BufWriter<File>,
    skipped_path: &Path,
) -> Result<(), Error> {
    for (out, path) in data {
        out.flush()
            .and_then(|()| out.get_ref().sync_data())
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
    }
    skipped_file
        .flush()
        .and_then(|()| skipped_file.get_ref().sync_data())
        .map_err(|source| Error::Io {
            path: skipped_path.to_owned(),
            source,
        })?;
    if let Some(hash) = last_hash {
        meta.last_hash = hash.to_hex();
    }
    meta.skipped = skipped as u64;
    let path = dir.join("meta.json");
    let tmp = dir.join("meta.json.tmp");
    let text = serde_json::to_string_pretty(meta).expect("meta serialises");
    std::fs::write(&tmp, text)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| Error::Io { path, source })
}

/// The chunk's examples read from the store (ascending ordinals: the bodies' order, one
/// seeking iterator) and encoded in parallel, in the chunk's order.
fn encode_chunk(
    store: &Store,
    tokenizer: &ChatTokenizer,
    chunk: &[(u64, ContentHash)],
) -> Result<Vec<Result<Tokenized, String>>, Error> {
    let ordinals: Vec<u64> = chunk.iter().map(|(ordinal, _)| *ordinal).collect();
    let mut conversations = Vec::with_capacity(chunk.len());
    store.for_each_at(&ordinals, |_, found| {
        conversations.push(found.map(|(_, example)| example.conversation));
        Ok(())
    })?;
    conversations
        .into_par_iter()
        .enumerate()
        .map(|(i, conversation)| match conversation {
            Some(conversation) => Ok(tokenizer.encode(&conversation).map_err(|e| e.0)),
            None => Err(store::Error::Corrupt {
                path: store.path().to_owned(),
                detail: format!("ordinal {} names a missing example", chunk[i].0),
            }
            .into()),
        })
        .collect()
}

fn read_meta(dir: &Path) -> Result<Option<Meta>, Error> {
    let path = dir.join("meta.json");
    match std::fs::read_to_string(&path) {
        // A meta.json that does not parse is treated as no cache: `tokenize` rewrites it.
        Ok(text) => Ok(serde_json::from_str::<Meta>(&text)
            .ok()
            .filter(|m| m.version == META_VERSION)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path, source }),
    }
}

/// Whether the examples the cache covers are this store's (same first and last hash).
fn covers_this_store(store: &Store, meta: &Meta) -> Result<bool, Error> {
    if meta.examples == 0 {
        return Ok(true);
    }
    let hex_at = |ordinal| -> Result<Option<String>, Error> {
        Ok(store.hash_at(ordinal)?.map(|h| h.to_hex()))
    };
    Ok(hex_at(0)?.as_deref() == Some(meta.first_hash.as_str())
        && hex_at(meta.examples - 1)?.as_deref() == Some(meta.last_hash.as_str()))
}

#[derive(Serialize, Deserialize)]
struct SkippedLine {
    ordinal: u64,
    reason: String,
}

fn write_skipped(out: &mut impl Write, ordinal: u64, reason: &str) -> std::io::Result<()> {
    let line = serde_json::to_string(&SkippedLine {
        ordinal,
        reason: reason.to_string(),
    })
    .expect("serialises");
    writeln!(out, "{line}")
}

fn read_skipped(dir: &Path, covered: u64) -> Result<HashMap<u64, String>, Error> {
    let path = dir.join("skipped.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(source) => return Err(Error::Io { path, source }),
    };
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<SkippedLine>(line).ok())
        .filter(|s| s.ordinal < covered)
        .map(|s| (s.ordinal, s.reason))
        .collect())
}
