-- Dashboard sessions signed out (domain::sign_out): every instance refuses their cookies. A row
-- lives until the session would have expired anyway (micros since the epoch); the sessions
-- sweeper deletes it then.
CREATE TABLE dashboard_sign_outs (
    session_id TEXT    PRIMARY KEY,
    expires_at INTEGER NOT NULL
);

CREATE INDEX dashboard_sign_outs_by_expiry ON dashboard_sign_outs (expires_at);
