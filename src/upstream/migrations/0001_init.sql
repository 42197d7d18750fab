-- The schema `upstream init-schema` created before versioned migrations:
-- every statement IF NOT EXISTS, so it also adopts a cloud created by it.
CREATE TABLE IF NOT EXISTS devices (
  device_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  device_mac TEXT UNIQUE NOT NULL,
  device_name TEXT,
  site_id TEXT,
  location TEXT,
  dialect TEXT,
  firmware_version TEXT,
  hardware_version TEXT,
  is_active BOOLEAN DEFAULT true,
  status TEXT,
  last_seen_at TIMESTAMPTZ,
  last_wake_at TIMESTAMPTZ,
  next_wake_at TIMESTAMPTZ,
  wake_schedule_cron TEXT,
  battery_voltage DOUBLE PRECISION,
  battery_health_percent INTEGER,
  mqtt_client_id TEXT,
  cert_serial TEXT,
  provisioned_at TIMESTAMPTZ,
  notes TEXT,
  metadata JSONB,
  created_at TIMESTAMPTZ DEFAULT now(),
  updated_at TIMESTAMPTZ DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_devices_site ON devices(site_id);
CREATE INDEX IF NOT EXISTS idx_devices_last_seen ON devices(last_seen_at);
CREATE INDEX IF NOT EXISTS idx_devices_next_wake ON devices(next_wake_at);

CREATE TABLE IF NOT EXISTS device_telemetry (
  telemetry_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  device_id UUID REFERENCES devices(device_id) ON DELETE CASCADE,
  device_mac TEXT NOT NULL REFERENCES devices(device_mac) ON DELETE CASCADE,
  site_id TEXT,
  captured_at TIMESTAMPTZ NOT NULL,
  received_at TIMESTAMPTZ,
  temperature DOUBLE PRECISION,
  humidity DOUBLE PRECISION,
  pressure DOUBLE PRECISION,
  gas_resistance DOUBLE PRECISION,
  battery_voltage DOUBLE PRECISION,
  wifi_rssi INTEGER,
  error_code BIGINT DEFAULT 0,
  created_at TIMESTAMPTZ DEFAULT now(),
  UNIQUE (device_mac, captured_at)
);
CREATE INDEX IF NOT EXISTS idx_device_telemetry_device ON device_telemetry(device_id);
CREATE INDEX IF NOT EXISTS idx_device_telemetry_captured ON device_telemetry(captured_at);

CREATE TABLE IF NOT EXISTS device_images (
  image_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  device_id UUID REFERENCES devices(device_id),
  device_mac TEXT NOT NULL REFERENCES devices(device_mac),
  site_id TEXT,
  image_name TEXT NOT NULL,
  image_version INTEGER NOT NULL DEFAULT 1,
  image_url TEXT,
  object_key TEXT,
  image_size INTEGER,
  sha256 TEXT,
  captured_at TIMESTAMPTZ NOT NULL,
  received_at TIMESTAMPTZ,
  total_chunks INTEGER,
  received_chunks INTEGER,
  status TEXT DEFAULT 'pending',
  error_code INTEGER DEFAULT 0,
  retry_count INTEGER DEFAULT 0,
  origin TEXT,
  observation_id UUID,
  observation_type TEXT,
  metadata JSONB,
  created_at TIMESTAMPTZ DEFAULT now(),
  updated_at TIMESTAMPTZ DEFAULT now(),
  UNIQUE (device_mac, image_name, image_version)
);
CREATE INDEX IF NOT EXISTS idx_device_images_device ON device_images(device_id);
CREATE INDEX IF NOT EXISTS idx_device_images_status ON device_images(status);
CREATE INDEX IF NOT EXISTS idx_device_images_captured ON device_images(captured_at);

CREATE TABLE IF NOT EXISTS device_alerts (
  alert_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  device_id UUID REFERENCES devices(device_id),
  device_mac TEXT REFERENCES devices(device_mac),
  site_id TEXT NOT NULL,
  gateway_alert_id BIGINT NOT NULL,
  alert_type TEXT NOT NULL,
  severity TEXT DEFAULT 'warning',
  message TEXT NOT NULL,
  metadata JSONB,
  triggered_at TIMESTAMPTZ DEFAULT now(),
  resolved_at TIMESTAMPTZ,
  resolution_notes TEXT,
  notification_sent BOOLEAN DEFAULT false,
  UNIQUE (site_id, gateway_alert_id)
);
CREATE INDEX IF NOT EXISTS idx_device_alerts_device ON device_alerts(device_id);
CREATE INDEX IF NOT EXISTS idx_device_alerts_triggered ON device_alerts(triggered_at);
CREATE INDEX IF NOT EXISTS idx_device_alerts_resolved ON device_alerts(resolved_at);

CREATE TABLE IF NOT EXISTS device_wake_sessions (
  session_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  device_id UUID REFERENCES devices(device_id),
  device_mac TEXT NOT NULL REFERENCES devices(device_mac),
  site_id TEXT,
  woke_at TIMESTAMPTZ NOT NULL,
  pending_reported INTEGER,
  next_wake_assigned TIMESTAMPTZ,
  capture_requested BOOLEAN,
  images_completed INTEGER,
  images_failed INTEGER,
  created_at TIMESTAMPTZ DEFAULT now(),
  updated_at TIMESTAMPTZ DEFAULT now(),
  UNIQUE (device_mac, woke_at)
);
CREATE INDEX IF NOT EXISTS idx_device_wake_sessions_device ON device_wake_sessions(device_id);
