-- Webhooks driven from the event log (workers/src/webhooks.rs). Each target (a configured URL)
-- follows the log with its own checkpoint, like a projection, and advances it only past events
-- whose webhook was delivered (2xx) or that have none. `target` is the SHA-256 of the full URL;
-- `url` keeps only scheme, host, port and path, since a URL may carry credentials. A lease
-- (holder, expiry) makes one instance deliver per target. Times are microseconds since the Unix
-- epoch.

CREATE TABLE webhook_targets (
    target           TEXT    PRIMARY KEY,
    url              TEXT    NOT NULL,
    commit_position  INTEGER NOT NULL DEFAULT 0,
    global_position  INTEGER NOT NULL DEFAULT 0,
    lease_holder     TEXT,
    lease_expires_at INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    last_error       TEXT
);

-- One row per (target, event) that has a webhook: every attempt counts here. `pending` is an
-- attempt started without an outcome yet (or cut short by a crash), `retrying` a failed one
-- waiting for `next_attempt_at`, `delivered` answered 2xx.
CREATE TABLE webhook_deliveries (
    target           TEXT    NOT NULL REFERENCES webhook_targets (target) ON DELETE CASCADE,
    event_id         TEXT    NOT NULL,
    event            TEXT    NOT NULL,
    global_position  INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    status           TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'retrying')),
    last_status      INTEGER,
    last_error       TEXT,
    first_attempt_at INTEGER NOT NULL,
    last_attempt_at  INTEGER NOT NULL,
    next_attempt_at  INTEGER,
    delivered_at     INTEGER,
    PRIMARY KEY (target, event_id)
);

CREATE INDEX webhook_deliveries_recent ON webhook_deliveries (target, last_attempt_at);
CREATE INDEX webhook_deliveries_delivered ON webhook_deliveries (delivered_at);
