//! archaeclip: a SQLite loadable extension that turns an embeddings database into a search engine.
//!
//! This file is the table of contents of the SQL surface: the entry point and one flat list of
//! everything registered. The pure core (`vector`, `index`) knows nothing of SQLite; `sql` is the
//! thin layer that parses arguments and reports errors.

pub mod alloc;
pub mod clip;
pub mod error;
pub mod index;
pub mod sql;
pub mod train;
pub mod vector;

/// Large blocks freed during training are reused rather than page-faulted afresh: see `alloc`.
/// Installed in the extension (feature `loadable`) and in this crate's unit tests; a Rust
/// program that links the crate with `static` keeps its own allocator.
#[cfg(any(feature = "loadable", test))]
#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator;

use rusqlite::functions::FunctionFlags;
use rusqlite::Connection;

use sql::clip_fns::{self as c, ClipFn};
use std::sync::Mutex;

use sql::clip_models::{self, ModelNames, SharedNames};
use sql::{meta, search, vector_fns as v, ScalarFn, PURE, PURE_READS_SUBTYPE, PURE_VECTOR};

/// One scalar function of the SQL surface.
pub struct Scalar {
    pub name: &'static str,
    /// Number of arguments (-1: any).
    pub n_arg: i32,
    pub flags: FunctionFlags,
    pub func: ScalarFn,
}

const fn scalar(name: &'static str, n_arg: i32, flags: FunctionFlags, func: ScalarFn) -> Scalar {
    Scalar {
        name,
        n_arg,
        flags,
        func,
    }
}

/// Every scalar function, in the order of the reference.
pub const SCALARS: &[Scalar] = &[
    scalar("archaeclip_version", 0, PURE, meta::archaeclip_version),
    scalar("archaeclip_debug", 0, PURE, meta::archaeclip_debug),
    scalar("vec_f32", 1, PURE_VECTOR, v::vec_f32),
    scalar("vec_to_json", 1, PURE_VECTOR, v::vec_to_json),
    scalar("vec_length", 1, PURE_READS_SUBTYPE, v::vec_length),
    scalar("vec_cosine", 2, PURE_READS_SUBTYPE, v::vec_cosine),
    scalar("vec_dot", 2, PURE_READS_SUBTYPE, v::vec_dot),
    scalar(
        "vec_distance_cosine",
        2,
        PURE_READS_SUBTYPE,
        v::vec_distance_cosine,
    ),
    scalar("vec_distance_l2", 2, PURE_READS_SUBTYPE, v::vec_distance_l2),
    scalar("vec_normalize", 1, PURE_VECTOR, v::vec_normalize),
    scalar("vec_add", 2, PURE_VECTOR, v::vec_add),
    scalar("vec_sub", 2, PURE_VECTOR, v::vec_sub),
    scalar("vec_quantize_int8", 2, PURE_VECTOR, v::vec_quantize_int8),
    scalar(
        "vec_quantize_binary",
        1,
        PURE_VECTOR,
        v::vec_quantize_binary,
    ),
];

/// One CLIP function: it sees the connection's model names; registered once per arity (the
/// model argument is optional).
pub struct ClipScalar {
    pub name: &'static str,
    pub arities: &'static [i32],
    pub func: ClipFn,
}

const fn clip(name: &'static str, arities: &'static [i32], func: ClipFn) -> ClipScalar {
    ClipScalar {
        name,
        arities,
        func,
    }
}

/// They load models and read files: DIRECTONLY, never DETERMINISTIC or INNOCUOUS.
pub const CLIP_FLAGS: FunctionFlags = FunctionFlags::SQLITE_UTF8
    .union(FunctionFlags::SQLITE_DIRECTONLY)
    .union(FunctionFlags::SQLITE_RESULT_SUBTYPE);

/// Every CLIP function, and the functions of the connection's policy.
pub const CLIP_SCALARS: &[ClipScalar] = &[
    clip("clip_embed_text", &[1, 2], c::clip_embed_text),
    clip("clip_embed_image", &[1, 2], c::clip_embed_image),
    clip("clip_tokenize", &[1, 2], c::clip_tokenize),
    clip("clip_model_info", &[0, 1], c::clip_model_info),
    // The connection's policy (SECURITY.md): shown, and narrowed by a trusted host.
    clip("archaeclip_policy", &[0], sql::policy::archaeclip_policy),
    clip(
        "archaeclip_restrict",
        &[1],
        sql::policy::archaeclip_restrict,
    ),
];

/// Registers everything on a connection: the scalars above, the `vec_avg` aggregate, the
/// `clip_search` table-valued function, the CLIP functions and the connection's
/// `temp.clip_models` table of model names.
pub fn register(db: &Connection) -> rusqlite::Result<()> {
    // Decided before anything is registered: when the load fails, SQLite unloads the library
    // at once, and a function registered before the failure would leave the connection a
    // destructor pointing into unmapped code, called when it closes (a crash at exit).
    let policy = connection_policy(db)?;
    for s in SCALARS {
        register_scalar(db, s)?;
    }
    db.create_aggregate_function("vec_avg", 1, PURE_VECTOR, v::VecAvg)?;
    let names = SharedNames::new(Mutex::new(ModelNames::new(policy)));
    search::load_module(db, names.clone())?;
    clip_models::load_module(db, names.clone())?;
    sql::embed_batch::load_modules(db, names.clone())?;
    sql::files::load_module(db, names.clone())?;
    sql::train::load_modules(db, names.clone())?;
    sql::clip_index::load_module(db, names.clone())?;
    for s in CLIP_SCALARS {
        for &n_arg in s.arities {
            let (name, func, names) = (s.name, s.func, names.clone());
            db.create_scalar_function(name, n_arg, CLIP_FLAGS, move |ctx| {
                sql::guard(name, || func(ctx, &names))
            })?;
        }
    }
    Ok(())
}

/// The policy for a connection, from the environment and the connection's state (a read-only or
/// `query_only` connection is untrusted unless the host says otherwise; see `sql/policy.rs`).
fn connection_policy(db: &Connection) -> rusqlite::Result<sql::policy::Policy> {
    let query_only: i64 = db
        .pragma_query_value(None, "query_only", |r| r.get(0))
        .unwrap_or(0);
    let read_only = db.is_readonly(rusqlite::MAIN_DB).unwrap_or(false) || query_only != 0;
    sql::policy::Policy::decide(&sql::policy::Host::from_env(read_only))
        .map_err(|e| sql::sql_error(format!("archaeclip: {e}")))
}

/// Registers one scalar behind the panic guard (public so tests can prove the guard works).
pub fn register_scalar(db: &Connection, s: &Scalar) -> rusqlite::Result<()> {
    let (name, func) = (s.name, s.func);
    db.create_scalar_function(name, s.n_arg, s.flags, move |ctx| {
        sql::guard(name, || func(ctx))
    })
}

/// Oldest SQLite the extension supports (the floor of libsqlite3-sys 0.38's loadable API).
pub const MIN_SQLITE_VERSION: i32 = 3_034_001;

/// The refusal for a host SQLite older than [`MIN_SQLITE_VERSION`], or `None` if it will do.
pub fn check_host_version(version: i32) -> Option<String> {
    (version < MIN_SQLITE_VERSION).then(|| {
        let v = |n: i32| format!("{}.{}.{}", n / 1_000_000, n / 1000 % 1000, n % 1000);
        format!(
            "archaeclip needs SQLite {} or newer; this host has SQLite {}",
            v(MIN_SQLITE_VERSION),
            v(version)
        )
    })
}

/// The host's API table, kept for the one variadic call its Rust wrappers cannot make (below).
#[cfg(feature = "loadable")]
static HOST_API: std::sync::atomic::AtomicPtr<rusqlite::ffi::sqlite3_api_routines> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// `sqlite3_vtab_config(db, SQLITE_VTAB_CONSTRAINT_SUPPORT, 1)`, from inside xCreate/xConnect:
/// a virtual table that supports `INSERT OR IGNORE` / `OR REPLACE`.
///
/// rusqlite 0.40's `VTabConnection::config` (and libsqlite3-sys 0.38's loadable-extension
/// wrapper of `sqlite3_vtab_config`) pass no third argument to this variadic function, so
/// SQLite read an undefined value for the flag: `INSERT OR IGNORE` on a clip_index table failed
/// with a UNIQUE error whenever the stray register held 0 (3 failures in 75 loaded runs of the
/// test suite). The argument is passed here explicitly, through the host's API table when
/// loaded as an extension.
///
/// # Safety
/// `db` must be the connection of an xCreate/xConnect call in progress.
pub unsafe fn declare_constraint_support(db: *mut rusqlite::ffi::sqlite3) -> std::ffi::c_int {
    use rusqlite::ffi;
    let (op, on) = (ffi::SQLITE_VTAB_CONSTRAINT_SUPPORT, 1 as std::ffi::c_int);
    #[cfg(feature = "loadable")]
    {
        let api = HOST_API.load(std::sync::atomic::Ordering::Acquire);
        match api.as_ref().and_then(|a| a.vtab_config) {
            Some(vtab_config) => vtab_config(db, op, on),
            None => ffi::SQLITE_MISUSE,
        }
    }
    #[cfg(not(feature = "loadable"))]
    {
        ffi::sqlite3_vtab_config(db, op, on)
    }
}

/// The entry point SQLite derives from the file name `archaeclip.so` (or `libarchaeclip.so`).
///
/// # Safety
/// Called by SQLite with valid pointers, as `sqlite3_load_extension` does.
#[cfg(feature = "loadable")]
#[no_mangle]
pub unsafe extern "C" fn sqlite3_archaeclip_init(
    db: *mut rusqlite::ffi::sqlite3,
    pz_err_msg: *mut *mut std::ffi::c_char,
    p_api: *mut rusqlite::ffi::sqlite3_api_routines,
) -> std::ffi::c_int {
    use rusqlite::ffi;
    // Refuse an old host with a message before touching any API it may lack.
    if !p_api.is_null() {
        if let (Some(version), Some(malloc)) = ((*p_api).libversion_number, (*p_api).malloc) {
            if let Some(message) = check_host_version(version()) {
                if !pz_err_msg.is_null() {
                    let bytes = message.as_bytes();
                    let buf = malloc(bytes.len() as i32 + 1).cast::<u8>();
                    if !buf.is_null() {
                        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len());
                        *buf.add(bytes.len()) = 0;
                        *pz_err_msg = buf.cast();
                    }
                }
                return ffi::SQLITE_ERROR;
            }
        }
    }
    let result = std::panic::catch_unwind(|| {
        #[cfg(feature = "loadable")]
        HOST_API.store(p_api, std::sync::atomic::Ordering::Release);
        Connection::extension_init2(db, pz_err_msg, p_api, |conn| {
            register(&conn).map(|()| false)
        })
    });
    result.unwrap_or(ffi::SQLITE_ERROR)
}

#[cfg(test)]
mod tests {

    /// The real entry point, handed the API table of a host that reports SQLite 3.33.0: it must
    /// return SQLITE_ERROR with the message, without calling anything else (a zeroed table would
    /// crash on any other call).
    #[cfg(feature = "loadable")]
    #[test]
    fn the_entry_point_refuses_an_old_host_without_touching_it() {
        use rusqlite::ffi;
        unsafe extern "C" fn old_version() -> std::ffi::c_int {
            3_033_000
        }
        unsafe extern "C" fn host_malloc(n: std::ffi::c_int) -> *mut std::ffi::c_void {
            libc::malloc(n as usize)
        }
        let mut api: ffi::sqlite3_api_routines = unsafe { std::mem::zeroed() };
        api.libversion_number = Some(old_version);
        api.malloc = Some(host_malloc);
        let mut message: *mut std::ffi::c_char = std::ptr::null_mut();
        let rc =
            unsafe { super::sqlite3_archaeclip_init(std::ptr::null_mut(), &mut message, &mut api) };
        assert_eq!(rc, ffi::SQLITE_ERROR);
        let text = unsafe { std::ffi::CStr::from_ptr(message) }
            .to_str()
            .unwrap()
            .to_owned();
        unsafe { libc::free(message.cast()) };
        assert_eq!(
            text,
            "archaeclip needs SQLite 3.34.1 or newer; this host has SQLite 3.33.0"
        );
    }

    #[test]
    fn old_hosts_are_refused_with_a_message() {
        assert_eq!(
            super::check_host_version(3_033_000).unwrap(),
            "archaeclip needs SQLite 3.34.1 or newer; this host has SQLite 3.33.0"
        );
        assert!(super::check_host_version(3_040_001).is_none());
    }
}
