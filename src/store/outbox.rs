//! The upstream side of the store: the outbox the forwarder drains, its
//! sync state, the uploads confirmed in object storage, and the purge of
//! uploaded images' local bytes.

use super::{
    db, dec, enc, OutboxItem, Store, StoreError, SyncState, UploadRecord, IMAGES, OUTBOX, SYNC,
    UPLOADS,
};
use chrono::{DateTime, Utc};
use redb::{ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};

/// The outbox backlog in two numbers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OutboxStats {
    pub backlog: u64,
    pub oldest_queued_at: Option<DateTime<Utc>>,
}

/// Reads the forwarder state in `tx` (the default when there is none),
/// changes it with `f` and writes it back; returns it.
fn modify_sync(
    tx: &redb::WriteTransaction,
    f: impl FnOnce(&mut SyncState),
) -> Result<SyncState, StoreError> {
    let mut sync = tx.open_table(SYNC).map_err(db)?;
    let mut st: SyncState = match sync.get("state").map_err(db)? {
        Some(v) => dec("sync_state", v.value())?,
        None => SyncState::default(),
    };
    f(&mut st);
    sync.insert("state", enc(&st).as_slice()).map_err(db)?;
    Ok(st)
}

impl Store {
    pub fn outbox(&self, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(OUTBOX).map_err(db)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(db)?.take(limit) {
            let (_, v) = r.map_err(db)?;
            out.push(dec("outbox", v.value())?);
        }
        Ok(out)
    }

    pub fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(OUTBOX).map_err(db)?;
        let oldest = match t.first().map_err(db)? {
            Some((_, v)) => Some(dec::<OutboxItem>("outbox", v.value())?.queued_at),
            None => None,
        };
        Ok(OutboxStats {
            backlog: t.len().map_err(db)?,
            oldest_queued_at: oldest,
        })
    }

    /// The oldest item waiting for the upstream, if any.
    pub fn outbox_oldest(&self) -> Result<Option<OutboxItem>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(OUTBOX).map_err(db)?;
        let first = t.first().map_err(db)?;
        first.map(|(_, v)| dec("outbox", v.value())).transpose()
    }

    /// Removes delivered outbox items, records the images now safe in object
    /// storage and the success, in one short write transaction (the ingest's
    /// commits wait for it, so it does nothing else).
    pub fn outbox_ack(
        &self,
        seqs: &[u64],
        uploads: &[UploadRecord],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut t = tx.open_table(OUTBOX).map_err(db)?;
            for s in seqs {
                t.remove(*s).map_err(db)?;
            }
            let mut u = tx.open_table(UPLOADS).map_err(db)?;
            for r in uploads {
                u.insert(r.capture_id, enc(r).as_slice()).map_err(db)?;
            }
        }
        modify_sync(&tx, |st| {
            st.last_success_at = Some(now);
            st.consecutive_failures = 0;
            st.delivered_total += seqs.len() as u64;
        })?;
        tx.commit().map_err(db)
    }

    /// Records a failed delivery attempt; returns the failures since the last success.
    pub fn record_sync_error(&self, message: &str, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let st = self.update_sync_state(|st| {
            st.last_error = Some(message.to_string());
            st.last_error_at = Some(now);
            st.consecutive_failures += 1;
        })?;
        Ok(st.consecutive_failures)
    }

    /// Changes the forwarder state in one transaction; returns it.
    pub fn update_sync_state(
        &self,
        f: impl FnOnce(&mut SyncState),
    ) -> Result<SyncState, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let st = modify_sync(&tx, f)?;
        tx.commit().map_err(db)?;
        Ok(st)
    }

    pub fn sync_state(&self) -> Result<SyncState, StoreError> {
        Ok(self
            .get_json(SYNC, "sync_state", "state")?
            .unwrap_or_default())
    }

    pub fn upload(&self, capture_id: u64) -> Result<Option<UploadRecord>, StoreError> {
        self.get_json(UPLOADS, "uploads", capture_id)
    }

    /// Deletes the local bytes of uploaded images, oldest upload first: every
    /// one uploaded before `uploaded_before`, then more until `free_bytes`
    /// are freed. Records stay; an image not yet confirmed upstream is never
    /// touched. Returns (images purged, bytes freed).
    pub fn purge_uploaded_images(
        &self,
        uploaded_before: DateTime<Utc>,
        free_bytes: u64,
        now: DateTime<Utc>,
    ) -> Result<(u64, u64), StoreError> {
        let mut candidates: Vec<UploadRecord> = Vec::new();
        {
            let tx = self.db.begin_read().map_err(db)?;
            let t = tx.open_table(UPLOADS).map_err(db)?;
            for r in t.iter().map_err(db)? {
                let (_, v) = r.map_err(db)?;
                let u: UploadRecord = dec("uploads", v.value())?;
                if u.purged_at.is_none() {
                    candidates.push(u);
                }
            }
        }
        candidates.sort_by_key(|u| (u.uploaded_at, u.capture_id));
        let mut freed = 0u64;
        let mut chosen = Vec::new();
        for u in candidates {
            if u.uploaded_at >= uploaded_before && freed >= free_bytes {
                break;
            }
            freed += u.size;
            chosen.push(u);
        }
        if chosen.is_empty() {
            return Ok((0, 0));
        }
        // Short transactions: the ingest waits for each one.
        for part in chosen.chunks(256) {
            let tx = self.db.begin_write().map_err(db)?;
            {
                let mut images = tx.open_table(IMAGES).map_err(db)?;
                let mut uploads = tx.open_table(UPLOADS).map_err(db)?;
                for u in part {
                    images.remove(u.capture_id).map_err(db)?;
                    let mut u = u.clone();
                    u.purged_at = Some(now);
                    uploads
                        .insert(u.capture_id, enc(&u).as_slice())
                        .map_err(db)?;
                }
            }
            tx.commit().map_err(db)?;
        }
        Ok((chosen.len() as u64, freed))
    }
}
