//! The PostgreSQL sink: the schema of architecture-v1.md's "Database Schema
//! Requirements" (without the Supabase-only references to sites, users…) as
//! versioned migrations, and idempotent upserts keyed per site (the
//! gateway's site id with its own ids and names), so a replayed outbox item
//! updates its row instead of adding one and two sites never collide.

use super::UpstreamError;
use crate::config::UpstreamConfig;
use crate::store::{AlertRecord, CaptureRecord, DeviceRecord, SessionRecord, TelemetryRecord};
use chrono::{DateTime, Utc};
use std::path::Path;
use std::sync::Arc;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use tracing::{info, warn};

/// One forward-only step of the cloud schema.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The cloud schema, as numbered SQL files applied in order, each in its own
/// transaction, recorded in `barngate_schema_migrations`. Never edit an
/// applied file: add the next one. Numbers from devices are `double
/// precision`: a wild sensor value must not make a row undeliverable (a
/// `NUMERIC(5,2)` overflow would block the queue).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "rows",
        sql: include_str!("migrations/0002_rows.sql"),
    },
    Migration {
        version: 3,
        name: "sites",
        sql: include_str!("migrations/0003_sites.sql"),
    },
];

/// The newest cloud schema this build knows.
pub fn schema_version() -> i32 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

const ENSURE_DEVICE: &str =
    "INSERT INTO devices (device_mac, site_id) VALUES ($1, $2) ON CONFLICT (device_mac) DO NOTHING";

const UPSERT_DEVICE: &str =
    "INSERT INTO devices (device_mac, device_name, site_id, location, dialect,
  firmware_version, hardware_version, is_active, status, last_seen_at, next_wake_at,
  battery_percent, battery_voltage, mqtt_client_id, cert_serial, provisioned_at, metadata,
  updated_at)
VALUES ($1, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, now())
ON CONFLICT (device_mac) DO UPDATE SET site_id = EXCLUDED.site_id, location = EXCLUDED.location,
  dialect = EXCLUDED.dialect, firmware_version = EXCLUDED.firmware_version,
  hardware_version = EXCLUDED.hardware_version, is_active = EXCLUDED.is_active,
  status = EXCLUDED.status, last_seen_at = EXCLUDED.last_seen_at,
  next_wake_at = EXCLUDED.next_wake_at, battery_percent = EXCLUDED.battery_percent,
  battery_voltage = EXCLUDED.battery_voltage,
  mqtt_client_id = EXCLUDED.mqtt_client_id, cert_serial = EXCLUDED.cert_serial,
  provisioned_at = EXCLUDED.provisioned_at, metadata = EXCLUDED.metadata, updated_at = now()";

const UPSERT_TELEMETRY: &str = "INSERT INTO device_telemetry (device_id, device_mac, site_id,
  gateway_capture_id, image_name, image_version, captured_at, captured_at_device,
  device_time_valid, received_at, temperature, humidity, pressure, gas_resistance,
  battery_percent, battery_voltage, wifi_rssi, error_code)
VALUES ((SELECT device_id FROM devices WHERE device_mac = $1), $1, $2, $3, $4, $5, $6, $7, $8,
  $9, $10, $11, $12, $13, $14, $15, $16, $17)
ON CONFLICT (site_id, gateway_capture_id) DO UPDATE SET image_name = EXCLUDED.image_name,
  image_version = EXCLUDED.image_version, captured_at = EXCLUDED.captured_at,
  captured_at_device = EXCLUDED.captured_at_device,
  device_time_valid = EXCLUDED.device_time_valid, received_at = EXCLUDED.received_at,
  temperature = EXCLUDED.temperature, humidity = EXCLUDED.humidity, pressure = EXCLUDED.pressure,
  gas_resistance = EXCLUDED.gas_resistance, battery_percent = EXCLUDED.battery_percent,
  battery_voltage = EXCLUDED.battery_voltage, wifi_rssi = EXCLUDED.wifi_rssi,
  error_code = EXCLUDED.error_code";

/// A row without an object (a failed capture) keeps any object already there.
const UPSERT_IMAGE: &str = "INSERT INTO device_images (device_id, device_mac, site_id, image_name,
  image_version, image_url, object_key, image_size, sha256, captured_at, received_at, total_chunks,
  received_chunks, status, error_code, retry_count, origin, metadata, gateway_capture_id,
  captured_at_device, device_time_valid, first_seen_at, failures, missing_chunks, failed_reason,
  updated_at)
VALUES ((SELECT device_id FROM devices WHERE device_mac = $1), $1, $2, $3, $4, $5, $6, $7, $8, $9,
  $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, now())
ON CONFLICT (site_id, device_mac, image_name, image_version) DO UPDATE SET
  image_url = COALESCE(EXCLUDED.image_url, device_images.image_url),
  object_key = COALESCE(EXCLUDED.object_key, device_images.object_key),
  image_size = EXCLUDED.image_size, sha256 = EXCLUDED.sha256,
  captured_at = EXCLUDED.captured_at, received_at = EXCLUDED.received_at,
  total_chunks = EXCLUDED.total_chunks, received_chunks = EXCLUDED.received_chunks,
  status = EXCLUDED.status, error_code = EXCLUDED.error_code, retry_count = EXCLUDED.retry_count,
  origin = EXCLUDED.origin, metadata = EXCLUDED.metadata,
  gateway_capture_id = EXCLUDED.gateway_capture_id,
  captured_at_device = EXCLUDED.captured_at_device,
  device_time_valid = EXCLUDED.device_time_valid, first_seen_at = EXCLUDED.first_seen_at,
  failures = EXCLUDED.failures, missing_chunks = EXCLUDED.missing_chunks,
  failed_reason = EXCLUDED.failed_reason, updated_at = now()";

const UPSERT_ALERT: &str = "INSERT INTO device_alerts (device_id, device_mac, site_id,
  gateway_alert_id, alert_type, severity, message, metadata, triggered_at, resolved_at)
VALUES ((SELECT device_id FROM devices WHERE device_mac = $1), $1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (site_id, gateway_alert_id) DO UPDATE SET severity = EXCLUDED.severity,
  message = EXCLUDED.message, metadata = EXCLUDED.metadata, resolved_at = EXCLUDED.resolved_at";

/// The session, and the device's `last_wake_at` (never moved backwards).
const UPSERT_SESSION: &str = "WITH s AS (
INSERT INTO device_wake_sessions (device_id, device_mac, site_id, gateway_session_id,
  woke_at, pending_reported, next_wake_assigned, capture_requested, images_completed,
  images_failed, wifi_ok, mqtt_ok, updated_at)
VALUES ((SELECT device_id FROM devices WHERE device_mac = $1), $1, $2, $3, $4, $5, $6, $7, $8,
  $9, true, true, now())
ON CONFLICT (site_id, gateway_session_id) DO UPDATE SET pending_reported = EXCLUDED.pending_reported,
  next_wake_assigned = EXCLUDED.next_wake_assigned, capture_requested = EXCLUDED.capture_requested,
  images_completed = EXCLUDED.images_completed, images_failed = EXCLUDED.images_failed,
  updated_at = now()
RETURNING device_mac, woke_at)
UPDATE devices SET last_wake_at = s.woke_at FROM s
WHERE devices.device_mac = s.device_mac
  AND (devices.last_wake_at IS NULL OR devices.last_wake_at < s.woke_at)";

/// The wake session's id upstream: the gateway's key for it.
pub fn session_id(s: &SessionRecord) -> String {
    format!("{}-{}", s.mac, s.woke_at.timestamp_millis())
}

/// Whether a device-reported time is believable: not before 2020 (a clock
/// never set starts at 1970) and not more than a day ahead of the gateway.
pub fn device_time_valid(t: Option<DateTime<Utc>>, gateway: DateTime<Utc>) -> bool {
    let floor = DateTime::<Utc>::from_timestamp(1_577_836_800, 0).unwrap_or_default();
    t.is_some_and(|t| t >= floor && t <= gateway + chrono::Duration::days(1))
}

/// The METADATA as received, when it parses as a JSON object.
fn raw_json(c: &CaptureRecord) -> Option<serde_json::Value> {
    c.raw_metadata
        .as_deref()
        .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok())
}

/// Optional METADATA extras some firmware sends: the battery voltage and
/// the Wi-Fi signal (`wifi_rssi`, or `rssi`).
fn extras(raw: Option<&serde_json::Value>) -> (Option<f64>, Option<i32>) {
    let Some(v) = raw else {
        return (None, None);
    };
    let volt = v.get("battery_voltage").and_then(|x| x.as_f64());
    let rssi = v
        .get("wifi_rssi")
        .or_else(|| v.get("rssi"))
        .and_then(|x| x.as_i64())
        .and_then(|x| i32::try_from(x).ok());
    (volt, rssi)
}

/// A capture's readings, with the capture they came with (for its name,
/// version and device clock; `None` if it is no longer stored).
#[derive(Debug, Clone)]
pub struct TelemetryRow {
    pub t: TelemetryRecord,
    pub capture: Option<Box<CaptureRecord>>,
}

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
    Telemetry(TelemetryRow),
    Session(SessionRecord),
    Alert(AlertRecord),
    /// A complete image with its object, or a failed capture (no object).
    Image(Box<CaptureRecord>, Option<ImageObject>),
}

impl Row {
    fn mac(&self) -> &str {
        match self {
            Row::Device(d) => &d.mac,
            Row::Telemetry(t) => &t.t.mac,
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

/// Opens a connection to `upstream.postgres_url`. TLS per
/// `upstream.pg_sslmode` (else the URL's `sslmode`; `prefer` when it has
/// none): rustls with the webpki roots plus the CAs in `upstream.pg_ca`,
/// always verifying the certificate and host name. The connection task ends
/// when the client is dropped.
pub async fn connect(up: &UpstreamConfig) -> Result<Client, UpstreamError> {
    let mut cfg: tokio_postgres::Config =
        up.postgres_url
            .parse()
            .map_err(|e: tokio_postgres::Error| {
                UpstreamError::Config(format!(
                    "upstream.postgres_url is not a valid connection string: {e}"
                ))
            })?;
    match up.pg_sslmode.as_str() {
        "disable" => {
            cfg.ssl_mode(SslMode::Disable);
        }
        "require" | "verify-full" => {
            cfg.ssl_mode(SslMode::Require);
        }
        _ => {}
    }
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
    if !up.pg_ca.is_empty() {
        let certs = crate::pki::read_ca_file(Path::new(&up.pg_ca))
            .map_err(|e| UpstreamError::Config(format!("upstream.pg_ca: {e}")))?;
        for c in certs {
            roots
                .add(c)
                .map_err(|e| UpstreamError::Config(format!("upstream.pg_ca: {e}")))?;
        }
    }
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

/// What [`migrate`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// The cloud's schema version before (0: no version table yet).
    pub from: i32,
    /// The version now.
    pub to: i32,
    /// The migrations applied, by number.
    pub applied: Vec<i32>,
}

/// Applies, in order, each migration the cloud lacks, each in one
/// transaction holding an advisory lock (two gateways migrating at once take
/// turns), and records it in `barngate_schema_migrations`. Safe to re-run.
/// A cloud schema newer than this build knows is refused.
pub async fn migrate(client: &mut Client) -> Result<MigrateReport, UpstreamError> {
    const LOCK: i64 = 0x6261_726e_6761_7465; // "barngate"
    let known = schema_version();
    let mut from = None;
    let mut applied = Vec::new();
    let mut current = 0;
    for m in MIGRATIONS {
        let tx = client.transaction().await.map_err(|e| pg_error(&e))?;
        // `IF NOT EXISTS` on what exists is a NOTICE, not news.
        tx.batch_execute(&format!(
            "SET LOCAL client_min_messages = warning;
             SELECT pg_advisory_xact_lock({LOCK});
             CREATE TABLE IF NOT EXISTS barngate_schema_migrations (
               version INTEGER PRIMARY KEY,
               name TEXT NOT NULL,
               applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             );"
        ))
        .await
        .map_err(|e| pg_error(&e))?;
        current = tx
            .query_one(
                "SELECT COALESCE(max(version), 0) FROM barngate_schema_migrations",
                &[],
            )
            .await
            .map_err(|e| pg_error(&e))?
            .get::<_, i32>(0);
        from.get_or_insert(current);
        if current > known {
            return Err(UpstreamError::SchemaTooNew {
                found: current,
                supported: known,
            });
        }
        if current >= m.version {
            continue;
        }
        tx.batch_execute(m.sql).await.map_err(|e| {
            let e = pg_error(&e);
            UpstreamError::Migration {
                version: m.version,
                name: m.name,
                message: e.to_string(),
            }
        })?;
        tx.execute(
            "INSERT INTO barngate_schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .map_err(|e| pg_error(&e))?;
        tx.commit().await.map_err(|e| pg_error(&e))?;
        info!(
            version = m.version,
            name = m.name,
            "upstream schema migration applied"
        );
        applied.push(m.version);
        current = m.version;
    }
    Ok(MigrateReport {
        from: from.unwrap_or(0),
        to: current,
        applied,
    })
}

/// The cloud's schema version without changing anything (0: none yet).
pub async fn cloud_schema_version(client: &Client) -> Result<i32, UpstreamError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('barngate_schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| pg_error(&e))?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM barngate_schema_migrations",
            &[],
        )
        .await
        .map_err(|e| pg_error(&e))?
        .get(0))
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
    pub async fn connect(up: &UpstreamConfig) -> Result<PgSink, UpstreamError> {
        let mut client = connect(up).await?;
        migrate(&mut client).await?;
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

    /// A round trip on the open connection.
    pub async fn ping(&self) -> Result<(), UpstreamError> {
        self.client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| pg_error(&e))
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
                    b(d.battery_voltage),
                    b(d.wire_id.clone()),
                    b(d.cert_serial.clone()),
                    b(d.registered_at),
                    b(serde_json::to_value(d).unwrap_or_default()),
                ],
            ),
            Row::Telemetry(row) => {
                let t = &row.t;
                let cap = row.capture.as_deref();
                let device_time = cap.and_then(|c| c.device_time);
                let valid = device_time_valid(device_time, t.received_at);
                let (volt, rssi) = extras(cap.and_then(raw_json).as_ref());
                (
                    self.telemetry.clone(),
                    vec![
                        b(t.mac.clone()),
                        b(site),
                        b(t.capture_id as i64),
                        b(cap.map(|c| c.image_name.clone())),
                        b(cap.map(|c| i32_of(c.version))),
                        b(if valid {
                            device_time.unwrap_or(t.received_at)
                        } else {
                            t.received_at
                        }),
                        b(device_time),
                        b(valid),
                        b(t.received_at),
                        b(t.temperature),
                        b(t.humidity),
                        b(t.pressure),
                        b(t.gas_resistance),
                        b(t.battery),
                        b(volt),
                        b(rssi),
                        b(t.error),
                    ],
                )
            }
            Row::Session(s) => (
                self.session.clone(),
                vec![
                    b(s.mac.clone()),
                    b(site),
                    b(session_id(s)),
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
                let metadata = raw_json(c).or_else(|| {
                    c.metadata
                        .as_ref()
                        .and_then(|m| serde_json::to_value(m).ok())
                });
                let valid = device_time_valid(c.device_time, c.first_seen_at);
                let captured: DateTime<Utc> = match c.device_time {
                    Some(t) if valid => t,
                    _ => c.first_seen_at,
                };
                let missing = c
                    .total_chunks()
                    .map(|n| i32_of(n.saturating_sub(c.chunks_received)));
                (
                    self.image.clone(),
                    vec![
                        b(c.mac.clone()),
                        b(site),
                        b(c.image_name.clone()),
                        b(i32_of(c.version)),
                        b(obj.as_ref().map(|o| o.url.clone())),
                        b(obj.as_ref().map(|o| o.key.clone())),
                        b(c.image_size().map(i32_of)),
                        b(c.sha256.clone()),
                        b(captured),
                        b(c.assembled_at),
                        b(c.total_chunks().map(i32_of)),
                        b(i32_of(c.chunks_received)),
                        b(c.state.as_str()),
                        b(i32_of(c.metadata.as_ref().map(|m| m.error).unwrap_or(0))),
                        b(i32_of(c.retries)),
                        b(match c.origin {
                            crate::store::Origin::Current => "current",
                            crate::store::Origin::Recovery => "recovery",
                        }),
                        b(metadata),
                        b(c.id as i64),
                        b(c.device_time),
                        b(valid),
                        b(c.first_seen_at),
                        b(i32_of(c.failures)),
                        b(missing),
                        b(c.failed_reason.clone()),
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
