//! Per-device figures for `/metrics` and the dashboard — success rate,
//! average retries, chunk loss %, pending queue age — computed from the
//! store and cached briefly, so a scrape every few seconds costs a Pi little.
//! The append-only command log is folded incrementally.

use crate::store::{CaptureState, DeviceRecord, Store, StoreError};
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
    /// Complete ÷ (complete + failed); `None` before any outcome.
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

#[derive(Default)]
struct Folded {
    /// Highest command sequence number folded in.
    seq: u64,
    rerequested: HashMap<String, u64>,
}

/// The cache shared by the HTTP handlers.
#[derive(Default)]
pub struct StatsCache {
    snapshot: Mutex<Option<Arc<Snapshot>>>,
    folded: Mutex<Folded>,
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
        let rerequested = {
            let mut f = self.folded.lock().unwrap_or_else(|p| p.into_inner());
            for (seq, c) in store.commands_after(f.seq)? {
                f.seq = seq;
                if c.kind != "missing_chunks" {
                    continue;
                }
                let n = serde_json::from_str::<serde_json::Value>(&c.payload)
                    .ok()
                    .and_then(|v| {
                        v.get("missing_chunks")
                            .and_then(|a| a.as_array())
                            .map(|a| a.len())
                    })
                    .unwrap_or(0);
                *f.rerequested.entry(c.mac).or_default() += n as u64;
            }
            f.rerequested.clone()
        };
        let midnight = now.with_timezone(&tz).date_naive().and_time(NaiveTime::MIN);
        let today_start = tz
            .from_local_datetime(&midnight)
            .earliest()
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(now - Duration::hours(24));
        let devices = store.devices()?;
        let mut stats: HashMap<String, DeviceStats> = devices
            .iter()
            .map(|d| {
                (
                    d.mac.clone(),
                    DeviceStats {
                        mac: d.mac.clone(),
                        pending: d.pending_reported,
                        chunks_rerequested: rerequested.get(&d.mac).copied().unwrap_or(0),
                        ..Default::default()
                    },
                )
            })
            .collect();
        let mut images_today = 0;
        // Oldest known capture time of an unfinished image, per device.
        let mut oldest_open: HashMap<String, DateTime<Utc>> = HashMap::new();
        for c in store.captures(None)? {
            let Some(s) = stats.get_mut(&c.mac) else {
                continue;
            };
            s.chunks_announced += c.total_chunks().unwrap_or(0) as u64;
            match c.state {
                CaptureState::Complete => {
                    s.images_complete += 1;
                    s.retries += c.retries as u64;
                    if c.assembled_at.is_some_and(|t| t >= today_start) {
                        images_today += 1;
                    }
                }
                CaptureState::Failed => {
                    s.images_failed += 1;
                    s.retries += c.retries as u64;
                }
                _ => {
                    s.in_progress += 1;
                    let t = c.device_time.unwrap_or(c.first_seen_at);
                    let e = oldest_open.entry(c.mac.clone()).or_insert(t);
                    *e = (*e).min(t);
                }
            }
        }
        for d in &devices {
            let Some(s) = stats.get_mut(&d.mac) else {
                continue;
            };
            if d.pending_reported == 0 {
                continue;
            }
            // The backlog started at the first of the latest run of wakes
            // that reported pending images (or earlier, by capture time).
            let mut start = None;
            for sess in store.sessions(&d.mac)?.iter().rev() {
                if sess.pending_reported == 0 {
                    break;
                }
                start = Some(sess.woke_at);
            }
            let start = match (start, oldest_open.get(&d.mac)) {
                (Some(a), Some(b)) => Some(a.min(*b)),
                (a, b) => a.or(b.copied()),
            };
            s.pending_age_s = start.map(|t| (now - t).num_seconds().max(0)).unwrap_or(0);
        }
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
