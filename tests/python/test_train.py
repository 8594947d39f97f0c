"""clip_train and clip_evaluate through the built extension: rows, files, the auto-registered
output, skipped rows, interrupts and LIMITs that checkpoint, resume, and the refusals (read-only
connection, views). The recipe itself is checked against torch in tests/train_reference.rs."""
import json
import os
import sqlite3
import threading
import time

import pytest

from conftest import ROOT, connect

FIX = os.path.join(ROOT, "tests", "fixtures", "train")
TINY = os.path.join(ROOT, "tests", "fixtures", "clip", "models", "tiny-quickgelu")
COLUMNS = "kind, epoch, step, loss, lr, logit_scale, examples, examples_per_s, elapsed_s, detail"


def make_db(path, copies=4, bad=True):
    db = connect(str(path))
    db.execute("CREATE TABLE pairs(id INTEGER PRIMARY KEY, image BLOB, caption TEXT)")
    pairs = json.load(open(os.path.join(FIX, "pairs.json")))
    for _ in range(copies):
        for p in pairs:
            with open(os.path.join(FIX, p["image"]), "rb") as f:
                db.execute("INSERT INTO pairs(image, caption) VALUES (?, ?)", (f.read(), p["caption"]))
    if bad:
        db.execute("INSERT INTO pairs(image, caption) VALUES (?, ?)", (b"not an image", "junk"))
        db.execute("INSERT INTO pairs(image, caption) VALUES (?, NULL)", (open(os.path.join(FIX, "images", "00.png"), "rb").read(),))
    db.execute("INSERT INTO temp.clip_models(name, path) VALUES ('tiny', ?)", (TINY,))
    db.commit()
    return db


def train(db, out, **options):
    opts = {"output": str(out), "batch_size": 8, "lr": 1e-3}
    opts.update(options)
    return db.execute(
        f"SELECT {COLUMNS} FROM clip_train('tiny', 'SELECT image, caption FROM pairs', ?)", (json.dumps(opts),)
    ).fetchall()


def test_training_rows_files_and_the_registered_output(tmp_path):
    db = make_db(tmp_path / "c.db")
    out = tmp_path / "tiny-v2"
    rows = train(db, out, epochs=8, validation="SELECT image, caption FROM pairs WHERE id <= 8", seed=7)
    kinds = [r[0] for r in rows]
    # 34 rows (32 usable, shuffled) in batches of 8: 5 steps an epoch.
    assert kinds.count("train") == 8 * 5
    assert kinds.count("eval") == 8 and kinds.count("checkpoint") == 8
    skipped = [json.loads(r[9]) for r in rows if r[0] == "skipped"]
    assert len(skipped) == 2 * 8
    assert {s["row"] for s in skipped} == {33, 34}
    assert any("not a recognised image format" in s["error"] for s in skipped)
    assert any("caption: expected text, found NULL" in s["error"] for s in skipped)
    steps = [r for r in rows if r[0] == "train"]
    assert [r[2] for r in steps] == list(range(1, 41))
    assert all(r[4] > 0 and 0 < r[5] <= 100 and r[7] > 0 for r in steps)
    first, last = steps[0][3], sum(r[3] for r in steps[-4:]) / 4
    assert last < 0.6 * first, (first, last)
    evals = [json.loads(r[9]) for r in rows if r[0] == "eval"]
    assert evals[-1]["text_to_image"]["mean_rank"] < evals[0]["text_to_image"]["mean_rank"]
    # A complete model directory, registered under its name, that the other functions use.
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "modules.json",
            "archaeclip_training.json", "optimizer.safetensors"} <= files
    assert ("tiny-v2", str(out)) in db.execute("SELECT name, path FROM temp.clip_models").fetchall()
    assert db.execute("SELECT vec_length(clip_embed_text('a red circle', 'tiny-v2'))").fetchone() == (12,)
    before = dict(db.execute("SELECT direction, mean_rank FROM clip_evaluate('tiny', 'SELECT image, caption FROM pairs WHERE id <= 8')").fetchall())
    after = dict(db.execute("SELECT direction, mean_rank FROM clip_evaluate('tiny-v2', 'SELECT image, caption FROM pairs WHERE id <= 8')").fetchall())
    assert after["text_to_image"] < before["text_to_image"], (before, after)
    record = json.load(open(out / "archaeclip_training.json"))
    assert record["statement"] == "SELECT image, caption FROM pairs"
    assert record["options"]["epochs"] == 8 and record["state"]["finished"] is True
    assert len([e for e in record["log"] if e["kind"] == "train"]) == 40


def test_same_seed_same_losses_and_insert_keeps_a_log(tmp_path):
    db = make_db(tmp_path / "c.db", bad=False)
    a = [r[3] for r in train(db, tmp_path / "a", epochs=2) if r[0] == "train"]
    b = [r[3] for r in train(db, tmp_path / "b", epochs=2) if r[0] == "train"]
    c = [r[3] for r in train(db, tmp_path / "c", epochs=2, seed=1) if r[0] == "train"]
    assert a == b and a != c
    db.execute(f"CREATE TABLE train_log({COLUMNS})")
    db.execute(
        "INSERT INTO train_log SELECT * FROM clip_train('tiny', 'SELECT image, caption FROM pairs', json_object('output', ?, 'batch_size', 8))",
        (str(tmp_path / "d"),),
    )
    assert db.execute("SELECT count(*) FROM train_log WHERE kind = 'train'").fetchone() == (4,)


def test_frozen_vision_caches_image_features(tmp_path):
    db = make_db(tmp_path / "c.db", bad=False)
    rows = train(db, tmp_path / "o", epochs=3, freeze="vision")
    cache = [json.loads(r[9]) for r in rows if r[0] == "cache"]
    assert len(cache) == 1 and cache[0]["pairs"] == 32
    assert [r[0] for r in rows].count("train") == 12


def test_interrupt_checkpoints_and_resume_finishes(tmp_path):
    db = make_db(tmp_path / "c.db", bad=False)
    out = tmp_path / "o"
    timer = threading.Timer(0.5, db.interrupt)
    timer.start()
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        train(db, out, epochs=400, save_every=1000)
    timer.cancel()
    state = json.load(open(out / "archaeclip_training.json"))["state"]
    assert 0 < state["step"] < 1600 and state["finished"] is False
    # Resume with fewer epochs than planned: it picks up at the saved step and stops there.
    rows = db.execute(
        f"SELECT {COLUMNS} FROM clip_train('tiny', 'SELECT image, caption FROM pairs', ?)",
        (json.dumps({"output": str(out), "batch_size": 8, "lr": 1e-3, "epochs": 400, "save_every": 1000, "resume": True, "max_steps": state["step"] + 3}),),
    )
    # max_steps changes the schedule's length, which is allowed; the recipe is not.
    steps = [r[2] for r in rows if r[0] == "train"]
    assert steps == [state["step"] + 1, state["step"] + 2, state["step"] + 3]


def test_a_limit_stops_training_and_keeps_a_checkpoint(tmp_path):
    db = make_db(tmp_path / "c.db", bad=False)
    out = tmp_path / "o"
    rows = db.execute(
        "SELECT step FROM clip_train('tiny', 'SELECT image, caption FROM pairs', json_object('output', ?, 'batch_size', 8, 'epochs', 50)) WHERE kind = 'train' LIMIT 3",
        (str(out),),
    ).fetchall()
    assert rows == [(1,), (2,), (3,)]
    state = json.load(open(out / "archaeclip_training.json"))["state"]
    assert state["step"] == 3 and not state["finished"]


def test_refused_on_a_read_only_connection_and_from_views(tmp_path):
    path = tmp_path / "c.db"
    make_db(path, bad=False).close()
    def read_only(monkeypatch_policy):
        if monkeypatch_policy:
            os.environ["ARCHAECLIP_POLICY"] = monkeypatch_policy
        try:
            ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            ro.enable_load_extension(True)
            ro.load_extension(os.path.join(ROOT, "dist", "archaeclip"))
        finally:
            os.environ.pop("ARCHAECLIP_POLICY", None)
        ro.execute("INSERT INTO temp.clip_models(name, path) VALUES ('tiny', ?)", (TINY,))
        return ro

    train = "SELECT * FROM clip_train('tiny', 'SELECT image, caption FROM pairs', json_object('output', ?))"
    # A read-only connection is untrusted by default (the policy of SECURITY.md)...
    with pytest.raises(sqlite3.OperationalError, match=r"clip_train\(\): training is not allowed on this connection: its policy is untrusted because the connection is read-only"):
        read_only(None).execute(train, (str(tmp_path / "o"),)).fetchall()
    # ...and a host that trusts it still cannot write through it.
    with pytest.raises(sqlite3.OperationalError, match=r"clip_train\(\): refused on a read-only connection"):
        read_only("trusted").execute(train, (str(tmp_path / "o"),)).fetchall()
    assert not (tmp_path / "o").exists()
    # A stranger's database whose view trains when queried.
    evil = tmp_path / "evil.db"
    plain = sqlite3.connect(evil)
    plain.execute("CREATE TABLE pairs(image, caption)")
    plain.execute(f"CREATE VIEW v AS SELECT * FROM clip_train('tiny', 'SELECT image, caption FROM pairs', '{{\"output\": \"{tmp_path / 'pwned'}\"}}')")
    plain.execute("CREATE VIEW e AS SELECT * FROM clip_evaluate('tiny', 'SELECT image, caption FROM pairs')")
    plain.commit()
    plain.close()
    db = connect(str(evil))
    db.execute("INSERT INTO temp.clip_models(name, path) VALUES ('tiny', ?)", (TINY,))
    for view in ("v", "e"):
        with pytest.raises(sqlite3.OperationalError, match="unsafe use of"):
            db.execute(f"SELECT * FROM {view}").fetchall()
    assert not (tmp_path / "pwned").exists()
