-- When an instance last registered or leased each webhook target. A target followed within the
-- last days holds the compactor back at its checkpoint, so that a target that is behind (its
-- receiver down) still receives every webhook once it is back; a target no instance follows any
-- more (removed from GRANTLINE_WEBHOOK_URLS) stops holding it back after a while.
ALTER TABLE webhook_targets ADD COLUMN followed_at timestamptz NOT NULL DEFAULT now();
