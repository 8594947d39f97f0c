"""Runs every example of docs/reference.md (and the SQL tour in README.md) against the built
extension and checks the output printed under each statement."""
import os
import re

import pytest

from conftest import ROOT, connect, outcome

DOCS = ["docs/reference.md", "README.md"]


def examples(path):
    """[(line, statement, [expected lines])] of every ```sql block, in order. A statement ends
    with a line ending in ';'; the `-- ` lines after it are its expected output."""
    text = open(os.path.join(ROOT, path)).read()
    steps = []
    for m in re.finditer(r"```sql\n(.*?)```", text, re.S):
        first = text[: m.start()].count("\n") + 2
        stmt = []
        for offset, raw in enumerate(m.group(1).splitlines()):
            if raw.startswith("-- "):
                steps[-1][2].append(raw[3:])
            elif raw.strip():
                stmt.append(raw)
                if raw.rstrip().endswith(";"):
                    steps.append((first + offset, "\n".join(stmt), []))
                    stmt = []
    return steps


def render(row):
    return " | ".join("NULL" if v is None else str(v) for v in row)


@pytest.mark.parametrize("path", [p for p in DOCS if os.path.exists(os.path.join(ROOT, p))])
def test_examples(path):
    """The blocks of one file run in order on one connection (later examples use earlier tables)."""
    db = connect()
    if path == "README.md":
        db.executescript(README_SETUP)
    checked, failures = 0, []
    for line, sql, expected in examples(path):
        kind, value = outcome(db, sql)
        if expected and expected[0].startswith("error: "):
            ok = kind == "error" and value.startswith(expected[0][len("error: "):])
        elif kind != "ok":
            ok = False
        else:
            ok = not expected or [render(r) for r in value] == expected
        checked += bool(expected)
        if not ok:
            failures.append(f"{path}:{line}: {sql}\n  expected {expected}\n  got {kind}: {value}")
    assert not failures, "\n".join(failures)
    assert checked >= (10 if path.startswith("docs") else 3), f"{path}: only {checked} checked examples"


def test_every_function_has_a_checked_example():
    text = open(os.path.join(ROOT, "docs/reference.md")).read()
    blocks = "".join(re.findall(r"```sql\n(.*?)```", text, re.S))
    db = connect()
    names = {r[0] for r in db.execute("SELECT name FROM pragma_function_list WHERE name LIKE 'vec%' OR name LIKE 'archaeclip%'")}
    names |= {r[0] for r in db.execute("SELECT name FROM pragma_function_list WHERE name LIKE 'clip%'")}
    names |= {"clip_search", "temp.clip_models", "clip_embed_images", "clip_embed_texts", "clip_files"}
    missing = sorted(n for n in names if n + "(" not in blocks)
    assert not missing, f"functions without an example in docs/reference.md: {missing}"


# The README's tour runs against a tiny table of the same shape as the demo's.
README_SETUP = """
CREATE TABLE artifacts(id INTEGER PRIMARY KEY, label TEXT, material TEXT, embedding BLOB);
INSERT INTO artifacts VALUES
  (1, 'coin of Gabii', 'bronze', vec_f32('[0.9, 0.1, 0.0]')),
  (2, 'lamp', 'terracotta', vec_f32('[0.1, 0.9, 0.1]')),
  (3, 'fibula', 'bronze', vec_f32('[0.7, 0.0, 0.7]')),
  (4, 'statuette', 'terracotta', vec_f32('[0.8, 0.3, 0.1]'));
"""
