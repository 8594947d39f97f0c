//! AdamW (torch's update, step for step), the learning-rate schedule (open_clip's warmup then
//! cosine, or linear, or constant) and global gradient-norm clipping.
//!
//! candle-nn has an AdamW, but its moments are private: a run could not be resumed with the
//! same optimizer state. This one keeps them by parameter name and saves them.

use std::collections::{BTreeMap, HashMap};
use std::f64::consts::PI;

use candle_core::{Tensor, Var};

use super::options::{Schedule, TrainOptions};
use super::params::Param;
use crate::error::{Error, Result};

/// Gradients by parameter name, in a fixed order (so sums are the same every run).
pub type Grads = BTreeMap<String, Tensor>;

fn fail(e: candle_core::Error) -> Error {
    Error::Training(format!("optimizer: {}", crate::clip::candle_message(&e)))
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    slots: Vec<Slot>,
    /// Optimizer steps taken.
    pub t: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(params: &[Param], o: &TrainOptions) -> Result<AdamW> {
        let slots = params
            .iter()
            .filter_map(|p| p.var.clone().map(|var| (p, var)))
            .map(|(p, var)| {
                let zeros = var.zeros_like().map_err(fail)?;
                Ok(Slot {
                    name: p.name.clone(),
                    decay: p.decays(),
                    m: zeros.clone(),
                    v: zeros,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            slots,
            t: 0,
            beta1: o.adam_beta1,
            beta2: o.adam_beta2,
            eps: o.adam_eps,
            weight_decay: o.weight_decay,
        })
    }

    /// One update with `grads` (by parameter name; every trainable parameter must have one).
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        for s in &mut self.slots {
            let g = grads.get(&s.name).ok_or_else(|| {
                Error::Training(format!(
                    "no gradient reached {} (a bug in archaeclip: please report it)",
                    s.name
                ))
            })?;
            let run = || -> candle_core::Result<(Tensor, Tensor, Tensor)> {
                let wd = if s.decay { self.weight_decay } else { 0.0 };
                let param = (s.var.as_tensor() * (1.0 - lr * wd))?;
                // torch: m.lerp_(g, 1 - beta1), i.e. m + (1 - beta1) * (g - m).
                let m = (&s.m + ((g - &s.m)? * (1.0 - self.beta1))?)?;
                let v = ((&s.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
                let denom = ((v.sqrt()? / bias2_sqrt)? + self.eps)?;
                let param = (param - (m.div(&denom)? * (lr / bias1))?)?;
                Ok((param, m, v))
            };
            let (param, m, v) = run().map_err(fail)?;
            s.var.set(&param).map_err(fail)?;
            s.m = m;
            s.v = v;
        }
        Ok(())
    }

    /// The state as named tensors (`m.<name>`, `v.<name>`) plus the step count.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.slots.len() * 2);
        for s in &self.slots {
            out.push((format!("m.{}", s.name), s.m.clone()));
            out.push((format!("v.{}", s.name), s.v.clone()));
        }
        out
    }

    /// Restores the moments saved by [`AdamW::state`] and the step count.
    pub fn restore(&mut self, state: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for s in &mut self.slots {
            for (prefix, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{prefix}.{}", s.name);
                let saved = state.get(&key).ok_or_else(|| {
                    Error::Training(format!("the saved optimizer state has no {key}"))
                })?;
                if saved.dims() != slot.dims() {
                    return Err(Error::Training(format!(
                        "the saved optimizer state's {key} has shape {:?}, expected {:?}",
                        saved.dims(),
                        slot.dims()
                    )));
                }
                *slot = saved.clone();
            }
        }
        self.t = t;
        Ok(())
    }
}

/// The learning rate of optimizer step `step` (0-based) of `total`: open_clip's linear warmup
/// (`base * (step + 1) / warmup`), then cosine, linear or constant.
pub fn learning_rate(o: &TrainOptions, step: u64, total: u64) -> f64 {
    let base = o.lr;
    if step < o.warmup_steps {
        return base * (step + 1) as f64 / o.warmup_steps as f64;
    }
    let e = (step - o.warmup_steps) as f64;
    let es = total.saturating_sub(o.warmup_steps).max(1) as f64;
    let progress = (e / es).min(1.0);
    match o.schedule {
        Schedule::Cosine => 0.5 * (1.0 + (PI * progress).cos()) * base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Constant => base,
    }
}

/// Scales the gradients so that their global L2 norm is at most `max_norm` (torch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += f64::from(
            g.sqr()
                .and_then(|s| s.sum_all()?.to_scalar::<f32>())
                .map_err(fail)?,
        );
    }
    let norm = total.sqrt();
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            for g in grads.values_mut() {
                *g = (&*g * coef).map_err(fail)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let mut o =
            TrainOptions::parse(r#"{"output": "o", "lr": 1.0, "warmup_steps": 2}"#).unwrap();
        let lrs: Vec<f64> = (0..6).map(|s| learning_rate(&o, s, 6)).collect();
        assert_eq!(&lrs[..3], &[0.5, 1.0, 1.0]);
        assert!((lrs[4] - 0.5).abs() < 1e-12, "{lrs:?}");
        o.schedule = Schedule::Linear;
        assert!((learning_rate(&o, 4, 6) - 0.5).abs() < 1e-12);
        o.schedule = Schedule::Constant;
        assert_eq!(learning_rate(&o, 5, 6), 1.0);
    }
}
