//! AdamW (torch's update, step for step), the learning-rate schedule (open_clip's warmup then
//! cosine, or linear, or constant) and global gradient-norm clipping.
//!
//! candle-nn has an AdamW, but its moments are private: a run could not be resumed with the
//! same optimizer state. This one keeps them by parameter name and saves them.

use std::collections::{BTreeMap, HashMap};
use std::f64::consts::PI;

use candle_core::{Tensor, Var};
use rayon::prelude::*;

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
    /// The moments, as plain values: the update is one pass over parameter, gradient and
    /// moments (a chain of tensor ops made ~14 passes over the values: 1.1-1.6 s of a
    /// ViT-B/32 step, against 0.11-0.13 s).
    m: Vec<f32>,
    v: Vec<f32>,
}

/// Runs `f` on the f32 values of a CPU tensor.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    crate::clip::train_ops::with_values(t, "optimizer", f).map_err(fail)
}

/// Values per parallel piece of an update or a norm.
const PIECE: usize = 1 << 15;

/// An update of a parameter in place (candle gives mutable access to a tensor's values only
/// to an in-place op): `f(param, m, v, gradient)` on every value, in parallel pieces.
struct Update<'a, F> {
    moments: std::sync::Mutex<(&'a mut [f32], &'a mut [f32])>,
    g: &'a [f32],
    f: F,
}

impl<F: Fn(&mut f32, &mut f32, &mut f32, f32) + Sync> candle_core::InplaceOp1 for Update<'_, F> {
    fn name(&self) -> &'static str {
        "archaeclip-adamw"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (candle_core::CpuStorage::F32(values), Some((a, b))) =
            (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("adamw: expected a contiguous f32 parameter")
        };
        let mut moments = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        let (m, v) = &mut *moments;
        let p = &mut values[a..b];
        if p.len() != m.len() {
            candle_core::bail!("adamw: {} values against {} moments", p.len(), m.len())
        }
        p.par_chunks_mut(PIECE)
            .zip(m.par_chunks_mut(PIECE))
            .zip(v.par_chunks_mut(PIECE))
            .zip(self.g.par_chunks(PIECE))
            .for_each(|(((p, m), v), g)| {
                for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                    (self.f)(p, m, v, g);
                }
            });
        Ok(())
    }
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
                let n = var.elem_count();
                Ok(Slot {
                    name: p.name.clone(),
                    decay: p.decays(),
                    m: vec![0.0; n],
                    v: vec![0.0; n],
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

    /// One update with `grads` (by parameter name; every trainable parameter must have one),
    /// each gradient multiplied by `scale` first (the clipping factor), as torch's AdamW does
    /// it: decay, `m.lerp_(g, 1 - beta1)`, `v = beta2 v + (1 - beta2) g²`, then
    /// `p -= lr / (1 - beta1^t) · m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`, in f32.
    pub fn step(&mut self, grads: &Grads, lr: f64, scale: f64) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let (b1, b2) = ((1.0 - self.beta1) as f32, self.beta2 as f32);
        let (one_minus_b2, eps) = ((1.0 - self.beta2) as f32, self.eps as f32);
        let (step_size, bias2_sqrt) = ((lr / bias1) as f32, bias2_sqrt as f32);
        let scale = scale as f32;
        for s in &mut self.slots {
            let g = grads.get(&s.name).ok_or_else(|| {
                Error::Training(format!(
                    "no gradient reached {} (a bug in archaeclip: please report it)",
                    s.name
                ))
            })?;
            let wd = if s.decay { self.weight_decay } else { 0.0 };
            let keep = (1.0 - lr * wd) as f32;
            let (m, v) = (s.m.as_mut_slice(), s.v.as_mut_slice());
            with_values(g, |g| {
                if g.len() != m.len() {
                    return Err(Error::Training(format!(
                        "optimizer: the gradient of {} has {} values, not {}",
                        s.name,
                        g.len(),
                        m.len()
                    )));
                }
                let update = Update {
                    moments: std::sync::Mutex::new((m, v)),
                    g,
                    f: |p: &mut f32, m: &mut f32, v: &mut f32, g: f32| {
                        let g = g * scale;
                        *m += b1 * (g - *m);
                        *v = *v * b2 + one_minus_b2 * (g * g);
                        let denom = v.sqrt() / bias2_sqrt + eps;
                        *p = *p * keep - step_size * (*m / denom);
                    },
                };
                s.var.as_tensor().inplace_op1(&update).map_err(fail)
            })??;
        }
        Ok(())
    }

    /// The state as named tensors (`m.<name>`, `v.<name>`) plus the step count.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.slots.len() * 2);
        for s in &self.slots {
            for (prefix, values) in [("m", &s.m), ("v", &s.v)] {
                let t = Tensor::from_slice(values, s.var.shape(), &candle_core::Device::Cpu);
                out.push((
                    format!("{prefix}.{}", s.name),
                    t.expect("the variable's shape"),
                ));
            }
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
                if saved.dims() != s.var.dims() {
                    return Err(Error::Training(format!(
                        "the saved optimizer state's {key} has shape {:?}, expected {:?}",
                        saved.dims(),
                        s.var.dims()
                    )));
                }
                let saved = saved.to_dtype(candle_core::DType::F32).map_err(fail)?;
                *slot = with_values(&saved, <[f32]>::to_vec)?;
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

/// torch's `clip_grad_norm_`: the gradients' global L2 norm, and the factor that scales
/// them to at most `max_norm` (1 when they are within it, or when `max_norm` is 0).
pub fn clip_grad_norm(grads: &Grads, max_norm: f64) -> Result<(f64, f64)> {
    let mut total = 0f64;
    for g in grads.values() {
        total += with_values(g, |g| {
            g.par_chunks(PIECE)
                .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
                .sum::<f64>()
        })?;
    }
    let norm = total.sqrt();
    let coef = if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    Ok((norm, coef))
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
