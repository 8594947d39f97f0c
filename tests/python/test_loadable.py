"""The built extension as users load it: what it registers, with which flags, and snapshots of
results and error messages for every function (UPDATE_SNAPSHOTS=1 rewrites them)."""
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from cases import CASES, SETUP
from conftest import EXTENSION, ROOT, connect, connect_sqlite_vec, outcome

SNAPSHOT = os.path.join(os.path.dirname(__file__), "__snapshots__", "cases.txt")

# pragma_function_list flag bits
DETERMINISTIC = 0x800
DIRECTONLY = 0x80000
SUBTYPE = 0x100000
INNOCUOUS = 0x200000


def registered(db):
    """(functions, modules) that archaeclip adds to a connection."""
    plain = sqlite3.connect(":memory:")
    base_f = {r[0] for r in plain.execute("SELECT name FROM pragma_function_list")}
    base_m = {r[0] for r in plain.execute("SELECT name FROM pragma_module_list")}
    funcs = {r[0] for r in db.execute("SELECT name FROM pragma_function_list")} - base_f
    mods = {r[0] for r in db.execute("SELECT name FROM pragma_module_list")} - base_m
    return funcs, mods


def test_it_registers_the_documented_surface(db):
    funcs, mods = registered(db)
    assert funcs == {
        "archaeclip_version", "archaeclip_debug", "vec_f32", "vec_to_json", "vec_length",
        "vec_cosine", "vec_dot", "vec_distance_cosine", "vec_distance_l2", "vec_normalize",
        "vec_add", "vec_sub", "vec_quantize_int8", "vec_quantize_binary", "vec_avg",
        "clip_embed_text", "clip_embed_image", "clip_tokenize", "clip_model_info",
        "archaeclip_policy", "archaeclip_restrict",
    }
    assert mods == {"clip_search", "clip_models", "clip_embed_images", "clip_embed_texts", "clip_train", "clip_evaluate", "clip_files", "clip_index"}


def test_every_registered_function_has_a_snapshot_case(db):
    funcs, mods = registered(db)
    untested = sorted(n for n in funcs | mods if not any(n + "(" in c or c.endswith(n) or f".{n}" in c for c in CASES))
    assert not untested, f"registered but never called in tests/python/cases.py: {untested}"


def render(result):
    kind, value = result
    return f"error: {value}" if kind == "error" else repr(value)


def test_snapshots_of_results_and_errors():
    db = connect()
    db.executescript(SETUP)
    text = "".join(f"{sql}\n=> {render(outcome(db, sql))}\n\n" for sql in CASES)
    if os.environ.get("UPDATE_SNAPSHOTS"):
        os.makedirs(os.path.dirname(SNAPSHOT), exist_ok=True)
        with open(SNAPSHOT, "w") as f:
            f.write(text)
    with open(SNAPSHOT) as f:
        expected = f.read()
    assert text == expected, "snapshots differ; rerun with UPDATE_SNAPSHOTS=1 and review the diff"


def test_clip_functions_are_directonly(db):
    rows = db.execute("SELECT name, flags FROM pragma_function_list WHERE name LIKE 'clip%'").fetchall()
    assert {n for n, _ in rows} == {"clip_embed_text", "clip_embed_image", "clip_tokenize", "clip_model_info"}
    for name, f in rows:
        assert f & DIRECTONLY and not f & DETERMINISTIC and not f & INNOCUOUS, name


def test_flags_tell_the_truth(db):
    policy = {n: f for n, f in db.execute("SELECT name, flags FROM pragma_function_list WHERE name IN ('archaeclip_policy', 'archaeclip_restrict')")}
    assert len(policy) == 2
    for name, f in policy.items():
        assert f & DIRECTONLY and not f & INNOCUOUS and not f & DETERMINISTIC, name
    flags = {n: f for n, f in db.execute("SELECT name, flags FROM pragma_function_list WHERE name LIKE 'vec%' OR name IN ('archaeclip_version', 'archaeclip_debug')")}
    for name, f in flags.items():
        assert f & DETERMINISTIC and f & INNOCUOUS, f"{name} is pure: DETERMINISTIC|INNOCUOUS"
        assert not f & DIRECTONLY, name
    # The same flags as sqlite-vec for the shared names (subtype handling included).
    vec = connect_sqlite_vec()
    theirs = {n: f for n, f in vec.execute("SELECT name, flags FROM pragma_function_list WHERE name LIKE 'vec%'")}
    shared = set(theirs) & set(flags)
    assert len(shared) == 10
    for name in shared:
        assert flags[name] == theirs[name], name


def test_search_is_directonly_so_a_view_in_a_strangers_database_cannot_run_it(tmp_path):
    path = str(tmp_path / "stranger.db")
    plain = sqlite3.connect(path)
    plain.executescript(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, e); INSERT INTO t VALUES (1, '[1, 0]');"
        "CREATE VIEW innocent AS SELECT * FROM clip_search('[1, 0]', 1, 'SELECT id, e FROM t');"
    )
    plain.close()
    db = connect(path)
    with pytest.raises(sqlite3.OperationalError, match="unsafe use of virtual table"):
        db.execute("SELECT * FROM innocent").fetchall()
    # Called directly, it works.
    assert db.execute("SELECT id FROM clip_search('[1, 0]', 1, 'SELECT id, e FROM t')").fetchall() == [(1,)]


def test_errors_are_operational_errors_not_integrity_errors(db):
    with pytest.raises(sqlite3.OperationalError, match=r"^vec_length\(\): 1st argument"):
        db.execute("SELECT vec_length(x'00')").fetchone()


def test_cache_is_invalidated_by_another_connections_write(tmp_path):
    path = str(tmp_path / "items.db")
    a, b = connect(path), connect(path)
    a.executescript("CREATE TABLE t(id INTEGER PRIMARY KEY, e); INSERT INTO t VALUES (1, '[1, 0]'), (2, '[0, 1]');")
    q = "SELECT id FROM clip_search('[1, 0.2]', 1, 'SELECT id, e FROM t')"
    assert a.execute(q).fetchall() == [(1,)]
    assert a.execute(q).fetchall() == [(1,)]  # served from the cache
    b.execute("INSERT INTO t VALUES (3, '[1, 0.2]')")
    b.commit()
    assert a.execute(q).fetchall() == [(3,)]
    a.execute("DELETE FROM t WHERE id = 3")  # this connection's own (uncommitted) write
    assert a.execute(q).fetchall() == [(1,)]


def sqlite3_shell(*commands):
    return subprocess.run(
        ["sqlite3", ":memory:", f".load {EXTENSION}", *commands],
        capture_output=True, text=True, cwd=ROOT,
    )


def test_the_sqlite3_shell_loads_it_by_its_sqlite_name():
    r = sqlite3_shell("SELECT vec_length('[1, 2, 3]'), vec_to_json(vec_normalize('[3, 4]'));")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "3|[0.600000,0.800000]\n"
    r = subprocess.run(["sqlite3", ":memory:", ".load ./dist/archaeclip", "SELECT archaeclip_version();"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == db_version()


def db_version():
    with open(os.path.join(ROOT, "Cargo.toml")) as f:
        for line in f:
            if line.startswith("version"):
                return line.split('"')[1]


def test_the_sqlite3_shell_reports_errors_and_survives():
    script = f".load {EXTENSION}\nSELECT vec_cosine('[1, 2]', '[1, 2, 3]');\nSELECT 'still alive';\n"
    r = subprocess.run(["sqlite3", ":memory:"], input=script, capture_output=True, text=True)
    assert "vec_cosine(): 2nd argument: dimension mismatch: 2 vs 3" in r.stderr
    assert r.stdout == "still alive\n"


def test_the_default_model_takes_its_precision_from_the_environment():
    """A web host names its model with ARCHAECLIP_MODEL and cannot INSERT into temp.clip_models:
    ARCHAECLIP_PRECISION chooses bf16 for it; a value other than fp32/bf16 is an error naming the
    variable; unset is fp32. The bf16 vector is not the fp32 one, and within cosine 0.99 of it."""
    tiny = os.path.join(ROOT, "tests", "fixtures", "clip", "models", "tiny-quickgelu")
    script = (
        "import json, sqlite3, sys\n"
        "db = sqlite3.connect(':memory:'); db.enable_load_extension(True)\n"
        f"db.load_extension({EXTENSION!r})\n"
        "try:\n"
        "    info = json.loads(db.execute('SELECT clip_model_info()').fetchone()[0])\n"
        "    v = db.execute(\"SELECT vec_to_json(clip_embed_text('a bronze coin'))\").fetchone()[0]\n"
        "    print(json.dumps([info['precision'], json.loads(v)]))\n"
        "except sqlite3.Error as e:\n"
        "    print(json.dumps(['error', str(e)]))\n"
    )

    def run(precision):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHAECLIP_")}
        env["ARCHAECLIP_MODEL"] = tiny
        if precision is not None:
            env["ARCHAECLIP_PRECISION"] = precision
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    unset, fp32, bf16, bad = run(None), run("fp32"), run("BF16"), run("fp16")
    assert unset[0] == fp32[0] == "fp32" and unset[1] == fp32[1]
    assert bf16[0] == "bf16" and bf16[1] != fp32[1]
    assert sum(a * b for a, b in zip(bf16[1], fp32[1])) >= 0.99
    assert bad == ["error", "clip_model_info(): ARCHAECLIP_PRECISION must be 'fp32' or 'bf16', found 'fp16'"]
