"""Attacks on a running Datasette with the extension loaded, as an anonymous visitor would make
them (SECURITY.md). The server is the real `datasette serve` with `--load-extension`, started
with no archaeclip configuration except a default model; every attack must be refused with a
clear error, and the legitimate queries next to them must still work."""
import json
import os
import shutil
import socket
import struct
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import EXTENSION, ROOT

TINY = os.path.join(ROOT, "tests/fixtures/clip/models/tiny-quickgelu")
IMAGES = os.path.join(ROOT, "tests/fixtures/clip/images")
DATASETTE = os.path.join(os.path.dirname(sys.executable), "datasette")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp, databases, env_extra, args=()):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHAECLIP_")}
    env.update(env_extra)
    log = open(tmp / f"datasette-{port}.log", "w")
    proc = subprocess.Popen(
        [DATASETTE, "serve", *map(str, databases), "--port", str(port), "--load-extension", EXTENSION, *args],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(base + "/-/versions.json", timeout=1).read()
            return proc, base
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(open(tmp / f"datasette-{port}.log").read())
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("datasette did not start")


def get(base, path):
    """(status, JSON body) of a GET."""
    try:
        with urllib.request.urlopen(base + path, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def query(base, db, sql):
    """('ok', rows) or ('error', message), as Datasette's JSON API reports a query."""
    status, body = get(base, f"/{db}.json?" + urllib.parse.urlencode({"sql": sql, "_shape": "objects"}))
    if status == 200 and body.get("ok", True):
        return "ok", body["rows"]
    return "error", body.get("error") or body.get("title") or str(body)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    # The collection: one image file under a directory, rows with embeddings.
    db = sqlite3.connect(tmp / "collection.db")
    db.execute("CREATE TABLE artifacts(id INTEGER PRIMARY KEY, label TEXT, embedding BLOB)")
    db.executemany("INSERT INTO artifacts VALUES (?, ?, ?)", [(i, f"find {i}", struct.pack("<12f", *([1.0 / i] + [0.1] * 11))) for i in range(1, 4)])
    # A stranger's database whose views call the extension when the owner browses them.
    evil_views = {
        "read_passwd": "SELECT clip_embed_image('/etc/passwd') AS e",
        "train": f"SELECT * FROM clip_train('default', 'SELECT label, label FROM artifacts', '{{\"output\": \"{tmp / 'pwned'}\"}}')",
        "search": "SELECT * FROM clip_search('[1, 0]', 1, 'SELECT id, embedding FROM artifacts')",
        "embed_all": "SELECT * FROM clip_embed_texts('SELECT id, label FROM artifacts')",
    }
    for name, sql in evil_views.items():
        db.execute(f"CREATE VIEW {name} AS {sql}")
    db.commit()
    db.close()
    proc, base = start(tmp, [tmp / "collection.db"], {"ARCHAECLIP_MODEL": TINY}, ["--memory"])
    yield tmp, base, evil_views
    proc.kill()
    proc.wait()
    assert not (tmp / "pwned").exists()


def test_the_site_is_untrusted_by_default_and_legitimate_queries_work(site):
    _, base, _ = site
    for db in ("collection", "_memory"):
        kind, rows = query(base, db, "SELECT archaeclip_policy() AS p")
        assert kind == "ok", rows
        policy = json.loads(rows[0]["p"])
        assert policy["level"] == "untrusted" and policy["train"] is False and policy["file_roots"] == []
    # The file databases are read-only; the in-memory one is writable, and still untrusted
    # because the host process is Datasette.
    assert "read-only" in json.loads(query(base, "collection", "SELECT archaeclip_policy() AS p")[1][0]["p"])["reason"]
    assert "Datasette" in json.loads(query(base, "_memory", "SELECT archaeclip_policy() AS p")[1][0]["p"])["reason"]
    kind, rows = query(base, "collection", "SELECT vec_length(clip_embed_text('a bronze coin')) AS n")
    assert (kind, rows) == ("ok", [{"n": 12}])
    kind, rows = query(base, "collection", "SELECT id FROM clip_search(vec_f32('[1,0,0,0,0,0,0,0,0,0,0,0]'), 2, 'SELECT id, embedding FROM artifacts') ORDER BY id")
    assert kind == "ok" and len(rows) == 2, rows


@pytest.mark.parametrize("path", [
    "/etc/passwd",
    "../../../../../../etc/passwd",
    "/proc/self/environ",
    "/dev/zero",
    os.path.join(IMAGES, "photo_rocket_180x240.png"),  # a real image: files are off, not just odd ones
])
def test_no_file_can_be_read(site, path):
    _, base, _ = site
    for db in ("collection", "_memory"):
        kind, message = query(base, db, f"SELECT clip_embed_image('{path}') AS e")
        assert kind == "error"
        assert message.startswith("clip_embed_image(): 1st argument: reading files is not allowed on this connection"), message
        kind, rows = query(base, db, f"SELECT id, error FROM clip_embed_images('SELECT 1, ''{path}''')")
        assert kind == "ok" and "reading files is not allowed" in rows[0]["error"], rows
        kind, message = query(base, db, f"SELECT * FROM clip_files('{os.path.dirname(path)}')")
        assert kind == "error" and "clip_files(): 1st argument: reading files is not allowed" in message, message


def test_nothing_can_be_written_or_trained(site):
    tmp, base, _ = site
    out = tmp / "written-by-a-visitor"
    for db in ("collection", "_memory"):
        kind, message = query(base, db, f"SELECT * FROM clip_train('default', 'SELECT ''x'', ''y''', '{{\"output\": \"{out}\"}}')")
        assert kind == "error" and message.startswith("clip_train(): training is not allowed on this connection"), message
        kind, message = query(base, db, "SELECT * FROM clip_evaluate('default', 'SELECT ''x'', ''y''')")
        assert kind == "error" and "evaluation (it runs for as long as its statement has rows) is not allowed" in message, message
        kind, message = query(base, db, "SELECT archaeclip_restrict('{\"level\": \"untrusted\"}')")
        assert kind == "error" and "changing the policy is not allowed" in message, message
        # Registering a model (a path of the visitor's choice) needs a write statement.
        kind, message = query(base, db, f"INSERT INTO temp.clip_models(name, path) VALUES ('m', '{tmp}')")
        assert kind == "error", message
    assert not out.exists()


def test_views_of_a_strangers_database_cannot_call_the_extension(site):
    _, base, views = site
    for name in views:
        status, body = get(base, f"/collection/{name}.json")
        text = json.dumps(body)
        assert status >= 400 and "unsafe use of" in text, (name, status, text[:300])


def test_oversized_inputs_are_refused_cheaply(site):
    _, base, _ = site
    cases = {
        "SELECT clip_search(1, 1, 1)": None,  # not a function: clip_search is a table
        "SELECT * FROM clip_search('[1, 0]', 100000, 'SELECT 1, ''[1, 0]''')": "k must be between 0 and 1000",
        "SELECT clip_embed_text(printf('%.*c', 100000, 'a')) AS e": "longer than this connection's limit of 16384 bytes",
        "SELECT * FROM clip_embed_texts('SELECT 1, ''a''', NULL, '{\"batch_size\": 256}')": "batch_size must be between 1 and 16",
        "SELECT clip_embed_image(zeroblob(100000000)) AS e": "larger than the limit",
        "SELECT vec_f32('[' || printf('%.*c', 300000, '1') || ']') AS v": None,
    }
    for sql, expected in cases.items():
        started = time.monotonic()
        kind, message = query(base, "collection", sql)
        assert kind == "error", (sql, message)
        if expected:
            assert expected in message, (sql, message)
        assert time.monotonic() - started < 5, sql


def test_long_calls_stop_near_the_time_limit(site):
    """Datasette interrupts a query after 1 s (its progress handler fires every 1,000 VM steps);
    a call that embeds row after row must not run far past it."""
    _, base, _ = site
    many = "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c LIMIT 1000000)"
    for sql in (
        f"{many} SELECT count(clip_embed_text('find ' || i)) AS n FROM c",
        "SELECT count(*) AS n FROM clip_embed_texts('" + many.replace("'", "''") + " SELECT i, ''find '' || i FROM c')",
    ):
        started = time.monotonic()
        kind, message = query(base, "collection", sql)
        took = time.monotonic() - started
        assert kind == "error" and ("too long" in message or "interrupted" in message), (sql, message)
        assert took < 4, (sql, took)


def test_file_roots_allow_the_collection_and_nothing_else(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(os.path.join(IMAGES, "photo_rocket_180x240.png"), images / "find.png")
    (tmp_path / "private.png").write_bytes(open(os.path.join(IMAGES, "photo_rocket_180x240.png"), "rb").read())
    os.symlink(tmp_path / "private.png", images / "link.png")
    sqlite3.connect(tmp_path / "c.db").close()
    proc, base = start(tmp_path, [tmp_path / "c.db"], {"ARCHAECLIP_MODEL": TINY, "ARCHAECLIP_FILE_ROOTS": str(images)})
    try:
        kind, rows = query(base, "c", f"SELECT vec_length(clip_embed_image('{images / 'find.png'}')) AS n")
        assert (kind, rows) == ("ok", [{"n": 12}])
        for path in (images / "link.png", images / ".." / "private.png", images / ".." / "missing.png", "/etc/passwd"):
            kind, message = query(base, "c", f"SELECT clip_embed_image('{path}') AS e")
            assert kind == "error" and "is outside the directories this connection may read images from" in message, (path, message)
    finally:
        proc.kill()
        proc.wait()


def test_a_bad_policy_setting_stops_the_load_with_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHAECLIP_")}
    env["ARCHAECLIP_POLICY"] = "open"
    code = f"import sqlite3; db = sqlite3.connect(':memory:'); db.enable_load_extension(True); db.load_extension({EXTENSION!r})"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    # Python's exit status for an uncaught exception, not a signal: a function registered before
    # the failed load would crash the process when the connection closes (SIGSEGV, -11).
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "ARCHAECLIP_POLICY must be 'trusted' or 'untrusted', found 'open'" in r.stderr, r.stderr
