//! Example values, compressed once.
//!
//! A value of the `examples` family written by schema version 3 is the bincode
//! [`super::ExampleHeader`] (ordinal, category, first import, chars, turns; never
//! compressed, so dedup reads the first import without decompressing) followed by the
//! body: a tag (LEB128 varint) and the bincode of the conversation and its extras, either
//! as they are (tag 0) or as one zstd frame compressed with the store's dictionary whose
//! id is the tag (1, 2, ...). Dictionaries live in the `meta` family under
//! `dictionary/` + id (u32 BE) and are trained by the first import from its first
//! values ([`train`]). Values are compressed on the parse threads, once; the family's
//! block compression is off, so flushes and compactions copy bytes.
//!
//! Values written by schema version 2 (no tag, block-compressed by RocksDB) are told
//! apart by their ordinal: `meta/values_tagged_from` holds the number of examples the
//! store had when it was upgraded, and every example below it is untagged.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use zstd::zstd_safe::{CCtx, CDict, DCtx, DDict};

/// Tag of a body stored as it is.
pub const TAG_RAW: u32 = 0;
/// Default zstd level of values compressed with a dictionary.
pub const DEFAULT_LEVEL: i32 = 1;
/// Size of a trained dictionary.
pub const DICTIONARY_BYTES: usize = 64 << 10;
/// Prefix of the keys of dictionaries in the `meta` family (followed by the id, u32 BE).
pub const DICTIONARY_KEY_PREFIX: &[u8] = b"dictionary/";

/// A trained dictionary, prepared for compressing and decompressing.
pub struct Dictionary {
    id: u32,
    bytes: Vec<u8>,
    cdict: CDict<'static>,
    ddict: DDict<'static>,
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dictionary")
            .field("id", &self.id)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl Dictionary {
    /// A dictionary that compresses at zstd `level` (decompression needs no level).
    pub fn new(id: u32, bytes: Vec<u8>, level: i32) -> Dictionary {
        let cdict = CDict::create(&bytes, level);
        let ddict = DDict::create(&bytes);
        Dictionary {
            id,
            bytes,
            cdict,
            ddict,
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn key(&self) -> Vec<u8> {
        dictionary_key(self.id)
    }
}

pub fn dictionary_key(id: u32) -> Vec<u8> {
    let mut key = DICTIONARY_KEY_PREFIX.to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The dictionaries a store holds, by id.
#[derive(Default)]
pub struct Dictionaries {
    by_id: RwLock<BTreeMap<u32, Arc<Dictionary>>>,
}

impl Dictionaries {
    pub fn get(&self, id: u32) -> Option<Arc<Dictionary>> {
        self.by_id.read().expect("not poisoned").get(&id).cloned()
    }

    pub fn newest(&self) -> Option<Arc<Dictionary>> {
        self.by_id
            .read()
            .expect("not poisoned")
            .values()
            .next_back()
            .cloned()
    }

    pub fn next_id(&self) -> u32 {
        self.by_id
            .read()
            .expect("not poisoned")
            .keys()
            .next_back()
            .map_or(1, |id| id + 1)
    }

    pub fn insert(&self, dictionary: Arc<Dictionary>) {
        self.by_id
            .write()
            .expect("not poisoned")
            .insert(dictionary.id, dictionary);
    }

    pub fn remove(&self, id: u32) {
        self.by_id.write().expect("not poisoned").remove(&id);
    }
}

/// Trains a dictionary from sample bodies (bincode conversations, untagged), laid end to
/// end in `samples` with their `sizes`. `None` when zstd finds too little to learn from.
pub fn train(id: u32, samples: &[u8], sizes: &[usize], level: i32) -> Option<Dictionary> {
    let bytes = zstd::dict::from_continuous(samples, sizes, DICTIONARY_BYTES).ok()?;
    Some(Dictionary::new(id, bytes, level))
}

thread_local! {
    static CCTX: RefCell<CCtx<'static>> = RefCell::new(CCtx::create());
    static DCTX: RefCell<(DCtx<'static>, Vec<u8>)> = RefCell::new((DCtx::create(), Vec::new()));
}

/// A raw body (tag 0 + bincode, as [`super::encode_conversation`] writes it) compressed
/// with `dictionary`: its tag, then the zstd frame. Kept raw when compression would not
/// make it smaller.
pub fn compress(body: &[u8], dictionary: &Dictionary) -> Option<Vec<u8>> {
    let plain = body.get(1..)?;
    let mut out = Vec::with_capacity(5 + zstd::zstd_safe::compress_bound(plain.len()));
    put_varint(&mut out, dictionary.id);
    let tag_len = out.len();
    let written = CCTX.with(|cctx| {
        let mut frame = std::io::Cursor::new(&mut out);
        frame.set_position(tag_len as u64);
        cctx.borrow_mut()
            .compress_using_cdict(&mut frame, plain, &dictionary.cdict)
    });
    written.ok()?;
    (out.len() < body.len()).then_some(out)
}

/// Decodes a tagged body with `visit` given the plain bincode bytes.
pub fn with_plain<T>(
    body: &[u8],
    dictionaries: &Dictionaries,
    visit: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<T, String> {
    let (tag, rest) = get_varint(body).ok_or("the value's tag is cut short")?;
    if tag == TAG_RAW {
        return visit(rest);
    }
    let dictionary = dictionaries
        .get(tag)
        .ok_or_else(|| format!("the value needs dictionary {tag}, which the store lacks"))?;
    let size = zstd::zstd_safe::get_frame_content_size(rest)
        .ok()
        .flatten()
        .ok_or("the value's zstd frame has no content size")? as usize;
    DCTX.with(|cell| {
        let mut cell = cell.borrow_mut();
        let (dctx, buffer) = &mut *cell;
        buffer.clear();
        buffer.reserve(size);
        dctx.decompress_using_ddict(buffer, rest, &dictionary.ddict)
            .map_err(|code| {
                format!(
                    "cannot decompress the value: {}",
                    zstd::zstd_safe::get_error_name(code)
                )
            })?;
        visit(buffer)
    })
}

pub fn put_varint(out: &mut Vec<u8>, mut value: u32) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub fn get_varint(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let mut value = 0u32;
    for (i, &byte) in bytes.iter().enumerate().take(5) {
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::{Conversation, Extras, Message, Role};

    fn body(i: usize) -> Vec<u8> {
        let conversation = Conversation::new(vec![
            Message::new(
                Role::User,
                format!("Question {i}: how do I sort a list in Rust?"),
            ),
            Message::new(
                Role::Assistant,
                format!("Call `sort_unstable` on the vector; answer number {i}. ").repeat(3),
            ),
        ]);
        super::super::encode_conversation(&conversation, &Extras::default())
    }

    fn plain(body: &[u8], dictionaries: &Dictionaries) -> Result<Vec<u8>, String> {
        with_plain(body, dictionaries, |plain| Ok(plain.to_vec()))
    }

    #[test]
    fn varints_round_trip() {
        for value in [0, 1, 127, 128, 300, 16_383, 16_384, u32::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            out.push(0xAA);
            assert_eq!(get_varint(&out), Some((value, &[0xAA][..])));
        }
        assert_eq!(get_varint(&[0x80, 0x80]), None);
    }

    #[test]
    fn values_round_trip_with_and_without_a_dictionary() {
        let samples: Vec<Vec<u8>> = (0..2000).map(body).collect();
        let mut joined = Vec::new();
        let mut sizes = Vec::new();
        for s in &samples {
            joined.extend_from_slice(&s[1..]);
            sizes.push(s.len() - 1);
        }
        let dictionary = Arc::new(train(1, &joined, &sizes, DEFAULT_LEVEL).expect("a dictionary"));
        let dictionaries = Dictionaries::default();
        // Raw bodies decode without any dictionary.
        for s in samples.iter().take(10) {
            assert_eq!(plain(s, &dictionaries).unwrap(), &s[1..]);
        }
        let packed: Vec<Vec<u8>> = samples
            .iter()
            .map(|s| compress(s, &dictionary).expect("smaller"))
            .collect();
        assert!(packed.iter().all(|p| p[0] == 1));
        let message = plain(&packed[0], &dictionaries).unwrap_err();
        assert!(message.contains("dictionary 1"), "{message}");
        dictionaries.insert(dictionary.clone());
        for (s, p) in samples.iter().zip(&packed) {
            assert!(p.len() * 2 < s.len(), "{} -> {}", s.len(), p.len());
            assert_eq!(plain(p, &dictionaries).unwrap(), &s[1..]);
        }
        // The same bytes every time, and from a dictionary loaded from its bytes.
        let reloaded = Dictionary::new(1, dictionary.bytes().to_vec(), DEFAULT_LEVEL);
        assert_eq!(compress(&samples[5], &reloaded).unwrap(), packed[5]);
        assert_eq!(dictionaries.next_id(), 2);
        // A damaged frame is an error, not a panic.
        let mut damaged = packed[3].clone();
        let n = damaged.len();
        damaged.truncate(n - 3);
        assert!(plain(&damaged, &dictionaries).is_err());
    }
}
