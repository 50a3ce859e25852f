-- When an instance last registered or leased each webhook target (microseconds since the UNIX
-- epoch): a target followed within the last days holds the compactor back at its checkpoint.
ALTER TABLE webhook_targets ADD COLUMN followed_at INTEGER NOT NULL DEFAULT 0;
UPDATE webhook_targets SET followed_at = updated_at;
