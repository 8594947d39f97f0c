//! In-process tests of the SQL surface on a bundled SQLite:
//! `cargo test --no-default-features --features static`.
#![cfg(feature = "static")]

use rusqlite::{params, Connection};

fn db() -> Connection {
    let db = Connection::open_in_memory().unwrap();
    archaeclip::register(&db).unwrap();
    db
}

fn err(db: &Connection, sql: &str) -> String {
    match db.query_row(sql, [], |r| r.get::<_, rusqlite::types::Value>(0)) {
        Ok(v) => panic!("expected an error from {sql}, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

fn one<T: rusqlite::types::FromSql>(db: &Connection, sql: &str) -> T {
    db.query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[test]
fn vector_functions_compute_what_they_say() {
    let db = db();
    assert_eq!(
        one::<String>(&db, "SELECT vec_to_json(vec_f32('[1, 2.5, -3e-1]'))"),
        "[1.000000,2.500000,-0.300000]"
    );
    assert_eq!(one::<i64>(&db, "SELECT vec_length(x'0000803f0000803f')"), 2);
    assert_eq!(
        one::<f64>(&db, "SELECT vec_dot('[1,2,3]', '[4,5,6]')"),
        32.0
    );
    assert!((one::<f64>(&db, "SELECT vec_cosine('[1,0]', '[1,1]')") - 0.5f64.sqrt()).abs() < 1e-7);
    assert!(
        (one::<f64>(&db, "SELECT vec_distance_cosine('[1,0]', '[1,1]')") - (1.0 - 0.5f64.sqrt()))
            .abs()
            < 1e-7
    );
    assert_eq!(
        one::<f64>(&db, "SELECT vec_distance_l2('[0,0]', '[3,4]')"),
        5.0
    );
    assert_eq!(
        one::<String>(&db, "SELECT vec_to_json(vec_normalize('[3,4]'))"),
        "[0.600000,0.800000]"
    );
    assert_eq!(
        one::<String>(&db, "SELECT vec_to_json(vec_add('[1,2]', '[3,4]'))"),
        "[4.000000,6.000000]"
    );
    assert_eq!(
        one::<String>(&db, "SELECT vec_to_json(vec_sub('[1,2]', '[3,4]'))"),
        "[-2.000000,-2.000000]"
    );
    assert_eq!(
        one::<String>(&db, "SELECT vec_to_json(vec_avg(v)) FROM (SELECT '[1,2]' AS v UNION ALL SELECT NULL UNION ALL SELECT '[3,5]')"),
        "[2.000000,3.500000]"
    );
    assert_eq!(one::<Option<Vec<u8>>>(&db, "SELECT vec_avg(NULL)"), None);
    assert_eq!(
        one::<Option<f64>>(&db, "SELECT vec_cosine(NULL, '[1]')"),
        None
    );
}

#[test]
fn bad_input_is_a_clear_error_naming_function_and_argument() {
    let db = db();
    let cases = [
        ("SELECT vec_cosine('[1,2]', '[1,2,3]')", "vec_cosine(): 2nd argument: dimension mismatch: 2 vs 3"),
        ("SELECT vec_length(x'000000')", "vec_length(): 1st argument: invalid float32 vector BLOB: length 3 is not a multiple of 4"),
        ("SELECT vec_length(x'')", "vec_length(): 1st argument: zero-length vectors are not supported"),
        ("SELECT vec_f32('[1,')", "vec_f32(): 1st argument: invalid JSON vector"),
        ("SELECT vec_f32('[1,\"a\"]')", "vec_f32(): 1st argument: invalid JSON vector"),
        ("SELECT vec_f32(x'0000c07f')", "vec_f32(): 1st argument: element 0 is NaN or infinite"),
        ("SELECT vec_f32('[1, 1e39]')", "vec_f32(): 1st argument: element 1 is NaN or infinite"),
        ("SELECT vec_dot(5, '[1]')", "vec_dot(): 1st argument: expected a vector"),
        ("SELECT vec_cosine('[0,0]', '[1,1]')", "vec_cosine(): 2nd argument: cosine is undefined for a zero vector"),
        ("SELECT vec_normalize('[0,0]')", "vec_normalize(): 1st argument: cannot normalize a zero vector"),
        ("SELECT vec_quantize_int8('[1]', 'other')", "vec_quantize_int8(): 2nd argument: unsupported quantization range 'other'"),
        ("SELECT vec_quantize_binary('[1,2,3]')", "vec_quantize_binary(): 1st argument: binary quantization needs a dimension count divisible by 8, found 3"),
        ("SELECT vec_avg(v) FROM (SELECT '[1,2]' AS v UNION ALL SELECT '[1]')", "vec_avg(): 1st argument: dimension mismatch: 2 vs 1"),
    ];
    for (sql, expected) in cases {
        let e = err(&db, sql);
        assert!(
            e.starts_with(expected),
            "{sql}\n  got:      {e}\n  expected: {expected}..."
        );
    }
    let huge = format!("SELECT vec_length('[{}]')", vec!["1"; 70_000].join(","));
    assert!(
        err(&db, &huge).contains("70000 dimensions, more than the maximum of 65536")
            || err(&db, &huge).contains("more than the maximum of 65536")
    );
}

#[test]
fn a_panic_becomes_an_sql_error_not_an_abort() {
    let db = db();
    fn boom(_: &rusqlite::functions::Context<'_>) -> rusqlite::Result<archaeclip::sql::Output> {
        panic!("forced for the test")
    }
    let s = archaeclip::Scalar {
        name: "boom",
        n_arg: 0,
        flags: archaeclip::sql::PURE,
        func: boom,
    };
    archaeclip::register_scalar(&db, &s).unwrap();
    let e = err(&db, "SELECT boom()");
    assert!(
        e.contains("boom(): internal error") && e.contains("forced for the test"),
        "{e}"
    );
    // The connection is still usable afterwards.
    assert_eq!(one::<i64>(&db, "SELECT vec_length('[1,2,3]')"), 3);
}

/// A seeded uniform [-1, 1) generator (splitmix64), so tests need no random-number crate.
pub fn uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn random_table(db: &Connection, n: usize, dims: usize, seed: u64) -> Vec<(i64, Vec<f32>)> {
    let mut rng = uniform(seed);
    db.execute_batch("CREATE TABLE items(id INTEGER PRIMARY KEY, kind TEXT, embedding BLOB)")
        .unwrap();
    let mut rows = Vec::new();
    let mut stmt = db.prepare("INSERT INTO items VALUES (?, ?, ?)").unwrap();
    for i in 0..n {
        let v: Vec<f32> = (0..dims).map(|_| rng()).collect();
        let blob: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let id = (i as i64) * 7 + 3;
        stmt.execute(params![
            id,
            if i % 3 == 0 { "coin" } else { "vessel" },
            blob
        ])
        .unwrap();
        rows.push((id, v));
    }
    rows
}

fn reference(rows: &[(i64, Vec<f32>)], q: &[f32], k: usize) -> Vec<(i64, f64)> {
    let cos = |a: &[f32], b: &[f32]| {
        let d: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        d / (n(a) * n(b))
    };
    let mut s: Vec<(i64, f64)> = rows.iter().map(|(id, v)| (*id, cos(q, v))).collect();
    s.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    s.truncate(k);
    s
}

fn search(db: &Connection, q: &[f32], k: i64, sql: &str) -> Vec<(i64, f64)> {
    let blob: Vec<u8> = q.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut stmt = db
        .prepare("SELECT rowid, score FROM clip_search(?, ?, ?)")
        .unwrap();
    stmt.query_map(params![blob, k, sql], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

#[test]
fn search_matches_the_scalar_reference_and_filters_before_k() {
    let db = db();
    let rows = random_table(&db, 20_000, 64, 1);
    let q = rows[42].1.iter().map(|x| x + 0.05).collect::<Vec<_>>();
    let got = search(&db, &q, 25, "SELECT id, embedding FROM items");
    let want = reference(&rows, &q, 25);
    assert_eq!(
        got.iter().map(|r| r.0).collect::<Vec<_>>(),
        want.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    for (g, w) in got.iter().zip(&want) {
        assert!((g.1 - w.1).abs() < 1e-5, "{g:?} vs {w:?}");
    }
    // The filter applies before k: all 10 results are coins, none is lost to k.
    let coins: Vec<(i64, Vec<f32>)> = rows
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 0)
        .map(|(_, r)| r.clone())
        .collect();
    let got = search(
        &db,
        &q,
        10,
        "SELECT id, embedding FROM items WHERE kind = 'coin'",
    );
    assert_eq!(got.len(), 10);
    assert_eq!(
        got.iter().map(|r| r.0).collect::<Vec<_>>(),
        reference(&coins, &q, 10)
            .iter()
            .map(|r| r.0)
            .collect::<Vec<_>>()
    );
}

#[test]
fn ties_are_broken_by_id() {
    let db = db();
    db.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, e);
         INSERT INTO t VALUES (9, '[1,1]'), (2, '[1,1]'), (5, '[1,1]'), (1, '[1,0]');",
    )
    .unwrap();
    let got = search(&db, &[1.0, 1.0], 4, "SELECT id, e FROM t ORDER BY id DESC");
    assert_eq!(
        got.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![2, 5, 9, 1]
    );
}

#[test]
fn the_cache_is_used_and_invalidated_by_any_write() {
    let dir = std::env::temp_dir().join(format!("archaeclip-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.db");
    let _ = std::fs::remove_file(&path);
    let db = Connection::open(&path).unwrap();
    archaeclip::register(&db).unwrap();
    db.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, e); INSERT INTO t VALUES (1, '[1,0]'), (2, '[0,1]');").unwrap();
    let sql = "SELECT id, e FROM t";
    let loads = archaeclip::sql::search::copies_built_on_this_thread;
    let top = |db: &Connection| search(db, &[1.0, 0.1], 1, sql)[0].0;

    let before = loads();
    assert_eq!(top(&db), 1, "first use: streamed");
    assert_eq!(
        loads(),
        before,
        "a statement used once is streamed, not copied"
    );
    assert_eq!(top(&db), 1, "second use: a copy is built");
    assert_eq!(loads(), before + 1);
    assert_eq!(top(&db), 1);
    assert_eq!(
        loads(),
        before + 1,
        "an unchanged database must be served from the copy"
    );

    // A write on this connection; the statement is then used twice, so the second answer comes
    // from a fresh copy.
    db.execute("INSERT INTO t VALUES (3, '[1,0.1]')", [])
        .unwrap();
    assert_eq!(top(&db), 3);
    assert_eq!(top(&db), 3);
    assert_eq!(loads(), before + 2);

    // A write committed by another connection.
    let other = Connection::open(&path).unwrap();
    other
        .execute("UPDATE t SET e = '[1,0.1]' WHERE id = 1", [])
        .unwrap();
    other.execute("DELETE FROM t WHERE id = 3", []).unwrap();
    assert_eq!(top(&db), 1);
    assert_eq!(top(&db), 1);
    assert_eq!(loads(), before + 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_statement_must_be_a_read_only_select_returning_id_and_vector() {
    let db = db();
    db.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, e); INSERT INTO t VALUES (1, '[1,0]'), (2, '[1]');",
    )
    .unwrap();
    let cases = [
        ("SELECT * FROM clip_search('[1,0]', 1, 'DELETE FROM t')", "clip_search(): 3rd argument: the statement must be a read-only SELECT"),
        ("SELECT * FROM clip_search('[1,0]', 1, 'SELECT id FROM t')", "clip_search(): 3rd argument: the statement must return (id, vector) columns, it returns 1 column(s)"),
        ("SELECT * FROM clip_search('[1,0]', 1, 'SELECT id, e FROM nope')", "clip_search(): 3rd argument: cannot prepare the statement: no such table: nope"),
        ("SELECT * FROM clip_search('[1,0]', 1, 'SELECT id, e FROM t')", "clip_search(): 3rd argument: row with id 2: dimension mismatch: 2 vs 1"),
        ("SELECT * FROM clip_search('[1,0]', 1, 'SELECT ''x'', e FROM t')", "clip_search(): 3rd argument: the first column must be an integer id"),
        ("SELECT * FROM clip_search('[1,0]', -1, 'SELECT id, e FROM t')", "clip_search(): 2nd argument: k must be between 0 and 100000, found -1"),
        ("SELECT * FROM clip_search('[1,0]', 'ten', 'SELECT id, e FROM t')", "clip_search(): 2nd argument: k must be an integer, found text"),
        ("SELECT * FROM clip_search('[1,0]', 1, 'SELECT id, e FROM t WHERE id = 1', 'manhattan')", "clip_search(): 4th argument: unknown metric 'manhattan'"),
        ("SELECT * FROM clip_search('[1,0,0]', 1, 'SELECT id, e FROM t WHERE id = 1')", "clip_search(): 1st argument: the query vector has 3 dimensions, the statement's vectors have 2"),
        ("SELECT * FROM clip_search('[1,0]')", "clip_search(): missing 2nd argument (k)"),
        ("SELECT * FROM clip_search('[1,0]', 1, 'SELECT 1, 2; SELECT 3')", "clip_search(): 3rd argument: expected one SELECT statement"),
    ];
    for (sql, expected) in cases {
        let e = err(&db, sql);
        assert!(
            e.starts_with(expected),
            "{sql}\n  got:      {e}\n  expected: {expected}..."
        );
    }
}

#[test]
fn search_is_refused_inside_views_and_triggers() {
    let db = db();
    db.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, e); INSERT INTO t VALUES (1, '[1,0]');
         CREATE VIEW v AS SELECT * FROM clip_search('[1,0]', 1, 'SELECT id, e FROM t');",
    )
    .unwrap();
    let e = err(&db, "SELECT id FROM v");
    assert!(e.contains("unsafe use of virtual table"), "{e}");
}

#[test]
fn metrics_and_nested_searches() {
    let db = db();
    db.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, e); INSERT INTO t VALUES (1, '[1,0]'), (2, '[3,0]'), (3, '[0,2]');").unwrap();
    let rows = |sql: &str| -> Vec<(i64, f64, f64)> {
        let mut s = db.prepare(sql).unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    assert_eq!(
        rows(
            "SELECT id, score, distance FROM clip_search('[1,0]', 3, 'SELECT id, e FROM t', 'dot')"
        ),
        vec![(2, 3.0, -3.0), (1, 1.0, -1.0), (3, 0.0, 0.0)]
    );
    assert_eq!(
        rows(
            "SELECT id, score, distance FROM clip_search('[1,0]', 2, 'SELECT id, e FROM t', 'l2')"
        ),
        vec![(1, -0.0, 0.0), (2, -2.0, 2.0)]
    );
    // The statement may itself search: nearest to the nearest of [0,1].
    let nested = rows("SELECT id, score, distance FROM clip_search((SELECT e FROM t WHERE id = (SELECT id FROM clip_search('[0,1]', 1, 'SELECT id, e FROM t'))), 1, 'SELECT id, e FROM t WHERE id IN (SELECT id FROM clip_search(''[1,0]'', 3, ''SELECT id, e FROM t''))')");
    assert_eq!(nested[0].0, 3);
}
