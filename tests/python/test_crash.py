"""Crash safety: a process killed (SIGKILL, no chance to clean up) in the middle of a bulk
embedding insert or of a training run leaves the database intact (SQLite's transaction: all of
the statement's rows or none), the last checkpoint whole, and a rerun that continues without
duplicates or repeated steps.

The work runs in a child process (the sqlite3 shell, or /usr/bin/python3) so that it can be
killed; the checks run here on fresh connections."""
import json
import os
import signal
import struct
import subprocess
import time

import pytest

from conftest import EXTENSION, ROOT, connect

TINY = os.path.join(ROOT, "tests", "fixtures", "clip", "models", "tiny-quickgelu")
PHOTO = os.path.join(ROOT, "tests", "fixtures", "clip", "images", "photo_coffee_640x480_q80.jpg")
TRAIN = os.path.join(ROOT, "tests", "fixtures", "train")
ROWS = 2000  # about 4 s of embedding on two cores: the child is killed well before the end

BULK = (
    "INSERT INTO emb(id, embedding) SELECT id, embedding "
    "FROM clip_embed_images('SELECT id, photo FROM photos', 'tiny', '{\"batch_size\": 16, \"progress\": true}') "
    "WHERE error IS NULL;"
)
# The documented idempotent form: only the rows not embedded yet, and a conflict is skipped.
RESUME = (
    "INSERT OR IGNORE INTO emb(id, embedding) SELECT id, embedding "
    "FROM clip_embed_images('SELECT id, photo FROM photos WHERE id NOT IN (SELECT id FROM emb)', 'tiny') "
    "WHERE error IS NULL"
)


def wait_for(proc, stream_lines, predicate, timeout):
    """Reads lines from the child until `predicate(line)` holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    for line in stream_lines:
        if predicate(line):
            return True
        if time.monotonic() > deadline:
            break
    return False


def kill(proc):
    assert proc.poll() is None, "the child finished before it could be killed: make the work longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def make_photos(path, journal_mode):
    db = connect(str(path))
    db.execute(f"PRAGMA journal_mode = {journal_mode}")
    photo = open(PHOTO, "rb").read()
    db.execute("CREATE TABLE photos(id INTEGER PRIMARY KEY, photo BLOB)")
    db.executemany("INSERT INTO photos VALUES (?, ?)", ((i, photo) for i in range(1, ROWS + 1)))
    db.execute("CREATE TABLE emb(id INTEGER PRIMARY KEY, embedding BLOB NOT NULL)")
    # Rows committed before the crash, which must survive it.
    db.execute("INSERT INTO temp.clip_models(name, path) VALUES ('tiny', ?)", (TINY,))
    db.execute(
        "INSERT INTO emb SELECT id, embedding FROM clip_embed_images('SELECT id, photo FROM photos WHERE id <= 10', 'tiny')"
    )
    db.commit()
    db.close()


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_killed_bulk_insert_leaves_all_or_nothing_and_the_rerun_completes(tmp_path, journal_mode):
    path = tmp_path / "photos.db"
    make_photos(path, journal_mode)
    script = (
        f".load {EXTENSION}\n"
        f"INSERT INTO temp.clip_models(name, path) VALUES ('tiny', '{TINY}');\n"
        # One transaction: a rollback must bring the deleted rows back too.
        "BEGIN;\nDELETE FROM emb;\n"
        + BULK
        + "\nCOMMIT;\n"
    )
    proc = subprocess.Popen(
        ["sqlite3", "-bail", str(path)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    proc.stdin.write(script)
    proc.stdin.close()
    # Progress lines mean batches were embedded and their rows inserted (uncommitted).
    progressed = wait_for(
        proc, proc.stderr, lambda line: "clip_embed_images: " in line and int(line.split()[1]) >= 320, 60
    )
    assert progressed, "no progress from the child"
    kill(proc)

    db = connect(str(path))
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    ids = [r[0] for r in db.execute("SELECT id FROM emb ORDER BY id")]
    assert ids == list(range(1, 11)), "the killed transaction's rows and its DELETE were rolled back"
    before = db.execute("SELECT id, embedding FROM emb ORDER BY id").fetchall()

    db.execute("INSERT INTO temp.clip_models(name, path) VALUES ('tiny', ?)", (TINY,))
    db.execute(RESUME)
    db.commit()
    # Twice: the second run has nothing left to do.
    db.execute(RESUME)
    db.commit()
    assert db.execute("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM emb").fetchone() == (
        ROWS,
        ROWS,
        1,
        ROWS,
    )
    assert db.execute("SELECT id, embedding FROM emb WHERE id <= 10 ORDER BY id").fetchall() == before
    # Every row is the embedding of its photo (the same photo everywhere). Batched results may
    # differ from the single-row function's in the last bit (the batch changes the matrix
    # products' summation order), so compare to within float32 rounding.
    single = struct.unpack("12f", db.execute("SELECT clip_embed_image(?, 'tiny')", (open(PHOTO, "rb").read(),)).fetchone()[0])
    for (blob,) in db.execute("SELECT DISTINCT embedding FROM emb"):
        assert max(abs(a - b) for a, b in zip(struct.unpack("12f", blob), single)) < 1e-6
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()


TRAIN_CHILD = r"""
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.enable_load_extension(True)
db.load_extension(sys.argv[2])
db.execute("INSERT INTO temp.clip_models(name, path) VALUES ('tiny', ?)", (sys.argv[3],))
for row in db.execute(
    "SELECT kind, step FROM clip_train('tiny', 'SELECT image, caption FROM pairs ORDER BY id', ?)",
    (sys.argv[4],),
):
    print(json.dumps(row), flush=True)
"""


def safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        size = os.fstat(f.fileno()).st_size
    # Every tensor's bytes are in the file: a whole file, not a torn write.
    end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    assert 8 + n + end == size, (path, 8 + n + end, size)
    return header


def make_pairs(path):
    db = connect(str(path))
    db.execute("CREATE TABLE pairs(id INTEGER PRIMARY KEY, image BLOB, caption TEXT)")
    pairs = json.load(open(os.path.join(TRAIN, "pairs.json")))
    for _ in range(4):
        for p in pairs:
            db.execute(
                "INSERT INTO pairs(image, caption) VALUES (?, ?)",
                (open(os.path.join(TRAIN, p["image"]), "rb").read(), p["caption"]),
            )
    db.commit()
    db.close()


def train_and_kill(path, options, delay):
    """Runs clip_train in a child, SIGKILLs it `delay` s after its first checkpoint row, and
    returns the (kind, step) rows it printed."""
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-c", TRAIN_CHILD, str(path), EXTENSION, TINY, json.dumps(options)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seen = []

    def checkpoint(line):
        seen.append(json.loads(line))
        return seen[-1][0] == "checkpoint"

    try:
        assert wait_for(proc, proc.stdout, checkpoint, 60), f"no checkpoint row from the child: {seen}"
        time.sleep(delay)
        kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    return seen


def assert_whole_checkpoint(out):
    """The output directory is a whole model; returns its recorded training state."""
    state = json.load(open(out / "archaeclip_training.json"))["state"]
    assert state["step"] >= 2 and state["step"] % 2 == 0 and state["finished"] is False
    base = safetensors_header(os.path.join(TINY, "model.safetensors"))
    saved = safetensors_header(out / "model.safetensors")
    assert {k: v["shape"] for k, v in saved.items() if k != "__metadata__"} == {
        k: v["shape"] for k, v in base.items() if k != "__metadata__"
    }
    safetensors_header(out / "optimizer.safetensors")
    json.load(open(out / "config.json"))
    db = connect()
    db.execute("INSERT INTO temp.clip_models(name, path) VALUES ('crashed', ?)", (str(out),))
    assert json.loads(db.execute("SELECT clip_model_info('crashed')").fetchone()[0])["dimensions"] == 12
    assert len(db.execute("SELECT clip_embed_text('a red circle', 'crashed')").fetchone()[0]) == 48
    db.close()
    return state


def test_killed_training_leaves_a_whole_checkpoint_and_resume_continues(tmp_path):
    path = tmp_path / "pairs.db"
    make_pairs(path)
    out = tmp_path / "tiny-crash"
    options = {"output": str(out), "batch_size": 8, "lr": 1e-3, "epochs": 1000, "save_every": 2, "seed": 3}
    # Killed at different moments after a checkpoint (mid-step, mid-checkpoint, ...), resumed
    # each time: every kill leaves a whole checkpoint, every resume starts right after it.
    state = None
    for i, delay in enumerate([0.0, 0.003, 0.01, 0.02, 0.04]):
        run = dict(options, resume=True) if i else options
        seen = train_and_kill(path, run, delay)
        steps = [step for kind, step in seen if kind == "train"]
        if state is not None and steps:
            assert steps[0] == state["step"] + 1, (state, seen)
        assert steps == list(range(steps[0], steps[0] + len(steps))), seen
        state = assert_whole_checkpoint(out)
        # The last checkpoint the child reported, or a later one (its output is buffered).
        assert state["step"] >= max(step for kind, step in seen if kind == "checkpoint")
        # No temporary sibling is mistaken for the model; at most one is left behind.
        leftovers = [p for p in os.listdir(tmp_path) if p.startswith("tiny-crash") and p != "tiny-crash"]
        assert len(leftovers) <= 1, leftovers

    # The final resume: the steps continue from the recorded one, none repeated, none skipped.
    db = connect(str(path))
    db.execute("INSERT INTO temp.clip_models(name, path) VALUES ('tiny', ?)", (TINY,))
    resumed = dict(options, resume=True, max_steps=state["step"] + 3)
    rows = db.execute(
        "SELECT kind, step FROM clip_train('tiny', 'SELECT image, caption FROM pairs ORDER BY id', ?)",
        (json.dumps(resumed),),
    ).fetchall()
    steps = [step for kind, step in rows if kind == "train"]
    assert steps == [state["step"] + 1, state["step"] + 2, state["step"] + 3], rows
    after = json.load(open(out / "archaeclip_training.json"))["state"]
    assert after["step"] == state["step"] + 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith("tiny-crash") and p != "tiny-crash"]
    db.close()
