//! Search structures. `scan`: exact top-k, either streamed over rows as a SELECT yields them, or
//! parallel over a contiguous in-memory copy of them; `cache`: decides which to use and keeps the
//! copies between queries while the database is unchanged; `chunked`: the in-memory image of a
//! persistent index (`clip_index`) and the exact top-k over its chunks; `hnsw`: its ANN graph.

pub mod cache;
pub mod chunked;
pub mod codes;
pub mod hnsw;
pub mod scan;

pub use cache::{DbStamp, Lookup, ScanCache};
pub use scan::{StreamScan, VectorSet, VectorSetBuilder};
