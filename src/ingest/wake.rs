//! The wake: HELLO, the backlog drained oldest first (the firmware's ACK_OK
//! cue, v1's `send_image`), ACK_OK with the next wake and the session's next
//! step, and the end of a session.

use super::{Engine, Records, Session};
use crate::metrics::Metrics;
use crate::protocol::{Dialect, Hello, Metadata, Outbound};
use crate::store::{CaptureRecord, CaptureState, DeviceRecord, Origin, SessionRecord};
use chrono::{DateTime, Duration, Utc};
use tracing::info;

impl<S: Records> Engine<S> {
    pub(super) fn capture_due(&self, dev: &DeviceRecord, now: DateTime<Utc>) -> bool {
        let slot_start =
            self.schedule
                .slot_start(&dev.mac, dev.schedule.as_deref(), dev.stagger_slot, now);
        dev.last_current_capture_at
            .is_none_or(|t| t < slot_start - Duration::minutes(5))
    }

    /// Computes, stores and returns the device's next wake.
    pub(super) fn assign_next_wake(&mut self, mac: &str, now: DateTime<Utc>) -> DateTime<Utc> {
        let Some(dev) = self.devices.get_mut(mac) else {
            return now + Duration::hours(12);
        };
        let next = self.schedule.next_wake(
            &dev.rec.mac,
            dev.rec.schedule.as_deref(),
            dev.rec.stagger_slot,
            now,
        );
        if dev.rec.next_wake != Some(next) {
            dev.rec.next_wake = Some(next);
            self.batch.device(&dev.rec);
        }
        if let Some(s) = dev.session.as_mut() {
            s.rec.next_wake_assigned = Some(next);
            self.batch.session(&s.rec);
        }
        next
    }

    pub(super) fn on_hello(&mut self, mac: &str, h: Hello, now: DateTime<Utc>) {
        Metrics::inc(&self.metrics.hellos);
        let pending = h.pending();
        self.park_device_captures(mac, now);
        let Some(dev) = self.devices.get_mut(mac) else {
            return;
        };
        dev.rec.last_seen = Some(now);
        dev.rec.pending_reported = pending;
        if let Some(b) = h.battery {
            dev.rec.battery = Some(b);
        }
        if let Some(v) = h.battery_voltage {
            dev.rec.battery_voltage = Some(v);
        }
        if let Some(v) = h.firmware_version.clone() {
            dev.rec.firmware_version = Some(v);
        }
        if let Some(v) = h.hardware_version.clone() {
            dev.rec.hardware_version = Some(v);
        }
        if let Some(e) = h.error {
            // The alert rules resolve `device_error` from this field.
            dev.rec.last_error = Some(e);
        }
        let rec = SessionRecord {
            mac: mac.to_string(),
            woke_at: now,
            pending_reported: pending,
            next_wake_assigned: None,
            capture_requested: false,
            images_completed: 0,
            images_failed: 0,
        };
        self.batch.session(&rec);
        dev.session = Some(Session {
            rec,
            pending_remaining: pending,
            last_activity: now,
        });
        self.batch.device(&dev.rec);
        let dialect = dev.rec.dialect;
        info!(device = %mac, pending, %dialect, "wake session started");
        if let Some(err) = h.error.filter(|e| *e > 0) {
            self.device_error(mac, err, now);
        }
        if pending > 0 {
            match dialect {
                Dialect::Firmware => {
                    // The cue to send the oldest pending image.
                    let next = self.assign_next_wake(mac, now);
                    self.send(
                        mac,
                        Outbound::AckOk {
                            image_name: String::new(),
                            next_wake: next,
                        },
                        None,
                        now,
                    );
                }
                Dialect::V1 => self.send_next_pending(mac, None, now),
            }
        } else {
            let due = self
                .devices
                .get(mac)
                .is_some_and(|d| self.capture_due(&d.rec, now));
            if due {
                self.request_capture(mac, now);
            } else {
                let next = self.assign_next_wake(mac, now);
                info!(device = %mac, next_wake = %next, "no capture due; device told its next wake");
                self.send(mac, Outbound::NextWake { at: next }, None, now);
            }
        }
    }

    pub(super) fn request_capture(&mut self, mac: &str, now: DateTime<Utc>) {
        if let Some(s) = self.devices.get_mut(mac).and_then(|d| d.session.as_mut()) {
            s.rec.capture_requested = true;
            self.batch.session(&s.rec);
        }
        info!(device = %mac, "capture requested");
        self.send(mac, Outbound::CaptureImage, None, now);
    }

    /// v1: asks for the next pending image: the oldest the gateway knows
    /// unfinished (not `done`), else `send_image` with an empty name, which
    /// a v1 device answers with the oldest image in its queue. A new capture
    /// is never requested while a backlog is being drained.
    pub(super) fn send_next_pending(&mut self, mac: &str, done: Option<&str>, now: DateTime<Utc>) {
        let name = self.oldest_incomplete(mac, done).unwrap_or_default();
        info!(device = %mac, image = %name, "next pending image requested");
        self.send(mac, Outbound::SendImage { image_name: name }, None, now);
    }

    pub(super) fn oldest_incomplete(&self, mac: &str, done: Option<&str>) -> Option<String> {
        let caps = self.store.open_captures(mac).ok()?;
        caps.into_iter()
            // This thread's newer state of a capture wins.
            .map(|c| self.batch.captures.get(&c.id).cloned().unwrap_or(c))
            .filter(|c| {
                !matches!(c.state, CaptureState::Complete)
                    && c.metadata.is_some()
                    && c.refusals == 0
                    && Some(c.image_name.as_str()) != done
            })
            .min_by_key(|c| (c.device_time, c.id))
            .map(|c| c.image_name)
    }

    /// The device's connection ended: its streams are parked (resumable at
    /// its next wake), its streaming slots freed at once, chunks it sent
    /// without METADATA discarded, and nothing more is sent to it.
    pub fn session_ended(&mut self, mac: &str, now: DateTime<Utc>) {
        Metrics::inc(&self.metrics.sessions_ended);
        let parked = self.active_keys(mac).len();
        self.park_device_captures(mac, now);
        self.outbound.retain(|p| p.mac != mac);
        if let Some(d) = self.devices.get_mut(mac) {
            if d.session.take().is_some() || parked > 0 {
                info!(device = %mac, parked, "wake session ended: streams parked, slots freed");
            }
        }
    }

    pub(super) fn origin_for(&self, mac: &str, meta: &Metadata, now: DateTime<Utc>) -> Origin {
        let dev = self.devices.get(mac);
        if let Some(s) = dev.and_then(|d| d.session.as_ref()) {
            if s.pending_remaining > 0 {
                return Origin::Recovery;
            }
            if s.rec.capture_requested {
                return Origin::Current;
            }
        }
        match meta.captured_at() {
            Some(t) if now - t > Duration::hours(2) => Origin::Recovery,
            _ => Origin::Current,
        }
    }

    /// ACK_OK with the next wake, then the session's next step. `stored`:
    /// the image is (being) stored; false when it is released without one.
    pub(super) fn acknowledge(
        &mut self,
        mac: &str,
        rec: &CaptureRecord,
        requires: Option<u64>,
        stored: bool,
        now: DateTime<Utc>,
    ) {
        let mut drained = false;
        if let Some(s) = self.devices.get_mut(mac).and_then(|d| d.session.as_mut()) {
            if s.pending_remaining > 0
                && (rec.origin == Origin::Recovery || !s.rec.capture_requested)
            {
                s.pending_remaining -= 1;
                drained = s.pending_remaining == 0;
            }
            if stored {
                s.rec.images_completed += 1;
            } else {
                s.rec.images_failed += 1;
            }
            s.last_activity = now;
            self.batch.session(&s.rec);
        }
        let next = self.assign_next_wake(mac, now);
        self.send(
            mac,
            Outbound::AckOk {
                image_name: rec.image_name.clone(),
                next_wake: next,
            },
            requires,
            now,
        );
        let Some(dev) = self.devices.get(mac) else {
            return;
        };
        let Some(s) = dev.session.as_ref() else {
            return;
        };
        if s.pending_remaining > 0 {
            // A firmware device sends its next pending image on ACK_OK; a
            // v1 device waits to be asked for it.
            if dev.rec.dialect == Dialect::V1 {
                let done = rec.image_name.clone();
                self.send_next_pending(mac, Some(&done), now);
            }
            return;
        }
        if !s.rec.capture_requested
            && (drained || rec.origin == Origin::Recovery)
            && self.capture_due(&dev.rec, now)
        {
            info!(device = %mac, "backlog drained; a new capture is due");
            self.request_capture(mac, now);
        } else {
            self.send(mac, Outbound::NextWake { at: next }, None, now);
        }
    }
}
