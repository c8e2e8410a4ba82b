//! AdamW (PyTorch's decoupled weight decay), global-norm clipping and the per-phase
//! learning-rate schedule. The optimizer's moments are plain tensors keyed like the
//! adapter's variables, so a checkpoint saves and restores them exactly.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay; 0 as in PEFT/TRL's LoRA recipes.
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: 0.0,
            max_grad_norm: default_clip(),
        }
    }
}

pub struct AdamW {
    pub config: OptimizerConfig,
    /// Updates done so far (for bias correction).
    pub steps: u64,
    /// First and second moments by variable key.
    pub moments: HashMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(config: OptimizerConfig) -> AdamW {
        AdamW {
            config,
            steps: 0,
            moments: HashMap::new(),
        }
    }

    /// One update of every variable with its gradient.
    pub fn step(
        &mut self,
        params: &[(String, &Var)],
        grads: &HashMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.steps += 1;
        let c = &self.config;
        let t = self.steps as i32;
        let (correction1, correction2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (key, var) in params {
            let Some(grad) = grads.get(key) else { continue };
            let (m, v) = match self.moments.remove(key) {
                Some(mv) => mv,
                None => (grad.zeros_like()?, grad.zeros_like()?),
            };
            let m = ((m * c.beta1)? + (grad * (1.0 - c.beta1))?)?;
            let v = ((v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / correction1)? / ((&v / correction2)?.sqrt()? + c.eps)?)?;
            let mut value = var.as_tensor().detach();
            if c.weight_decay > 0.0 {
                value = (value * (1.0 - lr * c.weight_decay))?;
            }
            var.set(&(value - (update * lr)?)?)?;
            self.moments.insert(key.clone(), (m, v));
        }
        Ok(())
    }
}

/// Scales the gradients so that their global L2 norm is at most `max_norm`; returns the
/// norm before clipping.
pub fn clip_global_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    let mut keys: Vec<&String> = grads.keys().collect();
    keys.sort();
    for key in keys {
        total += grads[key]
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// How the learning rate moves within a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    #[default]
    Cosine,
    Linear,
    Constant,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Linear warmup at the start of every phase, in optimizer steps...
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    /// ...or as a fraction of the phase's steps (used when `warmup_steps` is absent).
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub decay: Decay,
    /// Where the decay heads, as a fraction of the phase's rate (as in transformers'
    /// schedules, the phase's last step is one step short of it).
    #[serde(default = "default_min_ratio")]
    pub min_lr_ratio: f64,
}

fn default_warmup_ratio() -> f64 {
    0.03
}
fn default_min_ratio() -> f64 {
    0.1
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            warmup_steps: None,
            warmup_ratio: default_warmup_ratio(),
            decay: Decay::default(),
            min_lr_ratio: default_min_ratio(),
        }
    }
}

impl ScheduleConfig {
    /// The learning rate of step `step` (0-based) of a phase of `steps` steps whose
    /// curriculum rate is `peak`.
    pub fn rate(&self, peak: f64, step: u64, steps: u64) -> f64 {
        let steps = steps.max(1);
        let warmup = self
            .warmup_steps
            .unwrap_or_else(|| (self.warmup_ratio * steps as f64).round() as u64)
            .min(steps - 1);
        if step < warmup {
            return peak * (step + 1) as f64 / (warmup + 1) as f64;
        }
        let span = (steps - warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
        let floor = peak * self.min_lr_ratio;
        match self.decay {
            Decay::Constant => peak,
            Decay::Linear => floor + (peak - floor) * (1.0 - progress),
            Decay::Cosine => {
                floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}
