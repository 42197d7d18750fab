//! The schema version, the tables every store has once opened, and the
//! migrations from earlier versions, run one step at a time inside the
//! opening transaction.

use super::partials::encode_run;
use super::{
    db, dec, enc, totals, OutboxItem, Store, StoreError, TelemetryRecord, ALERTS, CAPTURES,
    CAPTURE_NAMES, COMMANDS, DEVICES, DEVICE_CAPTURES, IMAGES, META, OUTBOX, PARTIALS, SESSIONS,
    SYNC, TELEMETRY, UPLOADS,
};
use redb::{ReadableTable, TableDefinition};
use std::collections::HashMap;

/// Bump when a table or record changes incompatibly; `open` migrates or refuses.
/// 2: chunks in PARTIALS runs instead of CHUNKS rows (1 migrates on open).
/// 3: per-device capture totals and their indexes (built on open from 2).
/// 4: telemetry keyed by (MAC, capture id) instead of (MAC, device time), so
///    two captures stamped with the same time keep one row each (3 re-keys
///    its rows and its queued outbox items on open).
pub const SCHEMA_VERSION: u64 = 4;

/// Schema 1's chunk rows, `(capture id, chunk id)` → bytes; only read to migrate.
const CHUNKS_V1: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("chunks");
/// Schema 3's telemetry, `(MAC, device time ms)` → record; only read to migrate.
const TELEMETRY_V3: TableDefinition<(&str, i64), &[u8]> = TableDefinition::new("telemetry");

/// Schema 1 → 2: folds the CHUNKS rows into one PARTIALS run per capture
/// and deletes the CHUNKS table, inside the opening transaction.
fn migrate_chunks_to_partials(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    {
        let chunks = tx.open_table(CHUNKS_V1).map_err(db)?;
        let mut partials = tx.open_table(PARTIALS).map_err(db)?;
        let mut current: Option<(u64, Vec<u8>)> = None;
        // Rows come sorted by (capture, chunk id), which is a run's order.
        for r in chunks.iter().map_err(db)? {
            let (k, v) = r.map_err(db)?;
            let (cid, id) = k.value();
            if current.as_ref().is_some_and(|(c, _)| *c != cid) {
                if let Some((c, run)) = current.take() {
                    partials.insert((c, 0), run.as_slice()).map_err(db)?;
                }
            }
            let run = &mut current.get_or_insert_with(|| (cid, Vec::new())).1;
            run.extend(encode_run([(id, v.value())]));
        }
        if let Some((c, run)) = current {
            partials.insert((c, 0), run.as_slice()).map_err(db)?;
        }
    }
    tx.delete_table(CHUNKS_V1).map_err(db)?;
    Ok(())
}

/// Schema 3 → 4: moves every telemetry row from its `(MAC, device time)`
/// key to `(MAC, capture id)` and re-keys the queued `telemetry` outbox
/// items the same way, inside the opening transaction. Rows that shared a
/// key in 3 had already overwritten each other; nothing more is lost.
fn migrate_telemetry_to_capture_keys(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut by_old_key: HashMap<(String, i64), u64> = HashMap::new();
    {
        let old = tx.open_table(TELEMETRY_V3).map_err(db)?;
        let mut new = tx.open_table(TELEMETRY).map_err(db)?;
        for r in old.iter().map_err(db)? {
            let (k, v) = r.map_err(db)?;
            let (mac, ms) = k.value();
            let rec: TelemetryRecord = dec("telemetry", v.value())?;
            new.insert((mac, rec.capture_id), v.value()).map_err(db)?;
            by_old_key.insert((mac.to_string(), ms), rec.capture_id);
        }
    }
    tx.delete_table(TELEMETRY_V3).map_err(db)?;
    let mut outbox = tx.open_table(OUTBOX).map_err(db)?;
    let mut rekeyed = Vec::new();
    for r in outbox.iter().map_err(db)? {
        let (k, v) = r.map_err(db)?;
        let mut item: OutboxItem = dec("outbox", v.value())?;
        if item.kind != "telemetry" {
            continue;
        }
        let id = item
            .key
            .parse::<i64>()
            .ok()
            .and_then(|ms| by_old_key.get(&(item.mac.clone(), ms)));
        // An item whose row is gone is dropped by the forwarder either way.
        item.key = id.map(|id| id.to_string()).unwrap_or_default();
        rekeyed.push((k.value(), item));
    }
    for (seq, item) in rekeyed {
        outbox.insert(seq, enc(&item).as_slice()).map_err(db)?;
    }
    Ok(())
}

impl Store {
    /// Creates the tables of a new store, or migrates an earlier schema's,
    /// in one transaction; a newer schema is refused.
    pub(super) fn init_schema(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut meta = tx.open_table(META).map_err(db)?;
            let found = meta.get("schema_version").map_err(db)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION).map_err(db)?;
                }
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::SchemaTooNew {
                        found: v,
                        supported: SCHEMA_VERSION,
                    })
                }
                // Older versions migrate here, one step at a time.
                Some(mut v) => {
                    if v == 1 {
                        migrate_chunks_to_partials(&tx)?;
                        v = 2;
                    }
                    if v == 2 {
                        totals::rebuild(&tx)?;
                        v = 3;
                    }
                    if v == 3 {
                        migrate_telemetry_to_capture_keys(&tx)?;
                        v = 4;
                    }
                    meta.insert("schema_version", v).map_err(db)?;
                }
            }
            tx.open_table(DEVICES).map_err(db)?;
            tx.open_table(SESSIONS).map_err(db)?;
            tx.open_table(CAPTURES).map_err(db)?;
            tx.open_table(CAPTURE_NAMES).map_err(db)?;
            tx.open_table(DEVICE_CAPTURES).map_err(db)?;
            tx.open_table(PARTIALS).map_err(db)?;
            tx.open_table(IMAGES).map_err(db)?;
            tx.open_table(TELEMETRY).map_err(db)?;
            tx.open_table(COMMANDS).map_err(db)?;
            tx.open_table(ALERTS).map_err(db)?;
            tx.open_table(OUTBOX).map_err(db)?;
            tx.open_table(SYNC).map_err(db)?;
            tx.open_table(UPLOADS).map_err(db)?;
            tx.open_table(totals::DEVICE_TOTALS).map_err(db)?;
            tx.open_table(totals::OPEN_CAPTURES).map_err(db)?;
            tx.open_table(totals::COMPLETED_BY_HOUR).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(())
    }

    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let meta = tx.open_table(META).map_err(db)?;
        Ok(meta
            .get("schema_version")
            .map_err(db)?
            .map(|v| v.value())
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{capture, t0};
    use crate::store::{Batch, Finalize};
    use chrono::DateTime;
    use redb::Database;

    #[test]
    fn version_1_chunk_rows_migrate_to_partials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            // A schema-1 file as barngate 1 wrote it: one CHUNKS row per chunk.
            let d = Database::create(&path).unwrap();
            let tx = d.begin_write().unwrap();
            {
                let mut meta = tx.open_table(META).unwrap();
                meta.insert("schema_version", 1).unwrap();
                let mut chunks = tx.open_table(CHUNKS_V1).unwrap();
                chunks.insert((1, 2), [3u8, 4].as_slice()).unwrap();
                chunks.insert((1, 1), [1u8, 2].as_slice()).unwrap();
                chunks.insert((9, 0), [9u8].as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.chunk_lengths(1).unwrap(), vec![(1, 2), (2, 2)]);
        assert_eq!(s.chunk_lengths(9).unwrap(), vec![(0, 1)]);
        {
            let tx = s.db.begin_read().unwrap();
            assert!(tx.open_table(CHUNKS_V1).is_err(), "CHUNKS deleted");
        }
        let mut b = Batch::default();
        b.capture(&capture(1, 5, 2));
        b.chunk(1, 3, vec![5]);
        b.finalize.push(Finalize {
            capture_id: 1,
            chunk_ids: vec![1, 2, 3],
        });
        assert!(s.commit(b, t0()).unwrap().failed.is_empty());
        assert_eq!(s.image_bytes(1).unwrap().unwrap(), vec![1, 2, 3, 4, 5]);
        drop(s);
        // Reopening a migrated file is a no-op.
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.chunk_lengths(9).unwrap(), vec![(0, 1)]);
    }

    #[test]
    fn version_3_telemetry_is_rekeyed_by_capture_with_its_outbox_items() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let mac = "AABBCCDDEEFF";
        let rec = |capture_id: u64, ms: i64| TelemetryRecord {
            mac: mac.into(),
            captured_at: DateTime::from_timestamp_millis(ms).unwrap(),
            received_at: t0(),
            capture_id,
            temperature: Some(capture_id as f64),
            humidity: None,
            pressure: None,
            gas_resistance: None,
            battery: Some(50.0),
            error: 0,
        };
        let ms = t0().timestamp_millis();
        {
            // A schema-3 file: telemetry keyed by (MAC, device time ms), with
            // its outbox items keyed the same way.
            let d = Database::create(&path).unwrap();
            let tx = d.begin_write().unwrap();
            {
                let mut meta = tx.open_table(META).unwrap();
                meta.insert("schema_version", 3).unwrap();
                let mut t = tx.open_table(TELEMETRY_V3).unwrap();
                t.insert((mac, ms), enc(&rec(5, ms)).as_slice()).unwrap();
                t.insert((mac, ms + 1000), enc(&rec(6, ms + 1000)).as_slice())
                    .unwrap();
                let mut o = tx.open_table(OUTBOX).unwrap();
                for (seq, key) in [(1u64, ms.to_string()), (2, (ms + 1000).to_string())] {
                    let item = OutboxItem {
                        seq,
                        kind: "telemetry".into(),
                        mac: mac.into(),
                        key,
                        queued_at: t0(),
                    };
                    o.insert(seq, enc(&item).as_slice()).unwrap();
                }
            }
            tx.commit().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), 4);
        assert_eq!(
            s.telemetry(mac).unwrap(),
            vec![rec(5, ms), rec(6, ms + 1000)]
        );
        let keys: Vec<String> = s.outbox(10).unwrap().into_iter().map(|i| i.key).collect();
        assert_eq!(keys, vec!["5", "6"]);
        assert_eq!(s.telemetry_of(mac, 6).unwrap(), Some(rec(6, ms + 1000)));
        // Now two captures with the same device time keep a row each.
        let mut b = Batch::default();
        b.telemetry.push(rec(7, ms));
        s.commit(b, t0()).unwrap();
        assert_eq!(s.telemetry(mac).unwrap().len(), 3);
        {
            let tx = s.db.begin_read().unwrap();
            assert!(tx.open_table(TELEMETRY_V3).is_err(), "old table deleted");
        }
    }
}
