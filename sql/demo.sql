-- The searches of `make demo`, run by the sqlite3 shell over the collection that
-- examples/demo_collection.py writes (20,000 artifacts, 64-dimensional embeddings).
.load ./dist/archaeclip
.headers on
.mode column
.print '== The collection =='
SELECT count(*) AS artifacts, (SELECT vec_length(embedding) FROM artifacts LIMIT 1) AS dimensions FROM artifacts;

.print
.print '== Reverse search: the 8 artifacts nearest to #42 =='
SELECT a.id, a.object_type, a.material, a.period, a.site, round(s.score, 3) AS score
FROM clip_search((SELECT embedding FROM artifacts WHERE id = 42), 8,
                 'SELECT id, embedding FROM artifacts') AS s
JOIN artifacts a ON a.id = s.rowid ORDER BY s.rank;

.print
.print '== The same, only finds from Lazio in the Republican period (filtered before k) =='
SELECT a.id, a.object_type, a.material, a.period, a.site, round(s.score, 3) AS score
FROM clip_search((SELECT embedding FROM artifacts WHERE id = 42), 5,
                 'SELECT id, embedding FROM artifacts WHERE region = ''Lazio'' AND period = ''Republican''') AS s
JOIN artifacts a ON a.id = s.rowid ORDER BY s.rank;

.print
.print '== More like these: the centroid (vec_avg) of three silver lamps, excluding them =='
CREATE TEMP VIEW chosen AS
  SELECT id, embedding FROM artifacts WHERE object_type = 'lamp' AND material = 'silver' ORDER BY id LIMIT 3;
SELECT a.id, a.object_type, a.material, a.period, round(s.score, 3) AS score
FROM clip_search((SELECT vec_avg(embedding) FROM chosen), 5,
                 'SELECT id, embedding FROM artifacts WHERE id NOT IN (SELECT id FROM chosen)') AS s
JOIN artifacts a ON a.id = s.rowid ORDER BY s.rank;

.print
.print '== Nearest-centroid classification in SQL: predict the type of every 5th artifact =='
CREATE TEMP TABLE centroids AS
  SELECT object_type, vec_avg(embedding) AS c FROM artifacts WHERE id % 5 != 0 GROUP BY object_type;
SELECT count(*) AS test_artifacts,
       round(100.0 * sum(predicted = object_type) / count(*), 1) AS accuracy_percent
FROM (SELECT a.id, a.object_type, c.object_type AS predicted, max(vec_cosine(c.c, a.embedding))
      FROM artifacts a CROSS JOIN centroids c WHERE a.id % 5 = 0 GROUP BY a.id);

.print
.print '== Timing: the same search three times (1st streams the rows, 2nd keeps a copy, 3rd scans it) =='
.timer on
SELECT count(*) FROM clip_search((SELECT embedding FROM artifacts WHERE id = 7), 10, 'SELECT id, embedding FROM artifacts WHERE id > 0');
SELECT count(*) FROM clip_search((SELECT embedding FROM artifacts WHERE id = 8), 10, 'SELECT id, embedding FROM artifacts WHERE id > 0');
SELECT count(*) FROM clip_search((SELECT embedding FROM artifacts WHERE id = 9), 10, 'SELECT id, embedding FROM artifacts WHERE id > 0');
.timer off
SELECT archaeclip_version() AS archaeclip, sqlite_version() AS sqlite;
