//! CLIP inside SQLite: HuggingFace CLIP checkpoints (config, weights), their tokenizer and image
//! preprocessing, the model itself (candle), and a process-wide registry of loaded models.

pub mod config;
pub mod embed;
pub mod load;
pub mod model;
pub mod preprocess;
pub mod registry;
pub mod tokenizer;
