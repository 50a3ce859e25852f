-- The append-only event log (DESIGN §2) and the key tables of envelope encryption (DESIGN §5).

CREATE TABLE events (
    global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction: readers only take rows below the oldest running transaction, so a
    -- transaction that commits late can never be skipped (the xid8 horizon).
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_id       text        NOT NULL,
    stream_version  integer     NOT NULL CHECK (stream_version > 0),
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    event_version   smallint    NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

CREATE INDEX events_commit_order ON events (transaction_id, global_position);

-- Events are never rewritten or deleted; deletion is cryptographic (data keys below).
CREATE FUNCTION events_are_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only';
END $$;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_immutable();

-- One row per master key ever used; its check value detects a wrong key at start-up.
CREATE TABLE master_keys (
    key_id      text        PRIMARY KEY,
    check_value bytea       NOT NULL,
    active      boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX master_keys_one_active ON master_keys (active) WHERE active;

-- Data keys, wrapped by a master key. Destroying one (wrapped = NULL) shreds every secret sealed
-- with it while the events that carry the ciphertext stay.
CREATE TABLE data_keys (
    key_id        uuid        PRIMARY KEY,
    owner         text        NOT NULL,
    master_key_id text        REFERENCES master_keys (key_id),
    wrapped       bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    destroyed_at  timestamptz,
    CHECK ((wrapped IS NULL) = (destroyed_at IS NOT NULL)),
    CHECK ((wrapped IS NULL) = (master_key_id IS NULL))
);

CREATE INDEX data_keys_owner ON data_keys (owner);
CREATE INDEX data_keys_master ON data_keys (master_key_id) WHERE master_key_id IS NOT NULL;
