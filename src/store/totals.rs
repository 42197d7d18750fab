//! Per-device capture totals, kept current by every commit, so the
//! dashboard and `/metrics` read one row per device (and the few unfinished
//! captures) instead of decoding every capture ever stored.

use super::{db, dec, enc, CaptureRecord, CaptureState, StoreError, CAPTURES, COMMANDS};
use chrono::{DateTime, Utc};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

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

fn open(c: &CaptureRecord) -> bool {
    !matches!(c.state, CaptureState::Complete | CaptureState::Failed)
}

/// What one capture adds to its device's totals.
fn contribution(c: &CaptureRecord) -> [i64; 5] {
    [
        (c.state == CaptureState::Complete) as i64,
        c.failures as i64,
        open(c) as i64,
        c.retries as i64,
        c.total_chunks().unwrap_or(0) as i64,
    ]
}

fn hour(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(3600)
}

fn update(
    tx: &WriteTransaction,
    mac: &str,
    f: impl FnOnce(&mut CaptureTotals),
) -> Result<(), StoreError> {
    let mut t = tx.open_table(DEVICE_TOTALS).map_err(db)?;
    let mut totals: CaptureTotals = match t.get(mac).map_err(db)? {
        Some(v) => dec("device_totals", v.value())?,
        None => CaptureTotals::default(),
    };
    f(&mut totals);
    t.insert(mac, enc(&totals).as_slice()).map_err(db)?;
    Ok(())
}

/// Applies a capture's change (`old` → `new`) to the totals and indexes.
pub(super) fn capture_changed(
    tx: &WriteTransaction,
    old: Option<&CaptureRecord>,
    new: &CaptureRecord,
) -> Result<(), StoreError> {
    let before = old.map(contribution).unwrap_or_default();
    let after = contribution(new);
    if before != after {
        let d: Vec<i64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        let add = |v: &mut u64, by: i64| *v = v.saturating_add_signed(by);
        update(tx, &new.mac, |t| {
            add(&mut t.images_complete, d[0]);
            add(&mut t.failures, d[1]);
            add(&mut t.in_progress, d[2]);
            add(&mut t.retries, d[3]);
            add(&mut t.chunks_announced, d[4]);
        })?;
    }
    let mut idx = tx.open_table(OPEN_CAPTURES).map_err(db)?;
    if open(new) {
        let at = new
            .device_time
            .unwrap_or(new.first_seen_at)
            .timestamp_millis();
        idx.insert((new.mac.as_str(), new.id), at).map_err(db)?;
    } else if old.is_none_or(open) {
        idx.remove((new.mac.as_str(), new.id)).map_err(db)?;
    }
    let completed_now = new.state == CaptureState::Complete
        && old.is_none_or(|o| o.state != CaptureState::Complete);
    if completed_now {
        let h = hour(new.assembled_at.unwrap_or(new.updated_at));
        let mut by_hour = tx.open_table(COMPLETED_BY_HOUR).map_err(db)?;
        let n = by_hour.get(h).map_err(db)?.map(|v| v.value()).unwrap_or(0);
        by_hour.insert(h, n + 1).map_err(db)?;
    }
    Ok(())
}

/// Counts the chunk ids of a `missing_chunks` command sent to `mac`.
pub(super) fn command_sent(
    tx: &WriteTransaction,
    mac: &str,
    kind: &str,
    payload: &str,
) -> Result<(), StoreError> {
    if kind != "missing_chunks" {
        return Ok(());
    }
    let n = missing_ids(payload);
    update(tx, mac, |t| t.chunks_rerequested += n)
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
    let captures: Vec<CaptureRecord> = {
        let t = tx.open_table(CAPTURES).map_err(db)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(db)? {
            let (_, v) = r.map_err(db)?;
            out.push(dec("captures", v.value())?);
        }
        out
    };
    for c in &captures {
        capture_changed(tx, None, c)?;
    }
    let commands: Vec<super::CommandRecord> = {
        let t = tx.open_table(COMMANDS).map_err(db)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(db)? {
            let (_, v) = r.map_err(db)?;
            out.push(dec("commands", v.value())?);
        }
        out
    };
    for c in &commands {
        command_sent(tx, &c.mac, &c.kind, &c.payload)?;
    }
    Ok(())
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
