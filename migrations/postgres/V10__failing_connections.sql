-- The dashboard's health filter: the connections whose refresh failed or is being retried, newest
-- first. They are few, so the partial index is small, and a page of them never walks every
-- connection's row.
CREATE INDEX connections_failing ON connections (created_at DESC, id DESC)
    WHERE deleted_at IS NULL AND refresh_state IN ('failed', 'retrying');
CREATE INDEX connections_shadow_failing ON connections_shadow (created_at DESC, id DESC)
    WHERE deleted_at IS NULL AND refresh_state IN ('failed', 'retrying');
