-- The data key a live connection's credentials are sealed under, as a column of its read-model
-- row. A cache miss joins its row to the key; with the key id only inside the state, PostgreSQL
-- parsed each row's JSON text for it (a sixth of the miss query's time in a pgbench of 6-row
-- lookups over 200,000 connections: 9,200-9,600 against 10,500-11,900 lookups a second).
--
-- Adding a nullable column without a default changes only the catalog, so the tables are not
-- rewritten or locked for long. Rows written before keep NULL until their stream next changes
-- or a rebuild writes them; the miss query falls back to the state for those. The integrations
-- tables share the row shape, so they get the column too (always NULL there).

ALTER TABLE connections ADD COLUMN data_key_id uuid;
ALTER TABLE connections_shadow ADD COLUMN data_key_id uuid;
ALTER TABLE integrations ADD COLUMN data_key_id uuid;
ALTER TABLE integrations_shadow ADD COLUMN data_key_id uuid;
