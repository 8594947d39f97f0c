//! `clip_search(query, k, statement [, metric])`: an eponymous virtual table (a table-valued
//! function) returning the k nearest rows, among those a SELECT yields, to a query vector.
//!
//! ```sql
//! SELECT a.label, s.score
//! FROM clip_search(:q, 10, 'SELECT rowid, embedding FROM embeddings WHERE collection_id = 1') AS s
//! JOIN embeddings a ON a.rowid = s.rowid ORDER BY s.distance;
//! ```
//! The statement's first column is an integer id, its second a vector (float32 blob or JSON
//! text); its WHERE clause filters before k is applied. The first use of a statement streams its
//! rows through a fused top-k; the second (with the database unchanged) copies its vectors into a
//! contiguous buffer kept per connection until any write changes the database (see
//! [`crate::index::cache`]); later uses scan that copy in parallel
//! ([`crate::index::VectorSet::search`]).

use std::borrow::Cow;
use std::ffi::{c_int, CStr};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::ffi;
use rusqlite::types::{Value, ValueRef};
use rusqlite::vtab::{
    Context, Filters, IndexInfo, Module, VTab, VTabConfig, VTabConnection, VTabCursor,
};
use rusqlite::Connection;

use super::clip_models::SharedNames;
use super::policy::Limits;
use super::{arg_error, fn_error, guard, type_name};
use crate::index::{DbStamp, Lookup, ScanCache, StreamScan, VectorSet, VectorSetBuilder};
use crate::vector::codec;
use crate::vector::distance::Metric;

const NAME: &str = "clip_search";
const MODULE_NAME: &CStr = c"clip_search";

thread_local! {
    static COPIES_BUILT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many copies of a statement's vectors this thread has built (for tests: per thread, so
/// tests running in parallel do not count each other's).
pub fn copies_built_on_this_thread() -> u64 {
    COPIES_BUILT.with(|c| c.get())
}

/// Largest k accepted: results are materialized, so k bounds the memory of one call.
pub const MAX_K: i64 = Limits::TRUSTED.max_k as i64;

const COL_ID: c_int = 0;
const COL_SCORE: c_int = 1;
const COL_DISTANCE: c_int = 2;
const COL_RANK: c_int = 3;
const COL_QUERY: c_int = 4;
const COL_K: c_int = 5;
const COL_STATEMENT: c_int = 6;
const COL_METRIC: c_int = 7;
/// The hidden columns that take the function's arguments, in argument order.
const ARGUMENTS: [c_int; 4] = [COL_QUERY, COL_K, COL_STATEMENT, COL_METRIC];
const REQUIRED_ARGUMENTS: usize = 3;

/// Registers the module on a connection.
pub fn load_module(conn: &Connection, names: SharedNames) -> rusqlite::Result<()> {
    const MODULE: Module<SearchTab> = Module::eponymous_only_module();
    conn.create_module(MODULE_NAME, &MODULE, Some(names))
}

#[repr(C)]
pub struct SearchTab {
    base: ffi::sqlite3_vtab,
    db: *mut ffi::sqlite3,
    cache: Mutex<ScanCache>,
    /// The connection's names and policy (for the cap on k).
    names: SharedNames,
}

unsafe impl<'vtab> VTab<'vtab> for SearchTab {
    type Aux = SharedNames;
    type Cursor = SearchCursor<'vtab>;

    fn connect(
        db: &mut VTabConnection,
        aux: Option<&SharedNames>,
        _module_name: &[u8],
        _database_name: &[u8],
        _table_name: &[u8],
        _args: &[&[u8]],
    ) -> rusqlite::Result<(Cow<'static, CStr>, Self)> {
        // It runs SQL text it is given: never from a view or trigger of an untrusted schema.
        db.config(VTabConfig::DirectOnly)?;
        let handle = unsafe { db.handle() };
        Ok((
            Cow::Borrowed(
                c"CREATE TABLE x(id INTEGER, score REAL, distance REAL, rank INTEGER, \
                  query HIDDEN, k HIDDEN, statement HIDDEN, metric HIDDEN)",
            ),
            SearchTab {
                base: ffi::sqlite3_vtab::default(),
                db: handle,
                cache: Mutex::default(),
                names: aux.cloned().unwrap_or_default(),
            },
        ))
    }

    fn best_index(&self, info: &mut IndexInfo) -> rusqlite::Result<bool> {
        guard(NAME, || plan(info))
    }

    fn open(&'vtab mut self) -> rusqlite::Result<SearchCursor<'vtab>> {
        Ok(SearchCursor {
            base: ffi::sqlite3_vtab_cursor::default(),
            tab: self,
            rows: Vec::new(),
            pos: 0,
            args: Vec::new(),
            phantom: PhantomData,
        })
    }
}

/// The plan: idx_num is a bitmask of which arguments (query, k, statement, metric) are bound,
/// passed to filter in that order. A required argument present but not yet usable (e.g. it
/// comes from another table of a join) makes SQLite try another join order.
fn plan(info: &mut IndexInfo) -> rusqlite::Result<bool> {
    if super::tvf_args::bind(info, &ARGUMENTS, REQUIRED_ARGUMENTS).is_none() {
        return Ok(false);
    }
    // Results come out nearest first: a single ORDER BY distance/rank ASC or score DESC is free.
    let mut order_bys = info.order_bys();
    if let (Some(o), None) = (order_bys.next(), order_bys.next()) {
        let consumed = matches!(
            (o.column(), o.is_order_by_desc()),
            (COL_DISTANCE, false) | (COL_RANK, false) | (COL_SCORE, true)
        );
        if consumed {
            info.set_order_by_consumed(true);
        }
    }
    Ok(true)
}

#[repr(C)]
pub struct SearchCursor<'vtab> {
    base: ffi::sqlite3_vtab_cursor,
    tab: &'vtab SearchTab,
    /// (id, score, distance), nearest first.
    rows: Vec<(i64, f64, f64)>,
    pos: usize,
    /// The argument values, for the hidden columns.
    args: Vec<Value>,
    phantom: PhantomData<&'vtab SearchTab>,
}

unsafe impl VTabCursor for SearchCursor<'_> {
    fn filter(
        &mut self,
        idx_num: c_int,
        _idx_str: Option<&str>,
        args: &Filters<'_>,
    ) -> rusqlite::Result<()> {
        guard(NAME, || {
            let values = super::tvf_args::values(idx_num, args, ARGUMENTS.len());
            let max_k = super::clip_fns::policy(&self.tab.names).limits.max_k;
            let request = Request::parse(&values, max_k)?;
            self.args = values
                .iter()
                .map(|v| {
                    v.and_then(|v| Value::try_from(v).ok())
                        .unwrap_or(Value::Null)
                })
                .collect();
            self.rows = run(self.tab, &request)?;
            self.pos = 0;
            Ok(())
        })
    }

    fn next(&mut self) -> rusqlite::Result<()> {
        self.pos += 1;
        Ok(())
    }

    fn eof(&self) -> bool {
        self.pos >= self.rows.len()
    }

    fn column(&self, ctx: &mut Context, i: c_int) -> rusqlite::Result<()> {
        let (id, score, distance) = self.rows[self.pos];
        match i {
            COL_ID => ctx.set_result(&id),
            COL_SCORE => ctx.set_result(&score),
            COL_DISTANCE => ctx.set_result(&distance),
            COL_RANK => ctx.set_result(&((self.pos + 1) as i64)),
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
        Ok(self.rows[self.pos].0)
    }
}

/// A checked call.
struct Request {
    query: Vec<f32>,
    k: usize,
    statement: String,
    metric: Metric,
}

impl Request {
    fn parse(values: &[Option<ValueRef<'_>>], max_k: usize) -> rusqlite::Result<Request> {
        let missing = ["query vector", "k", "statement"];
        for (i, what) in missing.iter().enumerate() {
            if values[i].is_none() {
                return Err(fn_error(
                    NAME,
                    format!(
                        "missing {} argument ({what}); call it as \
                         clip_search(query_vector, k, 'SELECT id, vector FROM ...' [, metric])",
                        super::ordinal(i + 1)
                    ),
                ));
            }
        }
        let query = match values[0].unwrap() {
            ValueRef::Blob(b) => codec::f32_from_blob(b),
            ValueRef::Text(t) => codec::f32_from_json(&String::from_utf8_lossy(t)),
            other => Err(crate::error::Error::WrongType {
                expected: "a vector (a float32 BLOB or JSON text like '[0.1, 0.2]')",
                found: type_name(other),
            }),
        }
        .and_then(|v| codec::check_finite(&v).map(|()| v))
        .map_err(|e| arg_error(NAME, 0, e))?;
        let k = match values[1].unwrap() {
            ValueRef::Integer(k) if (0..=max_k as i64).contains(&k) => k as usize,
            ValueRef::Integer(k) => {
                return Err(arg_error(
                    NAME,
                    1,
                    format!(
                        "k must be between 0 and {max_k}, found {k}{}",
                        if (max_k as i64) < MAX_K {
                            " (this connection's policy limits k; see archaeclip_policy())"
                        } else {
                            ""
                        }
                    ),
                ))
            }
            other => {
                return Err(arg_error(
                    NAME,
                    1,
                    format!("k must be an integer, found {}", type_name(other)),
                ))
            }
        };
        let statement = match values[2].unwrap() {
            ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
            other => {
                return Err(arg_error(
                    NAME,
                    2,
                    format!(
                        "expected the text of a SELECT statement, found {}",
                        type_name(other)
                    ),
                ))
            }
        };
        let metric = match values[3] {
            None | Some(ValueRef::Null) => Metric::Cosine,
            Some(ValueRef::Text(t)) => {
                Metric::parse(&String::from_utf8_lossy(t)).map_err(|e| arg_error(NAME, 3, e))?
            }
            Some(other) => {
                return Err(arg_error(
                    NAME,
                    3,
                    format!(
                        "expected 'cosine', 'dot' or 'l2', found {}",
                        type_name(other)
                    ),
                ))
            }
        };
        Ok(Request {
            query,
            k,
            statement,
            metric,
        })
    }
}

fn lock(tab: &SearchTab) -> MutexGuard<'_, ScanCache> {
    tab.cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn run(tab: &SearchTab, request: &Request) -> rusqlite::Result<Vec<(i64, f64, f64)>> {
    // A non-owning handle on the connection that runs this query.
    let conn = unsafe { Connection::from_handle(tab.db) }?;
    let stamp = stamp(&conn)?;
    // The cache lock is never held while the statement runs: it may call clip_search itself.
    let lookup = lock(tab).lookup(&request.statement, &stamp);
    let results = match lookup {
        Lookup::Copy(set) => set.search(&request.query, request.k, request.metric),
        Lookup::Build => {
            lock(tab).evict_stale(&stamp);
            let set = Arc::new(load(&conn, &request.statement)?);
            lock(tab).put(&request.statement, stamp, set.clone());
            set.search(&request.query, request.k, request.metric)
        }
        Lookup::Stream => {
            let mut scan = StreamScan::new(&request.query, request.k, request.metric)
                .map_err(|e| arg_error(NAME, 0, e))?;
            for_each_row(&conn, &request.statement, |id, vector| match vector {
                RowVector::Blob(b) => scan.push_blob(id, b),
                RowVector::F32(v) => scan.push_f32(id, &v),
            })?;
            Ok(scan.finish())
        }
    };
    results.map_err(|e| match e {
        e @ crate::error::Error::QueryDimensionMismatch { .. } => arg_error(NAME, 0, e),
        e @ crate::error::Error::InRow { .. } => arg_error(NAME, 2, e),
        other => arg_error(NAME, 0, other),
    })
}

/// Everything that changes when the database does: this connection's change count and each
/// attached schema's data_version (moved by other connections' commits) and schema_version.
fn stamp(conn: &Connection) -> rusqlite::Result<DbStamp> {
    let total_changes = i64::from(unsafe { ffi::sqlite3_total_changes(conn.handle()) });
    let mut schemas = Vec::new();
    let mut list = conn.prepare("SELECT name, file FROM pragma_database_list ORDER BY seq")?;
    let names: Vec<(String, String)> = list
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, Option<String>>(1)?.unwrap_or_default(),
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (name, file) in names {
        let quoted = name.replace('"', "\"\"");
        let data_version: i64 =
            conn.query_row(&format!("PRAGMA \"{quoted}\".data_version"), [], |r| {
                r.get(0)
            })?;
        let schema_version: i64 =
            conn.query_row(&format!("PRAGMA \"{quoted}\".schema_version"), [], |r| {
                r.get(0)
            })?;
        schemas.push((name, file, data_version, schema_version));
    }
    Ok(DbStamp {
        total_changes,
        schemas,
    })
}

/// Runs the statement and copies its vectors into one contiguous set.
fn load(conn: &Connection, sql: &str) -> rusqlite::Result<VectorSet> {
    COPIES_BUILT.with(|c| c.set(c.get() + 1));
    let mut builder = VectorSetBuilder::new();
    for_each_row(conn, sql, |id, vector| match vector {
        RowVector::Blob(b) => builder.push_blob(id, b),
        RowVector::F32(v) => builder.push_f32(id, &v),
    })?;
    builder.finish().map_err(|e| arg_error(NAME, 2, e))
}

/// A row's vector as the statement gave it.
enum RowVector<'a> {
    Blob(&'a [u8]),
    F32(Vec<f32>),
}

/// Runs the statement (checked: one read-only SELECT of at least two columns) and hands each
/// row's integer id and vector to `each`; rows with a NULL vector are skipped. An error names
/// the row by its id.
fn for_each_row(
    conn: &Connection,
    sql: &str,
    mut each: impl FnMut(i64, RowVector<'_>) -> crate::error::Result<()>,
) -> rusqlite::Result<()> {
    let mut stmt = conn
        .prepare(sql)
        .map_err(|e| arg_error(NAME, 2, describe_prepare_error(e)))?;
    if !stmt.readonly() {
        return Err(arg_error(
            NAME,
            2,
            "the statement must be a read-only SELECT",
        ));
    }
    if stmt.column_count() < 2 {
        return Err(arg_error(
            NAME,
            2,
            format!(
                "the statement must return (id, vector) columns, it returns {} column(s)",
                stmt.column_count()
            ),
        ));
    }
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let id = match row.get_ref(0)? {
            ValueRef::Integer(id) => id,
            other => {
                return Err(arg_error(
                    NAME,
                    2,
                    format!(
                        "the first column must be an integer id (e.g. rowid), found {}",
                        type_name(other)
                    ),
                ))
            }
        };
        let result = match row.get_ref(1)? {
            ValueRef::Null => continue,
            ValueRef::Blob(b) => each(id, RowVector::Blob(b)),
            ValueRef::Text(t) => codec::f32_from_json(&String::from_utf8_lossy(t))
                .and_then(|v| each(id, RowVector::F32(v))),
            other => Err(crate::error::Error::WrongType {
                expected: "a vector (a float32 BLOB or JSON text)",
                found: type_name(other),
            }),
        };
        result.map_err(|e| match e {
            e @ crate::error::Error::QueryDimensionMismatch { .. } => arg_error(NAME, 0, e),
            e => arg_error(NAME, 2, format!("row with id {id}: {e}")),
        })?;
    }
    Ok(())
}

fn describe_prepare_error(e: rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(_, Some(msg)) => {
            format!("cannot prepare the statement: {msg}")
        }
        rusqlite::Error::MultipleStatement => "expected one SELECT statement, found several".into(),
        other => format!("cannot prepare the statement: {other}"),
    }
}
