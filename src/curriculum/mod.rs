//! Curricula: phases of training data chosen from the store, and the plan that orders
//! every example of every phase.
//!
//! ```yaml
//! name: emergent_personality
//! seed: 42
//! eval: {fraction: 0.01}            # held out by content hash; never in a training plan
//! phases:
//!   - name: foundation
//!     select: "category:code OR category:instruction OR category:qa"
//!     epochs: 1
//!     learning_rate: 2.0e-5
//!     mixture:                      # optional: exact shares of the phase's examples
//!       by: category                # or source
//!       shares: {code: 0.4, instruction: 0.35, qa: 0.25}
//!       examples: 100000            # per epoch (default: as many as selected)
//!       upsample: true              # a group may repeat to reach its share
//!       downsample: true            # a group may use part of its examples per epoch
//! ```
//!
//! The order is a pure function of the store's contents, the curriculum and its seed:
//! selection (an index query; excluded examples never appear) -> held-out split by hash
//! -> per group, a fresh keyed permutation per epoch (and per repeat cycle) -> groups
//! interleaved so every prefix keeps the mixture shares within one example. Nothing is
//! materialised per example beyond the sorted ordinals of each group: the example at any
//! position is computed in constant time, so resuming is a position, not a replay.

pub mod order;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use crate::index::query::{self, Expr, TermField};
use crate::index::Index;
use order::{Permutation, Schedule};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Curriculum {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub eval: EvalSplit,
    pub phases: Vec<PhaseSpec>,
}

/// The held-out evaluation split: a fixed fraction of the examples, by content hash.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSplit {
    pub fraction: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    pub name: String,
    /// A query in the index's language (`corpusdb query --help`).
    pub select: String,
    #[serde(default = "one")]
    pub epochs: u32,
    pub learning_rate: f64,
    /// Default: derived from the curriculum's seed and the phase's place.
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub mixture: Option<Mixture>,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mixture {
    pub by: MixBy,
    pub shares: BTreeMap<String, f64>,
    /// Examples per epoch; default: all selected examples of the listed groups.
    #[serde(default)]
    pub examples: Option<u64>,
    #[serde(default = "yes")]
    pub upsample: bool,
    #[serde(default = "yes")]
    pub downsample: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixBy {
    Category,
    Source,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::manifest::Error),
    #[error(transparent)]
    Index(#[from] crate::index::Error),
    #[error("phase `{phase}`: {message}")]
    Phase { phase: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Curriculum {
    pub fn load(path: &Path) -> Result<Curriculum, Error> {
        let curriculum: Curriculum = crate::manifest::load_yaml(path)?;
        curriculum.validate().map_err(|message| {
            Error::Config(crate::manifest::Error::Invalid {
                path: path.to_owned(),
                message,
            })
        })?;
        Ok(curriculum)
    }

    fn validate(&self) -> Result<(), String> {
        if self.phases.is_empty() {
            return Err("a curriculum needs at least one phase".into());
        }
        if !(0.0..1.0).contains(&self.eval.fraction) {
            return Err(format!(
                "eval.fraction must be in [0, 1), not {}",
                self.eval.fraction
            ));
        }
        for phase in &self.phases {
            let bad = |m: String| format!("phase `{}`: {m}", phase.name);
            query::parse(&phase.select).map_err(|e| bad(format!("select: {e}")))?;
            if phase.learning_rate.is_nan() || phase.learning_rate <= 0.0 {
                return Err(bad("learning_rate must be positive".into()));
            }
            if let Some(mixture) = &phase.mixture {
                let sum: f64 = mixture.shares.values().sum();
                if mixture.shares.values().any(|&s| s < 0.0) || (sum - 1.0).abs() > 1e-6 {
                    return Err(bad(format!(
                        "mixture shares must be non-negative and add up to 1 (they add up to {sum})"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// One group of a phase: its examples (sorted ordinals) and positions per epoch.
#[derive(Clone, Debug)]
pub struct GroupPlan {
    pub name: String,
    /// Shared with other groups and phases that select the same examples.
    pub ordinals: Arc<[u32]>,
    pub quota: u64,
    pub target_share: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct PhasePlan {
    pub name: String,
    pub epochs: u32,
    pub learning_rate: f64,
    pub seed: u64,
    /// Selected examples that belong to no group of the mixture (not trained in it).
    pub unmixed: u64,
    /// What the plan adjusted (e.g. a group without examples left out).
    pub notes: Vec<String>,
    pub groups: Vec<GroupPlan>,
    pub per_epoch: u64,
    /// Global position of the phase's first example.
    pub start: u64,
    schedule: Schedule,
}

impl PhasePlan {
    pub fn len(&self) -> u64 {
        self.per_epoch * u64::from(self.epochs)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One position of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planned {
    pub position: u64,
    pub ordinal: u64,
    pub phase: usize,
    pub epoch: u32,
    pub group: usize,
}

/// Where a training run stands: the plan it follows and how many examples of its global
/// order have been consumed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub fingerprint: String,
    pub position: u64,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub curriculum: Curriculum,
    /// SHA-1 over the curriculum and every group's ordinals (hex, first 16 digits).
    pub fingerprint: String,
    pub phases: Vec<PhasePlan>,
    /// Held-out ordinals, sorted.
    pub eval: Vec<u64>,
    pub total: u64,
}

impl Plan {
    /// Builds the plan from the index (which must be caught up with the store).
    pub fn build(index: &Index, curriculum: &Curriculum) -> Result<Plan, Error> {
        curriculum.validate().map_err(Error::Invalid)?;
        // Keys at or above the threshold train; below it they are held out.
        let threshold = (curriculum.eval.fraction * 2f64.powi(64)) as u64;
        let mut hasher = Sha1::new();
        hasher.update(serde_json::to_vec(curriculum).expect("serialises"));
        let mut selections = Selections {
            index,
            threshold,
            seen: Vec::new(),
            held_out: None,
        };
        let mut phases = Vec::with_capacity(curriculum.phases.len());
        let mut start = 0u64;
        for (index_in_plan, spec) in curriculum.phases.iter().enumerate() {
            let phase_error = |message: String| Error::Phase {
                phase: spec.name.clone(),
                message,
            };
            let expr = query::parse(&spec.select).map_err(|e| phase_error(e.to_string()))?;
            let mut select = |extra: Option<Expr>| -> Result<Arc<[u32]>, Error> {
                selections.training(&match extra {
                    Some(term) => Expr::And(vec![expr.clone(), term]),
                    None => expr.clone(),
                })
            };
            let mut notes = Vec::new();
            let (groups, unmixed, per_epoch) = match &spec.mixture {
                None => {
                    let ordinals = select(None)?;
                    let n = ordinals.len() as u64;
                    (
                        vec![GroupPlan {
                            name: "all".into(),
                            ordinals,
                            quota: n,
                            target_share: None,
                        }],
                        0,
                        n,
                    )
                }
                Some(mixture) => {
                    let field = match mixture.by {
                        MixBy::Category => TermField::Category,
                        MixBy::Source => TermField::Source,
                    };
                    let mut groups = Vec::new();
                    for (name, &share) in mixture.shares.iter().filter(|(_, &s)| s > 0.0) {
                        let ordinals = select(Some(Expr::Term {
                            field,
                            value: name.clone(),
                        }))?;
                        groups.push(GroupPlan {
                            name: name.clone(),
                            ordinals,
                            quota: 0,
                            target_share: Some(share),
                        });
                    }
                    // A group the store has nothing for is left out and the other shares
                    // grow in proportion; the plan says so.
                    groups.retain(|g| {
                        if g.ordinals.is_empty() {
                            notes.push(format!(
                                "group `{}` has no examples; its share {} goes to the others",
                                g.name,
                                g.target_share.unwrap_or(0.0)
                            ));
                        }
                        !g.ordinals.is_empty()
                    });
                    let kept: f64 = groups.iter().filter_map(|g| g.target_share).sum();
                    for g in &mut groups {
                        g.target_share = g.target_share.map(|s| s / kept);
                    }
                    let selected = select(None)?.len() as u64;
                    let grouped: u64 = groups.iter().map(|g| g.ordinals.len() as u64).sum();
                    let per_epoch = if groups.is_empty() {
                        notes.push(
                            "no group of the mixture has examples: the phase is empty".into(),
                        );
                        0
                    } else {
                        mixture.examples.unwrap_or(grouped)
                    };
                    let quotas = apportion(
                        &groups
                            .iter()
                            .map(|g| g.target_share.unwrap_or(0.0))
                            .collect::<Vec<_>>(),
                        per_epoch,
                    );
                    for (group, quota) in groups.iter_mut().zip(quotas) {
                        let have = group.ordinals.len() as u64;
                        if quota > 0 && have == 0 {
                            return Err(phase_error(format!(
                                "group `{}` has no examples for its share",
                                group.name
                            )));
                        }
                        if quota > have && !mixture.upsample {
                            return Err(phase_error(format!(
                                "group `{}` needs {quota} examples per epoch but has {have}; set `upsample: true` or lower its share",
                                group.name
                            )));
                        }
                        if quota < have && !mixture.downsample {
                            return Err(phase_error(format!(
                                "group `{}` would use {quota} of its {have} examples per epoch; set `downsample: true` or raise its share",
                                group.name
                            )));
                        }
                        group.quota = quota;
                    }
                    (groups, selected.saturating_sub(grouped), per_epoch)
                }
            };
            if groups.len() > 255 {
                return Err(phase_error("a mixture has at most 255 groups".into()));
            }
            for group in &groups {
                hasher.update(group.name.as_bytes());
                hasher.update(group.quota.to_le_bytes());
                hash_all(&mut hasher, group.ordinals.iter().map(|o| o.to_le_bytes()));
            }
            let quotas: Vec<u64> = groups.iter().map(|g| g.quota).collect();
            debug_assert_eq!(quotas.iter().sum::<u64>(), per_epoch);
            let phase = PhasePlan {
                name: spec.name.clone(),
                epochs: spec.epochs,
                learning_rate: spec.learning_rate,
                seed: spec
                    .seed
                    .unwrap_or_else(|| order::key(&[curriculum.seed, index_in_plan as u64])),
                unmixed,
                notes,
                groups,
                per_epoch,
                start,
                schedule: Schedule::new(&quotas),
            };
            start += phase.len();
            phases.push(phase);
        }
        let eval = if threshold > 0 {
            selections.held_out()?
        } else {
            Vec::new()
        };
        hasher.update(b"eval");
        hash_all(&mut hasher, eval.iter().map(|o| o.to_le_bytes()));
        Ok(Plan {
            curriculum: curriculum.clone(),
            fingerprint: hex::encode(&hasher.finalize()[..8]),
            phases,
            eval,
            total: start,
        })
    }

    /// The example at a global position, `None` past the end.
    pub fn at(&self, position: u64) -> Option<Planned> {
        let (phase_index, phase) = self
            .phases
            .iter()
            .enumerate()
            .find(|(_, p)| position >= p.start && position < p.start + p.len())?;
        let offset = position - phase.start;
        let epoch = (offset / phase.per_epoch) as u32;
        let t = offset % phase.per_epoch;
        let (group_index, k) = phase.schedule.at(t);
        let group = &phase.groups[group_index];
        let size = group.ordinals.len() as u64;
        let (cycle, j) = (k / size, k % size);
        let permutation = Permutation::new(
            size,
            order::key(&[phase.seed, u64::from(epoch), group_index as u64, cycle]),
        );
        Some(Planned {
            position,
            ordinal: u64::from(group.ordinals[permutation.apply(j) as usize]),
            phase: phase_index,
            epoch,
            group: group_index,
        })
    }

    /// A sampler state at `position` of this plan.
    pub fn state(&self, position: u64) -> SamplerState {
        SamplerState {
            fingerprint: self.fingerprint.clone(),
            position,
        }
    }

    /// Checks that `state` belongs to this plan and returns its position.
    pub fn resume(&self, state: &SamplerState) -> Result<u64, Error> {
        if state.fingerprint != self.fingerprint {
            return Err(Error::Invalid(format!(
                "the sampler state belongs to plan {}, this is plan {}: the store or the curriculum changed",
                state.fingerprint, self.fingerprint
            )));
        }
        if state.position > self.total {
            return Err(Error::Invalid(format!(
                "position {} is past the plan's end ({})",
                state.position, self.total
            )));
        }
        Ok(state.position)
    }
}

/// Feeds every item's bytes to `hasher` a block at a time, not an `update` call per
/// 4-byte ordinal.
fn hash_all<const N: usize>(hasher: &mut Sha1, items: impl Iterator<Item = [u8; N]>) {
    let mut block = Vec::with_capacity(N * 4096);
    for item in items {
        block.extend_from_slice(&item);
        if block.len() == block.capacity() {
            hasher.update(&block);
            block.clear();
        }
    }
    hasher.update(&block);
}

/// The selections of one plan's build, each query run once: curricula repeat `*` and
/// mixtures (one scan of the whole index each at millions of examples), and the held-out
/// split comes from the first scan of everything.
struct Selections<'a> {
    index: &'a Index,
    /// Split keys at or above it train.
    threshold: u64,
    seen: Vec<(Expr, Arc<[u32]>)>,
    held_out: Option<Vec<u64>>,
}

impl Selections<'_> {
    /// The training examples (held-out ones left out) that `expr` selects, sorted.
    fn training(&mut self, expr: &Expr) -> Result<Arc<[u32]>, Error> {
        if let Some((_, ordinals)) = self.seen.iter().find(|(seen, _)| seen == expr) {
            return Ok(Arc::clone(ordinals));
        }
        let split = self.index.split_selection(expr, self.threshold)?;
        if *expr == Expr::All && self.held_out.is_none() {
            self.held_out = Some(split.below);
        }
        let out: Arc<[u32]> = split.rest.into();
        self.seen.push((expr.clone(), Arc::clone(&out)));
        Ok(out)
    }

    /// Every held-out example, sorted.
    fn held_out(&mut self) -> Result<Vec<u64>, Error> {
        if self.held_out.is_none() {
            self.training(&Expr::All)?;
        }
        Ok(self.held_out.take().expect("set by the scan of everything"))
    }
}

/// Splits `total` by `shares` into whole numbers that add up to `total` (largest
/// remainders get the leftover units; ties go to the earlier share).
pub fn apportion(shares: &[f64], total: u64) -> Vec<u64> {
    let sum: f64 = shares.iter().sum();
    if sum <= 0.0 {
        return vec![0; shares.len()];
    }
    let exact: Vec<f64> = shares.iter().map(|s| s / sum * total as f64).collect();
    let mut out: Vec<u64> = exact.iter().map(|e| e.floor() as u64).collect();
    let mut left = total - out.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for i in order {
        if left == 0 {
            break;
        }
        out[i] += 1;
        left -= 1;
    }
    out
}

/// What `corpusdb plan` reports of a plan: the phases with their groups, examples and
/// steps for a batch size, and tokens when counted. The CLI prints it as text or JSON
/// (these field names).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanReport {
    pub curriculum: String,
    pub fingerprint: String,
    pub examples: u64,
    pub held_out: usize,
    pub batch_size: u64,
    pub steps: u64,
    pub build_seconds: f64,
    pub phases: Vec<PhaseReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhaseReport {
    /// 1-based.
    pub phase: usize,
    pub name: String,
    pub select: String,
    pub epochs: u32,
    pub learning_rate: f64,
    pub per_epoch: u64,
    pub examples: u64,
    pub steps: u64,
    /// Tokens of the phase's examples, when a tokenizer counted them.
    pub tokens: Option<u64>,
    pub unmixed: u64,
    pub groups: Vec<GroupReport>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroupReport {
    pub name: String,
    pub available: usize,
    pub per_epoch: u64,
    /// How many times each available example is used per epoch, on average.
    pub repeat: f64,
    pub target_share: Option<f64>,
    /// The group's share of the phase's epoch.
    pub share: f64,
}

impl PlanReport {
    /// The report of `plan` with `batch_size` examples per step; `tokens` holds every
    /// example's token count by ordinal, when counted. `build_seconds` is how long the
    /// plan took to build.
    pub fn of(
        plan: &Plan,
        batch_size: u64,
        tokens: Option<&[u32]>,
        build_seconds: f64,
    ) -> PlanReport {
        let batch = batch_size.max(1);
        let phases: Vec<PhaseReport> = plan
            .phases
            .iter()
            .enumerate()
            .map(|(i, phase)| {
                let tokens = tokens.map(|counts| {
                    (phase.start..phase.start + phase.len())
                        .map(|p| u64::from(counts[plan.at(p).expect("in plan").ordinal as usize]))
                        .sum::<u64>()
                });
                let groups = phase
                    .groups
                    .iter()
                    .map(|g| GroupReport {
                        name: g.name.clone(),
                        available: g.ordinals.len(),
                        per_epoch: g.quota,
                        repeat: if g.ordinals.is_empty() {
                            0.0
                        } else {
                            g.quota as f64 / g.ordinals.len() as f64
                        },
                        target_share: g.target_share,
                        share: if phase.per_epoch == 0 {
                            0.0
                        } else {
                            g.quota as f64 / phase.per_epoch as f64
                        },
                    })
                    .collect();
                PhaseReport {
                    phase: i + 1,
                    name: phase.name.clone(),
                    select: plan.curriculum.phases[i].select.clone(),
                    epochs: phase.epochs,
                    learning_rate: phase.learning_rate,
                    per_epoch: phase.per_epoch,
                    examples: phase.len(),
                    steps: phase.len().div_ceil(batch),
                    tokens,
                    unmixed: phase.unmixed,
                    groups,
                    notes: phase.notes.clone(),
                }
            })
            .collect();
        PlanReport {
            curriculum: plan.curriculum.name.clone(),
            fingerprint: plan.fingerprint.clone(),
            examples: plan.total,
            held_out: plan.eval.len(),
            batch_size: batch,
            steps: phases.iter().map(|p| p.steps).sum(),
            build_seconds,
            phases,
        }
    }
}
