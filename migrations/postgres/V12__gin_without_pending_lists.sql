-- The connections' GIN indexes (the search trigrams and the tags) take each new row straight into
-- the index instead of through a pending list.
--
-- With the pending list (PostgreSQL's default), connections added one at a time, as the API and
-- OAuth flows add them, left the trigram index at about 237 bytes per connection after VACUUM;
-- written straight through it stays at about 25, as a bulk build does. A single insert does a
-- little more work in the index; a list that matches nothing no longer has to read a pending
-- list either.
--
-- Existing indexes keep their size until they are rebuilt (a projection rebuild builds them
-- afresh, or REINDEX CONCURRENTLY). The shadow's indexes are copied from the live ones at every
-- rebuild, so the setting carries over; both tables are set here so that nothing depends on
-- which one is live now.

DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT c.relname FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid
             JOIN pg_am a ON a.oid = c.relam
             WHERE a.amname = 'gin'
               AND i.indrelid IN ('connections'::regclass, 'connections_shadow'::regclass) LOOP
        EXECUTE format('ALTER INDEX %I SET (fastupdate = off)', r.relname);
    END LOOP;
END
$$;
