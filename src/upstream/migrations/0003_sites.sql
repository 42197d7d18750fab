-- Many sites, one cloud. Every row carries its gateway's site id, and every
-- key built from a gateway's own counters or names (capture ids, alert ids,
-- wake sessions, image names and versions) is unique per site only, so two
-- gateways syncing into one database never collide or overwrite each other.
-- A device (its MAC) is one row across sites: `site_id` there is the site
-- that reported it last.
UPDATE devices SET site_id = 'unknown' WHERE site_id IS NULL;
UPDATE device_telemetry SET site_id = 'unknown' WHERE site_id IS NULL;
UPDATE device_images SET site_id = 'unknown' WHERE site_id IS NULL;
UPDATE device_wake_sessions SET site_id = 'unknown' WHERE site_id IS NULL;
ALTER TABLE devices ALTER COLUMN site_id SET NOT NULL;
ALTER TABLE device_telemetry ALTER COLUMN site_id SET NOT NULL;
ALTER TABLE device_images ALTER COLUMN site_id SET NOT NULL;
ALTER TABLE device_wake_sessions ALTER COLUMN site_id SET NOT NULL;

-- Image versions are counted per gateway: the same MAC and name at another
-- site (a device moved) is another image.
ALTER TABLE device_images DROP CONSTRAINT device_images_device_mac_image_name_image_version_key;
ALTER TABLE device_images
  ADD CONSTRAINT device_images_site_image_key UNIQUE (site_id, device_mac, image_name, image_version),
  ADD CONSTRAINT device_images_site_capture_key UNIQUE (site_id, gateway_capture_id);
CREATE INDEX idx_device_images_site ON device_images(site_id, captured_at);
CREATE INDEX idx_device_telemetry_site ON device_telemetry(site_id, captured_at);
CREATE INDEX idx_device_wake_sessions_site ON device_wake_sessions(site_id, woke_at);
CREATE INDEX idx_device_alerts_site ON device_alerts(site_id, triggered_at);

-- Capture outcomes per site: a capture is counted once, as it stands now
-- (a failed one that later completed counts as complete; `ever_failed`
-- counts those too).
CREATE VIEW site_success_rate AS
SELECT site_id,
       count(*) AS captures,
       count(*) FILTER (WHERE status = 'complete') AS complete,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE failures > 0) AS ever_failed,
       round(100.0 * count(*) FILTER (WHERE status = 'complete')
             / NULLIF(count(*) FILTER (WHERE status IN ('complete', 'failed')), 0), 2)
         AS success_rate_percent,
       round(avg(retry_count), 2) AS avg_retry_rounds
FROM device_images
GROUP BY site_id;
