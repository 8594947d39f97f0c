//! The matrix products of CLIP inference: `y (m, n) += x (m, k) · Wᵀ` with `W` a linear layer's
//! weight, packed once at load.
//!
//! Why not a general GEMM: a general GEMM packs the weight matrix into its own panel layout on
//! every call. At batch 32 (1,600 rows) that cost is amortized, but a single image has 50 rows
//! and a caption 5-77, where packing several MB of weights per product costs as much as the
//! product (the `gemm` crate reached 25-70 GFLOP/s at those sizes here, against ~200 at 1,600
//! rows). Packing at load removes it at every size: `W` is stored as panels of 16 output
//! columns, each panel `k x 16` contiguous, which a 6 x 16 register-tiled kernel streams once
//! per block of rows (BLIS's layout for its B operand). The activations are read in place.
//!
//! On x86-64 with AVX2 and FMA (checked at run time) the kernel is written with intrinsics;
//! elsewhere a portable version of the same loop is used.

use std::ops::Range;

use rayon::prelude::*;

/// Output columns per panel.
const NR: usize = 16;
/// Rows per register tile.
const MR: usize = 6;
/// Depth of one pass over a panel (a 512 x 16 block of f32 is 32 KiB: it stays in L1 while
/// every row tile of the block uses it).
const KC: usize = 512;
/// How many rows of a panel ahead the kernel asks for (the hardware prefetcher alone left the
/// small-batch products, which stream the weights from memory once, ~30% slower).
const PREFETCH: usize = 32;
/// Products with fewer multiply-adds run on the calling thread.
const SERIAL_BELOW: usize = 1 << 16;
/// Rows per task when there are many.
const MC: usize = 96;

/// A weight matrix (n outputs, k inputs) as panels of [`NR`] outputs, zero-padded.
pub struct Packed {
    panels: Vec<f32>,
    k: usize,
    n: usize,
}

impl Packed {
    /// Packs `w`, (n, k) row-major as HuggingFace stores a linear layer's weight.
    pub fn from_rows(w: &[f32], n: usize, k: usize) -> Packed {
        assert_eq!(w.len(), n * k);
        Packed::pack(n, k, |kk, j| w[j * k + kk])
    }

    /// Packs `wt`, the weight transposed: (k, n) row-major.
    pub fn from_columns(wt: &[f32], k: usize, n: usize) -> Packed {
        assert_eq!(wt.len(), n * k);
        Packed::pack(n, k, |kk, j| wt[kk * n + j])
    }

    /// Panels of `W[j][kk] = at(kk, j)`, zero-padded to whole panels.
    fn pack(n: usize, k: usize, at: impl Fn(usize, usize) -> f32) -> Packed {
        let mut panels = vec![0f32; n.div_ceil(NR) * k * NR];
        for (p, panel) in panels.chunks_exact_mut(k * NR).enumerate() {
            let lanes = NR.min(n - p * NR);
            for (kk, line) in panel.chunks_exact_mut(NR).enumerate() {
                for (lane, v) in line[..lanes].iter_mut().enumerate() {
                    *v = at(kk, p * NR + lane);
                }
            }
        }
        Packed { panels, k, n }
    }

    pub fn n_out(&self) -> usize {
        self.n
    }

    /// `y (m, n) += x (m, k) · Wᵀ`, on rayon's threads.
    pub fn accumulate(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.accumulate_with(Kernel::detect(), x, m, y, 0..self.n, false)
    }

    /// [`Packed::accumulate`] on the calling thread (for products inside a parallel task).
    pub fn accumulate_serial(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.accumulate_with(Kernel::detect(), x, m, y, 0..self.n, true)
    }

    /// Whether [`Packed::accumulate_cols`] can start at output column `col`.
    pub fn splits_at(&self, col: usize) -> bool {
        col % NR == 0 && col <= self.n
    }

    /// `y (m, cols.len()) += x (m, k) · W[cols]ᵀ`: only the output columns `cols`, whose start
    /// must satisfy [`Packed::splits_at`].
    pub fn accumulate_cols(&self, x: &[f32], m: usize, y: &mut [f32], cols: Range<usize>) {
        assert!(self.splits_at(cols.start) && cols.start <= cols.end && cols.end <= self.n);
        self.accumulate_with(Kernel::detect(), x, m, y, cols, false)
    }

    fn accumulate_with(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        cols: Range<usize>,
        serial: bool,
    ) {
        let (k, width) = (self.k, cols.len());
        assert!(x.len() >= m * k && y.len() >= m * width);
        if m == 0 || width == 0 || k == 0 {
            return;
        }
        let first = cols.start / NR;
        let panels = cols.end.div_ceil(NR) - first;
        let threads = if serial || m * width * k < SERIAL_BELOW {
            1
        } else {
            rayon::current_num_threads()
        };
        let row_chunk = if m > 2 * MC { MC } else { m };
        let row_chunks = m.div_ceil(row_chunk);
        // At least 8 tasks per thread (an odd few would leave a thread idle at the end: 9 tasks
        // on 2 threads cost 5), at most 16 panels each.
        let per_group = panels
            .div_ceil((8 * threads).div_ceil(row_chunks).max(1))
            .clamp(1, 16);
        let groups = panels.div_ceil(per_group);
        let out = SendPtr(y.as_mut_ptr());
        let task = |task: usize| {
            let (rc, g) = (task / groups, task % groups);
            let rows = rc * row_chunk..((rc + 1) * row_chunk).min(m);
            let panel_range = first + g * per_group..first + ((g + 1) * per_group).min(panels);
            // The blocks of weights this task streams, in order: (first k, panel).
            let blocks: Vec<(usize, usize)> = (0..k)
                .step_by(KC)
                .flat_map(|k0| panel_range.clone().map(move |p| (k0, p)))
                .collect();
            let tiles = rows.len().div_ceil(MR);
            for (b, &(k0, p)) in blocks.iter().enumerate() {
                let depth = KC.min(k - k0);
                let col = p * NR - cols.start;
                let panel = &self.panels[p * k * NR + k0 * NR..][..depth * NR];
                // The next block is fetched into L2 while this one is used from L1: the first
                // tile of a block streams it, the others share the next block's lines out.
                let next = blocks.get(b + 1).map(|&(k1, q)| {
                    let lines = KC.min(k - k1);
                    (&self.panels[q * k * NR + k1 * NR..][..lines * NR], lines)
                });
                let mut r = rows.start;
                for t in 0..tiles {
                    let tile = MR.min(rows.end - r);
                    let ahead = match next {
                        Some((block, lines)) if tiles > 1 && t > 0 => {
                            let share = lines.div_ceil(tiles - 1);
                            let from = ((t - 1) * share).min(lines);
                            let to = (t * share).min(lines);
                            &block[from * NR..to * NR]
                        }
                        _ => &[],
                    };
                    // SAFETY: tasks write disjoint (row range, panel range) blocks of y; the
                    // tile is rows r..r+tile, columns col..col+NR (fewer in the last panel),
                    // inside y (asserted above), and reads x rows r..r+tile, columns
                    // k0..k0+depth.
                    unsafe {
                        kernel.run(Tile {
                            x: x.as_ptr().add(r * k + k0),
                            x_stride: k,
                            panel: panel.as_ptr(),
                            depth,
                            y: out.get().add(r * width + col),
                            y_stride: width,
                            rows: tile,
                            cols: NR.min(width - col),
                            ahead: ahead.as_ptr(),
                            ahead_lines: ahead.len() / NR,
                        });
                    }
                    r += tile;
                }
            }
        };
        if threads == 1 {
            (0..row_chunks * groups).for_each(task);
        } else {
            (0..row_chunks * groups).into_par_iter().for_each(task);
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only used for the disjoint writes described in `accumulate`.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One register tile: `y[0..rows, 0..cols] += x[0..rows, 0..depth] · panel[0..depth, 0..cols]`,
/// `rows` ≤ [`MR`], `cols` ≤ [`NR`] (the panel is always [`NR`] wide).
#[derive(Clone, Copy)]
struct Tile {
    x: *const f32,
    x_stride: usize,
    panel: *const f32,
    depth: usize,
    y: *mut f32,
    y_stride: usize,
    rows: usize,
    cols: usize,
    /// Lines of the next block to prefetch into L2, one per step of depth.
    ahead: *const f32,
    ahead_lines: usize,
}

#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    Portable,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Kernel::Avx2Fma;
        }
        Kernel::Portable
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
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => by_rows!(tile_avx2),
            Kernel::Portable => by_rows!(tile_portable),
        }
    }
}

/// Copies the tile's part of `y` into a full-width accumulator (the last panel of a matrix
/// whose n is not a multiple of 16 is narrower).
unsafe fn load_y<const R: usize>(t: Tile) -> [[f32; NR]; R] {
    let mut acc = [[0f32; NR]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        std::ptr::copy_nonoverlapping(t.y.add(r * t.y_stride), row.as_mut_ptr(), t.cols);
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
            let a = *t.x.add(r * t.x_stride + kk);
            for (acc, &b) in acc.iter_mut().zip(b) {
                *acc += a * b;
            }
        }
    }
    store_y(t, &acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(t: Tile) {
    use std::arch::x86_64::*;
    // A narrow last panel goes through a full-width copy of its part of y.
    let mut partial = [[0f32; NR]; R];
    let (y, y_stride) = if t.cols == NR {
        (t.y, t.y_stride)
    } else {
        partial = load_y::<R>(t);
        (partial.as_mut_ptr().cast::<f32>(), NR)
    };
    // Index loops over a fixed-size array keep the 2R accumulators in registers.
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    #[allow(clippy::needless_range_loop)]
    for r in 0..R {
        acc[r][0] = _mm256_loadu_ps(y.add(r * y_stride));
        acc[r][1] = _mm256_loadu_ps(y.add(r * y_stride + 8));
    }
    for kk in 0..t.depth {
        let b = t.panel.add(kk * NR);
        _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH * NR).cast());
        if kk < t.ahead_lines {
            _mm_prefetch::<_MM_HINT_T1>(t.ahead.add(kk * NR).cast());
        }
        let (b0, b1) = (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)));
        #[allow(clippy::needless_range_loop)]
        for r in 0..R {
            let a = _mm256_broadcast_ss(&*t.x.add(r * t.x_stride + kk));
            acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
        }
    }
    #[allow(clippy::needless_range_loop)]
    for r in 0..R {
        _mm256_storeu_ps(y.add(r * y_stride), acc[r][0]);
        _mm256_storeu_ps(y.add(r * y_stride + 8), acc[r][1]);
    }
    if t.cols != NR {
        store_y(t, &partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path (full and partial panels, every tile height, several depth blocks, one and
    /// many tasks, both kernels) against a plain triple loop in f64.
    #[test]
    fn products_match_a_scalar_reference() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 3),
            (12, 512, 40),
            (13, 1100, 33),
            (50, 64, 768),
            (200, 96, 17),
            (301, 24, 50),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let start: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
            let want: Vec<f64> = (0..m * n)
                .map(|i| {
                    let (r, j) = (i / n, i % n);
                    start[i] as f64
                        + (0..k)
                            .map(|kk| x[r * k + kk] as f64 * w[j * k + kk] as f64)
                            .sum::<f64>()
                })
                .collect();
            let packed = Packed::from_rows(&w, n, k);
            assert_eq!(packed.n_out(), n);
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            assert_eq!(Packed::from_columns(&wt, k, n).panels, packed.panels);
            let mut kernels = vec![Kernel::Portable];
            #[cfg(target_arch = "x86_64")]
            if matches!(Kernel::detect(), Kernel::Avx2Fma) {
                kernels.push(Kernel::Avx2Fma);
            }
            for kernel in kernels {
                let mut y = start.clone();
                packed.accumulate_with(kernel, &x, m, &mut y, 0..n, m % 2 == 0);
                for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f64).sqrt() * want.abs().max(1.0);
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "m{m} k{k} n{n} at {i}: {got} vs {want}"
                    );
                }
                // The columns from 16 on, alone.
                if n > 16 {
                    assert!(packed.splits_at(16) && !packed.splits_at(8));
                    let mut part = vec![0f32; m * (n - 16)];
                    packed.accumulate_with(kernel, &x, m, &mut part, 16..n, false);
                    for (r, row) in part.chunks_exact(n - 16).enumerate() {
                        for (c, &got) in row.iter().enumerate() {
                            let want = y[r * n + 16 + c] - start[r * n + 16 + c];
                            assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0));
                        }
                    }
                }
            }
        }
    }
}
