//! METADATA: a capture announced, resumed or re-acknowledged, and the
//! policy for one that cannot be streamed (a camera failure is released, an
//! unacceptable one refused on a bounded number of wakes, then released).

use super::{Engine, Records};
use crate::metrics::Metrics;
use crate::protocol::{Metadata, Outbound};
use crate::store::{CaptureRecord, CaptureState, TelemetryRecord};
use chrono::{DateTime, Utc};
use tracing::{info, warn};

impl<S: Records> Engine<S> {
    pub(super) fn on_metadata(
        &mut self,
        mac: &str,
        meta: Metadata,
        raw: &[u8],
        now: DateTime<Utc>,
    ) {
        Metrics::inc(&self.metrics.metadata);
        let name = meta.image_name.clone();
        let key = (mac.to_string(), name.clone());
        if let Some(s) = self.devices.get_mut(mac).and_then(|d| d.session.as_mut()) {
            s.last_activity = now;
        }
        // A device streams one image at a time: a new METADATA parks the others.
        let mut others = self.active_keys(mac);
        others.retain(|k| k.1 != name);
        for k in others {
            self.park(&k, now);
        }
        if meta.image_size == 0 {
            return self.camera_failure(mac, meta, raw, now);
        }
        if meta.total_chunks_count > self.cfg.max_chunks_per_image {
            self.metrics.reject("too_many_chunks");
            let reason = format!(
                "{} chunks (image_size {} / max_chunk_size {}) exceed ingest.max_chunks_per_image {}",
                meta.total_chunks_count,
                meta.image_size,
                meta.max_chunk_size,
                self.cfg.max_chunks_per_image
            );
            return self.refuse_metadata(mac, &name, Some(meta), raw, reason, now);
        }
        if let Some(announced) = meta.announced_chunks {
            self.metrics.reject("total_chunks_mismatch");
            warn!(device = %mac, image = %name, announced, used = meta.total_chunks_count,
                  size = meta.image_size, max_chunk_size = meta.max_chunk_size,
                  "total_chunks_count disagrees with image_size / max_chunk_size: the chunks are counted from the size (verified at assembly)");
        }

        let existing = match self.active.get(&key) {
            Some(a) => Some(a.rec.clone()),
            None => match self.lookup_capture(mac, &name) {
                Ok(c) => c,
                Err(e) => {
                    warn!(device = %mac, image = %name, error = %e, "cannot read captures; device told its next wake");
                    let next = self.assign_next_wake(mac, now);
                    return self.send(mac, Outbound::NextWake { at: next }, None, now);
                }
            },
        };
        let same = |c: &CaptureRecord| match &c.metadata {
            None => true,
            Some(m) => {
                m.capture_timestamp == meta.capture_timestamp
                    && m.image_size == meta.image_size
                    && m.total_chunks_count == meta.total_chunks_count
            }
        };
        let mut rec = match existing {
            Some(c) if same(&c) && c.state == CaptureState::Complete => {
                Metrics::inc(&self.metrics.images_reacked);
                info!(device = %mac, image = %name, "METADATA for an image already stored: re-acknowledged");
                self.acknowledge(mac, &c, None, true, now);
                return;
            }
            Some(c) if same(&c) => c,
            Some(c) => {
                info!(device = %mac, image = %name, version = c.version + 1, "same name, different image: kept as a new version");
                self.park(&key, now);
                self.new_capture(mac, &name, c.version + 1, now)
            }
            None => self.new_capture(mac, &name, 1, now),
        };
        // A capture opens (first announced, or a failed one resumed): the
        // device's unfinished ones stay bounded.
        if rec.metadata.is_none() || rec.state == CaptureState::Failed {
            self.make_room_for_open_capture(mac, now);
        }
        if rec.metadata.is_none() {
            self.record_metadata(mac, &mut rec, &meta, raw, now);
        }
        if rec.state == CaptureState::Failed {
            info!(device = %mac, image = %name, rounds_so_far = rec.retries, "failed capture announced again: resuming");
            rec.state = CaptureState::Announced;
            rec.failed_reason = None;
        }
        rec.updated_at = now;
        info!(device = %mac, image = %name, capture = rec.id, version = rec.version,
              size = meta.image_size, chunks = meta.total_chunks_count, origin = ?rec.origin, "image announced");
        if meta.error > 0 {
            self.device_error(mac, meta.error, now);
        } else {
            self.resolve_alert(mac, "device_error", now);
        }
        if !self.active.contains_key(&key) {
            if let Err(e) = self.activate(rec.clone(), now) {
                warn!(device = %mac, image = %name, error = %e, "cannot load capture chunks; device told its next wake");
                let next = self.assign_next_wake(mac, now);
                return self.send(mac, Outbound::NextWake { at: next }, None, now);
            }
        }
        let device_base = self.device_base(mac);
        let Some(a) = self.active.get_mut(&key) else {
            return;
        };
        // Chunks that came before METADATA are checked against it now.
        let total = meta.total_chunks_count;
        let max_chunk = meta.max_chunk_size;
        if a.rec.chunk_base.is_none() {
            if a.chunks.contains_key(&0) {
                a.rec.chunk_base = Some(0);
            } else if a.chunks.contains_key(&total) {
                a.rec.chunk_base = Some(1);
            }
        }
        let base = a.base(device_base);
        let stray: Vec<u32> = a
            .chunks
            .iter()
            .filter(|(id, len)| **id < base || **id >= base + total || **len > max_chunk)
            .map(|(id, _)| *id)
            .collect();
        for id in stray {
            a.chunks.remove(&id);
        }
        a.rec = CaptureRecord {
            chunks_received: a.chunks.len() as u32,
            ..rec
        };
        a.start_round(None, now);
        self.batch.capture(&a.rec);
        self.grant_or_queue(key, now);
    }

    /// A METADATA's readings: kept with the capture, as telemetry and on
    /// the device record.
    pub(super) fn record_metadata(
        &mut self,
        mac: &str,
        rec: &mut CaptureRecord,
        meta: &Metadata,
        raw: &[u8],
        now: DateTime<Utc>,
    ) {
        rec.origin = self.origin_for(mac, meta, now);
        rec.device_time = meta.captured_at();
        rec.raw_metadata = Some(String::from_utf8_lossy(raw).into_owned());
        rec.metadata_at = Some(now);
        rec.metadata = Some(meta.clone());
        self.batch.telemetry.push(TelemetryRecord {
            mac: mac.to_string(),
            captured_at: meta.captured_at().unwrap_or(now),
            received_at: now,
            capture_id: rec.id,
            temperature: meta.temperature,
            humidity: meta.humidity,
            pressure: meta.pressure,
            gas_resistance: meta.gas_resistance,
            battery: meta.battery,
            error: meta.error,
        });
        if let Some(dev) = self.devices.get_mut(mac) {
            if let Some(loc) = &meta.location {
                dev.rec.location = Some(loc.clone());
            }
            if let Some(b) = meta.battery {
                dev.rec.battery = Some(b);
            }
            dev.rec.last_error = Some(meta.error);
            self.batch.device(&dev.rec);
        }
    }

    /// The capture a METADATA that is not streamed (a camera failure, a
    /// refusal) is recorded in: the unfinished one of that name, else a new one.
    pub(super) fn capture_for_outcome(
        &mut self,
        mac: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> CaptureRecord {
        let key = (mac.to_string(), name.to_string());
        if self.active.contains_key(&key) {
            self.park(&key, now);
        }
        match self.lookup_capture(mac, name) {
            Ok(Some(c)) if c.state != CaptureState::Complete => c,
            Ok(Some(c)) => self.new_capture(mac, name, c.version + 1, now),
            _ => self.new_capture(mac, name, 1, now),
        }
    }

    /// `image_size` 0: the camera produced no image. Its readings and error
    /// are recorded and alerted, and the entry is released with ACK_OK (there
    /// is nothing to receive) so the device moves on.
    pub(super) fn camera_failure(
        &mut self,
        mac: &str,
        meta: Metadata,
        raw: &[u8],
        now: DateTime<Utc>,
    ) {
        Metrics::inc(&self.metrics.camera_failures);
        self.metrics.reject("no_image");
        let name = meta.image_name.clone();
        let mut rec = self.capture_for_outcome(mac, &name, now);
        if rec.metadata.is_none() {
            self.record_metadata(mac, &mut rec, &meta, raw, now);
        }
        let reason = format!("camera failure: no image (error {})", meta.error);
        if rec.state != CaptureState::Failed {
            rec.failures += 1;
            Metrics::inc(&self.metrics.images_failed);
        }
        rec.state = CaptureState::Failed;
        rec.failed_reason = Some(reason.clone());
        rec.updated_at = now;
        self.batch.capture(&rec);
        warn!(device = %mac, image = %name, code = meta.error, "camera failure reported: readings recorded, entry released");
        if meta.error > 0 {
            self.device_error(mac, meta.error, now);
        } else {
            self.raise_alert(
                mac,
                "image_failed",
                "error",
                format!("Device {mac} announced image {name} with no bytes."),
                Some(rec.id),
                now,
            );
        }
        Metrics::inc(&self.metrics.images_released);
        self.acknowledge(mac, &rec, None, false, now);
    }

    /// A METADATA the gateway cannot accept (`reason`): recorded and alerted;
    /// the device is told its next wake and keeps the image, until the
    /// `ingest.release_after_refusals`-th wake, when the image is released
    /// with ACK_OK so its backlog moves on.
    pub(super) fn refuse_metadata(
        &mut self,
        mac: &str,
        name: &str,
        meta: Option<Metadata>,
        raw: &[u8],
        reason: String,
        now: DateTime<Utc>,
    ) {
        let mut rec = self.capture_for_outcome(mac, name, now);
        if rec.metadata.is_none() {
            match &meta {
                Some(m) => self.record_metadata(mac, &mut rec, m, raw, now),
                None => rec.raw_metadata = Some(String::from_utf8_lossy(raw).into_owned()),
            }
        }
        if rec.state != CaptureState::Failed {
            rec.failures += 1;
            Metrics::inc(&self.metrics.images_failed);
        }
        rec.state = CaptureState::Failed;
        rec.refusals += 1;
        rec.failed_reason = Some(reason.clone());
        rec.updated_at = now;
        self.batch.capture(&rec);
        self.raise_alert(
            mac,
            "image_failed",
            "error",
            format!("Device {mac} announced image {name} that cannot be accepted: {reason}"),
            Some(rec.id),
            now,
        );
        if rec.refusals >= self.cfg.release_after_refusals {
            Metrics::inc(&self.metrics.images_released);
            warn!(device = %mac, image = %name, refusals = rec.refusals, %reason, "METADATA refused again: image released with ACK_OK so the backlog moves on");
            self.acknowledge(mac, &rec, None, false, now);
        } else {
            let next = self.assign_next_wake(mac, now);
            warn!(device = %mac, image = %name, refusals = rec.refusals, %reason, next_wake = %next,
                  "METADATA refused: device told its next wake; the image stays pending on it");
            self.send(mac, Outbound::NextWake { at: next }, None, now);
        }
    }

    /// Keeps the device's unfinished captures under
    /// `ingest.max_open_captures_per_device` before a new one is opened: the
    /// oldest fail (one `image_failed` each) and their chunks are dropped.
    /// The device still holds those images; announced again, they resume as
    /// failed captures do.
    fn make_room_for_open_capture(&mut self, mac: &str, now: DateTime<Utc>) {
        let limit = self.cfg.max_open_captures_per_device;
        let mut open: std::collections::BTreeMap<u64, CaptureRecord> = match self
            .store
            .open_captures(mac)
        {
            Ok(v) => v.into_iter().map(|c| (c.id, c)).collect(),
            Err(e) => {
                warn!(device = %mac, error = %e, "cannot read unfinished captures; not bounded this time");
                return;
            }
        };
        // The uncommitted batch is newer than the database.
        for c in self.batch.captures.values().filter(|c| c.mac == mac) {
            if !c.state.is_finished() {
                open.insert(c.id, c.clone());
            } else {
                open.remove(&c.id);
            }
        }
        // Captures in memory (another image still streaming) are not evicted.
        open.retain(|_, c| {
            !self
                .active
                .contains_key(&(mac.to_string(), c.image_name.clone()))
        });
        let over = (open.len() + 1).saturating_sub(limit);
        for (_, mut rec) in open.into_iter().take(over) {
            self.metrics.reject("too_many_open_captures");
            Metrics::inc(&self.metrics.images_failed);
            let reason = format!(
                "superseded: the device announced more than {limit} unfinished images (ingest.max_open_captures_per_device)"
            );
            warn!(device = %mac, image = %rec.image_name, capture = rec.id, %reason, "oldest unfinished capture failed");
            rec.state = CaptureState::Failed;
            rec.failures += 1;
            rec.failed_reason = Some(reason.clone());
            rec.updated_at = now;
            self.batch.chunks.retain(|(cid, _, _)| *cid != rec.id);
            self.batch.drop_chunks.push(rec.id);
            self.batch.capture(&rec);
            self.raise_alert(
                mac,
                "image_failed",
                "error",
                format!(
                    "Device {mac} left image {} unfinished: {reason}",
                    rec.image_name
                ),
                Some(rec.id),
                now,
            );
        }
    }
}
