//! `clip_index`: a persistent vector index, a virtual table that keeps its own compact copy of
//! the vectors in shadow tables (fixed-capacity chunks: see [`store`]) and answers exact top-k
//! queries in sqlite-vec's syntax.
//!
//! ```sql
//! CREATE VIRTUAL TABLE artifact_index USING clip_index(embedding float[512], material text);
//! INSERT INTO artifact_index(rowid, embedding, material) VALUES (1, :vector, 'bronze');
//! SELECT rowid, distance FROM artifact_index
//! WHERE embedding MATCH :q AND k = 10 AND material = 'bronze' ORDER BY distance;
//! ```
//! Metadata columns are stored beside each row's position and filter before k. With
//! `content='table'` the index is an external-content index over an existing table (as FTS5's):
//! `INSERT INTO artifact_index(artifact_index) VALUES ('rebuild')` fills it from the table,
//! `'integrity-check'` reports drift, `'optimize'` compacts it.
//!
//! Queries scan a per-connection in-memory image of the chunks ([`ChunkSet`]), brought up to
//! date before each query by comparing the stored generation and chunk versions (so only chunks
//! written since, by any connection, are read again; the first query reads every chunk as a few
//! large blobs).
//!
//! With `hnsw=on` the table also keeps an HNSW graph ([`Graph`]) for `mode = 'hnsw'`. Every
//! write appends its rowid to a log shadow table, inside the writer's transaction; a
//! connection's graph catches up by replaying the log from the saved graph, and the graph is
//! saved again (and the log emptied) once the log reaches half the saved rows (at least
//! [`GRAPH_SAVE_MIN`]), and on `'optimize'` and `'rebuild'`. A rollback is noticed by the log
//! entry the graph last applied: its token (never reused) no longer matches, and the graph is
//! loaded again.

mod exact;
mod reader;
mod store;

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_int, CStr, CString};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use rusqlite::ffi;
use rusqlite::types::{Value, ValueRef};
use rusqlite::vtab::{
    parameter, Context, CreateVTab, Filters, IndexConstraintOp, IndexInfo, Inserts, Module,
    TransactionVTab, UpdateVTab, Updates, VTab, VTabConnection, VTabCursor, VTabKind,
};
use rusqlite::{params_from_iter, Connection};

use super::clip_fns;
use super::clip_models::SharedNames;
use crate::index::chunked::{ChunkSet, Mode, SlotFilter};
use crate::index::hnsw::{Graph, GraphOptions};
use crate::index::StreamScan;
use crate::vector::codec;
use crate::vector::distance::Metric;
use store::{owned, quote, MetaColumn, Store};

const MODULE_NAME: &CStr = c"clip_index";

/// Largest k accepted (results are materialized); an untrusted connection's policy allows
/// fewer (`Limits::max_k`).
pub const MAX_K: i64 = 100_000;

/// Largest oversampling factor of a quantized search.
pub const MAX_OVERSAMPLE: i64 = 1_000;

/// Fewest logged writes that make a write save the graph (see the module documentation).
pub const GRAPH_SAVE_MIN: i64 = 1_000;

/// An HNSW query scores exactly this many candidates per result (the graph's best by its
/// own distance).
const RESCORE_FACTOR: usize = 2;

/// Most candidates an HNSW query takes from the graph.
const MAX_GRAPH_CANDIDATES: usize = 100_000;

/// A filtered HNSW query with at most this many allowed rows (or no more than it would
/// rescore anyway) scores them all exactly instead: cheaper than a graph walk that rejects
/// most of what it visits, and exact. Each costs one read of a stored vector (~40 us with
/// SQLite's default pragmas), so the bound stays small.
const FILTER_EXACT_MAX: usize = 2_000;

/// Default bytes of one chunk's vectors: large enough that a chunk costs 1% over the raw
/// vectors in pages, small enough that writing one slot walks few overflow pages.
const DEFAULT_CHUNK_BYTES: usize = 256 << 10;

/// Registers the module on a connection.
pub fn load_module(conn: &Connection, names: SharedNames) -> rusqlite::Result<()> {
    // With transaction callbacks: the store forgets its last insert when a transaction begins
    // or ends (see `Store::insert`).
    const MODULE: Module<IndexTab> = Module::update_module_with_tx().without_sync();
    conn.create_module(MODULE_NAME, &MODULE, Some(names))
}

fn err(table: &str, message: impl std::fmt::Display) -> rusqlite::Error {
    super::sql_error(format!("clip_index {table}: {message}"))
}

/// What the CREATE VIRTUAL TABLE arguments declare.
#[derive(Debug)]
struct Declaration {
    vector_column: String,
    dims: usize,
    metric: Metric,
    chunk_size: Option<usize>,
    metas: Vec<MetaColumn>,
    content: Option<String>,
    content_rowid: String,
    /// `hnsw=on`: keep an HNSW graph, with these parameters.
    hnsw: Option<GraphOptions>,
    /// `codes=on` (the default): keep int8 codes with error bounds for exact search.
    codes: bool,
}

fn parse_declaration(table: &str, args: &[&[u8]]) -> rusqlite::Result<Declaration> {
    let mut vector: Option<(String, usize)> = None;
    let mut metric = None;
    let mut chunk_size = None;
    let mut metas: Vec<MetaColumn> = Vec::new();
    let mut content = None;
    let mut content_rowid = "rowid".to_owned();
    let mut hnsw = false;
    let mut codes = true;
    let mut graph = GraphOptions::default();
    let usage = "declare it as clip_index(embedding float[512] [, metadata_column type ...] \
                 [, metric=cosine|dot|l2] [, content='table'] [, content_rowid='id'] \
                 [, chunk_size=N] [, codes=on|off] [, hnsw=on [, hnsw_m=32] \
                 [, hnsw_ef_construction=128]])";
    let switch = |key: &str, value: &str| match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(err(
            table,
            format!("{key} must be 'on' or 'off', found '{value}'"),
        )),
    };
    let integer = |key: &str, value: &str, lo: usize, hi: usize| {
        value
            .parse::<usize>()
            .ok()
            .filter(|n| (lo..=hi).contains(n))
            .ok_or_else(|| {
                err(
                    table,
                    format!("{key} must be an integer from {lo} to {hi}, found '{value}'"),
                )
            })
    };
    for raw in args {
        let arg = String::from_utf8_lossy(raw);
        let arg = arg.trim();
        let first = arg.split_whitespace().next().unwrap_or("");
        if first.contains('=') {
            let (key, value) = parameter(arg.as_bytes())
                .map_err(|_| err(table, format!("cannot read option '{arg}'")))?;
            match key.to_ascii_lowercase().as_str() {
                "metric" | "distance_metric" => {
                    metric = Some(Metric::parse(&value).map_err(|e| err(table, e))?)
                }
                "chunk_size" => {
                    chunk_size = Some(
                        value
                            .parse::<usize>()
                            .ok()
                            .filter(|n| (8..=1 << 20).contains(n))
                            .ok_or_else(|| {
                                err(
                                    table,
                                    format!(
                                        "chunk_size must be an integer from 8 to 1048576, \
                                         found '{value}'"
                                    ),
                                )
                            })?,
                    )
                }
                "content" => content = Some(value.into_owned()).filter(|c| !c.is_empty()),
                "hnsw" => hnsw = switch("hnsw", &value)?,
                "codes" => codes = switch("codes", &value)?,
                "hnsw_m" => graph.connectivity = integer("hnsw_m", &value, 2, 128)?,
                "hnsw_ef_construction" => {
                    graph.expansion_add = integer("hnsw_ef_construction", &value, 8, 4096)?
                }
                "content_rowid" => content_rowid = value.into_owned(),
                other => {
                    return Err(err(table, format!("unknown option '{other}'; {usage}")));
                }
            }
            continue;
        }
        let mut tokens = arg.split_whitespace();
        let name = rusqlite::vtab::dequote(tokens.next().unwrap_or("")).into_owned();
        let decl = tokens.next().unwrap_or("").to_owned();
        let lower = decl.to_ascii_lowercase();
        if let Some(dims) = lower
            .strip_prefix("float32[")
            .or_else(|| lower.strip_prefix("float["))
            .and_then(|rest| rest.strip_suffix(']'))
        {
            let dims: usize = dims
                .trim()
                .parse()
                .ok()
                .filter(|d| (1..=65_536).contains(d))
                .ok_or_else(|| {
                    err(
                        table,
                        format!("dimensions must be from 1 to 65536, found '{decl}'"),
                    )
                })?;
            if vector.is_some() {
                return Err(err(table, "only one vector column is supported"));
            }
            vector = Some((name, dims));
            for extra in tokens {
                let (key, value) = parameter(extra.as_bytes())
                    .map_err(|_| err(table, format!("cannot read '{extra}' in '{arg}'")))?;
                if key.eq_ignore_ascii_case("distance_metric") {
                    metric = Some(Metric::parse(&value).map_err(|e| err(table, e))?);
                } else {
                    return Err(err(table, format!("unknown column option '{key}'")));
                }
            }
            continue;
        }
        let affinity = match lower.as_str() {
            "text" => "TEXT",
            "integer" | "int" => "INTEGER",
            "real" | "float" | "double" => "REAL",
            "blob" => "BLOB",
            "" | "any" => "",
            _ => {
                return Err(err(
                    table,
                    format!(
                        "column '{name}': unknown type '{decl}' (expected float[N] for the \
                         vector, or text, integer, real, blob for a metadata column)"
                    ),
                ))
            }
        };
        if tokens.next().is_some() {
            return Err(err(table, format!("cannot read column '{arg}'; {usage}")));
        }
        metas.push(MetaColumn {
            name,
            decl: affinity.to_owned(),
        });
    }
    let (vector_column, dims) =
        vector.ok_or_else(|| err(table, format!("no vector column; {usage}")))?;
    let mut names: Vec<String> = metas.iter().map(|m| m.name.to_ascii_lowercase()).collect();
    names.push(vector_column.to_ascii_lowercase());
    for reserved in [
        "distance",
        "score",
        "k",
        "mode",
        "oversample",
        "rowid",
        "chunk",
        "slot",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([table.to_ascii_lowercase()])
    {
        if names.iter().filter(|n| **n == reserved).count() > usize::from(reserved == "x") {
            return Err(err(
                table,
                format!("'{reserved}' is reserved and cannot name a column"),
            ));
        }
    }
    names.sort();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err(err(table, "two columns have the same name"));
    }
    Ok(Declaration {
        vector_column,
        dims,
        metric: metric.unwrap_or(Metric::Cosine),
        chunk_size,
        metas,
        content,
        content_rowid,
        hnsw: hnsw.then_some(graph),
        codes,
    })
}

/// The per-connection image of the chunks, and the generation it reflects.
#[derive(Default)]
struct Image {
    set: ChunkSet,
    generation: Option<i64>,
}

/// An HNSW graph and what it reflects: a connection's own, or one shared by the connections of
/// a process that read the same table (see [`IndexTab::sync_graph`]).
#[derive(Default)]
struct GraphState {
    graph: Option<Graph>,
    /// The token of the saved graph it was loaded from.
    snapshot: i64,
    /// That saved graph's epoch.
    epoch: i64,
    /// The last log entry applied: (seq, token).
    applied: Option<(i64, i64)>,
    /// The index generation it is up to date with.
    generation: Option<i64>,
}

#[repr(C)]
pub struct IndexTab {
    base: ffi::sqlite3_vtab,
    db: *mut ffi::sqlite3,
    store: Store,
    decl: Declaration,
    image: Mutex<Image>,
    graph: Mutex<GraphState>,
    /// The connection's names and policy (for the cap on k).
    names: Option<SharedNames>,
    /// The graph shared with the process's other connections to this table (file databases).
    shared_graph: Option<Arc<Mutex<GraphState>>>,
    /// The int8 records this connection holds for exact search (`codes=on`).
    kept: Mutex<exact::KeptCodes>,
    /// What names the table's chunks across the process's connections (file databases).
    scope: Option<Arc<str>>,
}

/// The process's shared graphs, by database file, table and table identity.
type GraphPool = Mutex<HashMap<String, Weak<Mutex<GraphState>>>>;

fn graph_pool() -> &'static GraphPool {
    static POOL: OnceLock<GraphPool> = OnceLock::new();
    POOL.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The shared graph for `key`, created when no connection holds one.
fn shared_graph(key: String) -> Arc<Mutex<GraphState>> {
    let mut pool = graph_pool().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(graph) = pool.get(&key).and_then(Weak::upgrade) {
        return graph;
    }
    pool.retain(|_, w| w.strong_count() > 0);
    let graph = Arc::new(Mutex::new(GraphState::default()));
    pool.insert(key, Arc::downgrade(&graph));
    graph
}

impl IndexTab {
    fn col_distance(&self) -> c_int {
        self.decl.metas.len() as c_int + 1
    }
    fn col_score(&self) -> c_int {
        self.col_distance() + 1
    }
    fn col_k(&self) -> c_int {
        self.col_distance() + 2
    }
    fn col_mode(&self) -> c_int {
        self.col_distance() + 3
    }
    fn col_oversample(&self) -> c_int {
        self.col_distance() + 4
    }
    fn col_command(&self) -> c_int {
        self.col_distance() + 5
    }

    fn name(&self) -> &str {
        &self.store.table
    }

    /// Whether this connection has a write transaction open on the table's schema.
    fn writing(&self) -> bool {
        let schema = CString::new(self.store.schema.as_str()).unwrap_or_default();
        // SAFETY: a live connection handle and a NUL-terminated schema name.
        unsafe { ffi::sqlite3_txn_state(self.db, schema.as_ptr()) == ffi::SQLITE_TXN_WRITE }
    }

    fn setup(
        db: &mut VTabConnection,
        names: Option<&SharedNames>,
        database_name: &[u8],
        table_name: &[u8],
        args: &[&[u8]],
        creating: bool,
    ) -> rusqlite::Result<(Cow<'static, CStr>, IndexTab)> {
        let handle = unsafe { db.handle() };
        // SAFETY: inside xCreate/xConnect, on the connection SQLite handed us.
        let rc = unsafe { crate::declare_constraint_support(handle) };
        if rc != ffi::SQLITE_OK {
            return Err(rusqlite::Error::SqliteFailure(ffi::Error::new(rc), None));
        }
        let schema = String::from_utf8_lossy(database_name).into_owned();
        let table = String::from_utf8_lossy(table_name).into_owned();
        let decl = parse_declaration(&table, args)?;
        let scope = image_scope(handle, &schema, &table);
        // A non-owning handle on the connection: shadow-table writes join its transaction.
        let conn = unsafe { Connection::from_handle(handle) }?;
        let capacity = decl
            .chunk_size
            .unwrap_or_else(|| (DEFAULT_CHUNK_BYTES / (decl.dims * 4)).clamp(8, 4096) / 8 * 8);
        let mut store = Store::new(
            conn,
            schema,
            table.clone(),
            decl.dims,
            capacity,
            decl.metas.clone(),
        );
        store.hnsw = decl.hnsw.is_some();
        if creating {
            store.codes = decl.codes;
            store.create(decl.metric.name())?;
        } else {
            // The stored shape wins: it is what the chunks were written with.
            let stored = |key: &str| -> rusqlite::Result<Option<i64>> {
                Ok(match store.config(key)? {
                    Some(Value::Integer(n)) => Some(n),
                    _ => None,
                })
            };
            let dims = stored("dims").map_err(|e| {
                err(
                    &table,
                    format!(
                        "cannot read its shadow table {} ({e}); was the table renamed? \
                         ALTER TABLE ... RENAME is not supported: rename it back",
                        store.shadow("config")
                    ),
                )
            })?;
            match dims {
                Some(d) if d as usize == decl.dims => {}
                other => {
                    return Err(err(
                        &table,
                        format!(
                            "its shadow tables hold {other:?} dimensions, the declaration {}",
                            decl.dims
                        ),
                    ))
                }
            }
            let capacity = stored("capacity")?;
            // Tables made before the codes existed have none: their exact queries scan the
            // float32 image.
            let codes = stored("codes")? == Some(1);
            // Format 1 keeps the slot bitmaps in t_slots; a later format is not known here.
            let validity_in_chunks = match stored("format")? {
                Some(1) => false,
                Some(2) => true,
                other => {
                    let found = other.map_or_else(|| "none".to_owned(), |n| n.to_string());
                    return Err(err(
                        &table,
                        format!(
                            "its shadow tables are of format {found}; this archaeclip reads \
                             formats 1 and 2 (a newer version made the table?)"
                        ),
                    ));
                }
            };
            if let Some(c) = capacity {
                store.capacity = c as usize;
            }
            store.codes = codes;
            store.validity_in_chunks = validity_in_chunks;
        }
        // Tables made before `identity` existed share nothing (the key would be ambiguous).
        let identity = match store.config("identity")? {
            Some(Value::Integer(n)) => Some(n),
            _ => None,
        };
        let shared = match (&scope, identity, decl.hnsw) {
            (Some(scope), Some(identity), Some(_)) => {
                Some(shared_graph(format!("{scope}\0{identity}")))
            }
            _ => None,
        };
        let mut columns = format!("CREATE TABLE x({} BLOB", quote(&decl.vector_column));
        for m in &decl.metas {
            columns.push_str(&format!(", {} {}", quote(&m.name), m.decl));
        }
        columns.push_str(&format!(
            ", distance REAL HIDDEN, score REAL HIDDEN, k INTEGER HIDDEN, mode TEXT HIDDEN, \
             oversample INTEGER HIDDEN, {} HIDDEN)",
            quote(&table)
        ));
        let schema_sql = CString::new(columns)
            .map_err(|_| err(&table, "a column name contains a NUL character"))?;
        Ok((
            Cow::Owned(schema_sql),
            IndexTab {
                base: ffi::sqlite3_vtab::default(),
                db: handle,
                image: Mutex::new(Image {
                    set: match &scope {
                        Some(scope) => ChunkSet::shared(decl.dims, scope),
                        None => ChunkSet::new(decl.dims),
                    },
                    generation: None,
                }),
                kept: Mutex::new(exact::KeptCodes::default()),
                scope: scope.map(Arc::from),
                graph: Mutex::new(GraphState::default()),
                names: names.cloned(),
                shared_graph: shared,
                store,
                decl,
            },
        ))
    }

    fn image(&self) -> MutexGuard<'_, Image> {
        self.image.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn graph_state(&self) -> MutexGuard<'_, GraphState> {
        self.graph.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn graph_options(&self) -> rusqlite::Result<GraphOptions> {
        self.decl.hnsw.ok_or_else(|| {
            err(
                self.name(),
                "mode 'hnsw' needs a graph: declare the table with hnsw=on",
            )
        })
    }

    /// Brings a graph up to date with what this connection sees: loads the saved graph when
    /// the state has none or is stale (another save, or a rollback of a log entry it applied),
    /// then replays the log entries it has not applied.
    ///
    /// A `shared` state is only ever synced by connections without a write transaction, so it
    /// holds committed writes only, and a connection whose view is older than the state (a
    /// reader whose snapshot began before the last commit it reflects) uses it as it is: its
    /// rescoring reads each candidate through its own view, so the newer rows cost it at most
    /// some recall, never a wrong row or distance.
    fn sync_graph(&self, state: &mut GraphState, shared: bool) -> rusqlite::Result<()> {
        let options = self.graph_options()?;
        let generation = self.store.generation()?;
        if state.graph.is_some() && state.generation == Some(generation) {
            return Ok(());
        }
        let (snapshot, _, epoch) = self.store.graph_saved()?;
        if shared && state.graph.is_some() && epoch < state.epoch {
            return Ok(());
        }
        state.generation = None;
        let stale = match (&state.graph, state.applied) {
            (None, _) => true,
            (Some(_), _) if state.snapshot != snapshot => true,
            (Some(_), Some((seq, token))) => match self.store.log_token(seq)? {
                Some(t) => t != token,
                // Committed after this connection's snapshot began.
                None if shared => return Ok(()),
                None => true,
            },
            (Some(_), None) => false,
        };
        let (dims, metric) = (self.decl.dims, self.decl.metric);
        if stale {
            state.graph = None;
            let bytes = self.store.read_graph()?;
            if bytes.is_empty() {
                // No saved graph (a new or emptied table, or t_hnsw deleted by hand): build one
                // from every stored row; the log so far is then already applied.
                let graph = Graph::new(dims, metric, options).map_err(|e| err(self.name(), e))?;
                for (id, version) in self.store.chunk_versions()? {
                    let chunk = self.store.load_chunk(id, version)?;
                    let rows: Vec<(i64, Vec<f32>)> = (0..chunk.capacity)
                        .filter(|&slot| chunk.is_valid(slot))
                        .map(|slot| (chunk.rowids[slot], chunk.row(slot, dims).to_vec()))
                        .collect();
                    graph.upsert(&rows).map_err(|e| err(self.name(), e))?;
                }
                state.applied = self.store.log_last()?;
                state.graph = Some(graph);
            } else {
                let graph = Graph::from_bytes(&bytes, dims, metric, options)
                    .map_err(|e| err(self.name(), e))?;
                state.graph = Some(graph);
                state.applied = None;
            }
            state.snapshot = snapshot;
            state.epoch = epoch;
        }
        let entries = self.store.log_after(state.applied.map_or(0, |a| a.0))?;
        if let Some(&(seq, _, token)) = entries.last() {
            let graph = state.graph.as_ref().expect("loaded above");
            let mut rowids: Vec<i64> = entries.iter().map(|e| e.1).collect();
            rowids.sort_unstable();
            rowids.dedup();
            // The current vector of each written rowid (none: deleted since); in batches so
            // that replaying a long log holds a bounded number of vectors.
            for batch in rowids.chunks(1 << 16) {
                let mut present = Vec::with_capacity(batch.len());
                for (rowid, vector) in self.store.vectors_of(batch)? {
                    match vector {
                        Some(v) => present.push((rowid, v)),
                        None => graph.remove(rowid).map_err(|e| err(self.name(), e))?,
                    }
                }
                graph.upsert(&present).map_err(|e| err(self.name(), e))?;
            }
            state.applied = Some((seq, token));
        }
        state.generation = Some(generation);
        Ok(())
    }

    /// Saves this connection's (up-to-date) graph and empties the log.
    fn save_graph(&self) -> rusqlite::Result<()> {
        let mut state = self.graph_state();
        self.sync_graph(&mut state, false)?;
        let graph = state.graph.as_ref().expect("synced");
        let bytes = graph.to_bytes().map_err(|e| err(self.name(), e))?;
        let rows = graph.len();
        (state.snapshot, state.epoch) = self.store.write_graph(&bytes, rows)?;
        state.applied = None;
        state.generation = Some(self.store.generation()?);
        Ok(())
    }

    /// After a write: saves the graph when the log has grown to half the saved graph.
    fn maybe_save_graph(&self) -> rusqlite::Result<()> {
        if self.decl.hnsw.is_none() {
            return Ok(());
        }
        let saved_rows = self.store.saved_graph_rows()?;
        if self.store.log_len()? >= GRAPH_SAVE_MIN.max(saved_rows / 2) {
            self.save_graph()?;
        }
        Ok(())
    }

    /// The k nearest rows by the HNSW graph, rescored exactly: (rowid, score, distance).
    fn search_graph(
        &self,
        query: &[f32],
        k: usize,
        oversample: usize,
        args: &[Arg],
        values: &[ValueRef<'_>],
    ) -> rusqlite::Result<Vec<(i64, f64, f64)>> {
        // The graph explores `ef` nodes; the best `rescored` of them by its int8 (or f16)
        // distance are read from the chunks and scored exactly. Reading a stored vector costs
        // a walk along its chunk's overflow pages, so fewer are read than explored.
        let ef = k
            .saturating_mul(oversample)
            .clamp(k, MAX_GRAPH_CANDIDATES.max(k));
        let rescored = ef.min(k.saturating_mul(RESCORE_FACTOR));
        let allowed = self.allowed_rowids(args, values)?;
        // Without a write transaction this connection sees only committed rows: it may use
        // (and advance) the process's shared graph. With one, its own.
        let shared = self.shared_graph.as_ref().filter(|_| !self.writing());
        let mut state = match shared {
            Some(graph) => graph.lock().unwrap_or_else(|p| p.into_inner()),
            None => self.graph_state(),
        };
        self.sync_graph(&mut state, shared.is_some())?;
        let graph = state.graph.as_ref().expect("synced");
        let mut rowids = match &allowed {
            Some(set) if set.len() <= FILTER_EXACT_MAX.max(rescored) => {
                Ok(set.iter().copied().collect())
            }
            Some(set) => {
                let accept = |rowid: i64| set.contains(&rowid);
                graph.search(query, rescored, ef, Some(&accept))
            }
            None => graph.search(query, rescored, ef, None),
        }
        .map_err(|e| err(self.name(), format!("MATCH: {e}")))?;
        drop(state);
        // The one rowid the graph cannot hold is scored beside its candidates.
        let sentinel = Graph::SENTINEL_ROWID;
        if !rowids.contains(&sentinel)
            && allowed.as_ref().is_none_or(|s| s.contains(&sentinel))
            && self.store.locate(sentinel)?.is_some()
        {
            rowids.push(sentinel);
        }
        // Scored exactly, as an exact search scores them; a rowid this connection cannot see
        // (gone, or newer than its snapshot) has no vector and is skipped.
        let matched = |e: crate::error::Error| err(self.name(), format!("MATCH: {e}"));
        let mut scan = StreamScan::new(query, k, self.decl.metric).map_err(matched)?;
        for (rowid, vector) in self.store.vectors_of(&rowids)? {
            if let Some(v) = vector {
                scan.push_f32(rowid, &v).map_err(matched)?;
            }
        }
        Ok(scan.finish())
    }

    /// The rowids that the rowid and metadata constraints allow, or `None` when there are
    /// none.
    fn allowed_rowids(
        &self,
        args: &[Arg],
        values: &[ValueRef<'_>],
    ) -> rusqlite::Result<Option<std::collections::HashSet<i64>>> {
        let (conditions, params) = self.conditions(args, values);
        if conditions.is_empty() {
            return Ok(None);
        }
        let mut stmt = self.store.cached(&self.map_select("rowid", &conditions))?;
        let set = stmt
            .query_map(params_from_iter(params), |r| r.get::<_, i64>(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Some(set))
    }

    /// Brings the image up to date with the shadow tables.
    fn refresh(&self, image: &mut Image) -> rusqlite::Result<()> {
        let generation = self.store.generation()?;
        if image.generation == Some(generation) {
            return Ok(());
        }
        image.generation = None;
        let stored = self.store.chunk_versions()?;
        let mut failure = None;
        let result = image.set.refresh(&stored, |id, version| {
            self.store.load_chunk(id, version).map_err(|e| {
                let message = e.to_string();
                failure = Some(e);
                crate::error::Error::InvalidArgument { what: message }
            })
        });
        if let Some(e) = failure {
            image.set = image.set.emptied();
            return Err(e);
        }
        if let Err(e) = result {
            image.set = image.set.emptied();
            return Err(err(self.name(), e));
        }
        image.generation = Some(generation);
        Ok(())
    }

    /// A vector from a written value: float32 blob or JSON text, with the declared dims.
    fn vector_value(&self, value: ValueRef<'_>) -> rusqlite::Result<Vec<f32>> {
        let v = match value {
            ValueRef::Blob(b) => codec::f32_from_blob(b),
            ValueRef::Text(t) => codec::f32_from_json(&String::from_utf8_lossy(t)),
            ValueRef::Null => {
                return Err(err(
                    self.name(),
                    format!("{} must not be NULL", self.decl.vector_column),
                ))
            }
            other => Err(crate::error::Error::WrongType {
                expected: "a vector (a float32 BLOB or JSON text like '[0.1, 0.2]')",
                found: super::type_name(other),
            }),
        }
        .and_then(|v| codec::check_finite(&v).map(|()| v))
        .map_err(|e| err(self.name(), format!("{}: {e}", self.decl.vector_column)))?;
        if v.len() != self.decl.dims {
            return Err(err(
                self.name(),
                format!(
                    "{}: dimension mismatch: the index has {}, this vector {}",
                    self.decl.vector_column,
                    self.decl.dims,
                    v.len()
                ),
            ));
        }
        Ok(v)
    }

    fn conflict(&self, rowid: i64) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(
            ffi::Error::new(ffi::SQLITE_CONSTRAINT),
            Some(format!(
                "UNIQUE constraint failed: {}.rowid (rowid {rowid})",
                self.name()
            )),
        )
    }

    /// Inserts a checked row, resolving a rowid conflict as the statement's ON CONFLICT says.
    fn insert_row(&self, rowid: i64, vector: &[f32], metas: &[Value]) -> rusqlite::Result<()> {
        if self.store.insert(rowid, vector, metas)? {
            return Ok(());
        }
        let mode = unsafe { ffi::sqlite3_vtab_on_conflict(self.db) };
        if mode != ffi::SQLITE_REPLACE {
            return Err(self.conflict(rowid));
        }
        self.store.delete(rowid)?;
        if self.store.insert(rowid, vector, metas)? {
            Ok(())
        } else {
            Err(err(
                self.name(),
                format!("rowid {rowid} is still mapped after its delete"),
            ))
        }
    }

    fn command(&self, command: ValueRef<'_>) -> rusqlite::Result<()> {
        let name = match command {
            ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
            other => {
                return Err(err(
                    self.name(),
                    format!("a command must be text, found {}", super::type_name(other)),
                ))
            }
        };
        match name.as_str() {
            "rebuild" => {
                self.rebuild()?;
                self.save_graph_if_any()
            }
            "delete-all" => self.store.delete_all(),
            "optimize" => {
                self.store.compact()?;
                self.save_graph_if_any()
            }
            "integrity-check" => self.integrity_check(),
            other => Err(err(
                self.name(),
                format!(
                    "unknown command '{other}' (expected 'rebuild', 'optimize', \
                     'integrity-check' or 'delete-all')"
                ),
            )),
        }
    }

    fn save_graph_if_any(&self) -> rusqlite::Result<()> {
        if self.decl.hnsw.is_some() {
            self.save_graph()?;
        }
        Ok(())
    }

    fn content(&self) -> rusqlite::Result<&str> {
        self.decl.content.as_deref().ok_or_else(|| {
            err(
                self.name(),
                "'rebuild' needs an external-content index (declared with content='table')",
            )
        })
    }

    /// `SELECT rowid, vector, metas... FROM content`.
    fn content_select(&self, content: &str) -> String {
        let mut cols = vec![
            quote(&self.decl.content_rowid),
            quote(&self.decl.vector_column),
        ];
        cols.extend(self.decl.metas.iter().map(|m| quote(&m.name)));
        format!(
            "SELECT {} FROM {}.{}",
            cols.join(", "),
            quote(&self.store.schema),
            quote(content)
        )
    }

    fn rebuild(&self) -> rusqlite::Result<()> {
        let content = self.content()?;
        self.store.delete_all()?;
        let conn = &self.store.conn;
        let mut stmt = conn.prepare(&self.content_select(content))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let vector = row.get_ref(1)?;
            if vector == ValueRef::Null {
                continue;
            }
            let rowid: i64 = row.get(0)?;
            let vector = self
                .vector_value(vector)
                .map_err(|e| err(self.name(), format!("content row {rowid}: {e}")))?;
            let metas: Vec<Value> = (0..self.decl.metas.len())
                .map(|i| row.get_ref(2 + i).map(owned))
                .collect::<rusqlite::Result<_>>()?;
            if !self.store.insert(rowid, &vector, &metas)? {
                return Err(err(
                    self.name(),
                    format!(
                        "content rowid {rowid} appears twice in {}.{}",
                        content, self.decl.content_rowid
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The shadow tables agree with each other, and (external content) with the content table:
    /// the same rowids, the same vectors. Fails with SQLITE_CORRUPT_VTAB naming the drift.
    fn integrity_check(&self) -> rusqlite::Result<()> {
        let mut problems = self.store.check()?;
        if self.decl.hnsw.is_some() {
            let mut state = self.graph_state();
            match self.sync_graph(&mut state, false) {
                Err(e) => problems.push(format!("the HNSW graph cannot be loaded: {e}")),
                Ok(()) => {
                    let graph = state.graph.as_ref().expect("synced");
                    let sentinel = self.store.locate(Graph::SENTINEL_ROWID)?.is_some();
                    let expected = self.store.row_count()? as usize - usize::from(sentinel);
                    if graph.len() != expected {
                        problems.push(format!(
                            "the HNSW graph holds {} rows, the index {expected}",
                            graph.len()
                        ));
                    }
                }
            }
        }
        if let Some(content) = &self.decl.content {
            let (mut missing, mut differ, mut matched) = (Vec::new(), Vec::new(), 0usize);
            let (mut missing_n, mut differ_n) = (0usize, 0usize);
            let conn = &self.store.conn;
            let mut stmt = conn.prepare(&self.content_select(content))?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let vector = row.get_ref(1)?;
                if vector == ValueRef::Null {
                    continue;
                }
                let rowid: i64 = row.get(0)?;
                match self.store.locate(rowid)? {
                    None => {
                        missing_n += 1;
                        missing.push(rowid);
                    }
                    Some((chunk, slot)) => {
                        matched += 1;
                        let stored = self.store.read_vector(chunk, slot)?;
                        let same = self
                            .vector_value(vector)
                            .map(|v| codec::f32_to_blob(&v) == stored)
                            .unwrap_or(false);
                        if !same {
                            differ_n += 1;
                            differ.push(rowid);
                        }
                    }
                }
            }
            let indexed = self.store.row_count()?;
            let extra = indexed as usize - matched.min(indexed as usize);
            let examples = |v: &[i64]| {
                v.iter()
                    .take(5)
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if missing_n > 0 {
                problems.push(format!(
                    "{missing_n} content rows are not in the index (rowids {})",
                    examples(&missing)
                ));
            }
            if differ_n > 0 {
                problems.push(format!(
                    "{differ_n} rows have a different vector in the index (rowids {})",
                    examples(&differ)
                ));
            }
            if extra > 0 {
                problems.push(format!(
                    "{extra} index rows are not in the content table {content}"
                ));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(rusqlite::Error::SqliteFailure(
            ffi::Error::new(ffi::SQLITE_CORRUPT_VTAB),
            Some(format!(
                "clip_index {}: integrity-check failed: {}",
                self.name(),
                problems.join("; ")
            )),
        ))
    }
}

unsafe impl<'vtab> VTab<'vtab> for IndexTab {
    type Aux = SharedNames;
    type Cursor = IndexCursor<'vtab>;

    fn connect(
        db: &mut VTabConnection,
        aux: Option<&SharedNames>,
        _module_name: &[u8],
        database_name: &[u8],
        table_name: &[u8],
        args: &[&[u8]],
    ) -> rusqlite::Result<(Cow<'static, CStr>, Self)> {
        super::guard("clip_index", || {
            IndexTab::setup(db, aux, database_name, table_name, args, false)
        })
    }

    fn best_index(&self, info: &mut IndexInfo) -> rusqlite::Result<bool> {
        super::guard("clip_index", || self.plan(info))
    }

    fn open(&'vtab mut self) -> rusqlite::Result<IndexCursor<'vtab>> {
        Ok(IndexCursor {
            base: ffi::sqlite3_vtab_cursor::default(),
            tab: self,
            rows: Vec::new(),
            pos: 0,
            k: None,
            mode: None,
            oversample: None,
            metas: RefCell::new(None),
            phantom: PhantomData,
        })
    }
}

impl CreateVTab<'_> for IndexTab {
    const KIND: VTabKind = VTabKind::Default;

    fn create(
        db: &mut VTabConnection,
        aux: Option<&SharedNames>,
        _module_name: &[u8],
        database_name: &[u8],
        table_name: &[u8],
        args: &[&[u8]],
    ) -> rusqlite::Result<(Cow<'static, CStr>, Self)> {
        super::guard("clip_index", || {
            IndexTab::setup(db, aux, database_name, table_name, args, true)
        })
    }

    fn destroy(&self) -> rusqlite::Result<()> {
        self.store.drop_all()
    }
}

impl TransactionVTab<'_> for IndexTab {
    fn begin(&mut self) -> rusqlite::Result<()> {
        self.store.transaction_boundary();
        Ok(())
    }

    fn commit(&mut self) -> rusqlite::Result<()> {
        self.store.transaction_boundary();
        Ok(())
    }

    fn rollback(&mut self) -> rusqlite::Result<()> {
        self.store.transaction_boundary();
        Ok(())
    }
}

impl UpdateVTab<'_> for IndexTab {
    fn delete(&mut self, arg: ValueRef<'_>) -> rusqlite::Result<()> {
        super::guard("clip_index", || {
            let rowid = arg.as_i64()?;
            self.store.delete(rowid)?;
            self.maybe_save_graph()
        })
    }

    fn insert(&mut self, args: &Inserts<'_>) -> rusqlite::Result<i64> {
        super::guard("clip_index", || {
            let values: Vec<ValueRef<'_>> = args.iter().collect();
            let command = values[2 + self.col_command() as usize];
            if command != ValueRef::Null {
                self.command(command)?;
                return Ok(0);
            }
            let vector = self.vector_value(values[2])?;
            let metas: Vec<Value> = (0..self.decl.metas.len())
                .map(|i| owned(values[3 + i]))
                .collect();
            let rowid = match values[1] {
                ValueRef::Null => self.store.next_rowid()?,
                ValueRef::Integer(r) => r,
                other => {
                    return Err(err(
                        self.name(),
                        format!(
                            "rowid must be an integer, found {}",
                            super::type_name(other)
                        ),
                    ))
                }
            };
            self.insert_row(rowid, &vector, &metas)?;
            self.maybe_save_graph()?;
            Ok(rowid)
        })
    }

    fn update(&mut self, args: &Updates<'_>) -> rusqlite::Result<()> {
        super::guard("clip_index", || {
            let values: Vec<ValueRef<'_>> = args.iter().collect();
            let old: i64 = args.get(0)?;
            let new: i64 = match values[1] {
                ValueRef::Integer(r) => r,
                other => {
                    return Err(err(
                        self.name(),
                        format!(
                            "rowid must be an integer, found {}",
                            super::type_name(other)
                        ),
                    ))
                }
            };
            let command = values[2 + self.col_command() as usize];
            if command != ValueRef::Null && !args.no_change(2 + self.col_command() as usize) {
                return Err(err(self.name(), "commands are run with INSERT, not UPDATE"));
            }
            let Some((chunk, slot)) = self.store.locate(old)? else {
                return Err(err(self.name(), format!("no row with rowid {old}")));
            };
            let vector = if args.no_change(2) {
                None
            } else {
                Some(self.vector_value(values[2])?)
            };
            let m = self.decl.metas.len();
            let metas_changed = (0..m).any(|i| !args.no_change(3 + i));
            let metas: Vec<Value> = if metas_changed {
                let current = self.store.read_metas(old)?;
                (0..m)
                    .map(|i| {
                        if args.no_change(3 + i) {
                            current[i].clone()
                        } else {
                            owned(values[3 + i])
                        }
                    })
                    .collect()
            } else {
                Vec::new()
            };
            if new == old {
                if let Some(v) = &vector {
                    self.store.overwrite_vector(old, chunk, slot, v)?;
                }
                if metas_changed {
                    self.store.update_metas(old, &metas)?;
                }
                return self.maybe_save_graph();
            }
            let vector = match vector {
                Some(v) => v,
                None => store::bytes_to_f32(&self.store.read_vector(chunk, slot)?),
            };
            let metas = if metas_changed {
                metas
            } else {
                self.store.read_metas(old)?
            };
            if self.store.locate(new)?.is_some() {
                let mode = unsafe { ffi::sqlite3_vtab_on_conflict(self.db) };
                if mode != ffi::SQLITE_REPLACE {
                    return Err(self.conflict(new));
                }
            }
            self.store.delete(old)?;
            self.insert_row(new, &vector, &metas)?;
            self.maybe_save_graph()
        })
    }
}

/// What one planned constraint is, in the order of xFilter's arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Arg {
    Match,
    K,
    Mode,
    Oversample,
    Rowid,
    /// A metadata column (0-based among them) compared with an operator.
    Meta(usize, &'static str),
}

fn encode(args: &[Arg]) -> String {
    args.iter()
        .map(|a| match a {
            Arg::Match => "m".to_owned(),
            Arg::K => "k".to_owned(),
            Arg::Mode => "q".to_owned(),
            Arg::Oversample => "o".to_owned(),
            Arg::Rowid => "r".to_owned(),
            Arg::Meta(i, op) => format!("{i}{op}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

const OPERATORS: [&str; 10] = [
    "=",
    ">",
    "<=",
    "<",
    ">=",
    "!=",
    " IS NULL",
    " IS NOT NULL",
    " IS ",
    " IS NOT ",
];

fn decode(idx_str: &str) -> Vec<Arg> {
    idx_str
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| match s {
            "m" => Arg::Match,
            "k" => Arg::K,
            "q" => Arg::Mode,
            "o" => Arg::Oversample,
            "r" => Arg::Rowid,
            _ => {
                let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
                let op = OPERATORS
                    .iter()
                    .find(|o| **o == &s[digits..])
                    .copied()
                    .unwrap_or("=");
                Arg::Meta(s[..digits].parse().unwrap_or(0), op)
            }
        })
        .collect()
}

impl IndexTab {
    /// idx_num: 1 = k nearest (MATCH and k), 0 = rows (optionally filtered). idx_str lists the
    /// constraints passed to xFilter, in argument order.
    fn plan(&self, info: &mut IndexInfo) -> rusqlite::Result<bool> {
        let metas = self.decl.metas.len() as c_int;
        let mut chosen: Vec<(usize, Arg)> = Vec::new();
        let mut unusable_knn = false;
        for (i, c) in info.constraints().enumerate() {
            let col = c.column();
            let op = c.operator();
            let arg = match op {
                IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_MATCH if col == 0 => Some(Arg::Match),
                IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_EQ if col == self.col_k() => {
                    Some(Arg::K)
                }
                IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_EQ if col == self.col_mode() => {
                    Some(Arg::Mode)
                }
                IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_EQ if col == self.col_oversample() => {
                    Some(Arg::Oversample)
                }
                IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_EQ if col == -1 => Some(Arg::Rowid),
                _ if (1..=metas).contains(&col) => {
                    let op = match op {
                        IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_EQ => Some(OPERATORS[0]),
                        IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_GT => Some(OPERATORS[1]),
                        IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_LE => Some(OPERATORS[2]),
                        IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_LT => Some(OPERATORS[3]),
                        IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_GE => Some(OPERATORS[4]),
                        IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_NE => Some(OPERATORS[5]),
                        IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_ISNULL => Some(OPERATORS[6]),
                        IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_ISNOTNULL => Some(OPERATORS[7]),
                        IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_IS => Some(OPERATORS[8]),
                        IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_ISNOT => Some(OPERATORS[9]),
                        _ => None,
                    };
                    op.map(|op| Arg::Meta((col - 1) as usize, op))
                }
                _ => None,
            };
            let Some(arg) = arg else { continue };
            if !c.is_usable() {
                if matches!(arg, Arg::Match | Arg::K | Arg::Mode | Arg::Oversample) {
                    unusable_knn = true;
                }
                continue;
            }
            // One rowid (mode, oversample) constraint is enough.
            if matches!(arg, Arg::Rowid | Arg::Mode | Arg::Oversample)
                && chosen.iter().any(|(_, a)| *a == arg)
            {
                continue;
            }
            chosen.push((i, arg));
        }
        if unusable_knn {
            // The query vector or k comes from a table later in the join: try another order.
            return Ok(false);
        }
        let knn = chosen.iter().any(|(_, a)| *a == Arg::Match);
        let args: Vec<Arg> = chosen.iter().map(|(_, a)| *a).collect();
        for (n, (i, _)) in chosen.iter().enumerate() {
            let mut usage = info.constraint_usage(*i);
            usage.set_argv_index(n as c_int + 1);
            usage.set_omit(true);
        }
        info.set_idx_num(c_int::from(knn));
        info.set_idx_str(&encode(&args));
        let rowid_eq = args.contains(&Arg::Rowid);
        if knn {
            info.set_estimated_cost(1_000.0);
            info.set_estimated_rows(10);
            let mut order_bys = info.order_bys();
            if let (Some(o), None) = (order_bys.next(), order_bys.next()) {
                let consumed = (o.column() == self.col_distance() && !o.is_order_by_desc())
                    || (o.column() == self.col_score() && o.is_order_by_desc());
                if consumed {
                    info.set_order_by_consumed(true);
                }
            }
        } else if rowid_eq {
            info.set_estimated_cost(1.0);
            info.set_estimated_rows(1);
        } else {
            info.set_estimated_cost(1e9);
        }
        Ok(true)
    }

    /// The slots that the non-vector constraints allow, or `None` when there are none.
    fn slot_filter(
        &self,
        args: &[Arg],
        values: &[ValueRef<'_>],
    ) -> rusqlite::Result<Option<SlotFilter>> {
        let (conditions, params) = self.conditions(args, values);
        if conditions.is_empty() {
            return Ok(None);
        }
        let capacity = self.store.capacity;
        let mut filter = SlotFilter::new();
        let mut stmt = self
            .store
            .cached(&self.map_select("chunk, slot", &conditions))?;
        let mut rows = stmt.query(params_from_iter(params))?;
        while let Some(row) = rows.next()? {
            let (chunk, slot): (i64, i64) = (row.get(0)?, row.get(1)?);
            let bits = filter
                .entry(chunk)
                .or_insert_with(|| vec![0u8; capacity.div_ceil(8)]);
            let slot = slot as usize;
            if slot < capacity {
                bits[slot / 8] |= 1 << (slot % 8);
            }
        }
        Ok(Some(filter))
    }

    /// `SELECT columns FROM t_map [WHERE conditions]`.
    fn map_select(&self, columns: &str, conditions: &[String]) -> String {
        let mut sql = format!("SELECT {columns} FROM {}", self.store.shadow("map"));
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql
    }

    /// SQL conditions on `t_map` for the rowid and metadata constraints, and their values.
    fn conditions(&self, args: &[Arg], values: &[ValueRef<'_>]) -> (Vec<String>, Vec<Value>) {
        let mut conditions = Vec::new();
        let mut params = Vec::new();
        for (arg, value) in args.iter().zip(values) {
            match arg {
                Arg::Rowid => {
                    params.push(owned(*value));
                    conditions.push(format!("rowid = ?{}", params.len()));
                }
                Arg::Meta(i, op) => {
                    let col = quote(&self.decl.metas[*i].name);
                    if op.contains("NULL") {
                        conditions.push(format!("{col}{op}"));
                    } else {
                        params.push(owned(*value));
                        conditions.push(format!("{col}{op}?{}", params.len()));
                    }
                }
                Arg::Match | Arg::K | Arg::Mode | Arg::Oversample => {}
            }
        }
        (conditions, params)
    }
}

/// One result row: rowid and, for a k-nearest query, (score, distance).
type Row = (i64, Option<(f64, f64)>);

#[repr(C)]
pub struct IndexCursor<'vtab> {
    base: ffi::sqlite3_vtab_cursor,
    tab: &'vtab IndexTab,
    rows: Vec<Row>,
    pos: usize,
    k: Option<i64>,
    mode: Option<Mode>,
    oversample: Option<usize>,
    /// The current row's metadata, read on first use.
    metas: RefCell<Option<(usize, Vec<Value>)>>,
    phantom: PhantomData<&'vtab IndexTab>,
}

unsafe impl VTabCursor for IndexCursor<'_> {
    fn filter(
        &mut self,
        idx_num: c_int,
        idx_str: Option<&str>,
        filters: &Filters<'_>,
    ) -> rusqlite::Result<()> {
        super::guard("clip_index", || {
            let tab = self.tab;
            let args = decode(idx_str.unwrap_or(""));
            let values: Vec<ValueRef<'_>> = filters.iter().collect();
            self.pos = 0;
            self.rows.clear();
            self.k = None;
            *self.metas.borrow_mut() = None;
            let find = |a: Arg| args.iter().position(|x| *x == a).map(|i| values[i]);
            let k = match find(Arg::K) {
                None => None,
                Some(v) => {
                    let max_k = tab.names.as_ref().map_or(MAX_K, |n| {
                        (clip_fns::policy(n).limits.max_k as i64).min(MAX_K)
                    });
                    Some(int_in(v, 0, max_k, "k").map_err(|e| err(tab.name(), e))?)
                }
            };
            self.k = k;
            let mode = match find(Arg::Mode) {
                None | Some(ValueRef::Null) => None,
                Some(ValueRef::Text(t)) => {
                    Some(Mode::parse(&String::from_utf8_lossy(t)).map_err(|e| err(tab.name(), e))?)
                }
                Some(other) => {
                    return Err(err(
                        tab.name(),
                        format!(
                            "mode must be {}, found {}",
                            Mode::NAMES,
                            super::type_name(other)
                        ),
                    ))
                }
            };
            let oversample = match find(Arg::Oversample) {
                None | Some(ValueRef::Null) => None,
                Some(v) => Some(
                    int_in(v, 1, MAX_OVERSAMPLE, "oversample").map_err(|e| err(tab.name(), e))?
                        as usize,
                ),
            };
            self.mode = mode;
            self.oversample = oversample;
            if idx_num == 1 {
                let Some(k) = k else {
                    return Err(err(
                        tab.name(),
                        "a MATCH query needs 'AND k = N' (the number of nearest rows)",
                    ));
                };
                let query = match find(Arg::Match).expect("planned") {
                    ValueRef::Null => return Ok(()),
                    v => tab
                        .vector_value(v)
                        .map_err(|e| err(tab.name(), format!("MATCH: {}", strip_prefix(tab, e))))?,
                };
                let mode = mode.unwrap_or(Mode::Exact);
                if mode == Mode::Hnsw {
                    let oversample = oversample.unwrap_or_else(|| mode.default_oversample());
                    let hits = tab.search_graph(&query, k as usize, oversample, &args, &values)?;
                    self.rows = hits
                        .into_iter()
                        .map(|(id, score, distance)| (id, Some((score, distance))))
                        .collect();
                    return Ok(());
                }
                let filter = tab.slot_filter(&args, &values)?;
                // Exact and int8 queries are answered from the stored int8 records (int8:
                // candidates by estimated distance), without the float32 image.
                let approximate =
                    match mode {
                        Mode::Int8 => Some((k as usize).saturating_mul(
                            oversample.unwrap_or_else(|| mode.default_oversample()),
                        )),
                        _ => None,
                    };
                if matches!(mode, Mode::Exact | Mode::Int8)
                    && tab.store.codes
                    && (k as usize) <= exact::CODES_MAX_K
                {
                    if let Some(hits) =
                        tab.search_codes(&query, k as usize, approximate, filter.as_ref())?
                    {
                        self.rows = hits
                            .into_iter()
                            .map(|(id, score, distance)| (id, Some((score, distance))))
                            .collect();
                        return Ok(());
                    }
                }
                let mut image = tab.image();
                tab.refresh(&mut image)?;
                let hits = image
                    .set
                    .search_with(
                        &query,
                        k as usize,
                        tab.decl.metric,
                        filter.as_ref(),
                        mode,
                        oversample.unwrap_or_else(|| mode.default_oversample()),
                    )
                    .map_err(|e| err(tab.name(), format!("MATCH: {e}")))?;
                self.rows = hits
                    .into_iter()
                    .map(|(id, score, distance)| (id, Some((score, distance))))
                    .collect();
                return Ok(());
            }
            if k.is_some() || mode.is_some() || oversample.is_some() {
                return Err(err(
                    tab.name(),
                    format!(
                        "k, mode and oversample are only meaningful with '{} MATCH :query'",
                        tab.decl.vector_column
                    ),
                ));
            }
            let (conditions, params) = tab.conditions(&args, &values);
            let sql = tab.map_select("rowid", &conditions) + " ORDER BY rowid";
            let mut stmt = tab.store.cached(&sql)?;
            self.rows = stmt
                .query_map(params_from_iter(params), |r| Ok((r.get(0)?, None)))?
                .collect::<rusqlite::Result<_>>()?;
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
        let tab = self.tab;
        let (rowid, scored) = self.rows[self.pos];
        if i == 0 {
            let Some((chunk, slot)) = tab.store.locate(rowid)? else {
                return ctx.set_result(&Value::Null);
            };
            return ctx.set_result(&tab.store.read_vector(chunk, slot)?);
        }
        if i == tab.col_distance() {
            return ctx.set_result(&scored.map(|s| s.1));
        }
        if i == tab.col_score() {
            return ctx.set_result(&scored.map(|s| s.0));
        }
        if i == tab.col_k() {
            return ctx.set_result(&self.k);
        }
        if i == tab.col_mode() {
            return ctx.set_result(&self.mode.map(|m| format!("{m:?}").to_ascii_lowercase()));
        }
        if i == tab.col_oversample() {
            return ctx.set_result(&self.oversample.map(|n| n as i64));
        }
        if i >= 1 && (i as usize) <= tab.decl.metas.len() {
            let mut cache = self.metas.borrow_mut();
            if cache.as_ref().is_none_or(|(p, _)| *p != self.pos) {
                *cache = Some((self.pos, tab.store.read_metas(rowid)?));
            }
            let metas = &cache.as_ref().expect("filled").1;
            return ctx.set_result(&metas[i as usize - 1]);
        }
        ctx.set_result(&Value::Null)
    }

    fn rowid(&self) -> rusqlite::Result<i64> {
        Ok(self.rows[self.pos].0)
    }
}

/// What the second connections (see `reader.rs`) of the exact and `int8` queries run on the
/// calling thread have read: chunks of int8 records, and candidate rows rescored. For tests and
/// diagnostics.
#[doc(hidden)]
pub fn second_connection_reads() -> (u64, u64) {
    reader::READS.with(|r| r.get())
}

/// The candidates of the exact and `int8` queries run on the calling thread (rows whose bounds
/// left them possible), and how many of those were read back and scored: reading stops once
/// the rest are known to be farther than the k-th. For tests and diagnostics.
#[doc(hidden)]
pub fn rescored_on_this_thread() -> (u64, u64) {
    exact::RESCORED_ON_THIS_THREAD.with(|n| n.get())
}

/// How many chunks of int8 records the exact and `int8` queries run on the calling thread have
/// kept in memory. For tests and diagnostics.
#[doc(hidden)]
pub fn chunks_kept_on_this_thread() -> u64 {
    exact::KEPT_ON_THIS_THREAD.with(|n| n.get())
}

/// What names a table's chunks across the connections of this process: the database file's
/// path and the table; `None` for an in-memory or temporary database (nothing to share).
fn image_scope(db: *mut ffi::sqlite3, schema: &str, table: &str) -> Option<String> {
    let schema_c = CString::new(schema).ok()?;
    // SAFETY: a live connection handle and a NUL-terminated schema name; the returned string
    // belongs to SQLite and is copied at once.
    let file = unsafe {
        let p = ffi::sqlite3_db_filename(db, schema_c.as_ptr());
        if p.is_null() {
            return None;
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    };
    (!file.is_empty()).then(|| format!("{file}\0{table}"))
}

/// The message of an error made by [`err`], without its `clip_index table: ` prefix.
fn strip_prefix(tab: &IndexTab, e: rusqlite::Error) -> String {
    let text = e.to_string();
    let prefix = format!("clip_index {}: ", tab.name());
    text.strip_prefix(&prefix).unwrap_or(&text).to_owned()
}

/// An integer argument within `lo..=hi`, or the message that says what was wrong.
fn int_in(v: ValueRef<'_>, lo: i64, hi: i64, what: &str) -> Result<i64, String> {
    match v {
        ValueRef::Integer(n) if (lo..=hi).contains(&n) => Ok(n),
        ValueRef::Integer(n) => Err(format!(
            "{what} must be an integer from {lo} to {hi}, found {n}"
        )),
        other => Err(format!(
            "{what} must be an integer from {lo} to {hi}, found {}",
            super::type_name(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_string_round_trips() {
        let args = vec![
            Arg::Match,
            Arg::K,
            Arg::Mode,
            Arg::Oversample,
            Arg::Meta(3, ">="),
            Arg::Rowid,
            Arg::Meta(0, " IS NOT NULL"),
            Arg::Meta(12, "!="),
        ];
        assert_eq!(decode(&encode(&args)), args);
    }

    #[test]
    fn declarations_are_parsed_and_checked() {
        let d = parse_declaration(
            "t",
            &[
                b"embedding float[4] distance_metric=l2",
                b"material text",
                b"year integer",
                b"content='embeddings'",
            ],
        )
        .unwrap();
        assert_eq!((d.vector_column.as_str(), d.dims), ("embedding", 4));
        assert_eq!(d.metric, Metric::L2);
        assert_eq!(d.metas.len(), 2);
        assert_eq!(d.content.as_deref(), Some("embeddings"));
        let e = |args: &[&[u8]]| parse_declaration("t", args).unwrap_err().to_string();
        assert!(e(&[b"material text"]).contains("no vector column"));
        assert!(e(&[b"v float[4]", b"distance text"]).contains("reserved"));
        assert!(e(&[b"v float[0]"]).contains("dimensions must be from 1"));
        assert!(e(&[b"v float[4]", b"metric=hamming"]).contains("unknown metric"));
        assert!(e(&[b"v float[4]", b"a text", b"A integer"]).contains("same name"));
    }
}
