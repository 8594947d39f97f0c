//! The process-wide cache of loaded models. A model directory is loaded once per process, on
//! first use, and shared by every connection and thread (Datasette runs the extension's init on
//! every connection). Concurrent first uses of one directory wait for a single load. A directory
//! whose config or weights change on disk (say, a fine-tune written again) is loaded anew.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use super::load::{load_in, LoadedModel};
use super::matmul::Precision;
use crate::error::{Error, Result};

/// (file, length, modification time) of the files that define a model.
type Signature = Vec<(PathBuf, u64, Option<SystemTime>)>;

#[derive(Default)]
struct Slot {
    loaded: Option<(Signature, Arc<LoadedModel>)>,
    /// When the model was last handed out (a tick of [`CLOCK`]).
    last_used: u64,
}

/// How many models stay loaded while no call holds them. A long-running host that goes through
/// many model directories (registering and dropping names, fine-tunes written again) keeps at
/// most this many idle ones, the least recently used going first; models in use are never
/// dropped.
pub const MAX_IDLE_MODELS: usize = 4;

static CLOCK: AtomicU64 = AtomicU64::new(0);

/// A loaded model: its canonical directory and the precision it was built at (a directory
/// registered at both is loaded twice).
type Key = (PathBuf, Precision);

fn slots() -> &'static Mutex<HashMap<Key, Arc<Mutex<Slot>>>> {
    static SLOTS: OnceLock<Mutex<HashMap<Key, Arc<Mutex<Slot>>>>> = OnceLock::new();
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
    get_in(path, Precision::F32)
}

/// The model in `path` with its products at `precision`, loaded if needed.
pub fn get_in(path: &Path, precision: Precision) -> Result<Arc<LoadedModel>> {
    let dir = path.canonicalize().map_err(|e| {
        Error::Model(format!(
            "{}: cannot open the model directory: {e}",
            path.display()
        ))
    })?;
    let key = (dir, precision);
    let slot = {
        let mut map = slots().lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.clone()).or_default().clone()
    };
    let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
    guard.last_used = CLOCK.fetch_add(1, Ordering::Relaxed);
    if let Some((sig, model)) = &guard.loaded {
        if *sig == signature(model) {
            return Ok(model.clone());
        }
    }
    guard.loaded = None; // free the old copy before loading the new one
    let model = Arc::new(load_in(&key.0, precision)?);
    guard.loaded = Some((signature(&model), model.clone()));
    drop(guard);
    evict_idle(&key);
    Ok(model)
}

/// Drops the least recently used idle models beyond [`MAX_IDLE_MODELS`], and forgets empty
/// slots. A slot being loaded (locked) is skipped, so this never waits on a load.
fn evict_idle(keep: &Key) {
    let mut map = slots().lock().unwrap_or_else(|p| p.into_inner());
    let mut idle: Vec<(u64, Key)> = Vec::new();
    map.retain(|key, slot| {
        let Ok(s) = slot.try_lock() else {
            return true;
        };
        match &s.loaded {
            Some((_, model)) if key != keep && Arc::strong_count(model) == 1 => {
                idle.push((s.last_used, key.clone()));
                true
            }
            Some(_) => true,
            // Nobody is loading it (we hold its lock): an empty slot need not be remembered.
            None => Arc::strong_count(slot) > 1,
        }
    });
    // `keep` is in use now and idle once its caller is done with it: it counts as one.
    if idle.len() < MAX_IDLE_MODELS {
        return;
    }
    idle.sort();
    for (_, key) in &idle[..=idle.len() - MAX_IDLE_MODELS] {
        if let Some(slot) = map.get(key) {
            let Ok(mut s) = slot.try_lock() else {
                continue;
            };
            if s.loaded
                .as_ref()
                .is_some_and(|(_, m)| Arc::strong_count(m) == 1)
            {
                s.loaded = None;
                drop(s);
                map.remove(key);
            }
        }
    }
}

/// Whether the model in `path` is loaded now (at f32).
pub fn is_loaded(path: &Path) -> bool {
    let Ok(dir) = path.canonicalize() else {
        return false;
    };
    let map = slots().lock().unwrap_or_else(|p| p.into_inner());
    map.get(&(dir, Precision::F32))
        .is_some_and(|s| s.lock().map(|s| s.loaded.is_some()).unwrap_or(false))
}

/// How many models this process holds (for tests: one copy per directory and precision).
pub fn loaded_count() -> usize {
    let map = slots().lock().unwrap_or_else(|p| p.into_inner());
    map.values()
        .filter(|s| s.lock().map(|s| s.loaded.is_some()).unwrap_or(false))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that goes through many model directories keeps at most MAX_IDLE_MODELS of
    /// them loaded once nothing uses them, dropping the least recently used; one in use stays.
    #[test]
    fn idle_models_beyond_the_bound_are_dropped_least_recently_used_first() {
        let tiny = Path::new("tests/fixtures/clip/models/tiny-quickgelu");
        let base = std::env::temp_dir().join(format!("archaeclip-registry-{}", std::process::id()));
        let dirs: Vec<PathBuf> = (0..MAX_IDLE_MODELS + 3)
            .map(|i| {
                let d = base.join(format!("m{i}"));
                std::fs::create_dir_all(&d).unwrap();
                for f in std::fs::read_dir(tiny).unwrap() {
                    let f = f.unwrap().path();
                    std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
                }
                d
            })
            .collect();
        let held = get(&dirs[0]).unwrap();
        for d in &dirs[1..] {
            drop(get(d).unwrap());
        }
        let loaded: Vec<bool> = dirs.iter().map(|d| is_loaded(d)).collect();
        assert!(loaded[0], "a model in use is never dropped");
        // (Other tests of this process may hold idle models too: at most, not exactly.)
        let idle = loaded[1..].iter().filter(|&&l| l).count();
        assert!((1..=MAX_IDLE_MODELS).contains(&idle), "{loaded:?}");
        assert!(
            !loaded[1] && !loaded[2],
            "the least recently used go first: {loaded:?}"
        );
        assert!(loaded[dirs.len() - 1], "{loaded:?}");
        // A dropped model loads again on its next use.
        let again = get(&dirs[1]).unwrap();
        assert!(is_loaded(&dirs[1]));
        assert_eq!(again.info("x")["dimensions"], held.info("x")["dimensions"]);
        drop((held, again));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
