//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) and the minimized inputs of fixed bugs
//! (`fuzz/regressions/<target>/`) through the fuzz targets' own bodies (`fuzz/harness.rs`), on
//! stable Rust: every input must come back as a value or an error, never a panic, and the
//! invariants the harness checks must hold.
//! `cargo test --release --locked --no-default-features --features static --test fuzz_corpus`
#![cfg(feature = "static")]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../fuzz/harness.rs"]
mod harness;

fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
            continue;
        };
        files.extend(entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()));
    }
    files.sort();
    files
}

fn replay(target: &str, body: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for the fuzz target {target}");
    let failed: Vec<String> = files
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).unwrap();
            catch_unwind(AssertUnwindSafe(|| body(&data))).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs failed: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn vector_blob() {
    replay("vector_blob", harness::vector_blob);
}

#[test]
fn vector_json() {
    replay("vector_json", harness::vector_json);
}

#[test]
fn image() {
    replay("image", harness::image);
}

#[test]
fn tokenizer() {
    replay("tokenizer", harness::tokenizer);
}

#[test]
fn config() {
    replay("config", harness::config);
}

#[test]
fn model_dir() {
    replay("model_dir", harness::model_dir);
}
