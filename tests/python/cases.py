"""Every registered SQL function, called with good and bad input. Their results and error
messages are snapshotted in __snapshots__/cases.txt (test_loadable.py); a registered function
that no case calls fails the suite."""

# The query vector below is [1, 0, 0]; the table t is made by SETUP.
SETUP = """
CREATE TABLE t(id INTEGER PRIMARY KEY, kind TEXT, e BLOB);
INSERT INTO t VALUES (1, 'coin', vec_f32('[1, 0, 0]')), (2, 'coin', vec_f32('[0.9, 0.1, 0]')),
                     (3, 'vessel', vec_f32('[0, 1, 0]')), (4, 'vessel', '[0.95, 0, 0.05]'),
                     (5, 'coin', NULL);
"""

CASES = [
    # meta
    "SELECT archaeclip_version() = (SELECT archaeclip_version())",
    "SELECT archaeclip_debug() LIKE 'version: %' AND archaeclip_debug() LIKE '%simd: %'",
    # vec_f32
    "SELECT hex(vec_f32('[1, 2.5, -3e-1]'))",
    "SELECT hex(vec_f32(x'0000803f'))",
    "SELECT vec_f32(NULL)",
    "SELECT vec_f32('')",
    "SELECT vec_f32('[]')",
    "SELECT vec_f32('[1,')",
    "SELECT vec_f32('[1, \"a\"]')",
    "SELECT vec_f32('[1, null]')",
    "SELECT vec_f32('[[1]]')",
    "SELECT vec_f32('[1] trailing')",
    "SELECT vec_f32('[1e39]')",
    "SELECT vec_f32(x'')",
    "SELECT vec_f32(x'000000')",
    "SELECT vec_f32(x'0000c07f')",
    "SELECT vec_f32(x'0000807f')",
    "SELECT vec_f32(42)",
    "SELECT vec_f32(4.2)",
    "SELECT vec_f32(vec_quantize_int8('[0.5]', 'unit'))",
    # vec_to_json
    "SELECT vec_to_json('[0.1, -2, 0.0078125, 1e-8, -1e-8, 123456789]')",
    "SELECT vec_to_json(vec_quantize_int8('[0.5, -1, 1, 0]', 'unit'))",
    "SELECT vec_to_json(vec_quantize_binary('[1, -1, 0, 2, 0, 0, 0, 0.5]'))",
    "SELECT json_object('v', vec_to_json('[1, 2]'))",
    "SELECT vec_to_json(NULL)",
    "SELECT vec_to_json(x'00')",
    # vec_length
    "SELECT vec_length('[1, 2, 3]')",
    "SELECT vec_length(x'0000803f0000803f')",
    "SELECT vec_length(vec_quantize_binary('[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]'))",
    "SELECT vec_length(vec_quantize_int8('[0.1, 0.2]', 'unit'))",
    "SELECT vec_length(NULL)",
    "SELECT vec_length(7)",
    # vec_cosine (similarity) and vec_dot
    "SELECT round(vec_cosine('[1, 0]', '[1, 1]'), 12)",
    "SELECT vec_cosine('[1, 2]', '[2, 4]') = 1.0",
    "SELECT vec_cosine('[1, 2]', '[1, 2, 3]')",
    "SELECT vec_cosine('[0, 0]', '[1, 1]')",
    "SELECT vec_cosine(NULL, '[1]')",
    "SELECT vec_cosine('[1, 0]', vec_quantize_int8('[1, 0]', 'unit'))",
    "SELECT vec_dot('[1, 2, 3]', '[4, 5, 6]')",
    "SELECT vec_dot('[1]', '[1, 2]')",
    "SELECT vec_dot('[1]', 'oops')",
    "SELECT vec_dot(vec_quantize_binary('[1,1,1,1,1,1,1,1]'), vec_quantize_binary('[1,1,1,1,1,1,1,1]'))",
    # vec_distance_cosine and vec_distance_l2 (sqlite-vec semantics)
    "SELECT vec_distance_cosine('[1, 0]', '[1, 1]')",
    "SELECT vec_distance_cosine('[1, 2, 3]', '[1, 2, 3]')",
    "SELECT vec_distance_cosine('[0, 0]', '[1, 1]')",
    "SELECT vec_distance_cosine(vec_quantize_int8('[0.1, 0.5, -0.3]', 'unit'), vec_quantize_int8('[0.3, 0.5, -0.1]', 'unit'))",
    "SELECT vec_distance_cosine('[1]', '[1, 2]')",
    "SELECT vec_distance_l2('[0, 0]', '[3, 4]')",
    "SELECT vec_distance_l2(vec_quantize_int8('[-1]', 'unit'), vec_quantize_int8('[0.99]', 'unit'))",
    "SELECT vec_distance_l2('[1, 2]', NULL)",
    "SELECT vec_distance_l2('[1, 2]', '[1]')",
    "SELECT vec_distance_l2(vec_quantize_binary('[1,1,1,1,1,1,1,1]'), vec_quantize_binary('[1,1,1,1,1,1,1,1]'))",
    # vec_normalize, vec_add, vec_sub
    "SELECT vec_to_json(vec_normalize('[3, 4]'))",
    "SELECT vec_normalize('[0, 0]')",
    "SELECT vec_normalize(vec_quantize_int8('[0.5]', 'unit'))",
    "SELECT vec_to_json(vec_add('[1, 2]', '[0.5, -4]'))",
    "SELECT vec_to_json(vec_add(vec_quantize_int8('[0.9]', 'unit'), vec_quantize_int8('[0.9]', 'unit')))",
    "SELECT vec_add('[1, 2]', '[1]')",
    "SELECT vec_to_json(vec_sub('[1, 2]', '[0.5, -4]'))",
    "SELECT vec_sub('[1]', vec_quantize_int8('[0.5]', 'unit'))",
    # quantizers
    "SELECT hex(vec_quantize_int8('[0, 0.5, -0.5, 1, -1, -0.004, -0.003, 7]', 'unit'))",
    "SELECT hex(vec_quantize_int8('[0.5]', 'UNIT'))",
    "SELECT vec_quantize_int8('[0.5]', 'other')",
    "SELECT vec_quantize_int8('[0.5]', NULL)",
    "SELECT hex(vec_quantize_binary('[1, -1, 0, 2, 0, 0, 0, 0.5]'))",
    "SELECT hex(vec_quantize_binary(vec_quantize_int8('[1, -1, 0, 0.5, 0, 0, 0, 0.5]', 'unit')))",
    "SELECT vec_quantize_binary('[1, 2, 3]')",
    "SELECT vec_quantize_binary(vec_quantize_binary('[1,1,1,1,1,1,1,1]'))",
    # vec_avg (aggregate)
    "SELECT vec_to_json(vec_avg(e)) FROM t WHERE kind = 'coin'",
    "SELECT vec_avg(e) FROM t WHERE 0",
    "SELECT vec_avg(v) FROM (SELECT '[1, 2]' AS v UNION ALL SELECT '[1]')",
    "SELECT vec_avg(v) FROM (SELECT 'not json' AS v)",
    # clip_search
    "SELECT id, rank, round(score, 6), round(distance, 6) FROM clip_search('[1, 0, 0]', 3, 'SELECT id, e FROM t')",
    "SELECT id FROM clip_search('[1, 0, 0]', 10, 'SELECT id, e FROM t WHERE kind = ''vessel''')",
    "SELECT s.rowid, t.kind FROM clip_search('[0, 1, 0]', 1, 'SELECT id, e FROM t') AS s JOIN t ON t.id = s.rowid",
    "SELECT id, round(score, 6) FROM clip_search('[1, 0, 0]', 2, 'SELECT id, e FROM t', 'l2')",
    "SELECT id, round(score, 6) FROM clip_search('[1, 0, 0]', 2, 'SELECT id, e FROM t', 'dot')",
    "SELECT count(*) FROM clip_search('[1, 0, 0]', 0, 'SELECT id, e FROM t')",
    "SELECT * FROM clip_search('[1, 0, 0]', 3, 'DELETE FROM t')",
    "SELECT * FROM clip_search('[1, 0, 0]', 3, 'SELECT id FROM t')",
    "SELECT * FROM clip_search('[1, 0, 0]', 3, 'SELECT id, e FROM missing')",
    "SELECT * FROM clip_search('[1, 0]', 3, 'SELECT id, e FROM t')",
    "SELECT * FROM clip_search('[0, 0, 0]', 3, 'SELECT id, e FROM t')",
    "SELECT * FROM clip_search('[1, 0, 0]', 1000001, 'SELECT id, e FROM t')",
    "SELECT * FROM clip_search('[1, 0, 0]', 3, 'SELECT kind, e FROM t')",
    "SELECT * FROM clip_search('[1, 0, 0]', 3, 'SELECT id, kind FROM t')",
    "SELECT * FROM clip_search('[1, 0, 0]', 3, 'SELECT id, e FROM t', 'hamming')",
    "SELECT * FROM clip_search('[1, 0, 0]')",
    "SELECT * FROM clip_search",
]
