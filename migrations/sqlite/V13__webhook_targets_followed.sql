-- When an instance that delivers webhooks last leased each target, or when it was registered
-- (microseconds since the UNIX epoch): a target followed within the last days holds the
-- compactor back at its checkpoint. Existing targets start from their last lease or checkpoint
-- move.
ALTER TABLE webhook_targets ADD COLUMN followed_at INTEGER NOT NULL DEFAULT 0;
UPDATE webhook_targets SET followed_at = MAX(COALESCE(lease_expires_at, 0), updated_at);
