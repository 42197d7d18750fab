//! A [`Batch`] of the ingest's changes and [`Store::commit`], which applies
//! it in one transaction: chunks into partials, finalised images verified
//! and stored, records written, and the outbox items for them queued.

use super::partials::{append_partial, parse_run, remove_partial};
use super::totals::{Counted, Totals};
use super::{
    db, dec, enc, AlertRecord, CaptureRecord, CaptureState, CommandRecord, DeviceRecord,
    OutboxItem, SessionRecord, Store, StoreError, TelemetryRecord, ALERTS, CAPTURES, CAPTURE_NAMES,
    COMMANDS, DEVICES, DEVICE_CAPTURES, IMAGES, META, NEXT_CAPTURE_ID, OUTBOX, PARTIALS, SESSIONS,
    TELEMETRY,
};
use chrono::{DateTime, Utc};
use redb::{ReadableTable, ReadableTableMetadata};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

/// A complete image: its capture and how to assemble it.
#[derive(Debug, Clone)]
pub struct Finalize {
    pub capture_id: u64,
    /// Chunk ids as sent, in image order.
    pub chunk_ids: Vec<u32>,
}

/// Changes from the ingest, applied atomically by [`Store::commit`].
#[derive(Debug, Default)]
pub struct Batch {
    pub devices: HashMap<String, DeviceRecord>,
    pub sessions: HashMap<(String, i64), SessionRecord>,
    pub captures: HashMap<u64, CaptureRecord>,
    /// (MAC, image name) → the newest capture id of that name in `captures`.
    pub(super) names: HashMap<(String, String), u64>,
    pub chunks: Vec<(u64, u32, Vec<u8>)>,
    pub finalize: Vec<Finalize>,
    pub telemetry: Vec<TelemetryRecord>,
    pub commands: Vec<CommandRecord>,
    pub alerts: HashMap<u64, AlertRecord>,
    /// Captures whose stored chunks are discarded (inconsistent content).
    pub drop_chunks: Vec<u64>,
    /// When the oldest change in this batch was made.
    pub since: Option<std::time::Instant>,
    /// Nothing waits on this batch (no ACK_OK, no command): commit it without
    /// an fsync. A crash may lose it (the chunks are requested again), never
    /// corrupt the database; the next durable commit persists it.
    pub relaxed: bool,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
            && self.sessions.is_empty()
            && self.captures.is_empty()
            && self.chunks.is_empty()
            && self.finalize.is_empty()
            && self.telemetry.is_empty()
            && self.commands.is_empty()
            && self.alerts.is_empty()
            && self.drop_chunks.is_empty()
    }
    fn touch(&mut self) {
        if self.since.is_none() {
            self.since = Some(std::time::Instant::now());
        }
    }
    pub fn device(&mut self, d: &DeviceRecord) {
        self.touch();
        self.devices.insert(d.mac.clone(), d.clone());
    }
    pub fn session(&mut self, s: &SessionRecord) {
        self.touch();
        self.sessions
            .insert((s.mac.clone(), s.woke_at.timestamp_millis()), s.clone());
    }
    pub fn capture(&mut self, c: &CaptureRecord) {
        self.touch();
        if self.captures.insert(c.id, c.clone()).is_none() {
            let newest = self
                .names
                .entry((c.mac.clone(), c.image_name.clone()))
                .or_insert(c.id);
            *newest = (*newest).max(c.id);
        }
    }
    /// The newest capture of this name in the batch.
    pub fn capture_named(&self, mac: &str, name: &str) -> Option<&CaptureRecord> {
        let id = self.names.get(&(mac.to_string(), name.to_string()))?;
        self.captures.get(id)
    }
    pub fn chunk(&mut self, capture_id: u64, chunk_id: u32, bytes: Vec<u8>) {
        self.touch();
        self.chunks.push((capture_id, chunk_id, bytes));
    }
    pub fn alert(&mut self, a: &AlertRecord) {
        self.touch();
        self.alerts.insert(a.id, a.clone());
    }
}

/// What a commit did that the caller must know about.
#[derive(Debug, Default)]
pub struct CommitReport {
    /// Captures whose assembly failed verification: (capture id, reason).
    /// They were stored as `failed`, with no image.
    pub failed: Vec<(u64, String)>,
}

impl Store {
    /// Applies a batch in one durable transaction.
    pub fn commit(&self, batch: Batch, now: DateTime<Utc>) -> Result<CommitReport, StoreError> {
        let mut report = CommitReport::default();
        let mut captures = batch.captures;
        // Every capture id the batch used, stored or not, is never handed out again.
        let max_id = captures
            .keys()
            .copied()
            .chain(batch.chunks.iter().map(|c| c.0))
            .chain(batch.drop_chunks.iter().copied())
            .max();
        let mut tx = self.db.begin_write().map_err(db)?;
        if let Some(id) = max_id {
            let mut meta = tx.open_table(META).map_err(db)?;
            let next = meta.get(NEXT_CAPTURE_ID).map_err(db)?.map(|v| v.value());
            if next.is_none_or(|n| n <= id) {
                meta.insert(NEXT_CAPTURE_ID, id + 1).map_err(db)?;
            }
        }
        if batch.relaxed {
            tx.set_durability(redb::Durability::None);
        }
        {
            let mut outbox = tx.open_table(OUTBOX).map_err(db)?;
            let mut next_seq = outbox
                .last()
                .map_err(db)?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(1);
            let mut queue = |kind: &str, mac: &str, key: String| -> Result<(), StoreError> {
                let item = OutboxItem {
                    seq: next_seq,
                    kind: kind.to_string(),
                    mac: mac.to_string(),
                    key,
                    queued_at: now,
                };
                outbox.insert(next_seq, enc(&item).as_slice()).map_err(db)?;
                next_seq += 1;
                Ok(())
            };

            {
                let mut partials = tx.open_table(PARTIALS).map_err(db)?;
                // This batch's chunks per capture; a repeated id: the later wins.
                let mut runs: BTreeMap<u64, BTreeMap<u32, &[u8]>> = BTreeMap::new();
                for (cid, chunk_id, bytes) in &batch.chunks {
                    runs.entry(*cid)
                        .or_default()
                        .insert(*chunk_id, bytes.as_slice());
                }
                for cid in &batch.drop_chunks {
                    runs.remove(cid);
                    remove_partial(&mut partials, *cid)?;
                }
                let mut images = tx.open_table(IMAGES).map_err(db)?;
                for f in &batch.finalize {
                    let Some(cap) = captures.get_mut(&f.capture_id) else {
                        continue;
                    };
                    let new = runs.remove(&f.capture_id).unwrap_or_default();
                    let mut levels = Vec::new();
                    let mut guards = Vec::new();
                    for r in partials
                        .range((cap.id, 0)..=(cap.id, u32::MAX))
                        .map_err(db)?
                    {
                        let (k, v) = r.map_err(db)?;
                        levels.push(k.value().1);
                        guards.push(v);
                    }
                    // Oldest (highest level) first, so newer chunks win. An
                    // image that streamed through in one go has no partial:
                    // its chunks are this batch's alone.
                    let merged;
                    let all = if guards.is_empty() {
                        &new
                    } else {
                        let mut m: BTreeMap<u32, &[u8]> = BTreeMap::new();
                        for g in guards.iter().rev() {
                            m.extend(parse_run(g.value())?);
                        }
                        m.extend(new.iter().map(|(k, v)| (*k, *v)));
                        merged = m;
                        &merged
                    };
                    // Hashed as it is assembled, while each chunk is in cache.
                    let mut bytes = Vec::with_capacity(cap.image_size().unwrap_or(0) as usize);
                    let mut hasher = Sha256::new();
                    let mut missing = None;
                    for id in &f.chunk_ids {
                        match all.get(id) {
                            Some(v) => {
                                bytes.extend_from_slice(v);
                                hasher.update(v);
                            }
                            None => {
                                missing = Some(*id);
                                break;
                            }
                        }
                    }
                    drop(guards);
                    for l in levels {
                        partials.remove((cap.id, l)).map_err(db)?;
                    }
                    let sha = hex::encode(hasher.finalize());
                    let problem = if let Some(id) = missing {
                        Some(format!("chunk {id} missing at assembly"))
                    } else if Some(bytes.len() as u32) != cap.image_size() {
                        Some(format!(
                            "assembled {} bytes, METADATA announced {}",
                            bytes.len(),
                            cap.image_size().unwrap_or(0)
                        ))
                    } else {
                        match cap.metadata.as_ref().and_then(|m| m.sha256.as_deref()) {
                            Some(want) if !want.eq_ignore_ascii_case(&sha) => {
                                Some(format!("SHA-256 {sha} does not match the announced {want}"))
                            }
                            _ => None,
                        }
                    };
                    if let Some(reason) = problem {
                        cap.state = CaptureState::Failed;
                        cap.failures += 1;
                        cap.failed_reason = Some(reason.clone());
                        cap.acked_at = None;
                        report.failed.push((cap.id, reason));
                        continue;
                    }
                    images.insert(cap.id, bytes.as_slice()).map_err(db)?;
                    cap.sha256 = Some(sha);
                    cap.assembled_at.get_or_insert(now);
                    queue("image", &cap.mac, cap.id.to_string())?;
                }
                for (cid, new) in &runs {
                    append_partial(&mut partials, *cid, new)?;
                }
            }

            let mut t = tx.open_table(CAPTURES).map_err(db)?;
            let mut names = tx.open_table(CAPTURE_NAMES).map_err(db)?;
            let mut by_dev = tx.open_table(DEVICE_CAPTURES).map_err(db)?;
            let mut totals = Totals::open(&tx)?;
            for c in captures.values() {
                let old = match t.get(c.id).map_err(db)? {
                    Some(v) => Some(dec::<Counted>("captures", v.value())?),
                    None => None,
                };
                totals.capture_changed(old, c)?;
                // A capture that ended failed (again) goes upstream as a row
                // with its rounds and reason; a complete one goes as "image".
                let newly_failed = c.state == CaptureState::Failed
                    && old.is_none_or(|o| {
                        o.state != CaptureState::Failed || o.failures != c.failures
                    });
                if newly_failed {
                    queue("capture", &c.mac, c.id.to_string())?;
                }
                t.insert(c.id, enc(c).as_slice()).map_err(db)?;
                let latest = names
                    .get((c.mac.as_str(), c.image_name.as_str()))
                    .map_err(db)?
                    .map(|v| v.value());
                if latest.is_none_or(|l| l <= c.id) {
                    names
                        .insert((c.mac.as_str(), c.image_name.as_str()), c.id)
                        .map_err(db)?;
                }
                by_dev.insert((c.mac.as_str(), c.id), ()).map_err(db)?;
            }

            let mut t = tx.open_table(DEVICES).map_err(db)?;
            for d in batch.devices.values() {
                t.insert(d.mac.as_str(), enc(d).as_slice()).map_err(db)?;
                queue("device", &d.mac, d.mac.clone())?;
            }
            let mut t = tx.open_table(SESSIONS).map_err(db)?;
            for ((mac, ms), s) in &batch.sessions {
                t.insert((mac.as_str(), *ms), enc(s).as_slice())
                    .map_err(db)?;
                queue("session", mac, ms.to_string())?;
            }
            let mut t = tx.open_table(TELEMETRY).map_err(db)?;
            for r in &batch.telemetry {
                t.insert((r.mac.as_str(), r.capture_id), enc(r).as_slice())
                    .map_err(db)?;
                queue("telemetry", &r.mac, r.capture_id.to_string())?;
            }
            let mut t = tx.open_table(COMMANDS).map_err(db)?;
            let first = t
                .last()
                .map_err(db)?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(1);
            for (seq, c) in (first..).zip(&batch.commands) {
                t.insert(seq, enc(c).as_slice()).map_err(db)?;
                totals.command_sent(&c.mac, &c.kind, &c.payload);
            }
            let keep = self.max_commands.load(std::sync::atomic::Ordering::Relaxed);
            let over = t.len().map_err(db)?.saturating_sub(keep);
            // Oldest first; usually as many as this batch added.
            for _ in 0..over {
                if t.pop_first().map_err(db)?.is_none() {
                    break;
                }
            }
            let mut t = tx.open_table(ALERTS).map_err(db)?;
            for a in batch.alerts.values() {
                t.insert(a.id, enc(a).as_slice()).map_err(db)?;
                queue("alert", &a.mac, a.id.to_string())?;
            }
            totals.finish()?;
        }
        tx.commit().map_err(db)?;
        Ok(report)
    }

    /// Registers or updates a device record directly (admin commands).
    pub fn put_device(&self, d: &DeviceRecord, now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.device(d);
        self.commit(b, now).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{capture, t0};

    /// An image whose chunks are all in one batch (no partial), one that
    /// matches its announced SHA-256, one that does not, one short of its
    /// announced size: only the good ones are stored, the others reported.
    #[test]
    fn finalize_verifies_size_and_announced_sha_before_storing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        let img = [9u8, 8, 7, 6, 5];
        let good = hex::encode(Sha256::digest(img));
        let mut b = Batch::default();
        for (id, sha, size) in [
            (1, None, 5),
            (2, Some(good.clone()), 5),
            (3, Some("00".repeat(32)), 5),
            (4, None, 6),
        ] {
            let mut c = capture(id, size, 2);
            c.metadata.as_mut().unwrap().sha256 = sha;
            b.capture(&c);
            // Reordered and repeated: the later copy of an id wins.
            b.chunk(id, 3, vec![0]);
            b.chunk(id, 2, img[2..4].to_vec());
            b.chunk(id, 1, img[..2].to_vec());
            b.chunk(id, 3, img[4..].to_vec());
            b.finalize.push(Finalize {
                capture_id: id,
                chunk_ids: vec![1, 2, 3],
            });
        }
        let r = s.commit(b, t0()).unwrap();
        let failed: Vec<u64> = r.failed.iter().map(|(id, _)| *id).collect();
        assert_eq!(failed, vec![3, 4], "{:?}", r.failed);
        assert!(r.failed[0].1.contains("does not match the announced"));
        assert!(r.failed[1]
            .1
            .contains("assembled 5 bytes, METADATA announced 6"));
        for id in [1, 2] {
            assert_eq!(s.image_bytes(id).unwrap().unwrap(), img.to_vec());
            assert_eq!(s.capture(id).unwrap().unwrap().sha256.unwrap(), good);
        }
        for id in [3, 4] {
            assert!(s.image_bytes(id).unwrap().is_none(), "capture {id} stored");
            let c = s.capture(id).unwrap().unwrap();
            assert_eq!(c.state, CaptureState::Failed);
            assert!(c.sha256.is_none());
        }
    }

    #[test]
    fn finalize_assembles_in_order_hashes_and_drops_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        let mut b = Batch::default();
        let mut c = capture(1, 5, 2);
        c.state = CaptureState::Receiving;
        b.capture(&c);
        b.chunk(1, 3, vec![5]);
        b.chunk(1, 1, vec![1, 2]);
        s.commit(b, t0()).unwrap();
        let mut b = Batch::default();
        b.chunk(1, 2, vec![3, 4]);
        c.state = CaptureState::Complete;
        b.capture(&c);
        b.finalize.push(Finalize {
            capture_id: 1,
            chunk_ids: vec![1, 2, 3],
        });
        let r = s.commit(b, t0()).unwrap();
        assert!(r.failed.is_empty());
        assert_eq!(s.image_bytes(1).unwrap().unwrap(), vec![1, 2, 3, 4, 5]);
        let c = s.latest_capture("AABBCCDDEEFF", "a.jpg").unwrap().unwrap();
        assert_eq!(
            c.sha256.unwrap(),
            hex::encode(Sha256::digest([1u8, 2, 3, 4, 5]))
        );
        assert!(s.chunk_lengths(1).unwrap().is_empty());
        assert_eq!(
            s.outbox(10)
                .unwrap()
                .iter()
                .filter(|o| o.kind == "image")
                .count(),
            1
        );
    }

    #[test]
    fn relaxed_commits_are_persisted_by_the_next_durable_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let s = Store::open(&path).unwrap();
            let mut b = Batch::default();
            b.chunk(3, 1, vec![9, 9]);
            b.relaxed = true;
            s.commit(b, t0()).unwrap();
            assert_eq!(s.chunk_lengths(3).unwrap(), vec![(1, 2)], "visible at once");
            // What `Engine::flush` does on shutdown: an empty durable commit.
            s.commit(Batch::default(), t0()).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(
            s.chunk_lengths(3).unwrap(),
            vec![(1, 2)],
            "survives reopening"
        );
    }

    #[test]
    fn size_mismatch_fails_the_capture_without_storing_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        let mut b = Batch::default();
        b.capture(&capture(7, 5, 2));
        b.chunk(7, 1, vec![1, 2]);
        b.chunk(7, 2, vec![3]);
        b.chunk(7, 3, vec![5]);
        b.finalize.push(Finalize {
            capture_id: 7,
            chunk_ids: vec![1, 2, 3],
        });
        let r = s.commit(b, t0()).unwrap();
        assert_eq!(r.failed.len(), 1);
        assert!(s.image_bytes(7).unwrap().is_none());
        assert_eq!(s.capture(7).unwrap().unwrap().state, CaptureState::Failed);
    }

    #[test]
    fn a_capture_that_ends_failed_is_queued_once_per_failure() {
        let s = Store::open_in_memory().unwrap();
        let mut c = capture(3, 10, 5);
        c.state = CaptureState::Receiving;
        let mut b = Batch::default();
        b.capture(&c);
        s.commit(b, t0()).unwrap();
        assert_eq!(s.outbox(10).unwrap().len(), 0);
        c.state = CaptureState::Failed;
        c.failures = 1;
        for _ in 0..2 {
            let mut b = Batch::default();
            b.capture(&c);
            s.commit(b, t0()).unwrap();
        }
        let items = s.outbox(10).unwrap();
        assert_eq!(items.len(), 1, "{items:?}");
        assert_eq!(
            (items[0].kind.as_str(), items[0].key.as_str()),
            ("capture", "3")
        );
    }
}
