//! Checkpoints: `<output>/checkpoints/step-00000500/` holds the adapter in PEFT's format,
//! `optimizer.safetensors` (AdamW moments as `m/<key>` and `v/<key>`) and
//! `trainer_state.json` (step, seed, sampler position, phase, optimizer step count).
//! A checkpoint is written to a temporary directory and renamed into place, so a crash
//! never leaves a half-written one that `--resume` would pick up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{io_error, AdamW, Error};
use crate::curriculum::SamplerState;
use crate::model::Lora;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    pub seed: u64,
    /// Where the next step's batches start.
    pub sampler: SamplerState,
    pub phase: String,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    #[serde(flatten)]
    state: TrainerState,
    optimizer_steps: u64,
}

/// A checkpoint directory found on disk.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub step: u64,
}

fn name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<Checkpoint>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(dir))?;
        let file_name = entry.file_name();
        let Some(step) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join("trainer_state.json").exists() {
            out.push(Checkpoint {
                dir: entry.path(),
                step,
            });
        }
    }
    out.sort_by_key(|c| c.step);
    Ok(out)
}

pub fn latest(dir: &Path) -> Result<Option<PathBuf>, Error> {
    Ok(list(dir)?.pop().map(|c| c.dir))
}

/// Writes a checkpoint for `state.step`; returns its directory.
pub fn save(
    dir: &Path,
    lora: &Lora,
    optimizer: &AdamW,
    state: &TrainerState,
    base_model: &str,
) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let target = dir.join(name(state.step));
    let staging = dir.join(format!(".{}.partial", name(state.step)));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
    }
    lora.save_peft(&staging, base_model)
        .map_err(|e| Error::Checkpoint(e.0))?;
    let mut moments: HashMap<String, Tensor> = HashMap::new();
    for (key, (m, v)) in &optimizer.moments {
        moments.insert(format!("m/{key}"), m.clone());
        moments.insert(format!("v/{key}"), v.clone());
    }
    let file = staging.join("optimizer.safetensors");
    candle_core::safetensors::save(&moments, &file)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", file.display())))?;
    let file = staging.join("trainer_state.json");
    let text = serde_json::to_string_pretty(&StateFile {
        state: state.clone(),
        optimizer_steps: optimizer.steps,
    })
    .expect("json");
    std::fs::write(&file, text + "\n").map_err(io_error(&file))?;
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(io_error(&target))?;
    }
    std::fs::rename(&staging, &target).map_err(io_error(&target))?;
    Ok(target)
}

/// Restores the adapter and optimizer from a checkpoint; returns its trainer state.
pub fn load(
    dir: &Path,
    lora: &mut Lora,
    optimizer: &mut AdamW,
    device: &Device,
) -> Result<TrainerState, Error> {
    let file = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&file).map_err(io_error(&file))?;
    let state: StateFile = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", file.display())))?;
    let adapter = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&adapter, device)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", adapter.display())))?;
    lora.assign(&tensors).map_err(|e| {
        Error::Checkpoint(format!(
            "{}: {e} (was it trained with other LoRA settings?)",
            adapter.display()
        ))
    })?;
    let file = dir.join("optimizer.safetensors");
    let moments = candle_core::safetensors::load(&file, device)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", file.display())))?;
    optimizer.moments.clear();
    for (key, _) in lora.named_vars() {
        if let (Some(m), Some(v)) = (
            moments.get(&format!("m/{key}")),
            moments.get(&format!("v/{key}")),
        ) {
            optimizer.moments.insert(key, (m.clone(), v.clone()));
        }
    }
    optimizer.steps = state.optimizer_steps;
    Ok(state.state)
}

/// Deletes all but the newest `keep` checkpoints, and staging directories a crash left.
pub fn prune(dir: &Path, keep: usize) -> Result<(), Error> {
    let all = list(dir)?;
    for old in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(&old.dir).map_err(io_error(&old.dir))?;
    }
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") && name.ends_with(".partial") {
            std::fs::remove_dir_all(entry.path()).map_err(io_error(&entry.path()))?;
        }
    }
    Ok(())
}

/// Renames checkpoints after `step` to `abandoned-step-N` (a run resumed from an earlier
/// checkpoint replaces them); returns how many.
pub fn set_aside_after(dir: &Path, step: u64) -> Result<usize, Error> {
    let mut moved = 0;
    for later in list(dir)?.into_iter().filter(|c| c.step > step) {
        let mut target = dir.join(format!("abandoned-{}", name(later.step)));
        let mut n = 1;
        while target.exists() {
            target = dir.join(format!("abandoned-{}-{n}", name(later.step)));
            n += 1;
        }
        std::fs::rename(&later.dir, &target).map_err(io_error(&target))?;
        moved += 1;
    }
    Ok(moved)
}
