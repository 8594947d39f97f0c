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
