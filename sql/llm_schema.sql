-- llm's embeddings schema (llm 0.36, migrations m001-m005 of "llm.embeddings"), so that a
-- collection archaeclip writes is one `llm similar` reads. The migrations are recorded as applied
-- in sqlite-utils' `_sqlite_migrations`, so llm does not try to create these tables again.
-- Safe to run on a database that already has them.
CREATE TABLE IF NOT EXISTS "_sqlite_migrations" (
   "id" INTEGER PRIMARY KEY,
   "migration_set" TEXT,
   "name" TEXT,
   "applied_at" TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS "idx__sqlite_migrations_migration_set_name"
    ON "_sqlite_migrations" ("migration_set", "name");
CREATE TABLE IF NOT EXISTS "collections" (
   "id" INTEGER PRIMARY KEY,
   "name" TEXT,
   "model" TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS "idx_collections_name"
    ON "collections" ("name");
CREATE TABLE IF NOT EXISTS "embeddings" (
   "collection_id" INTEGER REFERENCES "collections"("id"),
   "id" TEXT,
   "embedding" BLOB,
   "content" TEXT,
   "content_blob" BLOB,
   "content_hash" BLOB,
   "metadata" TEXT,
   "updated" INTEGER,
   PRIMARY KEY ("collection_id", "id")
);
CREATE INDEX IF NOT EXISTS "idx_embeddings_content_hash"
    ON "embeddings" ("content_hash");
INSERT OR IGNORE INTO _sqlite_migrations(migration_set, name, applied_at)
VALUES ('llm.embeddings', 'm001_create_tables', strftime('%Y-%m-%d %H:%M:%f+00:00', 'now')),
       ('llm.embeddings', 'm002_foreign_key', strftime('%Y-%m-%d %H:%M:%f+00:00', 'now')),
       ('llm.embeddings', 'm003_add_updated', strftime('%Y-%m-%d %H:%M:%f+00:00', 'now')),
       ('llm.embeddings', 'm004_store_content_hash', strftime('%Y-%m-%d %H:%M:%f+00:00', 'now')),
       ('llm.embeddings', 'm005_add_content_blob', strftime('%Y-%m-%d %H:%M:%f+00:00', 'now'));
