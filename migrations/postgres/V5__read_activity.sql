-- Demand-aware refresh (README "Refresh policy"). Two additions:
--
-- `renewed_at` on the read-model rows: when the connection's tokens were last issued (its last
-- refresh, else its authorization), so that the scheduler finds the connections whose refresh
-- token needs a keep-alive with an index range instead of a scan of every row's JSON. The
-- integrations tables share the row shape, so they get the column too (always NULL there).
--
-- `connection_reads`: when each connection was last read, written in batches by the instances
-- that serve reads (never an event: reads are not facts about the credential). A rebuild of the
-- read models leaves it alone, and rows older than the activity window are pruned.

ALTER TABLE connections ADD COLUMN renewed_at timestamptz;
ALTER TABLE connections_shadow ADD COLUMN renewed_at timestamptz;
ALTER TABLE integrations ADD COLUMN renewed_at timestamptz;
ALTER TABLE integrations_shadow ADD COLUMN renewed_at timestamptz;

UPDATE connections
SET renewed_at = COALESCE(state->'Active'->>'last_refreshed_at',
                          state->'Active'->>'authorized_at')::timestamptz
WHERE state ? 'Active';

CREATE INDEX connections_by_renewal ON connections (renewed_at)
    WHERE deleted_at IS NULL AND refresh_state NOT IN ('failed', 'no_refresh_token');
CREATE INDEX connections_shadow_by_renewal ON connections_shadow (renewed_at)
    WHERE deleted_at IS NULL AND refresh_state NOT IN ('failed', 'no_refresh_token');

CREATE TABLE connection_reads (
    stream_id    text        PRIMARY KEY,
    last_read_at timestamptz NOT NULL
);

CREATE INDEX connection_reads_by_time ON connection_reads (last_read_at);
