-- Bounded history; see the PostgreSQL migration of the same name. Times are microseconds since
-- the Unix epoch.

CREATE TABLE compaction_permits (
    global_position INTEGER PRIMARY KEY
);

DROP TRIGGER events_no_delete;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
WHEN NOT EXISTS (SELECT 1 FROM compaction_permits WHERE global_position = OLD.global_position)
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TABLE stream_compactions (
    stream_id         TEXT    PRIMARY KEY,
    routine_cycles    INTEGER NOT NULL,
    lifecycle_events  INTEGER NOT NULL,
    events_removed    INTEGER NOT NULL,
    through_version   INTEGER NOT NULL,
    first_recorded_at INTEGER NOT NULL,
    last_recorded_at  INTEGER NOT NULL,
    compacted_at      INTEGER NOT NULL
);

CREATE TABLE compaction_cursor (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    global_position INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
