-- Embed a folder of photos into llm's schema, as `llm embed-multi photos --files photos '*.jpg'
-- --binary -m clip` does: one row per file, id = the path relative to the folder, content_hash =
-- md5 of the bytes. Files whose hash is unchanged are skipped, so rerunning after adding or
-- editing photos embeds only those; unreadable files are listed by name and skipped.
-- Run after sql/llm_schema.sql, with a model registered in temp.clip_models and the folder and
-- pattern in temp.embed_folder_args(folder, pattern, collection, model):
--   CREATE TEMP TABLE embed_folder_args AS
--     SELECT 'photos' AS folder, '**/*.jpg' AS pattern, 'photos' AS collection, 'clip' AS model;
INSERT OR IGNORE INTO collections(name, model)
  SELECT collection, model FROM temp.embed_folder_args;

-- The files to (re)embed: new, or changed since they were embedded.
CREATE TEMP TABLE IF NOT EXISTS embed_folder_todo(path TEXT PRIMARY KEY, name TEXT, md5 BLOB, error TEXT);
DELETE FROM temp.embed_folder_todo;
INSERT INTO temp.embed_folder_todo
  SELECT f.path, f.name, f.md5, f.error
  FROM temp.embed_folder_args AS a, clip_files(a.folder, a.pattern) AS f
  WHERE f.error IS NOT NULL
     OR NOT EXISTS (SELECT 1 FROM embeddings AS e
                    WHERE e.collection_id = (SELECT id FROM collections WHERE name = a.collection)
                      AND e.id = f.name AND e.content_hash = f.md5);

-- Unreadable files, by name.
SELECT 'skipped ' || name || ': ' || error FROM temp.embed_folder_todo WHERE error IS NOT NULL;

DROP TABLE IF EXISTS temp.embed_folder_out;
CREATE TEMP TABLE embed_folder_out AS
  SELECT id, embedding, error
  FROM clip_embed_images('SELECT path, path FROM temp.embed_folder_todo WHERE error IS NULL',
                         (SELECT model FROM temp.embed_folder_args));
SELECT 'skipped ' || t.name || ': ' || o.error
  FROM temp.embed_folder_out AS o JOIN temp.embed_folder_todo AS t ON t.path = o.id
  WHERE o.error IS NOT NULL;

INSERT OR REPLACE INTO embeddings(collection_id, id, embedding, content_hash, updated)
  SELECT (SELECT id FROM collections WHERE name = (SELECT collection FROM temp.embed_folder_args)),
         t.name, o.embedding, t.md5, CAST(strftime('%s', 'now') AS INTEGER)
  FROM temp.embed_folder_out AS o JOIN temp.embed_folder_todo AS t ON t.path = o.id
  WHERE o.error IS NULL;
SELECT 'embedded ' || changes() || ' file(s)';
