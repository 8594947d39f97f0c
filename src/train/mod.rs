//! Fine-tuning CLIP: data streamed from a source of (image, caption) pairs, CLIP's contrastive
//! loss, AdamW with a warmup/decay schedule, atomic checkpoints that resume, retrieval metrics,
//! and a HuggingFace model directory as the output. Knows nothing of SQLite: the `sql` layer
//! supplies the pairs and turns events into rows.

pub mod data;
pub mod evaluate;
pub mod export;
pub mod init;
pub mod optim;
pub mod options;
pub mod params;
pub mod trainer;
