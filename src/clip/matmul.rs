//! The matrix products of CLIP inference: `y (m, n) += x (m, k) · Wᵀ` with `W` a linear layer's
//! weight, packed once at load.
//!
//! Why not a general GEMM: a general GEMM packs the weight matrix into its own panel layout on
//! every call. At batch 32 (1,600 rows) that cost is amortized, but a single image has 50 rows
//! and a caption 5-77, where packing several MB of weights per product costs as much as the
//! product (the `gemm` crate reached 25-70 GFLOP/s at those sizes here, against ~200 at 1,600
//! rows). Packing at load removes it at every size: `W` is stored as panels of 16 output
//! columns, each panel `k x 16` contiguous (or `k/2 x 16` bf16 pairs), which a register-tiled
//! kernel streams once per tile of rows (BLIS's layout for its B operand). f32 activations are
//! read in place; bf16 products round them once per product.
//!
//! Kernels, chosen at run time: on x86-64, AVX-512 (14 x 32 tiles over two panels, 10 x 16 on
//! a last single panel), AVX512_BF16 (the same shapes, pairs multiplied by `VDPBF16PS`) and
//! AVX2/FMA (6 x 16, for f32 and for bf16 widened to f32); elsewhere portable versions of the
//! same loops.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

/// Output columns per panel.
const NR: usize = 16;
/// Rows per register tile of the AVX2 kernel (2 x 6 accumulators of 8 lanes, of 16 registers).
const MR: usize = 6;
/// Rows per register tile of the AVX-512 kernel: 10 accumulators of 16 lanes (of 32 registers).
/// Measured here (Zen 4) against 8, 12 and 16: 8 and 12 lost ~5% on 77- or 50-row products, 16
/// ~20%.
const MR_WIDE: usize = 10;
/// Rows per tile of the AVX-512 kernel over two panels (32 columns, 2R accumulators): each
/// broadcast value of x feeds two multiply-adds, so a core with two full-width FMA units (Intel
/// Xeon) is not held back by its load ports, as the one-panel tile is there.
const MR_PAIR: usize = 14;
/// Depth of one pass over a pair of panels: 2 x 256 x 16 f32, 32 KiB, as one panel's [`KC`].
const KC_PAIR: usize = 256;
/// Depth of one pass over a panel: a 512 x 16 block of f32, 32 KiB, which the row tiles of a
/// task read in turn from L1 and L2 (256, half of L1, measured no faster here).
const KC: usize = 512;
/// How many rows of a panel ahead the kernel asks for (the hardware prefetcher alone left the
/// small-batch products, which stream the weights from memory once, ~30% slower).
const PREFETCH: usize = 32;
/// Products with fewer multiply-adds run on the calling thread.
const SERIAL_BELOW: usize = 1 << 16;
/// Rows per task when there are many.
const MC: usize = 96;
/// Values after each row of a copied block of x (see `restride` in `product_with`).
const RESTRIDE_PAD: usize = 16;

/// The arithmetic of the linear layers' products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Precision {
    /// float32 weights and activations: transformers' arithmetic.
    #[default]
    F32,
    /// bfloat16 weights and activations (rounded to nearest even), their products summed in
    /// float32: what AVX512_BF16's `VDPBF16PS` computes, at twice the float32 rate.
    Bf16,
}

impl Precision {
    /// `fp32` or `bf16` (also `float32`, `f32`, `bfloat16`), any case; the error says what
    /// was expected and found.
    pub fn parse(s: &str) -> Result<Precision, String> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(format!("must be 'fp32' or 'bf16', found '{s}'")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The kernel products of this precision run on, on this CPU.
    pub fn kernel_name(self) -> &'static str {
        Kernel::detect(self).name()
    }

    /// Whether this CPU multiplies bf16 pairs natively (AVX512_BF16's `VDPBF16PS`): bf16
    /// products then run at up to twice the float32 rate. Without it they are widened to f32
    /// and gain nothing.
    pub fn bf16_native() -> bool {
        #[cfg(target_arch = "x86_64")]
        if Kernel::detect(Precision::Bf16) == Kernel::Bf16Avx512 {
            return true;
        }
        false
    }
}

/// The panels' values: f32, or bf16 pairs (one u32 per output column and pair of inputs: input
/// 2i in the low half, 2i + 1 in the high half, the layout `VDPBF16PS` reads).
#[derive(Debug, PartialEq)]
enum Panels {
    F32(Vec<f32>),
    Bf16(Vec<u32>),
}

/// A weight matrix (n outputs, k inputs) as panels of [`NR`] outputs, zero-padded. A panel is
/// `lines` lines of [`NR`] 4-byte values (one cache line): k lines of f32, or k/2 (rounded up)
/// of bf16 pairs.
pub struct Packed {
    panels: Panels,
    k: usize,
    n: usize,
}

impl Packed {
    /// Packs `w`, (n, k) row-major as HuggingFace stores a linear layer's weight.
    pub fn from_rows(w: &[f32], n: usize, k: usize) -> Packed {
        Packed::from_rows_in(w, n, k, Precision::F32)
    }

    /// [`Packed::from_rows`] at `precision`.
    pub fn from_rows_in(w: &[f32], n: usize, k: usize, precision: Precision) -> Packed {
        assert_eq!(w.len(), n * k);
        Packed::from_rows_strided_in(w, k, n, k, precision)
    }

    /// [`Packed::from_rows`] for rows `stride` values apart: row j of W is
    /// `w[j * stride..j * stride + k]` (attention's keys of one head, among a sequence's rows
    /// of q, k and v).
    pub fn from_rows_strided(w: &[f32], stride: usize, n: usize, k: usize) -> Packed {
        Packed::from_rows_strided_in(w, stride, n, k, Precision::F32)
    }

    fn from_rows_strided_in(
        w: &[f32],
        stride: usize,
        n: usize,
        k: usize,
        precision: Precision,
    ) -> Packed {
        assert!(stride >= k && (n == 0 || w.len() >= (n - 1) * stride + k));
        #[cfg(target_arch = "x86_64")]
        if precision == Precision::F32 && Kernel::detect(precision) == Kernel::Avx512 {
            return Packed {
                panels: Panels::F32(panels_from_rows_avx512(w, stride, n, k)),
                k,
                n,
            };
        }
        if precision == Precision::Bf16 {
            return Packed {
                panels: Panels::Bf16(pairs_from_rows(w, stride, n, k)),
                k,
                n,
            };
        }
        Packed::pack(n, k, precision, |kk, j| w[j * stride + kk])
    }

    /// Packs the f32 weight `W[j][kk] = at(kk, j)`, (n, k), read from wherever `at` finds it.
    pub fn from_fn(n: usize, k: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Packed {
        Packed::pack(n, k, Precision::F32, at)
    }

    /// Packs the f32 weight given transposed: `wt` is Wᵀ, (k, n) row-major (a training step's
    /// W for dX = dY·W, and its activations X for dW = dYᵀ·X). Line kk of every panel comes
    /// from row kk of `wt`, so this reads `wt` in order, a block of rows per task; packing one
    /// panel at a time instead read a cache line from each of k rows, pages apart (39 MB took
    /// 32 ms).
    pub fn from_transposed(wt: &[f32], n: usize, k: usize) -> Packed {
        assert_eq!(wt.len(), n * k);
        Packed::from_transposed_strided(wt, n, n, k)
    }

    /// [`Packed::from_transposed`] at `precision`.
    pub fn from_transposed_in(wt: &[f32], n: usize, k: usize, precision: Precision) -> Packed {
        match precision {
            Precision::F32 => Packed::from_transposed(wt, n, k),
            Precision::Bf16 => {
                assert_eq!(wt.len(), n * k);
                Packed {
                    panels: Panels::Bf16(pairs_from_transposed(wt, n, k)),
                    k,
                    n,
                }
            }
        }
    }

    /// [`Packed::from_transposed`] for rows of Wᵀ `stride` values apart: line kk of W is
    /// `wt[kk * stride..kk * stride + n]` (attention's values of one head, among a sequence's
    /// rows of q, k and v).
    pub fn from_transposed_strided(wt: &[f32], stride: usize, n: usize, k: usize) -> Packed {
        assert!(stride >= n && (k == 0 || wt.len() >= (k - 1) * stride + n));
        const BLOCK: usize = 64;
        // Not zeroed first (39 MB for a batch's X): every value is written below, padding
        // included.
        let len = n.div_ceil(NR) * k * NR;
        let mut panels: Vec<f32> = Vec::with_capacity(len);
        let uninit = &mut panels.spare_capacity_mut()[..len];
        // blocks[b][p]: lines b·BLOCK.. of panel p.
        let mut blocks: Vec<Vec<&mut [MaybeUninit<f32>]>> =
            (0..k.div_ceil(BLOCK)).map(|_| Vec::new()).collect();
        if k > 0 {
            for panel in uninit.chunks_exact_mut(k * NR) {
                for (b, lines) in panel.chunks_mut(BLOCK * NR).enumerate() {
                    blocks[b].push(lines);
                }
            }
        }
        let fill = |(b, block): (usize, Vec<&mut [MaybeUninit<f32>]>)| {
            for (p, lines) in block.into_iter().enumerate() {
                let (c0, c1) = (p * NR, ((p + 1) * NR).min(n));
                for (l, line) in lines.chunks_exact_mut(NR).enumerate() {
                    let row = (b * BLOCK + l) * stride;
                    let values = &wt[row + c0..row + c1];
                    // SAFETY: the line has NR slots, at least as many as there are values.
                    // (A whole line is a copy of constant size: inlined, not a call to memcpy.)
                    unsafe {
                        let to = line.as_mut_ptr().cast::<f32>();
                        if values.len() == NR {
                            std::ptr::copy_nonoverlapping(values.as_ptr(), to, NR);
                        } else {
                            std::ptr::copy_nonoverlapping(values.as_ptr(), to, values.len());
                            std::ptr::write_bytes(to.add(values.len()), 0, NR - values.len());
                        }
                    }
                }
            }
        };
        if n * k < SERIAL_BELOW {
            blocks.into_iter().enumerate().for_each(fill);
        } else {
            blocks.into_par_iter().enumerate().for_each(fill);
        }
        // SAFETY: the blocks cover every line of every panel, and `fill` writes all NR values
        // of each line.
        unsafe { panels.set_len(len) };
        Packed {
            panels: Panels::F32(panels),
            k,
            n,
        }
    }

    /// Panels of `W[j][kk] = at(kk, j)`, zero-padded to whole panels.
    fn pack(
        n: usize,
        k: usize,
        precision: Precision,
        at: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Packed {
        let lines = lines(k, precision);
        let panels = match precision {
            Precision::F32 => Panels::F32(fill_panels(n, lines, &at)),
            Precision::Bf16 => Panels::Bf16(fill_panels(n, lines, |l, j| {
                let hi = if 2 * l + 1 < k { at(2 * l + 1, j) } else { 0.0 };
                pair(at(2 * l, j), hi)
            })),
        };
        Packed { panels, k, n }
    }

    pub fn n_out(&self) -> usize {
        self.n
    }

    pub fn precision(&self) -> Precision {
        match self.panels {
            Panels::F32(_) => Precision::F32,
            Panels::Bf16(_) => Precision::Bf16,
        }
    }

    /// `y (m, n) += x (m, k) · Wᵀ` on the calling thread (for products inside a parallel task), for
    /// rows of x `x_stride` values apart and rows of y `y_stride` apart (attention reads one
    /// head's columns of the q rows and writes one head's columns of its output in place).
    pub fn accumulate_serial_strided(
        &self,
        x: &[f32],
        x_stride: usize,
        m: usize,
        y: &mut [f32],
        y_stride: usize,
    ) {
        let kernel = Kernel::detect(self.precision());
        let strides = (x_stride, 1, y_stride);
        self.product_with(kernel, x, m, y, 0..self.n, true, strides, Start::Keep, None)
    }

    /// Whether [`Packed::product`] can start at output column `col`.
    pub fn splits_at(&self, col: usize) -> bool {
        col.is_multiple_of(NR) && col <= self.n
    }

    /// `y (m, cols.len()) = start(y) + x (m, k) · W[cols]ᵀ`, then `finish(y)`, on rayon's
    /// threads: only the output columns `cols` (whose start must satisfy
    /// [`Packed::splits_at`]). `start` and `finish` run inside the product's tasks, on each
    /// task's block of y while it is in cache (a separate pass over a batch's outputs, up to
    /// 20 MB, would go through memory); `finish(segment, column)` gets a piece of one row of y
    /// whose first value is at column `column` of y.
    pub fn product(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        cols: Range<usize>,
        start: Start,
        finish: Option<&Finish<'_>>,
    ) {
        assert!(self.splits_at(cols.start) && cols.start <= cols.end && cols.end <= self.n);
        let kernel = Kernel::detect(self.precision());
        let strides = (self.k, 1, cols.len());
        self.product_with(kernel, x, m, y, cols, false, strides, start, finish)
    }

    /// [`Packed::product`] over all columns, with x given transposed: `xt` is (k, m) row-major
    /// (a training step's dW = dYᵀ·X reads dY so, without a transposed copy). f32 only.
    pub fn product_transposed(&self, xt: &[f32], m: usize, y: &mut [f32], start: Start) {
        assert_eq!(self.precision(), Precision::F32);
        let kernel = Kernel::detect(Precision::F32);
        let strides = (1, m, self.n);
        self.product_with(kernel, xt, m, y, 0..self.n, false, strides, start, None)
    }

    /// `y (m, n) = x (m, k) · Wᵀ` (+ `bias`) into a new output: [`Packed::product`] over all
    /// columns without first zeroing the output (every value is written once the product ends).
    pub fn product_new(&self, x: &[f32], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let start = bias.map_or(Start::Zero, Start::Fill);
        let strides = (self.k, 1, self.n);
        self.product_new_with(x, m, strides, start)
    }

    /// [`Packed::product_transposed`] into a new output, started from zeros.
    pub fn product_transposed_new(&self, xt: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(self.precision(), Precision::F32);
        self.product_new_with(xt, m, (1, m, self.n), Start::Zero)
    }

    fn product_new_with(
        &self,
        x: &[f32],
        m: usize,
        strides: (usize, usize, usize),
        start: Start,
    ) -> Vec<f32> {
        let len = m * self.n;
        let kernel = Kernel::detect(self.precision());
        if self.k == 0 {
            let mut y = vec![0f32; len];
            self.product_with(kernel, x, m, &mut y, 0..self.n, false, strides, start, None);
            return y;
        }
        assert!(matches!(start, Start::Zero | Start::Fill(_)));
        let mut y: Vec<f32> = Vec::with_capacity(len);
        // SAFETY: with k > 0 and a start that is not read from y (zeros or a bias), the
        // product's tiles cover every (row, column) of y (m rows of n) and each tile's first
        // block of lines writes its values before a later block reads them back.
        unsafe {
            let out = y.spare_capacity_mut().as_mut_ptr().cast::<f32>();
            self.product_raw(
                kernel,
                x,
                m,
                (out, len),
                0..self.n,
                false,
                strides,
                start,
                None,
            );
            y.set_len(len);
        }
        y
    }

    #[allow(clippy::too_many_arguments)]
    fn product_with(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        cols: Range<usize>,
        serial: bool,
        strides: (usize, usize, usize),
        start: Start,
        finish: Option<&Finish<'_>>,
    ) {
        let (k, width, y_rows) = (self.k, cols.len(), strides.2);
        if k == 0 {
            if m == 0 || width == 0 {
                return;
            }
            assert!(y_rows >= width && y.len() >= (m - 1) * y_rows + width);
            if let Start::Fill(b) | Start::Add(b) = start {
                assert_eq!(b.len(), width);
            }
            for row in y.chunks_mut(y_rows).take(m) {
                let row = &mut row[..width];
                start.apply(row, 0);
                if let Some(f) = finish {
                    f(row, 0);
                }
            }
            return;
        }
        let y = (y.as_mut_ptr(), y.len());
        // SAFETY: y is initialized.
        unsafe { self.product_raw(kernel, x, m, y, cols, serial, strides, start, finish) }
    }

    /// The product on `y` given as (pointer, length), k > 0.
    ///
    /// SAFETY: y's values that `start` or `finish` read, or that a block of lines after the
    /// first accumulates onto, are initialized: all of y, unless `start` is `Zero` or `Fill`
    /// and there is no `finish` (then the first block writes before anything reads).
    #[allow(clippy::too_many_arguments)]
    unsafe fn product_raw(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        (y_ptr, y_len): (*mut f32, usize),
        cols: Range<usize>,
        serial: bool,
        (x_rows, x_step, y_rows): (usize, usize, usize),
        start: Start,
        finish: Option<&Finish<'_>>,
    ) {
        // x's value (r, kk) is x[r * x_rows + kk * x_step]: rows in place (x_step 1), or x
        // transposed (x_rows 1, x_step m; f32 only: the bf16 conversion reads rows).
        let (k, width) = (self.k, cols.len());
        assert!(
            k > 0
                && y_rows >= width
                && (x_step == 1 || (x_rows == 1 && self.precision() == Precision::F32))
        );
        assert!(
            m == 0
                || (x.len() > (m - 1) * x_rows + (k - 1) * x_step
                    && y_len >= (m - 1) * y_rows + width)
        );
        assert_eq!(kernel.precision(), self.precision());
        if let Start::Fill(b) | Start::Add(b) = start {
            assert_eq!(b.len(), width);
        }
        if m == 0 || width == 0 {
            return;
        }
        let threads = if serial || m * width * k < SERIAL_BELOW {
            1
        } else {
            rayon::current_num_threads()
        };
        // The activations in the kernel's format: read in place as f32, or rounded to bf16 once
        // per product (m x k values, against m x k x n multiply-adds), as pairs or, for the AVX2
        // kernel, as f32 values (`per_line` of them per line of a panel).
        let lines = lines(k, self.precision());
        let per_line = kernel.x_per_line();
        let converted: Vec<u32>;
        let (x_at, panels_at) = match &self.panels {
            Panels::F32(p) => (x.as_ptr(), p.as_ptr()),
            Panels::Bf16(p) => {
                converted = bf16_rows(x, x_rows, m, k, per_line, threads == 1);
                (converted.as_ptr().cast::<f32>(), p.as_ptr().cast::<f32>())
            }
        };
        let x_stride = match self.panels {
            Panels::F32(_) => x_rows,
            Panels::Bf16(_) => lines * per_line,
        };
        // (See `restride` below.)
        let copy_rows = matches!(self.panels, Panels::F32(_))
            && x_step == 1
            && (x_rows * std::mem::size_of::<f32>()).is_multiple_of(4096);
        let (x_at, panels_at) = (SendPtr(x_at.cast_mut()), SendPtr(panels_at.cast_mut()));
        let first = cols.start / NR;
        let panels = cols.end.div_ceil(NR) - first;
        let row_chunk = if m > 2 * MC { MC } else { m };
        let row_chunks = m.div_ceil(row_chunk);
        // At least 8 tasks per thread (an odd few would leave a thread idle at the end: 9 tasks
        // on 2 threads cost 5), at most 16 panels each.
        let per_group = panels
            .div_ceil((8 * threads).div_ceil(row_chunks).max(1))
            .clamp(1, 16);
        let groups = panels.div_ceil(per_group);
        let out = SendPtr(y_ptr);
        let task = |task: usize| {
            let (rc, g) = (task / groups, task % groups);
            let rows = rc * row_chunk..((rc + 1) * row_chunk).min(m);
            let panel_range = first + g * per_group..first + ((g + 1) * per_group).min(panels);
            // The blocks of weights this task streams, in order: (first line, panel), each
            // block one panel or, for a kernel with a two-panel tile, two (the last may be one).
            let (kc, step) = if kernel.pairs() {
                (KC_PAIR, 2)
            } else {
                (KC, 1)
            };
            let blocks: Vec<(usize, usize)> = (0..lines)
                .step_by(kc)
                .flat_map(|l0| panel_range.clone().step_by(step).map(move |p| (l0, p)))
                .collect();
            // SAFETY (all the pointer arithmetic below): panel p's lines l0..l0 + depth lie
            // inside the panels (p < n / NR rounded up, l0 + depth <= lines); x holds m rows
            // of `lines` values (f32, or the bf16 pairs of `converted`).
            let block_at = |l0: usize, p: usize| unsafe {
                panels_at.get().add((p * lines + l0) * NR).cast_const()
            };
            // This task's block of y: rows `rows`, columns c0..c1.
            let c0 = panel_range.start * NR - cols.start;
            let c1 = (panel_range.end * NR - cols.start).min(width);
            let segments = |f: &dyn Fn(&mut [f32])| {
                for r in rows.clone() {
                    // SAFETY: inside y (asserted above); no other task writes this block.
                    f(unsafe {
                        std::slice::from_raw_parts_mut(out.get().add(r * y_rows + c0), c1 - c0)
                    });
                }
            };
            // Zero and Fill are where the first block's tiles start their accumulators instead
            // (no pass over the block); Add is a pass.
            if let Start::Add(_) = start {
                segments(&|seg| start.apply(seg, c0));
            }
            // x read transposed (dW's dYᵀ) is copied per block of lines into rows of this
            // task's rows (one line of them contiguous): read in place, each of a tile's lines
            // is a cache line of its own, m values apart, which no prefetcher follows.
            // Rows of x a multiple of 4 KB apart (k = 1024, 2048, 3072: fc2's input, fc1's dY)
            // are copied too, per block of lines, into rows KC + 16 values apart: in place, a
            // tile's 14 rows would all fall in one of L1's 64 sets (12 ways) and evict each
            // other's lines. (At 2 KB apart, k = 512, they share two sets, and the copy costs
            // more than it saves.)
            let transposed = x_step != 1;
            let restride = !transposed && copy_rows;
            let mut copy = Vec::new();
            let mut copied = usize::MAX;
            for (b, &(l0, p)) in blocks.iter().enumerate() {
                let depth = kc.min(lines - l0);
                if transposed && copied != l0 {
                    copy.clear();
                    for l in l0..l0 + depth {
                        // SAFETY: line l's values for rows `rows` lie inside x (asserted above:
                        // x_rows is 1 here).
                        copy.extend_from_slice(unsafe {
                            std::slice::from_raw_parts(
                                x_at.get().add(l * x_step + rows.start).cast_const(),
                                rows.len(),
                            )
                        });
                    }
                    copied = l0;
                }
                if restride && copied != l0 {
                    copy.clear();
                    for r in rows.clone() {
                        // SAFETY: row r's values at lines l0..l0 + depth lie inside x (asserted
                        // above; x_step is 1 here).
                        copy.extend_from_slice(unsafe {
                            std::slice::from_raw_parts(
                                x_at.get().add(r * x_stride + l0 * per_line).cast_const(),
                                depth * per_line,
                            )
                        });
                        copy.resize(copy.len() + RESTRIDE_PAD, 0.0);
                    }
                    copied = l0;
                }
                let col = p * NR - cols.start;
                let pair = step == 2 && p + 1 < panel_range.end;
                let tiles = rows
                    .len()
                    .div_ceil(if pair { MR_PAIR } else { kernel.max_rows() });
                let panel = block_at(l0, p);
                // Where the tiles' accumulators start: y, or for the first block of a product
                // started from zero or a bias, that row of values (stride 0).
                let (from, from_stride) = match start {
                    Start::Zero if l0 == 0 => (ZEROS.as_ptr(), 0),
                    Start::Fill(b) if l0 == 0 => (b[col..].as_ptr(), 0),
                    _ => (
                        out.get()
                            .cast_const()
                            .wrapping_add(rows.start * y_rows + col),
                        y_rows,
                    ),
                };
                // The next block is fetched into L2 while this one is used from L1: the first
                // tile of a block streams it, the others share the next block's lines out.
                let next = blocks
                    .get(b + 1)
                    .map(|&(l1, q)| (block_at(l1, q), kc.min(lines - l1)));
                let mut r = rows.start;
                for t in 0..tiles {
                    // Heights as even as possible (50 rows: 5 x 10, not 4 x 12 + 2): a short
                    // tile has too few accumulators to hide the multiply-add latency.
                    let tile = (rows.end - r).div_ceil(tiles - t);
                    let (ahead, ahead_lines) = match next {
                        Some((block, block_lines)) if tiles > 1 && t > 0 => {
                            let share = block_lines.div_ceil(tiles - 1);
                            let from = ((t - 1) * share).min(block_lines);
                            let to = (t * share).min(block_lines);
                            (unsafe { block.add(from * NR) }, to - from)
                        }
                        _ => (panel, 0),
                    };
                    // SAFETY: tasks write disjoint (row range, panel range) blocks of y; the
                    // tile is rows r..r+tile, columns col..col+NR (fewer in the last panel),
                    // inside y (asserted above), and reads x rows r..r+tile, lines
                    // l0..l0+depth.
                    unsafe {
                        let (x, x_stride, x_step) = if transposed {
                            (copy.as_ptr().add(r - rows.start), 1, rows.len())
                        } else if restride {
                            let stride = depth * per_line + RESTRIDE_PAD;
                            (copy.as_ptr().add((r - rows.start) * stride), stride, 1)
                        } else {
                            (
                                x_at.get().add(r * x_stride + l0 * per_line).cast_const(),
                                x_stride,
                                1,
                            )
                        };
                        kernel.run(Tile {
                            x,
                            x_stride,
                            x_step,
                            panel,
                            panel_stride: lines * NR,
                            depth,
                            y: out.get().add(r * y_rows + col),
                            y_stride: y_rows,
                            from: from.wrapping_add((r - rows.start) * from_stride),
                            from_stride,
                            rows: tile,
                            cols: (if pair { 2 * NR } else { NR }).min(width - col),
                            ahead,
                            ahead_lines,
                        });
                    }
                    r += tile;
                }
            }
            if let Some(f) = finish {
                segments(&|seg| f(seg, c0));
            }
        };
        if threads == 1 {
            (0..row_chunks * groups).for_each(task);
        } else {
            (0..row_chunks * groups).into_par_iter().for_each(task);
        }
    }
}

/// What a product does to its block of y before accumulating onto it.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    /// Accumulates onto y as it is.
    Keep,
    /// `y = 0` first.
    Zero,
    /// `y = bias` first (one value per output column of the product).
    Fill(&'a [f32]),
    /// `y += bias` first.
    Add(&'a [f32]),
}

impl Start<'_> {
    /// Applies to a piece of a row of y whose first value is at column `col`.
    fn apply(self, seg: &mut [f32], col: usize) {
        match self {
            Start::Keep => {}
            Start::Zero => seg.fill(0.0),
            Start::Fill(b) => seg.copy_from_slice(&b[col..col + seg.len()]),
            Start::Add(b) => {
                for (y, b) in seg.iter_mut().zip(&b[col..]) {
                    *y += b;
                }
            }
        }
    }
}

/// What a product does to each piece of a row of its output once it is complete, given the
/// piece and the column of y it starts at.
pub type Finish<'a> = dyn Fn(&mut [f32], usize) + Sync + 'a;

/// Lines per panel: k for f32, k/2 rounded up for bf16 pairs.
fn lines(k: usize, precision: Precision) -> usize {
    match precision {
        Precision::F32 => k,
        Precision::Bf16 => k.div_ceil(2),
    }
}

/// The f32 panels of `w` (n, k) row-major: a panel is the transpose of its [`NR`] rows of w,
/// taken 16 x 16 values at a time in registers. Gathering one value of each of 16 rows per
/// line, as [`fill_panels`] does, cost a training step's forward pass 0.25-0.5 s for its
/// ~500 MB of weights (ViT-B/32, 2 threads).
#[cfg(target_arch = "x86_64")]
fn panels_from_rows_avx512(w: &[f32], stride: usize, n: usize, k: usize) -> Vec<f32> {
    let mut panels = vec![0f32; n.div_ceil(NR) * k * NR];
    let fill = |p: usize, panel: &mut [f32]| {
        let lanes = NR.min(n - p * NR);
        let rows = &w[p * NR * stride..(p * NR + lanes - 1) * stride + k];
        let whole = if lanes == NR { k / NR * NR } else { 0 };
        for l0 in (0..whole).step_by(NR) {
            // SAFETY: avx512f was detected (Kernel::Avx512); the 16 rows' values l0..l0+16
            // lie inside `rows` (l0 + 16 <= k, 16 rows `stride` apart, the last one ending at
            // k) and lines l0..l0+16 inside `panel` (k lines of NR).
            unsafe {
                transpose16_avx512(
                    rows.as_ptr().add(l0),
                    stride,
                    panel.as_mut_ptr().add(l0 * NR),
                )
            };
        }
        for (l, line) in panel.chunks_exact_mut(NR).enumerate().skip(whole) {
            for (lane, v) in line[..lanes].iter_mut().enumerate() {
                *v = rows[lane * stride + l];
            }
        }
    };
    each_panel(&mut panels, k, fill);
    panels
}

/// Writes the transpose of the 16 x 16 block at `src` (rows `stride` values apart) to `dst`,
/// 256 values, its line l being column l of the block. Four rounds over the 16 registers, one
/// per bit of the row and column numbers: round b swaps bit b of the row with bit b of the
/// column (`VPERMT2PS` picks each lane from either of a pair of rows 2^b apart).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16_avx512(src: *const f32, stride: usize, dst: *mut f32) {
    use std::arch::x86_64::*;
    let mut r = [_mm512_setzero_ps(); 16];
    for (i, r) in r.iter_mut().enumerate() {
        *r = _mm512_loadu_ps(src.add(i * stride));
    }
    for d in [8usize, 4, 2, 1] {
        // Lane j of row i (bit d clear) and of row i + d, from lanes of rows i (index < 16)
        // and i + d (index 16..32).
        let (mut lo, mut hi) = ([0i32; 16], [0i32; 16]);
        for j in 0..16 {
            let (lo_j, hi_j) = if j & d == 0 {
                (j, j + d)
            } else {
                (16 + j - d, 16 + j)
            };
            lo[j] = lo_j as i32;
            hi[j] = hi_j as i32;
        }
        let (lo, hi) = (
            _mm512_loadu_si512(lo.as_ptr().cast()),
            _mm512_loadu_si512(hi.as_ptr().cast()),
        );
        for i in (0..16).filter(|i| i & d == 0) {
            let (a, b) = (r[i], r[i + d]);
            r[i] = _mm512_permutex2var_ps(a, lo, b);
            r[i + d] = _mm512_permutex2var_ps(a, hi, b);
        }
    }
    for (i, r) in r.iter().enumerate() {
        _mm512_storeu_ps(dst.add(i * NR), *r);
    }
}

/// bf16 panels of W, (n, k) in rows `stride` values apart: each panel's 16 rows rounded to
/// pairs as rows (a contiguous pass over each), then transposed into the panel's lines in L1.
fn pairs_from_rows(w: &[f32], stride: usize, n: usize, k: usize) -> Vec<u32> {
    let lines = k.div_ceil(2);
    let mut panels = vec![0u32; n.div_ceil(NR) * lines * NR];
    each_panel(&mut panels, lines, |p, panel| {
        let lanes = NR.min(n - p * NR);
        let mut rows = vec![0u32; lanes * lines];
        for (lane, row) in rows.chunks_exact_mut(lines).enumerate() {
            round_row(&w[(p * NR + lane) * stride..][..k], row);
        }
        for (l, line) in panel.chunks_exact_mut(NR).enumerate() {
            for (lane, v) in line[..lanes].iter_mut().enumerate() {
                *v = rows[lane * lines + l];
            }
        }
    });
    panels
}

/// bf16 panels of W given transposed, `wt` (k, n) row-major: line l of every panel pairs rows
/// 2l and 2l + 1 of `wt`, so each pair of rows is rounded in one pass and its 16-value pieces
/// copied into the panels; blocks of lines in parallel (as [`Packed::from_transposed_strided`]).
fn pairs_from_transposed(wt: &[f32], n: usize, k: usize) -> Vec<u32> {
    const BLOCK: usize = 32;
    let lines = k.div_ceil(2);
    let mut panels = vec![0u32; n.div_ceil(NR) * lines * NR];
    if lines == 0 || n == 0 {
        return panels;
    }
    // blocks[b][p]: lines b·BLOCK.. of panel p.
    let mut blocks: Vec<Vec<&mut [u32]>> = (0..lines.div_ceil(BLOCK)).map(|_| Vec::new()).collect();
    for panel in panels.chunks_exact_mut(lines * NR) {
        for (b, part) in panel.chunks_mut(BLOCK * NR).enumerate() {
            blocks[b].push(part);
        }
    }
    let fill = |(b, mut block): (usize, Vec<&mut [u32]>)| {
        let mut paired = vec![0u32; n];
        for l in 0..block[0].len() / NR {
            let kk = 2 * (b * BLOCK + l);
            let hi: &[f32] = if kk + 1 < k {
                &wt[(kk + 1) * n..][..n]
            } else {
                &[]
            };
            pair_rows(&wt[kk * n..][..n], hi, &mut paired);
            for (p, part) in block.iter_mut().enumerate() {
                let (c0, c1) = (p * NR, ((p + 1) * NR).min(n));
                part[l * NR..][..c1 - c0].copy_from_slice(&paired[c0..c1]);
            }
        }
    };
    if n * k < SERIAL_BELOW {
        blocks.into_iter().enumerate().for_each(fill);
    } else {
        blocks.into_par_iter().enumerate().for_each(fill);
    }
    panels
}

/// `out[i]` = `lo[i]` and `hi[i]` rounded to bf16, as a pair (`hi` empty: 0).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw", "x86_64+avx2", "aarch64+neon"))]
fn pair_rows(lo: &[f32], hi: &[f32], out: &mut [u32]) {
    if hi.is_empty() {
        for (o, &a) in out.iter_mut().zip(lo) {
            *o = pair(a, 0.0);
        }
    } else {
        for ((o, &a), &b) in out.iter_mut().zip(lo).zip(hi) {
            *o = pair(a, b);
        }
    }
}

/// `n.div_ceil(NR)` panels of `lines` lines, `value(line, column)` in the columns below n and
/// zero in the padding.
fn fill_panels<T: Copy + Default + Send>(
    n: usize,
    lines: usize,
    value: impl Fn(usize, usize) -> T + Sync,
) -> Vec<T> {
    let mut panels = vec![T::default(); n.div_ceil(NR) * lines * NR];
    let fill = |p: usize, panel: &mut [T]| {
        let lanes = NR.min(n - p * NR);
        for (l, line) in panel.chunks_exact_mut(NR).enumerate() {
            for (lane, v) in line[..lanes].iter_mut().enumerate() {
                *v = value(l, p * NR + lane);
            }
        }
    };
    each_panel(&mut panels, lines, fill);
    panels
}

/// Runs `fill(p, panel)` on each panel of `lines` lines. A training step packs every weight
/// and activation it multiplies (up to 40 MB): in parallel when there is enough of it.
fn each_panel<T: Send>(panels: &mut [T], lines: usize, fill: impl Fn(usize, &mut [T]) + Sync) {
    if lines == 0 {
        return;
    }
    if panels.len() < SERIAL_BELOW {
        for (p, panel) in panels.chunks_exact_mut(lines * NR).enumerate() {
            fill(p, panel);
        }
    } else {
        panels
            .par_chunks_exact_mut(lines * NR)
            .enumerate()
            .for_each(|(p, panel)| fill(p, panel));
    }
}

/// `v` rounded to the nearest bfloat16, ties to even (as `VCVTNEPS2BF16` rounds); NaN stays NaN.
pub fn bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// `a` and `b` rounded to bf16, as a pair: `a` in the low half.
fn pair(a: f32, b: f32) -> u32 {
    u32::from(bf16(a)) | (u32::from(bf16(b)) << 16)
}

/// The rows of `x` (m, k) rounded to bf16, the odd tail paired with 0: with `per_line` 1, as
/// pairs, (m, k/2 rounded up); with 2, as the f32 bit patterns of the rounded values, (m, k
/// rounded up to even).
fn bf16_rows(
    x: &[f32],
    x_stride: usize,
    m: usize,
    k: usize,
    per_line: usize,
    serial: bool,
) -> Vec<u32> {
    let width = k.div_ceil(2) * per_line;
    let mut out = vec![0u32; m * width];
    let convert = |(r, dst): (usize, &mut [u32])| {
        let row = &x[r * x_stride..][..k];
        if per_line == 1 {
            round_row(row, dst);
        } else {
            widen_row(row, dst);
        }
    };
    if serial || m * k < SERIAL_BELOW {
        out.chunks_exact_mut(width).enumerate().for_each(convert);
    } else {
        out.par_chunks_exact_mut(width)
            .enumerate()
            .for_each(convert);
    }
    out
}

/// One row rounded to bf16, each value as the bits of the f32 it is exactly.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw", "x86_64+avx2", "aarch64+neon"))]
fn widen_row(x: &[f32], out: &mut [u32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = u32::from(bf16(v)) << 16;
    }
}

/// One row as bf16 pairs.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw", "x86_64+avx2", "aarch64+neon"))]
fn round_row(x: &[f32], out: &mut [u32]) {
    let pairs = x.chunks_exact(2);
    let tail = pairs.remainder();
    for (o, two) in out.iter_mut().zip(pairs) {
        *o = pair(two[0], two[1]);
    }
    if let [last] = tail {
        out[x.len() / 2] = pair(*last, 0.0);
    }
}

#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: the pointers are the output, written in the disjoint blocks described in
// `accumulate_with` (and by `amx::product`'s tasks), and the activations and panels, only read
// while they live.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `cols` zeros, where a product started from zero starts its accumulators.
static ZEROS: [f32; 2 * NR] = [0.0; 2 * NR];

/// One register tile: `y[0..rows, 0..cols] = from + x[0..rows, 0..depth] · panel[0..depth, 0..cols]`,
/// `rows` ≤ the kernel's [`Kernel::max_rows`], `cols` ≤ [`NR`] (the panel is always [`NR`]
/// wide), or for a two-panel tile `rows` ≤ [`MR_PAIR`] and [`NR`] < `cols` ≤ 2·[`NR`].
#[derive(Clone, Copy)]
struct Tile {
    x: *const f32,
    x_stride: usize,
    /// From one value of a row of x to the next (1, or m when x is transposed; always 1 for
    /// the bf16 kernels, whose x is converted rows).
    x_step: usize,
    panel: *const f32,
    /// From a panel to the next (a two-panel tile's second panel, `cols` > [`NR`]).
    panel_stride: usize,
    depth: usize,
    y: *mut f32,
    y_stride: usize,
    /// Where the accumulators start: y itself (`y`, `y_stride`), or one row of `cols` values
    /// for every row (stride 0: zeros, or a bias).
    from: *const f32,
    from_stride: usize,
    rows: usize,
    cols: usize,
    /// Lines of the next block to prefetch into L2, one per step of depth.
    ahead: *const f32,
    ahead_lines: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    Portable,
    #[cfg(target_arch = "x86_64")]
    Bf16Avx512,
    #[cfg(target_arch = "x86_64")]
    Bf16Avx2,
    Bf16Portable,
}

impl Kernel {
    /// The best kernel of `precision` this CPU runs (looked up once: every product asks).
    fn detect(precision: Precision) -> Kernel {
        static BEST: std::sync::OnceLock<[Kernel; 2]> = std::sync::OnceLock::new();
        let best =
            BEST.get_or_init(|| [Precision::F32, Precision::Bf16].map(|p| Kernel::available(p)[0]));
        best[precision as usize]
    }

    /// Every kernel of `precision` this CPU can run, the best first.
    fn available(precision: Precision) -> Vec<Kernel> {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = is_x86_feature_detected!("avx512f");
            match precision {
                Precision::F32 => {
                    if avx512 {
                        all.push(Kernel::Avx512);
                    }
                    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                        all.push(Kernel::Avx2Fma);
                    }
                }
                Precision::Bf16 => {
                    if avx512 && is_x86_feature_detected!("avx512bf16") {
                        all.push(Kernel::Bf16Avx512);
                    }
                    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                        all.push(Kernel::Bf16Avx2);
                    }
                }
            }
        }
        all.push(match precision {
            Precision::F32 => Kernel::Portable,
            Precision::Bf16 => Kernel::Bf16Portable,
        });
        all
    }

    fn precision(self) -> Precision {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16Avx512 | Kernel::Bf16Avx2 => Precision::Bf16,
            Kernel::Bf16Portable => Precision::Bf16,
            _ => Precision::F32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => "avx512f",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => "avx2+fma",
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16Avx512 => "avx512bf16",
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16Avx2 => "avx2+fma (bf16 widened to f32)",
            Kernel::Bf16Portable => "portable (bf16 widened to f32)",
        }
    }

    /// Values of the converted activations per line of a panel: bf16 pairs (one u32) for the
    /// pair kernels, two f32 for the AVX2 one, one f32 for the f32 kernels.
    fn x_per_line(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16Avx2 => 2,
            _ => 1,
        }
    }

    /// Whether the kernel has a two-panel tile (run for `cols` > [`NR`]).
    fn pairs(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if matches!(self, Kernel::Avx512 | Kernel::Bf16Avx512) {
            return true;
        }
        false
    }

    /// The tallest one-panel tile the kernel runs.
    fn max_rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 | Kernel::Bf16Avx512 => MR_WIDE,
            _ => MR,
        }
    }

    /// # Safety
    /// The tile's pointers must be valid for the accesses it describes.
    unsafe fn run(self, t: Tile) {
        macro_rules! by_rows {
            ($f:ident) => {
                match t.rows {
                    6 => $f::<6>(t),
                    5 => $f::<5>(t),
                    4 => $f::<4>(t),
                    3 => $f::<3>(t),
                    2 => $f::<2>(t),
                    _ => $f::<1>(t),
                }
            };
        }
        macro_rules! by_rows_wide {
            ($f:ident) => {
                match t.rows {
                    10 => $f::<10>(t),
                    9 => $f::<9>(t),
                    8 => $f::<8>(t),
                    7 => $f::<7>(t),
                    _ => by_rows!($f),
                }
            };
        }
        macro_rules! by_rows_pair {
            ($f:ident) => {
                match t.rows {
                    14 => $f::<14>(t),
                    13 => $f::<13>(t),
                    12 => $f::<12>(t),
                    11 => $f::<11>(t),
                    10 => $f::<10>(t),
                    9 => $f::<9>(t),
                    8 => $f::<8>(t),
                    7 => $f::<7>(t),
                    _ => by_rows!($f),
                }
            };
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 if t.cols > NR => by_rows_pair!(tile_avx512_pair),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => by_rows_wide!(tile_avx512),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => by_rows!(tile_avx2),
            Kernel::Portable => by_rows!(tile_portable),
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16Avx512 if t.cols > NR => by_rows_pair!(tile_bf16_avx512_pair),
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16Avx512 => by_rows_wide!(tile_bf16_avx512),
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16Avx2 => by_rows!(tile_bf16_avx2),
            Kernel::Bf16Portable => by_rows!(tile_bf16_portable),
        }
    }
}

/// Copies where the tile starts (its part of `y`, or the row of `from`) into a full-width
/// accumulator (the last panel of a matrix whose n is not a multiple of 16 is narrower).
unsafe fn load_y<const R: usize>(t: Tile) -> [[f32; NR]; R] {
    let mut acc = [[0f32; NR]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        std::ptr::copy_nonoverlapping(t.from.add(r * t.from_stride), row.as_mut_ptr(), t.cols);
    }
    acc
}

unsafe fn store_y<const R: usize>(t: Tile, acc: &[[f32; NR]; R]) {
    for (r, row) in acc.iter().enumerate() {
        std::ptr::copy_nonoverlapping(row.as_ptr(), t.y.add(r * t.y_stride), t.cols);
    }
}

unsafe fn tile_portable<const R: usize>(t: Tile) {
    let mut acc = load_y::<R>(t);
    for kk in 0..t.depth {
        let b = std::slice::from_raw_parts(t.panel.add(kk * NR), NR);
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = *t.x.add(r * t.x_stride + kk * t.x_step);
            for (acc, &b) in acc.iter_mut().zip(b) {
                *acc += a * b;
            }
        }
    }
    store_y(t, &acc);
}

/// The AVX2 tile: `R` rows x 16 columns in 2R accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(t: Tile) {
    use std::arch::x86_64::*;
    let mut partial = [[0f32; NR]; R];
    let (y, y_stride, mut acc) = avx2_load::<R>(t, &mut partial);
    over_depth(t, |kk| {
        let b = t.panel.add(kk * NR);
        let (b0, b1) = (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)));
        #[allow(clippy::needless_range_loop)]
        for r in 0..R {
            let a = _mm256_broadcast_ss(&*t.x.add(r * t.x_stride + kk * t.x_step));
            acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
        }
    });
    avx2_store(t, (y, y_stride), &acc, &partial);
}

/// The bf16 tile on AVX2/FMA (no bf16 instructions): the AVX2 tile's shape, each line of the
/// panel (a pair of inputs for 16 columns) widened to two f32 vectors by a shift and a mask,
/// the row's inputs read as the f32 values of their rounding (two per line). About fp32's
/// speed: a model registered as bf16 does not become slow on a CPU without AVX512_BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_bf16_avx2<const R: usize>(t: Tile) {
    use std::arch::x86_64::*;
    let mut partial = [[0f32; NR]; R];
    let (y, y_stride, mut acc) = avx2_load::<R>(t, &mut partial);
    let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
    // A plain loop: through `over_depth`'s closure this body ran 2-3x slower (the
    // accumulators left the registers).
    for l in 0..t.depth {
        let p = t.panel.add(l * NR);
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH * NR).cast());
        if l < t.ahead_lines {
            _mm_prefetch::<_MM_HINT_T1>(t.ahead.add(l * NR).cast());
        }
        let (w0, w1) = (
            _mm256_loadu_si256(p.cast()),
            _mm256_loadu_si256(p.add(8).cast()),
        );
        // Input 2l (the low halves), then input 2l + 1 (the high halves).
        for (half, (b0, b1)) in [
            (_mm256_slli_epi32::<16>(w0), _mm256_slli_epi32::<16>(w1)),
            (_mm256_and_si256(w0, high), _mm256_and_si256(w1, high)),
        ]
        .into_iter()
        .enumerate()
        {
            let (b0, b1) = (_mm256_castsi256_ps(b0), _mm256_castsi256_ps(b1));
            #[allow(clippy::needless_range_loop)]
            for r in 0..R {
                let a = _mm256_broadcast_ss(&*t.x.add(r * t.x_stride + 2 * l + half));
                acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
            }
        }
    }
    avx2_store(t, (y, y_stride), &acc, &partial);
}

/// Where an AVX2 tile accumulates, and its accumulators loaded from there: y itself, or for a
/// narrow last panel a full-width copy of its part of y (in `partial`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn avx2_load<const R: usize>(
    t: Tile,
    partial: &mut [[f32; NR]; R],
) -> (*mut f32, usize, [[std::arch::x86_64::__m256; 2]; R]) {
    use std::arch::x86_64::*;
    let (y, y_stride) = if t.cols == NR {
        (t.y, t.y_stride)
    } else {
        *partial = load_y::<R>(t);
        (partial.as_mut_ptr().cast::<f32>(), NR)
    };
    // Index loops over a fixed-size array keep the 2R accumulators in registers.
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let (from, from_stride) = if t.cols == NR {
        (t.from, t.from_stride)
    } else {
        (y.cast_const(), NR)
    };
    #[allow(clippy::needless_range_loop)]
    for r in 0..R {
        acc[r][0] = _mm256_loadu_ps(from.add(r * from_stride));
        acc[r][1] = _mm256_loadu_ps(from.add(r * from_stride + 8));
    }
    (y, y_stride, acc)
}

/// Stores what [`avx2_load`] loaded, and a narrow panel's copy into y.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn avx2_store<const R: usize>(
    t: Tile,
    (y, y_stride): (*mut f32, usize),
    acc: &[[std::arch::x86_64::__m256; 2]; R],
    partial: &[[f32; NR]; R],
) {
    use std::arch::x86_64::*;
    #[allow(clippy::needless_range_loop)]
    for r in 0..R {
        _mm256_storeu_ps(y.add(r * y_stride), acc[r][0]);
        _mm256_storeu_ps(y.add(r * y_stride + 8), acc[r][1]);
    }
    if t.cols != NR {
        store_y(t, partial);
    }
}

/// The AVX-512 tile: one 16-lane accumulator per row (a panel is one register wide), the row's
/// value broadcast from memory into the multiply-add; a narrow last panel is read and written
/// through a lane mask. On cores that split 512-bit operations in two (Zen 4) the multiply-add
/// rate is the AVX2 kernel's, with half the instructions and twice the rows per pass over a
/// panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize>(t: Tile) {
    use std::arch::x86_64::*;
    let (mask, mut acc) = avx512_load::<R>(t);
    over_depth(t, |kk| {
        let b = _mm512_loadu_ps(t.panel.add(kk * NR));
        #[allow(clippy::needless_range_loop)]
        for r in 0..R {
            let a = _mm512_set1_ps(*t.x.add(r * t.x_stride + kk * t.x_step));
            acc[r] = _mm512_fmadd_ps(a, b, acc[r]);
        }
    });
    avx512_store(t, mask, &acc);
}

/// The AVX-512 tile over two adjacent panels: `R` rows x 32 columns in 2R accumulators, each
/// row's value broadcast once for both panels (`cols` > [`NR`]; the second panel may be narrow).
/// A plain depth loop, as the bf16 AVX2 tile's, keeps the 2R accumulators in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512_pair<const R: usize>(t: Tile) {
    use std::arch::x86_64::*;
    let (mask, mut lo, mut hi) = avx512_pair_load::<R>(t);
    let second = t.panel.add(t.panel_stride);
    let ahead = t.ahead_lines.min(t.depth);
    for l in 0..t.depth {
        _mm_prefetch::<_MM_HINT_T0>(t.panel.wrapping_add((l + PREFETCH) * NR).cast());
        _mm_prefetch::<_MM_HINT_T0>(second.wrapping_add((l + PREFETCH) * NR).cast());
        if l < ahead {
            _mm_prefetch::<_MM_HINT_T1>(t.ahead.add(l * NR).cast());
            _mm_prefetch::<_MM_HINT_T1>(t.ahead.wrapping_add(t.panel_stride + l * NR).cast());
        }
        let (b0, b1) = (
            _mm512_loadu_ps(t.panel.add(l * NR)),
            _mm512_loadu_ps(second.add(l * NR)),
        );
        #[allow(clippy::needless_range_loop)]
        for r in 0..R {
            let a = _mm512_set1_ps(*t.x.add(r * t.x_stride + l * t.x_step));
            lo[r] = _mm512_fmadd_ps(a, b0, lo[r]);
            hi[r] = _mm512_fmadd_ps(a, b1, hi[r]);
        }
    }
    avx512_pair_store(t, mask, &lo, &hi);
}

/// A two-panel tile's start: the second panel's lane mask, and the rows of where the tile
/// starts, as the first panel's and the second's accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::type_complexity)]
unsafe fn avx512_pair_load<const R: usize>(
    t: Tile,
) -> (
    std::arch::x86_64::__mmask16,
    [std::arch::x86_64::__m512; R],
    [std::arch::x86_64::__m512; R],
) {
    use std::arch::x86_64::*;
    let high = t.cols - NR;
    let mask: __mmask16 = if high == NR { !0 } else { (1u16 << high) - 1 };
    let (mut lo, mut hi) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
    #[allow(clippy::needless_range_loop)]
    for r in 0..R {
        let from = t.from.add(r * t.from_stride);
        lo[r] = _mm512_loadu_ps(from);
        hi[r] = _mm512_maskz_loadu_ps(mask, from.add(NR));
    }
    (mask, lo, hi)
}

/// A two-panel tile's accumulators into its rows of y.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn avx512_pair_store<const R: usize>(
    t: Tile,
    mask: std::arch::x86_64::__mmask16,
    lo: &[std::arch::x86_64::__m512; R],
    hi: &[std::arch::x86_64::__m512; R],
) {
    use std::arch::x86_64::*;
    #[allow(clippy::needless_range_loop)]
    for r in 0..R {
        let y = t.y.add(r * t.y_stride);
        _mm512_storeu_ps(y, lo[r]);
        _mm512_mask_storeu_ps(y.add(NR), mask, hi[r]);
    }
}

/// The lane mask of the tile's columns, and its rows of y loaded through it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn avx512_load<const R: usize>(
    t: Tile,
) -> (std::arch::x86_64::__mmask16, [std::arch::x86_64::__m512; R]) {
    use std::arch::x86_64::*;
    let mask: __mmask16 = if t.cols == NR {
        !0
    } else {
        (1u16 << t.cols) - 1
    };
    let mut acc = [_mm512_setzero_ps(); R];
    #[allow(clippy::needless_range_loop)]
    for r in 0..R {
        acc[r] = _mm512_maskz_loadu_ps(mask, t.from.add(r * t.from_stride));
    }
    (mask, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn avx512_store<const R: usize>(
    t: Tile,
    mask: std::arch::x86_64::__mmask16,
    acc: &[std::arch::x86_64::__m512; R],
) {
    use std::arch::x86_64::*;
    #[allow(clippy::needless_range_loop)]
    for r in 0..R {
        _mm512_mask_storeu_ps(t.y.add(r * t.y_stride), mask, acc[r]);
    }
}

/// Runs `step(line)` for each line of the tile's depth, asking for the panel's lines
/// [`PREFETCH`] ahead into L1 and for the tile's share of the next block into L2; in two runs,
/// so that the loop has no test for the share's end.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn over_depth(t: Tile, mut step: impl FnMut(usize)) {
    use std::arch::x86_64::*;
    let ahead = t.ahead_lines.min(t.depth);
    for l in 0..ahead {
        _mm_prefetch::<_MM_HINT_T0>(t.panel.wrapping_add((l + PREFETCH) * NR).cast());
        _mm_prefetch::<_MM_HINT_T1>(t.ahead.add(l * NR).cast());
        step(l);
    }
    for l in ahead..t.depth {
        _mm_prefetch::<_MM_HINT_T0>(t.panel.wrapping_add((l + PREFETCH) * NR).cast());
        step(l);
    }
}

/// The value of bf16 pair `v`'s low and high halves.
fn unpair(v: u32) -> (f32, f32) {
    (f32::from_bits(v << 16), f32::from_bits(v & 0xffff_0000))
}

/// The bf16 tile without SIMD: each pair widened to f32 (exact) and multiplied in f32. The same
/// sums as [`tile_bf16_avx512`] up to rounding order, at the portable f32 kernel's speed.
unsafe fn tile_bf16_portable<const R: usize>(t: Tile) {
    let mut acc = load_y::<R>(t);
    let (x, panel) = (t.x.cast::<u32>(), t.panel.cast::<u32>());
    for l in 0..t.depth {
        let b = std::slice::from_raw_parts(panel.add(l * NR), NR);
        for (r, acc) in acc.iter_mut().enumerate() {
            let (a0, a1) = unpair(*x.add(r * t.x_stride + l));
            for (acc, &b) in acc.iter_mut().zip(b) {
                let (b0, b1) = unpair(b);
                *acc += a0 * b0 + a1 * b1;
            }
        }
    }
    store_y(t, &acc);
}

/// The bf16 tile on AVX512_BF16: the AVX-512 tile's shape, each step a `VDPBF16PS` that
/// multiplies a pair of inputs (the row's, broadcast) by the panel's pairs and adds both
/// products into the f32 accumulators: two steps of depth per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16_avx512<const R: usize>(t: Tile) {
    use std::arch::x86_64::*;
    let (x, panel) = (t.x.cast::<i32>(), t.panel.cast::<i32>());
    let (mask, mut acc) = avx512_load::<R>(t);
    over_depth(t, |l| {
        let b: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(l * NR).cast()));
        #[allow(clippy::needless_range_loop)]
        for r in 0..R {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(r * t.x_stride + l)));
            acc[r] = _mm512_dpbf16_ps(acc[r], a, b);
        }
    });
    avx512_store(t, mask, &acc);
}

/// The bf16 tile over two adjacent panels: [`tile_avx512_pair`]'s shape and loop, each step a
/// `VDPBF16PS` per accumulator (two steps of depth), the row's pair broadcast once for both
/// panels: a load per two multiply-adds instead of one, as the f32 pair tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16_avx512_pair<const R: usize>(t: Tile) {
    use std::arch::x86_64::*;
    let (mask, mut lo, mut hi) = avx512_pair_load::<R>(t);
    let (x, panel) = (t.x.cast::<i32>(), t.panel.cast::<i32>());
    let second = panel.add(t.panel_stride);
    let ahead = t.ahead_lines.min(t.depth);
    for l in 0..t.depth {
        _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add((l + PREFETCH) * NR).cast());
        _mm_prefetch::<_MM_HINT_T0>(second.wrapping_add((l + PREFETCH) * NR).cast());
        if l < ahead {
            _mm_prefetch::<_MM_HINT_T1>(t.ahead.add(l * NR).cast());
            _mm_prefetch::<_MM_HINT_T1>(t.ahead.wrapping_add(t.panel_stride + l * NR).cast());
        }
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(l * NR).cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(second.add(l * NR).cast()));
        #[allow(clippy::needless_range_loop)]
        for r in 0..R {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(r * t.x_stride + l)));
            lo[r] = _mm512_dpbf16_ps(lo[r], a, b0);
            hi[r] = _mm512_dpbf16_ps(hi[r], a, b1);
        }
    }
    avx512_pair_store(t, mask, &lo, &hi);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bf16 packings of rows and of transposed rows give the panels of the plain
    /// value-by-value packing, for odd depths (a pair's high half 0) and partial panels.
    #[test]
    fn bf16_packings_match_the_plain_packing() {
        // (300, 257): above SERIAL_BELOW, packed in parallel.
        for (n, k) in [
            (1, 1),
            (3, 5),
            (17, 2),
            (40, 33),
            (70, 96),
            (33, 130),
            (300, 257),
        ] {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 37.0)
                .collect();
            let rows = Packed::from_rows_in(&w, n, k, Precision::Bf16);
            let plain = Packed::pack(n, k, Precision::Bf16, |kk, j| w[j * k + kk]);
            assert_eq!(rows.panels, plain.panels, "rows ({n}, {k})");
            // w read as Wᵀ (k, n) of a (n, k) weight: W[j][kk] = w[kk * n + j].
            let transposed = Packed::from_transposed_in(&w, n, k, Precision::Bf16);
            let plain = Packed::pack(n, k, Precision::Bf16, |kk, j| w[kk * n + j]);
            assert_eq!(transposed.panels, plain.panels, "transposed ({n}, {k})");
        }
    }

    #[test]
    fn products_of_empty_shapes() {
        // k = 0: y is its start (zeros, or the bias on every row); m = 0: nothing.
        let bias = [1.0, -2.0, 3.5];
        let empty = Packed::from_fn(3, 0, |_, _| unreachable!());
        assert_eq!(
            empty.product_new(&[], 2, Some(&bias)),
            [bias, bias].concat()
        );
        assert_eq!(empty.product_new(&[], 2, None), [0.0; 6]);
        assert_eq!(empty.product_transposed_new(&[], 2), [0.0; 6]);
        assert!(empty.product_new(&[], 0, Some(&bias)).is_empty());
        let packed = Packed::from_fn(3, 4, |kk, j| (kk + j) as f32);
        assert!(packed.product_new(&[], 0, None).is_empty());
        let mut y = vec![7.0; 6];
        packed.product(&[0.0; 8], 2, &mut y, 0..0, Start::Zero, None);
        assert_eq!(y, [7.0; 6]);
    }

    /// Every path (full and partial panels, every tile height, odd depths, several depth
    /// blocks, one and many tasks) of every kernel of both precisions that this CPU runs (a
    /// kernel the CPU lacks cannot run: the list is printed) against a plain triple loop in f64.
    #[test]
    fn products_match_a_scalar_reference() {
        // Every row count up to 26 gives every tile height of every kernel (heights are
        // balanced: 13 rows are tiles of 7 and 6 on AVX-512, 5, 4 and 4 on AVX2).
        let small = (1..=26).map(|m| (m, 40, 20));
        let shapes = [
            (1, 1, 1),
            (5, 7, 3),
            (12, 512, 40),
            // rows of x 8 KB apart: copied per block of lines (`restride`)
            (211, 2048, 70),
            (13, 1100, 33),
            (50, 64, 768),
            (200, 96, 17),
            (301, 24, 50),
            (23, 1025, 19),
            (193, 1025, 65),
        ];
        for (m, k, n) in small.chain(shapes) {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let start: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            assert_eq!(
                Packed::from_fn(n, k, |kk, j| wt[kk * n + j]).panels,
                Packed::from_rows(&w, n, k).panels
            );
            // (from_transposed does not zero its panels first: NaNs freed just before would
            // show in padding it left unwritten.)
            drop(vec![f32::NAN; n.div_ceil(NR) * k * NR]);
            assert_eq!(
                Packed::from_transposed(&wt, n, k).panels,
                Packed::from_rows(&w, n, k).panels
            );
            // The same rows a few values apart (the padding between them never read: NaN).
            let gap = 1 + k % 3;
            let spread = |v: &[f32], len: usize| -> Vec<f32> {
                v.chunks(len.max(1))
                    .flat_map(|row| {
                        row.iter()
                            .copied()
                            .chain([f32::NAN; 3].into_iter().take(gap))
                    })
                    .collect()
            };
            if k > 0 && n > 0 {
                assert_eq!(
                    Packed::from_rows_strided(&spread(&w, k), k + gap, n, k).panels,
                    Packed::from_rows(&w, n, k).panels
                );
                assert_eq!(
                    Packed::from_transposed_strided(&spread(&wt, n), n + gap, n, k).panels,
                    Packed::from_rows(&w, n, k).panels
                );
            }
            for precision in [Precision::F32, Precision::Bf16] {
                // bf16 products are exact in f32: the reference is f64 arithmetic on the
                // rounded values.
                let round = |v: f32| match precision {
                    Precision::F32 => v as f64,
                    Precision::Bf16 => f32::from_bits(u32::from(bf16(v)) << 16) as f64,
                };
                let want: Vec<f64> = (0..m * n)
                    .map(|i| {
                        let (r, j) = (i / n, i % n);
                        start[i] as f64
                            + (0..k)
                                .map(|kk| round(x[r * k + kk]) * round(w[j * k + kk]))
                                .sum::<f64>()
                    })
                    .collect();
                let packed = Packed::from_rows_in(&w, n, k, precision);
                assert_eq!((packed.n_out(), packed.precision()), (n, precision));
                check(&packed, precision, &x, (m, k, n), &start, &want);
                // Into a new output, never zeroed: a block of NaNs is freed first so that the
                // allocator likely hands it back, and any value read before it is written shows.
                let bias: Vec<f32> = (0..n).map(|j| 0.5 - j as f32).collect();
                let xt: Vec<f32> = (0..k * m).map(|i| x[(i % m) * k + i / m]).collect();
                let fresh = |f: &dyn Fn() -> Vec<f32>| {
                    drop(vec![f32::NAN; m * n]);
                    f()
                };
                let mut outputs = vec![
                    (fresh(&|| packed.product_new(&x, m, None)), false),
                    (fresh(&|| packed.product_new(&x, m, Some(&bias))), true),
                ];
                if precision == Precision::F32 {
                    outputs.push((fresh(&|| packed.product_transposed_new(&xt, m)), false));
                }
                for (got, biased) in outputs {
                    assert_eq!(got.len(), m * n);
                    for (i, &got) in got.iter().enumerate() {
                        let b = if biased { bias[i % n] as f64 } else { 0.0 };
                        let want = want[i] - start[i] as f64 + b;
                        let tol = 1e-5 * (k as f64).sqrt() * want.abs().max(1.0);
                        assert!(
                            (got as f64 - want).abs() <= tol,
                            "new output m{m} k{k} n{n} at {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    fn check(
        packed: &Packed,
        precision: Precision,
        x: &[f32],
        (m, k, n): (usize, usize, usize),
        start: &[f32],
        want: &[f64],
    ) {
        let kernels = Kernel::available(precision);
        if (m, k, n) == (5, 7, 3) {
            eprintln!("{precision:?} kernels checked: {kernels:?}");
        }
        for kernel in kernels {
            let mut y = start.to_vec();
            let strides = (k, 1, n);
            packed.product_with(
                kernel,
                x,
                m,
                &mut y,
                0..n,
                m % 2 == 0,
                strides,
                Start::Keep,
                None,
            );
            for (i, (&got, &want)) in y.iter().zip(want).enumerate() {
                let tol = 1e-5 * (k as f64).sqrt() * want.abs().max(1.0);
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "{kernel:?} m{m} k{k} n{n} at {i}: {got} vs {want}"
                );
            }
            // Rows of x and y further apart than their widths (attention's heads): the same
            // values, and nothing read or written between the rows (NaN there would show).
            let (xs, ys) = (k + 3, n + 5);
            let wide_x: Vec<f32> = (0..m * xs)
                .map(|i| match i % xs {
                    c if c < k => x[i / xs * k + c],
                    _ => f32::NAN,
                })
                .collect();
            let mut wide_y: Vec<f32> = (0..m * ys)
                .map(|i| match i % ys {
                    c if c < n => start[i / ys * n + c],
                    _ => -7.0,
                })
                .collect();
            let strides = (xs, 1, ys);
            let serial = m % 2 == 1;
            packed.product_with(
                kernel,
                &wide_x,
                m,
                &mut wide_y,
                0..n,
                serial,
                strides,
                Start::Keep,
                None,
            );
            for (i, &got) in wide_y.iter().enumerate() {
                let want = match i % ys {
                    c if c < n => y[i / ys * n + c],
                    _ => -7.0,
                };
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{kernel:?} strided m{m} k{k} n{n} at {i}"
                );
            }
            // x transposed ((k, m) row-major): the same values, bit for bit.
            if precision == Precision::F32 {
                let xt: Vec<f32> = (0..k * m).map(|i| x[(i % m) * k + i / m]).collect();
                let mut got = start.to_vec();
                let strides = (1, m, n);
                let serial = m % 4 == 1;
                let y_t = &mut got;
                packed.product_with(
                    kernel,
                    &xt,
                    m,
                    y_t,
                    0..n,
                    serial,
                    strides,
                    Start::Keep,
                    None,
                );
                assert!(
                    got.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{kernel:?} transposed x m{m} k{k} n{n}"
                );
            }
            // Started from zero, from a bias and from y plus a bias, finished by a function
            // of the value and its column: each must see every value of y once, complete.
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 1.0).collect();
            let finish = |seg: &mut [f32], col: usize| {
                for (c, v) in seg.iter_mut().enumerate() {
                    *v = 2.0 * *v + (col + c) as f32;
                }
            };
            for (init, from) in [
                (Start::Zero, 0),
                (Start::Fill(&bias), 1),
                (Start::Add(&bias), 2),
                (Start::Keep, 3),
            ] {
                let mut got = start.to_vec();
                packed.product_with(
                    kernel,
                    x,
                    m,
                    &mut got,
                    0..n,
                    m % 3 == 0,
                    (k, 1, n),
                    init,
                    Some(&finish),
                );
                for (i, &got) in got.iter().enumerate() {
                    let (j, product) = (i % n, want[i] - start[i] as f64);
                    let before = match from {
                        0 => 0.0,
                        1 => bias[j] as f64,
                        2 => start[i] as f64 + bias[j] as f64,
                        _ => start[i] as f64,
                    };
                    let want = 2.0 * (before + product) + j as f64;
                    let tol = 1e-5 * (k as f64).sqrt() * want.abs().max(1.0);
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "{kernel:?} start {from} m{m} k{k} n{n} at {i}: {got} vs {want}"
                    );
                }
            }
            // The columns from 16 on, alone.
            if n > 16 {
                assert!(packed.splits_at(16) && !packed.splits_at(8));
                let mut part = vec![0f32; m * (n - 16)];
                packed.product_with(
                    kernel,
                    x,
                    m,
                    &mut part,
                    16..n,
                    false,
                    (k, 1, n - 16),
                    Start::Keep,
                    None,
                );
                for (r, row) in part.chunks_exact(n - 16).enumerate() {
                    for (c, &got) in row.iter().enumerate() {
                        let want = y[r * n + 16 + c] - start[r * n + 16 + c];
                        assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0));
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even (1).
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to even (1 + 2^-6).
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16(-2.5), 0xc020);
        assert!(f32::from_bits(u32::from(bf16(f32::NAN)) << 16).is_nan());
        assert_eq!(bf16(f32::INFINITY), 0x7f80);
    }
}
