-- OAuth flow sessions (DESIGN §5): one row per flow between /oauth/connect and /oauth/callback.
-- The row's key is the `state` sent to the provider. A callback deletes the row and reads it in
-- one statement (DELETE … RETURNING), so a state is single-use even under concurrent callbacks.
-- Expired rows are refused at the callback and swept by a background task. The flow's secrets
-- (the PKCE verifier, later an OAuth 1.0a request-token secret) are stored only sealed: a JSON
-- object encrypted under the data key `secrets_key_id`, like credentials in events.

CREATE TABLE oauth_sessions (
    state               text        PRIMARY KEY,
    provider_config_key text        NOT NULL,
    provider            text        NOT NULL,
    connection_id       text        NOT NULL,
    callback_url        text        NOT NULL,
    connection_config   jsonb       NOT NULL DEFAULT '{}',
    scopes              jsonb       NOT NULL DEFAULT '[]',
    api_redirect_url    text,
    ws_client_id        text,
    secrets_key_id      uuid,
    secrets             bytea,
    created_at          timestamptz NOT NULL,
    expires_at          timestamptz NOT NULL,
    CHECK ((secrets_key_id IS NULL) = (secrets IS NULL)),
    CHECK (expires_at > created_at)
);

CREATE INDEX oauth_sessions_by_expiry ON oauth_sessions (expires_at);
