"""Embedding a folder, the seed's `llm embed-multi photos --files photos '*.jpg' --binary`: clip_files
lists it, sql/embed_folder.sql embeds it into llm's schema (sql/llm_schema.sql), skipping unchanged
files and naming unreadable ones, and the real `llm similar` (PyPI) reads the collection and agrees
with clip_search."""
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from conftest import EXTENSION, ROOT, connect

IMAGES = os.path.join(ROOT, "tests/fixtures/clip/images")
TINY = os.path.join(ROOT, "tests/fixtures/clip/models/tiny-quickgelu")


def shell(db, *commands):
    r = subprocess.run(
        ["sqlite3", str(db), "-cmd", f".load {EXTENSION}",
         f"INSERT INTO temp.clip_models(name, path) VALUES ('clip', '{TINY}')", *commands],
        capture_output=True, text=True, cwd=db.parent,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def embed_folder(db, pattern="**/*.jpg"):
    return shell(
        db,
        f".read {ROOT}/sql/llm_schema.sql",
        f"CREATE TEMP TABLE embed_folder_args AS SELECT 'photos' AS folder, '{pattern}' AS pattern, "
        "'photos' AS collection, 'clip' AS model",
        f".read {ROOT}/sql/embed_folder.sql",
    )


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "photos"
    (photos / "trench-2").mkdir(parents=True)
    for name in sorted(os.listdir(IMAGES)):
        if name.endswith(".jpg"):
            shutil.copy(os.path.join(IMAGES, name), photos / name)
    shutil.copy(os.path.join(IMAGES, "photo_chelsea_97x131_q90.jpg"), photos / "trench-2" / "find-0412.jpg")
    shutil.copy(os.path.join(IMAGES, "photo_rocket_180x240.png"), photos / "trench-2" / "rocket.png")
    os.symlink(tmp_path / "gone.jpg", photos / "broken.jpg")  # unreadable: a dangling link
    (photos / "notes.jpg").write_text("not an image")  # readable, not an image
    return tmp_path


def test_clip_files_lists_by_glob_with_llm_content_hash(folder):
    db = connect()
    rows = db.execute("SELECT name, size, error FROM clip_files(?, '*.jpg')", (str(folder / "photos"),)).fetchall()
    names = [r[0] for r in rows]
    assert names == sorted(names) and "trench-2/find-0412.jpg" not in names  # '*' stays in one directory
    assert ("notes.jpg", 12, None) in rows
    broken = [r for r in rows if r[0] == "broken.jpg"]
    assert broken[0][1] is None and "No such file or directory" in broken[0][2]
    deep = [r[0] for r in db.execute("SELECT name FROM clip_files(?, '**/*.jpg')", (str(folder / "photos"),))]
    assert "trench-2/find-0412.jpg" in deep and "trench-2/rocket.png" not in deep
    # md5 and content are the file's, as llm computes content_hash (hashlib.md5(bytes).digest()).
    path = folder / "photos" / "photo_coffee_640x480_q80.jpg"
    md5, content, size = db.execute(
        "SELECT md5, content, size FROM clip_files(?, 'photo_coffee_*')", (str(folder / "photos"),)
    ).fetchone()
    assert content == path.read_bytes() and md5 == hashlib.md5(path.read_bytes()).digest() and size == len(content)
    # The path column is what clip_embed_image reads.
    db.execute("INSERT INTO temp.clip_models(name, path) VALUES ('tiny', ?)", (TINY,))
    (n,) = db.execute(
        "SELECT count(*) FROM clip_files(?, '*.jpg') AS f WHERE f.error IS NULL AND f.name != 'notes.jpg' "
        "AND vec_length(clip_embed_image(f.path, 'tiny')) = 12",
        (str(folder / "photos"),),
    ).fetchone()
    assert n == 4
    for sql, message in [
        ("SELECT * FROM clip_files(?, '[')", r"clip_files\(\): 2nd argument: not a valid glob: unclosed"),
        ("SELECT * FROM clip_files(? || '/notes.jpg')", "is not a directory"),
        ("SELECT * FROM clip_files(? || '/none')", "cannot read"),
    ]:
        with pytest.raises(sqlite3.OperationalError, match=message):
            db.execute(sql, (str(folder / "photos"),)).fetchall()


def test_embed_a_folder_into_llms_schema_skipping_unchanged_files(folder):
    db = folder / "embeddings.db"
    out = embed_folder(db)
    assert out[-1] == "embedded 5 file(s)", out
    assert any(l.startswith("skipped broken.jpg: cannot read") for l in out), out
    assert any(l.startswith("skipped notes.jpg: not a recognised image format") for l in out), out
    # Rerun: nothing changed, nothing embedded.
    assert embed_folder(db)[-1] == "embedded 0 file(s)"
    # One photo edited (bytes appended after the JPEG's end: same picture, new hash), one added.
    with open(folder / "photos" / "photo_coffee_640x480_q80.jpg", "ab") as f:
        f.write(b"edited")
    shutil.copy(os.path.join(IMAGES, "photo_astronaut_300x200_q90.jpg"), folder / "photos" / "new.jpg")
    assert embed_folder(db)[-1] == "embedded 2 file(s)"
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT id, content_hash, length(embedding) FROM embeddings ORDER BY id").fetchall()
    assert [r[0] for r in rows] == sorted(
        ["cmyk_astronaut_96x96_q90.jpg", "new.jpg", "photo_astronaut_300x200_q90.jpg",
         "photo_chelsea_97x131_q90.jpg", "photo_coffee_640x480_q80.jpg", "trench-2/find-0412.jpg"]
    )
    for name, digest, n in rows:
        assert digest == hashlib.md5((folder / "photos" / name).read_bytes()).digest() and n == 48
    assert conn.execute("SELECT name, model FROM collections").fetchall() == [("photos", "clip")]


def test_llm_similar_reads_the_collection_and_agrees_with_clip_search(folder, tmp_path):
    db = folder / "embeddings.db"
    embed_folder(db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env["LLM_USER_PATH"] = str(tmp_path / "llm-user")  # no plugins: the model 'clip' is unknown to llm
    query_id = "trench-2/find-0412.jpg"
    r = subprocess.run(
        [sys.executable, "-m", "llm", "similar", "photos", query_id, "-d", str(db), "-n", "4"],
        env=env, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    theirs = [(d["id"], d["score"]) for d in map(json.loads, r.stdout.splitlines())]
    conn = connect(str(db))
    ours = conn.execute(
        """SELECT e.id, s.score
           FROM clip_search((SELECT embedding FROM embeddings WHERE id = :id), 4,
                            'SELECT rowid, embedding FROM embeddings WHERE id != ''' || :id || '''') AS s
           JOIN embeddings AS e ON e.rowid = s.id ORDER BY s.rank""",
        {"id": query_id},
    ).fetchall()
    assert [i for i, _ in ours] == [i for i, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-6)
    # The query photo is a copy of photo_chelsea: llm ranks that copy first too.
    assert theirs[0][0] == "photo_chelsea_97x131_q90.jpg" and theirs[0][1] == pytest.approx(1.0, abs=1e-6)


def test_listing_follows_the_policy(folder):
    code = (
        "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); db.enable_load_extension(True); "
        f"db.load_extension({EXTENSION!r}); "
        "print(db.execute('SELECT count(*) FROM clip_files(?, \"*.jpg\")', (sys.argv[2],)).fetchone()[0])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHAECLIP_")}
    env["ARCHAECLIP_POLICY"] = "untrusted"
    run = lambda d, e: subprocess.run([sys.executable, "-c", code, ":memory:", str(d)], env=e, capture_output=True, text=True)
    r = run(folder / "photos", env)
    assert r.returncode != 0 and "clip_files(): 1st argument: reading files is not allowed on this connection" in r.stderr, r.stderr
    env["ARCHAECLIP_FILE_ROOTS"] = str(folder / "photos" / "trench-2")
    r = run(folder / "photos" / "trench-2", env)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
    r = run(folder / "photos" / "trench-2" / "..", env)
    assert r.returncode != 0 and "is outside the directories" in r.stderr, r.stderr
