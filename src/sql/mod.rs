//! The thin SQL shell: parse arguments, call the core, turn results and errors into SQLite values.
//! Every callback runs inside [`guard`], so a panic becomes an SQL error naming the function
//! instead of unwinding into C.

pub mod clip_fns;
pub mod clip_index;
pub mod clip_models;
pub mod embed_batch;
pub mod files;
pub mod meta;
pub mod policy;
pub mod search;
pub mod statement;
pub mod train;
pub mod tvf_args;
pub mod vector_fns;

use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};

use rusqlite::ffi;
use rusqlite::functions::{Context, FunctionFlags, SubType};
use rusqlite::types::{Value, ValueRef};

use crate::vector::{codec, ElementType, Vector};

/// What a scalar function returns: a value and, for vectors, sqlite-vec's subtype.
pub type Output = (Value, SubType);

/// A scalar function of the registration list.
pub type ScalarFn = fn(&Context<'_>) -> rusqlite::Result<Output>;

/// Flags of a pure function: same inputs, same output, no side effects, safe in views/triggers.
pub const PURE: FunctionFlags = FunctionFlags::SQLITE_UTF8
    .union(FunctionFlags::SQLITE_DETERMINISTIC)
    .union(FunctionFlags::SQLITE_INNOCUOUS);

/// Pure, and reads sqlite-vec's vector subtypes of its arguments (int8/bit tags).
pub const PURE_READS_SUBTYPE: FunctionFlags = PURE.union(FunctionFlags::SQLITE_SUBTYPE);

/// Pure, reads argument subtypes and tags its result (the flags sqlite-vec gives these functions).
pub const PURE_VECTOR: FunctionFlags =
    PURE_READS_SUBTYPE.union(FunctionFlags::SQLITE_RESULT_SUBTYPE);

/// An SQLite error (SQLITE_ERROR) with our message: Python sees `OperationalError`, as for
/// SQLite's own errors, not the `IntegrityError` a bare Rust error would map to.
pub fn sql_error(message: impl Into<String>) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_ERROR), Some(message.into()))
}

/// `func(): message`.
pub fn fn_error(func: &str, e: impl Display) -> rusqlite::Error {
    sql_error(format!("{func}(): {e}"))
}

/// `func(): 2nd argument: message`. `index` is 0-based.
pub fn arg_error(func: &str, index: usize, e: impl Display) -> rusqlite::Error {
    sql_error(format!("{func}(): {} argument: {e}", ordinal(index + 1)))
}

/// 1 -> "1st", 2 -> "2nd", 11 -> "11th".
pub fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// Runs `f`, turning a panic into an SQL error that names `func`.
pub fn guard<T>(func: &str, f: impl FnOnce() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(fn_error(
                func,
                format!("internal error (a bug in archaeclip, please report it): {what}"),
            ))
        }
    }
}

/// The SQL type name of a value, for error messages.
pub fn type_name(v: ValueRef<'_>) -> &'static str {
    match v {
        ValueRef::Null => "NULL",
        ValueRef::Integer(_) => "an integer",
        ValueRef::Real(_) => "a real",
        ValueRef::Text(_) => "text",
        ValueRef::Blob(_) => "a blob",
    }
}

/// A vector argument: a blob (float32 unless tagged int8/bit by sqlite-vec's subtype) or JSON
/// text. `None` for SQL NULL. Non-finite float32 elements are refused.
pub fn vector_arg(ctx: &Context<'_>, index: usize, func: &str) -> rusqlite::Result<Option<Vector>> {
    let value = ctx.get_raw(index);
    let parsed = match value {
        ValueRef::Null => return Ok(None),
        ValueRef::Blob(b) => {
            Vector::from_blob(b, ElementType::from_subtype(ctx.get_subtype(index)))
        }
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(text) => codec::f32_from_json(text).map(Vector::Float32),
            Err(_) => Err(crate::error::Error::Json {
                detail: "text is not valid UTF-8".into(),
            }),
        },
        other => Err(crate::error::Error::WrongType {
            expected: "a vector (a float32 BLOB or JSON text like '[0.1, 0.2]')",
            found: type_name(other),
        }),
    };
    let vector = parsed.map_err(|e| arg_error(func, index, e))?;
    if let Vector::Float32(v) = &vector {
        codec::check_finite(v).map_err(|e| arg_error(func, index, e))?;
    }
    Ok(Some(vector))
}

/// A float32 vector argument (int8/bit refused), `None` for NULL.
pub fn f32_arg(ctx: &Context<'_>, index: usize, func: &str) -> rusqlite::Result<Option<Vec<f32>>> {
    match vector_arg(ctx, index, func)? {
        None => Ok(None),
        Some(Vector::Float32(v)) => Ok(Some(v)),
        Some(other) => Err(arg_error(
            func,
            index,
            format!(
                "expected a float32 vector, found an {} vector",
                other.element_type().name()
            ),
        )),
    }
}

/// A vector result, tagged with its subtype.
pub fn vector_output(v: &Vector) -> Output {
    (Value::Blob(v.to_blob()), Some(v.element_type().subtype()))
}

/// SQL NULL.
pub const NULL: Output = (Value::Null, None);
