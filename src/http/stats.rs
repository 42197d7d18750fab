//! Per-device figures for `/metrics` and the dashboard — success rate,
//! average retries, chunk loss %, pending queue age — read from the store's
//! per-device totals (kept current by every commit, not recomputed from
//! history) and cached briefly, so a scrape every few seconds costs a Pi little.

use crate::store::{DeviceRecord, Store, StoreError};
use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How long a computed snapshot is served before it is recomputed.
pub const CACHE_FOR: Duration = Duration::seconds(5);

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceStats {
    pub mac: String,
    pub images_complete: u64,
    /// Times a capture ended failed.
    pub images_failed: u64,
    /// Announced captures neither complete nor failed.
    pub in_progress: u64,
    retries: u64,
    chunks_announced: u64,
    /// Chunk ids the gateway had to ask for again (all `missing_chunks` rounds).
    pub chunks_rerequested: u64,
    /// Pending images the device reported at its last wake.
    pub pending: u32,
    /// How long the device has had a backlog, in seconds (0 without one).
    pub pending_age_s: i64,
}

impl DeviceStats {
    /// Complete ÷ (complete + failures): a capture that failed before it
    /// completed counts both; `None` before any outcome.
    pub fn success_rate(&self) -> Option<f64> {
        let n = self.images_complete + self.images_failed;
        (n > 0).then(|| self.images_complete as f64 / n as f64)
    }
    /// `missing_chunks` rounds per finished capture.
    pub fn average_retries(&self) -> Option<f64> {
        let n = self.images_complete + self.images_failed;
        (n > 0).then(|| self.retries as f64 / n as f64)
    }
    /// Chunk transmissions lost: re-requested ÷ (announced + re-requested), in %.
    pub fn chunk_loss_pct(&self) -> Option<f64> {
        let n = self.chunks_announced + self.chunks_rerequested;
        (n > 0).then(|| 100.0 * self.chunks_rerequested as f64 / n as f64)
    }
}

/// One consistent view for a page or a scrape.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub computed_at: DateTime<Utc>,
    pub devices: Vec<DeviceRecord>,
    pub stats: HashMap<String, DeviceStats>,
    /// Images completed since local midnight (site time zone).
    pub images_today: u64,
    pub upstream_backlog: u64,
    pub upstream_oldest_age_s: i64,
    /// The upstream forwarder's state (backlog, last success, last error).
    pub sync: Option<crate::upstream::SyncStatus>,
    /// Active alerts by (kind, severity), and per device.
    pub active_alerts: HashMap<(String, String), u64>,
    pub active_alerts_by_device: HashMap<String, u64>,
}

impl Snapshot {
    pub fn online(&self, d: &DeviceRecord) -> bool {
        d.last_seen
            .is_some_and(|t| self.computed_at - t < crate::alerts::ONLINE_WITHIN)
    }
    pub fn active_alert_total(&self) -> u64 {
        self.active_alerts.values().sum()
    }
}

/// The cache shared by the HTTP handlers.
#[derive(Default)]
pub struct StatsCache {
    snapshot: Mutex<Option<Arc<Snapshot>>>,
}

impl StatsCache {
    /// The cached snapshot, recomputed when older than [`CACHE_FOR`].
    /// Blocking: call from `spawn_blocking`.
    pub fn get(
        &self,
        store: &Store,
        now: DateTime<Utc>,
        tz: Tz,
    ) -> Result<Arc<Snapshot>, StoreError> {
        if let Ok(g) = self.snapshot.lock() {
            if let Some(s) = g.as_ref() {
                if now >= s.computed_at && now - s.computed_at < CACHE_FOR {
                    return Ok(s.clone());
                }
            }
        }
        let s = Arc::new(self.compute(store, now, tz)?);
        if let Ok(mut g) = self.snapshot.lock() {
            *g = Some(s.clone());
        }
        Ok(s)
    }

    /// Drops the cached snapshot (the next reader recomputes).
    pub fn invalidate(&self) {
        if let Ok(mut g) = self.snapshot.lock() {
            *g = None;
        }
    }

    fn compute(&self, store: &Store, now: DateTime<Utc>, tz: Tz) -> Result<Snapshot, StoreError> {
        let midnight = now.with_timezone(&tz).date_naive().and_time(NaiveTime::MIN);
        let today_start = tz
            .from_local_datetime(&midnight)
            .earliest()
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(now - Duration::hours(24));
        let devices = store.devices()?;
        let totals = store.capture_totals()?;
        let mut stats: HashMap<String, DeviceStats> = HashMap::new();
        for d in &devices {
            let t = totals.get(&d.mac).cloned().unwrap_or_default();
            let mut s = DeviceStats {
                mac: d.mac.clone(),
                images_complete: t.images_complete,
                images_failed: t.failures,
                in_progress: t.in_progress,
                retries: t.retries,
                chunks_announced: t.chunks_announced,
                chunks_rerequested: t.chunks_rerequested,
                pending: d.pending_reported,
                pending_age_s: 0,
            };
            if d.pending_reported > 0 {
                // The backlog started at the first of the latest run of wakes
                // that reported pending images (or earlier, by capture time).
                let start = match (
                    store.backlog_started(&d.mac)?,
                    store.oldest_open_capture(&d.mac)?,
                ) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                s.pending_age_s = start.map(|t| (now - t).num_seconds().max(0)).unwrap_or(0);
            }
            stats.insert(d.mac.clone(), s);
        }
        let images_today = store.completed_since(today_start)?;
        let sync = crate::upstream::status(store, now)?;
        let upstream_oldest_age_s = sync.oldest_age_seconds.unwrap_or(0);
        let mut active_alerts = HashMap::new();
        let mut active_alerts_by_device = HashMap::new();
        for a in store.alerts()? {
            if a.resolved_at.is_none() {
                *active_alerts
                    .entry((a.kind.clone(), a.severity.clone()))
                    .or_default() += 1;
                *active_alerts_by_device.entry(a.mac.clone()).or_default() += 1;
            }
        }
        Ok(Snapshot {
            computed_at: now,
            devices,
            stats,
            images_today,
            upstream_backlog: sync.backlog,
            upstream_oldest_age_s,
            sync: Some(sync),
            active_alerts,
            active_alerts_by_device,
        })
    }
}
