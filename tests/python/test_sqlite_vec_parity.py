"""Side by side with sqlite-vec 0.1.9 (PyPI): every function whose name matches returns the same
value, bit for bit, on valid input; the few deliberate differences on invalid input are listed
and asserted at the bottom."""
import json

import numpy as np
import pytest

from conftest import connect, connect_sqlite_vec, outcome

rng = np.random.default_rng(2024)


def vectors():
    """Float32 vectors of several sizes and scales, with values that stress the %f rounding."""
    out = []
    for dims in (1, 3, 8, 16, 100, 512):
        for scale in (1e-3, 1.0, 1e3):
            out.append((rng.standard_normal(dims) * scale).astype(np.float32))
    # Exact halves at the 6th decimal (m/128 with m odd) and small and signed zeros.
    out.append(np.array([1 / 128, -3 / 128, 5362.4140625, 0.0, -0.0, 1e-8, -1e-8, 0.5], dtype=np.float32))
    # Values around the int8 quantization steps and outside [-1, 1].
    out.append(np.array([-1.5, -1, -0.004, -0.003, 0, 0.003, 0.99, 1, 1.5, 7, -7, 0.25, 1 / 3, -1 / 3, 0.75, 0.1], dtype=np.float32))
    return out


VECTORS = vectors()
PAIRS = [(a, b) for a in VECTORS for b in VECTORS if len(a) == len(b)][:200]


@pytest.fixture(scope="module")
def both():
    ours, theirs = connect(), connect_sqlite_vec()
    yield ours, theirs
    ours.close()
    theirs.close()


def same(both, sql, params=()):
    ours, theirs = both
    a, b = outcome(ours, sql, params), outcome(theirs, sql, params)
    assert a[0] == "ok" and b[0] == "ok", (sql, a, b)
    assert a == b, (sql, params, a, b)


def as_json(v):
    return json.dumps([float(x) for x in v])


@pytest.mark.parametrize("i", range(len(VECTORS)))
def test_single_vector_functions(both, i):
    v = VECTORS[i]
    for arg in (v.tobytes(), as_json(v)):
        same(both, "SELECT hex(vec_f32(?)), vec_length(?), vec_to_json(?)", (arg, arg, arg))
        same(both, "SELECT hex(vec_quantize_int8(?, 'unit')), vec_to_json(vec_quantize_int8(?, 'unit'))", (arg, arg))
        if np.any(v != 0):
            same(both, "SELECT hex(vec_normalize(?))", (arg,))
        if len(v) % 8 == 0:
            same(both, "SELECT hex(vec_quantize_binary(?)), vec_to_json(vec_quantize_binary(?)), "
                       "vec_length(vec_quantize_binary(?))", (arg, arg, arg))
            same(both, "SELECT hex(vec_quantize_binary(vec_quantize_int8(?, 'unit')))", (arg,))


def test_pairs(both):
    assert len(PAIRS) > 50
    for a, b in PAIRS:
        ab, bb = a.tobytes(), b.tobytes()
        same(both, "SELECT vec_distance_l2(?, ?), hex(vec_add(?, ?)), hex(vec_sub(?, ?))", (ab, bb, ab, bb, ab, bb))
        if np.any(a != 0) and np.any(b != 0):
            same(both, "SELECT vec_distance_cosine(?, ?)", (ab, bb))
        q = "vec_quantize_int8(?, 'unit')"
        same(both, f"SELECT vec_distance_l2({q}, {q}), vec_to_json(vec_add({q}, {q})), vec_to_json(vec_sub({q}, {q}))",
             (ab, bb, ab, bb, ab, bb))
        qa = np.trunc((a.astype(np.float64) + 1) / np.float64(np.float32(2 / 255)) - 128)
        qb = np.trunc((b.astype(np.float64) + 1) / np.float64(np.float32(2 / 255)) - 128)
        if np.any(qa != 0) and np.any(qb != 0):
            same(both, f"SELECT vec_distance_cosine({q}, {q})", (ab, bb))


def test_json_spellings(both):
    for text in ["[1,2,3]", " [ 1 , 2 , 3 ] ", "[1e-3, -2.5E2, 0.1]", "[\n1,\t2\r]", "[-0, 0.0]", "[3.4028234e38]", "[1e-310]"]:
        same(both, "SELECT hex(vec_f32(?)), vec_to_json(?)", (text, text))


def test_deliberate_differences(both):
    """Where sqlite-vec silently accepts bad input or returns NULL, archaeclip raises a clear error
    (and NULL in gives NULL out). Each row: SQL, what sqlite-vec does, what archaeclip does."""
    ours, theirs = both
    cases = [
        ("SELECT vec_length(NULL)", ("error", "Input must have type BLOB"), ("ok", [(None,)])),
        ("SELECT vec_distance_cosine('[0, 0]', '[1, 1]')", ("ok", [(None,)]), ("error", "cosine is undefined for a zero vector")),
        ("SELECT hex(vec_normalize('[0, 0]'))", ("ok", None), ("error", "cannot normalize a zero vector")),
        ("SELECT vec_length(x'0000c07f')", ("ok", [(1,)]), ("error", "element 0 is NaN or infinite")),
        ("SELECT vec_length('[1e39]')", ("ok", [(1,)]), ("error", "element 0 is NaN or infinite")),
        ("SELECT vec_length('[1, 2] trailing')", ("ok", [(2,)]), ("error", "invalid JSON vector: trailing characters")),
        ("SELECT vec_length('[1, 2')", ("ok", [(2,)]), ("error", "invalid JSON vector")),
        ("SELECT vec_length('[1 2]')", ("ok", [(2,)]), ("error", "invalid JSON vector")),
        ("SELECT vec_length(vec_f32(vec_quantize_int8('[0.1, 0.2, 0.3, 0.4]', 'unit')))", ("ok", [(1,)]), ("error", "expected a float32 vector, found an int8 vector")),
    ]
    for sql, (their_kind, their_value), (our_kind, our_value) in cases:
        t, o = outcome(theirs, sql), outcome(ours, sql)
        assert t[0] == their_kind, (sql, t)
        if their_kind == "error" or their_value is not None:
            assert (their_value in t[1]) if their_kind == "error" else t[1] == their_value, (sql, t)
        assert o[0] == our_kind, (sql, o)
        assert (our_value in o[1]) if our_kind == "error" else o[1] == our_value, (sql, o)
