//! Persisted int8 codes with an error bound per row: an exact top-k that reads a quarter of the
//! bytes of the float32 vectors.
//!
//! Each row gets a fixed-size record (`HEADER + dims` bytes):
//!
//! | bytes | what |
//! |---|---|
//! | 0..4 | the row's inverse norm, as f32 (the value the exact scan scores with) |
//! | 4..8 | the int8 scale `s`, f32: element i is about `s * code[i]` |
//! | 8..12 | `e >= ‖x − s·code‖₂`, f32 rounded up: the quantization error of the whole row |
//! | 12..16 | `‖x‖₂` computed in f64, f32 rounded up (the inverse can underflow to 0) |
//! | 16..20 | 1 when the slot holds a row, 0 when it is empty (u32 LE) |
//! | 20.. | the codes, one i8 per element |
//!
//! For a query y quantized the same way (`y = t·q + f`), `x·y = s·t·(code·q) + s·code·f + (x −
//! s·code)·y`, so by Cauchy–Schwarz `|x·y − s·t·(code·q)| <= e·‖y‖ + (‖x‖ + e)·‖f‖`. Adding a
//! margin for the float rounding of the exact scan itself (at most `2·d·ε₃₂·‖x‖·‖y‖`, plus
//! an absolute term for subnormal products; any bound near f32's overflow is widened to
//! infinity, where the exact scan may itself overflow) gives
//! a lower and an upper bound on the distance the exact scan would compute. A row is a
//! candidate when its lower bound is at most the k-th smallest upper bound: at least k rows
//! are that near, so every row of the exact top-k (ties included) is a candidate. The
//! candidates are then scored with their float32 vectors and the answer is the exact scan's,
//! bit for bit.
//!
//! On 512-dimensional unit vectors the bound is about ±0.008 in cosine, and a query keeps a few
//! dozen candidates out of a million.

use crate::index::chunked::bit;
use crate::index::scan::inv_norm;
use crate::vector::distance::{norm_f32, Metric};
use crate::vector::topk::{Hit, TopK};
use simsimd::SpatialSimilarity;

/// Bytes before a record's codes.
pub const HEADER: usize = 20;

/// Where the live flag is in a record.
pub const LIVE_AT: usize = 16;

/// Bytes of one row's record.
pub fn record_bytes(dims: usize) -> usize {
    HEADER + dims
}

/// Writes the record of `row` into `out` (`record_bytes(row.len())` bytes).
pub fn encode(row: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len(), record_bytes(row.len()));
    let (head, codes) = out.split_at_mut(HEADER);
    let Quantized {
        scale,
        err_sq,
        norm_sq,
    } = quantize(row, codes);
    // Rounded up twice: the f64 sum's own rounding (relative ~d·2⁻⁵³) and the cast to f32.
    let err = (err_sq.sqrt() * (1.0 + 1e-9)) as f32;
    let err = if err > 0.0 { err.next_up() } else { 0.0 };
    let norm = (norm_sq.sqrt() * (1.0 + 1e-9)) as f32;
    let norm = if norm > 0.0 { norm.next_up() } else { 0.0 };
    head[0..4].copy_from_slice(&(inv_norm(row) as f32).to_le_bytes());
    head[4..8].copy_from_slice(&scale.to_le_bytes());
    head[8..12].copy_from_slice(&err.to_le_bytes());
    head[12..16].copy_from_slice(&norm.to_le_bytes());
    head[16..20].copy_from_slice(&1u32.to_le_bytes());
}

/// What [`quantize`] measures besides the codes.
struct Quantized {
    scale: f32,
    /// `Σ (x − scale·code)²` in f64.
    err_sq: f64,
    /// `Σ x²` in f64, summed in element order (the order records have always used).
    norm_sq: f64,
}

/// Symmetric int8 codes of `row` into `out` (scale = max |x| / 127, rounded to nearest even,
/// which vectorizes), the squared error and the squared norm. Compiled for AVX-512 and for
/// AVX2 too, used where the CPU has them: the same operations in the same order per lane
/// (Rust never fuses a multiply and an add on its own), so every build writes the same bytes.
fn quantize(row: &[f32], out: &mut [u8]) -> Quantized {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { quantize_avx512(row, out) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { quantize_avx2(row, out) };
        }
    }
    quantize_portable(row, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn quantize_avx512(row: &[f32], out: &mut [u8]) -> Quantized {
    quantize_portable(row, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_avx2(row: &[f32], out: &mut [u8]) -> Quantized {
    quantize_portable(row, out)
}

#[inline(always)]
fn quantize_portable(row: &[f32], out: &mut [u8]) -> Quantized {
    // The largest |x| over sixteen lanes: exact in any order, and not one long chain.
    let mut lanes_max = [0.0f32; 16];
    let mut blocks = row.chunks_exact(16);
    for xs in &mut blocks {
        for i in 0..16 {
            lanes_max[i] = lanes_max[i].max(xs[i].abs());
        }
    }
    let max = blocks
        .remainder()
        .iter()
        .chain(&lanes_max)
        .fold(0.0f32, |m, x| m.max(x.abs()));
    // The squared norm is one chain of f64 additions in element order; the codes are made
    // alongside, where they cost no time of their own.
    let mut norm_sq = 0.0f64;
    if max == 0.0 {
        out.fill(0);
        return Quantized {
            scale: 0.0,
            err_sq: 0.0,
            norm_sq,
        };
    }
    let scale = max / 127.0;
    let inv = 127.0 / max;
    // Round to nearest even by adding and subtracting 1.5·2²³ (exact for |v| < 2²²; here
    // |v| <= 127): unlike `round_ties_even`, it needs no SSE4.1 and vectorizes.
    const MAGIC: f32 = 12_582_912.0;
    let code = |x: f32| ((x * inv + MAGIC) - MAGIC).clamp(-127.0, 127.0);
    // Eight partial sums, so the compiler can keep them in vector lanes.
    let mut lanes = [0.0f64; 8];
    let mut rows = row.chunks_exact(8);
    let mut outs = out.chunks_exact_mut(8);
    for (xs, os) in (&mut rows).zip(&mut outs) {
        for i in 0..8 {
            let c = code(xs[i]);
            os[i] = c as i8 as u8;
            let e = f64::from(xs[i]) - f64::from(scale) * f64::from(c);
            lanes[i] += e * e;
            norm_sq += f64::from(xs[i]) * f64::from(xs[i]);
        }
    }
    for (o, &x) in outs.into_remainder().iter_mut().zip(rows.remainder()) {
        let c = code(x);
        *o = c as i8 as u8;
        let e = f64::from(x) - f64::from(scale) * f64::from(c);
        lanes[0] += e * e;
        norm_sq += f64::from(x) * f64::from(x);
    }
    Quantized {
        scale,
        err_sq: lanes.iter().sum(),
        norm_sq,
    }
}

/// Whether a record holds a row.
#[inline]
pub fn live(record: &[u8]) -> bool {
    record[LIVE_AT] != 0
}

#[inline]
fn f32_at(record: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(record[at..at + 4].try_into().expect("4 bytes"))
}

/// A query prepared for bounding rows by their records.
pub struct BoundQuery {
    metric: Metric,
    dims: usize,
    codes: Vec<i8>,
    scale: f64,
    /// ‖y − t·q‖, rounded up.
    err: f64,
    norm: f64,
    sq: f64,
    inv: f64,
    /// Relative margin for the exact scan's float rounding.
    gamma: f64,
    /// `128 · Σ q`: what the VNNI kernel's unsigned view of the codes adds to each dot.
    offset: i32,
    /// Whether the CPU has AVX-512 VNNI (the four-rows-at-a-time kernel).
    vnni: bool,
}

impl BoundQuery {
    /// The query's codes and norms. A zero query under cosine has no top-k: the exact scan
    /// refuses it first, so this is never asked to bound with it.
    pub fn new(query: &[f32], metric: Metric) -> BoundQuery {
        let mut bytes = vec![0u8; query.len()];
        let Quantized { scale, err_sq, .. } = quantize(query, &mut bytes);
        let codes: Vec<i8> = bytes.into_iter().map(|b| b as i8).collect();
        let norm = norm_f32(query);
        let offset = 128 * codes.iter().map(|&c| i32::from(c)).sum::<i32>();
        BoundQuery {
            metric,
            dims: query.len(),
            codes,
            scale: f64::from(scale),
            err: err_sq.sqrt() * (1.0 + 1e-9) + f64::MIN_POSITIVE,
            norm: norm * (1.0 + 1e-9),
            sq: norm * norm,
            inv: if norm > 0.0 { 1.0 / norm } else { 0.0 },
            gamma: (2 * query.len() + 16) as f64 * f64::from(f32::EPSILON),
            offset,
            vnni: vnni(),
        }
    }

    /// The int8 dot products of the query with `rows` records of `records` into `out`.
    pub fn dots(&self, records: &[u8], rows: usize, out: &mut Vec<i32>) {
        let size = record_bytes(self.dims);
        assert!(records.len() >= rows * size);
        out.clear();
        out.resize(rows, 0);
        #[cfg(target_arch = "x86_64")]
        if self.vnni {
            // SAFETY: the CPU has the features (checked in `vnni`); `records` holds `rows`
            // records (asserted above), `out` has `rows` entries.
            unsafe { dots_vnni(&self.codes, records, size, rows, self.offset, out) };
            return;
        }
        for (o, record) in out.iter_mut().zip(records.chunks_exact(size)) {
            *o = self.dot(record) as i32;
        }
    }

    /// One record's int8 dot product (simsimd's kernel, or plain arithmetic).
    fn dot(&self, record: &[u8]) -> f64 {
        let codes: &[i8] = bytemuck_i8(&record[HEADER..HEADER + self.dims]);
        i8::dot(&self.codes, codes).unwrap_or_else(|| {
            codes
                .iter()
                .zip(&self.codes)
                .map(|(&a, &b)| f64::from(i32::from(a) * i32::from(b)))
                .sum()
        })
    }

    /// (lower, upper) bounds on the distance the exact scan computes for the row of `record`,
    /// or `None` when the exact scan skips the row (an all-zero row under cosine).
    #[inline]
    pub fn bounds(&self, record: &[u8]) -> Option<(f64, f64)> {
        self.bounds_with(record, self.dot(record))
    }

    /// [`BoundQuery::bounds`] given the record's int8 dot product with the query.
    #[inline]
    pub fn bounds_with(&self, record: &[u8], dot: f64) -> Option<(f64, f64)> {
        let inv = f64::from(f32_at(record, 0));
        if self.metric == Metric::Cosine && inv == 0.0 {
            return None;
        }
        let scale = f64::from(f32_at(record, 4));
        let err = f64::from(f32_at(record, 8));
        let approx = scale * self.scale * dot;
        let norm = f64::from(f32_at(record, 12));
        // f32 overflow in the exact scan (a norm or a product past f32::MAX) is possible out
        // there: no bound.
        if norm.max(self.norm) > 1e18 {
            return Some((f64::NEG_INFINITY, f64::INFINITY));
        }
        let margin = err * self.norm + (norm + err) * self.err + TINY;
        Some(match self.metric {
            Metric::Cosine => {
                let b = margin + self.gamma * norm * self.norm;
                let f = inv * self.inv;
                (1.0 - (approx + b) * f, 1.0 - (approx - b) * f)
            }
            Metric::Dot => {
                let b = margin + self.gamma * norm * self.norm;
                (-(approx + b), -(approx - b))
            }
            Metric::L2 => {
                let base = norm * norm + self.sq;
                let slack = self.gamma * (norm + self.norm).powi(2) + TINY;
                let b = margin + self.gamma * norm * self.norm;
                (
                    (base - 2.0 * (approx + b) - slack).max(0.0),
                    base - 2.0 * (approx - b) + slack,
                )
            }
        })
    }

    /// The distance estimated from the int8 dot product alone, without margins: what the
    /// `int8` mode ranks rows by (`None` for an all-zero row under cosine).
    #[inline]
    pub fn approx_with(&self, record: &[u8], dot: f64) -> Option<f64> {
        let inv = f64::from(f32_at(record, 0));
        let approx = f64::from(f32_at(record, 4)) * self.scale * dot;
        match self.metric {
            Metric::Cosine => (inv != 0.0).then_some(1.0 - approx * inv * self.inv),
            Metric::Dot => Some(-approx),
            Metric::L2 => {
                let norm = f64::from(f32_at(record, 12));
                Some(norm * norm + self.sq - 2.0 * approx)
            }
        }
    }
}

/// An absolute margin for rounding among subnormal numbers (each f32 operation errs by at
/// most 2⁻¹⁵⁰ there; 2⁻¹²⁰ covers 65,536 dimensions with room).
const TINY: f64 = 7.52316384526264e-37;

/// Whether the four-rows-at-a-time AVX-512 VNNI kernel can run (checked once).
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out[r] = Σ code_r[i] · q[i]` for `rows` records of `size` bytes, four rows at a time: each
/// 64-byte block of the query is loaded once for four rows, and the four accumulators are
/// independent (a one-row kernel waits on each load in turn). `vpdpbusd` multiplies unsigned
/// by signed bytes, so the codes are read as `code + 128` (xor 0x80) and `offset = 128 · Σ q`
/// is taken off.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `records` must hold `rows * size` bytes, each
/// record's codes `q.len()` bytes from `HEADER`; `out` must have `rows` entries.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dots_vnni(
    q: &[i8],
    records: &[u8],
    size: usize,
    rows: usize,
    offset: i32,
    out: &mut [i32],
) {
    use std::arch::x86_64::*;
    let d = q.len();
    let blocks = d / 64;
    let tail = d % 64;
    let tail_mask: __mmask64 = if tail == 0 { 0 } else { (1u64 << tail) - 1 };
    let flip = _mm512_set1_epi8(-128);
    let qp = q.as_ptr();
    let load_q = |b: usize| _mm512_loadu_si512(qp.add(b * 64).cast());
    let load_tail_q = || _mm512_maskz_loadu_epi8(tail_mask, qp.add(blocks * 64).cast());
    // A code block of the row at `p`, as unsigned bytes (masked: absent bytes read as zero,
    // then 128, times a zero query byte).
    let code =
        |p: *const u8, b: usize| _mm512_xor_si512(_mm512_loadu_si512(p.add(b * 64).cast()), flip);
    let code_tail = |p: *const u8| {
        _mm512_xor_si512(
            _mm512_maskz_loadu_epi8(tail_mask, p.add(blocks * 64).cast()),
            flip,
        )
    };
    let base = records.as_ptr();
    let mut r = 0;
    while r + 4 <= rows {
        let p0 = base.add(r * size + HEADER);
        let (p1, p2, p3) = (p0.add(size), p0.add(2 * size), p0.add(3 * size));
        let mut a0 = _mm512_setzero_si512();
        let mut a1 = _mm512_setzero_si512();
        let mut a2 = _mm512_setzero_si512();
        let mut a3 = _mm512_setzero_si512();
        for b in 0..blocks {
            let qv = load_q(b);
            a0 = _mm512_dpbusd_epi32(a0, code(p0, b), qv);
            a1 = _mm512_dpbusd_epi32(a1, code(p1, b), qv);
            a2 = _mm512_dpbusd_epi32(a2, code(p2, b), qv);
            a3 = _mm512_dpbusd_epi32(a3, code(p3, b), qv);
        }
        if tail > 0 {
            let qv = load_tail_q();
            a0 = _mm512_dpbusd_epi32(a0, code_tail(p0), qv);
            a1 = _mm512_dpbusd_epi32(a1, code_tail(p1), qv);
            a2 = _mm512_dpbusd_epi32(a2, code_tail(p2), qv);
            a3 = _mm512_dpbusd_epi32(a3, code_tail(p3), qv);
        }
        out[r] = _mm512_reduce_add_epi32(a0) - offset;
        out[r + 1] = _mm512_reduce_add_epi32(a1) - offset;
        out[r + 2] = _mm512_reduce_add_epi32(a2) - offset;
        out[r + 3] = _mm512_reduce_add_epi32(a3) - offset;
        r += 4;
    }
    while r < rows {
        let p0 = base.add(r * size + HEADER);
        let mut a0 = _mm512_setzero_si512();
        for b in 0..blocks {
            a0 = _mm512_dpbusd_epi32(a0, code(p0, b), load_q(b));
        }
        if tail > 0 {
            a0 = _mm512_dpbusd_epi32(a0, code_tail(p0), load_tail_q());
        }
        out[r] = _mm512_reduce_add_epi32(a0) - offset;
        r += 1;
    }
}

fn bytemuck_i8(bytes: &[u8]) -> &[i8] {
    // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<i8>(), bytes.len()) }
}

/// The candidates of a bounded scan: every row whose lower bound may still be among the k
/// best, and the k smallest upper bounds seen. Or, made by [`Bounded::approximate`], the n
/// rows of smallest estimated distance (the `int8` mode's candidates).
pub struct Bounded {
    /// The k smallest upper bounds, or the n smallest estimates.
    upper: TopK,
    approximate: bool,
    /// (lower bound, key).
    candidates: Vec<(f64, i64)>,
    /// The list's length after it was last pruned.
    pruned_at: usize,
    /// A chunk's dot products (reused).
    dots: Vec<i32>,
}

impl Bounded {
    pub fn new(k: usize) -> Bounded {
        Bounded {
            upper: TopK::new(k),
            approximate: false,
            candidates: Vec::new(),
            pruned_at: 0,
            dots: Vec::new(),
        }
    }

    /// A scan that keeps the `n` rows of smallest estimated distance instead of bounds.
    pub fn approximate(n: usize) -> Bounded {
        Bounded {
            approximate: true,
            ..Bounded::new(n)
        }
    }

    /// Bounds the live rows of one chunk's records (`capacity` of them, `allowed` the slots a
    /// filter keeps), keyed `key_base + slot`. `ceiling` is a cutoff known from elsewhere (the
    /// k-th smallest upper bound of another part of the rows, or infinity): rows whose lower
    /// bound exceeds it are not candidates.
    pub fn scan(
        &mut self,
        query: &BoundQuery,
        records: &[u8],
        capacity: usize,
        allowed: Option<&[u8]>,
        key_base: i64,
        ceiling: f64,
    ) {
        let size = record_bytes(query.dims);
        let rows = capacity.min(records.len() / size);
        query.dots(records, rows, &mut self.dots);
        for (slot, record) in records.chunks_exact(size).take(rows).enumerate() {
            if !live(record) || allowed.is_some_and(|a| !bit(a, slot)) {
                continue;
            }
            if self.approximate {
                let Some(distance) = query.approx_with(record, f64::from(self.dots[slot])) else {
                    continue;
                };
                if distance <= self.upper.threshold().min(ceiling) {
                    self.upper.push(Hit {
                        distance,
                        id: key_base + slot as i64,
                    });
                }
                continue;
            }
            let Some((lower, upper)) = query.bounds_with(record, f64::from(self.dots[slot])) else {
                continue;
            };
            let threshold = self.upper.threshold().min(ceiling);
            if lower > threshold {
                continue;
            }
            let key = key_base + slot as i64;
            if upper < threshold {
                self.upper.push(Hit {
                    distance: upper,
                    id: key,
                });
            }
            self.candidates.push((lower, key));
        }
        // Keep the list short: drop what the threshold has since ruled out, whenever the list
        // has doubled since it was last pruned.
        if self.candidates.len() > 4096 && self.candidates.len() > 2 * self.pruned_at {
            let threshold = self.upper.threshold();
            self.candidates.retain(|c| c.0 <= threshold);
            self.pruned_at = self.candidates.len();
        }
    }

    /// The k-th smallest upper bound seen (infinity before k rows): at least k rows are this
    /// near.
    pub fn threshold(&self) -> f64 {
        self.upper.threshold()
    }

    /// Folds another scan's candidates into this one.
    pub fn merge(&mut self, other: Bounded) {
        self.upper.merge(other.upper);
        self.candidates.extend(other.candidates);
    }

    /// The candidates as (lower bound, key): every row whose lower bound is at most the k-th
    /// smallest upper bound, nearest lower bound first (ties by key). The candidates of an
    /// approximate scan (the n best estimates) have no bound: their lower bound is minus
    /// infinity, and they come by key.
    pub fn into_candidates(self) -> Vec<(f64, i64)> {
        if self.approximate {
            let mut keys: Vec<i64> = self.upper.into_sorted().into_iter().map(|h| h.id).collect();
            keys.sort_unstable();
            return keys
                .into_iter()
                .map(|key| (f64::NEG_INFINITY, key))
                .collect();
        }
        let threshold = self.upper.threshold();
        let mut candidates: Vec<(f64, i64)> = self
            .candidates
            .into_iter()
            .filter(|c| c.0 <= threshold)
            .collect();
        candidates.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        candidates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::scan::Scorer;

    fn records(rows: &[Vec<f32>]) -> Vec<u8> {
        let size = record_bytes(rows[0].len());
        let mut out = vec![0u8; rows.len() * size];
        for (row, rec) in rows.iter().zip(out.chunks_exact_mut(size)) {
            encode(row, rec);
        }
        out
    }

    /// The bounds hold the distance the exact scan computes, for every metric, at lengths
    /// around the SIMD steps, for rows of very different magnitudes, zero rows and one-hot
    /// rows (where all the error sits in one element).
    type QuantizeFn = fn(&[f32], &mut [u8]) -> Quantized;

    #[test]
    fn every_build_of_quantize_writes_the_same_codes_and_sums() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for dims in [1usize, 7, 16, 17, 100, 512, 515] {
            for zero in [false, true] {
                let row: Vec<f32> = (0..dims)
                    .map(|_| if zero { 0.0 } else { next() * 3.0 })
                    .collect();
                let mut a = vec![0u8; dims];
                let x = quantize_portable(&row, &mut a);
                // Every build this CPU can run, against the baseline one.
                let mut builds: Vec<QuantizeFn> = vec![quantize];
                #[cfg(target_arch = "x86_64")]
                {
                    if is_x86_feature_detected!("avx512f") {
                        builds.push(|r, o| unsafe { quantize_avx512(r, o) });
                    }
                    if is_x86_feature_detected!("avx2") {
                        builds.push(|r, o| unsafe { quantize_avx2(r, o) });
                    }
                }
                for build in builds {
                    let mut b = vec![0u8; dims];
                    let y = build(&row, &mut b);
                    assert_eq!(a, b, "dims {dims}");
                    assert_eq!(x.scale.to_bits(), y.scale.to_bits());
                    assert_eq!(x.err_sq.to_bits(), y.err_sq.to_bits());
                    assert_eq!(x.norm_sq.to_bits(), y.norm_sq.to_bits());
                }
                // Against the definitions: codes rounded to nearest even, the norm summed in
                // element order, the error within rounding of a plain sum.
                let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let serial: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
                assert_eq!(x.norm_sq.to_bits(), serial.to_bits(), "dims {dims}");
                let mut err_sq = 0.0f64;
                for (&v, &c) in row.iter().zip(&a) {
                    let want = if max == 0.0 {
                        0.0
                    } else {
                        (v * (127.0 / max)).round_ties_even().clamp(-127.0, 127.0)
                    };
                    assert_eq!(c as i8, want as i8, "dims {dims}, x = {v}");
                    let e = f64::from(v) - f64::from(x.scale) * f64::from(want);
                    err_sq += e * e;
                }
                assert!(
                    (x.err_sq - err_sq).abs() <= 1e-12 * err_sq.max(1e-300),
                    "dims {dims}"
                );
            }
        }
    }

    #[test]
    fn bounds_hold_the_exact_scans_distance() {
        let mut next = crate::index::scan::tests::uniform(11);
        for dims in [1usize, 3, 16, 17, 64, 255, 512] {
            for magnitude in [1e-30f32, 1e-3, 1.0, 1e3, 1e30] {
                let mut rows: Vec<Vec<f32>> = (0..40)
                    .map(|_| (0..dims).map(|_| next() * magnitude).collect())
                    .collect();
                rows.push(vec![0.0; dims]);
                let mut one_hot = vec![0.0; dims];
                one_hot[dims / 2] = magnitude;
                rows.push(one_hot);
                let recs = records(&rows);
                let size = record_bytes(dims);
                for metric in [Metric::Cosine, Metric::Dot, Metric::L2] {
                    for _ in 0..5 {
                        let q: Vec<f32> = (0..dims).map(|_| next()).collect();
                        let scorer = Scorer::new(&q, metric).unwrap();
                        let bound = BoundQuery::new(&q, metric);
                        for (row, rec) in rows.iter().zip(recs.chunks_exact(size)) {
                            let exact = scorer.distance(row, inv_norm(row));
                            match (exact, bound.bounds(rec)) {
                                (None, None) => {}
                                (Some(d), Some((lo, hi))) => assert!(
                                    lo <= d && d <= hi,
                                    "{metric:?} dims {dims} x{magnitude}: {lo} <= {d} <= {hi}"
                                ),
                                other => panic!("{metric:?}: exact and bound disagree {other:?}"),
                            }
                        }
                    }
                }
            }
        }
    }

    /// The chunk kernel (VNNI, four rows at a time, where the CPU has it) gives the plain
    /// integer dot products: lengths around the 64-byte block, row counts around 4, extreme
    /// codes.
    #[test]
    fn chunk_dot_products_match_plain_arithmetic() {
        let mut next = crate::index::scan::tests::uniform(3);
        for dims in [1usize, 63, 64, 65, 128, 200, 512, 513] {
            for rows in [1usize, 3, 4, 5, 9] {
                let data: Vec<Vec<f32>> = (0..rows)
                    .map(|r| {
                        (0..dims)
                            .map(|i| match r {
                                0 => 1.0,
                                1 => {
                                    if i % 2 == 0 {
                                        -1.0
                                    } else {
                                        1.0
                                    }
                                }
                                _ => next(),
                            })
                            .collect()
                    })
                    .collect();
                let recs = records(&data);
                let size = record_bytes(dims);
                for fill in [None, Some(1.0f32), Some(-1.0)] {
                    let q: Vec<f32> = (0..dims).map(|_| fill.unwrap_or_else(&mut next)).collect();
                    let bound = BoundQuery::new(&q, Metric::Dot);
                    let mut out = Vec::new();
                    bound.dots(&recs, rows, &mut out);
                    for (r, rec) in recs.chunks_exact(size).enumerate() {
                        let want: i32 = rec[HEADER..]
                            .iter()
                            .zip(&bound.codes)
                            .map(|(&c, &q)| i32::from(c as i8) * i32::from(q))
                            .sum();
                        assert_eq!(out[r], want, "dims {dims} rows {rows} row {r}");
                    }
                }
            }
        }
    }

    /// The candidates always hold the exact top-k (ties included), and on random 128-d rows
    /// the bounds are tight enough to leave few of them; the live flag and a filter drop
    /// rows.
    #[test]
    fn candidates_hold_the_exact_top_k_and_are_few() {
        let mut next = crate::index::scan::tests::uniform(5);
        let dims = 128;
        let mut rows: Vec<Vec<f32>> = (0..4000)
            .map(|_| (0..dims).map(|_| next()).collect())
            .collect();
        // Ties: copies of one row.
        for i in 1..6 {
            rows[i * 100] = rows[7].clone();
        }
        let mut recs = records(&rows);
        let size = record_bytes(dims);
        // An empty slot (live flag 0) must never come back.
        recs[3 * size + LIVE_AT..3 * size + LIVE_AT + 4].fill(0);
        for metric in [Metric::Cosine, Metric::Dot, Metric::L2] {
            for trial in 0..6 {
                let q: Vec<f32> = if trial == 0 {
                    rows[7].clone()
                } else {
                    (0..dims).map(|_| next()).collect()
                };
                let scorer = Scorer::new(&q, metric).unwrap();
                for k in [1usize, 10, 50] {
                    let mut exact = TopK::new(k);
                    for (i, row) in rows.iter().enumerate() {
                        if i == 3 {
                            continue;
                        }
                        if let Some(distance) = scorer.distance(row, inv_norm(row)) {
                            exact.push(Hit {
                                distance,
                                id: i as i64,
                            });
                        }
                    }
                    let bound = BoundQuery::new(&q, metric);
                    // Two halves scanned separately and merged, as the workers do.
                    let half = 2000;
                    let mut a = Bounded::new(k);
                    a.scan(&bound, &recs[..half * size], half, None, 0, f64::INFINITY);
                    let mut b = Bounded::new(k);
                    b.scan(
                        &bound,
                        &recs[half * size..],
                        half,
                        None,
                        half as i64,
                        a.threshold(),
                    );
                    a.merge(b);
                    let candidates = a.into_candidates();
                    assert!(candidates.is_sorted_by(|x, y| x.0 <= y.0));
                    let keys: Vec<i64> = candidates.iter().map(|c| c.1).collect();
                    assert!(!keys.contains(&3));
                    // Each lower bound is one: the rescoring stops at the first candidate
                    // whose bound exceeds the k-th exact distance.
                    for &(lower, key) in &candidates {
                        let row = &rows[key as usize];
                        let exact = scorer.distance(row, inv_norm(row)).unwrap();
                        assert!(lower <= exact, "{metric:?}: row {key} {lower} > {exact}");
                    }
                    for hit in exact.into_sorted() {
                        assert!(
                            keys.contains(&hit.id),
                            "{metric:?} k {k}: {} missing",
                            hit.id
                        );
                    }
                    assert!(
                        keys.len() <= 4 * k + 40,
                        "{metric:?} k {k}: {} candidates",
                        keys.len()
                    );
                }
            }
        }
        // A filter keeps only its slots.
        let q: Vec<f32> = (0..dims).map(|_| next()).collect();
        let bound = BoundQuery::new(&q, Metric::Cosine);
        let mut allowed = vec![0u8; 4000 / 8];
        allowed[1] = 0b0000_0100; // slot 10
        let mut f = Bounded::new(5);
        f.scan(&bound, &recs, 4000, Some(&allowed), 0, f64::INFINITY);
        let candidates = f.into_candidates();
        assert_eq!(candidates.iter().map(|c| c.1).collect::<Vec<_>>(), vec![10]);
    }
}
