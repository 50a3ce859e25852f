-- Demand-aware refresh (README "Refresh policy"); see the PostgreSQL migration of the same name.
-- Times are microseconds since the Unix epoch.

ALTER TABLE connections ADD COLUMN renewed_at INTEGER;
ALTER TABLE connections_shadow ADD COLUMN renewed_at INTEGER;
ALTER TABLE integrations ADD COLUMN renewed_at INTEGER;
ALTER TABLE integrations_shadow ADD COLUMN renewed_at INTEGER;

UPDATE connections
SET renewed_at = CAST(ROUND((julianday(COALESCE(
        json_extract(state, '$.Active.last_refreshed_at'),
        json_extract(state, '$.Active.authorized_at'))) - 2440587.5) * 86400000000.0) AS INTEGER)
WHERE json_extract(state, '$.Active') IS NOT NULL;

CREATE INDEX connections_by_renewal ON connections (renewed_at)
    WHERE deleted_at IS NULL AND refresh_state NOT IN ('failed', 'no_refresh_token');
CREATE INDEX connections_shadow_by_renewal ON connections_shadow (renewed_at)
    WHERE deleted_at IS NULL AND refresh_state NOT IN ('failed', 'no_refresh_token');

CREATE TABLE connection_reads (
    stream_id    TEXT    PRIMARY KEY,
    last_read_at INTEGER NOT NULL
);

CREATE INDEX connection_reads_by_time ON connection_reads (last_read_at);
