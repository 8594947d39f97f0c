-- The searches of `make demo`, run by the sqlite3 shell over the demo collection that
-- examples/demo_collection.py writes, with the CLIP model bundled in models/archaeclip-demo
-- (trained by clip_train itself: sql/train_demo.sql).
.load ./dist/archaeclip
.bail on
.headers on
.mode box
INSERT INTO temp.clip_models(name, path) VALUES ('default', 'models/archaeclip-demo');

.print '== The collection and the model =='
SELECT count(*) AS artifacts, sum(split = 'test') AS held_out, count(DISTINCT site) AS sites,
       json_extract(clip_model_info(), '$.parameters') AS model_parameters,
       json_extract(clip_model_info(), '$.dimensions') AS dimensions
FROM artifacts;

.print
.print '== Embedding every photo with the batched function (bad rows would be listed, not fatal) =='
CREATE TABLE IF NOT EXISTS artifact_embeddings(id INTEGER PRIMARY KEY, embedding BLOB);
DELETE FROM artifact_embeddings;
INSERT INTO artifact_embeddings(id, embedding)
  SELECT id, embedding FROM clip_embed_images('SELECT id, image FROM artifacts', NULL, '{"batch_size": 64}')
  WHERE error IS NULL;
SELECT count(*) AS embedded FROM artifact_embeddings;

.print
.print '== Concept search: "bronze coins" from central Italy (Lazio, Tuscany), filtered before k =='
SELECT a.id, a.object_type, a.material, a.decoration, a.period, a.site, a.region, round(s.score, 3) AS score
FROM clip_search(clip_embed_text('a photo of a bronze coin'), 8,
       'SELECT e.id, e.embedding FROM artifact_embeddings e JOIN artifacts a USING (id)
        WHERE a.region IN (''Lazio'', ''Tuscany'')') AS s
JOIN artifacts a ON a.id = s.rowid ORDER BY s.rank;

.print
.print '== Concept search: "a banded terracotta vessel" of the Archaic period, anywhere =='
SELECT a.id, a.object_type, a.material, a.decoration, a.period, a.site, round(s.score, 3) AS score
FROM clip_search(clip_embed_text('a photo of a banded terracotta vessel'), 6,
       'SELECT e.id, e.embedding FROM artifact_embeddings e JOIN artifacts a USING (id) WHERE a.period = ''Archaic''') AS s
JOIN artifacts a ON a.id = s.rowid ORDER BY s.rank;

.print
.print '== Reverse image search: the photos nearest to the first held-out lamp (its own photo first) =='
SELECT a.id, a.object_type, a.material, a.decoration, a.site, round(s.score, 3) AS score
FROM clip_search(clip_embed_image((SELECT image FROM artifacts WHERE split = 'test' AND object_type = 'lamp' ORDER BY id LIMIT 1)), 6,
       'SELECT id, embedding FROM artifact_embeddings') AS s
JOIN artifacts a ON a.id = s.rowid ORDER BY s.rank;

.print
.print '== More like these: the centroid (vec_avg) of three dotted silver coins, excluding them =='
CREATE TEMP VIEW chosen AS
  SELECT id FROM artifacts WHERE object_type = 'coin' AND material = 'silver' AND decoration = 'dotted' ORDER BY id LIMIT 3;
SELECT a.id, a.object_type, a.material, a.decoration, round(s.score, 3) AS score
FROM clip_search((SELECT vec_avg(embedding) FROM artifact_embeddings WHERE id IN (SELECT id FROM chosen)), 5,
       'SELECT id, embedding FROM artifact_embeddings WHERE id NOT IN (SELECT id FROM chosen)') AS s
JOIN artifacts a ON a.id = s.rowid ORDER BY s.rank;

.print
.print '== Zero-shot classification in SQL: each held-out photo against the label prompts =='
CREATE TEMP TABLE label_vectors AS
  SELECT object_type, material, prompt, clip_embed_text(prompt) AS embedding FROM labels;
CREATE TEMP VIEW predictions AS
  SELECT a.id, a.object_type, a.material, l.object_type AS predicted_type,
         l.material AS predicted_material, max(vec_dot(e.embedding, l.embedding)) AS score
  FROM artifacts a JOIN artifact_embeddings e USING (id) CROSS JOIN label_vectors l
  WHERE a.split = 'test' GROUP BY a.id;
SELECT count(*) AS photos, (SELECT count(*) FROM labels) AS labels,
       round(avg(predicted_type = object_type), 3) AS type_accuracy,
       round(avg(predicted_material = material), 3) AS material_accuracy,
       round(avg(predicted_type = object_type AND predicted_material = material), 3) AS both,
       round(1.0 / (SELECT count(*) FROM labels), 3) AS chance_both
FROM predictions;

.print
.print '== Held-out text -> image and image -> text retrieval (clip_evaluate) =='
SELECT direction, pairs, round(recall_at_1, 3) AS "R@1", round(recall_at_5, 3) AS "R@5",
       round(recall_at_10, 3) AS "R@10", median_rank, round(5.0 / pairs, 4) AS "chance R@5"
FROM clip_evaluate('default', 'SELECT image, caption FROM captions WHERE split = ''test''');

.print
.print '== Fine-tuning on your own captions: a catalogue style the model never saw, before and after =='
.print '   (1 epoch of clip_train on the training split, vision tower frozen; output in dist/)'
CREATE TEMP VIEW catalogue AS
  SELECT id, split, image,
         object_type || ' in ' || material
         || CASE decoration WHEN 'plain' THEN ', undecorated' ELSE ', with ' || decoration || ' decoration' END
         || '. ' || century || ', ' || period || '. Findspot: ' || site || ' (' || region || ', ' || country || ')'
         AS caption
  FROM artifacts;
SELECT caption AS "catalogue caption" FROM temp.catalogue LIMIT 1;
CREATE TEMP TABLE before AS
  SELECT direction, recall_at_5, median_rank
  FROM clip_evaluate('default', 'SELECT image, caption FROM temp.catalogue WHERE split = ''test''');
SELECT kind, epoch, step, round(loss, 4) AS loss, round(elapsed_s) AS seconds
FROM clip_train('default', 'SELECT image, caption FROM temp.catalogue WHERE split = ''train''',
  json_object('output', 'dist/archaeclip-demo-catalogue', 'epochs', 1, 'batch_size', 64, 'lr', 3e-4,
              'warmup_steps', 3, 'freeze', 'vision', 'overwrite', 1, 'save_optimizer', 0))
WHERE kind = 'checkpoint';
SELECT b.direction, round(b.recall_at_5, 3) AS "R@5 before", round(a.recall_at_5, 3) AS "R@5 after",
       b.median_rank AS "median rank before", a.median_rank AS "median rank after"
FROM before b
JOIN clip_evaluate('archaeclip-demo-catalogue', 'SELECT image, caption FROM temp.catalogue WHERE split = ''test''') a
  USING (direction);
