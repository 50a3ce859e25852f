-- The data key a live connection's credentials are sealed under, as a column of its read-model
-- row (the read models share their columns with PostgreSQL's, where a cache miss joins on it).
-- Rows written before keep NULL until their stream next changes or a rebuild writes them.

ALTER TABLE connections ADD COLUMN data_key_id TEXT;
ALTER TABLE connections_shadow ADD COLUMN data_key_id TEXT;
ALTER TABLE integrations ADD COLUMN data_key_id TEXT;
ALTER TABLE integrations_shadow ADD COLUMN data_key_id TEXT;
