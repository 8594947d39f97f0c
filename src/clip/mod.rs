//! CLIP inside SQLite: HuggingFace CLIP checkpoints (config, weights), their tokenizer and image
//! preprocessing, the model itself (candle), and a process-wide registry of loaded models.

pub mod tokenizer;
