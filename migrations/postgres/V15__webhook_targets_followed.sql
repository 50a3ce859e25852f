-- When an instance that delivers webhooks last leased each target (or when it was registered).
-- A target followed within the last days holds the compactor back at its checkpoint, so that a
-- target that is behind (its receiver down) still receives every webhook once it is back; a
-- target no instance delivers any more (removed from GRANTLINE_WEBHOOK_URLS) stops holding it
-- back after a while. Existing targets start from their last lease or checkpoint move.
ALTER TABLE webhook_targets ADD COLUMN followed_at timestamptz NOT NULL DEFAULT now();
UPDATE webhook_targets SET followed_at = GREATEST(lease_expires_at, updated_at);
