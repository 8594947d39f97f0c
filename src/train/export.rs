//! Writing a model directory that HuggingFace, sentence-transformers and archaeclip all load:
//! `config.json`, `model.safetensors`, tokenizer files, `preprocessor_config.json`,
//! `modules.json` (sentence-transformers: the CLIP module at the root), plus
//! `archaeclip_training.json` (options, query, log, resume state) and, for resuming,
//! `optimizer.safetensors`.
//!
//! A directory is written whole or not at all: the files go to a temporary sibling directory,
//! are synced, and the directory then takes the output's place in one atomic exchange
//! (`renameat2(RENAME_EXCHANGE)` on Linux). A run killed at any moment leaves the previous
//! checkpoint whole.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::clip::preprocess::PreprocessConfig;
use crate::clip::tokenizer::ClipTokenizer;
use crate::error::{Error, Result};

/// The training record and resume state.
pub const TRAINING_FILE: &str = "archaeclip_training.json";
/// Adam's moments, for resuming.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
];

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{}: {e}", path.display()))
}

/// What the output copies from the base model.
pub struct Base<'a> {
    /// The directory holding the base's config.json.
    pub model_dir: &'a Path,
    pub preprocess: &'a PreprocessConfig,
    pub max_len: usize,
}

/// The files of one checkpoint.
pub struct Checkpoint<'a> {
    pub weights: &'a [(String, Tensor)],
    pub optimizer: Option<Vec<(String, Tensor)>>,
    pub record: &'a serde_json::Value,
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(dir, e))
}

fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).map_err(|e| io(path, e))?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(path, e))
}

fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = File::create(path).map_err(|e| io(path, e))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| io(path, e))
}

/// Writes `checkpoint` as the model directory `output`, replacing what is there atomically.
pub fn write(output: &Path, base: &Base, checkpoint: &Checkpoint) -> Result<()> {
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let name = output
        .file_name()
        .ok_or_else(|| io(output, "not a directory name"))?
        .to_string_lossy();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| io(&tmp, e))?;
    let result = fill(&tmp, base, checkpoint).and_then(|()| swap_into_place(&tmp, output));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    sync_dir(parent)
}

fn fill(dir: &Path, base: &Base, checkpoint: &Checkpoint) -> Result<()> {
    let copy = |name: &str| -> Result<bool> {
        let from = base.model_dir.join(name);
        if !from.is_file() {
            return Ok(false);
        }
        let bytes = std::fs::read(&from).map_err(|e| io(&from, e))?;
        write_file(&dir.join(name), &bytes)?;
        Ok(true)
    };
    if !copy("config.json")? {
        return Err(io(base.model_dir, "the base model's config.json is gone"));
    }
    let mut tokenizer_files = 0;
    for name in TOKENIZER_FILES {
        tokenizer_files += usize::from(copy(name)?);
    }
    let has_vocab = dir.join("tokenizer.json").is_file()
        || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file());
    if tokenizer_files == 0 || !has_vocab {
        ClipTokenizer::write_bundled_files(dir, base.max_len)?;
    }
    if !copy("preprocessor_config.json")? {
        write_file(
            &dir.join("preprocessor_config.json"),
            format!("{:#}", base.preprocess.to_json()).as_bytes(),
        )?;
    }
    let modules = serde_json::json!([{
        "idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.CLIPModel"
    }]);
    write_file(&dir.join("modules.json"), format!("{modules:#}").as_bytes())?;
    save_tensors(&dir.join("model.safetensors"), checkpoint.weights)?;
    if let Some(state) = &checkpoint.optimizer {
        save_tensors(&dir.join(OPTIMIZER_FILE), state)?;
    }
    write_file(
        &dir.join(TRAINING_FILE),
        format!("{:#}", checkpoint.record).as_bytes(),
    )?;
    sync_dir(dir)
}

/// Puts `tmp` at `output`: an atomic exchange when `output` exists (the old directory is then
/// removed), a rename otherwise.
fn swap_into_place(tmp: &Path, output: &Path) -> Result<()> {
    match std::fs::symlink_metadata(output) {
        Err(_) => std::fs::rename(tmp, output).map_err(|e| io(output, e)),
        Ok(m) if !m.is_dir() => Err(io(output, "exists and is not a directory")),
        Ok(_) => {
            exchange(tmp, output)?;
            // `tmp` now holds the previous checkpoint.
            std::fs::remove_dir_all(tmp).map_err(|e| io(tmp, e))
        }
    }
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(|e| io(a, e))?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(|e| io(b, e))?;
    // SAFETY: two valid NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io(b, std::io::Error::last_os_error()))
    }
}

/// Elsewhere: move the old directory aside, move the new one in, then drop the old one. A
/// crash between the two renames leaves the previous checkpoint whole under `.<name>.old`.
#[cfg(not(target_os = "linux"))]
fn exchange(a: &Path, b: &Path) -> Result<()> {
    let old: PathBuf = b.with_extension("old");
    std::fs::rename(b, &old).map_err(|e| io(b, e))?;
    std::fs::rename(a, b).map_err(|e| io(b, e))?;
    std::fs::rename(&old, a).map_err(|e| io(a, e))
}

/// Reads `archaeclip_training.json` of a directory written by [`write`].
pub fn read_record(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join(TRAINING_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| io(&path, format!("invalid JSON: {e}")))
}

/// Reads `optimizer.safetensors` of a directory written by [`write`].
pub fn read_optimizer(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(OPTIMIZER_FILE);
    if !path.is_file() {
        return Err(io(
            &path,
            "missing: this model was saved without its optimizer state and cannot be resumed",
        ));
    }
    candle_core::safetensors::load(&path, &candle_core::Device::Cpu).map_err(|e| io(&path, e))
}

/// The path as given, made absolute against the current directory.
pub fn absolute(path: &str) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| io(Path::new(path), e))
}
