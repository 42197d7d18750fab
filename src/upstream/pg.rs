//! The PostgreSQL sink: the schema of architecture-v1.md's "Database Schema
//! Requirements" (without the Supabase-only references to sites, users…),
//! and idempotent upserts keyed by natural keys, so a replayed outbox item
//! updates its row instead of adding one.

use super::UpstreamError;
use crate::store::{AlertRecord, CaptureRecord, DeviceRecord, SessionRecord, TelemetryRecord};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use tracing::{info, warn};

/// Created by `barngate upstream init-schema` (and by the forwarder on first
/// connect); every statement is `IF NOT EXISTS`, so running it again is harmless.
/// Numbers from devices are `double precision`: a wild sensor value must not
/// make a row undeliverable (a `NUMERIC(5,2)` overflow would block the queue).
pub const SCHEMA: &str = r#"
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
"#;

const ENSURE_DEVICE: &str =
    "INSERT INTO devices (device_mac, site_id) VALUES ($1, $2) ON CONFLICT (device_mac) DO NOTHING";

const UPSERT_DEVICE: &str =
    "INSERT INTO devices (device_mac, device_name, site_id, location, dialect,
  firmware_version, hardware_version, is_active, status, last_seen_at, next_wake_at,
  battery_voltage, mqtt_client_id, cert_serial, provisioned_at, metadata, updated_at)
VALUES ($1, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, now())
ON CONFLICT (device_mac) DO UPDATE SET site_id = EXCLUDED.site_id, location = EXCLUDED.location,
  dialect = EXCLUDED.dialect, firmware_version = EXCLUDED.firmware_version,
  hardware_version = EXCLUDED.hardware_version, is_active = EXCLUDED.is_active,
  status = EXCLUDED.status, last_seen_at = EXCLUDED.last_seen_at,
  next_wake_at = EXCLUDED.next_wake_at, battery_voltage = EXCLUDED.battery_voltage,
  mqtt_client_id = EXCLUDED.mqtt_client_id, cert_serial = EXCLUDED.cert_serial,
  provisioned_at = EXCLUDED.provisioned_at, metadata = EXCLUDED.metadata, updated_at = now()";

const UPSERT_TELEMETRY: &str = "INSERT INTO device_telemetry (device_id, device_mac, site_id,
  captured_at, received_at, temperature, humidity, pressure, gas_resistance, battery_voltage, error_code)
VALUES ((SELECT device_id FROM devices WHERE device_mac = $1), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (device_mac, captured_at) DO UPDATE SET received_at = EXCLUDED.received_at,
  temperature = EXCLUDED.temperature, humidity = EXCLUDED.humidity, pressure = EXCLUDED.pressure,
  gas_resistance = EXCLUDED.gas_resistance, battery_voltage = EXCLUDED.battery_voltage,
  error_code = EXCLUDED.error_code";

const UPSERT_IMAGE: &str = "INSERT INTO device_images (device_id, device_mac, site_id, image_name,
  image_version, image_url, object_key, image_size, sha256, captured_at, received_at, total_chunks,
  received_chunks, status, error_code, retry_count, origin, metadata, updated_at)
VALUES ((SELECT device_id FROM devices WHERE device_mac = $1), $1, $2, $3, $4, $5, $6, $7, $8, $9,
  $10, $11, $12, 'complete', $13, $14, $15, $16, now())
ON CONFLICT (device_mac, image_name, image_version) DO UPDATE SET image_url = EXCLUDED.image_url,
  object_key = EXCLUDED.object_key, image_size = EXCLUDED.image_size, sha256 = EXCLUDED.sha256,
  captured_at = EXCLUDED.captured_at, received_at = EXCLUDED.received_at,
  total_chunks = EXCLUDED.total_chunks, received_chunks = EXCLUDED.received_chunks,
  status = EXCLUDED.status, error_code = EXCLUDED.error_code, retry_count = EXCLUDED.retry_count,
  origin = EXCLUDED.origin, metadata = EXCLUDED.metadata, updated_at = now()";

const UPSERT_ALERT: &str = "INSERT INTO device_alerts (device_id, device_mac, site_id,
  gateway_alert_id, alert_type, severity, message, metadata, triggered_at, resolved_at)
VALUES ((SELECT device_id FROM devices WHERE device_mac = $1), $1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (site_id, gateway_alert_id) DO UPDATE SET severity = EXCLUDED.severity,
  message = EXCLUDED.message, metadata = EXCLUDED.metadata, resolved_at = EXCLUDED.resolved_at";

const UPSERT_SESSION: &str = "INSERT INTO device_wake_sessions (device_id, device_mac, site_id,
  woke_at, pending_reported, next_wake_assigned, capture_requested, images_completed,
  images_failed, updated_at)
VALUES ((SELECT device_id FROM devices WHERE device_mac = $1), $1, $2, $3, $4, $5, $6, $7, $8, now())
ON CONFLICT (device_mac, woke_at) DO UPDATE SET pending_reported = EXCLUDED.pending_reported,
  next_wake_assigned = EXCLUDED.next_wake_assigned, capture_requested = EXCLUDED.capture_requested,
  images_completed = EXCLUDED.images_completed, images_failed = EXCLUDED.images_failed,
  updated_at = now()";

/// A confirmed object for an image row.
#[derive(Debug, Clone)]
pub struct ImageObject {
    pub key: String,
    pub url: String,
}

/// One row to write, already loaded from the store.
#[derive(Debug, Clone)]
pub enum Row {
    Device(DeviceRecord),
    Telemetry(TelemetryRecord),
    Session(SessionRecord),
    Alert(AlertRecord),
    Image(Box<CaptureRecord>, ImageObject),
}

impl Row {
    fn mac(&self) -> &str {
        match self {
            Row::Device(d) => &d.mac,
            Row::Telemetry(t) => &t.mac,
            Row::Session(s) => &s.mac,
            Row::Alert(a) => &a.mac,
            Row::Image(c, _) => &c.mac,
        }
    }
}

type Params = Vec<Box<dyn ToSql + Sync + Send>>;

fn b<T: ToSql + Sync + Send + 'static>(v: T) -> Box<dyn ToSql + Sync + Send> {
    Box::new(v)
}

fn i32_of(v: impl TryInto<i32>) -> i32 {
    v.try_into().unwrap_or(i32::MAX)
}

pub(super) fn pg_error(e: &tokio_postgres::Error) -> UpstreamError {
    use tokio_postgres::error::SqlState;
    match e.as_db_error() {
        Some(d) => {
            let msg = format!("{} ({})", d.message(), d.code().code());
            if *d.code() == SqlState::INVALID_PASSWORD
                || *d.code() == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            {
                UpstreamError::PostgresAuth(msg)
            } else {
                UpstreamError::Postgres(msg)
            }
        }
        None => {
            let mut msg = e.to_string();
            if let Some(s) = std::error::Error::source(e) {
                msg = format!("{msg}: {s}");
            }
            UpstreamError::Postgres(msg)
        }
    }
}

/// Opens a connection: TLS (rustls, ring, webpki roots) unless the URL says
/// `sslmode=disable`. The connection task ends when the client is dropped.
pub async fn connect(url: &str) -> Result<Client, UpstreamError> {
    let mut cfg: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
        UpstreamError::Config(format!(
            "upstream.postgres_url is not a valid connection string: {e}"
        ))
    })?;
    // A silent network must not hang the forwarder.
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(std::time::Duration::from_secs(30));
    }
    if cfg.get_ssl_mode() == SslMode::Disable {
        let (client, conn) = cfg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| pg_error(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                warn!(error = %e, "upstream PostgreSQL connection closed");
            }
        });
        return Ok(client);
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| UpstreamError::Config(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let (client, conn) = cfg
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
        .await
        .map_err(|e| pg_error(&e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            warn!(error = %e, "upstream PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// Creates the tables if absent.
pub async fn init_schema(client: &Client) -> Result<(), UpstreamError> {
    client
        .batch_execute(SCHEMA)
        .await
        .map_err(|e| pg_error(&e))?;
    info!("upstream schema ready");
    Ok(())
}

/// A connection with its prepared statements.
pub struct PgSink {
    client: Client,
    ensure_device: Statement,
    device: Statement,
    telemetry: Statement,
    image: Statement,
    alert: Statement,
    session: Statement,
}

impl PgSink {
    pub async fn connect(url: &str) -> Result<PgSink, UpstreamError> {
        let client = connect(url).await?;
        init_schema(&client).await?;
        let p = |sql: &'static str| {
            let c = &client;
            async move { c.prepare(sql).await.map_err(|e| pg_error(&e)) }
        };
        Ok(PgSink {
            ensure_device: p(ENSURE_DEVICE).await?,
            device: p(UPSERT_DEVICE).await?,
            telemetry: p(UPSERT_TELEMETRY).await?,
            image: p(UPSERT_IMAGE).await?,
            alert: p(UPSERT_ALERT).await?,
            session: p(UPSERT_SESSION).await?,
            client,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    fn params(&self, row: &Row, site: &str) -> (Statement, Params) {
        let site = site.to_string();
        match row {
            Row::Device(d) => (
                self.device.clone(),
                vec![
                    b(d.mac.clone()),
                    b(d.site.clone().unwrap_or(site)),
                    b(d.location.clone()),
                    b(d.dialect.to_string()),
                    b(d.firmware_version.clone()),
                    b(d.hardware_version.clone()),
                    b(d.status == "active"),
                    b(d.status.clone()),
                    b(d.last_seen),
                    b(d.next_wake),
                    b(d.battery),
                    b(d.wire_id.clone()),
                    b(d.cert_serial.clone()),
                    b(d.registered_at),
                    b(serde_json::to_value(d).unwrap_or_default()),
                ],
            ),
            Row::Telemetry(t) => (
                self.telemetry.clone(),
                vec![
                    b(t.mac.clone()),
                    b(site),
                    b(t.captured_at),
                    b(t.received_at),
                    b(t.temperature),
                    b(t.humidity),
                    b(t.pressure),
                    b(t.gas_resistance),
                    b(t.battery),
                    b(t.error),
                ],
            ),
            Row::Session(s) => (
                self.session.clone(),
                vec![
                    b(s.mac.clone()),
                    b(site),
                    b(s.woke_at),
                    b(i32_of(s.pending_reported)),
                    b(s.next_wake_assigned),
                    b(s.capture_requested),
                    b(i32_of(s.images_completed)),
                    b(i32_of(s.images_failed)),
                ],
            ),
            Row::Alert(a) => (
                self.alert.clone(),
                vec![
                    b((!a.mac.is_empty()).then(|| a.mac.clone())),
                    b(site),
                    b(a.id as i64),
                    b(a.kind.clone()),
                    b(a.severity.clone()),
                    b(a.message.clone()),
                    b(serde_json::to_value(a).unwrap_or_default()),
                    b(a.triggered_at),
                    b(a.resolved_at),
                ],
            ),
            Row::Image(c, obj) => {
                // The METADATA as received, kept whole; else the parsed fields.
                let metadata = c
                    .raw_metadata
                    .as_deref()
                    .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok())
                    .or_else(|| {
                        c.metadata
                            .as_ref()
                            .and_then(|m| serde_json::to_value(m).ok())
                    });
                let captured: DateTime<Utc> = c.device_time.unwrap_or(c.first_seen_at);
                (
                    self.image.clone(),
                    vec![
                        b(c.mac.clone()),
                        b(site),
                        b(c.image_name.clone()),
                        b(i32_of(c.version)),
                        b(obj.url.clone()),
                        b(obj.key.clone()),
                        b(c.image_size().map(i32_of)),
                        b(c.sha256.clone()),
                        b(captured),
                        b(c.assembled_at.unwrap_or(c.first_seen_at)),
                        b(c.total_chunks().map(i32_of)),
                        b(i32_of(c.chunks_received)),
                        b(i32_of(c.metadata.as_ref().map(|m| m.error).unwrap_or(0))),
                        b(i32_of(c.retries)),
                        b(match c.origin {
                            crate::store::Origin::Current => "current",
                            crate::store::Origin::Recovery => "recovery",
                        }),
                        b(metadata),
                    ],
                )
            }
        }
    }

    /// Writes the rows in one transaction, in order, pipelined.
    pub async fn write(&mut self, rows: &[Row], site: &str) -> Result<(), UpstreamError> {
        // Child rows reference their device; make sure it exists even when
        // its registry item comes later in the outbox.
        let mut macs: Vec<String> = rows
            .iter()
            .map(|r| r.mac().to_string())
            .filter(|m| !m.is_empty())
            .collect();
        macs.sort();
        macs.dedup();
        let site_s = site.to_string();
        let ensure: Vec<Params> = macs
            .iter()
            .map(|m| vec![b(m.clone()), b(site_s.clone())])
            .collect();
        let mut statements = Vec::with_capacity(rows.len());
        for r in rows {
            statements.push(self.params(r, site));
        }
        let ensure_stmt = self.ensure_device.clone();
        let tx = self.client.transaction().await.map_err(|e| pg_error(&e))?;
        {
            let mut futs = Vec::with_capacity(ensure.len() + statements.len());
            for p in &ensure {
                let refs: Vec<&(dyn ToSql + Sync)> = p
                    .iter()
                    .map(|v| v.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                futs.push(tx.execute_raw(&ensure_stmt, refs));
            }
            for (stmt, p) in &statements {
                let refs: Vec<&(dyn ToSql + Sync)> = p
                    .iter()
                    .map(|v| v.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                futs.push(tx.execute_raw(stmt, refs));
            }
            futures_util::future::try_join_all(futs)
                .await
                .map_err(|e| pg_error(&e))?;
        }
        tx.commit().await.map_err(|e| pg_error(&e))?;
        Ok(())
    }
}
