//! Reads of devices, captures and their images, wake sessions, telemetry
//! and commands, and the summary counts.

use super::partials::parse_run;
use super::{
    db, dec, CaptureRecord, CaptureState, CommandRecord, DeviceRecord, SessionRecord, Store,
    StoreError, TelemetryRecord, ALERTS, CAPTURES, CAPTURE_NAMES, COMMANDS, DEVICES,
    DEVICE_CAPTURES, IMAGES, META, NEXT_CAPTURE_ID, OUTBOX, PARTIALS, SESSIONS, TELEMETRY,
};
use chrono::{DateTime, Utc};
use redb::{ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Summary counts, for status output and metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoreCounts {
    pub devices: u64,
    pub captures: u64,
    pub images: u64,
    pub chunks: u64,
    pub outbox: u64,
    pub alerts: u64,
}

impl Store {
    pub fn device(&self, mac: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(DEVICES).map_err(db)?;
        let v = t.get(mac).map_err(db)?;
        v.map(|g| dec("devices", g.value())).transpose()
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut out = Vec::new();
        self.for_each_device(|d| out.push(d))?;
        Ok(out)
    }

    /// Visits every registered device without holding the whole registry
    /// in memory (10,000 records would be ~10 MiB at once).
    pub fn for_each_device(&self, mut f: impl FnMut(DeviceRecord)) -> Result<(), StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(DEVICES).map_err(db)?;
        for r in t.iter().map_err(db)? {
            let (_, v) = r.map_err(db)?;
            f(dec("devices", v.value())?);
        }
        Ok(())
    }

    pub fn device_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        tx.open_table(DEVICES).map_err(db)?.len().map_err(db)
    }

    pub fn capture(&self, id: u64) -> Result<Option<CaptureRecord>, StoreError> {
        self.get_json(CAPTURES, "captures", id)
    }

    /// The newest version of a device's capture with this name.
    pub fn latest_capture(
        &self,
        mac: &str,
        name: &str,
    ) -> Result<Option<CaptureRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let names = tx.open_table(CAPTURE_NAMES).map_err(db)?;
        let Some(id) = names.get((mac, name)).map_err(db)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let t = tx.open_table(CAPTURES).map_err(db)?;
        let v = t.get(id).map_err(db)?;
        v.map(|g| dec("captures", g.value())).transpose()
    }

    /// The next capture id to hand out: past every id ever committed, a
    /// capture's or only its chunks'.
    pub fn next_capture_id(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let meta = tx.open_table(META).map_err(db)?;
        let counted = meta.get(NEXT_CAPTURE_ID).map_err(db)?.map(|v| v.value());
        let partials = tx.open_table(PARTIALS).map_err(db)?;
        let partial = partials.last().map_err(db)?.map(|(k, _)| k.value().0);
        let stored = self.max_capture_id()?;
        Ok(counted
            .unwrap_or(1)
            .max(stored + 1)
            .max(partial.map_or(1, |p| p + 1)))
    }

    pub fn max_capture_id(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(CAPTURES).map_err(db)?;
        let last = t.last().map_err(db)?.map(|(k, _)| k.value()).unwrap_or(0);
        Ok(last)
    }

    /// All captures of one device (or every device), oldest first.
    pub fn captures(&self, mac: Option<&str>) -> Result<Vec<CaptureRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(CAPTURES).map_err(db)?;
        let mut out = Vec::new();
        match mac {
            Some(mac) => {
                let idx = tx.open_table(DEVICE_CAPTURES).map_err(db)?;
                for r in idx.range((mac, 0)..=(mac, u64::MAX)).map_err(db)? {
                    let (k, _) = r.map_err(db)?;
                    if let Some(v) = t.get(k.value().1).map_err(db)? {
                        out.push(dec("captures", v.value())?);
                    }
                }
            }
            None => {
                for r in t.iter().map_err(db)? {
                    let (_, v) = r.map_err(db)?;
                    out.push(dec("captures", v.value())?);
                }
            }
        }
        Ok(out)
    }

    /// Complete images of one device (or all), oldest first.
    pub fn images(&self, mac: Option<&str>) -> Result<Vec<CaptureRecord>, StoreError> {
        Ok(self
            .captures(mac)?
            .into_iter()
            .filter(|c| c.state == CaptureState::Complete)
            .collect())
    }

    pub fn image_bytes(&self, capture_id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(IMAGES).map_err(db)?;
        Ok(t.get(capture_id).map_err(db)?.map(|v| v.value().to_vec()))
    }

    pub fn sessions(&self, mac: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(SESSIONS).map_err(db)?;
        let mut out = Vec::new();
        for r in t.range((mac, i64::MIN)..=(mac, i64::MAX)).map_err(db)? {
            let (_, v) = r.map_err(db)?;
            out.push(dec("wake_sessions", v.value())?);
        }
        Ok(out)
    }

    /// When the device's current backlog began: the first of its latest run
    /// of wakes that reported pending images (newest first, stopping at the
    /// first wake without any), or `None`.
    pub fn backlog_started(&self, mac: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(SESSIONS).map_err(db)?;
        let mut start = None;
        for r in t
            .range((mac, i64::MIN)..=(mac, i64::MAX))
            .map_err(db)?
            .rev()
        {
            let (_, v) = r.map_err(db)?;
            let s: SessionRecord = dec("wake_sessions", v.value())?;
            if s.pending_reported == 0 {
                break;
            }
            start = Some(s.woke_at);
        }
        Ok(start)
    }

    pub fn session_at(&self, mac: &str, ms: i64) -> Result<Option<SessionRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(SESSIONS).map_err(db)?;
        let v = t.get((mac, ms)).map_err(db)?;
        v.map(|g| dec("wake_sessions", g.value())).transpose()
    }

    pub fn telemetry(&self, mac: &str) -> Result<Vec<TelemetryRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(TELEMETRY).map_err(db)?;
        let mut out = Vec::new();
        for r in t.range((mac, 0)..=(mac, u64::MAX)).map_err(db)? {
            let (_, v) = r.map_err(db)?;
            out.push(dec("telemetry", v.value())?);
        }
        Ok(out)
    }

    /// The readings of one capture.
    pub fn telemetry_of(
        &self,
        mac: &str,
        capture_id: u64,
    ) -> Result<Option<TelemetryRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(TELEMETRY).map_err(db)?;
        let v = t.get((mac, capture_id)).map_err(db)?;
        v.map(|g| dec("telemetry", g.value())).transpose()
    }

    pub fn commands(&self, mac: Option<&str>) -> Result<Vec<CommandRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(COMMANDS).map_err(db)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(db)? {
            let (_, v) = r.map_err(db)?;
            let c: CommandRecord = dec("commands", v.value())?;
            if mac.is_none_or(|m| m == c.mac) {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Commands with a sequence number above `after`, with their numbers
    /// (lets readers fold the append-only log incrementally).
    pub fn commands_after(&self, after: u64) -> Result<Vec<(u64, CommandRecord)>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(COMMANDS).map_err(db)?;
        let mut out = Vec::new();
        for r in t.range(after.saturating_add(1)..).map_err(db)? {
            let (k, v) = r.map_err(db)?;
            out.push((k.value(), dec("commands", v.value())?));
        }
        Ok(out)
    }

    pub fn counts(&self) -> Result<StoreCounts, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        Ok(StoreCounts {
            devices: tx.open_table(DEVICES).map_err(db)?.len().map_err(db)?,
            captures: tx.open_table(CAPTURES).map_err(db)?.len().map_err(db)?,
            images: tx.open_table(IMAGES).map_err(db)?.len().map_err(db)?,
            chunks: {
                let t = tx.open_table(PARTIALS).map_err(db)?;
                let mut ids = HashSet::new();
                for r in t.iter().map_err(db)? {
                    let (k, v) = r.map_err(db)?;
                    for (id, _) in parse_run(v.value())? {
                        ids.insert((k.value().0, id));
                    }
                }
                ids.len() as u64
            },
            outbox: tx.open_table(OUTBOX).map_err(db)?.len().map_err(db)?,
            alerts: tx.open_table(ALERTS).map_err(db)?.len().map_err(db)?,
        })
    }
}
