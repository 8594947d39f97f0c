//! Eight connections on eight threads embedding at once: identical results, one copy of the
//! model in the process. (Its own test binary, so no other test loads models meanwhile.)
#![cfg(feature = "static")]

use std::path::Path;

use rusqlite::Connection;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.to_owned())
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn embed_all(model: &str) -> Vec<Vec<u8>> {
    let db = Connection::open_in_memory().unwrap();
    archaeclip::register(&db).unwrap();
    db.execute(
        "INSERT INTO temp.clip_models(name, path) VALUES ('m', ?)",
        [model],
    )
    .unwrap();
    let image = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clip/images/photo_astronaut_300x200_q90.jpg");
    let mut out = Vec::new();
    for text in [
        "a bronze coin from Gabii",
        "terracotta statuette",
        "an unusual object from my trench",
    ] {
        out.push(
            db.query_row("SELECT clip_embed_text(?, 'm')", [text], |r| r.get(0))
                .unwrap(),
        );
    }
    out.push(
        db.query_row(
            "SELECT clip_embed_image(?, 'm')",
            [image.to_str().unwrap()],
            |r| r.get(0),
        )
        .unwrap(),
    );
    out
}

#[test]
fn eight_threads_share_one_model_and_agree() {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip/models/tiny-sharded");
    let model = model.to_str().unwrap().to_owned();
    let before = rss_kib();
    let results: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| embed_all(&model))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let after = rss_kib();
    eprintln!(
        "RSS before {before} KiB, after 8 threads {after} KiB (+{} KiB)",
        after - before
    );
    assert_eq!(
        archaeclip::clip::registry::loaded_count(),
        1,
        "one copy of the model"
    );
    let sequential = embed_all(&model);
    for r in &results {
        assert_eq!(
            r, &sequential,
            "every thread gets the sequential results, bit for bit"
        );
    }
    assert_eq!(archaeclip::clip::registry::loaded_count(), 1);
}

/// What one reader computes on its own connection to `db`: query embeddings (texts and an
/// image) and, for each, the top 5 of a stable subset of the table under two metrics, each
/// search run three times (streamed, then copied, then scanned from the copy).
type Round = Vec<(Vec<u8>, Vec<Vec<(i64, f64)>>)>;

const STABLE: &str = "SELECT id, embedding FROM items WHERE id <= 48";

fn open(db: &Path, model: &str) -> Connection {
    let conn = Connection::open(db).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .unwrap();
    archaeclip::register(&conn).unwrap();
    conn.execute(
        "INSERT INTO temp.clip_models(name, path) VALUES ('m', ?)",
        [model],
    )
    .unwrap();
    conn
}

fn read_round(conn: &Connection) -> Round {
    let image = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clip/images/photo_chelsea_97x131_q90.jpg");
    let mut queries: Vec<Vec<u8>> = ["a bronze coin", "a lamp", "object number 7"]
        .iter()
        .map(|t| {
            conn.query_row("SELECT clip_embed_text(?, 'm')", [t], |r| r.get(0))
                .unwrap()
        })
        .collect();
    queries.push(
        conn.query_row(
            "SELECT clip_embed_image(?, 'm')",
            [image.to_str().unwrap()],
            |r| r.get(0),
        )
        .unwrap(),
    );
    let mut search = conn
        .prepare("SELECT id, score FROM clip_search(?, 5, ?, ?) ORDER BY rank")
        .unwrap();
    queries
        .into_iter()
        .map(|q| {
            let mut results = Vec::new();
            for metric in ["cosine", "dot"] {
                for _ in 0..3 {
                    results.push(
                        search
                            .query_map(rusqlite::params![q, STABLE, metric], |r| {
                                Ok((r.get(0)?, r.get(1)?))
                            })
                            .unwrap()
                            .collect::<rusqlite::Result<Vec<_>>>()
                            .unwrap(),
                    );
                }
            }
            (q, results)
        })
        .collect()
}

/// Eight readers with their own connections to one database file embed and search while a
/// ninth connection keeps writing rows (embedding them too): every reader gets the sequential
/// results bit for bit, nothing deadlocks, and the process holds one copy of the model.
#[test]
fn readers_and_a_writer_on_one_file_agree_with_the_sequential_run() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc, Barrier};
    use std::time::Duration;

    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clip/models/tiny-sharded")
        .to_str()
        .unwrap()
        .to_owned();
    let dir = std::env::temp_dir().join(format!("archaeclip-concurrency-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("c.db");
    {
        let setup = open(&db, &model);
        setup
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE items(id INTEGER PRIMARY KEY, label TEXT, embedding BLOB);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 48)
                 INSERT INTO items SELECT i, 'object number ' || i,
                   clip_embed_text('object number ' || i, 'm') FROM n;",
            )
            .unwrap();
    }
    let sequential = read_round(&open(&db, &model));
    assert_eq!(sequential.len(), 4);
    assert!(sequential
        .iter()
        .all(|(_, r)| r.len() == 6 && r.iter().all(|hits| hits.len() == 5)));

    let (done_tx, done_rx) = mpsc::channel();
    let worker = {
        let (db, model) = (db.clone(), model.clone());
        std::thread::spawn(move || {
            let stop = Arc::new(AtomicBool::new(false));
            let written = Arc::new(AtomicUsize::new(0));
            let start = Arc::new(Barrier::new(9));
            let writer = {
                let (db, model, stop, written, start) = (
                    db.clone(),
                    model.clone(),
                    stop.clone(),
                    written.clone(),
                    start.clone(),
                );
                std::thread::spawn(move || {
                    let conn = open(&db, &model);
                    let mut id = 1000;
                    let mut insert = || {
                        id += 1;
                        conn.execute(
                            "INSERT INTO items VALUES (?1, 'new ' || ?1, clip_embed_text('new row ' || ?1, 'm'))",
                            [id],
                        )
                        .unwrap();
                        written.fetch_add(1, Ordering::SeqCst);
                    };
                    insert();
                    start.wait();
                    while !stop.load(Ordering::SeqCst) {
                        insert();
                    }
                })
            };
            let readers: Vec<_> = (0..8)
                .map(|_| {
                    let (db, model, start) = (db.clone(), model.clone(), start.clone());
                    std::thread::spawn(move || {
                        let conn = open(&db, &model);
                        start.wait();
                        (0..3).map(|_| read_round(&conn)).collect::<Vec<Round>>()
                    })
                })
                .collect();
            let rounds: Vec<Vec<Round>> = readers.into_iter().map(|h| h.join().unwrap()).collect();
            stop.store(true, Ordering::SeqCst);
            writer.join().unwrap();
            (rounds, written.load(Ordering::SeqCst))
        })
    };
    // The guard: a deadlock fails the test instead of hanging it.
    std::thread::spawn(move || {
        let _ = done_tx.send(worker.join());
    });
    let (rounds, written) = match done_rx.recv_timeout(Duration::from_secs(300)) {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("readers and writer did not finish within 300 s: deadlock?"),
    };
    assert!(written > 1, "the writer wrote while the readers ran");
    for (reader, reader_rounds) in rounds.iter().enumerate() {
        for (round, r) in reader_rounds.iter().enumerate() {
            assert!(
                r == &sequential,
                "reader {reader}, round {round}: differs from the sequential run"
            );
        }
    }
    let total: i64 = open(&db, &model)
        .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
        .unwrap();
    assert_eq!(total as usize, 48 + written, "every write landed");
    assert_eq!(
        archaeclip::clip::registry::loaded_count(),
        1,
        "one copy of the model"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
