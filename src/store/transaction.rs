//! The only ways to change the store: an import batch, an exclusion batch and a
//! near-duplicate batch.
//!
//! Each keeps the store's rules itself, so that no caller can break them:
//! - ordinals are dense: a new example takes the next one, in the order examples are
//!   added;
//! - the change log has no gaps: every example that is new, gains a source, or is
//!   excluded or lifted gets the next sequence number, once per batch;
//! - the counters move with what is written (examples, categories, sources, the import's
//!   counts), in the same atomic write.
//!
//! Callers hold the store's [`Counters`] (read once with [`Store::counters`]) for as long
//! as they write: one writer at a time, as the store's lock guarantees.

use std::collections::HashSet;
use std::sync::Arc;

use super::{Batch, Counters, Dictionary, ExampleHeader, ImportRecord, Reject, Result, Store};
use crate::conversation::ContentHash;
use crate::store::types::{ClusterMembership, Exclusion, ImportCounts, NearDupParams};

/// A new example as an import batch holds it until it commits.
struct NewExample {
    hash: ContentHash,
    ordinal: u64,
    category: String,
    chars: u64,
    turns: u32,
    conversation: Vec<u8>,
}

/// One atomic step of an import ([`Store::import_batch`]).
pub struct ImportBatch<'a> {
    store: &'a Store,
    counters: &'a mut Counters,
    import_id: u32,
    examples: Vec<NewExample>,
    changed: Vec<ContentHash>,
    provenance: Vec<(ContentHash, u64, u64, Option<String>)>,
    rejects: Vec<Reject>,
    dictionary: Option<Arc<Dictionary>>,
}

impl Store {
    /// Starts a batch of import `import_id`; `counters` are the store's, kept current by
    /// every batch that commits.
    pub fn import_batch<'a>(
        &'a self,
        counters: &'a mut Counters,
        import_id: u32,
    ) -> ImportBatch<'a> {
        ImportBatch {
            store: self,
            counters,
            import_id,
            examples: Vec::new(),
            changed: Vec::new(),
            provenance: Vec::new(),
            rejects: Vec::new(),
            dictionary: None,
        }
    }

    /// Starts a batch of exclusions and lifts (quality filters).
    pub fn exclusion_batch<'a>(&'a self, counters: &'a mut Counters) -> ExclusionBatch<'a> {
        ExclusionBatch {
            batch: self.batch(),
            counters,
            changed: Vec::new(),
            seen: HashSet::new(),
        }
    }
}

/// About what an import batch's writes take in RocksDB's batch, a little over rather than
/// under: reserved at once, the batch is not copied as it grows to several MiB.
fn written_bytes(
    examples: &[NewExample],
    provenance: &[(ContentHash, u64, u64, Option<String>)],
    rejects: &[Reject],
) -> usize {
    // Per example: its body, then the header, ordinal, change and key framing.
    let examples: usize = examples.iter().map(|e| e.conversation.len() + 256).sum();
    let provenance: usize = provenance
        .iter()
        .map(|(_, _, _, id)| 64 + id.as_ref().map_or(0, String::len))
        .sum();
    let rejects: usize = rejects
        .iter()
        .map(|r| r.raw.len() + r.reason.len() + r.path.len() + r.source.len() + 128)
        .sum();
    examples + provenance + rejects + 4096
}

impl ImportBatch<'_> {
    /// Adds a new example (`conversation` as [`super::encode_conversation`] writes it);
    /// returns the ordinal it takes. It is also a change.
    pub fn add_example(
        &mut self,
        hash: ContentHash,
        category: &str,
        chars: u64,
        turns: u32,
        conversation: Vec<u8>,
    ) -> u64 {
        let ordinal = self.counters.examples;
        self.counters.examples += 1;
        match self.counters.categories.get_mut(category) {
            Some(count) => *count += 1,
            None => {
                self.counters.categories.insert(category.to_string(), 1);
            }
        }
        self.examples.push(NewExample {
            hash,
            ordinal,
            category: category.to_string(),
            chars,
            turns,
            conversation,
        });
        self.changed.push(hash);
        ordinal
    }

    /// Records that a stored example gained a source, for derived indexes.
    pub fn add_change(&mut self, hash: ContentHash) {
        self.changed.push(hash);
    }

    /// Records that `record` (at `line`, with `id` in an `id -> record` document) of this
    /// import gave `hash`.
    pub fn add_provenance(
        &mut self,
        hash: ContentHash,
        record: u64,
        line: u64,
        id: Option<String>,
    ) {
        self.provenance.push((hash, record, line, id));
    }

    /// Stores a dictionary trained by [`Store::train_dictionary`] with this batch, whose
    /// values may use it.
    pub fn add_dictionary(&mut self, dictionary: Arc<Dictionary>) {
        self.dictionary = Some(dictionary);
    }

    /// Keeps a rejected record (or a note about the file) in the rejects ledger.
    pub fn add_reject(&mut self, reject: Reject) {
        self.rejects.push(reject);
    }

    /// Writes the batch atomically: `counts` (this batch's) are added to `import`'s
    /// counts and to the store's counters, and `import` (with the checkpoint the caller
    /// set) is written with them.
    pub fn commit(self, import: &mut ImportRecord, counts: &ImportCounts) -> Result<()> {
        let ImportBatch {
            store,
            counters,
            import_id,
            examples,
            mut changed,
            mut provenance,
            rejects,
            dictionary,
        } = self;
        if counts.stored != examples.len() as u64 || import.id != import_id {
            return Err(store.corrupt(&format!(
                "import batch of import {import_id}: {} stored for {} examples added (import {})",
                counts.stored,
                examples.len(),
                import.id
            )));
        }
        let mut batch = store.batch_with_capacity(written_bytes(&examples, &provenance, &rejects));
        if let Some(dictionary) = &dictionary {
            batch.put_dictionary(dictionary);
        }
        for reject in &rejects {
            batch.put_reject(reject);
        }
        // Keys go into each family's memtable in sorted order: consecutive skiplist inserts
        // then share most of their search path (measured in BENCHMARKS.md). Examples were
        // added in ordinal order, the order of `bodies` and `ordinals`; headers go by hash.
        // Each header is encoded once, for both.
        let heads: Vec<Vec<u8>> = examples
            .iter()
            .map(|e| {
                super::header_bytes(&ExampleHeader {
                    ordinal: e.ordinal,
                    category: &e.category,
                    first_import: import_id,
                    chars: e.chars,
                    turns: e.turns,
                })
            })
            .collect();
        for (e, head) in examples.iter().zip(&heads) {
            batch.put_body(&e.hash, e.ordinal, head, &e.conversation);
        }
        let mut by_hash: Vec<usize> = (0..examples.len()).collect();
        by_hash.sort_unstable_by_key(|&i| examples[i].hash);
        for i in by_hash {
            batch.put_header(&examples[i].hash, &heads[i]);
        }
        changed.sort_unstable();
        changed.dedup();
        for hash in &changed {
            batch.put_change(counters.changes, hash);
            counters.changes += 1;
        }
        provenance.sort_unstable();
        for (hash, record, line, id) in provenance {
            batch.put_provenance(&hash, import_id, record, line, id.as_deref());
        }
        if counts.stored + counts.duplicates > 0 {
            *counters.sources.entry(import.source.clone()).or_default() +=
                counts.stored + counts.duplicates;
        }
        counters.read += counts.read;
        counters.duplicates += counts.duplicates;
        counters.rejected += counts.rejected;
        counters.joined += counts.joined;
        counters.extra += counts.extra;
        import.counts.add(counts);
        batch.put_import(import);
        batch.put_counters(counters);
        // Known before the write, so no reader of this process meets a value it cannot
        // decompress; forgotten again if the write fails.
        if let Some(dictionary) = &dictionary {
            store.dictionaries.insert(dictionary.clone());
        }
        let written = store.write(batch);
        if let (Err(_), Some(dictionary)) = (&written, &dictionary) {
            store.dictionaries.remove(dictionary.id());
        }
        written
    }
}

/// Exclusions and lifts written together ([`Store::exclusion_batch`]).
pub struct ExclusionBatch<'a> {
    batch: Batch<'a>,
    counters: &'a mut Counters,
    /// Examples changed in this batch, in the order of their first change.
    changed: Vec<ContentHash>,
    seen: HashSet<ContentHash>,
}

impl ExclusionBatch<'_> {
    /// Excludes `hash` by the filter named in `exclusion`.
    pub fn exclude(&mut self, hash: &ContentHash, exclusion: &Exclusion) {
        self.batch.put_exclusion(hash, exclusion);
        self.changed(hash);
    }

    /// Lifts the exclusion of `hash` by `filter`.
    pub fn lift(&mut self, hash: &ContentHash, filter: &str) {
        self.batch.delete_exclusion(hash, filter);
        self.changed(hash);
    }

    fn changed(&mut self, hash: &ContentHash) {
        if self.seen.insert(*hash) {
            self.changed.push(*hash);
        }
    }

    /// Whether nothing was excluded or lifted.
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
    }

    /// Writes the batch atomically: each changed example gets the next change-log entry,
    /// and the counters are written with them. An empty batch writes nothing.
    pub fn commit(self) -> Result<()> {
        let ExclusionBatch {
            mut batch,
            counters,
            changed,
            ..
        } = self;
        if changed.is_empty() {
            return Ok(());
        }
        for hash in &changed {
            batch.put_change(counters.changes, hash);
            counters.changes += 1;
        }
        batch.put_counters(counters);
        batch.store.write(batch)
    }
}

/// Near-duplicate state written together ([`Store::near_dup_batch`]): signatures, buckets,
/// verified pairs, cluster memberships, and the `near-dup` exclusions that follow from
/// them. Memberships and exclusions are changes (the index shows both); signatures,
/// buckets and pairs are not (no document holds them).
pub struct NearDupBatch<'a> {
    inner: ExclusionBatch<'a>,
    writes: usize,
}

impl Store {
    /// Starts a batch of near-duplicate state (`crate::neardup` is its one user).
    pub fn near_dup_batch<'a>(&'a self, counters: &'a mut Counters) -> NearDupBatch<'a> {
        NearDupBatch {
            inner: self.exclusion_batch(counters),
            writes: 0,
        }
    }
}

impl NearDupBatch<'_> {
    /// Drops every signature, bucket and pair and records the parameters new signatures
    /// are made with.
    pub fn reset_signatures(&mut self, params: &NearDupParams) {
        self.inner.batch.clear_signatures();
        self.set_params(params);
        self.set_signed_through(0);
    }

    /// Records that every example with an ordinal below `ordinal` has a signature.
    pub fn set_signed_through(&mut self, ordinal: u64) {
        self.inner.batch.put_signed_through(ordinal);
        self.writes += 1;
    }

    pub fn set_params(&mut self, params: &NearDupParams) {
        self.inner.batch.put_neardup_params(params);
        self.writes += 1;
    }

    /// Stores the signature of `hash`.
    pub fn put_signature(&mut self, hash: &ContentHash, signature: &[u32]) {
        self.inner.batch.put_signature(hash, signature);
        self.writes += 1;
    }

    /// Records that `hash` falls in LSH bucket `bucket`.
    pub fn put_bucket(&mut self, bucket: u64, hash: &ContentHash) {
        self.inner.batch.put_bucket(bucket, hash);
        self.writes += 1;
    }

    /// Stores a verified candidate pair with its estimated Jaccard similarity.
    pub fn put_pair(&mut self, a: &ContentHash, b: &ContentHash, jaccard: f32) {
        self.inner.batch.put_pair(a, b, jaccard);
        self.writes += 1;
    }

    /// Sets (or replaces) the cluster membership of `hash`.
    pub fn set_membership(&mut self, hash: &ContentHash, membership: &ClusterMembership) {
        self.inner.batch.put_membership(hash, membership);
        self.inner.changed(hash);
        self.writes += 1;
    }

    /// `hash` is no longer in a cluster.
    pub fn remove_membership(&mut self, hash: &ContentHash) {
        self.inner.batch.delete_membership(hash);
        self.inner.changed(hash);
        self.writes += 1;
    }

    /// Excludes `hash` (see [`ExclusionBatch::exclude`]).
    pub fn exclude(&mut self, hash: &ContentHash, exclusion: &Exclusion) {
        self.inner.exclude(hash, exclusion);
        self.writes += 1;
    }

    /// Lifts the exclusion of `hash` by `filter`.
    pub fn lift(&mut self, hash: &ContentHash, filter: &str) {
        self.inner.lift(hash, filter);
        self.writes += 1;
    }

    /// Keys written so far (callers commit every few thousand to bound memory).
    pub fn len(&self) -> usize {
        self.writes
    }

    pub fn is_empty(&self) -> bool {
        self.writes == 0
    }

    /// Writes the batch atomically, with a change-log entry per example whose membership
    /// or exclusion changed and the counters.
    pub fn commit(self) -> Result<()> {
        let NearDupBatch { inner, writes } = self;
        if writes == 0 {
            return Ok(());
        }
        let ExclusionBatch {
            mut batch,
            counters,
            changed,
            ..
        } = inner;
        for hash in &changed {
            batch.put_change(counters.changes, hash);
            counters.changes += 1;
        }
        batch.put_counters(counters);
        batch.store.write(batch)
    }
}
