//! A capture in memory: its chunk map (id → length), its `missing_chunks`
//! rounds and the chunk bytes held until the image completes. [`Active`] is
//! pure state; the engine methods here move captures in and out of memory.

use super::{Engine, Key, Records};
use crate::store::{Batch, CaptureRecord, CaptureState, Origin, StoreError};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use tracing::{debug, info};

/// Bytes a held chunk counts for besides its payload (its entry and
/// allocation), so that empty chunks cannot be held without limit.
pub(super) const HELD_CHUNK_OVERHEAD: usize = 64;

pub(super) struct Active {
    pub(super) rec: CaptureRecord,
    /// Chunk id as sent → byte length.
    pub(super) chunks: BTreeMap<u32, u32>,
    pub(super) last_chunk_at: Option<DateTime<Utc>>,
    pub(super) round_started_at: DateTime<Utc>,
    /// Ids requested in the current `missing_chunks` round (one page).
    pub(super) round_ids: Option<Vec<u32>>,
    pub(super) chunks_this_round: u32,
    /// The id of the round's latest chunk, and whether the round's chunks
    /// have come in ascending order (as firmware sends them): then the
    /// round's last id means whatever is missing was lost.
    pub(super) prev_id: Option<u32>,
    pub(super) ascending: bool,
    /// `rec.retries` when this attempt began: `ingest.retry_limit` counts
    /// the rounds of one attempt, `rec.retries` those of every attempt.
    pub(super) retries_at_start: u32,
    /// Received chunk bytes not yet in the batch, in arrival order. They go
    /// to the batch when the image completes (so a whole image is written
    /// once, into IMAGES, not first as partial runs) or when the capture
    /// leaves memory, gets over `ingest.held_chunk_bytes`, or the engine
    /// flushes. No chunk is acknowledged by the application before its image
    /// is stored, so a crash loses only bytes the device is asked for again.
    pub(super) held: Vec<(u32, Vec<u8>)>,
    /// Allocated bytes of `held`.
    pub(super) held_bytes: usize,
}

/// Moves a capture's held chunks into the batch, after any of its chunks
/// already there (a repeated id: the later wins).
pub(super) fn spill(batch: &mut Batch, total: &mut usize, a: &mut Active) {
    *total -= a.held_bytes;
    a.held_bytes = 0;
    for (id, bytes) in a.held.drain(..) {
        batch.chunk(a.rec.id, id, bytes);
    }
}

impl Active {
    /// A capture brought into memory at `now` with the chunks already
    /// stored for it; this attempt starts at its current retry count.
    pub(super) fn new(
        rec: CaptureRecord,
        chunks: BTreeMap<u32, u32>,
        now: DateTime<Utc>,
    ) -> Active {
        Active {
            retries_at_start: rec.retries,
            rec,
            chunks,
            last_chunk_at: None,
            round_started_at: now,
            round_ids: None,
            chunks_this_round: 0,
            prev_id: None,
            ascending: true,
            held: Vec::new(),
            held_bytes: 0,
        }
    }

    pub(super) fn base(&self, device_base: u32) -> u32 {
        self.rec.chunk_base.unwrap_or(device_base)
    }

    pub(super) fn missing(&self, device_base: u32) -> Option<Vec<u32>> {
        let total = self.rec.total_chunks()?;
        let base = self.base(device_base);
        Some(
            (base..base + total)
                .filter(|i| !self.chunks.contains_key(i))
                .collect(),
        )
    }

    /// A new round: `ids` requested (`None`: the whole image).
    pub(super) fn start_round(&mut self, ids: Option<Vec<u32>>, now: DateTime<Utc>) {
        self.round_ids = ids;
        self.round_started_at = now;
        self.chunks_this_round = 0;
        self.prev_id = None;
        self.ascending = true;
    }

    /// Records a chunk's arrival (its id as sent and its length); true if
    /// that id had arrived before.
    pub(super) fn record_chunk(&mut self, id: u32, len: u32, now: DateTime<Utc>) -> bool {
        let repeated = self.chunks.insert(id, len).is_some();
        self.last_chunk_at = Some(now);
        self.chunks_this_round += 1;
        self.ascending &= self.prev_id.is_none_or(|p| p <= id);
        self.prev_id = Some(id);
        self.rec.chunks_received = self.chunks.len() as u32;
        repeated
    }

    /// True when the round's last id has just arrived after the round's
    /// other chunks in order (as firmware sends them): whatever is still
    /// missing was lost, and can be asked for at once. A round whose only
    /// chunk so far is its last one, or that came out of order, waits for
    /// the quiet gap instead.
    pub(super) fn round_ended_in_order(&self, id: u32, device_base: u32) -> bool {
        Some(id) == self.round_last_id(device_base)
            && self.ascending
            && (self.chunks_this_round > 1 || self.round_len() == Some(1))
    }

    /// Ids requested in this round (all of them in the first).
    pub(super) fn round_len(&self) -> Option<usize> {
        match &self.round_ids {
            Some(ids) => Some(ids.len()),
            None => self.rec.total_chunks().map(|t| t as usize),
        }
    }

    pub(super) fn round_last_id(&self, device_base: u32) -> Option<u32> {
        match &self.round_ids {
            Some(ids) => ids.iter().max().copied(),
            None => self
                .rec
                .total_chunks()
                .map(|t| self.base(device_base) + t.saturating_sub(1)),
        }
    }
}

impl<S: Records> Engine<S> {
    /// Brings a capture into memory from the database, with its chunk map.
    pub(super) fn activate(
        &mut self,
        rec: CaptureRecord,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let key = (rec.mac.clone(), rec.image_name.clone());
        let mut chunks = BTreeMap::new();
        for (id, len) in self.store.chunk_lengths(rec.id)? {
            chunks.insert(id, len);
        }
        for (cid, id, bytes) in &self.batch.chunks {
            if *cid == rec.id {
                chunks.insert(*id, bytes.len() as u32);
            }
        }
        self.insert_active(key, Active::new(rec, chunks, now));
        Ok(())
    }

    /// The newest capture with this name that is not in memory: from the
    /// uncommitted batch (just completed or failed) or else the database.
    pub(super) fn lookup_capture(
        &self,
        mac: &str,
        name: &str,
    ) -> Result<Option<CaptureRecord>, StoreError> {
        match self.batch.capture_named(mac, name) {
            Some(c) => Ok(Some(c.clone())),
            None => self.store.latest_capture(mac, name),
        }
    }

    pub(super) fn new_capture(
        &mut self,
        mac: &str,
        name: &str,
        version: u32,
        now: DateTime<Utc>,
    ) -> CaptureRecord {
        let id = self.next_capture_id;
        self.next_capture_id += 1;
        CaptureRecord {
            id,
            mac: mac.to_string(),
            image_name: name.to_string(),
            version,
            state: CaptureState::Announced,
            origin: Origin::Current,
            metadata: None,
            raw_metadata: None,
            device_time: None,
            first_seen_at: now,
            metadata_at: None,
            updated_at: now,
            retries: 0,
            failures: 0,
            refusals: 0,
            chunk_base: None,
            chunks_received: 0,
            sha256: None,
            assembled_at: None,
            acked_at: None,
            failed_reason: None,
        }
    }

    pub(super) fn insert_active(&mut self, key: Key, a: Active) {
        let names = self.active_names.entry(key.0.clone()).or_default();
        if !names.contains(&key.1) {
            names.push(key.1.clone());
        }
        self.active.insert(key, a);
    }

    /// A device's captures in memory.
    pub(super) fn active_keys(&self, mac: &str) -> Vec<Key> {
        self.active_names
            .get(mac)
            .map(|names| names.iter().map(|n| (mac.to_string(), n.clone())).collect())
            .unwrap_or_default()
    }

    /// Takes a capture out of memory, held chunks and all.
    pub(super) fn take_active(&mut self, key: &Key) -> Option<Active> {
        let a = self.active.remove(key)?;
        if let Some(names) = self.active_names.get_mut(&key.0) {
            names.retain(|n| *n != key.1);
            if names.is_empty() {
                self.active_names.remove(&key.0);
            }
        }
        Some(a)
    }

    /// Takes a capture out of memory; its held chunks go to the batch.
    pub(super) fn deactivate(&mut self, key: &Key) -> Option<Active> {
        let mut a = self.take_active(key)?;
        if !a.held.is_empty() {
            spill(&mut self.batch, &mut self.held_bytes, &mut a);
            self.update_gauges();
        }
        Some(a)
    }

    /// Removes a device's in-flight captures from memory (they stay in the
    /// database, resumable) and frees their streaming slots.
    pub(super) fn park_device_captures(&mut self, mac: &str, now: DateTime<Utc>) {
        for k in self.active_keys(mac) {
            self.park(&k, now);
        }
    }

    /// Takes a capture out of memory and frees its slot: an announced one
    /// is kept (its chunks stored as a partial, resumable), chunks without
    /// METADATA are discarded (they belong to no capture anyone can resume).
    pub(super) fn park(&mut self, key: &Key, now: DateTime<Utc>) {
        self.release_slot(key, now);
        if self
            .active
            .get(key)
            .is_some_and(|a| a.rec.metadata.is_none())
        {
            self.discard(key);
        } else if let Some(a) = self.deactivate(key) {
            debug!(device = %key.0, image = %key.1, state = a.rec.state.as_str(), "capture parked");
        }
    }

    /// Drops an unannounced capture and every chunk of it, held, batched or
    /// stored.
    pub(super) fn discard(&mut self, key: &Key) {
        let Some(a) = self.take_active(key) else {
            return;
        };
        self.held_bytes -= a.held_bytes;
        let id = a.rec.id;
        self.batch.chunks.retain(|(cid, _, _)| *cid != id);
        self.batch.drop_chunks.push(id);
        self.metrics.reject("chunks_without_metadata");
        info!(device = %key.0, image = %key.1, chunks = a.chunks.len(), "chunks without METADATA discarded");
        self.update_gauges();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(size: u32, chunk: u32) -> Active {
        let mut rec = crate::store::tests::capture(1, size, chunk);
        rec.state = CaptureState::Announced;
        let now = rec.first_seen_at;
        Active::new(rec, BTreeMap::new(), now)
    }

    #[test]
    fn an_in_order_round_ends_at_its_last_id() {
        let mut a = active(1000, 100);
        let now = a.round_started_at;
        for id in [1, 2, 4, 5, 7, 8, 9] {
            assert!(!a.record_chunk(id, 100, now));
            assert!(!a.round_ended_in_order(id, 1));
        }
        assert!(!a.record_chunk(10, 100, now));
        assert!(a.round_ended_in_order(10, 1));
        assert_eq!(a.missing(1), Some(vec![3, 6]));
        assert!(a.record_chunk(10, 100, now), "a repeated id is reported");
        // The next round is the missing ids; it ends at its own last id.
        a.start_round(Some(vec![3, 6]), now);
        a.record_chunk(3, 100, now);
        assert!(!a.round_ended_in_order(3, 1));
        a.record_chunk(6, 100, now);
        assert!(a.round_ended_in_order(6, 1));
        assert_eq!(a.missing(1), Some(vec![]));
    }

    #[test]
    fn an_out_of_order_round_or_a_lone_last_chunk_waits_for_the_gap() {
        let mut a = active(1000, 100);
        let now = a.round_started_at;
        a.record_chunk(10, 100, now);
        assert!(!a.round_ended_in_order(10, 1), "only the last id so far");
        let mut b = active(1000, 100);
        for id in [1, 3, 2, 10] {
            b.record_chunk(id, 100, now);
        }
        assert!(!b.round_ended_in_order(10, 1), "out of order");
        let mut c = active(100, 100);
        c.record_chunk(1, 100, now);
        assert!(c.round_ended_in_order(1, 1), "a one-chunk round");
    }
}
