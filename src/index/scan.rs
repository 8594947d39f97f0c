//! Exact top-k over a contiguous matrix of float32 rows.
//!
//! The rows live in fixed-size chunks of about 32 MiB (row-major, never reallocated while
//! loading, backed by transparent huge pages where the kernel allows), their ids in a parallel
//! `Vec<i64>`, and for cosine each row's inverse norm, so a query costs one SIMD dot product per
//! row. The scan is split across
//! the rayon pool (both cores here); each worker keeps its own bounded heap (the selection is fused
//! into the scan: no per-row allocation, no full sort), and the heaps are merged at the end.

use std::sync::mpsc;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::vector::distance::{dot_f32, l2sq_f32, norm_f32, Metric};
use crate::vector::topk::{Hit, TopK};

/// Rows per parallel task: large enough that scheduling costs nothing next to the dot products.
const ROWS_PER_TASK: usize = 8192;

/// Target bytes per chunk of rows.
const CHUNK_BYTES: usize = 32 << 20;

/// The vectors of one SELECT, in contiguous chunks.
#[derive(Debug, Default)]
pub struct VectorSet {
    dims: usize,
    /// Rows per chunk (every chunk but the last is full).
    chunk_rows: usize,
    chunks: Vec<Vec<f32>>,
    ids: Vec<i64>,
    /// 1/|row|, or 0 for an all-zero row (which has no direction and never matches under cosine).
    inv_norms: Vec<f32>,
}

/// Accumulates rows, checking each as it comes.
///
/// Fresh memory is the hidden cost of a copy: the kernel faults in and zeroes every page on
/// first touch (~0.5 ms per MiB on the VMs measured here, as much as reading the rows from
/// SQLite). So while rows are copied into one chunk, the next chunk is allocated and touched on
/// another core, and the copy itself writes to memory that is already mapped.
#[derive(Debug, Default)]
pub struct VectorSetBuilder {
    set: VectorSet,
    next_chunk: Option<mpsc::Receiver<Vec<f32>>>,
}

impl VectorSetBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a row given as a little-endian float32 blob (the storage format).
    pub fn push_blob(&mut self, id: i64, blob: &[u8]) -> Result<()> {
        if blob.is_empty() {
            return Err(Error::EmptyVector);
        }
        if !blob.len().is_multiple_of(4) {
            return Err(Error::BlobLength { len: blob.len() });
        }
        let dims = blob.len() / 4;
        self.check_dims(dims)?;
        let chunk = self.chunk_for_row();
        let start = chunk.len();
        chunk.extend(
            blob.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        self.finish_row(id, start)
    }

    /// Appends a row given as floats (e.g. parsed from JSON).
    pub fn push_f32(&mut self, id: i64, v: &[f32]) -> Result<()> {
        if v.is_empty() {
            return Err(Error::EmptyVector);
        }
        self.check_dims(v.len())?;
        let chunk = self.chunk_for_row();
        let start = chunk.len();
        chunk.extend_from_slice(v);
        self.finish_row(id, start)
    }

    fn check_dims(&mut self, dims: usize) -> Result<()> {
        if self.set.ids.is_empty() {
            self.set.dims = dims;
            self.set.chunk_rows = (CHUNK_BYTES / (dims * 4)).max(1);
        } else if dims != self.set.dims {
            return Err(Error::DimensionMismatch {
                left: self.set.dims,
                right: dims,
            });
        }
        Ok(())
    }

    /// The chunk the next row goes into, starting a new one when the last is full.
    fn chunk_for_row(&mut self) -> &mut Vec<f32> {
        let floats = self.set.chunk_rows * self.set.dims;
        if self.set.chunks.last().is_none_or(|c| c.len() == floats) {
            let first = self.set.chunks.is_empty();
            let chunk = self
                .next_chunk
                .take()
                .and_then(|rx| rx.recv().ok())
                .unwrap_or_else(|| huge_page_vec(floats, false));
            self.set.chunks.push(chunk);
            // A small table fits in its first chunk: prefetch only once a second one is needed.
            if !first {
                let (tx, rx) = mpsc::sync_channel(1);
                rayon::spawn(move || {
                    let _ = tx.send(huge_page_vec(floats, true));
                });
                self.next_chunk = Some(rx);
            }
        }
        self.set.chunks.last_mut().expect("a chunk was just pushed")
    }

    fn finish_row(&mut self, id: i64, _start: usize) -> Result<()> {
        self.set.ids.push(id);
        Ok(())
    }

    /// Checks every row for NaN/inf and computes the norms, in parallel over the chunks (off the
    /// serial path that reads rows from SQLite).
    pub fn finish(mut self) -> Result<VectorSet> {
        if let Some(last) = self.set.chunks.last_mut() {
            last.shrink_to_fit();
        }
        self.set.ids.shrink_to_fit();
        let dims = self.set.dims;
        let per_chunk: Vec<Result<Vec<f32>, (usize, usize)>> = self
            .set
            .chunks
            .par_iter()
            .enumerate()
            .map(|(c, chunk)| {
                let mut norms = Vec::with_capacity(chunk.len() / dims.max(1));
                for (r, row) in chunk.chunks_exact(dims).enumerate() {
                    if let Some(index) = row.iter().position(|x| !x.is_finite()) {
                        return Err((c * self.set.chunk_rows + r, index));
                    }
                    norms.push(inv_norm(row) as f32);
                }
                Ok(norms)
            })
            .collect();
        let mut inv_norms = Vec::with_capacity(self.set.ids.len());
        for norms in per_chunk {
            match norms {
                Ok(n) => inv_norms.extend(n),
                Err((row, index)) => {
                    return Err(Error::InRow {
                        id: self.set.ids[row],
                        error: Box::new(Error::NonFinite { index }),
                    })
                }
            }
        }
        self.set.inv_norms = inv_norms;
        Ok(self.set)
    }
}

/// An empty vector with room for `floats` elements whose pages the kernel may back with 2 MiB
/// huge pages (a copy of 1M x 512 floats then takes ~1,000 page faults instead of ~500,000);
/// with `touch`, every page is faulted in before it is returned.
fn huge_page_vec(floats: usize, touch: bool) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(floats);
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (v.as_ptr() as usize).next_multiple_of(PAGE);
        let end = v.as_ptr() as usize + floats * 4;
        if end > start + PAGE {
            // SAFETY: the range lies inside the allocation; MADV_HUGEPAGE is only advice and
            // changes no contents. A failure (e.g. THP disabled) is harmless and ignored.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    if touch {
        for page in v.spare_capacity_mut().chunks_mut(1024) {
            page[0].write(0.0);
        }
    }
    v
}

impl VectorSet {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Dimensions of the rows (0 when there are none).
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Bytes held: the raw vectors plus ids and norms (12 bytes a row).
    pub fn heap_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.capacity() * 4).sum::<usize>()
            + self.ids.capacity() * 8
            + self.inv_norms.capacity() * 4
    }

    /// Row `i`'s vector.
    #[inline]
    fn row(&self, i: usize) -> &[f32] {
        let (c, r) = (i / self.chunk_rows, i % self.chunk_rows);
        &self.chunks[c][r * self.dims..(r + 1) * self.dims]
    }

    /// The k nearest rows to `query`, nearest first; ties go to the smaller id.
    /// Returns (id, score, distance) where score/distance follow [`Metric`].
    pub fn search(&self, query: &[f32], k: usize, metric: Metric) -> Result<Vec<(i64, f64, f64)>> {
        if self.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let scorer = Scorer::new(query, metric)?;
        if query.len() != self.dims {
            return Err(Error::QueryDimensionMismatch {
                query: query.len(),
                rows: self.dims,
            });
        }
        let n = self.len();
        let scan = |range: std::ops::Range<usize>| -> TopK {
            let mut top = TopK::new(k);
            for i in range {
                if let Some(distance) = scorer.distance(self.row(i), f64::from(self.inv_norms[i])) {
                    if distance <= top.threshold() {
                        top.push(Hit {
                            distance,
                            id: self.ids[i],
                        });
                    }
                }
            }
            top
        };
        let top = if n <= ROWS_PER_TASK {
            scan(0..n)
        } else {
            let tasks = n.div_ceil(ROWS_PER_TASK);
            (0..tasks)
                .into_par_iter()
                .map(|t| scan(t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(n)))
                .reduce(
                    || TopK::new(k),
                    |mut a, b| {
                        a.merge(b);
                        a
                    },
                )
        };
        Ok(scorer.results(top))
    }
}

/// A query, ready to score rows under a metric.
pub(crate) struct Scorer<'q> {
    query: &'q [f32],
    metric: Metric,
    inv_query_norm: f64,
}

impl<'q> Scorer<'q> {
    pub(crate) fn new(query: &'q [f32], metric: Metric) -> Result<Scorer<'q>> {
        let norm = norm_f32(query);
        if metric == Metric::Cosine && norm == 0.0 {
            return Err(Error::InvalidArgument {
                what: "cosine is undefined for a zero query vector (all elements are 0)".into(),
            });
        }
        Ok(Scorer {
            query,
            metric,
            inv_query_norm: 1.0 / norm,
        })
    }

    /// The distance to sort by (for L2 the squared distance), or `None` for a row that cannot
    /// match (an all-zero row under cosine, whose `inv_norm` is 0).
    #[inline]
    pub(crate) fn distance(&self, row: &[f32], inv_norm: f64) -> Option<f64> {
        match self.metric {
            Metric::Cosine if inv_norm == 0.0 => None,
            Metric::Cosine => Some(1.0 - dot_f32(self.query, row) * inv_norm * self.inv_query_norm),
            Metric::Dot => Some(-dot_f32(self.query, row)),
            Metric::L2 => Some(l2sq_f32(self.query, row)),
        }
    }

    /// (id, score, distance), nearest first.
    pub(crate) fn results(&self, top: TopK) -> Vec<(i64, f64, f64)> {
        top.into_sorted()
            .into_iter()
            .map(|hit| {
                let (score, distance) = match self.metric {
                    Metric::Cosine => (1.0 - hit.distance, hit.distance),
                    Metric::Dot => (-hit.distance, hit.distance),
                    Metric::L2 => {
                        let d = hit.distance.sqrt();
                        (-d, d)
                    }
                };
                (hit.id, score, distance)
            })
            .collect()
    }
}

pub(crate) fn inv_norm(row: &[f32]) -> f64 {
    let norm = norm_f32(row);
    if norm > 0.0 {
        // Rounded through f32 as the copy stores it, so both paths score identically.
        f64::from((1.0 / norm) as f32)
    } else {
        0.0
    }
}

/// Top-k over rows as they stream by, without keeping them: the first use of a statement. It
/// costs one pass over the rows and no memory beyond one row, so a statement used once (a new
/// filter, a one-off query) never pays for a copy.
pub struct StreamScan<'q> {
    scorer: Scorer<'q>,
    top: TopK,
    row: Vec<f32>,
    /// Dimensions of the first row; every row must have them.
    dims: Option<usize>,
}

impl<'q> StreamScan<'q> {
    pub fn new(query: &'q [f32], k: usize, metric: Metric) -> Result<StreamScan<'q>> {
        let scorer = Scorer::new(query, metric)?;
        Ok(StreamScan {
            scorer,
            top: TopK::new(k),
            row: Vec::new(),
            dims: None,
        })
    }

    /// Scores a row given as a little-endian float32 blob. Errors are those of
    /// [`VectorSetBuilder::push_blob`] plus [`Error::QueryDimensionMismatch`].
    pub fn push_blob(&mut self, id: i64, blob: &[u8]) -> Result<()> {
        let mut row = std::mem::take(&mut self.row);
        row.clear();
        row.extend(
            blob.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        let result = if blob.is_empty() {
            Err(Error::EmptyVector)
        } else if !blob.len().is_multiple_of(4) {
            Err(Error::BlobLength { len: blob.len() })
        } else {
            self.push_f32(id, &row)
        };
        self.row = row;
        result
    }

    /// Scores a row given as floats.
    pub fn push_f32(&mut self, id: i64, row: &[f32]) -> Result<()> {
        if row.is_empty() {
            return Err(Error::EmptyVector);
        }
        match self.dims {
            None => self.dims = Some(row.len()),
            Some(dims) if dims != row.len() => {
                return Err(Error::DimensionMismatch {
                    left: dims,
                    right: row.len(),
                })
            }
            Some(_) => {}
        }
        if row.len() != self.scorer.query.len() {
            return Err(Error::QueryDimensionMismatch {
                query: self.scorer.query.len(),
                rows: row.len(),
            });
        }
        if let Some(index) = row.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite { index });
        }
        let inv = if self.scorer.metric == Metric::Cosine {
            inv_norm(row)
        } else {
            1.0
        };
        if let Some(distance) = self.scorer.distance(row, inv) {
            if distance <= self.top.threshold() {
                self.top.push(Hit { distance, id });
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Vec<(i64, f64, f64)> {
        self.scorer.results(self.top)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A seeded uniform [-1, 1) generator (splitmix64), so tests need no random-number crate.
    pub fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn reference(rows: &[(i64, Vec<f32>)], q: &[f32], k: usize) -> Vec<i64> {
        let cos = |a: &[f32], b: &[f32]| {
            let d: f64 = a
                .iter()
                .zip(b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            d / (na * nb)
        };
        let mut scored: Vec<(f64, i64)> =
            rows.iter().map(|(id, v)| (1.0 - cos(q, v), *id)).collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        scored.into_iter().take(k).map(|(_, id)| id).collect()
    }

    #[test]
    fn parallel_scan_matches_scalar_reference_with_ties() {
        let mut rng = uniform(7);
        let dims = 33;
        let mut rows: Vec<(i64, Vec<f32>)> = (0..30_000)
            .map(|i| (i * 3 + 1, (0..dims).map(|_| rng()).collect()))
            .collect();
        // Exact duplicates of one row, at ids on both sides of it: the tie must go to the smaller id.
        let dup = rows[500].1.clone();
        rows.push((-5, dup.clone()));
        rows.push((1_000_000, dup.clone()));
        let mut b = VectorSetBuilder::new();
        for (id, v) in &rows {
            b.push_f32(*id, v).unwrap();
        }
        let set = b.finish().unwrap();
        let mut q = dup.clone();
        q[0] += 0.01;
        let got: Vec<i64> = set
            .search(&q, 10, Metric::Cosine)
            .unwrap()
            .iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(got, reference(&rows, &q, 10));
        assert_eq!(&got[..3], &[-5, rows[500].0, 1_000_000]);
    }

    #[test]
    fn the_stream_scan_gives_exactly_what_the_copy_gives() {
        let mut rng = uniform(11);
        let rows: Vec<Vec<f32>> = (0..20_000)
            .map(|_| (0..24).map(|_| rng()).collect())
            .collect();
        let q: Vec<f32> = (0..24).map(|_| rng()).collect();
        for metric in [Metric::Cosine, Metric::Dot, Metric::L2] {
            let mut b = VectorSetBuilder::new();
            let mut s = StreamScan::new(&q, 15, metric).unwrap();
            for (i, r) in rows.iter().enumerate() {
                b.push_f32(i as i64, r).unwrap();
                let blob: Vec<u8> = r.iter().flat_map(|x| x.to_le_bytes()).collect();
                s.push_blob(i as i64, &blob).unwrap();
            }
            assert_eq!(
                s.finish(),
                b.finish().unwrap().search(&q, 15, metric).unwrap()
            );
        }
    }

    #[test]
    fn rejects_mixed_dimensions_and_non_finite_rows() {
        let mut b = VectorSetBuilder::new();
        b.push_f32(1, &[1.0, 2.0]).unwrap();
        assert_eq!(
            b.push_f32(2, &[1.0]),
            Err(Error::DimensionMismatch { left: 2, right: 1 })
        );
        let set = b.finish().unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(
            set.search(&[1.0], 1, Metric::Cosine),
            Err(Error::QueryDimensionMismatch { query: 1, rows: 2 })
        );
    }

    #[test]
    fn a_non_finite_row_is_named_by_its_id() {
        let mut b = VectorSetBuilder::new();
        b.push_f32(1, &[1.0, 2.0]).unwrap();
        b.push_f32(7, &[1.0, f32::INFINITY]).unwrap();
        assert_eq!(
            b.finish().unwrap_err(),
            Error::InRow {
                id: 7,
                error: Box::new(Error::NonFinite { index: 1 })
            }
        );
    }

    #[test]
    fn zero_rows_never_match_under_cosine_but_do_under_l2() {
        let mut b = VectorSetBuilder::new();
        b.push_f32(1, &[0.0, 0.0]).unwrap();
        b.push_f32(2, &[1.0, 1.0]).unwrap();
        let set = b.finish().unwrap();
        let cos = set.search(&[1.0, 0.0], 5, Metric::Cosine).unwrap();
        assert_eq!(cos.iter().map(|r| r.0).collect::<Vec<_>>(), vec![2]);
        let l2 = set.search(&[0.1, 0.0], 5, Metric::L2).unwrap();
        assert_eq!(l2[0].0, 1);
        assert!((l2[0].2 - 0.1).abs() < 1e-6);
    }
}
