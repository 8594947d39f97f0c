//! Search structures. `scan`: an exact, parallel, fused top-k scan over a contiguous in-memory
//! copy of the vectors that a SELECT yields; `cache`: keeps those copies between queries while
//! the database is unchanged.

pub mod cache;
pub mod scan;

pub use cache::{DbStamp, ScanCache};
pub use scan::{VectorSet, VectorSetBuilder};
