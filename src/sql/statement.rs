//! A SELECT that a table-valued function runs on its own connection (the statement text is an
//! argument, as in `clip_embed_images('SELECT id, image FROM photos')`): prepared once, checked
//! to be one read-only statement, stepped row by row, finalized when dropped.

use std::ffi::{c_int, CStr, CString};

use rusqlite::ffi;
use rusqlite::types::ValueRef;

use super::arg_error;

pub struct Select {
    db: *mut ffi::sqlite3,
    stmt: *mut ffi::sqlite3_stmt,
}

impl Drop for Select {
    fn drop(&mut self) {
        // SAFETY: stmt is null or a statement prepared by us and not yet finalized.
        unsafe { ffi::sqlite3_finalize(self.stmt) };
    }
}

/// The connection's last error message.
pub(crate) fn errmsg(db: *mut ffi::sqlite3) -> String {
    // SAFETY: db is a live connection; the message is copied at once.
    unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db)) }
        .to_string_lossy()
        .into_owned()
}

impl Select {
    /// Prepares `sql` for `func`'s argument `arg` (0-based), which must be a single read-only
    /// statement returning at least `columns` columns (`what` names them in the error).
    pub(crate) fn prepare(
        db: *mut ffi::sqlite3,
        sql: &str,
        func: &str,
        arg: usize,
        columns: c_int,
        what: &str,
    ) -> rusqlite::Result<Select> {
        Select::try_prepare(db, sql, columns, what).map_err(|e| arg_error(func, arg, e))
    }

    /// [`Select::prepare`] with the bare reason as the error.
    pub(crate) fn try_prepare(
        db: *mut ffi::sqlite3,
        sql: &str,
        columns: c_int,
        what: &str,
    ) -> Result<Select, String> {
        let text = CString::new(sql).map_err(|_| "the statement contains a NUL character")?;
        let mut stmt = std::ptr::null_mut();
        let mut tail = std::ptr::null();
        // SAFETY: db is a live connection, text is NUL-terminated.
        let rc = unsafe { ffi::sqlite3_prepare_v2(db, text.as_ptr(), -1, &mut stmt, &mut tail) };
        let select = Select { db, stmt };
        if rc != ffi::SQLITE_OK {
            return Err(format!("cannot prepare the statement: {}", errmsg(db)));
        }
        // SAFETY: tail points into `text`, which is alive.
        let rest = unsafe { CStr::from_ptr(tail) }.to_string_lossy();
        if stmt.is_null() || !rest.trim().trim_start_matches(';').trim().is_empty() {
            return Err("expected one SELECT statement".into());
        }
        // SAFETY: stmt is a prepared statement.
        if unsafe { ffi::sqlite3_stmt_readonly(stmt) } == 0 {
            return Err("the statement must be a read-only SELECT".into());
        }
        if unsafe { ffi::sqlite3_column_count(stmt) } < columns {
            return Err(format!("the statement must return {what} columns"));
        }
        Ok(select)
    }

    /// Steps to the next row: `Ok(true)` on a row, `Ok(false)` at the end, the SQLite error
    /// code and message otherwise (SQLITE_INTERRUPT when the connection is interrupted).
    pub fn step(&mut self) -> Result<bool, (c_int, String)> {
        // SAFETY: stmt is a live prepared statement.
        match unsafe { ffi::sqlite3_step(self.stmt) } {
            ffi::SQLITE_ROW => Ok(true),
            ffi::SQLITE_DONE => Ok(false),
            rc => Err((rc, errmsg(self.db))),
        }
    }

    /// Back to before the first row.
    pub fn reset(&mut self) {
        // SAFETY: stmt is a live prepared statement.
        unsafe { ffi::sqlite3_reset(self.stmt) };
    }

    /// Column `i` of the current row, borrowed until the next step.
    pub fn column(&self, i: c_int) -> ValueRef<'_> {
        let stmt = self.stmt;
        // SAFETY: stmt is positioned on a row; the slices live until the next step/reset,
        // which needs `&mut self`.
        unsafe {
            match ffi::sqlite3_column_type(stmt, i) {
                ffi::SQLITE_INTEGER => ValueRef::Integer(ffi::sqlite3_column_int64(stmt, i)),
                ffi::SQLITE_FLOAT => ValueRef::Real(ffi::sqlite3_column_double(stmt, i)),
                ffi::SQLITE_TEXT => {
                    let p = ffi::sqlite3_column_text(stmt, i);
                    let n = ffi::sqlite3_column_bytes(stmt, i) as usize;
                    ValueRef::Text(if p.is_null() {
                        &[]
                    } else {
                        std::slice::from_raw_parts(p, n)
                    })
                }
                ffi::SQLITE_BLOB => {
                    let p = ffi::sqlite3_column_blob(stmt, i).cast::<u8>();
                    let n = ffi::sqlite3_column_bytes(stmt, i) as usize;
                    ValueRef::Blob(if p.is_null() {
                        &[]
                    } else {
                        std::slice::from_raw_parts(p, n)
                    })
                }
                _ => ValueRef::Null,
            }
        }
    }
}
