//! The options of a training run (the JSON object of `clip_train`'s third argument), with
//! HuggingFace/open_clip defaults and checks that name the option.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which parameters stay fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Freeze {
    /// Everything trains.
    None,
    /// The vision tower and the visual projection are fixed (LiT): image features are computed
    /// once and reused every epoch.
    Vision,
    /// The text tower and the text projection are fixed.
    Text,
}

/// The learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// The arithmetic of the linear layers' products in a step (forward, dX and dW).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainPrecision {
    /// float32 throughout, as torch and transformers train by default.
    #[default]
    Fp32,
    /// Mixed precision: the products' inputs rounded to bf16 and their sums kept in float32,
    /// on AMX tiles or with AVX512_BF16 ([`crate::clip::Bf16Engine`]); weights, optimizer
    /// state, gradients' sums, layer norms, attention and the loss stay float32 (what torch's
    /// `autocast(dtype=torch.bfloat16)` does to matmuls).
    Bf16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainOptions {
    /// The directory the model is written to (required).
    pub output: Option<String>,
    /// Register the output under this name in temp.clip_models when a checkpoint lands
    /// (default: the output directory's last component).
    pub name: Option<String>,
    pub epochs: u32,
    /// Stop after this many optimizer steps (and size the schedule by it).
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    /// Micro-batches per optimizer step (in-batch negatives stay within a micro-batch).
    pub gradient_accumulation: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Clip the global gradient norm to this (0: no clipping). HF Trainer's default is 1.0.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// `fp32` (default) or `bf16` (mixed precision on AMX tiles or AVX512_BF16).
    pub precision: TrainPrecision,
    #[serde(deserialize_with = "flag")]
    pub shuffle: bool,
    /// Rows held for shuffling a streamed epoch (bounded memory: their encoded bytes).
    pub shuffle_buffer: usize,
    pub freeze: Freeze,
    /// Train only the last N encoder layers of each unfrozen tower (plus its final layer
    /// norm, its projection and the temperature); embeddings and earlier layers stay fixed.
    pub train_last_layers: Option<usize>,
    /// A SELECT of (image, caption) pairs to evaluate on.
    pub validation: Option<String>,
    /// Evaluate every N steps (0: at the end of every epoch).
    pub eval_every: u64,
    /// Write a checkpoint every N steps (0: at the end of every epoch); always at the end.
    pub save_every: u64,
    /// `random`: start from random weights (transformers' initialization, seeded by `seed`);
    /// the model directory then needs only `config.json`.
    pub init: Option<String>,
    /// Continue the run saved in `output`.
    #[serde(deserialize_with = "flag")]
    pub resume: bool,
    /// Replace what is in `output` (without it, a non-empty output directory is refused).
    #[serde(deserialize_with = "flag")]
    pub overwrite: bool,
    /// Write the optimizer state into the final model too (needed to resume from it).
    #[serde(deserialize_with = "flag")]
    pub save_optimizer: bool,
    /// Progress lines on stderr.
    #[serde(deserialize_with = "flag")]
    pub progress: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            output: None,
            name: None,
            epochs: 1,
            max_steps: None,
            batch_size: 32,
            gradient_accumulation: 1,
            lr: 5e-5,
            weight_decay: 0.2,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            precision: TrainPrecision::Fp32,
            shuffle: true,
            shuffle_buffer: 4096,
            freeze: Freeze::None,
            train_last_layers: None,
            validation: None,
            eval_every: 0,
            save_every: 0,
            init: None,
            resume: false,
            overwrite: false,
            save_optimizer: true,
            progress: false,
        }
    }
}

/// A boolean option: JSON true/false, or 1/0 (SQLite has no booleans: `json_object('shuffle',
/// 0)` gives 0).
fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Bool(b) => Ok(b),
        serde_json::Value::Number(n) if n.as_i64() == Some(0) => Ok(false),
        serde_json::Value::Number(n) if n.as_i64() == Some(1) => Ok(true),
        other => Err(serde::de::Error::custom(format!(
            "expected true/false or 1/0, found {other}"
        ))),
    }
}

/// Largest batch (a batch's activations are held for the backward pass).
pub const MAX_BATCH: usize = 4096;

fn bad(option: &str, what: impl std::fmt::Display) -> Error {
    Error::Options(format!("'{option}': {what}"))
}

impl TrainOptions {
    /// Parses and checks the JSON options.
    pub fn parse(json: &str) -> Result<TrainOptions> {
        let o: TrainOptions = serde_json::from_str(json)
            .map_err(|e| Error::Options(format!("invalid options: {e}")))?;
        o.check()?;
        Ok(o)
    }

    pub fn check(&self) -> Result<()> {
        match &self.output {
            None => {
                return Err(bad(
                    "output",
                    "required: the directory to write the model to",
                ))
            }
            Some(o) if o.trim().is_empty() => return Err(bad("output", "empty path")),
            _ => {}
        }
        if self.epochs == 0 {
            return Err(bad("epochs", "must be at least 1"));
        }
        if self.max_steps == Some(0) {
            return Err(bad("max_steps", "must be at least 1"));
        }
        if !(2..=MAX_BATCH).contains(&self.batch_size) {
            return Err(bad(
                "batch_size",
                format!(
                    "must be between 2 and {MAX_BATCH} (contrastive loss needs in-batch negatives)"
                ),
            ));
        }
        if !(1..=1024).contains(&self.gradient_accumulation) {
            return Err(bad("gradient_accumulation", "must be between 1 and 1024"));
        }
        let finite = |name: &str, v: f64, lo: f64, hi: f64| {
            if v.is_finite() && v >= lo && v <= hi {
                Ok(())
            } else {
                Err(bad(name, format!("must be between {lo} and {hi}, got {v}")))
            }
        };
        finite("lr", self.lr, 0.0, 1.0)?;
        if self.lr == 0.0 {
            return Err(bad("lr", "must be positive"));
        }
        finite("weight_decay", self.weight_decay, 0.0, 10.0)?;
        finite("adam_beta1", self.adam_beta1, 0.0, 0.999_999)?;
        finite("adam_beta2", self.adam_beta2, 0.0, 0.999_999_9)?;
        finite("adam_eps", self.adam_eps, 0.0, 1.0)?;
        finite("max_grad_norm", self.max_grad_norm, 0.0, 1e9)?;
        if !(2..=1 << 24).contains(&self.shuffle_buffer) {
            return Err(bad("shuffle_buffer", "must be between 2 and 16777216 rows"));
        }
        if self.train_last_layers == Some(0) {
            return Err(bad(
                "train_last_layers",
                "must be at least 1 (use freeze to fix a whole tower)",
            ));
        }
        if let Some(v) = &self.validation {
            if v.trim().is_empty() {
                return Err(bad("validation", "empty statement"));
            }
        }
        if let Some(init) = &self.init {
            if init != "random" {
                return Err(bad(
                    "init",
                    format!("'{init}' is not supported (only 'random')"),
                ));
            }
        }
        if self.precision == TrainPrecision::Bf16 && crate::clip::Bf16Engine::detect().is_none() {
            return Err(bad(
                "precision",
                "'bf16' runs the products on AMX tiles (Intel Xeon 4th generation or later) or \
                 with AVX512_BF16 (AMD Zen 4 or later), which this CPU (or its OS) does not \
                 offer: use 'fp32'",
            ));
        }
        if self.resume && self.overwrite {
            return Err(bad("overwrite", "cannot be combined with resume"));
        }
        Ok(())
    }

    /// The options that must not change when a run is resumed.
    pub fn fingerprint(&self) -> serde_json::Value {
        serde_json::json!({
            "batch_size": self.batch_size, "gradient_accumulation": self.gradient_accumulation,
            "lr": self.lr, "weight_decay": self.weight_decay, "warmup_steps": self.warmup_steps,
            "schedule": self.schedule, "adam_beta1": self.adam_beta1, "adam_beta2": self.adam_beta2,
            "adam_eps": self.adam_eps, "max_grad_norm": self.max_grad_norm, "seed": self.seed,
            "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer, "freeze": self.freeze,
            "train_last_layers": self.train_last_layers, "init": self.init,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors_name_the_option() {
        let o = TrainOptions::parse(r#"{"output": "out"}"#).unwrap();
        assert_eq!((o.batch_size, o.epochs, o.max_grad_norm), (32, 1, 1.0));
        let o = TrainOptions::parse(r#"{"output": "out", "shuffle": 0, "resume": 1}"#).unwrap();
        assert!(!o.shuffle && o.resume);
        for (json, needle) in [
            (r#"{}"#, "'output': required"),
            (r#"{"output": "o", "batch_size": 1}"#, "'batch_size'"),
            (r#"{"output": "o", "lr": -1}"#, "'lr'"),
            (r#"{"output": "o", "lr": 0}"#, "'lr': must be positive"),
            (
                r#"{"output": "o", "freeze": "legs"}"#,
                "unknown variant `legs`",
            ),
            (r#"{"output": "o", "epoch": 3}"#, "unknown field `epoch`"),
            (
                r#"{"output": "o", "resume": true, "overwrite": true}"#,
                "'overwrite'",
            ),
            (
                r#"{"output": "o", "shuffle": 2}"#,
                "expected true/false or 1/0, found 2",
            ),
        ] {
            let e = TrainOptions::parse(json).unwrap_err().to_string();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }
}
