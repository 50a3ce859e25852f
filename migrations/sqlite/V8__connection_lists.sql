-- The connection list's filters (README "Listing connections"), each answered by an index:
-- newest first (the list's order), the end user's id and organization, and the tags, which
-- SQLite keeps one row per tag in `connection_tags` (and its shadow twin, which a rebuild fills
-- and swaps in with the connections). `search` (the lower-cased connection id, end-user display
-- name and e-mail, one per line) is matched while walking the newest-first index.
--
-- The integrations tables share the row shape, so they get the columns too (always NULL there).

ALTER TABLE connections ADD COLUMN end_user_id TEXT;
ALTER TABLE connections ADD COLUMN end_user_org_id TEXT;
ALTER TABLE connections ADD COLUMN search TEXT;
ALTER TABLE connections_shadow ADD COLUMN end_user_id TEXT;
ALTER TABLE connections_shadow ADD COLUMN end_user_org_id TEXT;
ALTER TABLE connections_shadow ADD COLUMN search TEXT;
ALTER TABLE integrations ADD COLUMN end_user_id TEXT;
ALTER TABLE integrations ADD COLUMN end_user_org_id TEXT;
ALTER TABLE integrations ADD COLUMN search TEXT;
ALTER TABLE integrations_shadow ADD COLUMN end_user_id TEXT;
ALTER TABLE integrations_shadow ADD COLUMN end_user_org_id TEXT;
ALTER TABLE integrations_shadow ADD COLUMN search TEXT;

UPDATE connections
SET end_user_id = json_extract(state, '$.Active.ownership.end_user.id'),
    end_user_org_id = json_extract(state, '$.Active.ownership.end_user.organization.id'),
    search = lower(connection_id
        || coalesce(char(10) || json_extract(state, '$.Active.ownership.end_user.display_name'), '')
        || coalesce(char(10) || json_extract(state, '$.Active.ownership.end_user.email'), ''))
WHERE json_extract(state, '$.Active') IS NOT NULL;

CREATE TABLE connection_tags (
    stream_id TEXT NOT NULL,
    key       TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (stream_id, key)
) WITHOUT ROWID;
CREATE INDEX connection_tags_by_pair ON connection_tags (key, value);

CREATE TABLE connection_tags_shadow (
    stream_id TEXT NOT NULL,
    key       TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (stream_id, key)
) WITHOUT ROWID;
CREATE INDEX connection_tags_shadow_by_pair ON connection_tags_shadow (key, value);

INSERT INTO connection_tags (stream_id, key, value)
SELECT c.stream_id, t.key, t.value
FROM connections c, json_each(json_extract(c.state, '$.Active.ownership.tags')) t
WHERE c.deleted_at IS NULL;

CREATE INDEX connections_newest ON connections (created_at DESC, id DESC) WHERE deleted_at IS NULL;
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
