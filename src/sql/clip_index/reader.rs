//! A second connection to the database file of a `clip_index` table, which reads part of what
//! an exact query streams, on another thread.
//!
//! Copying ~0.5 GB of records out of SQLite (one million 512-d rows) is most of the first
//! query's time, and one connection reads on one thread at a time. A second connection reads in
//! parallel, but in its own snapshot: it may see another connection's newer commit, and never
//! sees this connection's uncommitted writes. So it reads only chunks whose version, in its own
//! snapshot, equals the one the query's connection sees: versions are never reused
//! ([`super::store::fresh_version`]), so equal versions mean equal bytes. Every other chunk, and
//! everything the second connection fails to read, is read by the query's own connection.
//!
//! Where the file's pages are small, the connection maps the file ([`MAP_MAX_PAGE_SIZE`]);
//! where they are large, from the table connection's second streaming query on. While it maps,
//! the query's thread reads through a third one of the same kind (`exact`'s `own_reader`),
//! with the same checks, rather than through the query's own connection, whose settings are
//! the host's.
//!
//! The connection is read-only, opened with the same VFS on the same file, and only ever runs
//! `PRAGMA page_size` and `mmap_size` once, then `BEGIN`, one `SELECT id, version` on
//! `t_chunks`, blob reads of `t_codes`, `t_vectors` and `t_slots`, and `COMMIT`. Any
//! failure to open it (an in-memory database, a host SQLite built single-threaded, a VFS that
//! needs per-connection setup) leaves the query on one connection, as before.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};

use rusqlite::blob::Blob;
use rusqlite::{ffi, Connection, OpenFlags};

use super::store::quote;

thread_local! {
    /// Chunks of records read, and candidate rows rescored, by the second connections of the
    /// queries run on this thread (counted on the query's thread, so that tests running side by
    /// side do not see each other's). For tests and diagnostics.
    pub(super) static READS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Adds a query's second-connection reads to this thread's count.
pub(super) fn count_reads(chunks: u64, rows: u64) {
    READS.with(|r| {
        let (c, n) = r.get();
        r.set((c + chunks, n + rows));
    });
}

/// The second connection of one table, opened on the first query that streams enough.
#[derive(Default)]
pub(super) enum Reader {
    #[default]
    Untried,
    /// The connection, and how it reads the file.
    Open(Box<Connection>, Reads),
    /// Opening failed: not tried again by this table's connection.
    Unavailable,
}

/// How a second connection reads the file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Reads {
    /// Through SQLite's memory map (pages past the map with `pread`).
    Mapped,
    /// With `pread`: the host cannot map.
    Pread,
    /// With `pread` for now: large pages, mapped from a later query on ([`MAP_MAX_PAGE_SIZE`]).
    PreadFirst,
}

impl Reader {
    /// The open connection, opening it first if it was never tried, and whether it maps the
    /// file. Whatever the query's connection does, it maps it when its pages are small
    /// ([`MAP_MAX_PAGE_SIZE`]); when they are large, it reads with `pread` until `again` (the
    /// table's connection has streamed before), and maps from then on.
    pub(super) fn get(
        &mut self,
        db: *mut ffi::sqlite3,
        schema: &str,
        again: bool,
    ) -> Option<(&mut Connection, bool)> {
        if matches!(self, Reader::Untried) {
            *self = match open(db, schema) {
                Some((c, reads)) => Reader::Open(Box::new(c), reads),
                None => Reader::Unavailable,
            };
        }
        match self {
            Reader::Open(c, reads) => {
                if *reads == Reads::PreadFirst && again {
                    *reads = if map(c) { Reads::Mapped } else { Reads::Pread };
                }
                Some((c, *reads == Reads::Mapped))
            }
            _ => None,
        }
    }
}

/// A read-only connection to the file of `schema` on `db`, with its VFS, and how it reads it.
fn open(db: *mut ffi::sqlite3, schema: &str) -> Option<(Connection, Reads)> {
    let schema_c = CString::new(schema).ok()?;
    // SAFETY: a live connection handle and a NUL-terminated schema name. The file name and the
    // VFS name belong to SQLite and are copied before anything else runs on the connection.
    let (file, vfs) = unsafe {
        let p = ffi::sqlite3_db_filename(db, schema_c.as_ptr());
        if p.is_null() {
            return None;
        }
        let file = CStr::from_ptr(p).to_str().ok()?.to_owned();
        let mut vfs: *mut ffi::sqlite3_vfs = std::ptr::null_mut();
        let rc = ffi::sqlite3_file_control(
            db,
            schema_c.as_ptr(),
            ffi::SQLITE_FCNTL_VFS_POINTER,
            (&mut vfs as *mut *mut ffi::sqlite3_vfs).cast::<c_void>(),
        );
        if rc != ffi::SQLITE_OK || vfs.is_null() || (*vfs).zName.is_null() {
            return None;
        }
        (file, CStr::from_ptr((*vfs).zName).to_owned())
    };
    if file.is_empty() {
        return None;
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags_and_vfs(&file, flags, vfs.as_c_str()).ok()?;
    // Never wait for a lock: a busy file means this query reads on one connection.
    conn.busy_timeout(std::time::Duration::ZERO).ok()?;
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).ok()?;
    let reads = if page_size > MAP_MAX_PAGE_SIZE {
        Reads::PreadFirst
    } else if map(&conn) {
        Reads::Mapped
    } else {
        Reads::Pread
    };
    Some((conn, reads))
}

/// Asks SQLite to map the file of `conn`, and whether it does. SQLite caps the size at its
/// SQLITE_MAX_MMAP_SIZE (about 2 GB unless built otherwise; pages past the mapping are read
/// with `pread`) and answers with the size it took: 0 where the host cannot map.
fn map(conn: &Connection) -> bool {
    conn.query_row("PRAGMA mmap_size = 1099511627776", [], |r| {
        r.get::<_, i64>(0)
    })
    .is_ok_and(|size| size > 0)
}

/// Largest page size at which the second connection maps the file from its first query on.
/// Through `pread`, each page is a system call and a pass through SQLite's pager: at 4 KiB
/// pages that overhead is most of the first query, and a mapped read avoids the call. At 64
/// KiB the calls are few, and `pread` is the faster for a process's first query: a mapped read
/// pays, once per process, for the kernel to map each page it touches. Later queries find the
/// pages mapped, so with larger pages the connection maps from its table connection's second
/// streaming query on.
///
/// Measured in stop 33 (1M x 512, 64 KiB pages): first queries of new processes 73.1 ms
/// mapped against 66.0 with `pread` (random data), 69.8 against 60.8 (clustered), medians of
/// 9; queries 2-40 of one process, keeping no chunk in memory, 35-40 ms mapped against 53-71
/// with `pread` (random, medians of 19 or 20 per process). Measured in stop 32 (first exact
/// queries of new processes, 1M x 512, the query's connection on `pread`, medians of 7): 4 KiB
/// pages 86 ms mapped against 114 with `pread` (random data), 67 against 101 (clustered); 16
/// KiB 54 against 58 (random; the `pread` build there already stopped its rescoring early, the
/// mapped one did not); 64 KiB 68 against 54 (random), 58 against 53 (clustered).
const MAP_MAX_PAGE_SIZE: i64 = 16 << 10;

/// One read transaction of the second connection: the chunks' versions in its snapshot. The
/// transaction ends when the view is dropped.
pub(super) struct ReaderView<'c> {
    conn: &'c mut Connection,
    table: String,
    versions: HashMap<i64, i64>,
}

impl<'c> ReaderView<'c> {
    /// Starts a read transaction on `conn` and reads the versions of table `table`'s chunks.
    pub(super) fn begin(conn: &'c mut Connection, table: &str) -> rusqlite::Result<ReaderView<'c>> {
        if !conn.is_autocommit() {
            // Left open by a query that failed half-way.
            conn.execute_batch("ROLLBACK")?;
        }
        conn.execute_batch("BEGIN")?;
        let sql = format!(
            "SELECT id, version FROM {}",
            quote(&format!("{table}_chunks"))
        );
        let versions = conn
            .prepare(&sql)
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
                    .collect::<rusqlite::Result<HashMap<_, _>>>()
            })
            .inspect_err(|_| {
                let _ = conn.execute_batch("ROLLBACK");
            })?;
        Ok(ReaderView {
            conn,
            table: table.to_owned(),
            versions,
        })
    }

    /// Whether this snapshot holds chunk `id` at `version` (so its bytes are the ones the
    /// query's connection sees).
    pub(super) fn holds(&self, id: i64, version: i64) -> bool {
        self.versions.get(&id) == Some(&version)
    }

    /// A read-only blob handle on chunk `id`'s row of shadow table `{table}_{suffix}`.
    pub(super) fn blob(&self, suffix: &str, column: &str, id: i64) -> rusqlite::Result<Blob<'_>> {
        let name = format!("{}_{suffix}", self.table);
        self.conn.blob_open("main", name.as_str(), column, id, true)
    }
}

impl Drop for ReaderView<'_> {
    fn drop(&mut self) {
        let _ = self.conn.execute_batch("COMMIT");
    }
}
