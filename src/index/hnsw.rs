//! The ANN graph of a persistent index (`clip_index ... hnsw=on`): an HNSW graph from Unum's
//! usearch, keyed by rowid, that proposes candidates which the SQL layer rescores exactly with
//! the stored float32 vectors, as an exact search scores them (so a returned distance is
//! always the exact one; the graph only decides which rows are looked at).
//!
//! The graph keeps its own compact copy of each vector: for cosine, int8 codes scaled per row
//! by max |x| / 127 (cosine is blind to a row's scale, so every row uses the full int8 range;
//! usearch's own f32 -> i8 cast scales by the norm, leaving CLIP-like rows ~6 levels wide);
//! for dot and L2, where the scale matters, half floats.
//!
//! Keys are rowids with the top bit flipped, which maps `i64::MIN..=i64::MAX` onto
//! `0..=u64::MAX` in order. usearch reserves `u64::MAX` as its empty-slot marker, so the row
//! with rowid `i64::MAX` (if any) is never in the graph: [`Graph::SENTINEL_ROWID`], which the
//! caller scores exactly beside the graph's candidates.

use usearch::ffi::{IndexOptions, MetricKind, ScalarKind};
use usearch::Index;

use crate::error::{Error, Result};
use crate::index::chunked::quantize_int8;
use crate::vector::distance::Metric;

/// Graph parameters: neighbours per node (M) and the candidate list while adding.
///
/// They apply to a graph built from nothing. A saved graph keeps the M it was built with
/// (usearch reads it from the graph's header), so a table declared before a default changed
/// keeps its graph's until that graph is rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphOptions {
    pub connectivity: usize,
    pub expansion_add: usize,
}

/// Default M. Embeddings fall in tight clusters, and with M = 16 whole queries missed on the
/// benchmark's clustered set (1M x 512, 4,000 centres): in stop 34, on 300 queries at
/// oversample 20, recall@10 was 0.957 and 10 queries found none of their ten. usearch adds
/// rows on both cores, so every build differs; on the same queries:
/// - M = 32, three builds: 0.999 with no such query; 0.9995 with none in the benchmark's full
///   run (200 queries); 0.991 with one in 120 (stop 33); 1.18-1.34 ms a query, 354-450 s to
///   build, 752 MiB of graph;
/// - M = 24: 0.999 with none, and 0.988 with three; 1.15-1.28 ms, 329 s, 691 MiB;
/// - M = 16 with ef_construction 256 (one build): 0.997 with one; 1.30 ms, 627 s, 630 MiB.
///
/// M = 16 itself took 270-353 s and 1.11-1.39 ms. 32 had the fewest whole-query misses.
pub const DEFAULT_CONNECTIVITY: usize = 32;

impl Default for GraphOptions {
    fn default() -> Self {
        GraphOptions {
            connectivity: DEFAULT_CONNECTIVITY,
            expansion_add: 128,
        }
    }
}

/// One HNSW graph.
pub struct Graph {
    index: Index,
    dims: usize,
    metric: Metric,
}

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument {
        what: format!("hnsw: {what}: {e}"),
    }
}

impl Graph {
    /// The rowid that cannot be a key (see the module documentation).
    pub const SENTINEL_ROWID: i64 = i64::MAX;

    pub fn key(rowid: i64) -> u64 {
        (rowid as u64) ^ (1 << 63)
    }

    pub fn rowid(key: u64) -> i64 {
        (key ^ (1 << 63)) as i64
    }

    fn index_options(dims: usize, metric: Metric, options: GraphOptions) -> IndexOptions {
        let (metric, quantization) = match metric {
            Metric::Cosine => (MetricKind::Cos, ScalarKind::I8),
            Metric::Dot => (MetricKind::IP, ScalarKind::F16),
            Metric::L2 => (MetricKind::L2sq, ScalarKind::F16),
        };
        IndexOptions {
            dimensions: dims,
            metric,
            quantization,
            connectivity: options.connectivity,
            expansion_add: options.expansion_add,
            expansion_search: 64,
            multi: false,
        }
    }

    /// An empty graph.
    pub fn new(dims: usize, metric: Metric, options: GraphOptions) -> Result<Graph> {
        let index = Index::new(&Self::index_options(dims, metric, options))
            .map_err(|e| failed("cannot create the graph", e))?;
        let graph = Graph {
            index,
            dims,
            metric,
        };
        graph.reserve(1024)?;
        Ok(graph)
    }

    /// A graph from [`Graph::to_bytes`]'s output; checks that it holds what the index
    /// declares (dimensions, metric and element type), before usearch reads the body.
    pub fn from_bytes(
        bytes: &[u8],
        dims: usize,
        metric: Metric,
        options: GraphOptions,
    ) -> Result<Graph> {
        let expected = Self::index_options(dims, metric, options);
        let meta = Index::metadata_from_buffer(bytes)
            .map_err(|e| failed("the stored graph is unreadable", e))?;
        if meta.dimensions != dims as u64
            || meta.metric != expected.metric
            || meta.quantization != expected.quantization
            || meta.multi
        {
            return Err(failed(
                "the stored graph does not match the index",
                format!(
                    "it has {} dimensions, {:?}, {:?}; the index {dims}, {:?}, {:?}",
                    meta.dimensions,
                    meta.metric,
                    meta.quantization,
                    expected.metric,
                    expected.quantization
                ),
            ));
        }
        let graph = Graph::new(dims, metric, options)?;
        graph
            .index
            .load_from_buffer(bytes)
            .map_err(|e| failed("the stored graph is unreadable", e))?;
        if graph.index.dimensions() != dims {
            return Err(failed("the stored graph does not match the index", dims));
        }
        Ok(graph)
    }

    /// The graph serialized, as usearch's file format.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut buffer = vec![0u8; self.index.serialized_length()];
        self.index
            .save_to_buffer(&mut buffer)
            .map_err(|e| failed("cannot serialize the graph", e))?;
        Ok(buffer)
    }

    /// Rows in the graph.
    pub fn len(&self) -> usize {
        self.index.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, rowid: i64) -> bool {
        rowid != Self::SENTINEL_ROWID && self.index.contains(Self::key(rowid))
    }

    fn reserve(&self, capacity: usize) -> Result<()> {
        let threads = rayon::current_num_threads() + 1;
        self.index
            .reserve_capacity_and_threads(capacity, threads)
            .map_err(|e| failed("cannot reserve memory", e))
    }

    /// Makes room for `more` rows (growing geometrically).
    fn room_for(&self, more: usize) -> Result<()> {
        let needed = self.index.size() + more;
        if needed > self.index.capacity() {
            self.reserve(needed.max(self.index.capacity() * 3 / 2).max(1024))?;
        }
        Ok(())
    }

    /// Removes a row (no-op when it is not there).
    pub fn remove(&self, rowid: i64) -> Result<()> {
        if self.contains(rowid) {
            self.index
                .remove(Self::key(rowid))
                .map_err(|e| failed("cannot remove a row", e))?;
        }
        Ok(())
    }

    fn add_one(&self, rowid: i64, vector: &[f32]) -> Result<()> {
        if rowid == Self::SENTINEL_ROWID {
            return Ok(());
        }
        let key = Self::key(rowid);
        let added = match self.metric {
            Metric::Cosine => {
                let mut codes = Vec::with_capacity(self.dims);
                quantize_int8(vector, &mut codes);
                self.index.add(key, &codes)
            }
            Metric::Dot | Metric::L2 => self.index.add(key, vector),
        };
        added.map_err(|e| failed(&format!("cannot add rowid {rowid}"), e))
    }

    /// Adds (or replaces) rows, in parallel on the rayon pool.
    pub fn upsert(&self, rows: &[(i64, Vec<f32>)]) -> Result<()> {
        use rayon::prelude::*;
        for (rowid, _) in rows {
            self.remove(*rowid)?;
        }
        self.room_for(rows.len())?;
        rows.par_iter()
            .with_min_len(16)
            .try_for_each(|(rowid, vector)| self.add_one(*rowid, vector))
    }

    /// Up to `count` candidate rowids for `query`, best first by the graph's approximate
    /// distance, exploring `ef` candidates; with `allowed`, only rowids it accepts. The
    /// predicate runs inside usearch (C++): it must not panic.
    pub fn search(
        &self,
        query: &[f32],
        count: usize,
        ef: usize,
        allowed: Option<&(dyn Fn(i64) -> bool + Sync)>,
    ) -> Result<Vec<i64>> {
        if self.is_empty() || count == 0 {
            return Ok(Vec::new());
        }
        self.index.change_expansion_search(ef.max(count));
        let matches = match (self.metric, allowed) {
            (Metric::Cosine, allowed) => {
                let mut codes = Vec::with_capacity(self.dims);
                quantize_int8(query, &mut codes);
                match allowed {
                    None => self.index.search(&codes, count),
                    Some(f) => self
                        .index
                        .filtered_search(&codes, count, |key| f(Self::rowid(key))),
                }
            }
            (_, None) => self.index.search(query, count),
            (_, Some(f)) => self
                .index
                .filtered_search(query, count, |key| f(Self::rowid(key))),
        }
        .map_err(|e| failed("search failed", e))?;
        Ok(matches.keys.into_iter().map(Self::rowid).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, dims: usize, seed: u64) -> Vec<(i64, Vec<f32>)> {
        // A small deterministic generator (xorshift) is enough for a unit test.
        let mut s = seed | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        (0..n)
            .map(|i| (i as i64 - 5, (0..dims).map(|_| next()).collect()))
            .collect()
    }

    #[test]
    fn keys_map_rowids_in_order_and_back() {
        for r in [i64::MIN, -1, 0, 1, i64::MAX - 1] {
            assert_eq!(Graph::rowid(Graph::key(r)), r);
            assert_ne!(Graph::key(r), u64::MAX);
        }
        assert!(Graph::key(-1) < Graph::key(0));
        assert_eq!(Graph::key(Graph::SENTINEL_ROWID), u64::MAX);
    }

    #[test]
    fn a_graph_finds_its_own_rows_and_survives_serialization() {
        for metric in [Metric::Cosine, Metric::Dot, Metric::L2] {
            let data = rows(500, 16, 7);
            let g = Graph::new(16, metric, GraphOptions::default()).unwrap();
            g.upsert(&data).unwrap();
            assert_eq!(g.len(), 500);
            let bytes = g.to_bytes().unwrap();
            let g2 = Graph::from_bytes(&bytes, 16, metric, GraphOptions::default()).unwrap();
            assert_eq!(g2.len(), 500);
            let mut found = 0;
            for (rowid, v) in data.iter().step_by(25) {
                let hits = g2.search(v, 1, 64, None).unwrap();
                found += usize::from(hits.first() == Some(rowid));
            }
            // Dot product does not rank a row first against itself; cosine and L2 do.
            if metric != Metric::Dot {
                assert!(found >= 18, "{metric:?}: {found} of 20 found themselves");
            }
            // Wrong declarations are refused before usearch reads the body.
            assert!(Graph::from_bytes(&bytes, 8, metric, GraphOptions::default()).is_err());
            assert!(Graph::from_bytes(&bytes[..40], 16, metric, GraphOptions::default()).is_err());
        }
    }

    #[test]
    fn a_saved_graph_keeps_the_connectivity_it_was_built_with() {
        let data = rows(200, 8, 5);
        let built = GraphOptions {
            connectivity: 8,
            ..GraphOptions::default()
        };
        let g = Graph::new(8, Metric::Cosine, built).unwrap();
        g.upsert(&data).unwrap();
        assert_eq!(g.index.connectivity(), 8);
        let fresh = Graph::new(8, Metric::Cosine, GraphOptions::default()).unwrap();
        assert_eq!(fresh.index.connectivity(), DEFAULT_CONNECTIVITY);
        // Loaded under today's default, as a table declared without hnsw_m is.
        let g2 = Graph::from_bytes(
            &g.to_bytes().unwrap(),
            8,
            Metric::Cosine,
            GraphOptions::default(),
        )
        .unwrap();
        assert_eq!(g2.index.connectivity(), 8);
        g2.upsert(&rows(50, 8, 6)).unwrap();
        assert_eq!(g2.index.connectivity(), 8);
    }

    #[test]
    fn removed_and_filtered_rows_are_not_returned() {
        let data = rows(300, 8, 3);
        let g = Graph::new(8, Metric::Cosine, GraphOptions::default()).unwrap();
        g.upsert(&data).unwrap();
        let (target, v) = &data[10];
        g.remove(*target).unwrap();
        assert!(!g.contains(*target));
        let hits = g.search(v, 20, 64, None).unwrap();
        assert!(!hits.contains(target));
        let even = |r: i64| r % 2 == 0;
        let hits = g.search(v, 20, 64, Some(&even)).unwrap();
        assert!(!hits.is_empty() && hits.iter().all(|r| r % 2 == 0));
        // The sentinel rowid is skipped, not an error.
        g.upsert(&[(Graph::SENTINEL_ROWID, v.clone())]).unwrap();
        assert!(!g.contains(Graph::SENTINEL_ROWID));
    }
}
