-- Rows that say exactly what happened.
--
-- Battery: devices report a charge in percent (`battery`) and, some firmware,
-- a voltage (`battery_voltage`). Gateways before this migration wrote the
-- percent into battery_voltage; it moves to battery_percent here.
ALTER TABLE devices ADD COLUMN battery_percent DOUBLE PRECISION;
UPDATE devices SET battery_percent = battery_voltage, battery_voltage = NULL
  WHERE battery_voltage IS NOT NULL;

-- Telemetry: one row per capture (the gateway's capture id), no longer one
-- per (device, device time), so two captures stamped with the same time keep
-- two rows. The device clock and the gateway clock are kept apart:
-- captured_at_device is the time the device reported (NULL when it sent none
-- that parses), device_time_valid says whether it was believable (not
-- before 2020, not more than a day ahead of the gateway), and captured_at is
-- the device time when valid, else the gateway's time of receipt.
-- Rows from before this migration keep NULL in the new columns.
ALTER TABLE device_telemetry
  ADD COLUMN battery_percent DOUBLE PRECISION,
  ADD COLUMN gateway_capture_id BIGINT,
  ADD COLUMN image_name TEXT,
  ADD COLUMN image_version INTEGER,
  ADD COLUMN captured_at_device TIMESTAMPTZ,
  ADD COLUMN device_time_valid BOOLEAN;
UPDATE device_telemetry SET battery_percent = battery_voltage, battery_voltage = NULL
  WHERE battery_voltage IS NOT NULL;
ALTER TABLE device_telemetry DROP CONSTRAINT device_telemetry_device_mac_captured_at_key;
ALTER TABLE device_telemetry
  ADD CONSTRAINT device_telemetry_site_capture_key UNIQUE (site_id, gateway_capture_id);

-- Images: failed captures arrive too (status 'failed'), with their rounds of
-- missing-chunk requests (retry_count), the times they ended failed
-- (failures), the chunks still missing and the reason. The clocks as for
-- telemetry; first_seen_at is the gateway's first message about the
-- capture, received_at when the gateway had the whole image (NULL if never).
ALTER TABLE device_images
  ADD COLUMN gateway_capture_id BIGINT,
  ADD COLUMN captured_at_device TIMESTAMPTZ,
  ADD COLUMN device_time_valid BOOLEAN,
  ADD COLUMN first_seen_at TIMESTAMPTZ,
  ADD COLUMN failures INTEGER DEFAULT 0,
  ADD COLUMN missing_chunks INTEGER,
  ADD COLUMN failed_reason TEXT;

-- Wake sessions: an id of their own, `{device_mac}-{woke_at in epoch ms}`
-- (the gateway's key for the session), and what the wake reached: a session
-- the gateway records began with a HELLO over MQTT, so Wi-Fi and MQTT both
-- worked (a wake that failed earlier is seen as a `missed_wake` alert).
ALTER TABLE device_wake_sessions
  ADD COLUMN gateway_session_id TEXT,
  ADD COLUMN wifi_ok BOOLEAN,
  ADD COLUMN mqtt_ok BOOLEAN;
UPDATE device_wake_sessions
  SET gateway_session_id = device_mac || '-' || (extract(epoch FROM woke_at) * 1000)::bigint,
      wifi_ok = true, mqtt_ok = true;
ALTER TABLE device_wake_sessions DROP CONSTRAINT device_wake_sessions_device_mac_woke_at_key;
ALTER TABLE device_wake_sessions
  ADD CONSTRAINT device_wake_sessions_site_session_key UNIQUE (site_id, gateway_session_id);
UPDATE devices d SET last_wake_at = s.woke_at
  FROM (SELECT device_mac, max(woke_at) AS woke_at FROM device_wake_sessions GROUP BY device_mac) s
  WHERE s.device_mac = d.device_mac AND (d.last_wake_at IS NULL OR d.last_wake_at < s.woke_at);
