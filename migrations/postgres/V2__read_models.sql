-- Read models built by projections (DESIGN §4), each with a shadow twin that a rebuild fills and
-- swaps in by renaming, so no table is ever created from code.

CREATE TABLE projection_checkpoints (
    name            text        PRIMARY KEY,
    commit_position bigint      NOT NULL DEFAULT 0,
    global_position bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    last_error      text
);

INSERT INTO projection_checkpoints (name) VALUES ('connections'), ('integrations');

-- `state` is the aggregate's state (secrets only sealed); the other columns are what queries
-- filter and sort on.
CREATE TABLE connections (
    stream_id           text        PRIMARY KEY,
    version             integer     NOT NULL,
    id                  bigint      NOT NULL,
    provider_config_key text        NOT NULL,
    connection_id       text        NOT NULL,
    provider            text        NOT NULL,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    deleted_at          timestamptz,
    expires_at          timestamptz,
    refresh_state       text        NOT NULL,
    state               jsonb       NOT NULL
);

CREATE INDEX connections_by_connection_id ON connections (connection_id) WHERE deleted_at IS NULL;
CREATE INDEX connections_by_config ON connections (provider_config_key) WHERE deleted_at IS NULL;
CREATE INDEX connections_by_expiry ON connections (expires_at) WHERE deleted_at IS NULL;

CREATE TABLE connections_shadow (LIKE connections INCLUDING ALL);

-- Integrations use the same snapshot shape (connection_id empty, expires_at null), so one
-- projection code path serves both.
CREATE TABLE integrations (
    stream_id           text        PRIMARY KEY,
    version             integer     NOT NULL,
    id                  bigint      NOT NULL,
    provider_config_key text        NOT NULL,
    connection_id       text        NOT NULL,
    provider            text        NOT NULL,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    deleted_at          timestamptz,
    expires_at          timestamptz,
    refresh_state       text        NOT NULL,
    state               jsonb       NOT NULL
);

CREATE TABLE integrations_shadow (LIKE integrations INCLUDING ALL);
