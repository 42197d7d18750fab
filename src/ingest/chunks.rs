//! A chunk: checked against its capture, held or batched; the rounds of
//! `missing_chunks` (asked for as soon as an in-order round ends, a page at
//! a time), the image finalised when complete, the capture failed after
//! `ingest.retry_limit` rounds; and the streaming slots they hold.

use super::capture::{spill, HELD_CHUNK_OVERHEAD};
use super::{Engine, Key, Records};
use crate::metrics::Metrics;
use crate::protocol::{Chunk, Outbound};
use crate::store::{CaptureState, Finalize, Origin};
use chrono::{DateTime, Utc};
use std::sync::atomic::Ordering;
use tracing::{debug, info, warn};

impl<S: Records> Engine<S> {
    /// Lets the capture stream if a slot is free, else queues it.
    pub(super) fn grant_or_queue(&mut self, key: Key, now: DateTime<Utc>) {
        if self.slots.request(&key) {
            self.go(&key, now);
        } else {
            info!(device = %key.0, image = %key.1, streaming = self.slots.counts().0, "streaming slots full: device waits");
        }
        self.update_gauges();
    }

    /// Tells the device to stream: the whole image, only what is missing,
    /// or nothing (already complete).
    pub(super) fn go(&mut self, key: &Key, now: DateTime<Utc>) {
        let device_base = self.device_base(&key.0);
        let Some(a) = self.active.get_mut(key) else {
            return;
        };
        let mut missing = a.missing(device_base).unwrap_or_default();
        missing.truncate(self.cfg.max_missing_ids);
        if a.chunks.is_empty() {
            a.start_round(None, now);
            self.send(
                &key.0,
                Outbound::SendImage {
                    image_name: key.1.clone(),
                },
                None,
                now,
            );
        } else if missing.is_empty() {
            self.finalize(key, now);
        } else {
            info!(device = %key.0, image = %key.1, missing = missing.len(), "resuming a partly received image: only the missing chunks are requested");
            a.start_round(Some(missing.clone()), now);
            a.rec.state = CaptureState::MissingRequested;
            self.batch.capture(&a.rec);
            self.send_missing(key, missing, now);
        }
    }

    /// Sends one page of missing ids (the capture's round has started).
    fn send_missing(&mut self, key: &Key, ids: Vec<u32>, now: DateTime<Utc>) {
        Metrics::inc(&self.metrics.missing_rounds);
        self.metrics
            .missing_chunks_requested
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        self.send(
            &key.0,
            Outbound::MissingChunks {
                image_name: key.1.clone(),
                chunk_ids: ids,
            },
            None,
            now,
        );
    }

    /// Frees the capture's slot (or its place in line) and lets the next
    /// in line stream.
    pub(super) fn release_slot(&mut self, key: &Key, now: DateTime<Utc>) {
        let active = &self.active;
        let granted = self.slots.release(key, |k| active.contains_key(k));
        for next in granted {
            info!(device = %next.0, image = %next.1, "streaming slot granted");
            self.go(&next, now);
        }
        self.update_gauges();
    }

    pub(super) fn update_gauges(&self) {
        let (streaming, waiting) = self.slots.counts();
        self.metrics
            .held_chunk_bytes
            .store(self.held_bytes as u64, Ordering::Relaxed);
        self.metrics
            .streaming
            .store(streaming as u64, Ordering::Relaxed);
        self.metrics
            .waiting
            .store(waiting as u64, Ordering::Relaxed);
    }

    /// `mac` is taken by value: it becomes the capture key without another
    /// allocation (this runs for every chunk, on the one ingest thread).
    pub(super) fn on_chunk(&mut self, mac: String, mut c: Chunk, now: DateTime<Utc>) {
        Metrics::inc(&self.metrics.chunks);
        let key = (mac, std::mem::take(&mut c.image_name));
        let mac = key.0.as_str();
        if !self.active.contains_key(&key) {
            let rec = match self.lookup_capture(mac, &key.1) {
                Ok(Some(r)) if r.state == CaptureState::Complete => {
                    Metrics::inc(&self.metrics.chunk_duplicates);
                    debug!(device = %mac, image = %key.1, chunk = c.chunk_id, "chunk for a complete image ignored");
                    return;
                }
                Ok(Some(r)) => r,
                Ok(None) => {
                    let unannounced = self
                        .active_keys(mac)
                        .iter()
                        .filter(|k| {
                            self.active
                                .get(*k)
                                .is_some_and(|a| a.rec.metadata.is_none())
                        })
                        .count();
                    if unannounced >= self.cfg.max_unannounced_per_device {
                        let detail = format!(
                            "{unannounced} images already streaming without METADATA (ingest.max_unannounced_per_device)"
                        );
                        return self.reject_reason(mac, &key.1, "too_many_unannounced", detail);
                    }
                    info!(device = %mac, image = %key.1, "chunk before METADATA: kept");
                    let mut r = self.new_capture(mac, &key.1, 1, now);
                    r.state = CaptureState::Receiving;
                    r
                }
                Err(e) => {
                    warn!(device = %mac, image = %key.1, error = %e, "cannot read captures; chunk dropped");
                    return;
                }
            };
            if let Err(e) = self.activate(rec, now) {
                warn!(device = %mac, image = %key.1, error = %e, "cannot load capture chunks; chunk dropped");
                return;
            }
        }
        let device_base = self.device_base(mac);
        let max_image = self.cfg.max_image_size;
        let Some(a) = self.active.get_mut(&key) else {
            return;
        };
        let id = c.chunk_id;
        let len = c.payload.len() as u32;
        match a
            .rec
            .metadata
            .as_ref()
            .map(|m| (m.total_chunks_count, m.max_chunk_size))
        {
            Some((total, max_chunk)) => {
                if a.rec.chunk_base.is_none() && (id == 0 || id == total) {
                    let base = if id == 0 { 0 } else { 1 };
                    a.rec.chunk_base = Some(base);
                    if let Some(d) = self.devices.get_mut(mac) {
                        if d.rec.chunk_base != Some(base) {
                            info!(device = %mac, base, "chunk-id base revealed");
                            d.rec.chunk_base = Some(base);
                            self.batch.device(&d.rec);
                        }
                    }
                }
                let base = a.base(device_base);
                if id < base || id >= base + total {
                    let detail = format!("chunk_id {id} outside {base}..{}", base + total);
                    return self.reject_reason(mac, &key.1, "chunk_out_of_range", detail);
                }
                if len > max_chunk {
                    let detail = format!("{len} bytes, max_chunk_size is {max_chunk}");
                    return self.reject_reason(mac, &key.1, "chunk_oversize", detail);
                }
            }
            None => {
                if id > max_image {
                    let detail = format!("chunk_id {id} before METADATA is beyond any image");
                    return self.reject_reason(mac, &key.1, "chunk_out_of_range", detail);
                }
                if a.rec.chunk_base.is_none() && id == 0 {
                    a.rec.chunk_base = Some(0);
                }
            }
        }
        if a.record_chunk(id, len, now) {
            Metrics::inc(&self.metrics.chunk_duplicates);
        }
        self.metrics
            .chunk_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        if a.rec.state == CaptureState::Announced {
            a.rec.state = CaptureState::Receiving;
            a.rec.updated_at = now;
            info!(device = %mac, image = %key.1, "receiving chunks");
            self.batch.capture(&a.rec);
        }
        let size = c.payload.capacity() + HELD_CHUNK_OVERHEAD;
        if self.held_bytes + size <= self.cfg.held_chunk_bytes {
            a.held.push((id, c.payload));
            a.held_bytes += size;
            self.held_bytes += size;
            self.metrics
                .held_chunk_bytes
                .store(self.held_bytes as u64, Ordering::Relaxed);
        } else {
            // Over the budget: this capture's chunks are written as they come.
            spill(&mut self.batch, &mut self.held_bytes, a);
            self.batch.chunk(a.rec.id, id, c.payload);
        }
        self.check_progress(&key, Some(id), now);
    }

    /// Finalises a complete capture, or requests what is missing when the
    /// round's last chunk has arrived.
    pub(super) fn check_progress(&mut self, key: &Key, last_id: Option<u32>, now: DateTime<Utc>) {
        let device_base = self.device_base(&key.0);
        let Some(a) = self.active.get(key) else {
            return;
        };
        let Some(total) = a.rec.total_chunks() else {
            return;
        };
        // Every stored id is in range (checked on arrival, strays dropped at
        // METADATA), so a full map means a complete image: O(1) per chunk.
        if a.chunks.len() as u64 >= total as u64 {
            self.finalize(key, now);
        } else if last_id.is_some_and(|id| a.round_ended_in_order(id, device_base)) {
            // One MQTT session delivers in order: what is missing is known.
            let missing = a.missing(device_base).unwrap_or_default();
            self.request_missing(key, missing, "last chunk of the round arrived", now);
        }
    }

    /// Asks for what is missing, a page (`ingest.max_missing_ids`) at a time.
    /// A round counts against `ingest.retry_limit` unless the previous page
    /// arrived whole (then this is the next page, not a retry).
    pub(super) fn request_missing(
        &mut self,
        key: &Key,
        mut missing: Vec<u32>,
        why: &str,
        now: DateTime<Utc>,
    ) {
        let limit = self.cfg.retry_limit;
        let page = self.cfg.max_missing_ids;
        let Some(a) = self.active.get_mut(key) else {
            return;
        };
        let next_page = a
            .round_ids
            .as_ref()
            .is_some_and(|ids| ids.iter().all(|i| a.chunks.contains_key(i)));
        let rounds = a.rec.retries.saturating_sub(a.retries_at_start);
        if !next_page {
            if rounds >= limit {
                let reason = format!(
                    "{} of {} chunks still missing after {limit} missing_chunks rounds",
                    missing.len(),
                    a.rec.total_chunks().unwrap_or(0)
                );
                return self.fail(key, reason, now);
            }
            a.rec.retries += 1;
        }
        let rounds = a.rec.retries.saturating_sub(a.retries_at_start);
        let all_missing = missing.len();
        missing.truncate(page);
        a.rec.state = CaptureState::MissingRequested;
        a.rec.updated_at = now;
        a.start_round(Some(missing.clone()), now);
        info!(device = %key.0, image = %key.1, missing = all_missing, requested = missing.len(), round = rounds,
              retries_left = limit.saturating_sub(rounds), why, ids = ?&missing[..missing.len().min(20)], "missing chunks requested");
        self.batch.capture(&a.rec);
        self.send_missing(key, missing, now);
    }

    pub(super) fn fail(&mut self, key: &Key, reason: String, now: DateTime<Utc>) {
        let Some(mut a) = self.deactivate(key) else {
            return;
        };
        self.release_slot(key, now);
        a.rec.state = CaptureState::Failed;
        a.rec.failures += 1;
        a.rec.failed_reason = Some(reason.clone());
        a.rec.updated_at = now;
        self.batch.capture(&a.rec);
        Metrics::inc(&self.metrics.images_failed);
        warn!(device = %key.0, image = %key.1, %reason, "capture failed; it stays pending on the device");
        self.raise_alert(
            &key.0,
            "image_failed",
            "error",
            format!(
                "Failed to receive image {} from device {} after {} retries: {reason}",
                key.1, key.0, a.rec.retries
            ),
            Some(a.rec.id),
            now,
        );
        if let Some(s) = self
            .devices
            .get_mut(&key.0)
            .and_then(|d| d.session.as_mut())
        {
            s.rec.images_failed += 1;
            self.batch.session(&s.rec);
        }
        let next = self.assign_next_wake(&key.0, now);
        self.send(&key.0, Outbound::NextWake { at: next }, None, now);
    }

    pub(super) fn finalize(&mut self, key: &Key, now: DateTime<Utc>) {
        let device_base = self.device_base(&key.0);
        let Some(mut a) = self.deactivate(key) else {
            return;
        };
        self.release_slot(key, now);
        let base = a.base(device_base);
        let total = a.rec.total_chunks().unwrap_or(0);
        let size: u64 = a.chunks.values().map(|l| *l as u64).sum();
        if Some(size) != a.rec.image_size().map(u64::from) {
            let reason = format!(
                "chunks add up to {size} bytes, METADATA announced {}",
                a.rec.image_size().unwrap_or(0)
            );
            // Chunk contents disagree with the announcement: start the image over.
            self.batch.chunks.retain(|(cid, _, _)| *cid != a.rec.id);
            a.chunks.clear();
            self.insert_active(key.clone(), a);
            return self.fail_and_forget_chunks(key, reason, now);
        }
        a.rec.chunk_base = Some(base);
        a.rec.state = CaptureState::Complete;
        a.rec.chunks_received = total;
        a.rec.assembled_at = Some(now);
        a.rec.acked_at = Some(now);
        a.rec.updated_at = now;
        self.batch.capture(&a.rec);
        self.batch.finalize.push(Finalize {
            capture_id: a.rec.id,
            chunk_ids: (base..base + total).collect(),
        });
        Metrics::inc(&self.metrics.images_complete);
        info!(device = %key.0, image = %key.1, capture = a.rec.id, bytes = size, retries = a.rec.retries,
              origin = ?a.rec.origin, "image complete; ACK_OK after commit");
        self.resolve_alert_for_capture(&key.0, a.rec.id, now);
        if let Some(dev) = self.devices.get_mut(&key.0) {
            if a.rec.origin == Origin::Current {
                // Stored with the image: a later wake in this slot is not
                // asked to capture again, cached or not.
                dev.rec.last_current_capture_at = Some(now);
                self.batch.device(&dev.rec);
            }
        }
        self.acknowledge(&key.0, &a.rec, Some(a.rec.id), true, now);
    }

    pub(super) fn fail_and_forget_chunks(&mut self, key: &Key, reason: String, now: DateTime<Utc>) {
        if let Some(a) = self.active.get(key) {
            self.batch.drop_chunks.push(a.rec.id);
        }
        self.fail(key, reason, now);
    }
}
