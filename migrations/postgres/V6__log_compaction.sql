-- Bounded history (README "History retention"). The log stays append-only with one exception:
-- the compactor may delete routine refresh cycles (and, when an operator sets a lifecycle
-- retention, superseded failures and metadata) that are past retention and whose effect on the
-- stream's state a later event replaces, so that a rebuild from the log stays exact.
--
-- `compaction_permits` is how the compactor says which rows: in its own transaction it lists
-- their positions here, deletes them and removes the permits again. The trigger refuses every
-- other delete, and every update, as before.
--
-- `stream_compactions` keeps, per stream, what was removed over all passes, so that the
-- history can say where a stream was compacted and how many cycles were summarized;
-- `compaction_cursor` is how far through the log the compactor has looked.

CREATE TABLE compaction_permits (
    global_position bigint PRIMARY KEY
);

CREATE OR REPLACE FUNCTION events_are_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND EXISTS (SELECT 1 FROM compaction_permits WHERE global_position = OLD.global_position) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'events are append-only';
END $$;

CREATE TABLE stream_compactions (
    stream_id        text        PRIMARY KEY,
    routine_cycles   bigint      NOT NULL,
    lifecycle_events bigint      NOT NULL,
    events_removed   bigint      NOT NULL,
    through_version  integer     NOT NULL,
    first_recorded_at timestamptz NOT NULL,
    last_recorded_at  timestamptz NOT NULL,
    compacted_at     timestamptz NOT NULL
);

CREATE TABLE compaction_cursor (
    id              integer PRIMARY KEY CHECK (id = 1),
    commit_position bigint  NOT NULL,
    global_position bigint  NOT NULL,
    updated_at      timestamptz NOT NULL
);
