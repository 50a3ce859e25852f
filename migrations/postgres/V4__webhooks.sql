-- Webhooks driven from the event log (workers/src/webhooks.rs). Each target (a configured URL)
-- follows the log with its own checkpoint, like a projection, and advances it only past events
-- whose webhook was delivered (2xx) or that have none. `target` is the SHA-256 of the full URL;
-- `url` keeps only scheme, host, port and path, since a URL may carry credentials.
--
-- A lease (holder, expiry) makes one instance deliver per target. It is claimed, renewed and
-- checked by single statements: no transaction is ever held open across an HTTP call, because
-- an open transaction holds back the xid8 horizon every log reader waits behind.

CREATE TABLE webhook_targets (
    target           text        PRIMARY KEY,
    url              text        NOT NULL,
    commit_position  bigint      NOT NULL DEFAULT 0,
    global_position  bigint      NOT NULL DEFAULT 0,
    lease_holder     text,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    last_error       text
);

-- One row per (target, event) that has a webhook: every attempt counts here. `pending` is an
-- attempt started without an outcome yet (or cut short by a crash), `retrying` a failed one
-- waiting for `next_attempt_at`, `delivered` answered 2xx.
CREATE TABLE webhook_deliveries (
    target           text        NOT NULL REFERENCES webhook_targets (target) ON DELETE CASCADE,
    event_id         uuid        NOT NULL,
    event            text        NOT NULL,
    global_position  bigint      NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    status           text        NOT NULL CHECK (status IN ('pending', 'delivered', 'retrying')),
    last_status      integer,
    last_error       text,
    first_attempt_at timestamptz NOT NULL,
    last_attempt_at  timestamptz NOT NULL,
    next_attempt_at  timestamptz,
    delivered_at     timestamptz,
    PRIMARY KEY (target, event_id)
);

CREATE INDEX webhook_deliveries_recent ON webhook_deliveries (target, last_attempt_at DESC);
CREATE INDEX webhook_deliveries_delivered ON webhook_deliveries (delivered_at)
    WHERE status = 'delivered';
