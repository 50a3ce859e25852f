-- OAuth flow sessions (DESIGN §5): one row per flow between /oauth/connect and /oauth/callback.
-- The row's key is the `state` sent to the provider. A callback deletes the row and reads it in
-- one statement (DELETE … RETURNING), so a state is single-use. Expired rows are refused at the
-- callback and swept by a background task. The flow's secrets are stored only sealed under the
-- data key `secrets_key_id`. Times are microseconds since the Unix epoch; JSON is text.

CREATE TABLE oauth_sessions (
    state               TEXT    PRIMARY KEY,
    provider_config_key TEXT    NOT NULL,
    provider            TEXT    NOT NULL,
    connection_id       TEXT    NOT NULL,
    callback_url        TEXT    NOT NULL,
    connection_config   TEXT    NOT NULL DEFAULT '{}',
    scopes              TEXT    NOT NULL DEFAULT '[]',
    api_redirect_url    TEXT,
    ws_client_id        TEXT,
    secrets_key_id      TEXT,
    secrets             BLOB,
    created_at          INTEGER NOT NULL,
    expires_at          INTEGER NOT NULL,
    CHECK ((secrets_key_id IS NULL) = (secrets IS NULL)),
    CHECK (expires_at > created_at)
);

CREATE INDEX oauth_sessions_by_expiry ON oauth_sessions (expires_at);
