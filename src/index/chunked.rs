//! The in-memory image of a persistent index (`clip_index`): its vectors in fixed-capacity
//! chunks, as the shadow tables store them, and the exact top-k over them.
//!
//! A chunk holds `capacity` slots: a validity bitmap (bit `s % 8` of byte `s / 8` is set when
//! slot `s` holds a row), the rowid of each slot and the slot's vector, all slots contiguous
//! (row-major). Deleted slots stay in place until a later insert reuses them, so a chunk's
//! position of a row never moves and a write touches one chunk. Each chunk carries the
//! `version` its shadow row had when it was read: the SQL layer reloads exactly the chunks whose
//! stored version moved (see `sql/clip_index.rs`).
//!
//! The search is split across the rayon pool chunk by chunk; each worker keeps its own bounded
//! heap and the heaps are merged, as in [`crate::index::VectorSet::search`].
//!
//! Chunks are shared across the connections of a process: a set given a *scope* (the database
//! file and table) publishes the chunks it loads in a process-wide pool, keyed by scope, chunk
//! id and version, and takes a chunk from there instead of reading it again. A version is never
//! reused, so an (id, version) pair names one content; each connection still decides from its
//! own transaction's view which versions it needs. The pool holds weak references: a chunk
//! lives while some connection's set holds it. So a Datasette process with four connections
//! keeps one copy of the vectors, not four, and a connection opened while another holds the
//! image answers its first query without reading the chunks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use rayon::prelude::*;
use simsimd::{BinarySimilarity, SpatialSimilarity};

use crate::error::{Error, Result};
use crate::index::scan::{inv_norm, Scorer};
use crate::vector::distance::Metric;
use crate::vector::topk::{Hit, TopK};

/// Bytes of a validity bitmap for `capacity` slots.
pub fn bitmap_bytes(capacity: usize) -> usize {
    capacity.div_ceil(8)
}

/// Whether slot `slot` is set in a validity bitmap.
#[inline]
pub fn bit(bitmap: &[u8], slot: usize) -> bool {
    bitmap[slot / 8] & (1 << (slot % 8)) != 0
}

/// The first clear slot of a bitmap below `capacity`, if any.
pub fn first_free(bitmap: &[u8], capacity: usize) -> Option<usize> {
    bitmap.iter().enumerate().find_map(|(i, &byte)| {
        (byte != 0xFF)
            .then(|| i * 8 + byte.trailing_ones() as usize)
            .filter(|&s| s < capacity)
    })
}

/// One chunk as read from the shadow tables.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub id: i64,
    pub version: i64,
    pub capacity: usize,
    pub valid: Vec<u8>,
    pub rowids: Vec<i64>,
    pub vectors: Vec<f32>,
    /// 1/|row| of each slot (0 for empty slots and all-zero rows); filled by [`ChunkSet`].
    inv_norms: Vec<f32>,
    /// int8 and binary copies, made on the first quantized search that needs them.
    quantized: OnceLock<Quantized>,
    /// The int4 copy, made on the first int4 search.
    nibbles: OnceLock<Nibbles>,
}

/// A chunk's int4 copy: each row scaled by its own max |x| / 7, codes -7..=7 stored as
/// code + 8 in a nibble; a row of d elements takes ceil(d / 2) bytes, byte i holding element i
/// (low nibble) and element i + ceil(d / 2) (high nibble), so both halves line up with a
/// contiguous half of the query.
#[derive(Debug, Clone, Default)]
struct Nibbles {
    codes: Vec<u8>,
    scales: Vec<f32>,
}

/// A chunk's quantized copies. int8: each row scaled by its own max |x| / 127 (symmetric,
/// rounded), so int8 dot x scales approximates the float dot; binary: one sign bit per element
/// (set when > 0), compared by Hamming distance.
#[derive(Debug, Clone, Default)]
struct Quantized {
    int8: Vec<i8>,
    scales: Vec<f32>,
    bits: Vec<u8>,
}

/// The copy of a chunk a quantized search reads.
#[derive(Clone, Copy)]
enum Codes<'a> {
    Int8(&'a Quantized),
    Int4(&'a Nibbles),
    Bits(&'a Quantized),
}

/// How a search picks its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every row scored with float32.
    Exact,
    /// Candidates by int8 dot products, rescored with float32.
    Int8,
    /// Candidates by int4 dot products (half int8's bytes to read), rescored with float32.
    Int4,
    /// Candidates by Hamming distance of sign bits, rescored with float32.
    Binary,
    /// Candidates from the HNSW graph (`hnsw=on`), rescored with float32: served by the SQL
    /// layer, which holds the graph.
    Hnsw,
}

impl Mode {
    /// The names [`Mode::parse`] accepts, as error messages list them.
    pub const NAMES: &'static str = "'exact', 'int8', 'int4', 'binary' or 'hnsw'";

    pub fn parse(name: &str) -> Result<Mode> {
        match name.to_ascii_lowercase().as_str() {
            "exact" => Ok(Mode::Exact),
            "int8" => Ok(Mode::Int8),
            "int4" => Ok(Mode::Int4),
            "binary" => Ok(Mode::Binary),
            "hnsw" => Ok(Mode::Hnsw),
            _ => Err(Error::InvalidArgument {
                what: format!("unknown mode '{name}', expected {}", Mode::NAMES),
            }),
        }
    }

    /// Candidates per result when none is given: enough for recall@10 >= 0.99 on the
    /// benchmark's data, and for HNSW >= 0.95 on its clustered set (0.98 at 1M rows; 10 gave
    /// 0.93-0.945). BENCHMARKS.md has the curves.
    pub fn default_oversample(self) -> usize {
        match self {
            Mode::Exact => 1,
            Mode::Int8 => 4,
            Mode::Int4 => INT4_OVERSAMPLE,
            Mode::Binary => 32,
            Mode::Hnsw => 20,
        }
    }
}

/// `v.round().clamp(-lim, lim) as i32` (halves away from zero; NaN gives 0) without `round`,
/// which is a libm call on baseline x86-64 and kept the quantizing loops from vectorizing (the
/// first int4 query spent ~40% of its samples there). `v` is first clamped to ±(lim + 1), so
/// truncation is exact, and the result moves one away from zero when the dropped fraction is at
/// least one half.
#[inline]
fn round_clamped(v: f32, lim: f32) -> i32 {
    let c = v.clamp(-(lim + 1.0), lim + 1.0);
    let t = c as i32;
    let fraction = c - t as f32;
    let r = t + i32::from(fraction >= 0.5) - i32::from(fraction <= -0.5);
    r.clamp(-(lim as i32), lim as i32)
}

/// Symmetric per-row int8: (codes, scale) with x ~= code * scale.
pub fn quantize_int8(row: &[f32], out: &mut Vec<i8>) -> f32 {
    let max = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 0.0 };
    let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
    out.extend(row.iter().map(|x| round_clamped(x * inv, 127.0) as i8));
    scale
}

/// int4's default oversampling (BENCHMARKS.md has the curve).
const INT4_OVERSAMPLE: usize = 16;

/// Symmetric per-row int4 as nibbles (see [`Nibbles`]); returns the scale.
pub fn quantize_int4(row: &[f32], out: &mut Vec<u8>) -> f32 {
    let max = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let (scale, inv) = if max > 0.0 {
        (max / 7.0, 7.0 / max)
    } else {
        (0.0, 0.0)
    };
    let half = row.len().div_ceil(2);
    let (lo, hi) = row.split_at(half);
    let code = |x: f32| (round_clamped(x * inv, 7.0) + 8) as u8;
    let start = out.len();
    out.resize(start + half, 0);
    let bytes = &mut out[start..];
    for (b, (&l, &h)) in bytes.iter_mut().zip(lo.iter().zip(hi)) {
        *b = code(l) | code(h) << 4;
    }
    // An odd length: the last low nibble has no high one; the padding is a zero code (8).
    if hi.len() < lo.len() {
        bytes[half - 1] = code(lo[half - 1]) | 8 << 4;
    }
    scale
}

/// The int4 dot products `Σ q[i] * (code[i] - 8)` of the query with each row of `half` bytes of
/// nibbles in `codes`, into `out` (one entry per row). `q` is padded with zeros to `2 * half`,
/// and `offset` = [`int4_offset`]`(q)` (computed once per query). A chunk's rows go through in
/// one call: with a call per row, the loop around it took as many samples as the dot products
/// themselves (perf, stop 32).
pub fn dots_int4(q: &[i8], codes: &[u8], half: usize, offset: i32, out: &mut Vec<i32>) {
    assert_eq!(q.len(), 2 * half);
    assert!(half > 0 && codes.len().is_multiple_of(half));
    out.clear();
    out.resize(codes.len() / half, 0);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present; `q` has 2 * half bytes and `codes` out.len() rows of half
        // bytes (asserted and sized above).
        unsafe { dots_nibbles_avx2(q, codes, half, offset, out) };
        return;
    }
    for (o, row) in out.iter_mut().zip(codes.chunks_exact(half)) {
        *o = dot_nibbles(q, row) - offset;
    }
}

/// `8 * Σ q`: what the +8 of the stored codes adds to a dot product.
pub fn int4_offset(q: &[i8]) -> i32 {
    q.iter().map(|&v| i32::from(v)).sum::<i32>() * 8
}

/// `Σ q[i] * low(codes[i]) + q[i + half] * high(codes[i])`.
fn dot_nibbles(q: &[i8], codes: &[u8]) -> i32 {
    let (lo, hi) = q.split_at(codes.len());
    dot_halves(lo, hi, codes)
}

/// `Σ lo[i] * low(codes[i]) + hi[i] * high(codes[i])`.
fn dot_halves(lo: &[i8], hi: &[i8], codes: &[u8]) -> i32 {
    codes
        .iter()
        .zip(lo.iter().zip(hi))
        .map(|(&c, (&a, &b))| i32::from(a) * i32::from(c & 15) + i32::from(b) * i32::from(c >> 4))
        .sum()
}

/// [`dots_int4`] with AVX2, two rows at a time: each 32-byte block of the query is loaded
/// once for both rows, and the two accumulators are independent.
///
/// # Safety
/// The CPU must have AVX2; `q` must hold `2 * half` bytes and `codes` `out.len() * half`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_nibbles_avx2(q: &[i8], codes: &[u8], half: usize, offset: i32, out: &mut [i32]) {
    use std::arch::x86_64::*;
    let (lo_q, hi_q) = q.split_at(half);
    let mask = _mm256_set1_epi8(15);
    let ones = _mm256_set1_epi16(1);
    let done = half / 32 * 32;
    // u8 x i8 -> pairs summed into i16: at most 2 * 15 * 128 per lane, twice: no overflow.
    let block = |acc: __m256i, p: *const u8, ql: __m256i, qh: __m256i| {
        let c = _mm256_loadu_si256(p.cast());
        let lo = _mm256_and_si256(c, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), mask);
        let a = _mm256_maddubs_epi16(lo, ql);
        let b = _mm256_maddubs_epi16(hi, qh);
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(a, b), ones))
    };
    let sum = |acc: __m256i| {
        let s = _mm_add_epi32(
            _mm256_castsi256_si128(acc),
            _mm256_extracti128_si256(acc, 1),
        );
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
    };
    let tail = |row: &[u8]| dot_halves(&lo_q[done..], &hi_q[done..], &row[done..]);
    let rows = out.len();
    let base = codes.as_ptr();
    let mut r = 0;
    while r + 2 <= rows {
        let (p0, p1) = (base.add(r * half), base.add((r + 1) * half));
        let mut a0 = _mm256_setzero_si256();
        let mut a1 = _mm256_setzero_si256();
        for i in (0..done).step_by(32) {
            let ql = _mm256_loadu_si256(lo_q.as_ptr().add(i).cast());
            let qh = _mm256_loadu_si256(hi_q.as_ptr().add(i).cast());
            a0 = block(a0, p0.add(i), ql, qh);
            a1 = block(a1, p1.add(i), ql, qh);
        }
        out[r] = sum(a0) + tail(&codes[r * half..(r + 1) * half]) - offset;
        out[r + 1] = sum(a1) + tail(&codes[(r + 1) * half..(r + 2) * half]) - offset;
        r += 2;
    }
    if r < rows {
        let p0 = base.add(r * half);
        let mut a0 = _mm256_setzero_si256();
        for i in (0..done).step_by(32) {
            let ql = _mm256_loadu_si256(lo_q.as_ptr().add(i).cast());
            let qh = _mm256_loadu_si256(hi_q.as_ptr().add(i).cast());
            a0 = block(a0, p0.add(i), ql, qh);
        }
        out[r] = sum(a0) + tail(&codes[r * half..(r + 1) * half]) - offset;
    }
}

/// Sign bits, bit `i % 8` of byte `i / 8` set when element i > 0.
pub fn quantize_bits(row: &[f32], out: &mut Vec<u8>) {
    for group in row.chunks(8) {
        let mut byte = 0u8;
        for (i, x) in group.iter().enumerate() {
            if *x > 0.0 {
                byte |= 1 << i;
            }
        }
        out.push(byte);
    }
}

impl Chunk {
    /// A chunk from its stored parts; checks that the parts agree on `capacity` and `dims`.
    pub fn new(
        id: i64,
        version: i64,
        capacity: usize,
        dims: usize,
        valid: Vec<u8>,
        rowids: Vec<i64>,
        vectors: Vec<f32>,
    ) -> Result<Chunk> {
        if valid.len() != bitmap_bytes(capacity)
            || rowids.len() != capacity
            || vectors.len() != capacity * dims
        {
            return Err(Error::InvalidArgument {
                what: format!(
                    "chunk {id} is malformed: {} validity bytes, {} rowids, {} floats for \
                     {capacity} slots of {dims} dimensions",
                    valid.len(),
                    rowids.len(),
                    vectors.len()
                ),
            });
        }
        Ok(Chunk {
            id,
            version,
            capacity,
            valid,
            rowids,
            vectors,
            inv_norms: Vec::new(),
            quantized: OnceLock::new(),
            nibbles: OnceLock::new(),
        })
    }

    fn nibbles(&self, dims: usize) -> &Nibbles {
        self.nibbles.get_or_init(|| {
            let mut n = Nibbles {
                codes: Vec::with_capacity(self.capacity * dims.div_ceil(2)),
                scales: Vec::with_capacity(self.capacity),
            };
            for slot in 0..self.capacity {
                n.scales
                    .push(quantize_int4(self.row(slot, dims), &mut n.codes));
            }
            n
        })
    }

    fn quantized(&self, dims: usize) -> &Quantized {
        self.quantized.get_or_init(|| {
            let mut q = Quantized {
                int8: Vec::with_capacity(self.capacity * dims),
                scales: Vec::with_capacity(self.capacity),
                bits: Vec::with_capacity(self.capacity * dims.div_ceil(8)),
            };
            for slot in 0..self.capacity {
                let row = self.row(slot, dims);
                q.scales.push(quantize_int8(row, &mut q.int8));
                quantize_bits(row, &mut q.bits);
            }
            q
        })
    }

    /// Rows held.
    pub fn live(&self) -> usize {
        self.valid.iter().map(|b| b.count_ones() as usize).sum()
    }

    #[inline]
    pub fn is_valid(&self, slot: usize) -> bool {
        bit(&self.valid, slot)
    }

    /// Slot `slot`'s vector.
    #[inline]
    pub fn row(&self, slot: usize, dims: usize) -> &[f32] {
        &self.vectors[slot * dims..(slot + 1) * dims]
    }

    /// Computes the inverse norms and refuses non-finite rows (named by rowid).
    fn finish(&mut self, dims: usize) -> Result<()> {
        let mut norms = vec![0.0f32; self.capacity];
        for (slot, norm) in norms.iter_mut().enumerate() {
            if !self.is_valid(slot) {
                continue;
            }
            let row = self.row(slot, dims);
            if let Some(index) = row.iter().position(|x| !x.is_finite()) {
                return Err(Error::InRow {
                    id: self.rowids[slot],
                    error: Box::new(Error::NonFinite { index }),
                });
            }
            *norm = inv_norm(row) as f32;
        }
        self.inv_norms = norms;
        Ok(())
    }
}

/// Allowed slots per chunk id (a bitmap like the validity one): the rows a filter kept.
pub type SlotFilter = HashMap<i64, Vec<u8>>;

/// Every chunk of an index, ordered by id.
#[derive(Debug, Default)]
pub struct ChunkSet {
    dims: usize,
    chunks: Vec<Arc<Chunk>>,
    /// Where its chunks come from, for sharing them (see the module documentation).
    scope: Option<Arc<str>>,
}

/// A pool key: scope (database file and table), chunk id, chunk version.
pub type PoolKey = (Arc<str>, i64, i64);

/// A process-wide pool of weak references to loaded chunk copies, keyed by [`PoolKey`]: a copy
/// lives while some connection holds it, and any connection of the process can take it.
pub struct WeakPool<T> {
    /// The entries, and how many there were after the last pruning.
    map: Mutex<(HashMap<PoolKey, Weak<T>>, usize)>,
}

impl<T> WeakPool<T> {
    pub fn new() -> WeakPool<T> {
        WeakPool {
            map: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// The live copy published under `key`, if any.
    pub fn get(&self, key: &PoolKey) -> Option<Arc<T>> {
        let pool = self.map.lock().unwrap_or_else(|p| p.into_inner());
        pool.0.get(key).and_then(Weak::upgrade)
    }

    /// Publishes copies; forgets dead entries once the map has doubled since the last time.
    pub fn publish<'a>(&self, entries: impl Iterator<Item = (PoolKey, &'a Arc<T>)>)
    where
        T: 'a,
    {
        let mut pool = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (map, pruned_at) = &mut *pool;
        for (key, c) in entries {
            map.insert(key, Arc::downgrade(c));
        }
        if map.len() > 64 && map.len() > 2 * *pruned_at {
            map.retain(|_, w| w.strong_count() > 0);
            *pruned_at = map.len();
        }
    }
}

impl<T> Default for WeakPool<T> {
    fn default() -> Self {
        WeakPool::new()
    }
}

fn pool() -> &'static WeakPool<Chunk> {
    static POOL: OnceLock<WeakPool<Chunk>> = OnceLock::new();
    POOL.get_or_init(WeakPool::new)
}

impl ChunkSet {
    pub fn new(dims: usize) -> ChunkSet {
        ChunkSet {
            dims,
            chunks: Vec::new(),
            scope: None,
        }
    }

    /// A set that shares its chunks with every other set of the same `scope` in this process.
    /// The scope must name one table of one database file (never an in-memory database).
    pub fn shared(dims: usize, scope: &str) -> ChunkSet {
        ChunkSet {
            dims,
            chunks: Vec::new(),
            scope: Some(Arc::from(scope)),
        }
    }

    /// An empty set with the same dimensions and scope.
    pub fn emptied(&self) -> ChunkSet {
        ChunkSet {
            dims: self.dims,
            chunks: Vec::new(),
            scope: self.scope.clone(),
        }
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    /// The chunks, ordered by id.
    pub fn chunks(&self) -> &[Arc<Chunk>] {
        &self.chunks
    }

    /// Bytes held by the copies.
    pub fn heap_bytes(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| c.vectors.capacity() * 4 + c.rowids.capacity() * 8 + c.inv_norms.len() * 4)
            .sum()
    }

    /// Brings the set up to date with the stored `(id, version)` list (ordered by id): chunks
    /// whose version is unchanged are kept, others are loaded with `load(id, version)` (called
    /// serially, on this thread: it reads the database), then checked and normalized in
    /// parallel. Returns how many chunks were loaded.
    pub fn refresh(
        &mut self,
        stored: &[(i64, i64)],
        mut load: impl FnMut(i64, i64) -> Result<Chunk>,
    ) -> Result<usize> {
        let mut old: HashMap<i64, Arc<Chunk>> = self.chunks.drain(..).map(|c| (c.id, c)).collect();
        let mut next: Vec<Option<Arc<Chunk>>> = Vec::with_capacity(stored.len());
        let mut fresh: Vec<(usize, Chunk)> = Vec::new();
        for (i, &(id, version)) in stored.iter().enumerate() {
            match old.remove(&id) {
                Some(c) if c.version == version => next.push(Some(c)),
                stale => {
                    // Free the stale copy before reading its replacement.
                    drop(stale);
                    if let Some(c) = self.pooled(id, version) {
                        next.push(Some(c));
                        continue;
                    }
                    fresh.push((i, load(id, version)?));
                    next.push(None);
                }
            }
        }
        drop(old);
        let loaded = fresh.len();
        let dims = self.dims;
        fresh.par_iter_mut().try_for_each(|(_, c)| c.finish(dims))?;
        let fresh: Vec<(usize, Arc<Chunk>)> =
            fresh.into_iter().map(|(i, c)| (i, Arc::new(c))).collect();
        self.publish(fresh.iter().map(|(_, c)| c));
        for (i, c) in fresh {
            next[i] = Some(c);
        }
        self.chunks = next.into_iter().map(|c| c.expect("filled")).collect();
        Ok(loaded)
    }

    fn pooled(&self, id: i64, version: i64) -> Option<Arc<Chunk>> {
        let scope = self.scope.as_ref()?;
        pool()
            .get(&(scope.clone(), id, version))
            .filter(|c| c.vectors.len() == c.capacity * self.dims)
    }

    fn publish<'a>(&self, chunks: impl Iterator<Item = &'a Arc<Chunk>>) {
        let Some(scope) = &self.scope else { return };
        pool().publish(chunks.map(|c| ((scope.clone(), c.id, c.version), c)));
    }

    /// The k nearest rows to `query`, nearest first (ties: smaller rowid), among the slots
    /// `filter` allows (all rows when `None`). Returns (rowid, score, distance).
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        metric: Metric,
        filter: Option<&SlotFilter>,
    ) -> Result<Vec<(i64, f64, f64)>> {
        self.search_with(query, k, metric, filter, Mode::Exact, 1)
    }

    /// [`ChunkSet::search`] in a [`Mode`]: for int8 and binary, the `k * oversample` best rows
    /// by the quantized distance are rescored with float32 and the k best of those returned.
    pub fn search_with(
        &self,
        query: &[f32],
        k: usize,
        metric: Metric,
        filter: Option<&SlotFilter>,
        mode: Mode,
        oversample: usize,
    ) -> Result<Vec<(i64, f64, f64)>> {
        let scorer = Scorer::new(query, metric)?;
        if self.chunks.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        if query.len() != self.dims {
            return Err(Error::QueryDimensionMismatch {
                query: query.len(),
                rows: self.dims,
            });
        }
        let dims = self.dims;
        if mode == Mode::Hnsw {
            return Err(Error::InvalidArgument {
                what: "mode 'hnsw' is answered by the graph, not the chunks".into(),
            });
        }
        if mode != Mode::Exact {
            return Ok(self.search_quantized(&scorer, query, k, metric, filter, mode, oversample));
        }
        let scan = |mut top: TopK, chunk: &Arc<Chunk>| -> TopK {
            let allowed = match filter {
                None => None,
                Some(f) => match f.get(&chunk.id) {
                    None => return top,
                    Some(bits) => Some(bits),
                },
            };
            for (byte_index, &byte) in chunk.valid.iter().enumerate() {
                let mut bits = byte & allowed.map_or(0xFF, |a| a[byte_index]);
                while bits != 0 {
                    let slot = byte_index * 8 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let inv = f64::from(chunk.inv_norms[slot]);
                    if let Some(distance) = scorer.distance(chunk.row(slot, dims), inv) {
                        if distance <= top.threshold() {
                            top.push(Hit {
                                distance,
                                id: chunk.rowids[slot],
                            });
                        }
                    }
                }
            }
            top
        };
        let top = self
            .chunks
            .par_iter()
            .with_min_len(4)
            .fold(|| TopK::new(k), scan)
            .reduce(
                || TopK::new(k),
                |mut a, b| {
                    a.merge(b);
                    a
                },
            );
        Ok(scorer.results(top))
    }
}

impl ChunkSet {
    #[allow(clippy::too_many_arguments)]
    fn search_quantized(
        &self,
        scorer: &Scorer<'_>,
        query: &[f32],
        k: usize,
        metric: Metric,
        filter: Option<&SlotFilter>,
        mode: Mode,
        oversample: usize,
    ) -> Vec<(i64, f64, f64)> {
        let dims = self.dims;
        let candidates = k.saturating_mul(oversample.max(1)).min(1 << 22);
        let mut q8 = Vec::with_capacity(dims);
        let q_scale = f64::from(quantize_int8(query, &mut q8));
        // int4 rows hold element i and i + half in one byte: the query padded to 2 * half.
        let half = dims.div_ceil(2);
        let mut q4 = q8.clone();
        q4.resize(2 * half, 0);
        let q4_offset = int4_offset(&q4);
        let mut q_bits = Vec::with_capacity(dims.div_ceil(8));
        quantize_bits(query, &mut q_bits);
        let q_sq = query.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>();
        let inv_q = if q_sq > 0.0 { 1.0 / q_sq.sqrt() } else { 0.0 };
        let bytes = dims.div_ceil(8);
        // The distance from an approximate dot product with a row whose inverse norm is `inv`
        // (None: a zero row, which has no cosine).
        let from_dot = |approx: f64, inv: f64| -> Option<f64> {
            match metric {
                Metric::Cosine => (inv != 0.0).then_some(1.0 - approx * inv * inv_q),
                Metric::Dot => Some(-approx),
                Metric::L2 => {
                    let sq = if inv > 0.0 { 1.0 / (inv * inv) } else { 0.0 };
                    Some(sq + q_sq - 2.0 * approx)
                }
            }
        };
        // Candidate ids: (chunk position << 24) | slot, so the rescoring finds the row again.
        // A worker's heap, and the int4 dot products of its current chunk.
        type State = (TopK, Vec<i32>);
        let scan = |(mut top, mut int4_dots): State, (position, chunk): (usize, &Arc<Chunk>)| {
            let allowed = match filter {
                None => None,
                Some(f) => match f.get(&chunk.id) {
                    None => return (top, int4_dots),
                    Some(bits) => Some(bits),
                },
            };
            let codes = match mode {
                Mode::Int4 => {
                    let nibbles = chunk.nibbles(dims);
                    dots_int4(&q4, &nibbles.codes, half, q4_offset, &mut int4_dots);
                    Codes::Int4(nibbles)
                }
                Mode::Binary => Codes::Bits(chunk.quantized(dims)),
                _ => Codes::Int8(chunk.quantized(dims)),
            };
            for (byte_index, &byte) in chunk.valid.iter().enumerate() {
                let mut bits = byte & allowed.map_or(0xFF, |a| a[byte_index]);
                while bits != 0 {
                    let slot = byte_index * 8 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let inv = f64::from(chunk.inv_norms[slot]);
                    let distance = match codes {
                        Codes::Bits(qz) => Some(
                            u8::hamming(&q_bits, &qz.bits[slot * bytes..(slot + 1) * bytes])
                                .unwrap_or(f64::INFINITY),
                        ),
                        Codes::Int8(qz) => from_dot(
                            i8::dot(&q8, &qz.int8[slot * dims..(slot + 1) * dims]).unwrap_or(0.0)
                                * f64::from(qz.scales[slot])
                                * q_scale,
                            inv,
                        ),
                        Codes::Int4(nz) => from_dot(
                            f64::from(int4_dots[slot]) * f64::from(nz.scales[slot]) * q_scale,
                            inv,
                        ),
                    };
                    let Some(distance) = distance else {
                        continue;
                    };
                    if distance <= top.threshold() {
                        top.push(Hit {
                            distance,
                            id: ((position as i64) << 24) | slot as i64,
                        });
                    }
                }
            }
            (top, int4_dots)
        };
        let picked = self
            .chunks
            .par_iter()
            .enumerate()
            .with_min_len(4)
            .fold(|| (TopK::new(candidates), Vec::new()), scan)
            .map(|(top, _)| top)
            .reduce(
                || TopK::new(candidates),
                |mut a, b| {
                    a.merge(b);
                    a
                },
            );
        let mut top = TopK::new(k);
        for hit in picked.into_sorted() {
            let (position, slot) = ((hit.id >> 24) as usize, (hit.id & 0xFF_FFFF) as usize);
            let chunk = &self.chunks[position];
            let inv = f64::from(chunk.inv_norms[slot]);
            if let Some(distance) = scorer.distance(chunk.row(slot, dims), inv) {
                top.push(Hit {
                    distance,
                    id: chunk.rowids[slot],
                });
            }
        }
        scorer.results(top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(id: i64, capacity: usize, dims: usize, rows: &[(usize, i64, Vec<f32>)]) -> Chunk {
        let mut valid = vec![0u8; bitmap_bytes(capacity)];
        let mut rowids = vec![0i64; capacity];
        let mut vectors = vec![0f32; capacity * dims];
        for (slot, rowid, v) in rows {
            valid[slot / 8] |= 1 << (slot % 8);
            rowids[*slot] = *rowid;
            vectors[slot * dims..(slot + 1) * dims].copy_from_slice(v);
        }
        Chunk::new(id, 1, capacity, dims, valid, rowids, vectors).unwrap()
    }

    #[test]
    fn first_free_skips_full_bytes_and_respects_capacity() {
        assert_eq!(first_free(&[0xFF, 0b0000_0111], 16), Some(11));
        assert_eq!(first_free(&[0xFF, 0b0000_0111], 10), None);
        assert_eq!(first_free(&[0x00], 3), Some(0));
    }

    #[test]
    fn search_skips_empty_and_filtered_slots() {
        let mut set = ChunkSet::new(2);
        let a = chunk(
            1,
            10,
            2,
            &[
                (0, 5, vec![1.0, 0.0]),
                (3, 6, vec![0.0, 1.0]),
                (9, 7, vec![1.0, 1.0]),
            ],
        );
        let b = chunk(2, 10, 2, &[(1, 8, vec![1.0, 0.1])]);
        let mut stored = vec![(1, 1), (2, 1)];
        let mut parts = vec![a, b].into_iter();
        assert_eq!(
            set.refresh(&stored, |_, _| Ok(parts.next().unwrap()))
                .unwrap(),
            2
        );
        let ids = |r: Vec<(i64, f64, f64)>| r.into_iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(
            ids(set.search(&[1.0, 0.0], 10, Metric::Cosine, None).unwrap()),
            vec![5, 8, 7, 6]
        );
        let mut filter = SlotFilter::new();
        filter.insert(1, vec![0b0000_1000, 0b10]);
        assert_eq!(
            ids(set
                .search(&[1.0, 0.0], 10, Metric::Cosine, Some(&filter))
                .unwrap()),
            vec![7, 6]
        );
        // Unchanged versions are kept; a moved one is reloaded; a vanished one is dropped.
        stored = vec![(2, 2)];
        let reloaded = chunk(2, 10, 2, &[(1, 9, vec![0.0, 1.0])]);
        let mut once = Some(reloaded);
        assert_eq!(
            set.refresh(&stored, |_, _| Ok(once.take().unwrap()))
                .unwrap(),
            1
        );
        assert_eq!(
            ids(set.search(&[1.0, 0.0], 10, Metric::L2, None).unwrap()),
            vec![9]
        );
    }

    #[test]
    fn sets_of_one_scope_share_their_chunks_and_others_do_not() {
        let versioned = |id: i64, version: i64, rowid: i64, v: Vec<f32>| {
            let mut c = chunk(id, 8, 2, &[(0, rowid, v)]);
            c.version = version;
            c
        };
        let scope = format!("/test/{}\0t", std::process::id());
        let mut a = ChunkSet::shared(2, &scope);
        let loaded = a
            .refresh(&[(1, 41), (2, 42)], |id, version| {
                Ok(versioned(id, version, id * 10, vec![1.0, 0.0]))
            })
            .unwrap();
        assert_eq!(loaded, 2);
        // Same scope, same versions: nothing is read, the very same chunks are used.
        let mut b = ChunkSet::shared(2, &scope);
        let loaded = b
            .refresh(&[(1, 41), (2, 42)], |_, _| {
                panic!("must come from the pool")
            })
            .unwrap();
        assert_eq!(loaded, 0);
        assert!(Arc::ptr_eq(&a.chunks()[0], &b.chunks()[0]));
        // A new version is read; another scope or an unscoped set shares nothing.
        let loaded = b
            .refresh(&[(1, 41), (2, 43)], |id, version| {
                Ok(versioned(id, version, 99, vec![0.0, 1.0]))
            })
            .unwrap();
        assert_eq!(loaded, 1);
        for mut other in [ChunkSet::shared(2, "/elsewhere\0t"), ChunkSet::new(2)] {
            let loaded = other
                .refresh(&[(1, 41)], |id, version| {
                    Ok(versioned(id, version, 7, vec![1.0, 0.0]))
                })
                .unwrap();
            assert_eq!(loaded, 1);
        }
        // A chunk lives while a set holds it: once both drop it, it is read again.
        drop((a, b));
        let mut c = ChunkSet::shared(2, &scope);
        assert_eq!(
            c.refresh(&[(1, 41)], |id, version| Ok(versioned(
                id,
                version,
                1,
                vec![1.0, 0.0]
            )))
            .unwrap(),
            1
        );
    }

    #[test]
    fn quantized_search_rescores_exactly_and_finds_what_exact_finds() {
        let dims = 32;
        let mut state = 17u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut parts = Vec::new();
        let mut stored = Vec::new();
        for c in 0..20 {
            let rows: Vec<(usize, i64, Vec<f32>)> = (0..64)
                .map(|s| (s, c * 64 + s as i64, (0..dims).map(|_| next()).collect()))
                .collect();
            parts.push(chunk(c + 1, 64, dims, &rows));
            stored.push((c + 1, 1));
        }
        let mut set = ChunkSet::new(dims);
        let mut parts = parts.into_iter();
        set.refresh(&stored, |_, _| Ok(parts.next().unwrap()))
            .unwrap();
        for metric in [Metric::Cosine, Metric::Dot, Metric::L2] {
            for _ in 0..5 {
                let q: Vec<f32> = (0..dims).map(|_| next()).collect();
                let exact = set.search(&q, 10, metric, None).unwrap();
                // Oversampling to every row makes the candidates the whole set: exact again.
                for mode in [Mode::Int8, Mode::Int4, Mode::Binary] {
                    let all = set.search_with(&q, 10, metric, None, mode, 2000).unwrap();
                    assert_eq!(all, exact, "{mode:?} {metric:?}");
                }
                // Scores are always the exact ones.
                let few = set
                    .search_with(&q, 10, metric, None, Mode::Int8, 4)
                    .unwrap();
                for (id, score, _) in &few {
                    if let Some(e) = exact.iter().find(|e| e.0 == *id) {
                        assert_eq!(e.1, *score);
                    }
                }
                let hits = few
                    .iter()
                    .filter(|r| exact.iter().any(|e| e.0 == r.0))
                    .count();
                assert!(hits >= 8, "int8 x4 found {hits} of 10");
                let few = set
                    .search_with(&q, 10, metric, None, Mode::Int4, INT4_OVERSAMPLE)
                    .unwrap();
                let hits = few
                    .iter()
                    .filter(|r| exact.iter().any(|e| e.0 == r.0))
                    .count();
                assert!(hits >= 8, "int4 x{INT4_OVERSAMPLE} found {hits} of 10");
            }
        }
    }

    /// `round_clamped` is `round().clamp() as i32` on every value near a half (a few ulps
    /// either side), on a sweep of the bit patterns up to past the limits, and on the special
    /// values.
    #[test]
    fn round_clamped_matches_round_then_clamp() {
        let want = |v: f32, lim: f32| v.round().clamp(-lim, lim) as i32;
        let mut values = vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-45,
            1e30,
        ];
        for k in 0..=300 {
            let half = k as f32 + 0.5;
            for step in -4i32..=4 {
                values.push(f32::from_bits((half.to_bits() as i32 + step) as u32));
            }
        }
        let mut bits = 0u32;
        while bits < 1_130_000_000 {
            values.push(f32::from_bits(bits));
            bits += 997;
        }
        for lim in [7.0f32, 127.0] {
            for &v in &values {
                for v in [v, -v] {
                    assert_eq!(round_clamped(v, lim), want(v, lim), "{v:e} at {lim}");
                }
            }
        }
    }

    /// int4 codes and their dot product against plain arithmetic, for even and odd lengths,
    /// lengths around the 32-byte vector step, and the extremes of both operands.
    /// Element `i` of one row of nibbles, as a code (-8..=7).
    fn nibble(row: &[u8], i: usize) -> i32 {
        let half = row.len();
        let b = row[i % half];
        i32::from(if i < half { b & 15 } else { b >> 4 }) - 8
    }

    #[test]
    fn int4_codes_and_dot_products_match_plain_arithmetic() {
        let mut next = crate::index::scan::tests::uniform(7);
        // Row counts odd and even (the kernel takes rows in pairs); lengths around its 32-byte
        // blocks.
        for (dims, rows) in [(1usize, 1usize), (2, 2), (3, 3), (63, 5), (64, 4), (65, 3)]
            .into_iter()
            .chain([(127, 2), (128, 7), (512, 9), (515, 4)])
        {
            let mut codes = Vec::new();
            let half = dims.div_ceil(2);
            for r in 0..rows {
                let row: Vec<f32> = (0..dims).map(|_| next()).collect();
                let scale = quantize_int4(&row, &mut codes);
                assert_eq!(codes.len(), (r + 1) * half);
                let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (i, &x) in row.iter().enumerate() {
                    let c = nibble(&codes[r * half..(r + 1) * half], i);
                    assert!((-7..=7).contains(&c));
                    assert!((c as f32 * scale - x).abs() <= max / 14.0 + 1e-6);
                }
                if dims % 2 == 1 {
                    let pad = nibble(&codes[r * half..(r + 1) * half], dims);
                    assert_eq!(pad, 0, "the padding nibble is a zero code");
                }
            }
            for q_fill in [None, Some(127i8), Some(-128i8)] {
                let mut q: Vec<i8> = (0..dims)
                    .map(|_| q_fill.unwrap_or((next() * 127.0) as i8))
                    .collect();
                let want: Vec<i32> = (0..rows)
                    .map(|r| {
                        let row = &codes[r * half..(r + 1) * half];
                        (0..dims).map(|i| i32::from(q[i]) * nibble(row, i)).sum()
                    })
                    .collect();
                q.resize(2 * half, 0);
                let offset = int4_offset(&q);
                let mut got = vec![-1; 3];
                dots_int4(&q, &codes, half, offset, &mut got);
                assert_eq!(got, want, "dims {dims}, {rows} rows");
                for (r, w) in want.iter().enumerate() {
                    let row = &codes[r * half..(r + 1) * half];
                    assert_eq!(dot_nibbles(&q, row) - offset, *w);
                }
            }
        }
        let mut zeros = Vec::new();
        assert_eq!(quantize_int4(&[0.0; 4], &mut zeros), 0.0);
        assert_eq!(zeros, vec![0x88, 0x88]);
    }

    #[test]
    fn a_non_finite_stored_row_is_named_by_its_rowid() {
        let mut set = ChunkSet::new(2);
        let bad = chunk(1, 8, 2, &[(2, 42, vec![f32::NAN, 0.0])]);
        let mut once = Some(bad);
        let err = set
            .refresh(&[(1, 1)], |_, _| Ok(once.take().unwrap()))
            .unwrap_err();
        assert_eq!(
            err,
            Error::InRow {
                id: 42,
                error: Box::new(Error::NonFinite { index: 0 })
            }
        );
    }
}
