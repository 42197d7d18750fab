//! Per-device capture totals, kept current by every commit, so the
//! dashboard and `/metrics` read one row per device (and the few unfinished
//! captures) instead of decoding every capture ever stored.

use super::{db, dec, enc, CaptureRecord, CaptureState, StoreError, CAPTURES, COMMANDS};
use chrono::{DateTime, Utc};
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// MAC → [`CaptureTotals`].
pub(super) const DEVICE_TOTALS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("device_totals");
/// Unfinished captures: (MAC, capture id) → their capture time in ms (the
/// device's clock, else when the gateway first saw them).
pub(super) const OPEN_CAPTURES: TableDefinition<(&str, u64), i64> =
    TableDefinition::new("open_captures");
/// Images completed per hour (hours since the epoch, UTC) → count.
pub(super) const COMPLETED_BY_HOUR: TableDefinition<i64, u64> =
    TableDefinition::new("completed_by_hour");

/// One device's captures, summed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CaptureTotals {
    pub images_complete: u64,
    /// Times a capture ended `failed` (one that completes later keeps them).
    pub failures: u64,
    /// Captures neither complete nor failed.
    pub in_progress: u64,
    /// `missing_chunks` rounds, over every capture and attempt.
    pub retries: u64,
    /// Chunks announced by METADATA.
    pub chunks_announced: u64,
    /// Chunk ids asked for again (every `missing_chunks` message).
    pub chunks_rerequested: u64,
}

/// The fields of a capture the totals count, as written before: read
/// from its stored JSON without decoding the rest of the record.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub(super) struct Counted {
    pub state: CaptureState,
    pub retries: u32,
    #[serde(default)]
    pub failures: u32,
    #[serde(default, rename = "metadata", deserialize_with = "chunks_announced")]
    pub total_chunks: u32,
}

fn chunks_announced<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    struct M {
        total_chunks_count: u32,
    }
    Ok(Option::<M>::deserialize(d)?.map_or(0, |m| m.total_chunks_count))
}

impl From<&CaptureRecord> for Counted {
    fn from(c: &CaptureRecord) -> Counted {
        Counted {
            state: c.state,
            retries: c.retries,
            failures: c.failures,
            total_chunks: c.total_chunks().unwrap_or(0),
        }
    }
}

impl Counted {
    pub fn is_open(&self) -> bool {
        !self.state.is_finished()
    }

    /// What the capture adds to its device's totals.
    fn contribution(&self) -> [i64; 5] {
        [
            (self.state == CaptureState::Complete) as i64,
            self.failures as i64,
            self.is_open() as i64,
            self.retries as i64,
            self.total_chunks as i64,
        ]
    }
}

fn hour(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(3600)
}

/// The totals and indexes of one write transaction: each table opened
/// once, each device's row read and written once, at [`Totals::finish`].
pub(super) struct Totals<'tx> {
    devices: Table<'tx, &'static str, &'static [u8]>,
    open: Table<'tx, (&'static str, u64), i64>,
    by_hour: Table<'tx, i64, u64>,
    /// Per device: the five capture columns, then chunks re-requested.
    deltas: HashMap<String, [i64; 6]>,
}

impl<'tx> Totals<'tx> {
    pub fn open(tx: &'tx WriteTransaction) -> Result<Totals<'tx>, StoreError> {
        Ok(Totals {
            devices: tx.open_table(DEVICE_TOTALS).map_err(db)?,
            open: tx.open_table(OPEN_CAPTURES).map_err(db)?,
            by_hour: tx.open_table(COMPLETED_BY_HOUR).map_err(db)?,
            deltas: HashMap::new(),
        })
    }

    fn delta(&mut self, mac: &str) -> &mut [i64; 6] {
        if !self.deltas.contains_key(mac) {
            self.deltas.insert(mac.to_string(), [0; 6]);
        }
        self.deltas.get_mut(mac).expect("just inserted")
    }

    /// A capture's change (`old` → `new`).
    pub fn capture_changed(
        &mut self,
        old: Option<Counted>,
        new: &CaptureRecord,
    ) -> Result<(), StoreError> {
        let now = Counted::from(new);
        let before = old.map(|o| o.contribution()).unwrap_or_default();
        let after = now.contribution();
        if before != after {
            let d = self.delta(&new.mac);
            for i in 0..5 {
                d[i] += after[i] - before[i];
            }
        }
        if now.is_open() {
            let at = new
                .device_time
                .unwrap_or(new.first_seen_at)
                .timestamp_millis();
            self.open
                .insert((new.mac.as_str(), new.id), at)
                .map_err(db)?;
        } else if old.is_none_or(|o| o.is_open()) {
            self.open.remove((new.mac.as_str(), new.id)).map_err(db)?;
        }
        let completed_now = new.state == CaptureState::Complete
            && old.is_none_or(|o| o.state != CaptureState::Complete);
        if completed_now {
            let h = hour(new.assembled_at.unwrap_or(new.updated_at));
            let n = self
                .by_hour
                .get(h)
                .map_err(db)?
                .map(|v| v.value())
                .unwrap_or(0);
            self.by_hour.insert(h, n + 1).map_err(db)?;
        }
        Ok(())
    }

    /// A command sent to `mac`: the ids of a `missing_chunks` are counted.
    pub fn command_sent(&mut self, mac: &str, kind: &str, payload: &str) {
        if kind == "missing_chunks" {
            self.delta(mac)[5] += missing_ids(payload) as i64;
        }
    }

    /// Writes each changed device's totals.
    pub fn finish(mut self) -> Result<(), StoreError> {
        let add = |v: &mut u64, by: i64| *v = v.saturating_add_signed(by);
        for (mac, d) in std::mem::take(&mut self.deltas) {
            if d == [0; 6] {
                continue;
            }
            let mut t: CaptureTotals = match self.devices.get(mac.as_str()).map_err(db)? {
                Some(v) => dec("device_totals", v.value())?,
                None => CaptureTotals::default(),
            };
            add(&mut t.images_complete, d[0]);
            add(&mut t.failures, d[1]);
            add(&mut t.in_progress, d[2]);
            add(&mut t.retries, d[3]);
            add(&mut t.chunks_announced, d[4]);
            add(&mut t.chunks_rerequested, d[5]);
            self.devices
                .insert(mac.as_str(), enc(&t).as_slice())
                .map_err(db)?;
        }
        Ok(())
    }
}

fn missing_ids(payload: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("missing_chunks")?.as_array().map(|a| a.len() as u64))
        .unwrap_or(0)
}

/// Builds the totals and indexes from every capture and command (opening a
/// database of an earlier schema).
pub(super) fn rebuild(tx: &WriteTransaction) -> Result<(), StoreError> {
    let mut totals = Totals::open(tx)?;
    let t = tx.open_table(CAPTURES).map_err(db)?;
    for r in t.iter().map_err(db)? {
        let (_, v) = r.map_err(db)?;
        totals.capture_changed(None, &dec("captures", v.value())?)?;
    }
    let t = tx.open_table(COMMANDS).map_err(db)?;
    for r in t.iter().map_err(db)? {
        let (_, v) = r.map_err(db)?;
        let c: super::CommandRecord = dec("commands", v.value())?;
        totals.command_sent(&c.mac, &c.kind, &c.payload);
    }
    totals.finish()
}

impl super::Store {
    /// Every device's capture totals.
    pub fn capture_totals(
        &self,
    ) -> Result<std::collections::HashMap<String, CaptureTotals>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(DEVICE_TOTALS).map_err(db)?;
        let mut out = std::collections::HashMap::new();
        for r in t.iter().map_err(db)? {
            let (k, v) = r.map_err(db)?;
            out.insert(k.value().to_string(), dec("device_totals", v.value())?);
        }
        Ok(out)
    }

    /// The capture time of the device's oldest unfinished capture.
    pub fn oldest_open_capture(&self, mac: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(OPEN_CAPTURES).map_err(db)?;
        let mut oldest: Option<i64> = None;
        for r in t.range((mac, 0)..=(mac, u64::MAX)).map_err(db)? {
            let (_, v) = r.map_err(db)?;
            oldest = Some(oldest.map_or(v.value(), |o| o.min(v.value())));
        }
        Ok(oldest.and_then(DateTime::from_timestamp_millis))
    }

    /// The device's unfinished captures (neither complete nor failed).
    pub fn open_captures(&self, mac: &str) -> Result<Vec<CaptureRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let idx = tx.open_table(OPEN_CAPTURES).map_err(db)?;
        let t = tx.open_table(CAPTURES).map_err(db)?;
        let mut out = Vec::new();
        for r in idx.range((mac, 0)..=(mac, u64::MAX)).map_err(db)? {
            let (k, _) = r.map_err(db)?;
            if let Some(v) = t.get(k.value().1).map_err(db)? {
                out.push(dec("captures", v.value())?);
            }
        }
        Ok(out)
    }

    /// Images completed from the hour that holds `since` on.
    pub fn completed_since(&self, since: DateTime<Utc>) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(COMPLETED_BY_HOUR).map_err(db)?;
        let mut n = 0;
        for r in t.range(hour(since)..).map_err(db)? {
            n += r.map_err(db)?.1.value();
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Batch, Store};

    /// The totals kept by commits equal those rebuilt from every capture.
    #[test]
    fn totals_kept_by_commits_match_a_rebuild() {
        let store = Store::open_in_memory().unwrap();
        let now = Utc::now();
        let mut rec = crate::store::tests::capture(1, 100, 10);
        rec.state = CaptureState::Announced;
        let mut b = Batch::default();
        b.capture(&rec);
        store.commit(b, now).unwrap();
        rec.state = CaptureState::Failed;
        rec.failures = 1;
        rec.retries = 3;
        let mut b = Batch::default();
        b.capture(&rec);
        store.commit(b, now).unwrap();
        rec.state = CaptureState::Complete;
        rec.assembled_at = Some(now);
        let mut b = Batch::default();
        b.capture(&rec);
        store.commit(b, now).unwrap();
        let kept = store.capture_totals().unwrap();
        let t = &kept["AABBCCDDEEFF"];
        assert_eq!(
            (t.images_complete, t.failures, t.in_progress, t.retries),
            (1, 1, 0, 3)
        );
        assert_eq!(store.oldest_open_capture("AABBCCDDEEFF").unwrap(), None);
        assert_eq!(store.completed_since(now).unwrap(), 1);
        let tx = store.db.begin_write().unwrap();
        tx.delete_table(DEVICE_TOTALS).unwrap();
        tx.delete_table(OPEN_CAPTURES).unwrap();
        tx.delete_table(COMPLETED_BY_HOUR).unwrap();
        rebuild(&tx).unwrap();
        tx.commit().unwrap();
        assert_eq!(store.capture_totals().unwrap(), kept);
        assert_eq!(store.completed_since(now).unwrap(), 1);
    }
}
