-- Read models built by projections (DESIGN §4), each with a shadow twin that a rebuild fills and
-- swaps in by renaming, so no table is ever created from code. Times are microseconds since the
-- Unix epoch.

CREATE TABLE projection_checkpoints (
    name            TEXT    PRIMARY KEY,
    commit_position INTEGER NOT NULL DEFAULT 0,
    global_position INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT
);

INSERT INTO projection_checkpoints (name) VALUES ('connections'), ('integrations');

CREATE TABLE connections (
    stream_id           TEXT    PRIMARY KEY,
    version             INTEGER NOT NULL,
    id                  INTEGER NOT NULL,
    provider_config_key TEXT    NOT NULL,
    connection_id       TEXT    NOT NULL,
    provider            TEXT    NOT NULL,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    deleted_at          INTEGER,
    expires_at          INTEGER,
    refresh_state       TEXT    NOT NULL,
    state               TEXT    NOT NULL
);

CREATE INDEX connections_by_connection_id ON connections (connection_id);
CREATE INDEX connections_by_expiry ON connections (expires_at);

CREATE TABLE connections_shadow (
    stream_id           TEXT    PRIMARY KEY,
    version             INTEGER NOT NULL,
    id                  INTEGER NOT NULL,
    provider_config_key TEXT    NOT NULL,
    connection_id       TEXT    NOT NULL,
    provider            TEXT    NOT NULL,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    deleted_at          INTEGER,
    expires_at          INTEGER,
    refresh_state       TEXT    NOT NULL,
    state               TEXT    NOT NULL
);

CREATE INDEX connections_shadow_by_connection_id ON connections_shadow (connection_id);
CREATE INDEX connections_shadow_by_expiry ON connections_shadow (expires_at);

-- Integrations use the same snapshot shape (connection_id empty, expires_at null), so one
-- projection code path serves both.
CREATE TABLE integrations (
    stream_id           TEXT    PRIMARY KEY,
    version             INTEGER NOT NULL,
    id                  INTEGER NOT NULL,
    provider_config_key TEXT    NOT NULL,
    connection_id       TEXT    NOT NULL,
    provider            TEXT    NOT NULL,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    deleted_at          INTEGER,
    expires_at          INTEGER,
    refresh_state       TEXT    NOT NULL,
    state               TEXT    NOT NULL
);

CREATE TABLE integrations_shadow (
    stream_id           TEXT    PRIMARY KEY,
    version             INTEGER NOT NULL,
    id                  INTEGER NOT NULL,
    provider_config_key TEXT    NOT NULL,
    connection_id       TEXT    NOT NULL,
    provider            TEXT    NOT NULL,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    deleted_at          INTEGER,
    expires_at          INTEGER,
    refresh_state       TEXT    NOT NULL,
    state               TEXT    NOT NULL
);
