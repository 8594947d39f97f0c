//! Search structures. `scan`: exact top-k, either streamed over rows as a SELECT yields them, or
//! parallel over a contiguous in-memory copy of them; `cache`: decides which to use and keeps the
//! copies between queries while the database is unchanged.

pub mod cache;
pub mod scan;

pub use cache::{DbStamp, Lookup, ScanCache};
pub use scan::{StreamScan, VectorSet, VectorSetBuilder};
