//! The differentiable model's heavy ops as candle custom ops with hand-written backward passes:
//! linear layers (forward, dX and dW on the packed kernels of [`super::matmul`]), layer norm,
//! the activations and softmax attention, each fused into one pass where candle would run a
//! chain of elementary ops (and its own, AVX2-only, matmul).
//!
//! Each op's forward is the inference path's arithmetic; each backward recomputes what it
//! needs from the op's inputs (the layer norm's statistics, the attention weights) instead of
//! keeping it alive between the passes. The one exception is fc1 fused with its activation,
//! which keeps the values before the activation (as candle's graph kept them as the separate
//! activation's input). A gradient is computed only for an input that needs
//! one (`track_op`): a frozen layer costs no dW. The tests check every op, forward and
//! backward, against the same function composed of candle's own differentiable ops.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor,
};
use multiversion::multiversion;
use rayon::prelude::*;

use super::amx::{self, Layout as Held, Operand};
use super::config::Activation;
use super::fast::{
    add_assign, erf, exp, gelu, gelu_tanh, norm_row, par_rows, quick_gelu, row_stats, softmax_row,
};
use super::matmul::{Packed, Precision};
use crate::vector::distance::dot_f32;

/// The f32 values of a contiguous CPU storage.
fn values<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!(
            "{op}: expected f32 values, got {:?}",
            candle_core::backend::BackendStorage::dtype(s)
        )
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{op}: expected a contiguous input"),
    }
}

/// Runs `f` on the values of `t` (made contiguous first if it is not); `op` names the caller
/// in errors.
pub(crate) fn with_values<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else {
        bail!("{op}: CPU tensors only")
    };
    Ok(f(values(s, layout, op)?))
}

fn tensor(v: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &candle_core::Device::Cpu)
}

/// `(rows, cols)` row-major into `(cols, rows)`: one head's attention matrices (at most
/// 77 x 77, inside a parallel task: serial), and dYᵀ for the bf16 dW (in parallel, by blocks
/// of 64 output rows).
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BLOCK: usize = 64;
    let mut out = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    let fill = |(b, block): (usize, &mut [f32])| {
        let c0 = b * BLOCK;
        let width = block.len() / rows;
        for (r, row) in x.chunks_exact(cols).enumerate() {
            for (c, &v) in row[c0..c0 + width].iter().enumerate() {
                block[c * rows + r] = v;
            }
        }
    };
    if rows * cols < 1 << 16 {
        out.chunks_mut(BLOCK * rows).enumerate().for_each(fill);
    } else {
        out.par_chunks_mut(BLOCK * rows).enumerate().for_each(fill);
    }
    out
}

/// Column sums of `(rows, cols)`.
fn column_sums(x: &[f32], cols: usize) -> Vec<f32> {
    if cols == 0 {
        return Vec::new();
    }
    let rows = x.len() / cols;
    let per_task = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    x.par_chunks(per_task * cols)
        .map(|chunk| {
            let mut acc = vec![0f32; cols];
            for row in chunk.chunks_exact(cols) {
                add_assign(&mut acc, row);
            }
            acc
        })
        .reduce(
            || vec![0f32; cols],
            |mut a, b| {
                add_assign(&mut a, &b);
                a
            },
        )
}

// ----------------------------------------------------------------------------------------------
// Linear layers
// ----------------------------------------------------------------------------------------------

/// Where `precision = 'bf16'`'s products run on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Engine {
    /// AMX tiles ([`super::amx`]): Intel Xeon 4th generation and later.
    Amx,
    /// The packed kernels of [`super::matmul`] at [`Precision::Bf16`], multiplying bf16 pairs
    /// with AVX512_BF16's `VDPBF16PS` (AMD Zen 4 and later, Intel Cooper Lake): the same
    /// arithmetic (operands rounded to bf16, products summed in f32), at up to twice the
    /// float32 rate.
    Packed,
}

impl Bf16Engine {
    /// The engine this CPU offers, the faster first; `None` where bf16 products would only be
    /// widened to f32 (no gain over float32 training).
    pub fn detect() -> Option<Bf16Engine> {
        if amx::available() {
            Some(Bf16Engine::Amx)
        } else if Precision::bf16_native() {
            Some(Bf16Engine::Packed)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Bf16Engine::Amx => "AMX tiles",
            Bf16Engine::Packed => "AVX512_BF16",
        }
    }
}

thread_local! {
    /// Where this thread's linear layers run their products in bf16, if they do.
    static BF16_PRODUCTS: std::cell::Cell<Option<Bf16Engine>> = const { std::cell::Cell::new(None) };
}

/// While alive, the linear layers' products (forward, dX, dW, fc1's with its activation) on
/// this thread run in bf16 ([`Bf16Engine::detect`]) if `on`: `clip_train`'s precision
/// 'bf16', set around each step's forward and backward passes (candle runs both on the calling
/// thread). Dropping it restores what was set before.
pub(crate) struct Bf16Products(Option<Bf16Engine>);

impl Bf16Products {
    pub(crate) fn set(on: bool) -> Bf16Products {
        Bf16Products::using(
            on.then(|| Bf16Engine::detect().expect("bf16 products checked by the options")),
        )
    }

    /// The products on `engine` (`None`: float32), which the caller has checked this CPU runs.
    fn using(engine: Option<Bf16Engine>) -> Bf16Products {
        Bf16Products(BF16_PRODUCTS.replace(engine))
    }
}

impl Drop for Bf16Products {
    fn drop(&mut self) {
        BF16_PRODUCTS.set(self.0);
    }
}

fn bf16_products() -> Option<Bf16Engine> {
    BF16_PRODUCTS.get()
}

/// `y = x·Wᵀ + b` for x (..., k), W (n, k) as HuggingFace stores it, b (n).
struct LinearOp;

/// The forward pass of [`LinearOp`] on storages: x (..., k), W (n, k), b (n) if given.
fn linear_fwd(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let (n, k) = wl.shape().dims2()?;
    let dims = xl.shape().dims();
    if dims.last() != Some(&k) {
        bail!("linear: input {:?} does not end in {k}", xl.shape())
    }
    let mut out = dims.to_vec();
    *out.last_mut().expect("checked above") = n;
    let m = xl.shape().elem_count() / k.max(1);
    let (x, w) = (values(xs, xl, "linear")?, values(ws, wl, "linear")?);
    let b = match bias {
        Some((bs, bl)) => Some(values(bs, bl, "linear")?),
        None => None,
    };
    if let Some(b) = b.filter(|b| b.len() != n) {
        bail!("linear: bias of {} values for {n} outputs", b.len())
    }
    let y = match bf16_products() {
        Some(Bf16Engine::Amx) => amx::product(
            &Operand::a(x, m, k, Held::Rows),
            &Operand::b(w, k, n, Held::Transposed),
            b,
        ),
        Some(Bf16Engine::Packed) => {
            Packed::from_rows_in(w, n, k, Precision::Bf16).product_new(x, m, b)
        }
        None => Packed::from_rows(w, n, k).product_new(x, m, b),
    };
    Ok((CpuStorage::F32(y), Shape::from(out)))
}

type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

fn linear_bwd(x: &Tensor, w: &Tensor, b: Option<&Tensor>, dy: &Tensor) -> Result<Grads3> {
    let (n, k) = w.dims2()?;
    let m = x.elem_count() / k.max(1);
    let dy = dy.contiguous()?;
    let (storage, layout) = dy.storage_and_layout();
    let Storage::Cpu(s) = &*storage else {
        bail!("linear: CPU tensors only")
    };
    let dy_v = values(s, layout, "linear")?;
    let bf16 = bf16_products();
    let dx = if x.track_op() {
        // dX (m, k) = dY (m, n) · W: W read as the (k, n) "weight" whose row j is column j of W.
        let g = with_values(w, "linear", |w| match bf16 {
            Some(Bf16Engine::Amx) => {
                let dy = Operand::a(dy_v, m, n, Held::Rows);
                amx::product(&dy, &Operand::b(w, n, k, Held::Rows), None)
            }
            Some(Bf16Engine::Packed) => {
                Packed::from_transposed_in(w, k, n, Precision::Bf16).product_new(dy_v, m, None)
            }
            None => Packed::from_transposed(w, k, n).product_new(dy_v, m, None),
        })?;
        Some(tensor(g, x.shape())?)
    } else {
        None
    };
    let dw = if w.track_op() {
        // dW (n, k) = dYᵀ (n, m) · X (m, k), dY read transposed in place (f32 and AMX).
        let g = with_values(x, "linear", |x| match bf16 {
            Some(Bf16Engine::Amx) => {
                let dyt = Operand::a(dy_v, n, m, Held::Transposed);
                amx::product(&dyt, &Operand::b(x, m, k, Held::Rows), None)
            }
            // The bf16 kernels read their x as rows (rounded once per product): dYᵀ copied.
            Some(Bf16Engine::Packed) => Packed::from_transposed_in(x, k, m, Precision::Bf16)
                .product_new(&transpose(dy_v, m, n), n, None),
            None => Packed::from_transposed(x, k, m).product_transposed_new(dy_v, n),
        })?;
        Some(tensor(g, w.shape())?)
    } else {
        None
    };
    let db = match b {
        Some(b) if b.track_op() => Some(tensor(column_sums(dy_v, n), b.shape())?),
        _ => None,
    };
    Ok((dx, dw, db))
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "archaeclip-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        linear_fwd((xs, xl), (ws, wl), Some((bs, bl)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _: &Tensor, dy: &Tensor) -> Result<Grads3> {
        linear_bwd(x, w, Some(b), dy)
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "archaeclip-linear-no-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        linear_fwd((xs, xl), (ws, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = linear_bwd(x, w, None, dy)?;
        Ok((dx, dw))
    }
}

/// `x·Wᵀ + b` (transformers' `nn.Linear`), differentiable.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearOp),
        None => x.apply_op2(&w, LinearOp),
    }
}

// ----------------------------------------------------------------------------------------------
// Layer norm
// ----------------------------------------------------------------------------------------------

struct LayerNormOp {
    eps: f32,
}

/// One row of the layer norm's backward pass: writes dX, adds this row's dW and dB.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn norm_row_bwd(
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    eps: f32,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let (mean, inv) = row_stats(x, eps);
    let n = x.len() as f32;
    let mut g_sum = [0f32; 16];
    let mut gx_sum = [0f32; 16];
    for (i, ((&x, &dy), &w)) in x.iter().zip(dy).zip(w).enumerate() {
        let xhat = (x - mean) * inv;
        let g = dy * w;
        g_sum[i % 16] += g;
        gx_sum[i % 16] += g * xhat;
    }
    let c1 = g_sum.iter().sum::<f32>() / n;
    let c2 = gx_sum.iter().sum::<f32>() / n;
    for (((((&x, &dy), &w), dx), dw), db) in x
        .iter()
        .zip(dy)
        .zip(w)
        .zip(dx.iter_mut())
        .zip(dw.iter_mut())
        .zip(db.iter_mut())
    {
        let xhat = (x - mean) * inv;
        *dx = inv * (dy * w - c1 - xhat * c2);
        *dw += dy * xhat;
        *db += dy;
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "archaeclip-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            values(xs, xl, "layer_norm")?,
            values(ws, wl, "layer_norm")?,
            values(bs, bl, "layer_norm")?,
        );
        let h = w.len();
        if h == 0 || b.len() != h || xl.shape().dims().last() != Some(&h) {
            bail!("layer_norm: input {:?} against {h} weights", xl.shape())
        }
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, h, |i, row| {
            norm_row(&x[i * h..(i + 1) * h], w, b, self.eps, row)
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _: &Tensor, dy: &Tensor) -> Result<Grads3> {
        let h = w.elem_count();
        let dy = dy.contiguous()?;
        let (dx, dw, db) = with_values(x, "layer_norm", |x| {
            with_values(w, "layer_norm", |w| {
                with_values(&dy, "layer_norm", |dy| {
                    let rows = x.len() / h;
                    let mut dx = vec![0f32; x.len()];
                    let per_task = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
                    let (dw, db) = dx
                        .par_chunks_mut(per_task * h)
                        .enumerate()
                        .map(|(c, chunk)| {
                            let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
                            for (i, dx) in chunk.chunks_exact_mut(h).enumerate() {
                                let at = (c * per_task + i) * h;
                                let (xr, dyr) = (&x[at..at + h], &dy[at..at + h]);
                                norm_row_bwd(xr, dyr, w, self.eps, dx, &mut dw, &mut db);
                            }
                            (dw, db)
                        })
                        .reduce(
                            || (vec![0f32; h], vec![0f32; h]),
                            |(mut dw, mut db), (w2, b2)| {
                                add_assign(&mut dw, &w2);
                                add_assign(&mut db, &b2);
                                (dw, db)
                            },
                        );
                    (dx, dw, db)
                })
            })
        })???;
        let grad = |t: &Tensor, v: Vec<f32>| -> Result<Option<Tensor>> {
            if t.track_op() {
                Ok(Some(tensor(v, t.shape())?))
            } else {
                Ok(None)
            }
        };
        Ok((grad(x, dx)?, grad(w, dw)?, grad(b, db)?))
    }
}

/// transformers' `nn.LayerNorm` over the last dimension, differentiable.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let op = LayerNormOp { eps: eps as f32 };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

// ----------------------------------------------------------------------------------------------
// Activations
// ----------------------------------------------------------------------------------------------

struct ActivationOp(Activation);

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn act_fwd(x: &[f32], y: &mut [f32], act: Activation) {
    match act {
        Activation::QuickGelu => {
            for (y, &v) in y.iter_mut().zip(x) {
                *y = quick_gelu(v);
            }
        }
        Activation::Gelu => {
            for (y, &v) in y.iter_mut().zip(x) {
                *y = gelu(v);
            }
        }
        Activation::GeluTanh => {
            for (y, &v) in y.iter_mut().zip(x) {
                *y = gelu_tanh(v);
            }
        }
    }
}

/// `dx = dy · act'(x)`.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn act_bwd(x: &[f32], dy: &[f32], dx: &mut [f32], act: Activation) {
    match act {
        Activation::QuickGelu => {
            for ((dx, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                let s = 1.0 / (1.0 + exp(-1.702 * v));
                *dx = g * (s + 1.702 * v * s * (1.0 - s));
            }
        }
        Activation::Gelu => {
            // d/dv [v Φ(v)] = Φ(v) + v φ(v)
            for ((dx, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                let cdf = 0.5 * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = 0.398_942_3 * exp(-0.5 * v * v);
                *dx = g * (cdf + v * pdf);
            }
        }
        Activation::GeluTanh => {
            for ((dx, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                let u = 0.797_884_6 * (v + 0.044_715 * v * v * v);
                let t = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
                let du = 0.797_884_6 * (1.0 + 3.0 * 0.044_715 * v * v);
                *dx = g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du);
            }
        }
    }
}

/// Runs `f(input piece, output piece)` over matching pieces of `out`, in parallel.
fn par_pieces(x: &[f32], out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    const PIECE: usize = 1 << 14;
    if x.len() < 4 * PIECE {
        f(0, out);
        return;
    }
    out.par_chunks_mut(PIECE)
        .enumerate()
        .for_each(|(i, o)| f(i * PIECE, o));
}

/// `act(x)`, in parallel.
fn activated(x: &[f32], act: Activation) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    par_pieces(x, &mut y, |at, o| act_fwd(&x[at..at + o.len()], o, act));
    y
}

/// `dy · act'(x)`, in parallel.
fn activation_grad(x: &[f32], dy: &[f32], act: Activation) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    par_pieces(x, &mut dx, |at, o| {
        let n = o.len();
        act_bwd(&x[at..at + n], &dy[at..at + n], o, act)
    });
    dx
}

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "archaeclip-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = values(s, l, "activation")?;
        Ok((CpuStorage::F32(activated(x, self.0)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let dx = with_values(x, "activation", |x| {
            with_values(dy, "activation", |dy| activation_grad(x, dy, self.0))
        })??;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// The MLP's activation, differentiable.
pub fn activate(act: Activation, x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ActivationOp(act))
}

/// `act(x·Wᵀ + b)`, the MLP's fc1 and its activation, as one op: the product starts from the
/// bias, the activation is one pass over its output, and the values before the activation
/// are kept in the op for the backward pass (the activation's derivative needs them) instead
/// of being a node of candle's graph, whose gradient candle would start from a zeros tensor
/// and add onto (two more passes over a (tokens, 4 x hidden) tensor per layer).
struct LinearActOp {
    act: Activation,
    pre: std::sync::Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for LinearActOp {
    fn name(&self) -> &'static str {
        "archaeclip-linear-activation"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (pre, shape) = linear_fwd((xs, xl), (ws, wl), Some((bs, bl)))?;
        let CpuStorage::F32(pre) = pre else {
            bail!("linear-activation: expected f32 values")
        };
        let y = activated(&pre, self.act);
        *self.pre.lock().unwrap_or_else(|e| e.into_inner()) = Some(pre);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Grads3> {
        let kept = self.pre.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pre) = kept.as_ref() else {
            bail!("linear-activation: backward before forward")
        };
        let dpre = with_values(dy, "linear-activation", |dy| {
            activation_grad(pre, dy, self.act)
        })?;
        drop(kept);
        linear_bwd(x, w, Some(b), &tensor(dpre, y.shape())?)
    }
}

/// `act(x·Wᵀ + b)` (fc1 and the MLP's activation), differentiable.
pub fn linear_activate(x: &Tensor, w: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    let op = LinearActOp {
        act,
        pre: std::sync::Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

// ----------------------------------------------------------------------------------------------
// Attention
// ----------------------------------------------------------------------------------------------

/// Softmax attention over fused projections: input (batch, seq, 3·hidden) holding each
/// position's q, k and v (q not yet scaled), output (batch, seq, hidden) with the heads side
/// by side, as transformers' CLIPAttention before `out_proj`.
struct AttentionOp {
    heads: usize,
    causal: bool,
    scale: f32,
    /// Sequences of these lengths one after the other, in a batch of one (1, total, 3·hidden):
    /// captions cut at their pooled token, with no padding rows to compute.
    lengths: Option<Vec<usize>>,
}

/// A sequence's rows of the batch: (first row, length).
type Rows = (usize, usize);

/// One sequence's view: `qkv` rows of 3·h values; head `col..col + d`.
struct Seq<'a> {
    qkv: &'a [f32],
    s: usize,
    h: usize,
}

impl AttentionOp {
    /// (first row, length) of each sequence, the hidden size and the head size.
    fn dims(&self, shape: &Shape) -> Result<(Vec<Rows>, usize, usize)> {
        let (b, s, h3) = shape.dims3()?;
        if h3 % 3 != 0 || self.heads == 0 || (h3 / 3) % self.heads != 0 {
            bail!("attention: {shape:?} is not (batch, seq, 3 x heads x head size)")
        }
        let h = h3 / 3;
        let seqs = match &self.lengths {
            None => (0..b).map(|n| (n * s, s)).collect(),
            Some(lengths) => {
                if b != 1 || lengths.iter().sum::<usize>() != s {
                    bail!("attention: {shape:?} does not hold sequences of lengths {lengths:?}")
                }
                let starts = lengths.iter().scan(0, |row, &len| {
                    *row += len;
                    Some(*row - len)
                });
                starts.zip(lengths.iter().copied()).collect()
            }
        };
        Ok((seqs, h, h / self.heads))
    }

    /// The attention weights of one head: (s, s), row i the softmax of query i's scores.
    fn weights(&self, seq: &Seq, col: usize, d: usize) -> Vec<f32> {
        let s = seq.s;
        let keys = Packed::from_rows_strided(&seq.qkv[seq.h + col..], 3 * seq.h, s, d);
        let mut p = vec![0f32; s * s];
        keys.accumulate_serial_strided(&seq.qkv[col..], 3 * seq.h, s, &mut p, s);
        for (i, row) in p.chunks_exact_mut(s).enumerate() {
            for v in row.iter_mut() {
                *v *= self.scale;
            }
            softmax_row(row, if self.causal { i + 1 } else { s });
        }
        p
    }
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "archaeclip-attention"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = values(st, l, "attention")?;
        let (seqs, h, d) = self.dims(l.shape())?;
        let mut out = vec![0f32; l.shape().elem_count() / 3];
        if h > 0 {
            split_rows(&mut out, &seqs, h).for_each(|((start, s), out)| {
                let seq = Seq {
                    qkv: &qkv[start * 3 * h..(start + s) * 3 * h],
                    s,
                    h,
                };
                for col in (0..h).step_by(d) {
                    let p = self.weights(&seq, col, d);
                    let values =
                        Packed::from_transposed_strided(&seq.qkv[2 * h + col..], 3 * h, d, s);
                    values.accumulate_serial_strided(&p, s, s, &mut out[col..], h);
                }
            });
        }
        let (b, s, _) = l.shape().dims3()?;
        Ok((CpuStorage::F32(out), Shape::from((b, s, h))))
    }

    fn bwd(&self, qkv: &Tensor, _: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        if !qkv.track_op() {
            return Ok(None);
        }
        let (seqs, h, d) = self.dims(qkv.shape())?;
        let dout = dout.contiguous()?;
        let grad = with_values(qkv, "attention", |qkv| {
            with_values(&dout, "attention", |dout| {
                let mut g = vec![0f32; qkv.len()];
                if h == 0 {
                    return g;
                }
                split_rows(&mut g, &seqs, 3 * h).for_each(|((start, s), g)| {
                    let seq = Seq {
                        qkv: &qkv[start * 3 * h..(start + s) * 3 * h],
                        s,
                        h,
                    };
                    let dout = &dout[start * h..(start + s) * h];
                    for col in (0..h).step_by(d) {
                        self.head_bwd(&seq, dout, col, d, g);
                    }
                });
                g
            })
        })??;
        Ok(Some(tensor(grad, qkv.shape())?))
    }
}

impl AttentionOp {
    /// One head's gradient into `g` (the sequence's (s, 3h) rows): with P the weights and dO
    /// this head's output gradient, dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)),
    /// dQ = scale·dS·K, dK = scale·dSᵀ·Q.
    fn head_bwd(&self, seq: &Seq, dout: &[f32], col: usize, d: usize, g: &mut [f32]) {
        let (s, h) = (seq.s, seq.h);
        let p = self.weights(seq, col, d);
        // dV (s, d) = Pᵀ (s, s) · dO (s, d)
        let pt = transpose(&p, s, s);
        let d_out = Packed::from_transposed_strided(&dout[col..], h, d, s);
        d_out.accumulate_serial_strided(&pt, s, s, &mut g[2 * h + col..], 3 * h);
        // dP (s, s) = dO (s, d) · Vᵀ
        let values = Packed::from_rows_strided(&seq.qkv[2 * h + col..], 3 * h, s, d);
        let mut ds = vec![0f32; s * s];
        values.accumulate_serial_strided(&dout[col..], h, s, &mut ds, s);
        for (dp, p) in ds.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
            softmax_row_bwd(dp, p, self.scale);
        }
        // dQ (s, d) = dS (s, s) · K (s, d)
        let keys = Packed::from_transposed_strided(&seq.qkv[h + col..], 3 * h, d, s);
        keys.accumulate_serial_strided(&ds, s, s, &mut g[col..], 3 * h);
        // dK (s, d) = dSᵀ (s, s) · Q (s, d)
        let dst = transpose(&ds, s, s);
        let queries = Packed::from_transposed_strided(&seq.qkv[col..], 3 * h, d, s);
        queries.accumulate_serial_strided(&dst, s, s, &mut g[h + col..], 3 * h);
    }
}

/// `buf` cut into the sequences `seqs` ((first row, length), in order, covering it) of rows
/// `width` values wide, each with its sequence, in parallel.
fn split_rows<'a>(
    buf: &'a mut [f32],
    seqs: &[Rows],
    width: usize,
) -> impl ParallelIterator<Item = (Rows, &'a mut [f32])> {
    let mut pieces = Vec::with_capacity(seqs.len());
    let mut rest = buf;
    for &seq in seqs {
        let (piece, tail) = rest.split_at_mut(seq.1 * width);
        pieces.push((seq, piece));
        rest = tail;
    }
    pieces.into_par_iter().filter(|((_, s), _)| *s > 0)
}

/// One row of the scores' gradient from the weights' (`dp`, in place) and the weights `p`:
/// `scale · p ⊙ (dp − dp·p)`.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn softmax_row_bwd(dp: &mut [f32], p: &[f32], scale: f32) {
    let dot = dot_f32(dp, p) as f32;
    for (dp, &p) in dp.iter_mut().zip(p) {
        *dp = scale * p * (*dp - dot);
    }
}

/// Multi-head softmax attention (causal for the text tower) over fused q/k/v projections
/// (batch, seq, 3·hidden), differentiable; `scale` multiplies the scores. With `lengths`, the
/// input is a batch of one, (1, total, 3·hidden), holding sequences of those lengths one
/// after the other, each attending only to itself (captions cut at their pooled token, with
/// no padding to compute).
pub fn attention(
    qkv: &Tensor,
    heads: usize,
    causal: bool,
    scale: f64,
    lengths: Option<&[usize]>,
) -> Result<Tensor> {
    let op = AttentionOp {
        heads,
        causal,
        scale: scale as f32,
        lengths: lengths.map(<[usize]>::to_vec),
    };
    qkv.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn rand(shape: &[usize], seed: u64) -> Var {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// The largest |a − b| / (1 + |b|) over two tensors of one shape.
    fn diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        a.iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0.0, f32::max)
    }

    /// Checks `fused` against `composed` (candle's own ops) on the same inputs: the outputs, and
    /// the gradient of every input for a loss that weights each output differently.
    fn check(
        inputs: &[Var],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
        tol: f32,
    ) {
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&ts), composed(&ts));
        assert!(diff(&a, &b) < tol, "forward differs by {}", diff(&a, &b));
        let weights = rand(a.dims(), 99);
        let la = (&a * weights.as_tensor()).unwrap().sum_all().unwrap();
        let lb = (&b * weights.as_tensor()).unwrap().sum_all().unwrap();
        let (ga, gb) = (la.backward().unwrap(), lb.backward().unwrap());
        for (i, v) in inputs.iter().enumerate() {
            let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
            let nonzero = y
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(nonzero > 0.0, "input {i}: the reference gradient is zero");
            assert!(
                diff(x, y) < tol,
                "input {i}: gradients differ by {}",
                diff(x, y)
            );
        }
    }

    #[test]
    fn linear_matches_candle_forward_and_backward() {
        // Odd sizes: partial panels, one row, rows of one value.
        for (m, n, k) in [(1, 1, 1), (3, 17, 5), (37, 40, 33), (130, 70, 96)] {
            let (x, w, b) = (rand(&[m, k], 1), rand(&[n, k], 2), rand(&[n], 3));
            check(
                &[x.clone(), w.clone(), b.clone()],
                |t| linear(&t[0], &t[1], Some(&t[2])).unwrap(),
                |t| {
                    t[0].matmul(&t[1].t().unwrap())
                        .unwrap()
                        .broadcast_add(&t[2])
                        .unwrap()
                },
                1e-5,
            );
            check(
                &[x, w],
                |t| linear(&t[0], &t[1], None).unwrap(),
                |t| t[0].matmul(&t[1].t().unwrap()).unwrap(),
                1e-5,
            );
        }
        // A batch of sequences (rank 3).
        let (x, w) = (rand(&[2, 5, 8], 4), rand(&[6, 8], 5));
        check(
            &[x, w],
            |t| linear(&t[0], &t[1], None).unwrap(),
            |t| t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap(),
            1e-5,
        );
    }

    /// Each bf16 engine this CPU runs, against candle's float32 ops: forward and gradients
    /// within bf16's rounding (8 significant bits), and not equal to them (the engine ran).
    #[test]
    fn bf16_products_match_float32_within_rounding() {
        let engines: Vec<Bf16Engine> = [
            amx::available().then_some(Bf16Engine::Amx),
            Precision::bf16_native().then_some(Bf16Engine::Packed),
        ]
        .into_iter()
        .flatten()
        .collect();
        if engines.is_empty() {
            eprintln!("no bf16 engine on this CPU: nothing to check");
            return;
        }
        for engine in engines {
            let _on = Bf16Products::using(Some(engine));
            // Odd sizes (partial panels, an odd depth), and the depth of CLIP's layers.
            for (m, n, k) in [(1, 1, 1), (37, 40, 33), (130, 70, 96), (50, 20, 768)] {
                let (x, w, b) = (rand(&[m, k], 11), rand(&[n, k], 12), rand(&[n], 13));
                let inputs = [x, w, b];
                let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
                let ours = linear(&ts[0], &ts[1], Some(&ts[2])).unwrap();
                let exact = ts[0]
                    .matmul(&ts[1].t().unwrap())
                    .unwrap()
                    .broadcast_add(&ts[2])
                    .unwrap();
                let weights = rand(ours.dims(), 14);
                let grads = |y: &Tensor| {
                    let g = (y * weights.as_tensor())
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    inputs
                        .iter()
                        .map(|v| g.get(v).unwrap().clone())
                        .collect::<Vec<_>>()
                };
                // ‖a − e‖ / ‖e‖: bf16 rounds each operand by up to 2⁻⁹ of its value, so a
                // product moves by ~0.1-0.2% of its norm (single values near 0 by more).
                let relative = |a: &Tensor, e: &Tensor| {
                    let sq = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>();
                    (sq(&(a - e).unwrap()).unwrap() / sq(e).unwrap()).sqrt()
                };
                let mut largest = relative(&ours, &exact);
                for (a, e) in grads(&ours).iter().zip(grads(&exact).iter()) {
                    largest = largest.max(relative(a, e));
                }
                assert!(
                    largest < 0.01,
                    "{engine:?} ({m}, {n}, {k}): differs from float32 by {largest}"
                );
                if k > 1 {
                    assert!(
                        largest > 1e-5,
                        "{engine:?} ({m}, {n}, {k}): equal to float32 ({largest}): not rounded?"
                    );
                }
            }
        }
    }

    #[test]
    fn transpose_moves_every_value() {
        // (300, 257): above the serial size, transposed in parallel; widths not multiples of
        // the 64-row blocks.
        for (rows, cols) in [(0, 3), (1, 1), (3, 5), (70, 130), (300, 257)] {
            let x: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(&x, rows, cols);
            assert_eq!(t.len(), x.len());
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        t[c * rows + r],
                        x[r * cols + c],
                        "({rows}, {cols}) at ({r}, {c})"
                    );
                }
            }
        }
    }

    #[test]
    fn frozen_inputs_get_no_gradient() {
        let x = rand(&[4, 6], 1);
        let w = Tensor::ones((3, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = rand(&[3], 2);
        let y = linear(x.as_tensor(), &w, Some(b.as_tensor())).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none());
        assert!(grads.get(x.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
    }

    #[test]
    fn layer_norm_matches_candle_forward_and_backward() {
        for (rows, h) in [(1, 2), (3, 7), (50, 40), (9, 768)] {
            let x = rand(&[rows, h], 7);
            let (w, b) = (rand(&[h], 8), rand(&[h], 9));
            let eps = 1e-5;
            check(
                &[x, w, b],
                |t| layer_norm(&t[0], &t[1], &t[2], eps).unwrap(),
                |t| {
                    let size = h as f64;
                    let c = t[0]
                        .broadcast_sub(&(t[0].sum_keepdim(D::Minus1).unwrap() / size).unwrap())
                        .unwrap();
                    let var = (c.sqr().unwrap().sum_keepdim(D::Minus1).unwrap() / size).unwrap();
                    c.broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
                        .unwrap()
                        .broadcast_mul(&t[1])
                        .unwrap()
                        .broadcast_add(&t[2])
                        .unwrap()
                },
                2e-5,
            );
        }
    }

    #[test]
    fn activations_match_candle_forward_and_backward() {
        for act in [
            Activation::QuickGelu,
            Activation::Gelu,
            Activation::GeluTanh,
        ] {
            // Enough values for the parallel path, spread over [-8, 8].
            let x = rand(&[70_001], 11);
            let x8 = Var::from_tensor(&(x.as_tensor() * 8.0).unwrap()).unwrap();
            check(
                &[x8],
                |t| activate(act, &t[0]).unwrap(),
                |t| composed_activation(act, &t[0]),
                2e-5,
            );
        }
    }

    #[test]
    fn linear_activation_matches_candle_forward_and_backward() {
        for act in [
            Activation::QuickGelu,
            Activation::Gelu,
            Activation::GeluTanh,
        ] {
            // Rank 3, partial panels; and enough outputs for the activation's parallel path.
            for (dims, n, k) in [(vec![2, 5, 8], 17, 8), (vec![130, 96], 700, 96)] {
                let x = rand(&dims, 21);
                let (w, b) = (rand(&[n, k], 22), rand(&[n], 23));
                // Products with a standard deviation of about 3 (x and W uniform in [-1, 1):
                // sqrt(k) / 3 before the scale), so the activation's tails are reached.
                let scale = 9.0 / (k as f64).sqrt();
                let w = Var::from_tensor(&(w.as_tensor() * scale).unwrap()).unwrap();
                check(
                    &[x, w, b],
                    |t| linear_activate(&t[0], &t[1], &t[2], act).unwrap(),
                    |t| {
                        composed_activation(
                            act,
                            &t[0]
                                .broadcast_matmul(&t[1].t().unwrap())
                                .unwrap()
                                .broadcast_add(&t[2])
                                .unwrap(),
                        )
                    },
                    2e-5,
                );
            }
        }
    }

    /// The activation composed of candle's differentiable ops.
    fn composed_activation(act: Activation, t: &Tensor) -> Tensor {
        match act {
            Activation::QuickGelu => {
                (t * candle_nn::ops::sigmoid(&(t * 1.702).unwrap()).unwrap()).unwrap()
            }
            Activation::Gelu => t.gelu_erf().unwrap(),
            Activation::GeluTanh => t.gelu().unwrap(),
        }
    }

    fn composed_attention(qkv: &Tensor, heads: usize, causal: bool, scale: f64) -> Tensor {
        let (b, s, h3) = qkv.dims3().unwrap();
        let h = h3 / 3;
        let split = |i: usize| {
            qkv.narrow(2, i * h, h)
                .unwrap()
                .reshape((b, s, heads, h / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let mut w = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if causal {
            let mask: Vec<f32> = (0..s)
                .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (s, s), &Device::Cpu).unwrap();
            w = w.broadcast_add(&mask).unwrap();
        }
        let w = candle_nn::ops::softmax(&w, D::Minus1).unwrap();
        w.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, s, h))
            .unwrap()
    }

    #[test]
    fn attention_matches_candle_forward_and_backward() {
        for (b, s, heads, d, causal) in [
            (1, 1, 1, 1, false),
            (2, 5, 2, 3, true),
            (3, 17, 4, 16, false),
            (2, 50, 3, 64, true),
        ] {
            let qkv = rand(&[b, s, 3 * heads * d], 21);
            let scale = (d as f64).powf(-0.5);
            check(
                &[qkv],
                |t| attention(&t[0], heads, causal, scale, None).unwrap(),
                |t| composed_attention(&t[0], heads, causal, scale),
                2e-5,
            );
        }
    }

    /// Sequences of mixed lengths one after the other (captions cut at their pooled token):
    /// each attends to itself only, as if it ran alone, forward and backward.
    #[test]
    fn ragged_attention_matches_each_sequence_alone() {
        for (lengths, heads, d, causal) in [
            (vec![3, 1, 5], 2, 3, true),
            (vec![7, 12, 2, 12], 4, 16, true),
            (vec![4, 4], 1, 8, false),
            (vec![6, 0, 2], 2, 4, true),
        ] {
            let total: usize = lengths.iter().sum();
            let qkv = rand(&[1, total, 3 * heads * d], 23);
            let scale = (d as f64).powf(-0.5);
            check(
                &[qkv],
                |t| attention(&t[0], heads, causal, scale, Some(&lengths)).unwrap(),
                |t| {
                    let mut start = 0;
                    let alone: Vec<Tensor> = lengths
                        .iter()
                        .filter(|&&len| len > 0)
                        .map(|&len| {
                            let seq = t[0].narrow(1, start, len).unwrap();
                            start += len;
                            composed_attention(&seq, heads, causal, scale)
                        })
                        .collect();
                    Tensor::cat(&alone, 1).unwrap()
                },
                2e-5,
            );
        }
        // Lengths that do not add up to the rows are an error, not a wrong answer.
        let qkv = rand(&[1, 5, 6], 1);
        let err = attention(qkv.as_tensor(), 1, true, 1.0, Some(&[2, 2])).unwrap_err();
        assert!(err.to_string().contains("lengths [2, 2]"), "{err}");
    }
}
