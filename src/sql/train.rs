//! `clip_train(model, statement, options)` and `clip_evaluate(model, statement [, options])`.
//!
//! ```sql
//! SELECT kind, epoch, step, loss, lr FROM clip_train('openai-base',
//!   'SELECT image, caption FROM training_pairs WHERE split = ''train''',
//!   json_object('output', 'models/archaeclip-v2', 'epochs', 25, 'batch_size', 64));
//! SELECT * FROM clip_evaluate('archaeclip-v2', 'SELECT image, caption FROM pairs WHERE split = ''test''');
//! ```
//! `clip_train` yields a row per optimizer step (`kind = 'train'`) plus `eval`, `checkpoint`,
//! `skipped` and `cache` rows; `clip_evaluate` a row per direction (text_to_image,
//! image_to_text) with recall@1/5/10 and the median and mean rank.
//!
//! Both read a statement's `image, caption` columns (image: BLOB bytes or TEXT path). Both are
//! DIRECTONLY (never from a view or trigger); training also refuses a read-only connection, and
//! SQLite's interrupt (Ctrl-C in the shell) stops it between steps after writing a checkpoint:
//! the rows produced so far are kept (the statement ends normally) and `'resume': true`
//! continues.

use std::borrow::Cow;
use std::ffi::{c_int, CStr};
use std::marker::PhantomData;

use std::sync::Arc;

use rusqlite::ffi;
use rusqlite::types::{Value, ValueRef};
use rusqlite::vtab::{
    Context, Filters, IndexInfo, Module, VTab, VTabConfig, VTabConnection, VTabCursor,
};
use rusqlite::Connection;

use super::clip_models::SharedNames;
use super::policy::Policy;
use super::statement::Select;
use super::{arg_error, fn_error, guard, sql_error, type_name};
use crate::clip::registry;
use crate::error::{Error, Result};
use crate::train::data::{PairSource, Preparer, RawPair, Stream};
use crate::train::evaluate::{recall, Recall};
use crate::train::options::TrainOptions;
use crate::train::trainer::{embed_stream, embed_texts, Event, Trainer};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Train,
    Evaluate,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Train => "clip_train",
            Kind::Evaluate => "clip_evaluate",
        }
    }
}

pub struct Aux {
    kind: Kind,
    names: SharedNames,
}

pub fn load_modules(conn: &Connection, names: SharedNames) -> rusqlite::Result<()> {
    const MODULE: Module<TrainTab> = Module::eponymous_only_module();
    conn.create_module(
        c"clip_train",
        &MODULE,
        Some(Aux {
            kind: Kind::Train,
            names: names.clone(),
        }),
    )?;
    conn.create_module(
        c"clip_evaluate",
        &MODULE,
        Some(Aux {
            kind: Kind::Evaluate,
            names,
        }),
    )
}

const TRAIN_SCHEMA: &CStr = c"CREATE TABLE x(kind TEXT, epoch INTEGER, step INTEGER, loss REAL, lr REAL, logit_scale REAL, examples INTEGER, examples_per_s REAL, elapsed_s REAL, detail TEXT, model HIDDEN, statement HIDDEN, options HIDDEN)";
const EVAL_SCHEMA: &CStr = c"CREATE TABLE x(direction TEXT, pairs INTEGER, recall_at_1 REAL, recall_at_5 REAL, recall_at_10 REAL, median_rank REAL, mean_rank REAL, model HIDDEN, statement HIDDEN, options HIDDEN)";

#[repr(C)]
pub struct TrainTab {
    base: ffi::sqlite3_vtab,
    db: *mut ffi::sqlite3,
    kind: Kind,
    names: SharedNames,
}

impl TrainTab {
    fn arguments(&self) -> [c_int; 3] {
        match self.kind {
            Kind::Train => [10, 11, 12],
            Kind::Evaluate => [7, 8, 9],
        }
    }
}

unsafe impl<'vtab> VTab<'vtab> for TrainTab {
    type Aux = Aux;
    type Cursor = TrainCursor<'vtab>;

    fn connect(
        db: &mut VTabConnection,
        aux: Option<&Aux>,
        _module_name: &[u8],
        _database_name: &[u8],
        _table_name: &[u8],
        _args: &[&[u8]],
    ) -> rusqlite::Result<(Cow<'static, CStr>, Self)> {
        // They run SQL text, read files, load models, write model directories and run long:
        // never from a view or trigger.
        db.config(VTabConfig::DirectOnly)?;
        let aux = aux.ok_or_else(|| sql_error("clip_train: module registered without its data"))?;
        let schema = match aux.kind {
            Kind::Train => TRAIN_SCHEMA,
            Kind::Evaluate => EVAL_SCHEMA,
        };
        Ok((
            Cow::Borrowed(schema),
            TrainTab {
                base: ffi::sqlite3_vtab::default(),
                db: unsafe { db.handle() },
                kind: aux.kind,
                names: aux.names.clone(),
            },
        ))
    }

    fn best_index(&self, info: &mut IndexInfo) -> rusqlite::Result<bool> {
        Ok(super::tvf_args::bind(info, &self.arguments(), 2).is_some())
    }

    fn open(&'vtab mut self) -> rusqlite::Result<TrainCursor<'vtab>> {
        Ok(TrainCursor {
            base: ffi::sqlite3_vtab_cursor::default(),
            tab: self,
            trainer: None,
            source: None,
            current: None,
            results: Vec::new(),
            row: 0,
            phantom: PhantomData,
        })
    }
}

/// The pairs of the training and validation statements.
struct SqlSource {
    db: *mut ffi::sqlite3,
    train: (String, Option<Select>, u64),
    validation: Option<(String, Option<Select>, u64)>,
    probe: Option<Select>,
    /// The connection's policy (which directories image paths may name).
    policy: Arc<Policy>,
}

impl SqlSource {
    fn slot(&mut self, stream: Stream) -> Result<&mut (String, Option<Select>, u64)> {
        match stream {
            Stream::Train => Ok(&mut self.train),
            Stream::Validation => self
                .validation
                .as_mut()
                .ok_or_else(|| Error::Training("no validation statement".into())),
        }
    }

    fn prepare(&self, sql: &str, stream: Stream) -> Result<Select> {
        let what = match stream {
            Stream::Train => "the statement",
            Stream::Validation => "the 'validation' statement",
        };
        Select::try_prepare(self.db, sql, 2, "(image, caption)")
            .map_err(|e| Error::Training(format!("{what}: {e}")))
    }
}

impl PairSource for SqlSource {
    fn count(&mut self, stream: Stream) -> Result<u64> {
        // Wrapped, so SQLite counts without reading the images (the newline ends a trailing
        // `--` comment of the statement).
        let sql = self.slot(stream)?.0.clone();
        let inner = sql.trim().trim_end_matches(';');
        let mut select = Select::try_prepare(
            self.db,
            &format!("SELECT count(*) FROM ({inner}\n)"),
            1,
            "1",
        )
        .map_err(|e| Error::Training(format!("counting the statement's rows: {e}")))?;
        match select.step().map_err(step_error)? {
            true => match select.column(0) {
                ValueRef::Integer(n) => Ok(n.max(0) as u64),
                _ => Ok(0),
            },
            false => Ok(0),
        }
    }

    fn start(&mut self, stream: Stream) -> Result<()> {
        let sql = self.slot(stream)?.0.clone();
        let select = self.prepare(&sql, stream)?;
        let slot = self.slot(stream)?;
        slot.1 = Some(select);
        slot.2 = 0;
        Ok(())
    }

    fn next(&mut self, stream: Stream) -> Result<Option<RawPair>> {
        let policy = Arc::clone(&self.policy);
        let slot = self.slot(stream)?;
        let Some(select) = slot.1.as_mut() else {
            return Ok(None);
        };
        if !select.step().map_err(step_error)? {
            slot.1 = None;
            return Ok(None);
        }
        slot.2 += 1;
        let image = match select.column(0) {
            ValueRef::Blob([]) => Err("empty blob".to_owned()),
            ValueRef::Blob(b) => Ok(b.to_vec()),
            ValueRef::Text(t) => policy.read_image_file(
                &String::from_utf8_lossy(t),
                crate::clip::preprocess::MAX_BYTES,
            ),
            other => Err(format!(
                "expected image bytes (BLOB) or a path (TEXT), found {}",
                type_name(other)
            )),
        };
        let caption = match select.column(1) {
            ValueRef::Text(t) if !t.iter().all(u8::is_ascii_whitespace) => {
                Ok(String::from_utf8_lossy(t).into_owned())
            }
            ValueRef::Text(_) => Err("empty text".to_owned()),
            other => Err(format!("expected text, found {}", type_name(other))),
        };
        Ok(Some(RawPair {
            row: slot.2,
            image,
            caption,
        }))
    }

    fn interrupted(&mut self) -> bool {
        // sqlite3_is_interrupted() needs SQLite 3.41; a statement started while the
        // connection is interrupted fails with SQLITE_INTERRUPT on every version.
        if self.probe.is_none() {
            self.probe = Select::try_prepare(self.db, "SELECT 1", 1, "1").ok();
        }
        let Some(probe) = self.probe.as_mut() else {
            return false;
        };
        let r = probe.step();
        probe.reset();
        matches!(r, Err((rc, _)) if rc & 0xff == ffi::SQLITE_INTERRUPT)
    }
}

/// Training allocates and frees the same tensor sizes op after op. glibc's malloc returns each
/// large buffer to the kernel (mmap/munmap, trimming the heap top) and faults it back in on the
/// next op; a demo-model step spent over a third of its time in the kernel that way. So a
/// training run raises the process's mmap threshold to glibc's maximum (32 MiB) and its trim
/// threshold to 1 GiB: freed tensors stay in the heap. This changes the host process's malloc
/// settings for its lifetime (documented in the reference); training is only reachable from
/// trusted SQL.
fn tune_malloc_for_training() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only changes allocator parameters.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        });
    }
}

fn step_error((rc, msg): (c_int, String)) -> Error {
    if rc & 0xff == ffi::SQLITE_INTERRUPT {
        Error::Interrupted
    } else {
        Error::Training(format!("the statement failed: {msg}"))
    }
}

#[repr(C)]
pub struct TrainCursor<'vtab> {
    base: ffi::sqlite3_vtab_cursor,
    tab: &'vtab TrainTab,
    trainer: Option<Trainer>,
    source: Option<SqlSource>,
    current: Option<Event>,
    results: Vec<Recall>,
    row: usize,
    phantom: PhantomData<&'vtab TrainTab>,
}

fn text_value(
    v: Option<ValueRef<'_>>,
    func: &str,
    arg: usize,
    what: &str,
) -> rusqlite::Result<Option<String>> {
    match v {
        None | Some(ValueRef::Null) => Ok(None),
        Some(ValueRef::Text(t)) => Ok(Some(String::from_utf8_lossy(t).into_owned())),
        Some(other) => Err(arg_error(
            func,
            arg,
            format!("expected {what}, found {}", type_name(other)),
        )),
    }
}

/// A run stopped before its end (SQLite's interrupt aborting the statement, a LIMIT, a
/// closed cursor) keeps its progress: a checkpoint is written when the cursor closes.
impl Drop for TrainCursor<'_> {
    fn drop(&mut self) {
        let Some(mut trainer) = self.trainer.take() else {
            return;
        };
        if !trainer.needs_save() {
            return;
        }
        let saved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            trainer.save_after_interrupt()
        }));
        let name = self.tab.kind.name();
        match saved {
            Ok(Ok(())) => eprintln!(
                "{name}(): stopped at step {}; checkpoint written to {} (continue with 'resume': true)",
                trainer.step(),
                trainer.output().display()
            ),
            Ok(Err(e)) => eprintln!("{name}(): stopped, and the checkpoint could not be written: {e}"),
            Err(_) => eprintln!("{name}(): stopped, and writing the checkpoint panicked"),
        }
    }
}

impl TrainCursor<'_> {
    fn name(&self) -> &'static str {
        self.tab.kind.name()
    }

    /// The next training row; an interrupt saves a checkpoint and ends the rows.
    fn advance(&mut self) -> rusqlite::Result<()> {
        let name = self.name();
        let (Some(trainer), Some(source)) = (self.trainer.as_mut(), self.source.as_mut()) else {
            self.current = None;
            return Ok(());
        };
        match trainer.next_event(source) {
            Ok(e) => {
                if let Some(e) = &e {
                    if e.kind == "checkpoint" {
                        self.register_output();
                    }
                }
                self.current = e;
                Ok(())
            }
            Err(Error::Interrupted) => {
                let trainer = self.trainer.as_mut().expect("checked above");
                let saved = trainer.save_after_interrupt();
                self.current = None;
                self.trainer = None;
                match saved {
                    Ok(()) => {
                        eprintln!(
                            "{name}(): interrupted; checkpoint written, resume with 'resume': true"
                        );
                        Err(fn_error(name, "interrupted; a checkpoint was written to the output directory: continue with 'resume': true"))
                    }
                    Err(e) => Err(fn_error(
                        name,
                        format!("interrupted, and the checkpoint could not be written: {e}"),
                    )),
                }
            }
            Err(e) => {
                // The trainer stays: closing the cursor checkpoints the steps taken.
                self.current = None;
                Err(fn_error(name, e))
            }
        }
    }

    fn register_output(&mut self) {
        let Some(trainer) = &self.trainer else { return };
        let path = trainer.output().to_path_buf();
        let name = trainer
            .options_name()
            .or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()));
        if let Some(name) = name {
            let mut names = self.tab.names.lock().unwrap_or_else(|p| p.into_inner());
            names.register_output(&name, path);
        }
    }

    fn start(&mut self, values: &[Option<ValueRef<'_>>]) -> rusqlite::Result<()> {
        let name = self.name();
        let model_name = text_value(values[0], name, 0, "a model name")?
            .ok_or_else(|| fn_error(name, format!("missing 1st argument; call it as {name}(model, 'SELECT image, caption FROM ...'{})", if self.tab.kind == Kind::Train { ", json_object('output', 'dir', ...)" } else { "" })))?;
        let statement = text_value(values[1], name, 1, "the text of a SELECT statement")?
            .ok_or_else(|| fn_error(name, "missing 2nd argument: a SELECT of (image, caption)"))?;
        let options = text_value(values[2], name, 2, "JSON options")?;
        let policy = super::clip_fns::policy(&self.tab.names);
        match self.tab.kind {
            Kind::Train => policy.require_trusted("training"),
            Kind::Evaluate => {
                policy.require_trusted("evaluation (it runs for as long as its statement has rows)")
            }
        }
        .map_err(|e| fn_error(name, e))?;
        let resolved = self
            .tab
            .names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resolve(Some(&model_name));
        let (_, path, precision) = resolved.map_err(|e| arg_error(name, 0, e))?;
        let mut source = SqlSource {
            db: self.tab.db,
            train: (statement.clone(), None, 0),
            validation: None,
            probe: None,
            policy: policy.clone(),
        };
        // Validate the statement now, so a typo is reported against its argument.
        Select::prepare(self.tab.db, &statement, name, 1, 2, "(image, caption)")?;
        match self.tab.kind {
            Kind::Train => {
                // SAFETY: db is this connection.
                if unsafe { ffi::sqlite3_db_readonly(self.tab.db, c"main".as_ptr()) } == 1 {
                    return Err(fn_error(
                        name,
                        "refused on a read-only connection (training writes a model directory)",
                    ));
                }
                let options = TrainOptions::parse(options.as_deref().unwrap_or("{}"))
                    .map_err(|e| arg_error(name, 2, e))?;
                if let Some(output) = &options.output {
                    policy
                        .check_output_dir(std::path::Path::new(output))
                        .map_err(|e| arg_error(name, 2, format!("'output': {e}")))?;
                }
                if let Some(v) = &options.validation {
                    Select::try_prepare(self.tab.db, v, 2, "(image, caption)")
                        .map_err(|e| arg_error(name, 2, format!("'validation': {e}")))?;
                    source.validation = Some((v.clone(), None, 0));
                }
                tune_malloc_for_training();
                let trainer =
                    Trainer::new(&path, &statement, options, &mut source).map_err(|e| match e {
                        Error::Options(m) => arg_error(name, 2, m),
                        other => fn_error(name, other),
                    })?;
                self.trainer = Some(trainer);
                self.source = Some(source);
                self.advance()
            }
            Kind::Evaluate => {
                let mut batch_size = 32;
                if let Some(o) = options {
                    let json: serde_json::Value = serde_json::from_str(&o).map_err(|e| {
                        arg_error(name, 2, format!("options must be a JSON object: {e}"))
                    })?;
                    for (k, v) in json
                        .as_object()
                        .ok_or_else(|| arg_error(name, 2, "options must be a JSON object"))?
                    {
                        match (k.as_str(), v.as_u64()) {
                            ("batch_size", Some(b))
                                if (1..=super::embed_batch::MAX_BATCH as u64).contains(&b) =>
                            {
                                batch_size = b as usize
                            }
                            ("batch_size", _) => {
                                return Err(arg_error(
                                    name,
                                    2,
                                    format!(
                                        "'batch_size' must be between 1 and {}",
                                        super::embed_batch::MAX_BATCH
                                    ),
                                ))
                            }
                            (other, _) => {
                                return Err(arg_error(
                                    name,
                                    2,
                                    format!("unknown option '{other}' (batch_size)"),
                                ))
                            }
                        }
                    }
                }
                let model = registry::get_in(&path, precision)
                    .map_err(|e| fn_error(name, format!("model '{model_name}': {e}")))?;
                let preparer = Arc::new(Preparer {
                    tokenizer: Arc::new(model.tokenizer.clone()),
                    preprocess: Arc::new(model.preprocess.clone()),
                });
                source.start(Stream::Train).map_err(|e| fn_error(name, e))?;
                let mut run = || -> Result<Vec<Recall>> {
                    let (images, ids, skipped) = embed_stream(
                        &model.model,
                        &preparer,
                        &mut source,
                        Stream::Train,
                        batch_size,
                    )?;
                    for s in &skipped {
                        eprintln!("{name}(): row {}: {} (skipped)", s.row, s.error);
                    }
                    if images.len() < 2 {
                        return Err(Error::Training(format!(
                            "{} usable pair(s): evaluation needs at least 2",
                            images.len()
                        )));
                    }
                    let texts = embed_texts(&model.model, &ids, batch_size)?;
                    Ok(recall(&images, &texts).into())
                };
                self.results = run().map_err(|e| fn_error(name, e))?;
                self.row = 0;
                Ok(())
            }
        }
    }
}

unsafe impl VTabCursor for TrainCursor<'_> {
    fn filter(
        &mut self,
        idx_num: c_int,
        _idx_str: Option<&str>,
        args: &Filters<'_>,
    ) -> rusqlite::Result<()> {
        let name = self.name();
        guard(name, || {
            let values = super::tvf_args::values(idx_num, args, 3);
            self.trainer = None;
            self.results.clear();
            self.start(&values)
        })
    }

    fn next(&mut self) -> rusqlite::Result<()> {
        let name = self.name();
        guard(name, || match self.tab.kind {
            Kind::Train => self.advance(),
            Kind::Evaluate => {
                self.row += 1;
                Ok(())
            }
        })
    }

    fn eof(&self) -> bool {
        match self.tab.kind {
            Kind::Train => self.current.is_none(),
            Kind::Evaluate => self.row >= self.results.len(),
        }
    }

    fn column(&self, ctx: &mut Context, i: c_int) -> rusqlite::Result<()> {
        match self.tab.kind {
            Kind::Train => {
                let Some(e) = &self.current else {
                    return ctx.set_result(&Value::Null);
                };
                match i {
                    0 => ctx.set_result(&e.kind),
                    1 => ctx.set_result(&i64::from(e.epoch)),
                    2 => ctx.set_result(&(e.step as i64)),
                    3 => ctx.set_result(&e.loss),
                    4 => ctx.set_result(&e.lr),
                    5 => ctx.set_result(&e.logit_scale),
                    6 => ctx.set_result(&(e.examples as i64)),
                    7 => ctx.set_result(&e.examples_per_s),
                    8 => ctx.set_result(&e.elapsed_s),
                    9 => ctx.set_result(&e.detail.as_ref().map(|d| d.to_string())),
                    _ => ctx.set_result(&Value::Null),
                }
            }
            Kind::Evaluate => {
                let Some(r) = self.results.get(self.row) else {
                    return ctx.set_result(&Value::Null);
                };
                match i {
                    0 => ctx.set_result(&r.direction),
                    1 => ctx.set_result(&(r.pairs as i64)),
                    2 => ctx.set_result(&r.recall_at_1),
                    3 => ctx.set_result(&r.recall_at_5),
                    4 => ctx.set_result(&r.recall_at_10),
                    5 => ctx.set_result(&r.median_rank),
                    6 => ctx.set_result(&r.mean_rank),
                    _ => ctx.set_result(&Value::Null),
                }
            }
        }
    }

    fn rowid(&self) -> rusqlite::Result<i64> {
        Ok(self.row as i64)
    }
}
