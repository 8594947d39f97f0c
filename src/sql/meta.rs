//! `archaeclip_version()` and `archaeclip_debug()`.

use rusqlite::functions::Context;
use rusqlite::types::Value;

use super::Output;

/// The crate version, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub fn archaeclip_version(_ctx: &Context<'_>) -> rusqlite::Result<Output> {
    Ok((Value::Text(VERSION.to_owned()), None))
}

pub fn archaeclip_debug(_ctx: &Context<'_>) -> rusqlite::Result<Output> {
    Ok((Value::Text(debug_text()), None))
}

/// One `key: value` line each: version, git commit, build features, SIMD kernels, threads.
pub fn debug_text() -> String {
    let mut features = Vec::new();
    if cfg!(feature = "loadable") {
        features.push("loadable");
    }
    if cfg!(feature = "static") {
        features.push("static");
    }
    format!(
        "version: {VERSION}\ncommit: {}\nbuild: {}\nfeatures: {}\nsimd: {}\nthreads: {}\nsqlite: {}",
        option_env!("ARCHAECLIP_GIT_COMMIT").unwrap_or("unknown"),
        if cfg!(debug_assertions) { "debug" } else { "release" },
        features.join(","),
        simd_level(),
        rayon::current_num_threads(),
        rusqlite::version(),
    )
}

/// The widest SIMD kernel family SimSIMD picked on this CPU for float32 distances.
pub fn simd_level() -> &'static str {
    use simsimd::capabilities as c;
    if c::uses_sapphire() || c::uses_genoa() || c::uses_ice() || c::uses_skylake() {
        "avx512"
    } else if c::uses_haswell() {
        "avx2"
    } else if c::uses_sve() {
        "sve"
    } else if c::uses_neon() {
        "neon"
    } else {
        "scalar"
    }
}
