//! CLIP inference on the CPU as a handful of fused passes over plain buffers.
//!
//! The same arithmetic as transformers' `CLIPModel` (and as [`super::model`]'s candle modules,
//! which training still uses), organised for speed:
//! - every linear layer is one product straight into its destination ([`super::matmul`], with
//!   weights packed at load); what surrounds it (setting the bias, adding it to the residual
//!   stream, fc1's bias + activation) runs inside the product's tasks on each block of the
//!   output while it is in cache, so no pass over a batch's activations is left but the
//!   products, layer norm and attention;
//! - q, k and v are one matrix product (their weights are concatenated at load, the attention
//!   scale folded into q's);
//! - layer norm, bias + activation and the attention softmax are single passes per row, compiled
//!   for AVX-512, AVX2/FMA (or NEON) with a runtime check, spread over the cores with rayon;
//! - attention runs per sequence (or per (sequence, head) when there are few) on the cores, as
//!   two products on the same kernel that read q and write the output in place;
//! - the big working buffers are kept between calls ([`Scratch`]).
//!
//! candle composed these as ~25 allocating tensor ops per layer: at batch 32 its forward pass
//! took 68 ms an image, of which the same products timed alone take ~40 (BENCHMARKS.md, "CLIP
//! throughput").

use std::ops::Range;
use std::sync::Mutex;

use candle_core::{Result, Shape};
use candle_nn::VarBuilder;
use multiversion::multiversion;
use rayon::prelude::*;

use super::config::{Activation, ClipConfig, TowerConfig};
use super::matmul::{Packed, Precision, Start};

fn get(vb: &VarBuilder, shape: impl Into<Shape>, name: &str) -> Result<Vec<f32>> {
    vb.get(shape, name)?.flatten_all()?.to_vec1::<f32>()
}

/// A linear layer, its weight packed for [`Packed::product`].
struct Linear {
    weight: Packed,
    bias: Option<Vec<f32>>,
}

impl Linear {
    fn load(
        vb: VarBuilder,
        n_in: usize,
        n_out: usize,
        bias: bool,
        precision: Precision,
    ) -> Result<Linear> {
        let (weight, bias) = Linear::raw(vb, n_in, n_out, bias)?;
        Ok(Linear {
            weight: Packed::from_rows_in(&weight, n_out, n_in, precision),
            bias,
        })
    }

    /// The weight (n_out, n_in) row-major as stored, and the bias.
    fn raw(
        vb: VarBuilder,
        n_in: usize,
        n_out: usize,
        bias: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let weight = get(&vb, (n_out, n_in), "weight")?;
        let bias = if bias {
            Some(get(&vb, n_out, "bias")?)
        } else {
            None
        };
        Ok((weight, bias))
    }

    /// `y (rows, n_out) = x (rows, n_in) · weightᵀ + bias`.
    fn forward(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        self.forward_cols(x, rows, y, 0..self.weight.n_out());
    }

    /// [`Linear::forward`] for the output columns `cols` only (`y` is (rows, cols.len())); the
    /// start must satisfy [`Packed::splits_at`].
    fn forward_cols(&self, x: &[f32], rows: usize, y: &mut [f32], cols: Range<usize>) {
        let start = match &self.bias {
            Some(b) => Start::Fill(&b[cols.clone()]),
            None => Start::Zero,
        };
        self.weight.product(x, rows, y, cols, start, None);
    }

    /// `y += x · weightᵀ + bias` (a residual connection).
    fn accumulate_with_bias(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let start = match &self.bias {
            Some(b) => Start::Add(b),
            None => Start::Keep,
        };
        self.weight
            .product(x, rows, y, 0..self.weight.n_out(), start, None);
    }

    /// `y = act(x · weightᵀ + bias)` (the MLP's first layer), the bias and activation applied
    /// to each block of y as the product completes it.
    fn forward_act(&self, x: &[f32], rows: usize, y: &mut [f32], act: Activation) {
        let n = self.weight.n_out();
        let zeros;
        let b = match &self.bias {
            Some(b) => b,
            None => {
                zeros = vec![0.0; n];
                &zeros
            }
        };
        let finish = |seg: &mut [f32], col: usize| bias_act_row(seg, &b[col..col + seg.len()], act);
        self.weight
            .product(x, rows, y, 0..n, Start::Zero, Some(&finish));
    }
}

/// A forward pass's big working buffers, kept between calls: at batch 32 they are ~80 MB, and
/// fresh memory costs the kernel a page fault and a zeroed page per 4 KiB (this machine's VM
/// touched fresh memory at ~1-2 GB/s; keeping them made batch 32 2.6% faster). Concurrent
/// passes each take their own; at most [`SCRATCH_BYTES`] are kept.
#[derive(Default)]
struct Scratch(Mutex<Vec<Vec<f32>>>);

/// What [`Scratch`] keeps at most between calls.
const SCRATCH_BYTES: usize = 128 << 20;

impl Scratch {
    /// A buffer of `len` values with unspecified contents: every user overwrites all of it.
    fn take(&self, len: usize) -> Buffer<'_> {
        let mut free = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let fits = (0..free.len())
            .filter(|&i| free[i].capacity() >= len)
            .min_by_key(|&i| free[i].capacity());
        let mut v = match fits {
            Some(i) => free.swap_remove(i),
            None => Vec::new(),
        };
        drop(free);
        // Shrinking keeps the capacity; growing writes zeros beyond the old length only.
        v.resize(len, 0.0);
        Buffer { v, scratch: self }
    }
}

/// A buffer of [`Scratch`], given back when dropped.
struct Buffer<'a> {
    v: Vec<f32>,
    scratch: &'a Scratch,
}

impl std::ops::Deref for Buffer<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v
    }
}

impl std::ops::DerefMut for Buffer<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        let mut free = self.scratch.0.lock().unwrap_or_else(|p| p.into_inner());
        let kept: usize = free.iter().map(|v| v.capacity() * 4).sum();
        if kept + self.v.capacity() * 4 <= SCRATCH_BYTES {
            free.push(std::mem::take(&mut self.v));
        }
    }
}

/// Work smaller than this many values runs on the calling thread: waking rayon's workers for it
/// costs more than it saves (a caption's rows, a single image's layer norms).
const SERIAL_BELOW: usize = 1 << 16;

/// Runs `f(row_index, row)` over the rows of `buf` on rayon's threads, in chunks big enough to
/// be worth a task.
pub(super) fn par_rows(buf: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if width == 0 {
        return;
    }
    let rows = buf.len() / width;
    if buf.len() < SERIAL_BELOW {
        for (i, row) in buf.chunks_exact_mut(width).enumerate() {
            f(i, row);
        }
        return;
    }
    let per_task = (rows / (4 * rayon::current_num_threads())).max(1);
    buf.par_chunks_mut(per_task * width)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, row) in chunk.chunks_exact_mut(width).enumerate() {
                f(c * per_task + i, row);
            }
        });
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub(super) fn add_assign(y: &mut [f32], b: &[f32]) {
    for (y, b) in y.iter_mut().zip(b) {
        *y += b;
    }
}

/// Sum of a slice in 16 independent lanes (vectorizes; f32 addition is not reassociated).
#[inline(always)]
pub(super) fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            acc[l] += f(c[l]);
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&v| f(v)).sum::<f32>()
}

/// The largest value of `x` (NaNs skipped, -inf for none), in 16 lanes: a plain fold is a
/// chain of dependent scalar maxima, about 40-45% of a softmax over 50 scores in perf.
#[inline(always)]
pub(super) fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter()
        .chain(tail)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// transformers' `nn.LayerNorm` (weight and bias).
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            weight: get(&vb, size, "weight")?,
            bias: get(&vb, size, "bias")?,
            eps: eps as f32,
        })
    }

    /// `out`'s rows are the normalized rows of `x`.
    fn forward(&self, x: &[f32], out: &mut [f32]) {
        let h = self.weight.len();
        par_rows(out, h, |i, row| {
            norm_row(
                &x[i * h..(i + 1) * h],
                &self.weight,
                &self.bias,
                self.eps,
                row,
            )
        });
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub(super) fn norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let (mean, inv) = row_stats(x, eps);
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mean) * inv * w + b;
    }
}

/// A row's mean and 1/sqrt(variance + eps), as layer norm uses them.
#[inline(always)]
pub(super) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lane_sum(x, |v| v) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `exp` to about 1 ulp (Cephes' expf: a degree-6 polynomial on the reduced argument), written
/// so that a loop of it vectorizes. The argument is clamped to [-87.3, 88.3], so very negative
/// arguments give about 1e-38 instead of 0 (a softmax weight or sigmoid that small is 0 in
/// every sum it enters).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// erf to about 5e-7 in f32 (Abramowitz and Stegun 7.1.26: 1.5e-7 in exact arithmetic),
/// vectorizable.
#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let y = 1.0 - poly * exp(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// quick_gelu: `v · sigmoid(1.702 v)`.
#[inline(always)]
pub(super) fn quick_gelu(v: f32) -> f32 {
    v / (1.0 + exp(-1.702 * v))
}

/// The exact (erf) GELU.
#[inline(always)]
pub(super) fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU with the tanh approximation; tanh(u) = 1 - 2 / (exp(2u) + 1).
#[inline(always)]
pub(super) fn gelu_tanh(v: f32) -> f32 {
    let u = 0.797_884_6 * (v + 0.044_715 * v * v * v);
    0.5 * v * (2.0 - 2.0 / (exp(2.0 * u) + 1.0))
}

/// `y = act(y + b)` over one row.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn bias_act_row(y: &mut [f32], b: &[f32], act: Activation) {
    match act {
        Activation::QuickGelu => {
            for (y, b) in y.iter_mut().zip(b) {
                *y = quick_gelu(*y + b);
            }
        }
        Activation::Gelu => {
            for (y, b) in y.iter_mut().zip(b) {
                *y = gelu(*y + b);
            }
        }
        Activation::GeluTanh => {
            for (y, b) in y.iter_mut().zip(b) {
                *y = gelu_tanh(*y + b);
            }
        }
    }
}

/// Softmax attention for the head whose values are columns `col..col + d` of one sequence's
/// `at`, into `out` (one row of `d` values per query, `out_stride` apart; they must be zero),
/// as two products on the kernel of the linear layers: scores = Q·Kᵀ (K packed as the
/// "weight", one output per key), a softmax per row (keys past a causal query's position get
/// weight 0), then P·V (V packed by columns, one output per head dimension). Q carries the
/// 1/sqrt(d) scale and is read in place.
fn attend(
    at: &Heads,
    col: usize,
    seq: usize,
    d: usize,
    causal: bool,
    out: &mut [f32],
    out_stride: usize,
) {
    let queries = at.positions.len();
    // Packed straight from the rows of `kv`: key j is output j; value row kk is input kk.
    let (kv, stride, k_at, v_at) = (at.kv, at.kv_stride, at.k_at + col, at.v_at + col);
    let keys = Packed::from_fn(seq, d, |kk, j| kv[k_at + j * stride + kk]);
    let values = Packed::from_fn(d, seq, |kk, j| kv[v_at + kk * stride + j]);
    let mut scores = vec![0f32; queries * seq];
    keys.accumulate_serial_strided(&at.q[col..], at.q_stride, queries, &mut scores, seq);
    for (row, &pos) in scores.chunks_exact_mut(seq).zip(at.positions) {
        let visible = if causal { pos + 1 } else { seq };
        softmax_row(row, visible);
    }
    values.accumulate_serial_strided(&scores, seq, queries, out, out_stride);
}

/// Softmax of `row[..visible]` in place; the rest of the row becomes 0.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub(super) fn softmax_row(row: &mut [f32], visible: usize) {
    let (s, masked) = row.split_at_mut(visible);
    masked.fill(0.0);
    let max = lane_max(s);
    for v in s.iter_mut() {
        *v = exp(*v - max);
    }
    let inv = 1.0 / lane_sum(s, |v| v);
    for v in s.iter_mut() {
        *v *= inv;
    }
}

struct Layer {
    norm1: Norm,
    /// q, k and v in one (3 * hidden, hidden) matrix; q's rows are pre-scaled.
    qkv: Linear,
    out: Linear,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
}

impl Layer {
    fn load(vb: VarBuilder, c: &TowerConfig, precision: Precision) -> Result<Layer> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let attn = vb.pp("self_attn");
        let scale = ((h / c.num_attention_heads) as f32).powf(-0.5);
        let (mut weight, q_bias) = Linear::raw(attn.pp("q_proj"), h, h, true)?;
        weight.iter_mut().for_each(|w| *w *= scale);
        let mut bias = q_bias.unwrap_or_default();
        bias.iter_mut().for_each(|b| *b *= scale);
        for name in ["k_proj", "v_proj"] {
            let (w, b) = Linear::raw(attn.pp(name), h, h, true)?;
            weight.extend_from_slice(&w);
            bias.extend_from_slice(&b.unwrap_or_default());
        }
        Ok(Layer {
            norm1: Norm::load(vb.pp("layer_norm1"), h, c.layer_norm_eps)?,
            qkv: Linear {
                weight: Packed::from_rows_in(&weight, 3 * h, h, precision),
                bias: Some(bias),
            },
            out: Linear::load(attn.pp("out_proj"), h, h, true, precision)?,
            norm2: Norm::load(vb.pp("layer_norm2"), h, c.layer_norm_eps)?,
            fc1: Linear::load(vb.pp("mlp").pp("fc1"), h, i, true, precision)?,
            fc2: Linear::load(vb.pp("mlp").pp("fc2"), i, h, true, precision)?,
        })
    }
}

/// A tower's transformer encoder.
struct Encoder {
    layers: Vec<Layer>,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    act: Activation,
}

impl Encoder {
    fn load(vb: VarBuilder, c: &TowerConfig, precision: Precision) -> Result<Encoder> {
        let vb = vb.pp("encoder").pp("layers");
        Ok(Encoder {
            layers: (0..c.num_hidden_layers)
                .map(|i| Layer::load(vb.pp(i.to_string()), c, precision))
                .collect::<Result<_>>()?,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            act: c.activation,
        })
    }

    /// Runs the encoder over `x`: `batch` sequences of `seq` rows of `hidden` values each.
    /// Returns only what pooling reads: the row at `pooled[b]` of each sequence b after the
    /// last layer, (batch, hidden). The last layer computes keys and values for every row but
    /// everything else for those rows alone (transformers computes all of it and discards it:
    /// ~7% of a tower's work).
    fn forward(
        &self,
        scratch: &Scratch,
        x: &mut [f32],
        batch: usize,
        seq: usize,
        causal: bool,
        pooled: &[usize],
    ) -> Vec<f32> {
        let (h, rows) = (self.hidden, batch * seq);
        assert!(pooled.len() == batch && pooled.iter().all(|&p| p < seq));
        let picked_rows = |x: &[f32]| -> Vec<f32> {
            (0..batch)
                .flat_map(|b| x[(b * seq + pooled[b]) * h..][..h].iter().copied())
                .collect()
        };
        let Some((last, layers)) = self.layers.split_last() else {
            return picked_rows(x);
        };
        let every: Vec<usize> = (0..seq).collect();
        let mut normed = scratch.take(rows * h);
        let mut qkv = scratch.take(rows * 3 * h);
        let mut attended = scratch.take(rows * h);
        let mut mlp = scratch.take(rows * self.intermediate);
        for layer in layers {
            layer.norm1.forward(x, &mut normed);
            layer.qkv.forward(&normed, rows, &mut qkv);
            let qkv_of = |b: usize| Heads {
                q: &qkv[b * seq * 3 * h..],
                q_stride: 3 * h,
                positions: &every,
                kv: &qkv[b * seq * 3 * h..],
                k_at: h,
                v_at: 2 * h,
                kv_stride: 3 * h,
            };
            self.attention(batch, seq, causal, qkv_of, &mut attended);
            layer.out.accumulate_with_bias(&attended, rows, x);
            self.mlp(layer, x, rows, &mut normed, &mut mlp);
        }
        // The last layer: keys and values for every row, the rest for the pooled rows.
        last.norm1.forward(x, &mut normed);
        let mut picked = picked_rows(x);
        let mut q = vec![0f32; batch * 3 * h];
        last.qkv.forward(&picked_rows(&normed), batch, &mut q);
        let (kv, kv_width, kv_at) = if last.qkv.weight.splits_at(h) {
            let mut kv = scratch.take(rows * 2 * h);
            last.qkv.forward_cols(&normed, rows, &mut kv, h..3 * h);
            (kv, 2 * h, 0)
        } else {
            last.qkv.forward(&normed, rows, &mut qkv);
            (qkv, 3 * h, h)
        };
        let one = |b: usize| Heads {
            q: &q[b * 3 * h..],
            q_stride: 3 * h,
            positions: &pooled[b..b + 1],
            kv: &kv[b * seq * kv_width..],
            k_at: kv_at,
            v_at: kv_at + h,
            kv_stride: kv_width,
        };
        let mut attended = vec![0f32; batch * h];
        self.attention(batch, seq, causal, one, &mut attended);
        last.out.accumulate_with_bias(&attended, batch, &mut picked);
        self.mlp(last, &mut picked, batch, &mut normed, &mut mlp);
        picked
    }

    /// The second half of a layer on `rows` rows of `x`: `x += fc2(act(fc1(norm2(x))))`.
    fn mlp(&self, layer: &Layer, x: &mut [f32], rows: usize, normed: &mut [f32], mlp: &mut [f32]) {
        let (h, i) = (self.hidden, self.intermediate);
        let (normed, mlp) = (&mut normed[..rows * h], &mut mlp[..rows * i]);
        layer.norm2.forward(x, normed);
        layer.fc1.forward_act(normed, rows, mlp, self.act);
        layer.fc2.accumulate_with_bias(mlp, rows, x);
    }

    /// Multi-head attention: `heads_of(b)` says where sequence b's queries, keys and values
    /// are; the result goes to `out`, (queries, hidden). One task per sequence when there are
    /// enough to keep the threads busy (each writes its rows of `out` in place), else one per
    /// (sequence, head) into buffers of their own.
    fn attention<'a>(
        &self,
        batch: usize,
        seq: usize,
        causal: bool,
        heads_of: impl Fn(usize) -> Heads<'a> + Sync,
        out: &mut [f32],
    ) {
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        let queries = heads_of(0).positions.len();
        let out = &mut out[..batch * queries * h];
        let sequence = |(b, o): (usize, &mut [f32])| {
            o.fill(0.0);
            let at = heads_of(b);
            for head in 0..heads {
                attend(&at, head * d, seq, d, causal, &mut o[head * d..], h);
            }
        };
        // queries · seq · hidden multiply-adds, twice
        if batch * queries * seq * h < 1 << 20 {
            out.chunks_mut(queries * h).enumerate().for_each(sequence);
        } else if batch >= 4 * rayon::current_num_threads() {
            out.par_chunks_mut(queries * h)
                .enumerate()
                .for_each(sequence);
        } else {
            let one = |task: usize| {
                let (b, head) = (task / heads, task % heads);
                let mut o = vec![0f32; queries * d];
                attend(&heads_of(b), head * d, seq, d, causal, &mut o, d);
                o
            };
            let results: Vec<Vec<f32>> = (0..batch * heads).into_par_iter().map(one).collect();
            for (task, o) in results.iter().enumerate() {
                let (b, head) = (task / heads, task % heads);
                for (i, row) in o.chunks_exact(d).enumerate() {
                    out[(b * queries + i) * h + head * d..][..d].copy_from_slice(row);
                }
            }
        }
    }
}

/// Where one sequence's attention inputs are: its query rows from `q` (`q_stride` apart, one
/// per entry of `positions`, the query's position in the sequence), and its keys and values at
/// offsets `k_at` and `v_at` of the rows of `kv` (`kv_stride` apart, one per position).
struct Heads<'a> {
    q: &'a [f32],
    q_stride: usize,
    positions: &'a [usize],
    kv: &'a [f32],
    k_at: usize,
    v_at: usize,
    kv_stride: usize,
}

struct TextTower {
    token_embedding: Vec<f32>,
    position_embedding: Vec<f32>,
    max_positions: usize,
    encoder: Encoder,
    final_norm: Norm,
    eos_token_id: u32,
}

struct VisionTower {
    class_embedding: Vec<f32>,
    /// The patch convolution's kernel as a (hidden, channels * patch * patch) matrix.
    patch_weight: Packed,
    position_embedding: Vec<f32>,
    pre_norm: Norm,
    encoder: Encoder,
    post_norm: Norm,
    channels: usize,
    patch: usize,
    grid: usize,
}

/// Both towers and their projections, for inference on the CPU.
pub struct FastClip {
    text: TextTower,
    vision: VisionTower,
    text_projection: Linear,
    visual_projection: Linear,
    scratch: Scratch,
}

impl FastClip {
    /// Loads the weights under transformers' names, with the same shape checks (and errors)
    /// as the candle modules. `precision` is the encoder layers' (the patch embedding and the
    /// projections, ~3% of the work, stay f32).
    pub fn load(vb: VarBuilder, c: &ClipConfig, precision: Precision) -> Result<FastClip> {
        let (t, v) = (&c.text, &c.vision);
        let th = t.tower.hidden_size;
        let tvb = vb.pp("text_model");
        let temb = tvb.pp("embeddings");
        let text = TextTower {
            token_embedding: get(&temb.pp("token_embedding"), (t.vocab_size, th), "weight")?,
            position_embedding: get(
                &temb.pp("position_embedding"),
                (t.max_position_embeddings, th),
                "weight",
            )?,
            max_positions: t.max_position_embeddings,
            encoder: Encoder::load(tvb.clone(), &t.tower, precision)?,
            final_norm: Norm::load(tvb.pp("final_layer_norm"), th, t.tower.layer_norm_eps)?,
            eos_token_id: t.eos_token_id,
        };
        let (vh, p, grid) = (v.tower.hidden_size, v.patch_size, c.grid());
        let vvb = vb.pp("vision_model");
        let vemb = vvb.pp("embeddings");
        let vision = VisionTower {
            class_embedding: get(&vemb, vh, "class_embedding")?,
            patch_weight: Packed::from_rows(
                &get(
                    &vemb.pp("patch_embedding"),
                    (vh, v.num_channels, p, p),
                    "weight",
                )?,
                vh,
                v.num_channels * p * p,
            ),
            position_embedding: get(
                &vemb.pp("position_embedding"),
                (grid * grid + 1, vh),
                "weight",
            )?,
            pre_norm: Norm::load(vvb.pp("pre_layrnorm"), vh, v.tower.layer_norm_eps)?,
            encoder: Encoder::load(vvb.clone(), &v.tower, precision)?,
            post_norm: Norm::load(vvb.pp("post_layernorm"), vh, v.tower.layer_norm_eps)?,
            channels: v.num_channels,
            patch: p,
            grid,
        };
        Ok(FastClip {
            text,
            vision,
            text_projection: Linear::load(
                vb.pp("text_projection"),
                th,
                c.projection_dim,
                false,
                Precision::F32,
            )?,
            visual_projection: Linear::load(
                vb.pp("visual_projection"),
                vh,
                c.projection_dim,
                false,
                Precision::F32,
            )?,
            scratch: Scratch::default(),
        })
    }

    pub fn dims(&self) -> usize {
        self.text_projection.weight.n_out()
    }

    /// transformers' `get_text_features` for sequences of token ids (each with its start and
    /// end of text): one row of `dims()` values per sequence, not normalized. Shorter sequences
    /// are padded after their end of text, which the causal mask makes irrelevant.
    pub fn text_features(&self, batch: &[Vec<u32>]) -> Result<Vec<f32>> {
        let t = &self.text;
        let h = t.encoder.hidden;
        let (b, s) = (batch.len(), batch.iter().map(Vec::len).max().unwrap_or(0));
        if b == 0 || s == 0 {
            candle_core::bail!("no token ids to embed");
        }
        if s > t.max_positions {
            candle_core::bail!(
                "{s} tokens is more than the model's {} positions",
                t.max_positions
            );
        }
        let vocab = t.token_embedding.len() / h;
        let mut x = self.scratch.take(b * s * h);
        let mut pooled = Vec::with_capacity(b);
        for (row, ids) in batch.iter().enumerate() {
            for i in 0..s {
                let id = ids.get(i).copied().unwrap_or(0) as usize;
                if id >= vocab {
                    candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
                }
                let dst = &mut x[(row * s + i) * h..][..h];
                dst.copy_from_slice(&t.token_embedding[id * h..][..h]);
                add_assign(dst, &t.position_embedding[i * h..][..h]);
            }
            pooled.push(pool_index(t.eos_token_id, ids));
        }
        let last = t
            .encoder
            .forward(&self.scratch, &mut x, b, s, true, &pooled);
        let mut picked = vec![0f32; b * h];
        t.final_norm.forward(&last, &mut picked);
        let mut out = vec![0f32; b * self.dims()];
        self.text_projection.forward(&picked, b, &mut out);
        Ok(out)
    }

    /// transformers' `get_image_features` for preprocessed pixels, `batch` images of
    /// (channels, size, size) each: one row of `dims()` values per image, not normalized.
    pub fn image_features(&self, pixels: &[f32], batch: usize) -> Result<Vec<f32>> {
        let v = &self.vision;
        let (h, g, p, c) = (v.encoder.hidden, v.grid, v.patch, v.channels);
        let size = g * p;
        if batch == 0 || pixels.len() != batch * c * size * size {
            candle_core::bail!(
                "expected {batch} images of {c}x{size}x{size} values, got {}",
                pixels.len()
            );
        }
        // The patch embedding (a convolution with stride = kernel) as patchify + one product.
        let cpp = c * p * p;
        let mut patches = self.scratch.take(batch * g * g * cpp);
        par_rows(&mut patches, cpp, |r, row| {
            let (img, cell) = (r / (g * g), r % (g * g));
            let (gy, gx) = (cell / g, cell % g);
            for ch in 0..c {
                for py in 0..p {
                    let src = ((img * c + ch) * size + gy * p + py) * size + gx * p;
                    row[(ch * p + py) * p..][..p].copy_from_slice(&pixels[src..src + p]);
                }
            }
        });
        let mut embedded = self.scratch.take(batch * g * g * h);
        let rows = batch * g * g;
        v.patch_weight
            .product(&patches, rows, &mut embedded, 0..h, Start::Zero, None);
        drop(patches);
        let seq = g * g + 1;
        let mut x = self.scratch.take(batch * seq * h);
        par_rows(&mut x, h, |r, row| {
            let (img, t) = (r / seq, r % seq);
            if t == 0 {
                row.copy_from_slice(&v.class_embedding);
            } else {
                row.copy_from_slice(&embedded[(img * g * g + t - 1) * h..][..h]);
            }
            add_assign(row, &v.position_embedding[t * h..][..h]);
        });
        drop(embedded);
        let mut normed = self.scratch.take(x.len());
        v.pre_norm.forward(&x, &mut normed);
        drop(x);
        let class = v.encoder.forward(
            &self.scratch,
            &mut normed,
            batch,
            seq,
            false,
            &vec![0; batch],
        );
        let mut pooled = vec![0f32; batch * h];
        v.post_norm.forward(&class, &mut pooled);
        let mut out = vec![0f32; batch * self.dims()];
        self.visual_projection.forward(&pooled, batch, &mut out);
        Ok(out)
    }
}

/// transformers' pooling: the first end-of-text token (or, for legacy configs whose
/// eos_token_id is 2, the largest id).
pub fn pool_index(eos_token_id: u32, ids: &[u32]) -> usize {
    if eos_token_id == 2 {
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&i| i == max).unwrap_or(0)
    } else {
        ids.iter().position(|&i| i == eos_token_id).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_match_the_standard_library() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -8000..8000 {
            let x = i as f32 / 100.0;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            if want > 1e-30 && want < 1e30 {
                worst_exp = worst_exp.max(((got - want) / want).abs());
            }
            let xe = x / 10.0;
            let want = if xe.abs() <= 3.0 {
                series_erf(xe as f64)
            } else {
                (xe as f64).signum() // erf(3) is 1 - 2.2e-5
            };
            let tolerance = if xe.abs() <= 3.0 { 1.0 } else { 100.0 };
            worst_erf = worst_erf.max((erf(xe) as f64 - want).abs() / tolerance);
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 6e-7, "erf absolute error {worst_erf}");
        assert!(exp(-200.0) < 1e-37 && exp(f32::NEG_INFINITY) < 1e-37);
        assert!(exp(200.0) > 1e38 && exp(200.0).is_finite());
    }

    /// Multi-head attention on each of its three paths (serial, a task per (sequence, head), a
    /// task per sequence writing in place), causal or not, for every query or one pooled row
    /// per sequence, against softmax(q·kᵀ)·v in f64.
    #[test]
    fn attention_matches_a_plain_reference_on_every_path() {
        let (h, heads, seq) = (64, 4, 64);
        let d = h / heads;
        let encoder = Encoder {
            layers: Vec::new(),
            hidden: h,
            intermediate: 4 * h,
            heads,
            act: Activation::QuickGelu,
        };
        let threads = rayon::current_num_threads();
        // 1 sequence: serial; 4: a task per head; more than 4 per thread: a task per sequence.
        for batch in [1, 4, 4 * threads + 1] {
            let qkv: Vec<f32> = (0..batch * seq * 3 * h)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 300.0)
                .collect();
            for causal in [false, true] {
                for pooled in [false, true] {
                    let every: Vec<usize> = (0..seq).collect();
                    let picks: Vec<usize> = (0..batch).map(|b| (b * 13 + 5) % seq).collect();
                    let queries = if pooled { 1 } else { seq };
                    // The pooled queries are gathered into rows of their own, as the last layer does.
                    let q_rows: Vec<f32> = (0..batch)
                        .flat_map(|b| {
                            let at = (b * seq + picks[b]) * 3 * h;
                            qkv[at..at + 3 * h].to_vec()
                        })
                        .collect();
                    let heads_of = |b: usize| Heads {
                        q: if pooled {
                            &q_rows[b * 3 * h..]
                        } else {
                            &qkv[b * seq * 3 * h..]
                        },
                        q_stride: 3 * h,
                        positions: if pooled { &picks[b..b + 1] } else { &every },
                        kv: &qkv[b * seq * 3 * h..],
                        k_at: h,
                        v_at: 2 * h,
                        kv_stride: 3 * h,
                    };
                    let mut out = vec![f32::NAN; batch * queries * h];
                    encoder.attention(batch, seq, causal, heads_of, &mut out);
                    for b in 0..batch {
                        let at = heads_of(b);
                        for (i, &pos) in at.positions.iter().enumerate() {
                            for head in 0..heads {
                                let c = head * d;
                                let q = &at.q[i * 3 * h + c..][..d];
                                let visible = if causal { pos + 1 } else { seq };
                                let scores: Vec<f64> = (0..visible)
                                    .map(|j| {
                                        let k = &at.kv[j * 3 * h + h + c..][..d];
                                        q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum()
                                    })
                                    .collect();
                                let max = scores.iter().copied().fold(f64::MIN, f64::max);
                                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                                let total: f64 = w.iter().sum();
                                for e in 0..d {
                                    let want: f64 = (0..visible)
                                        .map(|j| {
                                            w[j] / total * at.kv[j * 3 * h + 2 * h + c + e] as f64
                                        })
                                        .sum();
                                    let got = out[(b * queries + i) * h + c + e] as f64;
                                    assert!(
                                        (got - want).abs() < 1e-5 * want.abs().max(1.0),
                                        "batch {batch} causal {causal} pooled {pooled}: \
                                         sequence {b} query {i} head {head} value {e}: {got} vs {want}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// erf by its Taylor series in f64, a reference for |x| <= 3.
    fn series_erf(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
