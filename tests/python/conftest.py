"""Fixtures for the tests of the built extension (dist/archaeclip.so), loaded as users load it.

Run with a Python whose sqlite3 can load extensions (Debian's /usr/bin/python3 and venvs made
from it; the pyenv python3 cannot): `make test` does this.
"""
import os
import sqlite3

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXTENSION = os.path.join(ROOT, "dist", "archaeclip")


def connect(path=":memory:", **kwargs):
    """A connection with archaeclip loaded."""
    db = sqlite3.connect(path, **kwargs)
    db.enable_load_extension(True)
    db.load_extension(EXTENSION)
    db.enable_load_extension(False)
    return db


def connect_sqlite_vec(path=":memory:"):
    """A connection with the reference implementation, sqlite-vec 0.1.9 from PyPI."""
    import sqlite_vec

    db = sqlite3.connect(path)
    db.enable_load_extension(True)
    sqlite_vec.load(db)
    db.enable_load_extension(False)
    return db


@pytest.fixture
def db():
    conn = connect()
    yield conn
    conn.close()


@pytest.fixture
def vec_db():
    conn = connect_sqlite_vec()
    yield conn
    conn.close()


def outcome(db, sql, params=()):
    """('ok', rows) or ('error', message) — what a query did, for comparisons and snapshots."""
    try:
        return ("ok", db.execute(sql, params).fetchall())
    except sqlite3.Error as e:
        return ("error", str(e))
