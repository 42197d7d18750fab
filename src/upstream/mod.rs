//! Store-and-forward to the cloud. The ingest queues every result in the
//! redb outbox in the same transaction that stores it; the [`Forwarder`]
//! drains that outbox in sequence order (so in order per device): image
//! bytes to object storage ([`objects`]), rows to PostgreSQL ([`pg`]), then
//! deletes what was delivered. Every write upstream is idempotent (upserts on
//! natural keys, deterministic object keys), so a replay after a crash or an
//! outage never duplicates anything. While the upstream is unreachable it
//! backs off exponentially with jitter and resumes on its own.
//!
//! It also owns local retention: uploaded images are deleted from the gateway
//! after `retention_days`, or earlier — oldest upload first — when the disk
//! passes its high-water mark; an image not yet uploaded is never deleted.

pub mod objects;
pub mod pg;

use crate::clock::SharedClock;
use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use crate::store::{CaptureState, OutboxItem, Store, StoreError, UploadRecord};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

/// Alert kinds the forwarder raises about itself.
pub const ALERT_CREDENTIALS: &str = "upstream_credentials";
pub const ALERT_DISK: &str = "disk_high_water";
pub const ALERT_SCHEMA: &str = "upstream_schema_too_new";
pub const ALERT_UNREACHABLE: &str = "upstream_unreachable";

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("PostgreSQL rejected the credentials: {0}")]
    PostgresAuth(String),
    #[error("object storage: {0}")]
    Objects(String),
    #[error("object storage rejected the credentials: {0}")]
    ObjectsAuth(String),
    #[error("the cloud schema is at version {found}, newer than this barngate knows ({supported}); upgrade barngate before it syncs to this database")]
    SchemaTooNew { found: i32, supported: i32 },
    #[error("cloud schema migration {version:04} ({name}) failed and was rolled back: {message}")]
    Migration {
        version: i32,
        name: &'static str,
        message: String,
    },
    #[error("upload of {key} not verified: {message}")]
    Verify { key: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal: {0}")]
    Internal(String),
}

impl UpstreamError {
    /// Wrong credentials need a person, not a retry: they raise an alert.
    pub fn is_credentials(&self) -> bool {
        matches!(
            self,
            UpstreamError::PostgresAuth(_) | UpstreamError::ObjectsAuth(_)
        )
    }

    /// The gateway alert this error raises, if it needs a person: wrong
    /// credentials, or a cloud schema newer than this build.
    pub fn alert_kind(&self) -> Option<&'static str> {
        match self {
            UpstreamError::PostgresAuth(_) | UpstreamError::ObjectsAuth(_) => {
                Some(ALERT_CREDENTIALS)
            }
            UpstreamError::SchemaTooNew { .. } => Some(ALERT_SCHEMA),
            _ => None,
        }
    }
}

/// `sync status` and the upstream metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SyncStatus {
    pub backlog: u64,
    pub oldest_queued_at: Option<DateTime<Utc>>,
    pub oldest_age_seconds: Option<i64>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub consecutive_failures: u64,
    pub delivered_total: u64,
    /// `upstream.enabled` as the gateway last started with (None: unknown).
    #[serde(default)]
    pub enabled: Option<bool>,
}

pub fn status(store: &Store, now: DateTime<Utc>) -> Result<SyncStatus, StoreError> {
    let o = store.outbox_stats()?;
    let s = store.sync_state()?;
    Ok(SyncStatus {
        backlog: o.backlog,
        oldest_queued_at: o.oldest_queued_at,
        oldest_age_seconds: o.oldest_queued_at.map(|t| (now - t).num_seconds().max(0)),
        last_success_at: s.last_success_at,
        last_error: s.last_error,
        last_error_at: s.last_error_at,
        consecutive_failures: s.consecutive_failures,
        delivered_total: s.delivered_total,
        enabled: s.enabled,
    })
}

/// Prometheus lines for the same figures `sync status` prints.
pub fn render_metrics(s: &SyncStatus, out: &mut String) {
    use std::fmt::Write as _;
    let mut g = |name: &str, help: &str, kind: &str, v: i64| {
        let _ = writeln!(out, "# HELP barngate_{name} {help}");
        let _ = writeln!(out, "# TYPE barngate_{name} {kind}");
        let _ = writeln!(out, "barngate_{name} {v}");
    };
    g(
        "upstream_backlog",
        "Items queued for the upstream.",
        "gauge",
        s.backlog as i64,
    );
    g(
        "upstream_oldest_age_seconds",
        "Age of the oldest queued item (0 when none).",
        "gauge",
        s.oldest_age_seconds.unwrap_or(0),
    );
    g(
        "upstream_last_success_timestamp_seconds",
        "When a delivery last succeeded (0 = never).",
        "gauge",
        s.last_success_at.map(|t| t.timestamp()).unwrap_or(0),
    );
    g(
        "upstream_consecutive_failures",
        "Failed delivery attempts since the last success.",
        "gauge",
        s.consecutive_failures as i64,
    );
}

/// Exponential backoff with jitter: `initial * 2^(n-1)`, capped, then a
/// uniformly random 50–100 % of it so many gateways do not retry in step.
pub fn backoff(cfg: &UpstreamConfig, failures: u64, jitter: f64) -> Duration {
    let cap = cfg.backoff_max_s.saturating_mul(1000);
    let shift = failures.saturating_sub(1).min(32) as u32;
    let ms = cfg
        .backoff_initial_ms
        .saturating_mul(1u64 << shift)
        .min(cap);
    Duration::from_millis(((ms as f64) * (0.5 + 0.5 * jitter.clamp(0.0, 1.0))) as u64)
}

/// A small xorshift for jitter; no need for a crypto RNG here.
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9)
            ^ (std::process::id() as u64) << 32;
        Jitter(seed | 1)
    }
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Disk usage of the filesystem holding `path`: (used bytes, total bytes).
pub fn disk_usage(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    let total = st.f_blocks as u64 * frsize;
    let avail = st.f_bavail as u64 * frsize;
    let free = st.f_bfree as u64 * frsize;
    // As `df` counts: used / (used + available to users).
    let used = total.saturating_sub(free);
    Some((used, used + avail))
}

/// One retention pass: deletes the local bytes of images uploaded more than
/// `retention_days` ago; when the disk is above the high-water mark, raises
/// an alert and deletes the oldest uploaded images until enough is freed.
pub fn retention_pass(
    store: &Store,
    cfg: &UpstreamConfig,
    usage: Option<(u64, u64)>,
    now: DateTime<Utc>,
) -> Result<(u64, u64), StoreError> {
    let cutoff = now - chrono::Duration::days(cfg.retention_days as i64);
    let mut need = 0u64;
    if let Some((used, total)) = usage.filter(|(_, t)| *t > 0) {
        let mark = total / 100 * cfg.disk_high_water_percent as u64;
        if used >= mark {
            let pct = used * 100 / total;
            let msg = format!(
                "Disk {pct}% full (high-water mark {}%): deleting the oldest uploaded images locally.",
                cfg.disk_high_water_percent
            );
            if let Some(a) = store.raise_gateway_alert(ALERT_DISK, "critical", &msg, now)? {
                warn!(alert = %a.kind, percent = pct, "disk above the high-water mark");
            }
            // Free down to 5 points below the mark, so it does not flap.
            let target = total / 100 * (cfg.disk_high_water_percent.saturating_sub(5) as u64);
            need = used.saturating_sub(target);
        } else if store.resolve_gateway_alert(ALERT_DISK, now)? {
            info!("disk back below the high-water mark");
        }
    }
    let (n, bytes) = store.purge_uploaded_images(cutoff, need, now)?;
    if n > 0 {
        info!(images = n, bytes, "local copies of uploaded images deleted");
    }
    Ok((n, bytes))
}

/// What one delivery round did.
#[derive(Debug, Default)]
pub struct Round {
    pub delivered: usize,
    /// The error that cut the round short, after the prefix before it was delivered.
    pub error: Option<UpstreamError>,
}

/// The forwarder task.
pub struct Forwarder {
    cfg: UpstreamConfig,
    site: String,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    data_dir: PathBuf,
    pg: Option<pg::PgSink>,
    objects: objects::ObjectSink,
    /// When the next connection check is due while nothing is queued.
    next_check: DateTime<Utc>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, UpstreamError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| UpstreamError::Internal(e.to_string()))?
        .map_err(UpstreamError::from)
}

impl Forwarder {
    pub fn new(
        cfg: UpstreamConfig,
        site: String,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
        data_dir: PathBuf,
    ) -> Result<Forwarder, UpstreamError> {
        let objects = objects::ObjectSink::new(&cfg)?;
        let next_check = clock.now();
        Ok(Forwarder {
            next_check,
            cfg,
            site,
            store,
            metrics,
            clock,
            data_dir,
            pg: None,
            objects,
        })
    }

    /// Delivers one page of the outbox (up to `batch_size` items, in order).
    pub async fn round(&mut self) -> Round {
        match self.round_inner().await {
            Ok(r) => r,
            Err(e) => Round {
                delivered: 0,
                error: Some(e),
            },
        }
    }

    async fn round_inner(&mut self) -> Result<Round, UpstreamError> {
        let store = self.store.clone();
        let limit = self.cfg.batch_size;
        let items = blocking(move || store.outbox(limit)).await?;
        if items.is_empty() {
            // Nothing to deliver: check the connection (and so the
            // credentials) now and then, so a fault shows before data waits.
            if self.clock.now() >= self.next_check {
                self.check().await?;
                self.next_check =
                    self.clock.now() + chrono::Duration::seconds(self.cfg.check_interval_s as i64);
            }
            return Ok(Round::default());
        }
        // Load the rows; upload image bytes first (in order), stopping at the
        // first failure so what precedes it is still delivered.
        let mut rows = Vec::with_capacity(items.len());
        let mut seqs = Vec::with_capacity(items.len());
        let mut uploads = Vec::new();
        let mut error = None;
        for item in &items {
            match self.load(item).await {
                Ok(Loaded::Row(row, upload)) => {
                    rows.push(*row);
                    if let Some(u) = upload {
                        uploads.push(u);
                    }
                }
                Ok(Loaded::Gone) => {
                    warn!(device = %item.mac, kind = %item.kind, key = %item.key, "outbox item refers to nothing stored; dropped");
                }
                Ok(Loaded::Superseded) => {
                    debug!(device = %item.mac, kind = %item.kind, key = %item.key, "outbox item superseded by a later one");
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
            seqs.push(item.seq);
        }
        if !rows.is_empty() {
            if self.pg.as_ref().is_none_or(|p| p.is_closed()) {
                self.pg = None;
                self.pg = Some(pg::PgSink::connect(&self.cfg).await?);
                info!("connected to upstream PostgreSQL");
            }
            let Some(sink) = self.pg.as_mut() else {
                return Err(UpstreamError::Internal("no PostgreSQL connection".into()));
            };
            if let Err(e) = sink.write(&rows, &self.site).await {
                // A broken connection is re-opened next round.
                self.pg = None;
                return Err(e);
            }
        }
        let delivered = seqs.len();
        if delivered > 0 {
            let store = self.store.clone();
            let now = self.clock.now();
            blocking(move || store.outbox_ack(&seqs, &uploads, now)).await?;
            for r in &rows {
                match r {
                    pg::Row::Image(c, Some(o)) => {
                        info!(device = %c.mac, image = %c.image_name, key = %o.key, "image delivered upstream");
                    }
                    pg::Row::Image(c, None) => {
                        info!(device = %c.mac, image = %c.image_name, status = c.state.as_str(), retries = c.retries, "capture row delivered upstream");
                    }
                    _ => {}
                }
            }
            debug!(items = delivered, "outbox items delivered");
        }
        Ok(Round { delivered, error })
    }

    /// Connects to PostgreSQL (applying missing migrations) or pings the
    /// open connection, and checks the object store's credentials.
    async fn check(&mut self) -> Result<(), UpstreamError> {
        match self.pg.as_ref().filter(|p| !p.is_closed()) {
            Some(p) => {
                if let Err(e) = p.ping().await {
                    self.pg = None;
                    return Err(e);
                }
            }
            None => {
                self.pg = None;
                self.pg = Some(pg::PgSink::connect(&self.cfg).await?);
                info!("connected to upstream PostgreSQL");
            }
        }
        self.objects.check().await?;
        debug!("upstream connection check passed");
        Ok(())
    }

    async fn load(&self, item: &OutboxItem) -> Result<Loaded, UpstreamError> {
        let store = self.store.clone();
        let it = item.clone();
        let row = blocking(move || -> Result<Option<pg::Row>, StoreError> {
            let ms = || it.key.parse::<i64>().ok();
            let id = || it.key.parse::<u64>().ok();
            Ok(match it.kind.as_str() {
                "device" => store.device(&it.key)?.map(pg::Row::Device),
                "telemetry" => match id() {
                    Some(id) => match store.telemetry_of(&it.mac, id)? {
                        Some(t) => Some(pg::Row::Telemetry(pg::TelemetryRow {
                            capture: store.capture(t.capture_id)?.map(Box::new),
                            t,
                        })),
                        None => None,
                    },
                    None => None,
                },
                "session" => match ms() {
                    Some(ms) => store.session_at(&it.mac, ms)?.map(pg::Row::Session),
                    None => None,
                },
                "alert" => match id() {
                    Some(id) => store.alert(id)?.map(pg::Row::Alert),
                    None => None,
                },
                // "capture": a capture that ended failed; "image": a complete one.
                "image" | "capture" => match id() {
                    Some(id) => store
                        .capture(id)?
                        .map(|c| pg::Row::Image(Box::new(c), None)),
                    None => None,
                },
                _ => None,
            })
        })
        .await?;
        let Some(row) = row else {
            return Ok(Loaded::Gone);
        };
        let pg::Row::Image(cap, _) = row else {
            return Ok(Loaded::Row(Box::new(row), None));
        };
        if item.kind == "capture" {
            // Completed since it failed: its "image" item, later in the
            // outbox, carries the row with its object.
            if cap.state == CaptureState::Complete {
                return Ok(Loaded::Superseded);
            }
            return Ok(Loaded::Row(Box::new(pg::Row::Image(cap, None)), None));
        }
        let key = objects::object_key(&self.site, &cap);
        let obj = Some(pg::ImageObject {
            url: self.objects.url(&key).await?,
            key: key.clone(),
        });
        let store = self.store.clone();
        let id = cap.id;
        let (done, bytes) =
            blocking(move || Ok((store.upload(id)?, store.image_bytes(id)?))).await?;
        if done.is_some() {
            // Confirmed before (a replay after a crash): only the row again.
            return Ok(Loaded::Row(Box::new(pg::Row::Image(cap, obj)), None));
        }
        let Some(bytes) = bytes else {
            warn!(device = %cap.mac, image = %cap.image_name, "image bytes missing locally; row only");
            return Ok(Loaded::Row(Box::new(pg::Row::Image(cap, obj)), None));
        };
        self.objects.put_verified(&key, &bytes).await?;
        let upload = UploadRecord {
            capture_id: cap.id,
            object_key: key,
            size: bytes.len() as u64,
            uploaded_at: self.clock.now(),
            purged_at: None,
        };
        Ok(Loaded::Row(
            Box::new(pg::Row::Image(cap, obj)),
            Some(upload),
        ))
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut jitter = Jitter::new();
        let mut failures: u64 = 0;
        let mut resolved_once = false;
        let mut failing_since: Option<DateTime<Utc>> = None;
        // An error from a previous run stays shown until a success.
        let mut error_shown = {
            let store = self.store.clone();
            blocking(move || store.sync_state())
                .await
                .map(|s| s.last_error.is_some())
                .unwrap_or(true)
        };
        let mut next_retention = self.clock.now();
        info!(bucket = %self.cfg.bucket, endpoint = %self.cfg.endpoint, "upstream forwarder running");
        loop {
            if *shutdown.borrow() {
                return;
            }
            let now = self.clock.now();
            if now >= next_retention {
                next_retention = now + chrono::Duration::seconds(60);
                let store = self.store.clone();
                let cfg = self.cfg.clone();
                let dir = self.data_dir.clone();
                if let Err(e) = blocking(move || {
                    retention_pass(&store, &cfg, disk_usage(&dir), now).map(|_| ())
                })
                .await
                {
                    warn!(error = %e, "retention pass failed");
                }
            }
            // A round that hangs (a half-open connection) counts as a failure.
            let round = tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(300), self.round()) => match r {
                    Ok(r) => r,
                    Err(_) => {
                        self.pg = None;
                        Round {
                            delivered: 0,
                            error: Some(UpstreamError::Internal("delivery round timed out after 300 s".into())),
                        }
                    }
                },
                _ = shutdown.changed() => return,
            };
            if round.delivered > 0 {
                Metrics::add(&self.metrics.upstream_delivered, round.delivered as u64);
            }
            let pause = match round.error {
                None => {
                    // After failures, or on this process's first success (an
                    // alert may be left open by a previous run): resolve.
                    if failures > 0 || !resolved_once || error_shown {
                        if failures > 0 {
                            info!(after_failures = failures, "upstream reachable again");
                        }
                        failures = 0;
                        failing_since = None;
                        resolved_once = true;
                        let store = self.store.clone();
                        let now = self.clock.now();
                        let cleared = blocking(move || {
                            for kind in [ALERT_CREDENTIALS, ALERT_SCHEMA, ALERT_UNREACHABLE] {
                                store.resolve_gateway_alert(kind, now)?;
                            }
                            // A success clears the last error.
                            store.update_sync_state(|s| {
                                s.last_error = None;
                                s.last_error_at = None;
                                s.consecutive_failures = 0;
                                s.last_success_at = Some(now);
                            })
                        })
                        .await;
                        if cleared.is_ok() {
                            error_shown = false;
                        }
                    }
                    if round.delivered > 0 {
                        continue;
                    }
                    Duration::from_millis(250)
                }
                Some(e) => {
                    failures += 1;
                    error_shown = true;
                    Metrics::inc(&self.metrics.upstream_failures);
                    let msg = e.to_string();
                    let store = self.store.clone();
                    let now = self.clock.now();
                    let since = *failing_since.get_or_insert(now);
                    let down_s = (now - since).num_seconds().max(0) as u64;
                    let alert = e.alert_kind().or_else(|| {
                        (down_s >= self.cfg.unreachable_alert_after_s).then_some(ALERT_UNREACHABLE)
                    });
                    let m = msg.clone();
                    let _ = blocking(move || {
                        store.record_sync_error(&m, now)?;
                        match alert {
                            Some(ALERT_CREDENTIALS) => {
                                store.raise_gateway_alert(
                                    ALERT_CREDENTIALS,
                                    "critical",
                                    &format!("Upstream rejected the gateway's credentials: {m}"),
                                    now,
                                )?;
                            }
                            Some(ALERT_UNREACHABLE) => {
                                store.raise_gateway_alert(
                                    ALERT_UNREACHABLE,
                                    "error",
                                    &format!(
                                        "Upstream unreachable for {down_s} s; backlog kept: {m}"
                                    ),
                                    now,
                                )?;
                            }
                            Some(kind) => {
                                store.raise_gateway_alert(kind, "critical", &m, now)?;
                            }
                            None => {}
                        }
                        Ok(())
                    })
                    .await;
                    let wait = backoff(&self.cfg, failures, jitter.next());
                    match alert {
                        Some(a) if a != ALERT_UNREACHABLE => {
                            error!(error = %msg, alert = a, retry_in_ms = wait.as_millis() as u64, "upstream needs a person; backlog kept");
                        }
                        _ => {
                            warn!(error = %msg, retry_in_ms = wait.as_millis() as u64, failures, down_s, "upstream delivery failed; backlog kept");
                        }
                    }
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

enum Loaded {
    Row(Box<pg::Row>, Option<UploadRecord>),
    Gone,
    /// Nothing to write for this item: a later one carries its row.
    Superseded,
}

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub schema: pg::MigrateReport,
    /// The bucket was created (`false`: it was there already).
    pub bucket_created: bool,
}

/// `barngate upstream migrate` (alias `init-schema`): connects, applies the
/// cloud schema migrations it lacks, and creates the object bucket unless
/// it exists. Safe to re-run.
pub async fn migrate(cfg: &UpstreamConfig) -> Result<InitReport, UpstreamError> {
    if cfg.postgres_url.trim().is_empty() {
        return Err(UpstreamError::Config(
            "upstream.postgres_url is empty (set it in the config or BARNGATE_UPSTREAM_POSTGRES_URL)"
                .into(),
        ));
    }
    let mut client = pg::connect(cfg).await?;
    let schema = pg::migrate(&mut client).await?;
    if cfg.bucket.trim().is_empty() {
        return Err(UpstreamError::Config(
            "upstream.bucket is empty: the tables are ready, but no bucket was created".into(),
        ));
    }
    let bucket_created = objects::ObjectSink::new(cfg)?
        .ensure_bucket(&cfg.region)
        .await?;
    Ok(InitReport {
        schema,
        bucket_created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let cfg = UpstreamConfig {
            backoff_initial_ms: 100,
            backoff_max_s: 1,
            ..Default::default()
        };
        assert_eq!(backoff(&cfg, 1, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(&cfg, 2, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(&cfg, 4, 1.0), Duration::from_millis(800));
        assert_eq!(backoff(&cfg, 5, 1.0), Duration::from_millis(1000));
        assert_eq!(backoff(&cfg, 500, 1.0), Duration::from_millis(1000));
        assert_eq!(backoff(&cfg, 500, 0.0), Duration::from_millis(500));
        let mut j = Jitter::new();
        for _ in 0..1000 {
            let x = j.next();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
