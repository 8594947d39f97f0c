//! `clip_embed_images(statement [, model [, options]])` and `clip_embed_texts(...)`: embed every
//! row a SELECT yields, in batches, for `INSERT INTO ... SELECT`:
//!
//! ```sql
//! INSERT INTO embeddings(id, embedding)
//!   SELECT id, embedding FROM clip_embed_images('SELECT id, image FROM photos', 'openai')
//!   WHERE error IS NULL;
//! ```
//! The statement's first column is any id, the second an image (BLOB bytes or TEXT path) or a
//! text. Output columns: `id`, `embedding` (a unit float32 vector, NULL if the row failed) and
//! `error` (why the row failed, NULL otherwise): a bad row is reported by its id and skipped,
//! never aborting a long run. Rows are read lazily, `batch_size` at a time (default 32): images
//! of a batch are decoded and preprocessed in parallel and go through the model together.
//! `options` is JSON: `{"batch_size": 64, "progress": true}` (progress lines on stderr).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ffi::{c_int, CStr};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use rusqlite::ffi;
use rusqlite::types::{Value, ValueRef};
use rusqlite::vtab::{
    Context, Filters, IndexInfo, Module, VTab, VTabConfig, VTabConnection, VTabCursor,
};
use rusqlite::Connection;

use super::clip_models::SharedNames;
use super::policy::Policy;
use super::statement::Select;
use super::{arg_error, fn_error, guard, type_name};
use crate::clip::load::LoadedModel;
use crate::clip::registry;
use crate::vector::codec::f32_to_blob;

/// Largest batch accepted (a batch's pixels are held in memory: 256 x 3 x 336 x 336 floats is
/// 350 MB at the largest CLIP resolution).
pub const MAX_BATCH: usize = super::policy::Limits::TRUSTED.max_batch;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Images,
    Texts,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Images => "clip_embed_images",
            Kind::Texts => "clip_embed_texts",
        }
    }
}

pub struct Aux {
    kind: Kind,
    names: SharedNames,
}

/// Registers both functions on a connection.
pub fn load_modules(conn: &Connection, names: SharedNames) -> rusqlite::Result<()> {
    const MODULE: Module<BatchTab> = Module::eponymous_only_module();
    conn.create_module(
        c"clip_embed_images",
        &MODULE,
        Some(Aux {
            kind: Kind::Images,
            names: names.clone(),
        }),
    )?;
    conn.create_module(
        c"clip_embed_texts",
        &MODULE,
        Some(Aux {
            kind: Kind::Texts,
            names,
        }),
    )
}

const COL_ID: c_int = 0;
const COL_EMBEDDING: c_int = 1;
const COL_ERROR: c_int = 2;
const ARGUMENTS: [c_int; 3] = [3, 4, 5];

#[repr(C)]
pub struct BatchTab {
    base: ffi::sqlite3_vtab,
    db: *mut ffi::sqlite3,
    kind: Kind,
    names: SharedNames,
}

unsafe impl<'vtab> VTab<'vtab> for BatchTab {
    type Aux = Aux;
    type Cursor = BatchCursor<'vtab>;

    fn connect(
        db: &mut VTabConnection,
        aux: Option<&Aux>,
        _module_name: &[u8],
        _database_name: &[u8],
        _table_name: &[u8],
        _args: &[&[u8]],
    ) -> rusqlite::Result<(Cow<'static, CStr>, Self)> {
        // It runs SQL text, reads files and loads models: never from a view or trigger.
        db.config(VTabConfig::DirectOnly)?;
        let aux = aux
            .ok_or_else(|| super::sql_error("clip_embed_*: module registered without its data"))?;
        Ok((
            Cow::Borrowed(c"CREATE TABLE x(id, embedding BLOB, error TEXT, statement HIDDEN, model HIDDEN, options HIDDEN)"),
            BatchTab { base: ffi::sqlite3_vtab::default(), db: unsafe { db.handle() }, kind: aux.kind, names: aux.names.clone() },
        ))
    }

    fn best_index(&self, info: &mut IndexInfo) -> rusqlite::Result<bool> {
        Ok(super::tvf_args::bind(info, &ARGUMENTS, 1).is_some())
    }

    fn open(&'vtab mut self) -> rusqlite::Result<BatchCursor<'vtab>> {
        Ok(BatchCursor {
            base: ffi::sqlite3_vtab_cursor::default(),
            tab: self,
            select: None,
            model: None,
            batch_size: 32,
            progress: false,
            policy: Arc::default(),
            buffer: VecDeque::new(),
            current: None,
            done: true,
            rows: 0,
            errors: 0,
            started: Instant::now(),
            phantom: PhantomData,
        })
    }
}

/// One output row.
struct Row {
    id: Value,
    embedding: Option<Vec<f32>>,
    error: Option<String>,
}

/// One input row, read from the statement.
struct Input {
    id: Value,
    value: Result<InputValue, String>,
}

enum InputValue {
    Bytes(Vec<u8>),
    Path(String),
    Text(String),
}

#[repr(C)]
pub struct BatchCursor<'vtab> {
    base: ffi::sqlite3_vtab_cursor,
    tab: &'vtab BatchTab,
    select: Option<Select>,
    model: Option<Arc<LoadedModel>>,
    batch_size: usize,
    progress: bool,
    /// The connection's policy when the call started (file roots, limits).
    policy: Arc<Policy>,
    buffer: VecDeque<Row>,
    current: Option<Row>,
    done: bool,
    rows: u64,
    errors: u64,
    started: Instant,
    phantom: PhantomData<&'vtab BatchTab>,
}

impl BatchCursor<'_> {
    fn name(&self) -> &'static str {
        self.tab.kind.name()
    }

    /// Reads up to batch_size rows from the statement.
    fn read_batch(&mut self) -> rusqlite::Result<Vec<Input>> {
        let mut batch = Vec::with_capacity(self.batch_size);
        while batch.len() < self.batch_size && !self.done {
            let Some(select) = self.select.as_mut() else {
                self.done = true;
                break;
            };
            match select.step() {
                Ok(true) => batch.push(read_row(self.tab.kind, select)),
                Ok(false) => {
                    self.done = true;
                    self.select = None;
                }
                Err((_, msg)) => {
                    self.done = true;
                    self.select = None;
                    return Err(fn_error(
                        self.name(),
                        format!("the statement failed: {msg}"),
                    ));
                }
            }
        }
        Ok(batch)
    }
}

fn read_row(kind: Kind, select: &Select) -> Input {
    {
        let value_ref = |i: c_int| select.column(i);
        let id = Value::try_from(value_ref(0)).unwrap_or(Value::Null);
        let value = match (kind, value_ref(1)) {
            (Kind::Images, ValueRef::Blob(b)) => Ok(InputValue::Bytes(b.to_vec())),
            (Kind::Images, ValueRef::Text(t)) => {
                Ok(InputValue::Path(String::from_utf8_lossy(t).into_owned()))
            }
            (Kind::Texts, ValueRef::Text(t)) if !t.is_empty() => {
                Ok(InputValue::Text(String::from_utf8_lossy(t).into_owned()))
            }
            (Kind::Texts, ValueRef::Text(_)) => Err("empty text".to_owned()),
            (Kind::Images, other) => Err(format!(
                "expected image bytes (BLOB) or a path (TEXT), found {}",
                type_name(other)
            )),
            (Kind::Texts, other) => Err(format!("expected text, found {}", type_name(other))),
        };
        Input { id, value }
    }
}

impl BatchCursor<'_> {
    /// Embeds a batch; failures become rows with an error.
    fn process(&self, batch: Vec<Input>) -> Vec<Row> {
        let model = self.model.as_ref().expect("the model is loaded in filter");
        let policy = &self.policy;
        match self.tab.kind {
            Kind::Texts => batch
                .into_par_iter()
                .map(|input| {
                    let result = input.value.and_then(|v| match v {
                        InputValue::Text(t) => {
                            policy.check_text(&t)?;
                            model.embed_text(&t).map_err(|e| e.to_string())
                        }
                        _ => Err("expected text".to_owned()),
                    });
                    row(input.id, result)
                })
                .collect(),
            Kind::Images => {
                let prepared: Vec<(Value, Result<Vec<f32>, String>)> = batch
                    .into_par_iter()
                    .map(|input| {
                        let pixels = input.value.and_then(|v| {
                            let bytes = match v {
                                InputValue::Bytes(b) => b,
                                InputValue::Path(p) => policy
                                    .read_image_file(&p, crate::clip::preprocess::MAX_BYTES)?,
                                InputValue::Text(_) => return Err("expected an image".to_owned()),
                            };
                            model.pixels(&bytes).map_err(|e| e.to_string())
                        });
                        (input.id, pixels)
                    })
                    .collect();
                let ok: Vec<Vec<f32>> = prepared
                    .iter()
                    .filter_map(|(_, p)| p.as_ref().ok().cloned())
                    .collect();
                let mut embedded = match model.embed_pixels(&ok) {
                    Ok(e) => e.into_iter().map(Ok).collect::<Vec<_>>(),
                    Err(e) => vec![Err(e.to_string()); ok.len()],
                }
                .into_iter();
                prepared
                    .into_iter()
                    .map(|(id, p)| match p {
                        Ok(_) => row(
                            id,
                            embedded
                                .next()
                                .unwrap_or_else(|| Err("missing result".into())),
                        ),
                        Err(e) => row(id, Err(e)),
                    })
                    .collect()
            }
        }
    }

    fn refill(&mut self) -> rusqlite::Result<()> {
        while self.buffer.is_empty() && !self.done {
            let batch = self.read_batch()?;
            if batch.is_empty() {
                break;
            }
            let rows = self.process(batch);
            self.rows += rows.len() as u64;
            self.errors += rows.iter().filter(|r| r.error.is_some()).count() as u64;
            for r in rows.iter().filter(|r| r.error.is_some()) {
                if self.progress {
                    eprintln!(
                        "{}: row {}: {}",
                        self.name(),
                        describe_id(&r.id),
                        r.error.as_deref().unwrap_or("")
                    );
                }
            }
            if self.progress {
                let secs = self.started.elapsed().as_secs_f64();
                eprintln!(
                    "{}: {} rows ({} failed) in {:.1} s, {:.1} rows/s",
                    self.name(),
                    self.rows,
                    self.errors,
                    secs,
                    self.rows as f64 / secs.max(1e-9)
                );
            }
            self.buffer.extend(rows);
        }
        Ok(())
    }
}

fn describe_id(id: &Value) -> String {
    match id {
        Value::Integer(i) => i.to_string(),
        Value::Text(t) => format!("'{t}'"),
        Value::Real(r) => r.to_string(),
        Value::Null => "NULL".into(),
        Value::Blob(_) => "(blob)".into(),
    }
}

fn row(id: Value, result: Result<Vec<f32>, String>) -> Row {
    match result {
        Ok(v) => Row {
            id,
            embedding: Some(v),
            error: None,
        },
        Err(e) => Row {
            id,
            embedding: None,
            error: Some(e),
        },
    }
}

unsafe impl VTabCursor for BatchCursor<'_> {
    fn filter(
        &mut self,
        idx_num: c_int,
        _idx_str: Option<&str>,
        args: &Filters<'_>,
    ) -> rusqlite::Result<()> {
        let name = self.name();
        guard(name, || {
            let values = super::tvf_args::values(idx_num, args, ARGUMENTS.len());
            let statement = match values[0] {
                Some(ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
                Some(other) => return Err(arg_error(name, 0, format!("expected the text of a SELECT statement, found {}", type_name(other)))),
                None => return Err(fn_error(name, format!("missing 1st argument; call it as {name}('SELECT id, value FROM ...' [, model [, options]])"))),
            };
            let model_name = match values[1] {
                None | Some(ValueRef::Null) => None,
                Some(ValueRef::Text(t)) => Some(String::from_utf8_lossy(t).into_owned()),
                Some(other) => {
                    return Err(arg_error(
                        name,
                        1,
                        format!("expected a model name, found {}", type_name(other)),
                    ))
                }
            };
            self.policy = super::clip_fns::policy(&self.tab.names);
            let max_batch = self.policy.limits.max_batch;
            self.batch_size = max_batch.min(32);
            self.progress = false;
            match values[2] {
                None | Some(ValueRef::Null) => {}
                Some(ValueRef::Text(t)) => {
                    let json: serde_json::Value = serde_json::from_slice(t).map_err(|e| {
                        arg_error(name, 2, format!("options must be a JSON object: {e}"))
                    })?;
                    let obj = json
                        .as_object()
                        .ok_or_else(|| arg_error(name, 2, "options must be a JSON object"))?;
                    for (k, v) in obj {
                        match (k.as_str(), v) {
                            ("batch_size", serde_json::Value::Number(n)) => match n.as_u64() {
                                Some(b) if (1..=max_batch as u64).contains(&b) => {
                                    self.batch_size = b as usize
                                }
                                _ => {
                                    return Err(arg_error(
                                        name,
                                        2,
                                        format!("batch_size must be between 1 and {max_batch}"),
                                    ))
                                }
                            },
                            ("progress", serde_json::Value::Bool(b)) => self.progress = *b,
                            (other, _) => {
                                return Err(arg_error(
                                    name,
                                    2,
                                    format!("unknown option '{other}' (batch_size, progress)"),
                                ))
                            }
                        }
                    }
                }
                Some(other) => {
                    return Err(arg_error(
                        name,
                        2,
                        format!("options must be JSON text, found {}", type_name(other)),
                    ))
                }
            }
            let resolved = self
                .tab
                .names
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .resolve(model_name.as_deref());
            let (model_label, path, precision) = resolved.map_err(|e| arg_error(name, 1, e))?;
            self.model = Some(
                registry::get_in(&path, precision)
                    .map_err(|e| fn_error(name, format!("model '{model_label}': {e}")))?,
            );

            self.select = None;
            self.select = Some(Select::prepare(
                self.tab.db,
                &statement,
                name,
                0,
                2,
                "(id, value)",
            )?);
            self.done = false;
            self.buffer.clear();
            self.rows = 0;
            self.errors = 0;
            self.started = Instant::now();
            self.refill()?;
            self.current = self.buffer.pop_front();
            Ok(())
        })
    }

    fn next(&mut self) -> rusqlite::Result<()> {
        let name = self.name();
        guard(name, || {
            self.refill()?;
            self.current = self.buffer.pop_front();
            Ok(())
        })
    }

    fn eof(&self) -> bool {
        self.current.is_none()
    }

    fn column(&self, ctx: &mut Context, i: c_int) -> rusqlite::Result<()> {
        let Some(row) = &self.current else {
            return ctx.set_result(&Value::Null);
        };
        match i {
            COL_ID => ctx.set_result(&row.id),
            COL_EMBEDDING => ctx.set_result(&row.embedding.as_ref().map(|v| f32_to_blob(v))),
            COL_ERROR => ctx.set_result(&row.error),
            _ => ctx.set_result(&Value::Null),
        }
    }

    fn rowid(&self) -> rusqlite::Result<i64> {
        Ok(self.rows as i64)
    }
}
