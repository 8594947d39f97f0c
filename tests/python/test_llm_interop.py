"""archaeclip searches llm's embeddings.db in place and agrees with `llm similar`.

The database is written by the real `llm` package (PyPI) with a tiny embedding model registered
as a plugin, so nothing is downloaded; `llm similar` runs as the CLI, in a subprocess.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import connect

PLUGIN_DIR = os.path.join(os.path.dirname(__file__), "llm_plugin")


@pytest.fixture(scope="module")
def llm_env(tmp_path_factory):
    env = dict(os.environ)
    env["PYTHONPATH"] = PLUGIN_DIR
    env["LLM_LOAD_PLUGINS"] = "llm-tiny-hash"
    env["LLM_USER_PATH"] = str(tmp_path_factory.mktemp("llm-user"))
    return env


@pytest.fixture(scope="module")
def embeddings_db(llm_env, tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "embeddings.db"
    items = tmp_path_factory.mktemp("items") / "items.csv"
    # 40 groups of 5 near-duplicates, in an order that is not the id order.
    rows = [(f"item-{(g * 17) % 40:02d}-{v}", f"g{(g * 17) % 40:02d}|variant {v}") for g in range(40) for v in range(5)]
    items.write_text("id,content\n" + "".join(f"{i},{c}\n" for i, c in rows))
    subprocess.run(
        [sys.executable, "-m", "llm", "embed-multi", "photos", str(items), "-m", "tiny-hash", "-d", str(path), "--store"],
        env=llm_env, check=True, capture_output=True, text=True,
    )
    return path


def llm_similar(llm_env, path, item_id, n):
    out = subprocess.run(
        [sys.executable, "-m", "llm", "similar", "photos", item_id, "-d", str(path), "-n", str(n)],
        env=llm_env, check=True, capture_output=True, text=True,
    ).stdout
    return [(d["id"], d["score"]) for d in map(json.loads, out.splitlines())]


@pytest.mark.parametrize("item_id", ["item-05-0", "item-31-4", "item-00-2"])
def test_search_in_place_matches_llm_similar(llm_env, embeddings_db, item_id):
    expected = llm_similar(llm_env, embeddings_db, item_id, 12)
    assert len(expected) == 12
    db = connect(str(embeddings_db))
    # llm's ids are TEXT (primary key with collection_id): search by rowid, join back for the id.
    # llm excludes the query item itself, so the statement does too.
    got = db.execute(
        """
        SELECT e.id, s.score
        FROM clip_search(
            (SELECT embedding FROM embeddings WHERE id = :id), 12,
            'SELECT e.rowid, e.embedding FROM embeddings e JOIN collections c ON c.id = e.collection_id
             WHERE c.name = ''photos'' AND e.id != ' || quote(:id)) AS s
        JOIN embeddings e ON e.rowid = s.rowid
        ORDER BY s.distance
        """,
        {"id": item_id},
    ).fetchall()
    db.close()
    assert [i for i, _ in got] == [i for i, _ in expected]
    for (_, ours), (_, theirs) in zip(got, expected):
        assert ours == pytest.approx(theirs, abs=1e-6)
