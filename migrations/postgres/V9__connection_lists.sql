-- The connection list's filters (README "Listing connections"), each answered by an index
-- rather than a scan of every row's JSON:
--
-- - newest first, which is the list's order and what a page walks (`created_at DESC, id DESC`);
-- - `end_user_id` and `end_user_org_id`, copied from the connection's end user (partial indexes:
--   connections without an end user cost nothing);
-- - `tags` as `jsonb` with a GIN index, for containment (`tags @> '{"k":"v"}'`);
-- - `search`: the lower-cased connection id, end-user display name and e-mail, one per line,
--   for substring search. Its trigram index needs the `pg_trgm` extension; where the database
--   does not offer it (or the role may not create it) the index is skipped and a search walks
--   the newest-first index instead.
--
-- The integrations tables share the row shape, so they get the columns too (always NULL there).

ALTER TABLE connections ADD COLUMN end_user_id text, ADD COLUMN end_user_org_id text,
    ADD COLUMN tags jsonb, ADD COLUMN search text;
ALTER TABLE connections_shadow ADD COLUMN end_user_id text, ADD COLUMN end_user_org_id text,
    ADD COLUMN tags jsonb, ADD COLUMN search text;
ALTER TABLE integrations ADD COLUMN end_user_id text, ADD COLUMN end_user_org_id text,
    ADD COLUMN tags jsonb, ADD COLUMN search text;
ALTER TABLE integrations_shadow ADD COLUMN end_user_id text, ADD COLUMN end_user_org_id text,
    ADD COLUMN tags jsonb, ADD COLUMN search text;

UPDATE connections
SET end_user_id = state->'Active'->'ownership'->'end_user'->>'id',
    end_user_org_id = state->'Active'->'ownership'->'end_user'->'organization'->>'id',
    tags = state->'Active'->'ownership'->'tags',
    search = lower(concat_ws(E'\n', connection_id,
        state->'Active'->'ownership'->'end_user'->>'display_name',
        state->'Active'->'ownership'->'end_user'->>'email'))
WHERE state->'Active' IS NOT NULL;

CREATE INDEX connections_newest ON connections (created_at DESC, id DESC)
    WHERE deleted_at IS NULL;
CREATE INDEX connections_shadow_newest ON connections_shadow (created_at DESC, id DESC)
    WHERE deleted_at IS NULL;
CREATE INDEX connections_by_end_user ON connections (end_user_id)
    WHERE deleted_at IS NULL AND end_user_id IS NOT NULL;
CREATE INDEX connections_shadow_by_end_user ON connections_shadow (end_user_id)
    WHERE deleted_at IS NULL AND end_user_id IS NOT NULL;
CREATE INDEX connections_by_end_user_org ON connections (end_user_org_id)
    WHERE deleted_at IS NULL AND end_user_org_id IS NOT NULL;
CREATE INDEX connections_shadow_by_end_user_org ON connections_shadow (end_user_org_id)
    WHERE deleted_at IS NULL AND end_user_org_id IS NOT NULL;
CREATE INDEX connections_by_tags ON connections USING gin (tags jsonb_path_ops)
    WHERE deleted_at IS NULL AND tags IS NOT NULL;
CREATE INDEX connections_shadow_by_tags ON connections_shadow USING gin (tags jsonb_path_ops)
    WHERE deleted_at IS NULL AND tags IS NOT NULL;

DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE INDEX connections_by_search ON connections USING gin (search gin_trgm_ops)
        WHERE deleted_at IS NULL;
    CREATE INDEX connections_shadow_by_search ON connections_shadow USING gin (search gin_trgm_ops)
        WHERE deleted_at IS NULL;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'pg_trgm is not available (%): connection search walks the newest-first index',
        SQLERRM;
END
$$;
