//! CLIP inside SQLite: HuggingFace CLIP checkpoints (config, weights), their tokenizer and image
//! preprocessing, the model itself (candle), and a process-wide registry of loaded models.

/// Products on Intel AMX tiles (bf16 training). Public for `benches/products.rs` only: not a
/// stable API.
#[doc(hidden)]
pub mod amx;
pub mod config;
pub mod embed;
pub mod fast;
pub mod load;
/// The packed f32/bf16 product kernels. Public for `benches/products.rs` only: not a stable
/// API.
#[doc(hidden)]
pub mod matmul;
pub use matmul::Precision;
pub mod model;
pub mod preprocess;
pub mod registry;
pub mod tokenizer;
pub(crate) mod train_ops;
pub use train_ops::Bf16Engine;

/// A candle error as one line for an SQL error message: without the backtrace candle captures
/// when `RUST_BACKTRACE` is set (dozens of lines of frames), contexts joined by ": ".
pub fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string(),
    }
}
