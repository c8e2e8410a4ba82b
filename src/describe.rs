//! The store's records as JSON, as `corpusdb ... --json` prints them and the Python package
//! returns them: one description, so the two cannot drift apart.

use serde_json::{json, Value};

use crate::conversation::ContentHash;
use crate::neardup::Member;
use crate::store::{
    self, ClusterMembership, Counters, ExampleSource, Exclusion, FamilyFootprint, ImportRecord,
    ImportState, Store, StoredExample,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A hash that is malformed, unknown or ambiguous; the message says which.
    #[error("{0}")]
    Lookup(String),
}

pub fn state_name(state: ImportState) -> &'static str {
    match state {
        ImportState::Done => "done",
        ImportState::Partial => "partial",
    }
}

/// One import: source, file, identity, state, counts, checkpoint.
pub fn import_json(import: &ImportRecord) -> Value {
    json!({
        "id": import.id,
        "source": import.source,
        "category": import.category,
        "file": import.path,
        "fingerprint": import.fingerprint,
        "file_sha1": import.file_sha1,
        "format": import.format,
        "state": state_name(import.state),
        "read": import.counts.read,
        "stored": import.counts.stored,
        "duplicates": import.counts.duplicates,
        "rejected": import.counts.rejected,
        "joined": import.counts.joined,
        "extra": import.counts.extra,
        "checkpoint": {"records": import.checkpoint.records, "line": import.checkpoint.line(), "byte": import.checkpoint.bytes},
        "checked_prefix": import.prefix.map(|p| json!({"bytes": p.bytes, "sha1": p.sha1_hex()})),
    })
}

/// What `stats` reports: the counters, imports and how many examples are excluded.
pub struct StoreSummary {
    pub counters: Counters,
    pub imports: usize,
    pub partial_imports: usize,
    /// Examples excluded by at least one quality filter (or as near-duplicates).
    pub excluded: u64,
    /// Each column family's table files, bytes on disk and index and filter memory.
    pub families: Vec<FamilyFootprint>,
}

impl StoreSummary {
    pub fn read(store: &Store) -> store::Result<StoreSummary> {
        let imports = store.imports()?;
        let mut excluded = 0u64;
        let mut last = None;
        for item in store.exclusions() {
            let (hash, _) = item?;
            if last != Some(hash) {
                excluded += 1;
                last = Some(hash);
            }
        }
        Ok(StoreSummary {
            counters: store.counters()?,
            imports: imports.len(),
            partial_imports: imports
                .iter()
                .filter(|i| i.state == ImportState::Partial)
                .count(),
            excluded,
            families: store.footprint()?,
        })
    }

    pub fn to_json(&self) -> Value {
        let c = &self.counters;
        json!({
            "examples": c.examples,
            "excluded": self.excluded,
            "read": c.read,
            "duplicates": c.duplicates,
            "rejected": c.rejected,
            "joined": c.joined,
            "extra": c.extra,
            "categories": c.categories,
            "sources": c.sources,
            "imports": {"total": self.imports, "partial": self.partial_imports},
            "families": self.families.iter().map(|f| json!({
                "name": f.name,
                "table_files": f.table_files,
                "disk_bytes": f.disk_bytes,
                "index_bytes": f.index_bytes,
                "filter_bytes": f.filter_bytes,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The stored example whose hash is `text` or starts with it (at least 4 hex digits).
pub fn resolve_hash(store: &Store, text: &str) -> Result<ContentHash, Error> {
    let wanted = text.trim().to_ascii_lowercase();
    if wanted.len() < 4 || !wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Lookup(format!(
            "`{text}` is not a hash: give the hex SHA-1 or a prefix of at least 4 hex digits"
        )));
    }
    let matches = store.hashes_with_prefix(&wanted, 2)?;
    match matches.as_slice() {
        [] => Err(Error::Lookup(format!("no example with hash {wanted}"))),
        [one] => Ok(*one),
        _ => Err(Error::Lookup(format!(
            "{wanted} is ambiguous: {} and more; give more digits",
            matches[0]
        ))),
    }
}

/// One example with everything `show` reports of it: its sources, the filters that
/// exclude it, and its near-duplicate cluster with each member's sources.
pub struct ExampleDetails {
    pub hash: ContentHash,
    pub example: StoredExample,
    pub sources: Vec<ExampleSource>,
    pub exclusions: Vec<Exclusion>,
    pub membership: Option<ClusterMembership>,
    /// The cluster's members (this example included) with their sources, in hash order.
    pub members: Vec<(Member, Vec<ExampleSource>)>,
}

impl ExampleDetails {
    pub fn read(store: &Store, hash: &ContentHash) -> Result<ExampleDetails, Error> {
        let example = store
            .get(hash)?
            .ok_or_else(|| Error::Lookup(format!("no example with hash {hash}")))?;
        let membership = store.cluster_membership(hash)?;
        let mut members = Vec::new();
        if let Some(m) = &membership {
            for member in crate::neardup::cluster_members(store, &m.cluster.to_hex())? {
                let sources = store.sources_of(&member.hash)?;
                members.push((member, sources));
            }
        }
        Ok(ExampleDetails {
            hash: *hash,
            sources: store.sources_of(hash)?,
            exclusions: store.exclusions_of(hash)?,
            example,
            membership,
            members,
        })
    }

    pub fn to_json(&self) -> Value {
        let example = &self.example;
        let record = crate::export::messages_record(example);
        json!({
            "hash": self.hash.to_hex(),
            "ordinal": example.ordinal,
            "category": example.category,
            "chars": example.chars,
            "turns": example.turns,
            "messages": record["messages"],
            "tools": record.get("tools"),
            "raw_text": example.extras.raw_text,
            "rejected": example.extras.rejected.as_ref().map(|messages| {
                messages
                    .iter()
                    .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
                    .collect::<Vec<_>>()
            }),
            "sources": self.sources,
            "exclusions": self.exclusions.iter().map(|e| json!({"filter": e.filter, "measured": e.measured})).collect::<Vec<_>>(),
            "cluster": self.membership.as_ref().map(|m| json!({
                "id": m.cluster_id(),
                "representative": m.representative.to_hex(),
                "jaccard": m.jaccard,
                "members": self.members.iter().map(|(member, sources)| json!({
                    "hash": member.hash.to_hex(),
                    "representative": member.membership.is_representative(&member.hash),
                    "jaccard": member.membership.jaccard,
                    "sources": sources,
                })).collect::<Vec<_>>(),
            })),
        })
    }
}

/// [`ExampleDetails`] of one example as `show --json` prints it.
pub fn example_json(store: &Store, hash: &ContentHash) -> Result<Value, Error> {
    Ok(ExampleDetails::read(store, hash)?.to_json())
}
