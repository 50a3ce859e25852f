-- A flow started through a reconnect session re-authorizes the connection it names and may not
-- create it: the callback refuses when that connection was deleted while the user was at the
-- provider. Rows written before this column (or by an older instance) are ordinary flows.

ALTER TABLE oauth_sessions ADD COLUMN only_existing boolean NOT NULL DEFAULT false;
