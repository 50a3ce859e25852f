-- The connection list's `search` (a substring of the id, the end user's name or e-mail), served
-- by an index instead of a walk over every connection: FTS5 tables with the trigram tokenizer
-- over each row's `search` text, one for the live read model and one for its shadow twin (a
-- rebuild fills the shadow and swaps the pairs together, as it does `connection_tags`).
--
-- FTS rows are numbered by `connection_search_docs`, one stable number per stream, never reused:
-- the read model's implicit rowid may be renumbered by VACUUM, and a connection's numeric `id`
-- is derived from a hash, which could collide.

CREATE TABLE connection_search_docs (
    doc       INTEGER PRIMARY KEY,
    stream_id TEXT    NOT NULL UNIQUE
);

CREATE VIRTUAL TABLE connection_search USING fts5(search, tokenize = 'trigram');
CREATE VIRTUAL TABLE connection_search_shadow USING fts5(search, tokenize = 'trigram');

INSERT INTO connection_search_docs (stream_id) SELECT stream_id FROM connections;

INSERT INTO connection_search (rowid, search)
SELECT d.doc, c.search
FROM connections c JOIN connection_search_docs d ON d.stream_id = c.stream_id
WHERE c.deleted_at IS NULL AND c.search IS NOT NULL;
