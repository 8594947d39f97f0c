//! The process-wide cache of loaded models. A model directory is loaded once per process, on
//! first use, and shared by every connection and thread (Datasette runs the extension's init on
//! every connection). Concurrent first uses of one directory wait for a single load. A directory
//! whose config or weights change on disk (say, a fine-tune written again) is loaded anew.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use super::load::{load, LoadedModel};
use crate::error::{Error, Result};

/// (file, length, modification time) of the files that define a model.
type Signature = Vec<(PathBuf, u64, Option<SystemTime>)>;

#[derive(Default)]
struct Slot {
    loaded: Option<(Signature, Arc<LoadedModel>)>,
}

fn slots() -> &'static Mutex<HashMap<PathBuf, Arc<Mutex<Slot>>>> {
    static SLOTS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<Slot>>>>> = OnceLock::new();
    SLOTS.get_or_init(Mutex::default)
}

fn signature(model: &LoadedModel) -> Signature {
    model
        .files
        .iter()
        .filter_map(|f| f.split(" (").next())
        .map(|f| model.root.join(f))
        .filter(|p| p.is_file())
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (p, len, modified)
        })
        .collect()
}

/// The model in `path`, loaded if needed.
pub fn get(path: &Path) -> Result<Arc<LoadedModel>> {
    let key = path.canonicalize().map_err(|e| {
        Error::Model(format!(
            "{}: cannot open the model directory: {e}",
            path.display()
        ))
    })?;
    let slot = {
        let mut map = slots().lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.clone()).or_default().clone()
    };
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((sig, model)) = &slot.loaded {
        if *sig == signature(model) {
            return Ok(model.clone());
        }
    }
    slot.loaded = None; // free the old copy before loading the new one
    let model = Arc::new(load(&key)?);
    slot.loaded = Some((signature(&model), model.clone()));
    Ok(model)
}

/// How many models this process holds (for tests: one copy per directory).
pub fn loaded_count() -> usize {
    let map = slots().lock().unwrap_or_else(|p| p.into_inner());
    map.values()
        .filter(|s| s.lock().map(|s| s.loaded.is_some()).unwrap_or(false))
        .count()
}
