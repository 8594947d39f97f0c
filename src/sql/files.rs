//! `clip_files(directory [, pattern])`: the files under a directory whose path relative to it
//! matches a glob, one row each, for embedding a folder (llm's `embed-multi --files dir '*.jpg'`):
//!
//! ```sql
//! INSERT INTO photos(path, md5, embedding)
//!   SELECT f.path, f.md5, e.embedding
//!   FROM clip_files('photos', '**/*.jpg') AS f
//!   JOIN clip_embed_images('SELECT path, path FROM clip_files(''photos'', ''**/*.jpg'')') AS e
//!     ON e.id = f.path
//!   WHERE e.error IS NULL;
//! ```
//! Columns: `path` (the directory joined with `name`: what `clip_embed_image` reads), `name` (the
//! path relative to the directory), `size` (bytes), `mtime` (Unix seconds), `md5` (the 16-byte
//! MD5 digest of the content: llm's `content_hash`), `content` (the bytes) and `error` (why the
//! entry could not be read; the other columns are then NULL). `md5` and `content` are read only
//! when asked for. The pattern is matched against `name`: `*` stays within one directory, `**`
//! crosses them, so `*.jpg` lists the top level and `**/*.jpg` the whole tree. Rows come in
//! name order, read lazily as the walk proceeds. Symlinks are followed only to files the policy
//! may read. Entries are listed under the connection's policy: an untrusted connection lists
//! only inside `ARCHAECLIP_FILE_ROOTS`. DIRECTONLY.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::{c_int, CStr};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;

use md5::{Digest, Md5};
use rusqlite::ffi;
use rusqlite::types::{Value, ValueRef};
use rusqlite::vtab::{
    Context, Filters, IndexInfo, Module, VTab, VTabConfig, VTabConnection, VTabCursor,
};
use rusqlite::Connection;

use super::clip_models::SharedNames;
use super::policy::Policy;
use super::{arg_error, fn_error, guard, type_name};
use crate::clip::preprocess::MAX_BYTES;

const NAME: &str = "clip_files";

const COL_PATH: c_int = 0;
const COL_NAME: c_int = 1;
const COL_SIZE: c_int = 2;
const COL_MTIME: c_int = 3;
const COL_MD5: c_int = 4;
const COL_CONTENT: c_int = 5;
const COL_ERROR: c_int = 6;
const ARGUMENTS: [c_int; 2] = [7, 8];

/// Registers the table-valued function.
pub fn load_module(conn: &Connection, names: SharedNames) -> rusqlite::Result<()> {
    const MODULE: Module<FilesTab> = Module::eponymous_only_module();
    conn.create_module(c"clip_files", &MODULE, Some(names))
}

#[repr(C)]
pub struct FilesTab {
    base: ffi::sqlite3_vtab,
    names: SharedNames,
}

unsafe impl<'vtab> VTab<'vtab> for FilesTab {
    type Aux = SharedNames;
    type Cursor = FilesCursor<'vtab>;

    fn connect(
        db: &mut VTabConnection,
        aux: Option<&SharedNames>,
        _module_name: &[u8],
        _database_name: &[u8],
        _table_name: &[u8],
        _args: &[&[u8]],
    ) -> rusqlite::Result<(Cow<'static, CStr>, Self)> {
        // It lists and reads files: never from a view or trigger.
        db.config(VTabConfig::DirectOnly)?;
        Ok((
            Cow::Borrowed(
                c"CREATE TABLE x(path TEXT, name TEXT, size INTEGER, mtime REAL, md5 BLOB, \
                  content BLOB, error TEXT, directory HIDDEN, pattern HIDDEN)",
            ),
            FilesTab {
                base: ffi::sqlite3_vtab::default(),
                names: aux.cloned().unwrap_or_default(),
            },
        ))
    }

    fn best_index(&self, info: &mut IndexInfo) -> rusqlite::Result<bool> {
        Ok(super::tvf_args::bind(info, &ARGUMENTS, 1).is_some())
    }

    fn open(&'vtab mut self) -> rusqlite::Result<FilesCursor<'vtab>> {
        Ok(FilesCursor {
            base: ffi::sqlite3_vtab_cursor::default(),
            tab: self,
            walk: None,
            current: None,
            read: RefCell::new(None),
            policy: Arc::default(),
            args: Vec::new(),
            rowid: 0,
            phantom: PhantomData,
        })
    }
}

/// One listed entry.
struct Entry {
    path: String,
    name: String,
    /// (size, mtime) or why the entry cannot be used.
    meta: Result<(u64, f64), String>,
}

/// The walk of one call.
struct Walk {
    root: PathBuf,
    /// The directory as the caller wrote it, joined with names to make `path`.
    shown: String,
    matcher: globset::GlobMatcher,
    iter: walkdir::IntoIter,
}

#[repr(C)]
pub struct FilesCursor<'vtab> {
    base: ffi::sqlite3_vtab_cursor,
    tab: &'vtab FilesTab,
    walk: Option<Walk>,
    current: Option<Entry>,
    /// The current entry's bytes, read on the first request for md5 or content.
    read: RefCell<Option<Result<Vec<u8>, String>>>,
    policy: Arc<Policy>,
    args: Vec<Value>,
    rowid: i64,
    phantom: PhantomData<&'vtab FilesTab>,
}

impl FilesCursor<'_> {
    /// Moves to the next matching entry (or the end).
    fn advance(&mut self) {
        *self.read.borrow_mut() = None;
        self.current = None;
        let Some(walk) = self.walk.as_mut() else {
            return;
        };
        for item in walk.iter.by_ref() {
            let entry = match item {
                Ok(e) => e,
                Err(e) => {
                    // An unreadable directory or entry: reported by name, the walk goes on.
                    let rel = e
                        .path()
                        .and_then(|p| p.strip_prefix(&walk.root).ok())
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    self.current = Some(Entry {
                        path: join(&walk.shown, &rel),
                        name: rel,
                        meta: Err(format!("cannot read: {e}")),
                    });
                    break;
                }
            };
            if entry.file_type().is_dir() {
                continue;
            }
            let Ok(rel) = entry.path().strip_prefix(&walk.root) else {
                continue;
            };
            if !walk.matcher.is_match(rel) {
                continue;
            }
            let name = rel.to_string_lossy().into_owned();
            let path = join(&walk.shown, &name);
            let meta = if entry.file_type().is_symlink() {
                // Followed only where the policy would read the target.
                self.policy
                    .check_readable(&path)
                    .and_then(|()| std::fs::metadata(entry.path()).map_err(|e| e.to_string()))
            } else {
                entry.metadata().map_err(|e| e.to_string())
            }
            .and_then(|m| {
                if !m.is_file() {
                    return Err("not a regular file".to_owned());
                }
                // Unreadable files are reported here, by name, not when their bytes are asked.
                std::fs::File::open(entry.path()).map_err(|e| format!("cannot read: {e}"))?;
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0.0, |d| d.as_secs_f64());
                Ok((m.len(), mtime))
            });
            self.current = Some(Entry { path, name, meta });
            break;
        }
    }

    /// The current entry's bytes (read once).
    fn bytes(&self) -> std::cell::Ref<'_, Option<Result<Vec<u8>, String>>> {
        if self.read.borrow().is_none() {
            let bytes = match &self.current {
                Some(e) if e.meta.is_ok() => self.policy.read_image_file(&e.path, MAX_BYTES),
                _ => Err(String::new()),
            };
            *self.read.borrow_mut() = Some(bytes);
        }
        self.read.borrow()
    }
}

fn join(dir: &str, name: &str) -> String {
    if name.is_empty() {
        dir.to_owned()
    } else if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

unsafe impl VTabCursor for FilesCursor<'_> {
    fn filter(
        &mut self,
        idx_num: c_int,
        _idx_str: Option<&str>,
        args: &Filters<'_>,
    ) -> rusqlite::Result<()> {
        guard(NAME, || {
            let values = super::tvf_args::values(idx_num, args, ARGUMENTS.len());
            self.args = values
                .iter()
                .map(|v| {
                    v.and_then(|v| Value::try_from(v).ok())
                        .unwrap_or(Value::Null)
                })
                .collect();
            let text = |i: usize, what: &str| match values[i] {
                Some(ValueRef::Text(t)) if !t.is_empty() => {
                    Ok(Some(String::from_utf8_lossy(t).into_owned()))
                }
                None | Some(ValueRef::Null) => Ok(None),
                Some(other) => Err(arg_error(
                    NAME,
                    i,
                    format!("expected {what}, found {}", type_name(other)),
                )),
            };
            let dir = text(0, "a directory path")?.ok_or_else(|| {
                fn_error(
                    NAME,
                    "missing 1st argument; call it as clip_files('directory' [, 'pattern'])",
                )
            })?;
            let pattern = text(1, "a glob pattern like '*.jpg' or '**/*.jpg'")?
                .unwrap_or_else(|| "*".to_owned());
            let matcher = globset::GlobBuilder::new(&pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| arg_error(NAME, 1, format!("not a valid glob: {}", e.kind())))?
                .compile_matcher();
            self.policy = super::clip_fns::policy(&self.tab.names);
            let root = self
                .policy
                .check_directory(&dir)
                .map_err(|e| arg_error(NAME, 0, e))?;
            let depth = if pattern.contains('/') { usize::MAX } else { 1 };
            let iter = walkdir::WalkDir::new(&root)
                .min_depth(1)
                .max_depth(depth)
                .sort_by_file_name()
                .into_iter();
            self.walk = Some(Walk {
                root,
                shown: dir,
                matcher,
                iter,
            });
            self.rowid = 0;
            self.advance();
            Ok(())
        })
    }

    fn next(&mut self) -> rusqlite::Result<()> {
        self.rowid += 1;
        self.advance();
        Ok(())
    }

    fn eof(&self) -> bool {
        self.current.is_none()
    }

    fn column(&self, ctx: &mut Context, i: c_int) -> rusqlite::Result<()> {
        let Some(e) = &self.current else {
            return ctx.set_result(&Value::Null);
        };
        let ok = e.meta.as_ref().ok();
        match i {
            COL_PATH => ctx.set_result(&e.path),
            COL_NAME => ctx.set_result(&e.name),
            COL_SIZE => ctx.set_result(&ok.map(|m| m.0 as i64)),
            COL_MTIME => ctx.set_result(&ok.map(|m| m.1)),
            COL_MD5 | COL_CONTENT if ok.is_none() => ctx.set_result(&Value::Null),
            COL_MD5 => match &*self.bytes() {
                Some(Ok(b)) => ctx.set_result(&Md5::digest(b).to_vec()),
                _ => ctx.set_result(&Value::Null),
            },
            COL_CONTENT => match &*self.bytes() {
                Some(Ok(b)) => ctx.set_result(b),
                _ => ctx.set_result(&Value::Null),
            },
            COL_ERROR => match &e.meta {
                Err(msg) => ctx.set_result(msg),
                // Listed fine, but its bytes were asked for and failed (it changed, or is over
                // the size limit).
                Ok(_) => match &*self.read.borrow() {
                    Some(Err(msg)) if !msg.is_empty() => ctx.set_result(msg),
                    _ => ctx.set_result(&Value::Null),
                },
            },
            _ => {
                let slot = ARGUMENTS.iter().position(|&c| c == i);
                ctx.set_result(
                    &slot
                        .and_then(|s| self.args.get(s))
                        .cloned()
                        .unwrap_or(Value::Null),
                )
            }
        }
    }

    fn rowid(&self) -> rusqlite::Result<i64> {
        Ok(self.rowid)
    }
}
