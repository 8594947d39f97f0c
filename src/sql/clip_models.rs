//! `temp.clip_models(name, path, precision)`: the connection's model names, as sqlite-lembed
//! registers models. `INSERT INTO temp.clip_models(name, path) VALUES ('archaeclip',
//! 'models/archaeclip')` names a model directory; nothing is loaded until a function uses it.
//! `precision` (optional) is 'fp32' (the default: transformers' arithmetic) or 'bf16' (the
//! encoders' products in bfloat16, 1.3-1.5x as fast on CPUs with AVX512_BF16). The table lives in the
//! connection's temp schema (it is created by the extension's init), so it works on read-only
//! databases and never touches the database file.

use std::borrow::Cow;
use std::ffi::{c_int, CStr};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rusqlite::ffi;
use rusqlite::types::ValueRef;
use rusqlite::vtab::{
    Context, CreateVTab, Filters, IndexInfo, Inserts, Module, UpdateVTab, Updates, VTab,
    VTabConnection, VTabCursor, VTabKind,
};
use rusqlite::Connection;

use super::policy::Policy;
use super::sql_error;
use crate::clip::Precision;

/// A named model directory.
#[derive(Debug, Clone)]
pub struct ModelName {
    pub rowid: i64,
    pub name: String,
    pub path: PathBuf,
    pub precision: Precision,
}

/// The names registered on one connection, and the connection's policy (which bounds the
/// directories names may point to; see `policy.rs`).
#[derive(Debug, Default)]
pub struct ModelNames {
    entries: Vec<ModelName>,
    next_rowid: i64,
    /// Shared, so calls take a cheap copy; `archaeclip_restrict` replaces it.
    pub policy: Arc<Policy>,
}

/// Shared between the tables and the functions of one connection.
pub type SharedNames = Arc<Mutex<ModelNames>>;

/// The environment variable naming the default model directory.
pub const DEFAULT_MODEL_ENV: &str = "ARCHAECLIP_MODEL";

/// The environment variable naming the default model's precision (`fp32` when unset): a web
/// host, which cannot `INSERT` into `temp.clip_models`, chooses bf16 with it.
pub const DEFAULT_PRECISION_ENV: &str = "ARCHAECLIP_PRECISION";

/// The default model's precision from [`DEFAULT_PRECISION_ENV`].
fn default_precision() -> Result<Precision, String> {
    match std::env::var(DEFAULT_PRECISION_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(Precision::F32),
        Ok(v) if v.is_empty() => Ok(Precision::F32),
        Ok(v) => Precision::parse(&v).map_err(|e| format!("{DEFAULT_PRECISION_ENV} {e}")),
        Err(e) => Err(format!("{DEFAULT_PRECISION_ENV}: {e}")),
    }
}

impl ModelNames {
    pub fn new(policy: Policy) -> ModelNames {
        ModelNames {
            policy: Arc::new(policy),
            ..ModelNames::default()
        }
    }

    /// The directory for `name` and its precision, if the policy allows it (see
    /// [`Self::resolve_any`]).
    pub fn resolve(&self, name: Option<&str>) -> Result<(String, PathBuf, Precision), String> {
        let (name, path, precision) = self.resolve_any(name)?;
        self.policy.check_model_dir(&path)?;
        Ok((name, path, precision))
    }

    /// The directory for `name`, or for the default model when `name` is None: the model named
    /// 'default', else the only registered model, else $ARCHAECLIP_MODEL (at
    /// $ARCHAECLIP_PRECISION).
    fn resolve_any(&self, name: Option<&str>) -> Result<(String, PathBuf, Precision), String> {
        let entry = |e: &ModelName| (e.name.clone(), e.path.clone(), e.precision);
        if let Some(name) = name {
            return self
                .entries
                .iter()
                .find(|e| e.name == name)
                .map(entry)
                .ok_or_else(|| {
                    let known: Vec<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
                    format!(
                        "unknown model '{name}' (registered: {}); register it with \
                         INSERT INTO temp.clip_models(name, path) VALUES ('{name}', 'path/to/model')",
                        if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                    )
                });
        }
        if let Some(e) = self.entries.iter().find(|e| e.name == "default") {
            return Ok(entry(e));
        }
        if let [only] = self.entries.as_slice() {
            return Ok(entry(only));
        }
        match std::env::var_os(DEFAULT_MODEL_ENV) {
            Some(p) if !p.is_empty() => {
                Ok(("default".to_owned(), PathBuf::from(p), default_precision()?))
            }
            _ => Err(if self.entries.is_empty() {
                format!(
                    "no model: register one with INSERT INTO temp.clip_models(name, path) \
                     VALUES ('name', 'path/to/model'), or set {DEFAULT_MODEL_ENV}"
                )
            } else {
                "several models are registered and none is named 'default': pass the model name"
                    .to_owned()
            }),
        }
    }

    /// Registers a training run's output under `name`, unless the name is taken by another
    /// directory. Returns whether `name` now names `path`.
    pub fn register_output(&mut self, name: &str, path: PathBuf) -> bool {
        match self.entries.iter().find(|e| e.name == name) {
            Some(e) => e.path == path,
            None => self.insert(name.to_owned(), path, Precision::F32).is_ok(),
        }
    }

    fn insert(
        &mut self,
        name: String,
        path: PathBuf,
        precision: Precision,
    ) -> rusqlite::Result<i64> {
        if self.entries.iter().any(|e| e.name == name) {
            return Err(sql_error(format!(
                "clip_models: a model named '{name}' is already registered"
            )));
        }
        self.next_rowid += 1;
        self.entries.push(ModelName {
            rowid: self.next_rowid,
            name,
            path,
            precision,
        });
        Ok(self.next_rowid)
    }
}

const MODULE_NAME: &CStr = c"clip_models";

/// Registers the module and creates `temp.clip_models` on the connection.
pub fn load_module(conn: &Connection, names: SharedNames) -> rusqlite::Result<()> {
    const MODULE: Module<ModelsTab> = Module::update_module();
    conn.create_module(MODULE_NAME, &MODULE, Some(names))?;
    // A `query_only` connection (Datasette opens its in-memory databases so) refuses even this
    // write to the connection's own temp schema: lift it for this one statement, then restore.
    let query_only: i64 = conn.pragma_query_value(None, "query_only", |r| r.get(0))?;
    if query_only != 0 {
        conn.pragma_update(None, "query_only", 0)?;
    }
    let created =
        conn.execute_batch("CREATE VIRTUAL TABLE IF NOT EXISTS temp.clip_models USING clip_models");
    if query_only != 0 {
        conn.pragma_update(None, "query_only", query_only)?;
    }
    created
}

#[repr(C)]
pub struct ModelsTab {
    base: ffi::sqlite3_vtab,
    names: SharedNames,
}

fn nth<'a>(args: &'a rusqlite::vtab::Values<'a>, i: usize) -> ValueRef<'a> {
    args.iter().nth(i).unwrap_or(ValueRef::Null)
}

fn text_arg(v: ValueRef<'_>, column: &str) -> rusqlite::Result<String> {
    match v {
        ValueRef::Text(t) if !t.is_empty() => Ok(String::from_utf8_lossy(t).into_owned()),
        other => Err(sql_error(format!(
            "clip_models: {column} must be non-empty text, found {}",
            super::type_name(other)
        ))),
    }
}

/// The `precision` column: NULL is fp32.
fn precision_arg(v: ValueRef<'_>) -> rusqlite::Result<Precision> {
    match v {
        ValueRef::Null => Ok(Precision::F32),
        ValueRef::Text(t) => {
            let t = String::from_utf8_lossy(t);
            Precision::parse(&t).map_err(|e| sql_error(format!("clip_models: precision {e}")))
        }
        other => Err(sql_error(format!(
            "clip_models: precision must be 'fp32' or 'bf16', found {}",
            super::type_name(other)
        ))),
    }
}

fn checked_path(path: String, policy: &Policy) -> rusqlite::Result<PathBuf> {
    let p = PathBuf::from(&path);
    policy
        .check_model_dir(&p)
        .map_err(|e| sql_error(format!("clip_models: {e}")))?;
    if !p.is_dir() {
        return Err(sql_error(format!(
            "clip_models: path '{path}' is not a directory (a model is a directory with config.json and weights)"
        )));
    }
    Ok(p)
}

unsafe impl<'vtab> VTab<'vtab> for ModelsTab {
    type Aux = SharedNames;
    type Cursor = ModelsCursor<'vtab>;

    fn connect(
        _db: &mut VTabConnection,
        aux: Option<&SharedNames>,
        _module_name: &[u8],
        _database_name: &[u8],
        _table_name: &[u8],
        _args: &[&[u8]],
    ) -> rusqlite::Result<(Cow<'static, CStr>, Self)> {
        let names = aux.cloned().unwrap_or_default();
        Ok((
            Cow::Borrowed(c"CREATE TABLE x(name TEXT, path TEXT, precision TEXT)"),
            ModelsTab {
                base: ffi::sqlite3_vtab::default(),
                names,
            },
        ))
    }

    fn best_index(&self, info: &mut IndexInfo) -> rusqlite::Result<bool> {
        info.set_estimated_cost(10.0);
        Ok(true)
    }

    fn open(&'vtab mut self) -> rusqlite::Result<ModelsCursor<'vtab>> {
        Ok(ModelsCursor {
            base: ffi::sqlite3_vtab_cursor::default(),
            rows: Vec::new(),
            pos: 0,
            phantom: PhantomData,
        })
    }
}

impl CreateVTab<'_> for ModelsTab {
    const KIND: VTabKind = VTabKind::Default;
}

impl UpdateVTab<'_> for ModelsTab {
    fn delete(&mut self, arg: ValueRef<'_>) -> rusqlite::Result<()> {
        let rowid = arg.as_i64()?;
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .retain(|e| e.rowid != rowid);
        Ok(())
    }

    fn insert(&mut self, args: &Inserts<'_>) -> rusqlite::Result<i64> {
        let name = text_arg(nth(args, 2), "name")?;
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let path = checked_path(text_arg(nth(args, 3), "path")?, &names.policy)?;
        let precision = precision_arg(nth(args, 4))?;
        names.insert(name, path, precision)
    }

    fn update(&mut self, args: &Updates<'_>) -> rusqlite::Result<()> {
        let rowid = args.get::<i64>(0)?;
        let name = text_arg(nth(args, 2), "name")?;
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let path = checked_path(text_arg(nth(args, 3), "path")?, &names.policy)?;
        let precision = precision_arg(nth(args, 4))?;
        if names
            .entries
            .iter()
            .any(|e| e.name == name && e.rowid != rowid)
        {
            return Err(sql_error(format!(
                "clip_models: a model named '{name}' is already registered"
            )));
        }
        if let Some(e) = names.entries.iter_mut().find(|e| e.rowid == rowid) {
            e.name = name;
            e.path = path;
            e.precision = precision;
        }
        Ok(())
    }
}

#[repr(C)]
pub struct ModelsCursor<'vtab> {
    base: ffi::sqlite3_vtab_cursor,
    rows: Vec<ModelName>,
    pos: usize,
    phantom: PhantomData<&'vtab ModelsTab>,
}

unsafe impl VTabCursor for ModelsCursor<'_> {
    fn filter(
        &mut self,
        _idx_num: c_int,
        _idx_str: Option<&str>,
        _args: &Filters<'_>,
    ) -> rusqlite::Result<()> {
        let tab = unsafe { &*(self.base.pVtab as *const ModelsTab) };
        self.rows = tab
            .names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .clone();
        self.pos = 0;
        Ok(())
    }

    fn next(&mut self) -> rusqlite::Result<()> {
        self.pos += 1;
        Ok(())
    }

    fn eof(&self) -> bool {
        self.pos >= self.rows.len()
    }

    fn column(&self, ctx: &mut Context, i: c_int) -> rusqlite::Result<()> {
        let row = &self.rows[self.pos];
        match i {
            0 => ctx.set_result(&row.name),
            1 => ctx.set_result(&row.path.display().to_string()),
            _ => ctx.set_result(&row.precision.name()),
        }
    }

    fn rowid(&self) -> rusqlite::Result<i64> {
        Ok(self.rows[self.pos].rowid)
    }
}
