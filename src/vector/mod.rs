//! Vectors: the formats (`codec`), the arithmetic (`distance`) and bounded selection (`topk`).

pub mod codec;
pub mod distance;
pub mod topk;

pub use codec::{ElementType, Vector};
