//! Matrix products on Intel AMX tiles (Xeon 4th generation, "Sapphire Rapids", and later):
//! bf16 inputs, float32 sums. `clip_train`'s `precision = 'bf16'` runs its linear layers'
//! products here (forward, dX and dW); everything else in the step stays float32.
//!
//! An operand is packed once per product into 1 KiB tiles (16 rows of 32 bf16 values, rounded
//! to nearest even), padded with zeros to whole pairs of tiles, so that every register block is
//! 2 x 2 tiles: two of A (32 rows), two of B (32 columns), four float32 accumulators.
//! `TDPBF16PS` multiplies a 16 x 32 tile of A by a 32 x 16 tile of B, whose rows hold pairs of
//! depths ("VNNI" layout: row r is depths 2r and 2r + 1 of each of the 16 columns, interleaved).
//!
//! The kernel needs the OS's leave to use the tile registers (Linux: `arch_prctl`
//! `ARCH_REQ_XCOMP_PERM`), asked once per process by [`available`]; every function here asserts
//! it. Tiles are configured per task (the configuration belongs to the thread) and released at
//! its end.

use rayon::prelude::*;
use std::sync::OnceLock;

use super::matmul::SendPtr;

/// Rows (and columns) of a tile.
const T: usize = 16;
/// Depths per tile step: one tile row is 32 bf16 values, 64 bytes.
const KT: usize = 32;
/// bf16 values per tile.
const TILE: usize = T * KT;
/// Depth steps per block: a 32-row panel of A over one block (2 x 8 tiles, 16 KiB) stays in L1
/// while the block's tiles of B stream from L2.
const KC: usize = 8;
/// Tiles of B (columns / 16) per task.
const GROUP: usize = 16;
/// At most this many 32-row panels of A per task: a task's sums (256 rows x 256 columns,
/// 256 KiB) stay in L2 at any batch size. (2, 4, 8, 16 and unbounded measured the same
/// within this machine's noise on the step's shapes.)
const PANELS: usize = 8;

/// Whether this CPU has AMX with bf16 and the OS lets this process use it (asked once).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE; AVX512_BF16 (leaf 7.1, EAX
            // bit 5) and AVX-512 BW for the packing.
            let (l7, l71) = (
                std::arch::x86_64::__cpuid_count(7, 0),
                std::arch::x86_64::__cpuid_count(7, 1),
            );
            let amx = l7.edx & (1 << 22) != 0 && l7.edx & (1 << 24) != 0;
            let packing = l71.eax & (1 << 5) != 0
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw");
            if !amx || !packing {
                return false;
            }
            #[cfg(target_os = "linux")]
            {
                const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
                const XFEATURE_XTILEDATA: libc::c_long = 18;
                // SAFETY: a plain syscall with integer arguments.
                unsafe {
                    libc::syscall(
                        libc::SYS_arch_prctl,
                        ARCH_REQ_XCOMP_PERM,
                        XFEATURE_XTILEDATA,
                    ) == 0
                }
            }
            #[cfg(not(target_os = "linux"))]
            false
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// How an f32 source matrix holds an operand's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row-major as the operand is: A (m, k) or B (k, n).
    Rows,
    /// Row-major transposed: Aᵀ (k, m) or Bᵀ (n, k).
    Transposed,
}

/// An operand in tiles: `blocks` (an even number) of `steps` tiles each; block b of A is its
/// rows 16b.., block b of B its columns 16b...
pub struct Operand {
    data: Vec<u16>,
    blocks: usize,
    steps: usize,
    /// Rows of A or columns of B before padding.
    len: usize,
}

impl Operand {
    /// A (m, k) from `src`, `layout` saying whether it is A or Aᵀ, row-major.
    pub fn a(src: &[f32], m: usize, k: usize, layout: Layout) -> Operand {
        assert!(available() && src.len() >= m * k);
        Operand::pack(src, m, k, layout == Layout::Rows, false)
    }

    /// B (k, n) from `src`, `layout` saying whether it is B or Bᵀ, row-major.
    pub fn b(src: &[f32], k: usize, n: usize, layout: Layout) -> Operand {
        assert!(available() && src.len() >= k * n);
        Operand::pack(src, n, k, layout == Layout::Transposed, true)
    }

    /// `len` rows (A) or columns (B) of `depth` values; `along` when each one's values are
    /// contiguous in `src` (A given as rows, B given transposed).
    fn pack(src: &[f32], len: usize, depth: usize, along: bool, vnni: bool) -> Operand {
        let blocks = len.div_ceil(2 * T) * 2;
        let steps = depth.div_ceil(KT);
        let mut data = vec![0u16; blocks * steps * TILE];
        let fill = |(b, block): (usize, &mut [u16])| {
            for (q, tile) in block.chunks_exact_mut(TILE).enumerate() {
                let at = Window {
                    src,
                    len,
                    depth,
                    first: b * T,
                    depth0: q * KT,
                };
                // SAFETY: available() (asserted by the callers) implies AVX-512 F/BW/BF16.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match (along, vnni) {
                        (true, false) => at.rows_along(tile),
                        (false, false) => at.rows_across(tile),
                        (true, true) => at.pairs_along(tile),
                        (false, true) => at.pairs_across(tile),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (at, tile);
            }
        };
        if blocks * steps > 16 {
            data.par_chunks_mut(steps * TILE).enumerate().for_each(fill);
        } else {
            data.chunks_mut(steps * TILE).enumerate().for_each(fill);
        }
        Operand {
            data,
            blocks,
            steps,
            len,
        }
    }

    fn tile(&self, block: usize, step: usize) -> *const u16 {
        self.data[(block * self.steps + step) * TILE..][..TILE].as_ptr()
    }
}

/// One tile's source: items (rows of A, columns of B) `first..first + 16` of `len`, depths
/// `depth0..depth0 + 32` of `depth`, zero outside. Item i's depth d is
/// `src[i * depth + d]` when its values run along a row of `src`, else `src[d * len + i]`.
#[derive(Clone, Copy)]
struct Window<'a> {
    src: &'a [f32],
    len: usize,
    depth: usize,
    first: usize,
    depth0: usize,
}

#[cfg(target_arch = "x86_64")]
impl Window<'_> {
    /// Lanes of up to 16 valid values from `count` on (the rest masked to zero).
    fn mask(count: usize) -> u16 {
        if count >= 16 {
            u16::MAX
        } else {
            ((1u32 << count) - 1) as u16
        }
    }

    /// 16 values of one row of `src` from `at`, of which `valid` exist.
    #[target_feature(enable = "avx512f")]
    unsafe fn load(&self, at: usize, valid: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        if valid == 0 {
            return _mm512_setzero_ps();
        }
        // SAFETY: the masked lanes are not read; the others lie inside src.
        unsafe { _mm512_maskz_loadu_ps(Self::mask(valid), self.src.as_ptr().add(at)) }
    }

    /// Item i's 32 depths (two vectors), items along rows of `src`.
    #[target_feature(enable = "avx512f")]
    unsafe fn item(&self, i: usize) -> [std::arch::x86_64::__m512; 2] {
        let valid = if i < self.len {
            self.depth.saturating_sub(self.depth0)
        } else {
            0
        };
        let at = i * self.depth + self.depth0;
        // SAFETY: (see load)
        unsafe {
            [
                self.load(at, valid.min(16)),
                self.load(at + 16, valid.saturating_sub(16)),
            ]
        }
    }

    /// 16 items' values at depth d (items across rows of `src`).
    #[target_feature(enable = "avx512f")]
    unsafe fn depth_row(&self, d: usize) -> std::arch::x86_64::__m512 {
        let d = self.depth0 + d;
        let valid = if d < self.depth {
            self.len.saturating_sub(self.first)
        } else {
            0
        };
        // SAFETY: (see load)
        unsafe { self.load(d * self.len + self.first, valid.min(16)) }
    }

    /// A's tile, rows along `src`: row r is item r's 32 depths.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn rows_along(&self, tile: &mut [u16]) {
        use std::arch::x86_64::*;
        for r in 0..T {
            // SAFETY: tile holds 16 rows of 32 values.
            unsafe {
                let [lo, hi] = self.item(self.first + r);
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(tile.as_mut_ptr().add(r * KT).cast(), v);
            }
        }
    }

    /// A's tile, rows across `src` (Aᵀ given): two 16 x 16 transposes of the depth rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn rows_across(&self, tile: &mut [u16]) {
        use std::arch::x86_64::*;
        let mut by_depth = [0f32; KT * T];
        let mut by_row = [[0f32; T * T]; 2];
        // SAFETY: the buffers hold 32 and 2 x 16 rows of 16 values; tile 16 rows of 32.
        unsafe {
            for d in 0..KT {
                _mm512_storeu_ps(by_depth.as_mut_ptr().add(d * T), self.depth_row(d));
            }
            for (half, out) in by_row.iter_mut().enumerate() {
                super::matmul::transpose16_avx512(
                    by_depth.as_ptr().add(half * T * T),
                    T,
                    out.as_mut_ptr(),
                );
            }
            for r in 0..T {
                let lo = _mm512_loadu_ps(by_row[0].as_ptr().add(r * T));
                let hi = _mm512_loadu_ps(by_row[1].as_ptr().add(r * T));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(tile.as_mut_ptr().add(r * KT).cast(), v);
            }
        }
    }

    /// B's tile, columns along `src` (Bᵀ given): item j's 32 depths are 16 pairs, column j of
    /// the tile; a 16 x 16 transpose of the pairs makes the rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pairs_along(&self, tile: &mut [u16]) {
        use std::arch::x86_64::*;
        let mut by_item = [0f32; T * T];
        // SAFETY: by_item holds 16 rows of 16 pairs (as f32 bits); tile 16 rows of 16 pairs.
        unsafe {
            for j in 0..T {
                let [lo, hi] = self.item(self.first + j);
                let v: __m512 = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_ps(by_item.as_mut_ptr().add(j * T), v);
            }
            super::matmul::transpose16_avx512(by_item.as_ptr(), T, tile.as_mut_ptr().cast());
        }
    }

    /// B's tile, columns across `src` (B given): row r interleaves depths 2r and 2r + 1.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pairs_across(&self, tile: &mut [u16]) {
        use std::arch::x86_64::*;
        // u16 lane 2j takes depth 2r's column j (lane j of the converted pair), 2j + 1 depth
        // 2r + 1's (lane 16 + j).
        let idx: [u16; 32] = std::array::from_fn(|l| ((l / 2) + 16 * (l % 2)) as u16);
        // SAFETY: tile holds 16 rows of 32 values.
        unsafe {
            let idx = _mm512_loadu_si512(idx.as_ptr().cast());
            for r in 0..T {
                let (lo, hi) = (self.depth_row(2 * r), self.depth_row(2 * r + 1));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                let v = _mm512_permutexvar_epi16(idx, v);
                _mm512_storeu_si512(tile.as_mut_ptr().add(r * KT).cast(), v);
            }
        }
    }
}

thread_local! {
    /// A task's block of sums (reused by the thread's next task).
    static SUMS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `A · B` (m, n) as a new row-major matrix, plus `bias` (n values) on every row.
pub fn product(a: &Operand, b: &Operand, bias: Option<&[f32]>) -> Vec<f32> {
    assert!(available() && a.steps == b.steps);
    let (m, n) = (a.len, b.len);
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n);
    }
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    if m == 0 || n == 0 {
        return c;
    }
    let bias: Option<Vec<f32>> = bias.map(|v| {
        let mut padded = v.to_vec();
        padded.resize(b.blocks * T, 0.0);
        padded
    });
    let panels = a.blocks / 2;
    let groups = b.blocks.div_ceil(GROUP);
    let want = 8 * rayon::current_num_threads();
    let per_part = panels
        .div_ceil(want.div_ceil(groups).clamp(1, panels))
        .min(PANELS);
    let parts = panels.div_ceil(per_part);
    let out = SendPtr(c.as_mut_ptr());
    let task = |task: usize| {
        let (part, g) = (task / groups, task % groups);
        let panel_range = part * per_part..((part + 1) * per_part).min(panels);
        let block_range = g * GROUP..((g + 1) * GROUP).min(b.blocks);
        let (rows, cols) = (panel_range.len() * 2 * T, block_range.len() * T);
        SUMS.with_borrow_mut(|sums| {
            if sums.len() < rows * cols {
                sums.resize(rows * cols, 0.0);
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the tiles read lie inside the operands (block < blocks, step < steps);
            // the sums' tiles inside `sums` (rows x cols); the bias' rows inside its padding.
            unsafe {
                block(
                    a,
                    b,
                    bias.as_deref(),
                    panel_range.clone(),
                    block_range.clone(),
                    sums,
                    cols,
                )
            };
            // The valid part of the block, to its place in c.
            let (r0, c0) = (panel_range.start * 2 * T, block_range.start * T);
            let (valid_rows, valid_cols) = (rows.min(m - r0), cols.min(n - c0));
            for r in 0..valid_rows {
                // SAFETY: row r0 + r < m, columns c0..c0 + valid_cols < n; tasks write
                // disjoint blocks.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        sums.as_ptr().add(r * cols),
                        out.get().add((r0 + r) * n + c0),
                        valid_cols,
                    )
                };
            }
        });
    };
    (0..parts * groups).into_par_iter().for_each(task);
    // SAFETY: the tasks wrote every row and column.
    unsafe { c.set_len(m * n) };
    c
}

/// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

/// One task: sums of A's panels `panels` (32 rows each) by B's blocks `blocks` (16 columns
/// each), into `sums` (rows `cols` values apart).
#[cfg(target_arch = "x86_64")]
unsafe fn block(
    a: &Operand,
    b: &Operand,
    bias: Option<&[f32]>,
    panels: std::ops::Range<usize>,
    blocks: std::ops::Range<usize>,
    sums: &mut [f32],
    cols: usize,
) {
    use std::arch::asm;
    let mut config = Config([0; 64]);
    config.0[0] = 1;
    for t in 0..8 {
        config.0[16 + 2 * t] = (KT * 2) as u8;
        config.0[48 + t] = T as u8;
    }
    let stride = cols * 4;
    // SAFETY (the asm): tile loads and stores stay inside the tiles and sums named (see the
    // caller); tmm0-7 are not registers the compiler allocates.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack));
        for k0 in (0..a.steps).step_by(KC) {
            for (pi, p) in panels.clone().enumerate() {
                for (bi, blk) in blocks.clone().step_by(2).enumerate() {
                    // Sums (2p, blk), (2p, blk + 1), (2p + 1, blk), (2p + 1, blk + 1).
                    let s0 = sums.as_mut_ptr().add(pi * 2 * T * cols + bi * 2 * T);
                    let (s1, s2) = (s0.add(T), s0.add(T * cols));
                    let s3 = s2.add(T);
                    if k0 > 0 {
                        asm!(
                            "tileloadd tmm0, [{s0} + {st}*1]",
                            "tileloadd tmm1, [{s1} + {st}*1]",
                            "tileloadd tmm2, [{s2} + {st}*1]",
                            "tileloadd tmm3, [{s3} + {st}*1]",
                            s0 = in(reg) s0, s1 = in(reg) s1, s2 = in(reg) s2, s3 = in(reg) s3,
                            st = in(reg) stride, options(nostack),
                        );
                    } else if let Some(bias) = bias {
                        // Every row starts from the bias: a row stride of 0.
                        let b0 = bias[blk * T..][..2 * T].as_ptr();
                        asm!(
                            "tileloadd tmm0, [{b0} + {z}*1]",
                            "tileloadd tmm1, [{b1} + {z}*1]",
                            "tileloadd tmm2, [{b0} + {z}*1]",
                            "tileloadd tmm3, [{b1} + {z}*1]",
                            b0 = in(reg) b0, b1 = in(reg) b0.add(T), z = in(reg) 0usize,
                            options(nostack),
                        );
                    } else {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tilezero tmm2",
                            "tilezero tmm3",
                            options(nostack),
                        );
                    }
                    for step in k0..(k0 + KC).min(a.steps) {
                        asm!(
                            "tileloadd tmm4, [{a0} + {st}*1]",
                            "tileloadd tmm6, [{b0} + {st}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tileloadd tmm7, [{b1} + {st}*1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tileloadd tmm5, [{a1} + {st}*1]",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a.tile(2 * p, step),
                            a1 = in(reg) a.tile(2 * p + 1, step),
                            b0 = in(reg) b.tile(blk, step),
                            b1 = in(reg) b.tile(blk + 1, step),
                            st = in(reg) KT * 2,
                            options(nostack),
                        );
                    }
                    asm!(
                        "tilestored [{s0} + {st}*1], tmm0",
                        "tilestored [{s1} + {st}*1], tmm1",
                        "tilestored [{s2} + {st}*1], tmm2",
                        "tilestored [{s3} + {st}*1], tmm3",
                        s0 = in(reg) s0, s1 = in(reg) s1, s2 = in(reg) s2, s3 = in(reg) s3,
                        st = in(reg) stride, options(nostack),
                    );
                }
            }
        }
        asm!("tilerelease", options(nostack));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(v: f32) -> f64 {
        f32::from_bits((super::super::matmul::bf16(v) as u32) << 16) as f64
    }

    /// Every layout and edge (rows, columns and depths not multiples of the tiles), against
    /// the same sums in f64 over the bf16-rounded inputs: only the float32 summation differs.
    #[test]
    fn products_match_a_reference_on_rounded_inputs() {
        if !available() {
            eprintln!("amx: this CPU (or OS) has no AMX; its products are not tested here");
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (5, 7, 3),
            (33, 40, 17),
            (77, 100, 45),
            (64, 512, 96),
            (300, 33, 260),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 29.0)
                .collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 / 7.0 - 1.0).collect();
            // x as A (m, k) and as Aᵀ; w as B (k, n) and as Bᵀ.
            let xt: Vec<f32> = (0..k * m).map(|i| x[(i % m) * k + i / m]).collect();
            let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            for (a_layout, b_layout) in [
                (Layout::Rows, Layout::Rows),
                (Layout::Rows, Layout::Transposed),
                (Layout::Transposed, Layout::Rows),
                (Layout::Transposed, Layout::Transposed),
            ] {
                let a_src = if a_layout == Layout::Rows { &x } else { &xt };
                let b_src = if b_layout == Layout::Rows { &w } else { &wt };
                let a = Operand::a(a_src, m, k, a_layout);
                let b = Operand::b(b_src, k, n, b_layout);
                for with_bias in [false, true] {
                    let got = product(&a, &b, with_bias.then_some(&bias[..]));
                    assert_eq!(got.len(), m * n);
                    for i in 0..m {
                        for j in 0..n {
                            let (mut want, mut size) = if with_bias {
                                (bias[j] as f64, bias[j].abs() as f64)
                            } else {
                                (0.0, 0.0)
                            };
                            for d in 0..k {
                                let t = round(x[i * k + d]) * round(w[d * n + j]);
                                want += t;
                                size += t.abs();
                            }
                            let err = (got[i * n + j] as f64 - want).abs();
                            assert!(
                                err <= 1e-6 * size.max(1e-30) * (k as f64).sqrt() + 1e-30,
                                "{m}x{k}x{n} {a_layout:?}/{b_layout:?} bias {with_bias}: ({i}, {j}) = {} against {want}",
                                got[i * n + j]
                            );
                        }
                    }
                }
            }
        }
    }
}
