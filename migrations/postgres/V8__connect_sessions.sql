-- Connect sessions (Nango's /connect/sessions): looked up by the SHA-256 of their token, which
-- is never stored; the session itself is one JSON document. Expired rows are refused on lookup
-- and swept with the OAuth flow sessions. A flow started through one carries the session's tags
-- and end user (`ownership`) to the callback; a flow started with only the public key may create
-- a connection but not replace one (`only_new`).

CREATE TABLE connect_sessions (
    token_hash bytea       PRIMARY KEY,
    id         uuid        NOT NULL UNIQUE,
    session    json        NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    CHECK (expires_at > created_at)
);

CREATE INDEX connect_sessions_by_expiry ON connect_sessions (expires_at);

ALTER TABLE oauth_sessions ADD COLUMN ownership json;
ALTER TABLE oauth_sessions ADD COLUMN only_new boolean NOT NULL DEFAULT false;
