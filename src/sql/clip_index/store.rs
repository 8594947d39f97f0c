//! The shadow tables of one `clip_index` table, read and written through the connection that
//! uses it, so every write is part of the user's transaction (and rolls back with it).
//!
//! For a table `t` in schema `s`:
//!
//! | table | columns | what |
//! |---|---|---|
//! | `t_config` | key, value (WITHOUT ROWID) | format, dims, capacity, metric, generation |
//! | `t_chunks` | id, version, free, validity | one small row per chunk; `free` slots left, the slot bitmap |
//! | `t_slots` | id, rowids | per chunk: the rowid of each slot (i64 LE) |
//! | `t_vectors` | id, vectors | per chunk: `capacity x dims` float32 LE, slot-major |
//! | `t_codes` | id, codes | (`codes=on`, the default) per chunk: one int8 record per slot ([`codes`]) |
//! | `t_map` | rowid, chunk, slot, metadata... | where each row lives, and its metadata |
//! | `t_hnsw` | id, data | (`hnsw=on`) the HNSW graph as saved, in parts of at most 64 MiB |
//! | `t_hnsw_log` | seq, rowid, token | (`hnsw=on`) rows written since the graph was saved |
//!
//! Tables of format 1 (made before stop 28) keep the slot bitmap in `t_slots` (id, validity,
//! rowids) instead; both formats are read and written.
//!
//! Blobs are written in place with incremental blob I/O (`sqlite3_blob_write`), so an insert
//! touches a few pages, not a whole chunk. Every write stores a fresh `version` on its chunk and
//! a fresh `generation` in `t_config` (values never reused, even after a rollback), which is how
//! readers learn what changed.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;

use rusqlite::blob::Blob;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Statement};

use crate::index::chunked::{bit, bitmap_bytes, first_free, Chunk};
use crate::index::codes;
use crate::vector::codec::f32_le_bytes;

/// A value that no earlier write of any process has stored: a per-process random start plus a
/// counter. Stored as a chunk's version and as the index's generation, it is never reused, so a
/// rollback (which restores an older value) is noticed like any other change.
pub fn fresh_version() -> i64 {
    static NEXT: OnceLock<AtomicI64> = OnceLock::new();
    NEXT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = nanos ^ (u64::from(std::process::id()) << 44) ^ 0x9E37_79B9_7F4A_7C15;
        // Positive, with room for 2^40 increments before wrapping.
        AtomicI64::new((seed >> 2) as i64 & 0x3FFF_FFFF_FF00_0000)
    })
    .fetch_add(1, Ordering::Relaxed)
}

/// A metadata column: stored in `t_map`, filterable before k.
#[derive(Debug, Clone)]
pub struct MetaColumn {
    pub name: String,
    /// The declared type (TEXT, INTEGER, REAL, BLOB or empty), used as the column affinity.
    pub decl: String,
}

/// Prepared statements kept between calls (rusqlite's own cache needs a crate this project
/// does not otherwise use). A statement is taken out while in use and put back when its guard
/// drops, so two in use at once never share one.
#[derive(Default)]
pub struct StatementCache {
    statements: RefCell<HashMap<Key, Statement<'static>>>,
}

/// What a cached statement is found by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// A `'static` template (see [`Store::stmt`]), by address and length: a lookup hashes two
    /// words instead of the SQL, and builds no string.
    Template(usize, usize),
    /// SQL made at run time.
    Sql(String),
}

/// A statement on loan from the cache.
pub struct Cached<'a> {
    cache: &'a StatementCache,
    key: Option<Key>,
    statement: Option<Statement<'static>>,
}

impl<'a> Deref for Cached<'a> {
    type Target = Statement<'a>;
    fn deref(&self) -> &Statement<'a> {
        self.statement.as_ref().expect("present until drop")
    }
}

impl<'a> DerefMut for Cached<'a> {
    fn deref_mut(&mut self) -> &mut Statement<'a> {
        // Shortening the lifetime: the statement cannot outlive the loan.
        let s: &mut Statement<'static> = self.statement.as_mut().expect("present until drop");
        unsafe { &mut *(s as *mut Statement<'static>).cast::<Statement<'a>>() }
    }
}

impl Drop for Cached<'_> {
    fn drop(&mut self) {
        if let (Some(key), Some(s)) = (self.key.take(), self.statement.take()) {
            self.cache.statements.borrow_mut().insert(key, s);
        }
    }
}

/// One table's shadow tables.
pub struct Store {
    /// Declared before `conn` so that the statements are finalized first.
    statements: StatementCache,
    /// Boxed so that its address, which the cached statements borrow, never moves.
    pub conn: Box<Connection>,
    pub schema: String,
    pub table: String,
    pub dims: usize,
    pub capacity: usize,
    pub metas: Vec<MetaColumn>,
    /// Whether the table keeps an HNSW graph (and so logs every written rowid).
    pub hnsw: bool,
    /// Whether the table keeps int8 codes with error bounds (`t_codes`) for exact search.
    pub codes: bool,
    /// Where each chunk's slot bitmap is: in its `t_chunks` row (format 2, tables made since
    /// stop 28), so an insert updates it with the free count, or in `t_slots` (format 1).
    pub validity_in_chunks: bool,
    /// The names of the shadow tables opened as blobs, made once (a write opens several).
    blob_tables: Vec<(&'static str, String)>,
    /// The chunk and the version of this connection's last insert, while it is known to be
    /// the transaction's last write and nothing on this connection has read the generation
    /// since: a next insert into that chunk, which finds that version still stored (no
    /// savepoint or statement rolled the insert back), leaves the generation as it is. See
    /// [`Store::insert`].
    recent_insert: Cell<Option<(i64, i64)>>,
}

/// Every shadow table's suffix.
const SHADOW_SUFFIXES: [&str; 8] = [
    "config", "chunks", "slots", "vectors", "codes", "map", "hnsw", "hnsw_log",
];

/// Largest part of a saved graph (SQLite's default limit on a value is 1 GB).
const GRAPH_PART_BYTES: usize = 64 << 20;

pub fn quote(id: &str) -> String {
    format!("\"{}\"", id.replace('"', "\"\""))
}

type Res<T> = rusqlite::Result<T>;

fn corrupt(message: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT_VTAB),
        Some(message),
    )
}

impl Store {
    pub fn new(
        conn: Connection,
        schema: String,
        table: String,
        dims: usize,
        capacity: usize,
        metas: Vec<MetaColumn>,
    ) -> Store {
        Store {
            statements: StatementCache::default(),
            conn: Box::new(conn),
            schema,
            dims,
            capacity,
            metas,
            hnsw: false,
            codes: false,
            validity_in_chunks: true,
            recent_insert: Cell::new(None),
            blob_tables: ["chunks", "slots", "vectors", "codes", "hnsw"]
                .into_iter()
                .map(|suffix| (suffix, format!("{table}_{suffix}")))
                .collect(),
            table,
        }
    }

    /// A prepared statement for `sql`, prepared once per table and connection.
    pub fn cached(&self, sql: &str) -> Res<Cached<'_>> {
        self.loan(Key::Sql(sql.to_owned()), || sql.to_owned())
    }

    /// A prepared statement on the shadow tables, written as a template: `{map}`, `{chunks}`
    /// and the other suffixes stand for the quoted shadow table, `{meta_columns}` for `, "a",
    /// "b"` (the metadata columns), `{meta_params}` for `, ?4, ?5` (one parameter each,
    /// after the first three) and `{schema}` for the quoted schema. The template is expanded
    /// once, when first prepared.
    pub fn stmt(&self, template: &'static str) -> Res<Cached<'_>> {
        self.loan(
            Key::Template(template.as_ptr() as usize, template.len()),
            || self.expand(template),
        )
    }

    fn loan(&self, key: Key, sql: impl FnOnce() -> String) -> Res<Cached<'_>> {
        let taken = self.statements.statements.borrow_mut().remove_entry(&key);
        let (key, statement) = match taken {
            Some(found) => found,
            None => {
                let s = self.conn.prepare(&sql())?;
                // SAFETY: the statement borrows `*self.conn`, a box that lives as long as the
                // Store and never moves; the cache is dropped before it (field order).
                let s = unsafe { std::mem::transmute::<Statement<'_>, Statement<'static>>(s) };
                (key, s)
            }
        };
        Ok(Cached {
            cache: &self.statements,
            key: Some(key),
            statement: Some(statement),
        })
    }

    /// The SQL of a [`stmt`](Self::stmt) template.
    fn expand(&self, template: &str) -> String {
        let mut out = String::with_capacity(template.len() + 64);
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = open + rest[open..].find('}').expect("a template's { is closed");
            match &rest[open + 1..close] {
                "meta_columns" => {
                    for m in &self.metas {
                        out.push_str(", ");
                        out.push_str(&quote(&m.name));
                    }
                }
                "schema" => out.push_str(&quote(&self.schema)),
                "meta_params" => {
                    for i in 0..self.metas.len() {
                        out.push_str(&format!(", ?{}", i + 4));
                    }
                }
                suffix => {
                    // Checked in release builds too (the tests run them): once per prepare.
                    assert!(SHADOW_SUFFIXES.contains(&suffix), "unknown {{{suffix}}}");
                    out.push_str(&self.shadow(suffix));
                }
            }
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        out
    }

    /// `"schema"."table_suffix"`.
    pub fn shadow(&self, suffix: &str) -> String {
        format!(
            "{}.{}",
            quote(&self.schema),
            quote(&format!("{}_{suffix}", self.table))
        )
    }

    fn shadow_name(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.table)
    }

    /// Creates the shadow tables (xCreate).
    pub fn create(&self, metric: &str) -> Res<()> {
        let metas: String = self
            .metas
            .iter()
            .map(|m| format!(", {} {}", quote(&m.name), m.decl))
            .collect();
        let schema = quote(&self.schema);
        let chunks_table = quote(&self.shadow_name("chunks"));
        let free_index = quote(&self.shadow_name("chunks_free"));
        self.conn.execute_batch(&format!(
            "CREATE TABLE {config}(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
             CREATE TABLE {chunks}(id INTEGER PRIMARY KEY, version INTEGER NOT NULL,
                                   free INTEGER NOT NULL, validity BLOB NOT NULL);
             CREATE INDEX {schema}.{free_index} ON {chunks_table}(id) WHERE free > 0;
             CREATE TABLE {slots}(id INTEGER PRIMARY KEY, rowids BLOB NOT NULL);
             CREATE TABLE {vectors}(id INTEGER PRIMARY KEY, vectors BLOB NOT NULL);
             CREATE TABLE {map}(rowid INTEGER PRIMARY KEY, chunk INTEGER NOT NULL,
                                slot INTEGER NOT NULL{metas});",
            config = self.shadow("config"),
            chunks = self.shadow("chunks"),
            slots = self.shadow("slots"),
            vectors = self.shadow("vectors"),
            map = self.shadow("map"),
        ))?;
        if self.hnsw {
            self.create_graph_tables()?;
        }
        if self.codes {
            self.conn.execute_batch(&format!(
                "CREATE TABLE {}(id INTEGER PRIMARY KEY, codes BLOB NOT NULL);",
                self.shadow("codes")
            ))?;
        }
        let config = self.shadow("config");
        for (key, value) in [
            ("format", Value::Integer(2)),
            ("dims", Value::Integer(self.dims as i64)),
            ("capacity", Value::Integer(self.capacity as i64)),
            ("metric", Value::Text(metric.to_owned())),
            ("generation", Value::Integer(fresh_version())),
            ("hnsw_snapshot", Value::Integer(fresh_version())),
            ("hnsw_rows", Value::Integer(0)),
            ("hnsw_epoch", Value::Integer(0)),
            ("identity", Value::Integer(fresh_version())),
            ("codes", Value::Integer(i64::from(self.codes))),
        ] {
            self.conn.execute(
                &format!("INSERT INTO {config}(key, value) VALUES (?1, ?2)"),
                params![key, value],
            )?;
        }
        Ok(())
    }

    /// Creates the graph's two shadow tables (`hnsw=on`).
    fn create_graph_tables(&self) -> Res<()> {
        self.conn.execute_batch(&format!(
            "CREATE TABLE {graph}(id INTEGER PRIMARY KEY, data BLOB NOT NULL);
             CREATE TABLE {log}(seq INTEGER PRIMARY KEY, rowid INTEGER NOT NULL,
                                token INTEGER NOT NULL);",
            graph = self.shadow("hnsw"),
            log = self.shadow("hnsw_log"),
        ))
    }

    /// Drops the shadow tables (xDestroy).
    pub fn drop_all(&self) -> Res<()> {
        for suffix in SHADOW_SUFFIXES {
            self.conn
                .execute_batch(&format!("DROP TABLE IF EXISTS {};", self.shadow(suffix)))?;
        }
        Ok(())
    }

    /// Records that `rowid` was written, for the graph to catch up (with `hnsw=on`).
    fn log_change(&self, rowid: i64) -> Res<()> {
        if !self.hnsw {
            return Ok(());
        }
        self.stmt("INSERT INTO {hnsw_log}(rowid, token) VALUES (?1, ?2)")?
            .execute(params![rowid, fresh_version()])?;
        Ok(())
    }

    /// The saved graph: its token (a fresh value per save), how many rows it held, and its
    /// epoch (how many saves came before it: it orders committed saves).
    pub fn graph_saved(&self) -> Res<(i64, i64, i64)> {
        // Tables made before epochs were recorded start at 0.
        let epoch = match self.config("hnsw_epoch")? {
            Some(Value::Integer(n)) => n,
            _ => 0,
        };
        Ok((
            self.int_config("hnsw_snapshot")?,
            self.saved_graph_rows()?,
            epoch,
        ))
    }

    /// How many rows the saved graph held (read after every write of an `hnsw=on` table).
    pub fn saved_graph_rows(&self) -> Res<i64> {
        self.int_config("hnsw_rows")
    }

    /// Log entries after `seq`: (seq, rowid, token), in order.
    pub fn log_after(&self, seq: i64) -> Res<Vec<(i64, i64, i64)>> {
        self.stmt("SELECT seq, rowid, token FROM {hnsw_log} WHERE seq > ?1 ORDER BY seq")?
            .query_map([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect()
    }

    /// The token of log entry `seq`, if it exists.
    pub fn log_token(&self, seq: i64) -> Res<Option<i64>> {
        self.stmt("SELECT token FROM {hnsw_log} WHERE seq = ?1")?
            .query_row([seq], |r| r.get(0))
            .optional()
    }

    /// The last log entry: (seq, token).
    pub fn log_last(&self) -> Res<Option<(i64, i64)>> {
        self.stmt("SELECT seq, token FROM {hnsw_log} ORDER BY seq DESC LIMIT 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    }

    /// How many rows were written since the graph was saved (the log's last seq: the log
    /// only ever empties whole).
    pub fn log_len(&self) -> Res<i64> {
        self.stmt("SELECT coalesce(max(seq), 0) FROM {hnsw_log}")?
            .query_row([], |r| r.get(0))
    }

    /// The saved graph's bytes (empty when none was saved).
    pub fn read_graph(&self) -> Res<Vec<u8>> {
        let parts: Vec<(i64, i64)> = self
            .stmt("SELECT id, length(data) FROM {hnsw} ORDER BY id")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Res<_>>()?;
        let total: i64 = parts.iter().map(|p| p.1).sum();
        let mut bytes = vec![0u8; total as usize];
        let mut at = 0usize;
        for (id, len) in parts {
            self.blob("hnsw", "data", id, true)?
                .read_at_exact(&mut bytes[at..at + len as usize], 0)?;
            at += len as usize;
        }
        Ok(bytes)
    }

    /// Replaces the saved graph, empties the log and records a fresh token and the next
    /// epoch; returns both.
    pub fn write_graph(&self, bytes: &[u8], rows: usize) -> Res<(i64, i64)> {
        self.conn
            .execute(&format!("DELETE FROM {}", self.shadow("hnsw")), [])?;
        for (i, part) in bytes.chunks(GRAPH_PART_BYTES).enumerate() {
            self.conn.execute(
                &format!(
                    "INSERT INTO {}(id, data) VALUES (?1, ?2)",
                    self.shadow("hnsw")
                ),
                params![i as i64 + 1, part],
            )?;
        }
        self.conn
            .execute(&format!("DELETE FROM {}", self.shadow("hnsw_log")), [])?;
        let token = fresh_version();
        let (_, _, epoch) = self.graph_saved()?;
        for (key, value) in [
            ("hnsw_snapshot", token),
            ("hnsw_rows", rows as i64),
            ("hnsw_epoch", epoch + 1),
        ] {
            self.stmt("INSERT OR REPLACE INTO {config}(key, value) VALUES (?1, ?2)")?
                .execute(params![key, value])?;
        }
        self.bump_generation()?;
        Ok((token, epoch + 1))
    }

    /// The stored vectors of `rowids` (None for a rowid not in the index), read chunk by
    /// chunk through one blob handle.
    pub fn vectors_of(&self, rowids: &[i64]) -> Res<Vec<(i64, Option<Vec<f32>>)>> {
        let mut located = Vec::with_capacity(rowids.len());
        let mut out = Vec::with_capacity(rowids.len());
        for &rowid in rowids {
            match self.locate(rowid)? {
                Some((chunk, slot)) => located.push((chunk, slot, rowid)),
                None => out.push((rowid, None)),
            }
        }
        located.sort_unstable();
        let bytes = self.dims * 4;
        let mut blob: Option<(i64, Blob<'_>)> = None;
        let mut buf = vec![0u8; bytes];
        for (chunk, slot, rowid) in located {
            match &mut blob {
                Some((open, b)) if *open != chunk => {
                    b.reopen(chunk)?;
                    *open = chunk;
                }
                Some(_) => {}
                None => blob = Some((chunk, self.blob("vectors", "vectors", chunk, true)?)),
            }
            let (_, b) = blob.as_ref().expect("opened");
            b.read_at_exact(&mut buf, slot * bytes)?;
            out.push((rowid, Some(bytes_to_f32(&buf))));
        }
        Ok(out)
    }

    /// A stored configuration value.
    pub fn config(&self, key: &str) -> Res<Option<Value>> {
        self.stmt("SELECT value FROM {config} WHERE key = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()
    }

    /// A stored configuration value that must be an integer.
    fn int_config(&self, key: &str) -> Res<i64> {
        match self.config(key)? {
            Some(Value::Integer(n)) => Ok(n),
            other => Err(corrupt(format!(
                "{}: {key} is {other:?} in {}",
                self.table,
                self.shadow("config")
            ))),
        }
    }

    /// The index's generation: moves on every write, from any connection.
    pub fn generation(&self) -> Res<i64> {
        // A reader may now keep what it reads under this generation: the next write moves it.
        self.recent_insert.set(None);
        self.int_config("generation")
    }

    /// Forgets the last insert: called when a transaction begins or ends (another connection
    /// may write between two of this one's transactions).
    pub fn transaction_boundary(&self) {
        self.recent_insert.set(None);
    }

    /// Rows in the index.
    pub fn row_count(&self) -> Res<i64> {
        self.stmt("SELECT count(*) FROM {map}")?
            .query_row([], |r| r.get(0))
    }

    fn bump_generation(&self) -> Res<()> {
        self.recent_insert.set(None);
        self.stmt("UPDATE {config} SET value = ?1 WHERE key = 'generation'")?
            .execute([fresh_version()])?;
        Ok(())
    }

    /// Every chunk's (id, version), ordered by id.
    pub fn chunk_versions(&self) -> Res<Vec<(i64, i64)>> {
        self.stmt("SELECT id, version FROM {chunks} ORDER BY id")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect()
    }

    /// Whether the table's schema is in WAL mode.
    pub fn wal(&self) -> Res<bool> {
        let mode: String = self
            .stmt("PRAGMA {schema}.journal_mode")?
            .query_row([], |r| r.get(0))?;
        Ok(mode.eq_ignore_ascii_case("wal"))
    }

    /// An incremental blob handle on a shadow table's row.
    pub fn blob(&self, suffix: &str, column: &str, row: i64, read_only: bool) -> Res<Blob<'_>> {
        let name = self
            .blob_tables
            .iter()
            .find(|(s, _)| *s == suffix)
            .map(|(_, name)| name.as_str())
            .expect("a shadow table opened as a blob is in blob_tables");
        self.conn
            .blob_open(self.schema.as_str(), name, column, row, read_only)
    }

    /// Reads one chunk whole: three blob reads, no row per vector.
    pub fn load_chunk(&self, id: i64, version: i64) -> Res<Chunk> {
        let validity = self.read_all(&self.validity_blob(id, true)?)?;
        let rowid_bytes = self.read_all(&self.blob("slots", "rowids", id, true)?)?;
        let rowids: Vec<i64> = rowid_bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let vectors = read_f32s(&self.blob("vectors", "vectors", id, true)?)?;
        Chunk::new(
            id,
            version,
            self.capacity,
            self.dims,
            validity,
            rowids,
            vectors,
        )
        .map_err(|e| corrupt(format!("{}: {e}", self.table)))
    }

    fn read_all(&self, blob: &Blob<'_>) -> Res<Vec<u8>> {
        let mut buf = vec![0u8; blob.len()];
        blob.read_at_exact(&mut buf, 0)?;
        Ok(buf)
    }

    /// Where a row lives: (chunk, slot).
    pub fn locate(&self, rowid: i64) -> Res<Option<(i64, usize)>> {
        self.stmt("SELECT chunk, slot FROM {map} WHERE rowid = ?1")?
            .query_row([rowid], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize)))
            .optional()
    }

    /// The stored vector of a row, as a float32 blob.
    pub fn read_vector(&self, chunk: i64, slot: usize) -> Res<Vec<u8>> {
        let bytes = self.dims * 4;
        let mut buf = vec![0u8; bytes];
        self.blob("vectors", "vectors", chunk, true)?
            .read_at_exact(&mut buf, slot * bytes)?;
        Ok(buf)
    }

    /// The metadata values of a row.
    pub fn read_metas(&self, rowid: i64) -> Res<Vec<Value>> {
        if self.metas.is_empty() {
            return Ok(Vec::new());
        }
        let cols: Vec<String> = self.metas.iter().map(|m| quote(&m.name)).collect();
        self.cached(&format!(
            "SELECT {} FROM {} WHERE rowid = ?1",
            cols.join(", "),
            self.shadow("map")
        ))?
        .query_row([rowid], |r| {
            (0..self.metas.len())
                .map(|i| r.get::<_, Value>(i))
                .collect()
        })
    }

    /// The next automatic rowid (largest + 1, as for an ordinary table).
    pub fn next_rowid(&self) -> Res<i64> {
        self.stmt("SELECT coalesce(max(rowid), 0) + 1 FROM {map}")?
            .query_row([], |r| r.get(0))
    }

    /// Makes chunk `id`, empty: its rows in the tables with one row per chunk.
    fn create_chunk(&self, id: i64) -> Res<()> {
        let bitmap = bitmap_bytes(self.capacity) as i64;
        let rowids = (self.capacity * 8) as i64;
        if self.validity_in_chunks {
            self.stmt(
                "INSERT INTO {chunks}(id, version, free, validity) \
                 VALUES (?1, ?2, ?3, zeroblob(?4))",
            )?
            .execute(params![id, fresh_version(), self.capacity as i64, bitmap])?;
            self.stmt("INSERT INTO {slots}(id, rowids) VALUES (?1, zeroblob(?2))")?
                .execute(params![id, rowids])?;
        } else {
            self.stmt("INSERT INTO {chunks}(id, version, free) VALUES (?1, ?2, ?3)")?
                .execute(params![id, fresh_version(), self.capacity as i64])?;
            self.stmt(
                "INSERT INTO {slots}(id, validity, rowids) \
                 VALUES (?1, zeroblob(?2), zeroblob(?3))",
            )?
            .execute(params![id, bitmap, rowids])?;
        }
        self.stmt("INSERT INTO {vectors}(id, vectors) VALUES (?1, zeroblob(?2))")?
            .execute(params![id, (self.capacity * self.dims * 4) as i64])?;
        if self.codes {
            self.stmt("INSERT INTO {codes}(id, codes) VALUES (?1, zeroblob(?2))")?
                .execute(params![id, self.codes_bytes() as i64])?;
        }
        Ok(())
    }

    /// An incremental blob handle on a chunk's slot bitmap, wherever the format keeps it.
    fn validity_blob(&self, chunk: i64, read_only: bool) -> Res<Blob<'_>> {
        let table = if self.validity_in_chunks {
            "chunks"
        } else {
            "slots"
        };
        self.blob(table, "validity", chunk, read_only)
    }

    /// Stores a new row in the lowest free slot (a new chunk when every chunk is full), unless
    /// `rowid` is taken: then nothing is written and the answer is false. The caller has
    /// checked the vector.
    pub fn insert(&self, rowid: i64, vector: &[f32], metas: &[Value]) -> Res<bool> {
        // Where the row goes, found without writing anything: the lowest chunk with room, its
        // version and (format 2) its bitmap, in one statement.
        let lowest: Option<(i64, i64, Option<Vec<u8>>)> = if self.validity_in_chunks {
            self.stmt(
                "SELECT id, version, validity FROM {chunks} WHERE free > 0 ORDER BY id LIMIT 1",
            )?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?, Some(r.get(2)?))))
            .optional()?
        } else {
            self.stmt("SELECT id, version FROM {chunks} WHERE free > 0 ORDER BY id LIMIT 1")?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?, None)))
                .optional()?
        };
        // Readers keep what they have read while the generation stays the same, so every
        // write moves it, except an insert that follows this connection's own insert into the
        // same chunk with nothing in between: that chunk still holding the version the last
        // insert gave it proves the insert was not rolled back (versions are never reused),
        // and so the generation is still the one written in this transaction, which no reader
        // has seen (reading it forgets the insert), nor any other connection (uncommitted).
        let keep_generation = lowest
            .as_ref()
            .is_some_and(|(id, version, _)| Some((*id, *version)) == self.recent_insert.get());
        // Format 1 reads and writes the bitmap through one handle on its `t_slots` row.
        let mut slots_blob = None;
        let (chunk, mut bitmap, new_chunk) = match lowest {
            Some((id, _, Some(bitmap))) => (id, bitmap, false),
            Some((id, _, None)) => {
                let blob = self.validity_blob(id, false)?;
                let bitmap = self.read_all(&blob)?;
                slots_blob = Some(blob);
                (id, bitmap, false)
            }
            None => {
                let next: i64 = self
                    .stmt("SELECT coalesce(max(id), 0) + 1 FROM {chunks}")?
                    .query_row([], |r| r.get(0))?;
                (next, vec![0u8; bitmap_bytes(self.capacity)], true)
            }
        };
        let slot = first_free(&bitmap, self.capacity).ok_or_else(|| {
            corrupt(format!(
                "{}: chunk {chunk} has free > 0 in {} but no free slot",
                self.table,
                self.shadow("chunks")
            ))
        })?;
        // The map's primary key says whether the rowid is free, before anything else is
        // written (one statement instead of a lookup and then the insert).
        let mut values: Vec<Value> = vec![
            Value::Integer(rowid),
            Value::Integer(chunk),
            Value::Integer(slot as i64),
        ];
        values.extend(metas.iter().cloned());
        let mapped = self
            .stmt(
                "INSERT INTO {map}(rowid, chunk, slot{meta_columns}) \
                 VALUES (?1, ?2, ?3{meta_params})",
            )?
            .execute(params_from_iter(values));
        match mapped {
            // A loaded extension's connection may not have extended result codes on, so a
            // constraint failure is told apart by looking the rowid up (the map has no other
            // constraint that an insert can break, but this does not rely on it).
            Err(rusqlite::Error::SqliteFailure(e, message))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                if self.locate(rowid)?.is_some() {
                    return Ok(false);
                }
                return Err(rusqlite::Error::SqliteFailure(e, message));
            }
            other => other?,
        };
        if new_chunk {
            self.create_chunk(chunk)?;
        }
        bitmap[slot / 8] |= 1 << (slot % 8);
        if !self.validity_in_chunks {
            // Written and closed before the same row's rowids are opened.
            let mut blob = match slots_blob {
                Some(blob) => blob,
                None => self.validity_blob(chunk, false)?,
            };
            blob.write_at(&bitmap[slot / 8..=slot / 8], slot / 8)?;
        }
        self.blob("slots", "rowids", chunk, false)?
            .write_at(&rowid.to_le_bytes(), slot * 8)?;
        self.write_vector(chunk, slot, vector)?;
        let version = fresh_version();
        if self.validity_in_chunks {
            self.stmt(
                "UPDATE {chunks} SET free = free - 1, version = ?2, validity = ?3 WHERE id = ?1",
            )?
            .execute(params![chunk, version, bitmap])?;
        } else {
            self.stmt("UPDATE {chunks} SET free = free - 1, version = ?2 WHERE id = ?1")?
                .execute(params![chunk, version])?;
        }
        self.log_change(rowid)?;
        if !keep_generation {
            self.bump_generation()?;
        }
        self.recent_insert.set(Some((chunk, version)));
        Ok(true)
    }

    fn write_vector(&self, chunk: i64, slot: usize, vector: &[f32]) -> Res<()> {
        self.blob("vectors", "vectors", chunk, false)?
            .write_at(&f32_le_bytes(vector), slot * self.dims * 4)?;
        if self.codes {
            let size = codes::record_bytes(self.dims);
            let mut record = vec![0u8; size];
            codes::encode(vector, &mut record);
            self.blob("codes", "codes", chunk, false)?
                .write_at(&record, slot * size)?;
        }
        Ok(())
    }

    /// The shadow tables with one row per chunk.
    fn chunk_tables(&self) -> impl Iterator<Item = &'static str> {
        ["chunks", "slots", "vectors"]
            .into_iter()
            .chain(self.codes.then_some("codes"))
    }

    /// Bytes of one chunk's codes.
    pub fn codes_bytes(&self) -> usize {
        self.capacity * codes::record_bytes(self.dims)
    }

    /// Replaces a row's vector in place.
    pub fn overwrite_vector(&self, rowid: i64, chunk: i64, slot: usize, vector: &[f32]) -> Res<()> {
        self.write_vector(chunk, slot, vector)?;
        self.log_change(rowid)?;
        self.stmt("UPDATE {chunks} SET version = ?2 WHERE id = ?1")?
            .execute(params![chunk, fresh_version()])?;
        self.bump_generation()
    }

    /// Replaces a row's metadata.
    pub fn update_metas(&self, rowid: i64, metas: &[Value]) -> Res<()> {
        if self.metas.is_empty() {
            return Ok(());
        }
        let sets: Vec<String> = self
            .metas
            .iter()
            .enumerate()
            .map(|(i, m)| format!("{} = ?{}", quote(&m.name), i + 2))
            .collect();
        let mut values = vec![Value::Integer(rowid)];
        values.extend(metas.iter().cloned());
        self.cached(&format!(
            "UPDATE {} SET {} WHERE rowid = ?1",
            self.shadow("map"),
            sets.join(", ")
        ))?
        .execute(params_from_iter(values))?;
        Ok(())
    }

    /// Deletes a row; a chunk left empty is deleted with it (its pages go back to the
    /// database's free list). Returns whether the row existed.
    pub fn delete(&self, rowid: i64) -> Res<bool> {
        let Some((chunk, slot)) = self.locate(rowid)? else {
            return Ok(false);
        };
        let mut validity_blob = self.validity_blob(chunk, false)?;
        let mut byte = [0u8];
        validity_blob.read_at_exact(&mut byte, slot / 8)?;
        validity_blob.write_at(&[byte[0] & !(1 << (slot % 8))], slot / 8)?;
        drop(validity_blob);
        if self.codes {
            // The record's live flag (see `codes`): the bounded scan skips the slot.
            self.blob("codes", "codes", chunk, false)?.write_at(
                &[0u8; 4],
                slot * codes::record_bytes(self.dims) + codes::LIVE_AT,
            )?;
        }
        self.stmt("DELETE FROM {map} WHERE rowid = ?1")?
            .execute([rowid])?;
        let free: i64 = self
            .stmt("UPDATE {chunks} SET free = free + 1, version = ?2 WHERE id = ?1")?
            .execute(params![chunk, fresh_version()])
            .and_then(|_| {
                self.stmt("SELECT free FROM {chunks} WHERE id = ?1")?
                    .query_row([chunk], |r| r.get(0))
            })?;
        self.log_change(rowid)?;
        if free as usize >= self.capacity {
            for suffix in self.chunk_tables() {
                self.cached(&format!(
                    "DELETE FROM {} WHERE id = ?1",
                    self.shadow(suffix)
                ))?
                .execute([chunk])?;
            }
        }
        self.bump_generation()?;
        Ok(true)
    }

    /// Deletes every row (and, with `hnsw=on`, the saved graph: an empty one is saved).
    pub fn delete_all(&self) -> Res<()> {
        for suffix in self.chunk_tables().chain(["map"]) {
            self.conn
                .execute(&format!("DELETE FROM {}", self.shadow(suffix)), [])?;
        }
        if self.hnsw {
            self.write_graph(&[], 0)?;
        }
        self.bump_generation()
    }

    /// Moves rows out of the highest chunks into free slots of lower ones until no lower chunk
    /// has room, so deleted slots are filled and emptied chunks are deleted. Returns how many
    /// rows moved.
    pub fn compact(&self) -> Res<usize> {
        let mut moved = 0;
        loop {
            let lowest_free: Option<i64> = self
                .conn
                .query_row(
                    &format!(
                        "SELECT id FROM {} WHERE free > 0 ORDER BY id LIMIT 1",
                        self.shadow("chunks")
                    ),
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let highest: Option<i64> = self.conn.query_row(
                &format!("SELECT max(id) FROM {}", self.shadow("chunks")),
                [],
                |r| r.get(0),
            )?;
            let (Some(low), Some(high)) = (lowest_free, highest) else {
                return Ok(moved);
            };
            if low >= high {
                return Ok(moved);
            }
            // Move one row of the highest chunk; the insert lands in the lowest free slot.
            let validity = self.read_all(&self.validity_blob(high, true)?)?;
            let Some(slot) = (0..self.capacity).find(|&s| bit(&validity, s)) else {
                return Err(corrupt(format!(
                    "{}: chunk {high} is in {} but has no rows",
                    self.table,
                    self.shadow("chunks")
                )));
            };
            let mut rowid = [0u8; 8];
            self.blob("slots", "rowids", high, true)?
                .read_at_exact(&mut rowid, slot * 8)?;
            let rowid = i64::from_le_bytes(rowid);
            let vector = bytes_to_f32(&self.read_vector(high, slot)?);
            let metas = self.read_metas(rowid)?;
            self.delete(rowid)?;
            if !self.insert(rowid, &vector, &metas)? {
                return Err(corrupt(format!(
                    "{}: rowid {rowid} is still mapped after its delete",
                    self.table
                )));
            }
            moved += 1;
        }
    }

    /// Internal consistency: every chunk's bitmap agrees with its free count and with `t_map`,
    /// and `t_map` has no row that no chunk holds. Returns the problems found (at most a few).
    pub fn check(&self) -> Res<Vec<String>> {
        let mut problems = Vec::new();
        let mut held = 0usize;
        let chunks: Vec<(i64, i64)> = self
            .conn
            .prepare(&format!(
                "SELECT id, free FROM {} ORDER BY id",
                self.shadow("chunks")
            ))?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Res<_>>()?;
        for (id, free) in chunks {
            let chunk = self.load_chunk(id, 0)?;
            let live = chunk.live();
            held += live;
            if live + free as usize != self.capacity {
                problems.push(format!(
                    "chunk {id}: {live} rows in its bitmap but free = {free} of {}",
                    self.capacity
                ));
            }
            if self.codes {
                self.check_codes(&chunk, &mut problems)?;
            }
            for slot in (0..self.capacity).filter(|&s| chunk.is_valid(s)) {
                let rowid = chunk.rowids[slot];
                if self.locate(rowid)? != Some((id, slot)) {
                    problems.push(format!(
                        "rowid {rowid}: in chunk {id} slot {slot} but not mapped there"
                    ));
                }
            }
        }
        let mapped: i64 = self.conn.query_row(
            &format!("SELECT count(*) FROM {}", self.shadow("map")),
            [],
            |r| r.get(0),
        )?;
        if mapped as usize != held {
            problems.push(format!(
                "{mapped} rows in {} but {held} in the chunks",
                self.shadow("map")
            ));
        }
        problems.truncate(10);
        Ok(problems)
    }
}

impl Store {
    /// A chunk's codes agree with its rows: one record per slot, live exactly where the
    /// bitmap is set, and each live record the encoding of the stored vector (the exact
    /// search's bounds are only as true as the records).
    fn check_codes(&self, chunk: &Chunk, problems: &mut Vec<String>) -> Res<()> {
        let id = chunk.id;
        let stored = match self.blob("codes", "codes", id, true) {
            Ok(b) => self.read_all(&b)?,
            Err(_) => {
                problems.push(format!("chunk {id}: no codes in {}", self.shadow("codes")));
                return Ok(());
            }
        };
        if stored.len() != self.codes_bytes() {
            problems.push(format!(
                "chunk {id}: {} bytes of codes, expected {}",
                stored.len(),
                self.codes_bytes()
            ));
            return Ok(());
        }
        let size = codes::record_bytes(self.dims);
        let mut expected = vec![0u8; size];
        for (slot, record) in stored.chunks_exact(size).enumerate() {
            let valid = chunk.is_valid(slot);
            if codes::live(record) != valid {
                problems.push(format!(
                    "chunk {id} slot {slot}: the codes say {}, the bitmap {}",
                    if codes::live(record) { "live" } else { "empty" },
                    if valid { "live" } else { "empty" }
                ));
                continue;
            }
            if valid {
                codes::encode(chunk.row(slot, self.dims), &mut expected);
                if record != expected.as_slice() {
                    problems.push(format!(
                        "rowid {}: its codes do not match its vector (chunk {id} slot {slot})",
                        chunk.rowids[slot]
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Reads a whole float32 blob straight into a `Vec<f32>` (one copy, no zero-fill).
fn read_f32s(blob: &Blob<'_>) -> Res<Vec<f32>> {
    let len = blob.len();
    let mut v: Vec<f32> = Vec::with_capacity(len / 4);
    // SAFETY: the spare capacity is `len / 4` floats = at least `len - len % 4` bytes; viewed
    // as uninitialized bytes it is only written by the read, and `set_len` covers exactly the
    // floats the read filled.
    let spare = unsafe {
        std::slice::from_raw_parts_mut(
            v.spare_capacity_mut()
                .as_mut_ptr()
                .cast::<MaybeUninit<u8>>(),
            (len / 4) * 4,
        )
    };
    blob.raw_read_at_exact(spare, 0)?;
    unsafe { v.set_len(len / 4) };
    if cfg!(target_endian = "big") {
        for x in &mut v {
            *x = f32::from_bits(u32::from_le(x.to_bits()));
        }
    }
    Ok(v)
}

pub fn bytes_to_f32(b: &[u8]) -> Vec<f32> {
    let mut v = vec![0.0f32; b.len() / 4];
    crate::vector::codec::f32_from_le(&b[..v.len() * 4], &mut v);
    v
}

/// A value as an owned [`Value`] (text that is not UTF-8 is kept as a blob).
pub fn owned(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(s) => Value::Text(s.to_owned()),
            Err(_) => Value::Blob(t.to_vec()),
        },
        other => Value::try_from(other).unwrap_or(Value::Null),
    }
}
