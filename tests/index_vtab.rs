//! The `clip_index` virtual table on a bundled SQLite:
//! `cargo test --release --no-default-features --features static --test index_vtab`.
//! Results are compared with a plain scalar brute force over the same rows.
#![cfg(feature = "static")]

use rusqlite::{params, Connection};

fn db() -> Connection {
    let db = Connection::open_in_memory().unwrap();
    archaeclip::register(&db).unwrap();
    db
}

/// Seeded uniform [-1, 1) (splitmix64).
fn rng(seed: u64) -> impl FnMut() -> f32 {
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

fn blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The k nearest under a metric, computed in f64 one pair at a time.
fn brute(rows: &[(i64, Vec<f32>)], q: &[f32], k: usize, metric: &str) -> Vec<i64> {
    let dot = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum()
    };
    let mut scored: Vec<(f64, i64)> = rows
        .iter()
        .map(|(id, v)| {
            let d = match metric {
                "cosine" => 1.0 - dot(q, v) / (dot(q, q).sqrt() * dot(v, v).sqrt()),
                "dot" => -dot(q, v),
                _ => q
                    .iter()
                    .zip(v)
                    .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
                    .sum::<f64>(),
            };
            (d, *id)
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(k).map(|x| x.1).collect()
}

fn knn(db: &Connection, sql: &str, q: &[f32]) -> Vec<i64> {
    db.prepare(sql)
        .unwrap()
        .query_map([blob(q)], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

fn count(db: &Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn err(db: &Connection, sql: &str) -> String {
    match db.execute_batch(sql) {
        Ok(()) => panic!("expected an error from {sql}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn exact_search_matches_brute_force_for_every_metric_across_chunks() {
    let db = db();
    let dims = 16;
    let mut r = rng(1);
    for metric in ["cosine", "dot", "l2"] {
        db.execute_batch(&format!(
            "DROP TABLE IF EXISTS t;
             CREATE VIRTUAL TABLE t USING clip_index(v float[{dims}], metric={metric}, chunk_size=8);"
        ))
        .unwrap();
        let mut rows: Vec<(i64, Vec<f32>)> = Vec::new();
        for i in 0..300 {
            let v: Vec<f32> = (0..dims).map(|_| r()).collect();
            db.execute(
                "INSERT INTO t(rowid, v) VALUES (?1, ?2)",
                params![i * 7 - 50, blob(&v)],
            )
            .unwrap();
            rows.push((i * 7 - 50, v));
        }
        // Deletes leave holes; later inserts reuse them.
        for (id, _) in rows.iter().filter(|(id, _)| id % 3 == 0) {
            db.execute("DELETE FROM t WHERE rowid = ?1", [id]).unwrap();
        }
        rows.retain(|(id, _)| id % 3 != 0);
        for i in 0..40 {
            let v: Vec<f32> = (0..dims).map(|_| r()).collect();
            db.execute(
                "INSERT INTO t(rowid, v) VALUES (?1, ?2)",
                params![10_000 + i, blob(&v)],
            )
            .unwrap();
            rows.push((10_000 + i, v));
        }
        for _ in 0..5 {
            let q: Vec<f32> = (0..dims).map(|_| r()).collect();
            let got = knn(
                &db,
                "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 10 ORDER BY distance",
                &q,
            );
            assert_eq!(got, brute(&rows, &q, 10, metric), "{metric}");
        }
        assert_eq!(count(&db, "SELECT count(*) FROM t"), rows.len() as i64);
    }
}

#[test]
fn rescoring_reads_candidates_nearest_bound_first_and_stops_past_the_kth() {
    // The bounds from the int8 codes leave more candidates than k. They are read back nearest
    // lower bound first, and the reading stops at the first whose bound is past the k-th
    // distance found: fewer rows read than candidates, and still the exact answer, ties
    // included (copies of the query's nearest row tie at its distance).
    let db = db();
    let dims = 128;
    let mut r = rng(12);
    for metric in ["cosine", "dot", "l2"] {
        db.execute_batch(&format!(
            "DROP TABLE IF EXISTS t;
             CREATE VIRTUAL TABLE t USING clip_index(v float[{dims}], metric={metric});"
        ))
        .unwrap();
        let mut rows: Vec<(i64, Vec<f32>)> = (1..=20_000)
            .map(|i| (i, (0..dims).map(|_| r()).collect()))
            .collect();
        for i in [5_000, 12_000, 19_999] {
            rows[i - 1].1 = rows[99].1.clone();
        }
        insert_numbered(
            &db,
            &rows.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
        );
        let before = archaeclip::sql::clip_index::rescored_on_this_thread();
        for trial in 0..6 {
            let q: Vec<f32> = if trial == 0 {
                rows[99].1.iter().map(|x| x * 0.9 + 0.01).collect()
            } else {
                (0..dims).map(|_| r()).collect()
            };
            let got = knn(
                &db,
                "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 10 ORDER BY distance",
                &q,
            );
            assert_eq!(got, brute(&rows, &q, 10, metric), "{metric}, query {trial}");
        }
        let after = archaeclip::sql::clip_index::rescored_on_this_thread();
        let (candidates, read) = (after.0 - before.0, after.1 - before.1);
        assert!(
            read >= 60 && read < candidates,
            "{metric}: {read} of {candidates} candidates read"
        );
    }
}

#[test]
fn distances_and_scores_follow_the_metric_and_json_queries_work() {
    let db = db();
    db.execute_batch(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[2]);
         INSERT INTO t(rowid, v) VALUES (1, '[1, 0]'), (2, '[1, 1]'), (3, '[0, 1]');",
    )
    .unwrap();
    let rows: Vec<(i64, f64, f64)> = db
        .prepare("SELECT rowid, distance, score FROM t WHERE v MATCH '[1, 0]' AND k = 2")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(rows[0].0, 1);
    assert!(rows[0].1.abs() < 1e-7 && (rows[0].2 - 1.0).abs() < 1e-7);
    assert_eq!(rows[1].0, 2);
    assert!((rows[1].1 - (1.0 - 0.5f64.sqrt())).abs() < 1e-6);
    // The stored vector comes back as a float32 blob.
    let v: Vec<u8> = db
        .query_row("SELECT v FROM t WHERE rowid = 2", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, blob(&[1.0, 1.0]));
}

/// A row of `t(v, material, year)`: rowid, vector, material, year.
type MetaRow = (i64, Vec<f32>, &'static str, i64);

/// Inserts a random vector for each rowid in `ids` into `t(v, material, year)`, with a
/// material by rowid mod 3 and a year of rowid mod 50; returns the rows.
fn insert_materials(
    db: &Connection,
    dims: usize,
    ids: std::ops::RangeInclusive<i64>,
    seed: u64,
) -> Vec<MetaRow> {
    let mut r = rng(seed);
    let mut rows = Vec::new();
    for i in ids {
        let v: Vec<f32> = (0..dims).map(|_| r()).collect();
        let material = ["bronze", "glass", "bone"][(i % 3) as usize];
        db.execute(
            "INSERT INTO t(rowid, v, material, year) VALUES (?1, ?2, ?3, ?4)",
            params![i, blob(&v), material, i % 50],
        )
        .unwrap();
        rows.push((i, v, material, i % 50));
    }
    rows
}

/// The rows whose material and year pass `f`, as (rowid, vector).
fn matching(rows: &[MetaRow], f: &dyn Fn(&str, i64) -> bool) -> Vec<(i64, Vec<f32>)> {
    rows.iter()
        .filter(|(_, _, m, y)| f(m, *y))
        .map(|(i, v, _, _)| (*i, v.clone()))
        .collect()
}

/// A file database with table `t` (`dims`-d vectors, material and year, `chunk_size` rows a
/// chunk) holding rows 1..=n of [`insert_materials`], committed and closed.
fn materials_file(
    name: &str,
    dims: usize,
    chunk_size: usize,
    n: i64,
    seed: u64,
) -> (std::path::PathBuf, std::path::PathBuf, Vec<MetaRow>) {
    let (dir, path) = fresh_file(name);
    let w = file_db(&path);
    w.execute_batch(&format!(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[{dims}], material text, year integer,
                                                chunk_size={chunk_size})"
    ))
    .unwrap();
    w.execute_batch("BEGIN").unwrap();
    let rows = insert_materials(&w, dims, 1..=n, seed);
    w.execute_batch("COMMIT").unwrap();
    (dir, path, rows)
}

/// A large streamed chunk is read and bounded a piece (<= 256 KiB) at a time: at 512 dims a
/// 1024-row chunk is 3 pieces, and a filter's bits and the rows' keys must follow each piece.
/// Every query runs on a fresh connection (the last one closed), so that it streams its chunks.
#[test]
fn filters_and_rowids_follow_each_piece_of_a_streamed_chunk() {
    let dims = 512;
    let (dir, path, rows) = materials_file("pieces", dims, 1024, 2500, 17);
    let subset = |f: &dyn Fn(&str, i64) -> bool| matching(&rows, f);
    for seed in 0..3 {
        let mut r = rng(100 + seed);
        let q: Vec<f32> = (0..dims).map(|_| r()).collect();
        let fresh = || file_db(&path);
        let all = knn(
            &fresh(),
            "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 40",
            &q,
        );
        assert_eq!(all, brute(&subset(&|_, _| true), &q, 40, "cosine"));
        let got = knn(
            &fresh(),
            "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 40 AND material = 'glass'",
            &q,
        );
        assert_eq!(got, brute(&subset(&|m, _| m == "glass"), &q, 40, "cosine"));
        let got = knn(
            &fresh(),
            "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 10 AND material != 'glass' AND year >= 40",
            &q,
        );
        assert_eq!(
            got,
            brute(&subset(&|m, y| m != "glass" && y >= 40), &q, 10, "cosine")
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_connections_first_exact_query_keeps_no_chunks_and_later_ones_do() {
    let dims = 64;
    let (dir, path, rows) = materials_file("keep", dims, 128, 2000, 5);
    let chunks = 2000_u64.div_ceil(128);
    let kept = archaeclip::sql::clip_index::chunks_kept_on_this_thread;
    let mut r = rng(41);
    let q: Vec<f32> = (0..dims).map(|_| r()).collect();
    let want = brute(&matching(&rows, &|_, _| true), &q, 10, "cosine");
    let sql = "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 10";
    let a = file_db(&path);
    // The first exact query streams every chunk and keeps none of them.
    let before = kept();
    assert_eq!(knn(&a, sql, &q), want);
    assert_eq!(kept() - before, 0, "the first query kept chunks");
    // The second keeps what it streams (all of them: far below its 32 MB share). The stream
    // is short (0.15 MB), so one connection reads it through SQLite's pager.
    assert_eq!(knn(&a, sql, &q), want);
    assert_eq!(kept() - before, chunks, "the second query's chunks");
    // The third finds them all in memory: nothing streamed, nothing new kept.
    assert_eq!(knn(&a, sql, &q), want);
    assert_eq!(kept() - before, chunks, "the third query kept more");
    drop(a);
    // The int8 mode keeps every chunk it streams, from its first query on.
    let b = file_db(&path);
    let before = kept();
    knn(
        &b,
        "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 10 AND mode = 'int8'",
        &q,
    );
    assert_eq!(kept() - before, chunks, "int8's first query");
    drop(b);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn exact_queries_streaming_through_mapped_connections_keep_nothing() {
    // 36,000 rows of 512 dims: 19 MB of int8 records, read with second connections that map
    // the file (with 4 KiB pages from the first query on, with 64 KiB from the second). They
    // read the file's pages again in 1.2-1.6x the time of chunks held in memory, so no exact
    // query keeps a chunk, and each streams again (the short stream above is kept from the
    // second query on).
    let reads = archaeclip::sql::clip_index::second_connection_reads;
    let kept = archaeclip::sql::clip_index::chunks_kept_on_this_thread;
    let mut r = rng(43);
    let rows: Vec<(i64, Vec<f32>)> = (1..=36_000)
        .map(|i| (i, (0..512).map(|_| r()).collect()))
        .collect();
    for page_size in [4096, 65536] {
        let (dir, path) = fresh_file(&format!("mapped-{page_size}"));
        let w = file_db(&path);
        w.execute_batch(&format!(
            "PRAGMA page_size = {page_size};
             CREATE VIRTUAL TABLE t USING clip_index(v float[512]);"
        ))
        .unwrap();
        insert_numbered(&w, &rows.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>());
        assert_eq!(count(&w, "PRAGMA page_size"), page_size);
        drop(w);
        let a = file_db(&path);
        let before = kept();
        for query in 0..3 {
            let q: Vec<f32> = (0..512).map(|_| r()).collect();
            let read = reads().0;
            assert_eq!(
                knn(&a, "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 10", &q),
                brute(&rows, &q, 10, "cosine"),
                "{page_size}-byte pages, query {query}"
            );
            // Through mapped connections the query's thread reads through one too, so some
            // chunk is always theirs; the first query at 64 KiB reads with `pread`, where the
            // query's own connection may claim every batch before the second one has begun.
            if page_size == 4096 || query > 0 {
                assert!(reads().0 > read, "{page_size}-byte pages, query {query}");
            }
        }
        assert_eq!(kept() - before, 0, "{page_size}-byte pages: chunks kept");
        drop(a);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn metadata_filters_apply_before_k() {
    let db = db();
    let dims = 8;
    db.execute_batch(&format!(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[{dims}], material text, year integer,
                                                chunk_size=16)"
    ))
    .unwrap();
    let rows = insert_materials(&db, dims, 0..=399, 2);
    let mut r = rng(3);
    let q: Vec<f32> = (0..dims).map(|_| r()).collect();
    let subset = |f: &dyn Fn(&str, i64) -> bool| matching(&rows, f);
    let got = knn(
        &db,
        "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 7 AND material = 'glass'",
        &q,
    );
    assert_eq!(got, brute(&subset(&|m, _| m == "glass"), &q, 7, "cosine"));
    let got = knn(
        &db,
        "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 5 AND material != 'glass' AND year >= 40",
        &q,
    );
    assert_eq!(
        got,
        brute(&subset(&|m, y| m != "glass" && y >= 40), &q, 5, "cosine")
    );
    // Metadata reads back; a filter matching nothing returns nothing.
    assert_eq!(count(&db, "SELECT year FROM t WHERE rowid = 123"), 123 % 50);
    assert!(knn(
        &db,
        "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 5 AND material = 'gold'",
        &q
    )
    .is_empty());
    // Updating metadata alone keeps the vector.
    db.execute("UPDATE t SET material = 'gold' WHERE rowid = 4", [])
        .unwrap();
    let got = knn(
        &db,
        "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 5 AND material = 'gold'",
        &q,
    );
    assert_eq!(got, vec![4]);
}

#[test]
fn writes_roll_back_with_the_users_transaction() {
    let db = db();
    db.execute_batch(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[2], chunk_size=8);
         INSERT INTO t(rowid, v) VALUES (1, '[1, 0]'), (2, '[0, 1]');",
    )
    .unwrap();
    let nearest = |db: &Connection| {
        knn(
            db,
            "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 1",
            &[1.0, 0.1],
        )
    };
    assert_eq!(nearest(&db), vec![1]);
    db.execute_batch(
        "BEGIN;
         INSERT INTO t(rowid, v) VALUES (3, '[1, 0.1]');
         DELETE FROM t WHERE rowid = 1;",
    )
    .unwrap();
    assert_eq!(nearest(&db), vec![3], "the transaction sees its own writes");
    db.execute_batch("ROLLBACK").unwrap();
    assert_eq!(nearest(&db), vec![1], "the image follows the rollback");
    assert_eq!(count(&db, "SELECT count(*) FROM t"), 2);
    // A savepoint rolled back after the image saw it.
    db.execute_batch(
        "BEGIN; INSERT INTO t(rowid, v) VALUES (4, '[0, -1]');
         SAVEPOINT s; INSERT INTO t(rowid, v) VALUES (5, '[1, 0.1]');",
    )
    .unwrap();
    assert_eq!(nearest(&db), vec![5]);
    db.execute_batch("ROLLBACK TO s; RELEASE s; COMMIT")
        .unwrap();
    assert_eq!(nearest(&db), vec![1]);
    assert_eq!(count(&db, "SELECT count(*) FROM t"), 3);
    db.execute_batch("INSERT INTO t(t) VALUES ('integrity-check')")
        .unwrap();
}

#[test]
fn a_failing_row_in_a_multi_row_statement_leaves_the_index_consistent() {
    let db = db();
    db.execute_batch(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[2], chunk_size=8);
         CREATE TABLE src(id INTEGER PRIMARY KEY, v);
         INSERT INTO src VALUES (1, '[1, 0]'), (2, '[0, 1]'), (3, '[1, 2, 3]'), (4, '[1, 1]');",
    )
    .unwrap();
    let e = err(&db, "INSERT INTO t(rowid, v) SELECT id, v FROM src");
    assert!(e.contains("dimension mismatch"), "{e}");
    // Whatever the statement left, the shadow tables agree with each other.
    db.execute_batch("INSERT INTO t(t) VALUES ('integrity-check')")
        .unwrap();
}

#[test]
fn replace_conflicts_and_deletes_reclaim_space() {
    let db = db();
    db.execute_batch(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[4], chunk_size=8);
         INSERT INTO t(rowid, v) VALUES (1, '[1, 0, 0, 0]');",
    )
    .unwrap();
    let e = err(&db, "INSERT INTO t(rowid, v) VALUES (1, '[0, 1, 0, 0]')");
    assert!(e.contains("UNIQUE constraint failed: t.rowid"), "{e}");
    db.execute(
        "INSERT OR IGNORE INTO t(rowid, v) VALUES (1, '[0, 1, 0, 0]')",
        [],
    )
    .unwrap();
    db.execute(
        "INSERT OR REPLACE INTO t(rowid, v) VALUES (1, '[0, 0, 1, 0]')",
        [],
    )
    .unwrap();
    let v: Vec<u8> = db
        .query_row("SELECT v FROM t WHERE rowid = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, blob(&[0.0, 0.0, 1.0, 0.0]));
    assert_eq!(count(&db, "SELECT count(*) FROM t"), 1);
    // UPDATE of the vector, then of the rowid.
    db.execute("UPDATE t SET v = '[0, 0, 0, 1]' WHERE rowid = 1", [])
        .unwrap();
    db.execute("UPDATE t SET rowid = 9 WHERE rowid = 1", [])
        .unwrap();
    assert_eq!(
        knn(
            &db,
            "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 3",
            &[0.0, 0.0, 0.0, 1.0]
        ),
        vec![9]
    );
    // Automatic rowids, as for an ordinary table.
    db.execute("INSERT INTO t(v) VALUES ('[1, 1, 1, 1]')", [])
        .unwrap();
    assert_eq!(db.last_insert_rowid(), 10);
    // Emptied chunks are deleted, and freed slots are reused before new chunks are made.
    for i in 100..140 {
        db.execute("INSERT INTO t(rowid, v) VALUES (?1, '[1, 2, 3, 4]')", [i])
            .unwrap();
    }
    assert_eq!(count(&db, "SELECT count(*) FROM t_chunks"), 6);
    db.execute("DELETE FROM t WHERE rowid >= 100", []).unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM t_chunks"), 1);
    assert_eq!(count(&db, "SELECT count(*) FROM t_vectors"), 1);
    db.execute("DELETE FROM t", []).unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM t_vectors"), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM t_map"), 0);
    db.execute_batch("INSERT INTO t(t) VALUES ('integrity-check')")
        .unwrap();
}

#[test]
fn a_rowid_conflict_writes_nothing() {
    let db = db();
    db.execute_batch("CREATE VIRTUAL TABLE t USING clip_index(v float[2], tag text, chunk_size=8)")
        .unwrap();
    for i in 1..=8 {
        db.execute(
            "INSERT INTO t(rowid, v, tag) VALUES (?1, '[1, 0]', 'a')",
            [i],
        )
        .unwrap();
    }
    let shadow = |db: &Connection| {
        let mut out = Vec::new();
        for sql in [
            "SELECT count(*) FROM t_chunks",
            "SELECT sum(free) FROM t_chunks",
            "SELECT count(*) FROM t_slots",
            "SELECT count(*) FROM t_vectors",
            "SELECT count(*) FROM t_codes",
            "SELECT count(*) FROM t_map",
            "SELECT sum(rowid * length(tag)) FROM t_map",
        ] {
            out.push(count(db, sql));
        }
        out
    };
    let before = shadow(&db);
    assert_eq!(before[..2], [1, 0]);
    // Inside a transaction, where nothing would roll a partial write back: the only chunk is
    // full, so the row would have gone to a new one; then with a free slot to take.
    db.execute_batch("BEGIN").unwrap();
    let e = err(
        &db,
        "INSERT INTO t(rowid, v, tag) VALUES (3, '[0, 1]', 'bb')",
    );
    assert!(
        e.contains("UNIQUE constraint failed: t.rowid (rowid 3)"),
        "{e}"
    );
    assert_eq!(shadow(&db), before);
    db.execute("DELETE FROM t WHERE rowid = 8", []).unwrap();
    let freed = shadow(&db);
    let e = err(
        &db,
        "INSERT INTO t(rowid, v, tag) VALUES (5, '[0, 1]', 'bb')",
    );
    assert!(e.contains("UNIQUE constraint failed"), "{e}");
    assert_eq!(shadow(&db), freed);
    db.execute_batch("INSERT INTO t(t) VALUES ('integrity-check'); COMMIT")
        .unwrap();
    // The free slot is still there for the next row.
    db.execute("INSERT INTO t(rowid, v) VALUES (20, '[0, 1]')", [])
        .unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM t_chunks"), 1);
    assert_eq!(
        knn(
            &db,
            "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 1",
            &[0.0, 1.0]
        ),
        vec![20]
    );

    // External content whose rowid column repeats a value: 'rebuild' names it.
    db.execute_batch(
        "CREATE TABLE docs(id INTEGER, v BLOB);
         INSERT INTO docs VALUES (1, X'0000803F00000000'), (1, X'000000000000803F');
         CREATE VIRTUAL TABLE c USING clip_index(v float[2], content='docs', content_rowid='id');",
    )
    .unwrap();
    let e = err(&db, "INSERT INTO c(c) VALUES ('rebuild')");
    assert!(
        e.contains("content rowid 1 appears twice in docs.id"),
        "{e}"
    );
}

#[test]
fn optimize_fills_holes_and_drops_emptied_chunks() {
    let db = db();
    db.execute_batch("CREATE VIRTUAL TABLE t USING clip_index(v float[3], tag text, chunk_size=8)")
        .unwrap();
    let mut r = rng(3);
    let mut rows = Vec::new();
    for i in 0..80i64 {
        let v: Vec<f32> = (0..3).map(|_| r()).collect();
        db.execute(
            "INSERT INTO t(rowid, v, tag) VALUES (?1, ?2, ?3)",
            params![i, blob(&v), format!("tag{i}")],
        )
        .unwrap();
        rows.push((i, v));
    }
    db.execute("DELETE FROM t WHERE rowid % 2 = 0", []).unwrap();
    rows.retain(|(i, _)| i % 2 == 1);
    assert_eq!(count(&db, "SELECT count(*) FROM t_chunks"), 10);
    db.execute_batch("INSERT INTO t(t) VALUES ('optimize')")
        .unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM t_chunks"), 5);
    db.execute_batch("INSERT INTO t(t) VALUES ('integrity-check')")
        .unwrap();
    let q = [0.3, -0.2, 0.9];
    assert_eq!(
        knn(&db, "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 10", &q),
        brute(&rows, &q, 10, "cosine")
    );
    let tag: String = db
        .query_row("SELECT tag FROM t WHERE rowid = 77", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tag, "tag77");
}

#[test]
fn external_content_rebuild_and_integrity_check_report_drift() {
    let db = db();
    db.execute_batch(
        "CREATE TABLE embeddings(id TEXT, collection_id INTEGER, embedding BLOB);
         CREATE VIRTUAL TABLE idx USING clip_index(embedding float[2], collection_id integer,
                                                   content='embeddings', chunk_size=8);",
    )
    .unwrap();
    for i in 0..30 {
        let v = [i as f32, 1.0];
        db.execute(
            "INSERT INTO embeddings(id, collection_id, embedding) VALUES (?1, ?2, ?3)",
            params![format!("doc{i}"), i % 2, blob(&v)],
        )
        .unwrap();
    }
    db.execute(
        "INSERT INTO embeddings(id, embedding) VALUES ('no vector', NULL)",
        [],
    )
    .unwrap();
    db.execute_batch("INSERT INTO idx(idx) VALUES ('rebuild')")
        .unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM idx"), 30);
    db.execute_batch("INSERT INTO idx(idx) VALUES ('integrity-check')")
        .unwrap();
    let got = knn(
        &db,
        "SELECT rowid FROM idx WHERE embedding MATCH ?1 AND k = 2 AND collection_id = 1",
        &[29.0, 1.0],
    );
    assert_eq!(got, vec![30, 28]);
    // Drift: a changed vector, a new row, a deleted row.
    db.execute_batch(
        "UPDATE embeddings SET embedding = vec_f32('[5, 5]') WHERE rowid = 3;
         INSERT INTO embeddings(id, embedding) VALUES ('new', vec_f32('[1, 1]'));
         DELETE FROM embeddings WHERE rowid = 4;",
    )
    .unwrap();
    let e = err(&db, "INSERT INTO idx(idx) VALUES ('integrity-check')");
    assert!(
        e.contains("1 content rows are not in the index (rowids 32)"),
        "{e}"
    );
    assert!(
        e.contains("1 rows have a different vector in the index (rowids 3)"),
        "{e}"
    );
    assert!(
        e.contains("1 index rows are not in the content table"),
        "{e}"
    );
    db.execute_batch(
        "INSERT INTO idx(idx) VALUES ('rebuild');
         INSERT INTO idx(idx) VALUES ('integrity-check');",
    )
    .unwrap();
    // Triggers keep it in step, as with FTS5.
    db.execute_batch(
        "CREATE TRIGGER e_ai AFTER INSERT ON embeddings WHEN new.embedding IS NOT NULL BEGIN
           INSERT INTO idx(rowid, embedding, collection_id)
           VALUES (new.rowid, new.embedding, new.collection_id);
         END;
         CREATE TRIGGER e_ad AFTER DELETE ON embeddings BEGIN
           DELETE FROM idx WHERE rowid = old.rowid;
         END;
         INSERT INTO embeddings(id, collection_id, embedding) VALUES ('t', 1, vec_f32('[100, 1]'));
         DELETE FROM embeddings WHERE rowid = 5;
         INSERT INTO idx(idx) VALUES ('integrity-check');",
    )
    .unwrap();
    let e = err(
        &db,
        "CREATE VIRTUAL TABLE plain USING clip_index(v float[2]);
                      INSERT INTO plain(plain) VALUES ('rebuild')",
    );
    assert!(e.contains("needs an external-content index"), "{e}");
}

#[test]
fn errors_name_the_table_and_the_problem() {
    let db = db();
    db.execute_batch("CREATE VIRTUAL TABLE t USING clip_index(v float[3])")
        .unwrap();
    let e = err(&db, "INSERT INTO t(v) VALUES ('[1, 2]')");
    assert!(
        e.contains("clip_index t: v: dimension mismatch: the index has 3, this vector 2"),
        "{e}"
    );
    let e = err(&db, "INSERT INTO t(v) VALUES (NULL)");
    assert!(e.contains("v must not be NULL"), "{e}");
    let e = err(&db, "SELECT rowid FROM t WHERE v MATCH '[1, 2, 3]'");
    assert!(e.contains("needs 'AND k = N'"), "{e}");
    let e = err(&db, "SELECT rowid FROM t WHERE v MATCH '[1, 2]' AND k = 3");
    assert!(e.contains("MATCH"), "{e}");
    let e = err(
        &db,
        "SELECT rowid FROM t WHERE v MATCH '[1, 2, 3]' AND k = -1",
    );
    assert!(e.contains("k must be an integer from 0"), "{e}");
    let e = err(
        &db,
        "SELECT rowid FROM t WHERE v MATCH '[1, 2, 3]' AND k = 1 AND mode = 4",
    );
    assert!(
        e.contains(
            "clip_index t: mode must be 'exact', 'int8', 'int4', 'binary' or 'hnsw', found an integer"
        ),
        "{e}"
    );
    let e = err(
        &db,
        "SELECT rowid FROM t WHERE v MATCH '[1, 2, 3]' AND k = 1 AND mode = 'int2'",
    );
    assert!(
        e.contains("clip_index t: unknown mode 'int2', expected"),
        "{e}"
    );
    let e = err(&db, "INSERT INTO t(t) VALUES ('vacuum')");
    assert!(e.contains("unknown command 'vacuum'"), "{e}");
    let e = err(
        &db,
        "CREATE VIRTUAL TABLE u USING clip_index(v float[3], bogus=1)",
    );
    assert!(e.contains("unknown option 'bogus'"), "{e}");
}

#[test]
fn another_connections_commit_is_seen_and_reopening_reads_the_chunks() {
    let (dir, path) = fresh_file("two");
    let a = file_db(&path);
    let b = file_db(&path);
    a.execute_batch(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[2], chunk_size=8);
         INSERT INTO t(rowid, v) VALUES (1, '[1, 0]');",
    )
    .unwrap();
    let q = [0.0f32, 1.0];
    let sql = "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 1";
    assert_eq!(knn(&b, sql, &q), vec![1]);
    a.execute("INSERT INTO t(rowid, v) VALUES (2, '[0, 1]')", [])
        .unwrap();
    assert_eq!(knn(&b, sql, &q), vec![2], "b's image follows a's commit");
    drop((a, b));
    let c = file_db(&path);
    assert_eq!(knn(&c, sql, &q), vec![2]);
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_long_exact_scan_is_shared_with_a_second_connection_that_reads_only_what_this_one_sees() {
    // 40,000 rows of 512 dims: 21 MB of int8 records, past the 16 MiB from which an exact
    // query reads with a second connection on another thread. That connection has its own
    // snapshot; these checks fail if it reads a chunk whose version differs from the query's.
    let (dir, path) = fresh_file("reader");
    let w = file_db(&path);
    w.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE VIRTUAL TABLE t USING clip_index(v float[512]);",
    )
    .unwrap();
    let mut r = rng(41);
    let mut rows: Vec<(i64, Vec<f32>)> = (1..=40_000)
        .map(|i| (i, (0..512).map(|_| r()).collect()))
        .collect();
    insert_numbered(&w, &rows.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>());
    let q: Vec<f32> = (0..512).map(|_| r()).collect();
    let far: Vec<f32> = q.iter().map(|x| -x).collect();
    let sql = "SELECT rowid, distance FROM t WHERE v MATCH ?1 AND k = 100";
    // The answer with f64 distances, and a check of a query's rows and distances against it.
    let expect = |rows: &[(i64, Vec<f32>)]| {
        let dot = |a: &[f32], b: &[f32]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum()
        };
        brute(rows, &q, 100, "cosine")
            .into_iter()
            .map(|id| {
                let v = &rows.iter().find(|r| r.0 == id).unwrap().1;
                (
                    id,
                    1.0 - dot(&q, v) / (dot(&q, &q).sqrt() * dot(v, v).sqrt()),
                )
            })
            .collect::<Vec<(i64, f64)>>()
    };
    let check = |got: &[(i64, f64)], want: &[(i64, f64)], what: &str| {
        let ids = |x: &[(i64, f64)]| x.iter().map(|h| h.0).collect::<Vec<_>>();
        assert_eq!(ids(got), ids(want), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g.1 - w.1).abs() < 1e-5,
                "{what}: rowid {} at {} for {}",
                g.0,
                g.1,
                w.1
            );
        }
    };
    let reads = archaeclip::sql::clip_index::second_connection_reads;

    // A fresh connection streams every chunk: the second connection reads some of them, and
    // rescores some of the 100+ candidates.
    let before = reads();
    let a = file_db(&path);
    let first = scored(&a, sql, &q);
    check(&first, &expect(&rows), "a fresh connection");
    let after = reads();
    assert!(
        after.0 > before.0,
        "the second connection read chunks: {before:?} -> {after:?}"
    );
    assert!(
        after.1 > before.1,
        "and rescored rows: {before:?} -> {after:?}"
    );
    // Closed: no connection holds its chunks, so the next one streams them again.
    drop(a);

    // The int8 mode reads the same records, two connections too; with 1,000 candidates for
    // 10 rows it finds the exact ones here.
    let before = reads();
    let a8 = file_db(&path);
    let int8 = scored(
        &a8,
        "SELECT rowid, distance FROM t WHERE v MATCH ?1 AND k = 10 AND mode = 'int8' \
         AND oversample = 100",
        &q,
    );
    check(&int8, &first[..10], "int8 from the codes");
    let after = reads();
    assert!(after.0 > before.0, "{before:?} -> {after:?}");
    drop(a8);

    // The nearest row moves away and a far row becomes the query, committed by another
    // connection after c's read transaction began: c must not see either.
    let (x, y) = (first[0].0, 39_999);
    assert!(!first.iter().any(|h| h.0 == y));
    let c = file_db(&path);
    c.execute_batch("BEGIN").unwrap();
    assert_eq!(count(&c, "SELECT count(*) FROM t_map"), 40_000);
    w.execute(
        "UPDATE t SET v = ?1 WHERE rowid = ?2",
        params![blob(&far), x],
    )
    .unwrap();
    w.execute("UPDATE t SET v = ?1 WHERE rowid = ?2", params![blob(&q), y])
        .unwrap();
    let before = reads();
    check(
        &scored(&c, sql, &q),
        &first,
        "c's snapshot, older than the commit",
    );
    let after = reads();
    assert!(after.0 > before.0, "{before:?} -> {after:?}");
    c.execute_batch("COMMIT").unwrap();
    rows[(x - 1) as usize].1 = far.clone();
    rows[(y - 1) as usize].1 = q.clone();
    let now = scored(&c, sql, &q);
    assert_eq!(now[0].0, y);
    check(&now, &expect(&rows), "c after its transaction");
    drop(c);

    // A connection's own uncommitted write, which the second connection cannot see.
    let d = file_db(&path);
    d.execute_batch("BEGIN").unwrap();
    let z = 20_000;
    d.execute("UPDATE t SET v = ?1 WHERE rowid = ?2", params![blob(&q), z])
        .unwrap();
    let before = reads();
    let mut mine = rows.clone();
    mine[(z - 1) as usize].1 = q.clone();
    check(&scored(&d, sql, &q), &expect(&mine), "d's own write");
    let after = reads();
    assert!(after.0 > before.0, "{before:?} -> {after:?}");
    d.execute_batch("ROLLBACK").unwrap();
    drop(d);

    // A connection that maps the file (the second connection reads it with pread).
    let e = file_db(&path);
    e.execute_batch("PRAGMA mmap_size = 1073741824").unwrap();
    let before = reads();
    check(&scored(&e, sql, &q), &expect(&rows), "e, memory-mapped");
    let after = reads();
    assert!(after.0 > before.0, "{before:?} -> {after:?}");
    drop(e);

    // In a rollback journal a writer reads alone: spilling its page cache mid-query needs an
    // EXCLUSIVE lock, which the second connection's read lock would hold off.
    w.execute_batch("PRAGMA journal_mode = DELETE").unwrap();
    let f = file_db(&path);
    f.execute_batch("BEGIN").unwrap();
    f.execute("UPDATE t SET v = ?1 WHERE rowid = ?2", params![blob(&q), z])
        .unwrap();
    let before = reads();
    check(
        &scored(&f, sql, &q),
        &expect(&mine),
        "f's own write, rollback journal",
    );
    assert_eq!(reads(), before, "f read alone");
    f.execute_batch("ROLLBACK").unwrap();
    drop(f);
    // Without a write transaction it reads with two.
    let g = file_db(&path);
    let before = reads();
    check(&scored(&g, sql, &q), &expect(&rows), "g, rollback journal");
    let after = reads();
    assert!(after.0 > before.0, "{before:?} -> {after:?}");
    drop((g, w));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rolled_back_insert_moves_the_generation_for_the_next_one() {
    // An insert that follows one into the same chunk may leave the generation alone; not when
    // the first was rolled back: the search below would keep the image it made before.
    let db = db();
    db.execute_batch(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[2], chunk_size=8);
         BEGIN;
         INSERT INTO t(rowid, v) VALUES (1, '[1, 0]');",
    )
    .unwrap();
    let sql = "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 1";
    for mode in ["", " AND mode = 'int8'"] {
        assert_eq!(knn(&db, &format!("{sql}{mode}"), &[0.0, 1.0]), vec![1]);
    }
    db.execute_batch(
        "SAVEPOINT s;
         INSERT INTO t(rowid, v) VALUES (2, '[0, 1]');
         ROLLBACK TO s;
         INSERT INTO t(rowid, v) VALUES (3, '[0.1, 1]');",
    )
    .unwrap();
    for mode in ["", " AND mode = 'int8'"] {
        assert_eq!(
            knn(&db, &format!("{sql}{mode}"), &[0.0, 1.0]),
            vec![3],
            "{mode}"
        );
    }
    // The same through a statement that fails after its first row (its rows are rolled back).
    db.execute_batch("CREATE TABLE src(id INTEGER, v TEXT)")
        .unwrap();
    db.execute_batch("INSERT INTO src VALUES (4, '[-1, 0]'), (1, '[-1, 0]');")
        .unwrap();
    let e = err(
        &db,
        "INSERT INTO t(rowid, v) SELECT id, v FROM src ORDER BY id DESC",
    );
    assert!(e.contains("UNIQUE constraint failed"), "{e}");
    db.execute("INSERT INTO t(rowid, v) VALUES (5, '[-1, 0.1]')", [])
        .unwrap();
    assert_eq!(knn(&db, sql, &[-1.0, 0.0]), vec![5]);
    db.execute_batch("INSERT INTO t(t) VALUES ('integrity-check'); COMMIT")
        .unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM t"), 3);
}

#[test]
fn tables_of_format_1_keep_working() {
    // Format 1 (before stop 28) kept each chunk's slot bitmap in t_slots; format 2 keeps it in
    // t_chunks. A format-1 table is made here by moving the bitmaps back, as an older
    // archaeclip wrote them, and then used for every kind of write.
    let (dir, path) = fresh_file("format1");
    let mut rows: Vec<(i64, Vec<f32>)> = Vec::new();
    let mut r = rng(11);
    {
        let db = file_db(&path);
        db.execute_batch("CREATE VIRTUAL TABLE t USING clip_index(v float[3], chunk_size=8)")
            .unwrap();
        insert_random(&db, 1..=20, &mut r, &mut rows);
        assert_eq!(
            count(&db, "SELECT value FROM t_config WHERE key = 'format'"),
            2
        );
        db.execute_batch(
            "CREATE TABLE old_slots(id INTEGER PRIMARY KEY, validity BLOB NOT NULL,
                                    rowids BLOB NOT NULL);
             INSERT INTO old_slots SELECT s.id, c.validity, s.rowids
               FROM t_slots s JOIN t_chunks c USING (id);
             CREATE TABLE old_chunks(id INTEGER PRIMARY KEY, version INTEGER NOT NULL,
                                     free INTEGER NOT NULL);
             INSERT INTO old_chunks SELECT id, version, free FROM t_chunks;
             DROP TABLE t_slots;
             DROP TABLE t_chunks;
             ALTER TABLE old_slots RENAME TO t_slots;
             ALTER TABLE old_chunks RENAME TO t_chunks;
             CREATE INDEX t_chunks_free ON t_chunks(id) WHERE free > 0;
             UPDATE t_config SET value = 1 WHERE key = 'format';",
        )
        .unwrap();
    }
    let db = file_db(&path);
    let q = [0.3f32, -0.2, 0.9];
    let sql = "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 5";
    assert_eq!(knn(&db, sql, &q), brute(&rows, &q, 5, "cosine"));
    // Deletes, a free slot taken again, new chunks, an update, a replace, optimize.
    db.execute("DELETE FROM t WHERE rowid IN (3, 9, 10)", [])
        .unwrap();
    rows.retain(|(id, _)| ![3, 9, 10].contains(id));
    insert_random(&db, 21..=30, &mut r, &mut rows);
    let v = vec![0.3f32, -0.2, 0.9];
    db.execute("UPDATE t SET v = ?1 WHERE rowid = 21", [blob(&v)])
        .unwrap();
    db.execute(
        "INSERT OR REPLACE INTO t(rowid, v) VALUES (22, ?1)",
        [blob(&v)],
    )
    .unwrap();
    for (id, row) in rows.iter_mut() {
        if *id == 21 || *id == 22 {
            *row = v.clone();
        }
    }
    db.execute_batch("DELETE FROM t WHERE rowid <= 8; INSERT INTO t(t) VALUES ('optimize')")
        .unwrap();
    rows.retain(|(id, _)| *id > 8);
    for mode in [
        "",
        " AND mode = 'int8'",
        " AND mode = 'binary' AND oversample = 16",
    ] {
        assert_eq!(
            knn(&db, &format!("{sql}{mode}"), &q),
            brute(&rows, &q, 5, "cosine"),
            "{mode}"
        );
    }
    db.execute_batch("INSERT INTO t(t) VALUES ('integrity-check')")
        .unwrap();
    // Still format 1: the bitmaps stayed in t_slots, and they agree with the rows.
    assert_eq!(
        count(&db, "SELECT value FROM t_config WHERE key = 'format'"),
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pragma_table_info('t_chunks') WHERE name = 'validity'"
        ),
        0
    );
    assert_eq!(count(&db, "SELECT count(*) FROM t"), rows.len() as i64);
    // A format this version does not know is refused by name.
    db.execute_batch("UPDATE t_config SET value = 3 WHERE key = 'format'")
        .unwrap();
    drop(db);
    let db = file_db(&path);
    let e = err(&db, "SELECT count(*) FROM t");
    assert!(
        e.contains("clip_index t: its shadow tables are of format 3")
            && e.contains("formats 1 and 2"),
        "{e}"
    );
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_float32_part_is_stored_within_ten_percent_of_the_raw_vectors() {
    let db = db();
    let (dims, n) = (256usize, 3_000usize);
    db.execute_batch(&format!(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[{dims}])"
    ))
    .unwrap();
    let mut r = rng(4);
    db.execute_batch("BEGIN").unwrap();
    {
        let mut insert = db
            .prepare("INSERT INTO t(rowid, v) VALUES (?1, ?2)")
            .unwrap();
        for i in 0..n {
            let v: Vec<f32> = (0..dims).map(|_| r()).collect();
            insert.execute(params![i as i64, blob(&v)]).unwrap();
        }
    }
    db.execute_batch("COMMIT").unwrap();
    let stored = count(
        &db,
        "SELECT sum(pgsize) FROM dbstat WHERE name IN ('t_vectors')",
    ) as f64;
    let raw = (n * dims * 4) as f64;
    // Chunks are allocated whole: compare with the slots allocated, and the total with the rows.
    let ratio = stored / raw;
    assert!(ratio < 1.1, "t_vectors is {ratio:.3}x the raw vectors");
    let codes = count(
        &db,
        "SELECT sum(pgsize) FROM dbstat WHERE name IN ('t_codes')",
    ) as f64;
    // One 20-byte header and one byte per element per row.
    let record = (20 + dims) as f64 / (4 * dims) as f64;
    assert!(
        codes / raw < record * 1.1,
        "t_codes is {:.3}x the raw vectors",
        codes / raw
    );
    let everything = count(
        &db,
        "SELECT sum(pgsize) FROM dbstat WHERE name LIKE 't\\_%' ESCAPE '\\'",
    ) as f64;
    assert!(
        everything / raw < 1.15 + record,
        "all shadow tables: {:.3}x",
        everything / raw
    );
}

#[test]
fn quantized_modes_rescore_exactly_and_oversampling_buys_recall() {
    // int8 is answered from the stored codes (codes=on) or from an in-memory copy (codes=off).
    for codes in ["on", "off"] {
        quantized_modes(codes);
    }
}

fn quantized_modes(codes: &str) {
    let db = db();
    let dims = 32;
    db.execute_batch(&format!(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[{dims}], part integer, chunk_size=64, \
         codes={codes})"
    ))
    .unwrap();
    let mut r = rng(5);
    let mut rows = Vec::new();
    db.execute_batch("BEGIN").unwrap();
    for i in 0..3000i64 {
        let v: Vec<f32> = (0..dims).map(|_| r()).collect();
        db.execute(
            "INSERT INTO t(rowid, v, part) VALUES (?1, ?2, ?3)",
            params![i, blob(&v), i % 4],
        )
        .unwrap();
        rows.push((i, v));
    }
    db.execute_batch("COMMIT").unwrap();
    let scored = |sql: &str, q: &[f32]| -> Vec<(i64, f64)> {
        db.prepare(sql)
            .unwrap()
            .query_map([blob(q)], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    let (mut found, mut found4, mut wanted) = (0, 0, 0);
    for _ in 0..10 {
        let q: Vec<f32> = (0..dims).map(|_| r()).collect();
        let exact = scored(
            "SELECT rowid, distance FROM t WHERE v MATCH ?1 AND k = 10",
            &q,
        );
        assert_eq!(
            exact.iter().map(|x| x.0).collect::<Vec<_>>(),
            brute(&rows, &q, 10, "cosine")
        );
        for mode in ["int8", "int4", "binary"] {
            // With every row a candidate, the answer is the exact one, distances included.
            let all = scored(
                &format!(
                    "SELECT rowid, distance FROM t WHERE v MATCH ?1 AND k = 10 \
                     AND mode = '{mode}' AND oversample = 1000"
                ),
                &q,
            );
            assert_eq!(all, exact, "{mode}");
        }
        let quick = scored(
            "SELECT rowid, distance FROM t WHERE v MATCH ?1 AND k = 10 AND mode = 'int8'",
            &q,
        );
        found += quick.iter().filter(|x| exact.contains(x)).count();
        let quick4 = scored(
            "SELECT rowid, distance FROM t WHERE v MATCH ?1 AND k = 10 AND mode = 'int4'",
            &q,
        );
        found4 += quick4.iter().filter(|x| exact.contains(x)).count();
        wanted += 10;
        // Filters still apply before k (int8 is answered from the stored codes, the others
        // from in-memory copies).
        let subset: Vec<(i64, Vec<f32>)> =
            rows.iter().filter(|(i, _)| i % 4 == 2).cloned().collect();
        for mode in ["int8", "binary"] {
            let part = scored(
                &format!(
                    "SELECT rowid, distance FROM t WHERE v MATCH ?1 AND k = 5 AND mode = '{mode}' \
                     AND oversample = 1000 AND part = 2"
                ),
                &q,
            );
            assert_eq!(
                part.iter().map(|x| x.0).collect::<Vec<_>>(),
                brute(&subset, &q, 5, "cosine"),
                "{mode}"
            );
        }
    }
    assert!(
        found as f64 / wanted as f64 >= 0.9,
        "int8 with the default oversampling, codes={codes}: recall {found}/{wanted}"
    );
    assert!(
        found4 as f64 / wanted as f64 >= 0.9,
        "int4 with the default oversampling: recall {found4}/{wanted}"
    );
    let e = err(
        &db,
        "SELECT * FROM t WHERE v MATCH '[1]' AND k = 1 AND mode = 'pq'",
    );
    assert!(e.contains("unknown mode 'pq'"), "{e}");
    let e = err(
        &db,
        "SELECT * FROM t WHERE v MATCH '[1]' AND k = 1 AND mode = 'int8' AND oversample = 0",
    );
    assert!(
        e.contains("oversample must be an integer from 1 to 1000, found 0"),
        "{e}"
    );
}

/// `n` unit-ish rows around `centres` cluster centres (shaped like real embeddings).
fn clustered(n: usize, dims: usize, centres: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut r = rng(seed);
    let c: Vec<Vec<f32>> = (0..centres)
        .map(|_| (0..dims).map(|_| r()).collect())
        .collect();
    (0..n)
        .map(|i| {
            let centre = &c[(i * 7919) % centres];
            centre.iter().map(|x| x + 0.3 * r()).collect()
        })
        .collect()
}

/// Inserts `rows` into `t` as rowids 1, 2, ... in one transaction.
fn insert_numbered(db: &Connection, rows: &[Vec<f32>]) {
    db.execute_batch("BEGIN").unwrap();
    for (i, v) in rows.iter().enumerate() {
        db.execute(
            "INSERT INTO t(rowid, v) VALUES (?1, ?2)",
            params![i as i64 + 1, blob(v)],
        )
        .unwrap();
    }
    db.execute_batch("COMMIT").unwrap();
}

/// Inserts a random 3-d row for each rowid into `t`, recording it in `rows`.
fn insert_random(
    db: &Connection,
    rowids: std::ops::RangeInclusive<i64>,
    r: &mut impl FnMut() -> f32,
    rows: &mut Vec<(i64, Vec<f32>)>,
) {
    for i in rowids {
        let v = vec![r(), r(), r()];
        db.execute(
            "INSERT INTO t(rowid, v) VALUES (?1, ?2)",
            params![i, blob(&v)],
        )
        .unwrap();
        rows.push((i, v));
    }
}

/// A scratch directory of this test process and a database path in it (no file yet).
fn fresh_file(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("archaeclip-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("index.db");
    let _ = std::fs::remove_file(&path);
    (dir, path)
}

/// A connection to a database file with the functions registered.
fn file_db(path: &std::path::Path) -> Connection {
    let c = Connection::open(path).unwrap();
    archaeclip::register(&c).unwrap();
    c
}

fn scored(db: &Connection, sql: &str, q: &[f32]) -> Vec<(i64, f64)> {
    db.prepare(sql)
        .unwrap()
        .query_map([blob(q)], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

#[test]
fn hnsw_follows_every_write_and_its_distances_are_the_exact_ones() {
    let db = db();
    let dims = 24;
    for metric in ["cosine", "l2", "dot"] {
        db.execute_batch(&format!(
            "DROP TABLE IF EXISTS t;
             CREATE VIRTUAL TABLE t USING clip_index(v float[{dims}], metric={metric},
                                                    chunk_size=64, hnsw=on)"
        ))
        .unwrap();
        let data = clustered(2500, dims, 40, 11);
        let mut rows: Vec<(i64, Vec<f32>)> = Vec::new();
        db.execute_batch("BEGIN").unwrap();
        for (i, v) in data.iter().enumerate() {
            let id = i as i64 * 3 - 100;
            db.execute(
                "INSERT INTO t(rowid, v) VALUES (?1, ?2)",
                params![id, blob(v)],
            )
            .unwrap();
            rows.push((id, v.clone()));
        }
        db.execute_batch("COMMIT").unwrap();
        // Deletes, in-place updates, rowid changes and INSERT OR REPLACE all reach the graph.
        let mut r = rng(12);
        for (id, _) in rows.iter().filter(|(id, _)| id % 5 == 0) {
            db.execute("DELETE FROM t WHERE rowid = ?1", [id]).unwrap();
        }
        rows.retain(|(id, _)| id % 5 != 0);
        for row in rows.iter_mut().filter(|(id, _)| id % 7 == 1) {
            row.1 = (0..dims).map(|_| r()).collect();
            db.execute(
                "UPDATE t SET v = ?2 WHERE rowid = ?1",
                params![row.0, blob(&row.1)],
            )
            .unwrap();
        }
        for row in rows.iter_mut().filter(|(id, _)| id % 11 == 2) {
            row.1 = (0..dims).map(|_| r()).collect();
            db.execute(
                "INSERT OR REPLACE INTO t(rowid, v) VALUES (?1, ?2)",
                params![row.0, blob(&row.1)],
            )
            .unwrap();
        }
        for row in rows.iter_mut().filter(|(id, _)| id % 13 == 4) {
            db.execute(
                "UPDATE t SET rowid = ?2 WHERE rowid = ?1",
                params![row.0, row.0 + 1_000_000],
            )
            .unwrap();
            row.0 += 1_000_000;
        }
        let (mut found, mut wanted) = (0usize, 0usize);
        for i in 0..30 {
            // Queries near stored rows, including updated and moved ones.
            let q: Vec<f32> = rows[(i * 37) % rows.len()]
                .1
                .iter()
                .map(|x| x + 0.05 * r())
                .collect();
            let exact = scored(
                &db,
                "SELECT rowid, distance FROM t WHERE v MATCH ?1 AND k = 10",
                &q,
            );
            assert_eq!(
                exact.iter().map(|x| x.0).collect::<Vec<_>>(),
                brute(&rows, &q, 10, metric),
                "{metric}"
            );
            let graph = scored(
                &db,
                "SELECT rowid, distance FROM t WHERE v MATCH ?1 AND k = 10 AND mode = 'hnsw'",
                &q,
            );
            assert_eq!(graph.len(), 10);
            for (id, distance) in &graph {
                // Every returned row exists now, with its exact distance.
                let exact_all = scored(
                    &db,
                    &format!(
                        "SELECT rowid, distance FROM t WHERE v MATCH ?1 AND k = {} AND rowid = {id}",
                        rows.len()
                    ),
                    &q,
                );
                assert_eq!(
                    exact_all.len(),
                    1,
                    "{metric}: rowid {id} is not in the table"
                );
                assert_eq!(exact_all[0].1, *distance, "{metric}: rowid {id}");
            }
            found += graph.iter().filter(|x| exact.contains(x)).count();
            wanted += 10;
        }
        let recall = found as f64 / wanted as f64;
        assert!(recall >= 0.95, "{metric}: hnsw recall@10 {recall}");
        db.execute("INSERT INTO t(t) VALUES ('integrity-check')", [])
            .unwrap();
    }
}

#[test]
fn hnsw_graph_is_saved_replayed_by_other_connections_and_rolled_back() {
    let (dir, path) = fresh_file("hnsw");
    let open = || file_db(&path);
    let a = open();
    let dims = 16;
    a.execute_batch(&format!(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[{dims}], hnsw=on, hnsw_m=8,
                                                 hnsw_ef_construction=64)"
    ))
    .unwrap();
    let data = clustered(1500, dims, 20, 21);
    insert_numbered(&a, &data);
    // The 1,000th write saved the graph; the other 500 wait in the log.
    assert!(count(&a, "SELECT count(*) FROM t_hnsw") >= 1);
    assert_eq!(count(&a, "SELECT count(*) FROM t_hnsw_log"), 500);
    assert_eq!(
        count(&a, "SELECT value FROM t_config WHERE key = 'hnsw_rows'"),
        1000
    );
    // A wide search (ef = 500 of 1,500 rows): the graph is built by parallel inserts, so its
    // shape varies from run to run, and with the default ef a near-duplicate query missed its
    // row about once in 75 loaded runs.
    let sql = "SELECT rowid, distance FROM t WHERE v MATCH ?1 AND k = 5 AND mode = 'hnsw' \
               AND oversample = 100";
    let mut r = rng(22);
    let q: Vec<f32> = data[1234].iter().map(|x| x + 0.01 * r()).collect();
    let before = scored(&a, sql, &q);
    assert_eq!(
        before[0].0, 1235,
        "a row replayed from the log finds itself"
    );
    // Another connection loads the saved graph and replays the log: the same answer.
    let b = open();
    assert_eq!(scored(&b, sql, &q), before);
    // A row written in a transaction is seen inside it, and gone after a rollback, also when a
    // later write reuses its log position.
    let twin: Vec<f32> = q.iter().map(|x| x * 1.01).collect();
    a.execute_batch("BEGIN").unwrap();
    a.execute("INSERT INTO t(rowid, v) VALUES (99999, ?1)", [blob(&twin)])
        .unwrap();
    assert_eq!(scored(&a, sql, &q)[0].0, 99999);
    a.execute_batch("ROLLBACK").unwrap();
    assert_eq!(scored(&a, sql, &q), before);
    let far: Vec<f32> = q.iter().map(|x| -x).collect();
    a.execute("INSERT INTO t(rowid, v) VALUES (99999, ?1)", [blob(&far)])
        .unwrap();
    assert_eq!(
        scored(&a, sql, &q),
        before,
        "the rolled-back vector is not in the graph"
    );
    assert_eq!(scored(&a, sql, &far)[0].0, 99999);
    // b follows a's commits.
    assert_eq!(scored(&b, sql, &far)[0].0, 99999);
    a.execute("DELETE FROM t WHERE rowid = 1235", []).unwrap();
    assert!(scored(&b, sql, &q).iter().all(|x| x.0 != 1235));
    // 'optimize' saves the graph and empties the log; a fresh connection agrees.
    a.execute("INSERT INTO t(t) VALUES ('optimize')", [])
        .unwrap();
    assert_eq!(count(&a, "SELECT count(*) FROM t_hnsw_log"), 0);
    a.execute("INSERT INTO t(t) VALUES ('integrity-check')", [])
        .unwrap();
    let after = scored(&a, sql, &q);
    assert_eq!(scored(&open(), sql, &q), after);
    assert_eq!(scored(&b, sql, &q), after);
    // The one rowid the graph cannot key is still found (scored beside the graph).
    a.execute(
        "INSERT INTO t(rowid, v) VALUES (9223372036854775807, ?1)",
        [blob(&twin)],
    )
    .unwrap();
    assert_eq!(scored(&a, sql, &q)[0].0, i64::MAX);
    a.execute("INSERT INTO t(t) VALUES ('integrity-check')", [])
        .unwrap();
    // A missing saved graph is built again from the stored vectors, not from the log alone.
    a.execute_batch("DELETE FROM t_hnsw; INSERT INTO t(t) VALUES ('optimize');")
        .unwrap();
    let c = open();
    c.execute("INSERT INTO t(t) VALUES ('integrity-check')", [])
        .unwrap();
    // 1,501 rows, less the one the graph cannot key.
    assert_eq!(count(&c, "SELECT count(*) FROM t"), 1501);
    assert_eq!(
        count(&c, "SELECT value FROM t_config WHERE key = 'hnsw_rows'"),
        1500
    );
    assert_eq!(scored(&c, sql, &q)[0].0, i64::MAX);
    assert_eq!(scored(&c, sql, &far)[0].0, 99999);
    drop(c);
    // delete-all empties the graph too.
    a.execute("INSERT INTO t(t) VALUES ('delete-all')", [])
        .unwrap();
    assert!(scored(&b, sql, &q).is_empty());
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hnsw_filters_apply_before_k_and_misuse_is_named() {
    let db = db();
    let dims = 16;
    db.execute_batch(&format!(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[{dims}], part integer, hnsw=on);
         CREATE VIRTUAL TABLE plain USING clip_index(v float[{dims}]);"
    ))
    .unwrap();
    let data = clustered(3000, dims, 30, 31);
    let mut rows = Vec::new();
    db.execute_batch("BEGIN").unwrap();
    for (i, v) in data.iter().enumerate() {
        let i = i as i64;
        db.execute(
            "INSERT INTO t(rowid, v, part) VALUES (?1, ?2, ?3)",
            params![i, blob(v), i % 50],
        )
        .unwrap();
        rows.push((i, v.clone(), i % 50));
    }
    db.execute_batch("COMMIT").unwrap();
    let mut r = rng(32);
    let (mut found, mut wanted) = (0, 0);
    for i in 0..10 {
        let q: Vec<f32> = data[i * 97].iter().map(|x| x + 0.05 * r()).collect();
        // A selective filter (60 rows) is scored exactly: the exact answer.
        let few: Vec<(i64, Vec<f32>)> = rows
            .iter()
            .filter(|x| x.2 == 7)
            .map(|x| (x.0, x.1.clone()))
            .collect();
        let got = knn(
            &db,
            "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 5 AND mode = 'hnsw' AND part = 7",
            &q,
        );
        assert_eq!(got, brute(&few, &q, 5, "cosine"));
        // A broad one walks the graph with the filter: every row passes it.
        let many: Vec<(i64, Vec<f32>)> = rows
            .iter()
            .filter(|x| x.2 < 40)
            .map(|x| (x.0, x.1.clone()))
            .collect();
        let got = knn(
            &db,
            "SELECT rowid FROM t WHERE v MATCH ?1 AND k = 10 AND mode = 'hnsw' AND part < 40 \
             AND oversample = 1",
            &q,
        );
        assert_eq!(got.len(), 10);
        assert!(got.iter().all(|id| id % 50 < 40));
        let truth = brute(&many, &q, 10, "cosine");
        found += got.iter().filter(|id| truth.contains(id)).count();
        wanted += 10;
    }
    assert!(
        found * 10 >= wanted * 9,
        "filtered hnsw recall {found}/{wanted}"
    );
    let e = err(
        &db,
        &format!(
            "SELECT * FROM plain WHERE v MATCH '[{}]' AND k = 1 AND mode = 'hnsw'",
            vec!["1"; dims].join(",")
        ),
    );
    assert!(e.contains("declare the table with hnsw=on"), "{e}");
    for (decl, wanted) in [
        ("hnsw=maybe", "hnsw must be 'on' or 'off', found 'maybe'"),
        (
            "hnsw_m=1",
            "hnsw_m must be an integer from 2 to 128, found '1'",
        ),
        (
            "hnsw_ef_construction=x",
            "hnsw_ef_construction must be an integer from 8 to 4096",
        ),
    ] {
        let e = err(
            &db,
            &format!("CREATE VIRTUAL TABLE bad USING clip_index(v float[4], {decl})"),
        );
        assert!(e.contains(wanted), "{decl}: {e}");
    }
}

#[test]
fn an_untrusted_connection_gets_the_policys_cap_on_k() {
    let db = db();
    db.execute_batch(
        "CREATE VIRTUAL TABLE t USING clip_index(v float[2], hnsw=on);
         INSERT INTO t(rowid, v) VALUES (1, '[1, 0]'), (2, '[0, 1]');",
    )
    .unwrap();
    let sql = "SELECT count(*) FROM t WHERE v MATCH '[1, 0]' AND k = 5000";
    assert_eq!(count(&db, sql), 2);
    db.query_row(
        "SELECT archaeclip_restrict('{\"level\": \"untrusted\"}')",
        [],
        |_| Ok(()),
    )
    .unwrap();
    for mode in ["exact", "hnsw"] {
        let e = err(&db, &format!("{sql} AND mode = '{mode}'"));
        assert!(
            e.contains("k must be an integer from 0 to 1000, found 5000"),
            "{mode}: {e}"
        );
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM t WHERE v MATCH '[1, 0]' AND k = 1000"
        ),
        2
    );
}

#[test]
fn hnsw_shared_graph_shows_each_connection_only_what_its_transaction_sees() {
    let (dir, path) = fresh_file("hnsw-shared");
    let open = || file_db(&path);
    let (a, b, c) = (open(), open(), open());
    a.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE VIRTUAL TABLE t USING clip_index(v float[8], hnsw=on);",
    )
    .unwrap();
    let data = clustered(1200, 8, 12, 41);
    insert_numbered(&a, &data);
    let sql = "SELECT rowid, distance FROM t WHERE v MATCH ?1 AND k = 3 AND mode = 'hnsw' \
               AND oversample = 50";
    let mut r = rng(42);
    let q: Vec<f32> = data[700].iter().map(|x| x + 0.02 * r()).collect();
    let before = scored(&b, sql, &q);
    assert_eq!(scored(&c, sql, &q), before);
    // An uncommitted row: its writer finds it (its own graph), the others do not.
    a.execute_batch("BEGIN").unwrap();
    a.execute("INSERT INTO t(rowid, v) VALUES (5000, ?1)", [blob(&q)])
        .unwrap();
    assert_eq!(scored(&a, sql, &q)[0].0, 5000);
    assert_eq!(scored(&b, sql, &q), before);
    assert_eq!(scored(&c, sql, &q), before);
    a.execute_batch("COMMIT").unwrap();
    assert_eq!(scored(&b, sql, &q)[0].0, 5000);
    // A reader whose snapshot predates a commit never sees the newer row, even though the
    // shared graph (advanced by another reader) holds it.
    b.execute_batch("BEGIN").unwrap();
    let held = scored(&b, sql, &q);
    let q2: Vec<f32> = q.iter().map(|x| x * 0.5 + 0.01).collect();
    a.execute("INSERT INTO t(rowid, v) VALUES (6000, ?1)", [blob(&q2)])
        .unwrap();
    assert_eq!(scored(&c, sql, &q2)[0].0, 6000, "c sees the commit");
    assert!(
        scored(&b, sql, &q2).iter().all(|x| x.0 != 6000),
        "b's snapshot has no row 6000"
    );
    assert_eq!(scored(&b, sql, &q), held);
    b.execute_batch("COMMIT").unwrap();
    assert_eq!(scored(&b, sql, &q2)[0].0, 6000);
    // A writer's uncommitted delete, rolled back, never reaches the shared graph.
    let nearest = scored(&c, sql, &q)[0].0;
    a.execute_batch("BEGIN").unwrap();
    a.execute("DELETE FROM t WHERE rowid = ?1", [nearest])
        .unwrap();
    assert!(scored(&a, sql, &q).iter().all(|x| x.0 != nearest));
    a.execute_batch("ROLLBACK").unwrap();
    assert_eq!(scored(&c, sql, &q)[0].0, nearest);
    assert_eq!(scored(&a, sql, &q)[0].0, nearest);
    // A save by the writer moves every reader to the new graph.
    a.execute("INSERT INTO t(t) VALUES ('optimize')", [])
        .unwrap();
    a.execute("DELETE FROM t WHERE rowid = 6000", []).unwrap();
    assert!(scored(&c, sql, &q2).iter().all(|x| x.0 != 6000));
    assert!(scored(&b, sql, &q2).iter().all(|x| x.0 != 6000));
    drop((a, b, c));
    let _ = std::fs::remove_dir_all(&dir);
}
