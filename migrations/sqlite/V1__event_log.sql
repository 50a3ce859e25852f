-- The append-only event log (DESIGN §2) and the key tables of envelope encryption (DESIGN §5).
-- SQLite has one writer at a time, so rowid order is commit order: no transaction column.

CREATE TABLE events (
    global_position INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_id       TEXT    NOT NULL,
    stream_version  INTEGER NOT NULL CHECK (stream_version > 0),
    event_id        TEXT    NOT NULL UNIQUE,
    event_type      TEXT    NOT NULL,
    event_version   INTEGER NOT NULL,
    payload         TEXT    NOT NULL,
    metadata        TEXT    NOT NULL DEFAULT '{}',
    -- microseconds since the Unix epoch
    recorded_at     INTEGER NOT NULL,
    UNIQUE (stream_id, stream_version)
);

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TABLE master_keys (
    key_id      TEXT    PRIMARY KEY,
    check_value BLOB    NOT NULL,
    active      INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);

CREATE UNIQUE INDEX master_keys_one_active ON master_keys (active) WHERE active = 1;

CREATE TABLE data_keys (
    key_id        TEXT    PRIMARY KEY,
    owner         TEXT    NOT NULL,
    master_key_id TEXT    REFERENCES master_keys (key_id),
    wrapped       BLOB,
    created_at    INTEGER NOT NULL,
    destroyed_at  INTEGER,
    CHECK ((wrapped IS NULL) = (destroyed_at IS NOT NULL)),
    CHECK ((wrapped IS NULL) = (master_key_id IS NULL))
);

CREATE INDEX data_keys_owner ON data_keys (owner);
CREATE INDEX data_keys_master ON data_keys (master_key_id);
