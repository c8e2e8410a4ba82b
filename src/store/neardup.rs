//! The `neardup` family: MinHash signatures, LSH buckets, verified pairs and cluster
//! memberships of near-duplicate detection (`crate::neardup` computes them; this module
//! only lays them out). One family, keys told apart by their first byte:
//!
//! | key                                        | value                                   |
//! |--------------------------------------------|-----------------------------------------|
//! | `p`                                        | bincode [`NearDupParams`]               |
//! | `o`                                        | u64 LE: every example with a smaller ordinal has a signature |
//! | `s` + SHA-1 (20)                           | signature: `bands × rows` u32 LE         |
//! | `b` + bucket key (u64 BE) + SHA-1 (20)     | empty: the example falls in that bucket |
//! | `e` + SHA-1 (20) + SHA-1 (20), first < second | estimated Jaccard, f32 LE            |
//! | `c` + SHA-1 (20)                           | bincode [`ClusterMembership`]           |
//!
//! Signatures and buckets are valid for the parameters under `p` only; a run with other
//! parameters drops them (and the pairs) first. Memberships are what the last run that
//! wrote decided; each change to one goes to the change log, so the index follows.

use rocksdb::{Direction, IteratorMode, ReadOptions};

use super::{Batch, Result, Store, CF_NEARDUP};
use crate::conversation::ContentHash;
pub use crate::store::types::{ClusterMembership, NearDupParams};

const PARAMS: u8 = b'p';
const SIGNED_THROUGH: u8 = b'o';
const SIGNATURE: u8 = b's';
const BUCKET: u8 = b'b';
const EDGE: u8 = b'e';
const CLUSTER: u8 = b'c';

/// Bytes of a bucket key's prefix (kind byte + bucket): the family's prefix extractor.
pub(super) const BUCKET_PREFIX_LEN: usize = 9;

/// A raw (key, value) of the family.
type Entry = (Box<[u8]>, Box<[u8]>);

fn key(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    key.push(kind);
    for part in parts {
        key.extend_from_slice(part);
    }
    key
}

fn encode_signature(signature: &[u32]) -> Vec<u8> {
    signature.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode_signature(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

impl Store {
    /// The family, absent in a store opened read-only that was never opened for writing by
    /// a corpusdb that knows it (nothing near-duplicate is known there).
    fn neardup_cf(&self) -> Option<&rocksdb::ColumnFamily> {
        self.db.cf_handle(CF_NEARDUP)
    }

    /// A full-range iterator over one key kind, in key order.
    fn neardup_scan(&self, kind: u8) -> impl Iterator<Item = Result<Entry>> + '_ {
        let mut options = ReadOptions::default();
        // The family has a prefix extractor (for bucket lookups): scans must not use it.
        options.set_total_order_seek(true);
        options.fill_cache(false);
        options.set_iterate_upper_bound(vec![kind + 1]);
        self.neardup_cf()
            .map(move |cf| {
                self.db.iterator_cf_opt(
                    cf,
                    options,
                    IteratorMode::From(&[kind], Direction::Forward),
                )
            })
            .into_iter()
            .flatten()
            .map(move |item| item.map_err(|e| self.rocks(e)))
    }

    /// The parameters the stored signatures were made with.
    pub fn neardup_params(&self) -> Result<Option<NearDupParams>> {
        let Some(cf) = self.neardup_cf() else {
            return Ok(None);
        };
        match self.db.get_cf(cf, [PARAMS]).map_err(|e| self.rocks(e))? {
            Some(bytes) => Ok(Some(self.decode(&bytes, "near-duplicate parameters")?)),
            None => Ok(None),
        }
    }

    /// The ordinal below which every example has a signature (0 when none is recorded).
    pub fn signed_through(&self) -> Result<u64> {
        let Some(cf) = self.neardup_cf() else {
            return Ok(0);
        };
        match self
            .db
            .get_cf(cf, [SIGNED_THROUGH])
            .map_err(|e| self.rocks(e))?
        {
            Some(bytes) => {
                Ok(u64::from_le_bytes(bytes.as_slice().try_into().map_err(
                    |_| self.corrupt("signed-through ordinal is not 8 bytes"),
                )?))
            }
            None => Ok(0),
        }
    }

    /// Whether any example has a signature.
    pub fn has_signatures(&self) -> Result<bool> {
        Ok(self.neardup_scan(SIGNATURE).next().transpose()?.is_some())
    }

    /// The signature of `hash`, if it has one.
    pub fn signature(&self, hash: &ContentHash) -> Result<Option<Vec<u32>>> {
        let Some(cf) = self.neardup_cf() else {
            return Ok(None);
        };
        Ok(self
            .db
            .get_pinned_cf(cf, key(SIGNATURE, &[hash.as_bytes()]))
            .map_err(|e| self.rocks(e))?
            .map(|bytes| decode_signature(&bytes)))
    }

    /// A reader of signatures for hashes visited in ascending order (one forward iterator).
    pub fn signature_cursor(&self) -> SignatureCursor<'_> {
        let mut options = ReadOptions::default();
        options.set_total_order_seek(true);
        SignatureCursor {
            store: self,
            iter: self
                .neardup_cf()
                .map(|cf| self.db.raw_iterator_cf_opt(cf, options)),
        }
    }

    /// The first `limit` examples (in hash order) in bucket `bucket`.
    pub fn bucket_members(&self, bucket: u64, limit: usize) -> Result<Vec<ContentHash>> {
        let Some(cf) = self.neardup_cf() else {
            return Ok(Vec::new());
        };
        let prefix = key(BUCKET, &[&bucket.to_be_bytes()]);
        let mut options = ReadOptions::default();
        options.set_prefix_same_as_start(true);
        let mut iter = self.db.raw_iterator_cf_opt(cf, options);
        iter.seek(&prefix);
        let mut out = Vec::new();
        while let Some(key) = iter.key() {
            if !key.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(
                ContentHash::from_slice(&key[BUCKET_PREFIX_LEN..])
                    .ok_or_else(|| self.corrupt("bucket key is not a bucket and a SHA-1"))?,
            );
            iter.next();
        }
        iter.status().map_err(|e| self.rocks(e))?;
        Ok(out)
    }

    /// Every verified pair: (first, second, estimated Jaccard), first < second.
    pub fn near_dup_pairs(
        &self,
    ) -> impl Iterator<Item = Result<(ContentHash, ContentHash, f32)>> + '_ {
        self.neardup_scan(EDGE).map(move |item| {
            let (key, value) = item?;
            let pair = (
                ContentHash::from_slice(key.get(1..21).unwrap_or_default()),
                ContentHash::from_slice(key.get(21..).unwrap_or_default()),
                <[u8; 4]>::try_from(value.as_ref()).ok(),
            );
            match pair {
                (Some(a), Some(b), Some(j)) => Ok((a, b, f32::from_le_bytes(j))),
                _ => Err(self.corrupt("near-duplicate pair has the wrong length")),
            }
        })
    }

    /// Every cluster membership, in hash order.
    pub fn cluster_memberships(
        &self,
    ) -> impl Iterator<Item = Result<(ContentHash, ClusterMembership)>> + '_ {
        self.neardup_scan(CLUSTER).map(move |item| {
            let (key, value) = item?;
            let hash = ContentHash::from_slice(&key[1..])
                .ok_or_else(|| self.corrupt("cluster key is not a SHA-1"))?;
            Ok((hash, self.decode(&value, "cluster membership")?))
        })
    }

    /// The near-duplicate cluster `hash` belongs to, if any.
    pub fn cluster_membership(&self, hash: &ContentHash) -> Result<Option<ClusterMembership>> {
        let Some(cf) = self.neardup_cf() else {
            return Ok(None);
        };
        match self
            .db
            .get_pinned_cf(cf, key(CLUSTER, &[hash.as_bytes()]))
            .map_err(|e| self.rocks(e))?
        {
            Some(bytes) => Ok(Some(self.decode(&bytes, "cluster membership")?)),
            None => Ok(None),
        }
    }
}

/// See [`Store::signature_cursor`].
pub struct SignatureCursor<'a> {
    store: &'a Store,
    iter: Option<rocksdb::DBRawIteratorWithThreadMode<'a, rocksdb::DB>>,
}

impl SignatureCursor<'_> {
    /// The signature of `hash`; fastest with hashes in ascending order.
    pub fn get(&mut self, hash: &ContentHash) -> Result<Option<Vec<u32>>> {
        let Some(iter) = &mut self.iter else {
            return Ok(None);
        };
        let wanted = key(SIGNATURE, &[hash.as_bytes()]);
        iter.seek(&wanted);
        iter.status().map_err(|e| self.store.rocks(e))?;
        Ok((iter.key() == Some(wanted.as_slice()))
            .then(|| decode_signature(iter.value().expect("a valid iterator has a value"))))
    }
}

impl<'a> Batch<'a> {
    fn neardup(&self) -> &'a rocksdb::ColumnFamily {
        let store: &'a Store = self.store;
        store
            .neardup_cf()
            .expect("a writable store has every family")
    }

    /// Drops every signature, bucket and pair (parameters changed).
    pub(super) fn clear_signatures(&mut self) {
        let cf = self.neardup();
        for kind in [SIGNATURE, BUCKET, EDGE] {
            self.inner.delete_range_cf(cf, [kind], [kind + 1]);
        }
    }

    pub(super) fn put_neardup_params(&mut self, params: &NearDupParams) {
        self.put(CF_NEARDUP, &[PARAMS], params);
    }

    pub(super) fn put_signed_through(&mut self, ordinal: u64) {
        let cf = self.neardup();
        self.inner
            .put_cf(cf, [SIGNED_THROUGH], ordinal.to_le_bytes());
    }

    pub(super) fn put_signature(&mut self, hash: &ContentHash, signature: &[u32]) {
        let cf = self.neardup();
        self.inner.put_cf(
            cf,
            key(SIGNATURE, &[hash.as_bytes()]),
            encode_signature(signature),
        );
    }

    pub(super) fn put_bucket(&mut self, bucket: u64, hash: &ContentHash) {
        let cf = self.neardup();
        self.inner.put_cf(
            cf,
            key(BUCKET, &[&bucket.to_be_bytes(), hash.as_bytes()]),
            [],
        );
    }

    pub(super) fn put_pair(&mut self, a: &ContentHash, b: &ContentHash, jaccard: f32) {
        let (first, second) = if a < b { (a, b) } else { (b, a) };
        let cf = self.neardup();
        self.inner.put_cf(
            cf,
            key(EDGE, &[first.as_bytes(), second.as_bytes()]),
            jaccard.to_le_bytes(),
        );
    }

    pub(super) fn put_membership(&mut self, hash: &ContentHash, membership: &ClusterMembership) {
        self.put(CF_NEARDUP, &key(CLUSTER, &[hash.as_bytes()]), membership);
    }

    pub(super) fn delete_membership(&mut self, hash: &ContentHash) {
        let cf = self.neardup();
        self.inner.delete_cf(cf, key(CLUSTER, &[hash.as_bytes()]));
    }
}
