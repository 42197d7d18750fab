//! The ingest: the wake-session flow and the capture state machine of
//! GATEWAY.md §1 and §8 for both dialects (the diagrams and the policy for
//! each bad input are in ARCHITECTURE.md, "The conversation").
//!
//! [`Engine`] is synchronous and does no network IO and reads no clock: it
//! is fed `(topic, payload, now)`, session ends and ticks, collects its
//! changes in a [`Batch`], and queues outbound messages. The runner
//! (`broker::run_ingest`) commits the batch and only then publishes the
//! messages — so no ACK_OK ever precedes the durable commit of its image.
//!
//! One file per concept: [`capture`] (a capture in memory: its chunk map,
//! rounds and held bytes), [`slots`] (streaming slots), `wake` (HELLO, the
//! backlog, ACK_OK and the next step, the end of a session), `announce`
//! (METADATA and its policy), `chunks` (a chunk, missing rounds, finalize,
//! fail) and `alerting` (event alerts and the periodic rules); this file is
//! the driver: routing, the device cache, commits.

mod alerting;
mod announce;
pub mod capture;
mod chunks;
pub mod queue;
mod records;
pub mod slots;
mod wake;

pub use records::Records;

use crate::config::{IngestConfig, SiteConfig};
use crate::metrics::Metrics;
use crate::protocol::{
    normalize_device_id, parse_topic, Channel, Chunk, DataMessage, Dialect, Hello, Outbound,
    ProtocolError,
};
use crate::schedule::Schedule;
use crate::store::{
    AlertRecord, Batch, CommandRecord, CommitReport, DeviceRecord, SessionRecord, Store, StoreError,
};
use alerting::alert_kind;
use capture::{spill, Active};
use chrono::{DateTime, Duration, Utc};
use slots::Slots;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::{debug, info, warn};

/// A capture in memory: (device MAC, image name).
type Key = (String, String);

/// A message to publish once the batch it belongs to is committed.
#[derive(Debug, Clone)]
pub struct Publish {
    pub mac: String,
    pub topic: String,
    pub payload: Vec<u8>,
    /// Send only if this capture's finalisation committed.
    pub requires_image: Option<u64>,
    /// The message promises something the database must hold first (an
    /// ACK_OK: the image; a next wake: the registry's copy of it), so its
    /// batch is committed durably. The others (`send_image`,
    /// `missing_chunks`, `capture_image`) promise nothing a crash could
    /// break (the device asks again, or is asked again), and go out after
    /// a commit without an fsync, which is most of a device's awake time
    /// per image otherwise.
    pub durable: bool,
}

struct Session {
    rec: SessionRecord,
    /// Reported backlog not yet delivered in this session.
    pending_remaining: u32,
    last_activity: DateTime<Utc>,
}

struct Device {
    rec: DeviceRecord,
    session: Option<Session>,
}

pub struct Engine<S: Records = Store> {
    cfg: IngestConfig,
    site: SiteConfig,
    schedule: Schedule,
    store: Arc<S>,
    metrics: Arc<Metrics>,
    devices: HashMap<String, Device, ahash::RandomState>,
    active: HashMap<Key, Active, ahash::RandomState>,
    /// MAC → image names in `active`: a device's captures without a scan
    /// of every device's.
    active_names: HashMap<String, Vec<String>, ahash::RandomState>,
    /// Streaming slots and the line for them.
    slots: Slots<Key>,
    /// Open alerts by device, kind and capture (`image_failed` is per
    /// capture; the other kinds have none).
    open_alerts: HashMap<(String, &'static str, Option<u64>), AlertRecord>,
    next_capture_id: u64,
    next_alert_id: u64,
    registrations: u64,
    batch: Batch,
    /// Sum of every active capture's `held_bytes`.
    held_bytes: usize,
    outbound: Vec<Publish>,
    /// When `crate::alerts` rules last ran (clock time).
    alerts_evaluated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

impl<S: Records> Engine<S> {
    /// The counters this engine reports to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn new(
        cfg: IngestConfig,
        site: SiteConfig,
        schedule: Schedule,
        store: Arc<S>,
        metrics: Arc<Metrics>,
    ) -> Result<Engine<S>, IngestError> {
        let orphans = store.start(cfg.max_stored_commands)?;
        if orphans > 0 {
            warn!(
                orphans,
                "chunks of images that never got their METADATA removed from the database"
            );
        }
        let (next_capture_id, next_alert_id) = store.next_ids()?;
        let registrations = store.device_count()?;
        let mut open_alerts = HashMap::new();
        for a in store.open_alerts()? {
            if let Some(kind) = alert_kind(&a.kind) {
                open_alerts.insert((a.mac.clone(), kind, a.capture_id), a);
            }
        }
        Ok(Engine {
            slots: Slots::new(cfg.max_streaming),
            cfg,
            site,
            schedule,
            store,
            metrics,
            devices: HashMap::default(),
            active: HashMap::default(),
            active_names: HashMap::default(),
            open_alerts,
            next_capture_id,
            next_alert_id,
            registrations,
            batch: Batch::default(),
            held_bytes: 0,
            outbound: Vec::new(),
            alerts_evaluated_at: None,
        })
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The site time zone wake times are rendered in (`5:30PM`).
    pub fn timezone(&self) -> chrono_tz::Tz {
        self.schedule.timezone()
    }

    /// True when the batch should be committed now: something waits on it,
    /// or chunks have waited `commit_interval_ms`.
    pub fn wants_commit(&self) -> bool {
        !self.outbound.is_empty()
            || !self.batch.finalize.is_empty()
            || self.batch.since.is_some_and(|t| {
                t.elapsed() >= std::time::Duration::from_millis(self.cfg.commit_interval_ms)
            })
            || self.batch.chunks.len() >= 4096
    }

    /// Takes the pending batch (to commit) and the messages waiting on it.
    pub fn take(&mut self) -> (Batch, Vec<Publish>) {
        (
            std::mem::take(&mut self.batch),
            std::mem::take(&mut self.outbound),
        )
    }

    /// Commits the pending batch and returns the messages that may now be sent.
    pub fn commit(&mut self, now: DateTime<Utc>) -> Result<Vec<Publish>, IngestError> {
        self.commit_inner(now, false)
    }

    /// Like [`Engine::commit`], but always durable: for a shutdown, so that
    /// every chunk received so far survives the restart.
    pub fn flush(&mut self, now: DateTime<Utc>) -> Result<Vec<Publish>, IngestError> {
        let unannounced: Vec<Key> = self
            .active
            .iter()
            .filter(|(_, a)| a.rec.metadata.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        for k in unannounced {
            self.discard(&k);
        }
        for a in self.active.values_mut() {
            spill(&mut self.batch, &mut self.held_bytes, a);
        }
        self.update_gauges();
        self.commit_inner(now, true)
    }

    fn commit_inner(
        &mut self,
        now: DateTime<Utc>,
        durable: bool,
    ) -> Result<Vec<Publish>, IngestError> {
        let (mut batch, mut out) = self.take();
        if batch.is_empty() && out.is_empty() {
            if durable {
                // Persist earlier relaxed commits too.
                self.store.commit(batch, now)?;
            }
            return Ok(out);
        }
        // Only what a message promises must be on disk before it goes out.
        batch.relaxed = !durable && !out.iter().any(|p| p.durable);
        let report = self.store.commit(batch, now)?;
        Metrics::inc(&self.metrics.commits);
        if !report.failed.is_empty() {
            out = self.after_failed_finalize(report, out, now);
        }
        self.metrics
            .commands_sent
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    fn after_failed_finalize(
        &mut self,
        report: CommitReport,
        out: Vec<Publish>,
        now: DateTime<Utc>,
    ) -> Vec<Publish> {
        let failed: HashSet<u64> = report.failed.iter().map(|(id, _)| *id).collect();
        let kept = out
            .into_iter()
            .filter(|p| p.requires_image.is_none_or(|id| !failed.contains(&id)))
            .collect();
        for (id, reason) in report.failed {
            Metrics::inc(&self.metrics.images_failed);
            self.metrics.images_complete.fetch_sub(1, Ordering::Relaxed);
            if let Ok(Some(cap)) = self.store.capture(id) {
                warn!(device = %cap.mac, image = %cap.image_name, %reason, "image failed verification; it will be requested again");
                self.raise_alert(
                    &cap.mac,
                    "image_failed",
                    "error",
                    format!("Image {} failed verification: {reason}", cap.image_name),
                    Some(id),
                    now,
                );
                if let Some(dev) = self.devices.get(&cap.mac) {
                    let next = dev.rec.next_wake.unwrap_or(now);
                    self.send(&cap.mac, Outbound::NextWake { at: next }, None, now);
                }
            }
        }
        kept
    }

    /// Handles one MQTT publish from a device.
    pub fn handle(&mut self, topic: &str, payload: &[u8], now: DateTime<Utc>) {
        let Some((mac, channel)) = self.sender(topic, now) else {
            return;
        };
        match channel {
            Channel::Status => match Hello::parse(payload) {
                Ok(h) => self.on_hello(&mac, h, now),
                Err(e) => self.reject(Some(&mac), &e),
            },
            Channel::Data => match DataMessage::parse(payload, self.cfg.max_image_size) {
                Ok(DataMessage::Metadata(m)) => self.on_metadata(&mac, *m, payload, now),
                Ok(DataMessage::Chunk(c)) => self.on_chunk(mac, c, now),
                Err(e) => {
                    self.reject(Some(&mac), &e);
                    // A METADATA is answered even when it cannot be accepted.
                    match crate::protocol::metadata_image_name(payload) {
                        Some(Some(name)) => {
                            self.refuse_metadata(&mac, &name, None, payload, e.to_string(), now)
                        }
                        Some(None) => {
                            let next = self.assign_next_wake(&mac, now);
                            warn!(device = %mac, next_wake = %next, "METADATA without a usable image name: device told its next wake");
                            self.send(&mac, Outbound::NextWake { at: next }, None, now);
                        }
                        None => {}
                    }
                }
            },
            Channel::Cmd | Channel::Ack => {}
        }
    }

    /// Handles a chunk already parsed from `topic`'s payload (the front
    /// parses chunks on its own threads, so the ingest thread does not).
    pub fn handle_chunk(&mut self, topic: &str, chunk: Chunk, now: DateTime<Utc>) {
        let Some((mac, channel)) = self.sender(topic, now) else {
            return;
        };
        if channel == Channel::Data {
            self.on_chunk(mac, chunk, now);
        } else {
            self.reject(Some(&mac), &ProtocolError::UnknownTopic(topic.to_string()));
        }
    }

    /// Counts a message and finds its device (registered, or registered now
    /// when allowed) and channel; `None` if it is to be dropped.
    fn sender(&mut self, topic: &str, now: DateTime<Utc>) -> Option<(String, Channel)> {
        Metrics::inc(&self.metrics.messages_in);
        let t = match parse_topic(topic) {
            Ok(t) => t,
            Err(e) => {
                self.reject(None, &e);
                return None;
            }
        };
        let channel = t.channel;
        if matches!(channel, Channel::Cmd | Channel::Ack) {
            // Our own commands, echoed by the broker's wildcard subscription.
            return None;
        }
        let mac = match normalize_device_id(t.wire_id) {
            Ok(m) => m,
            Err(e) => {
                self.reject(None, &e);
                return None;
            }
        };
        if !self.ensure_device(&mac, t.wire_id, t.dialect, now) {
            self.metrics.reject("unknown_device");
            warn!(device = %mac, "message from an unregistered device dropped");
            return None;
        }
        Some((mac, channel))
    }

    fn reject(&self, mac: Option<&str>, e: &ProtocolError) {
        self.metrics.reject(e.kind());
        warn!(device = mac.unwrap_or("?"), error = %e, "message dropped");
    }

    fn reject_reason(&self, mac: &str, image: &str, reason: &'static str, detail: String) {
        self.metrics.reject(reason);
        warn!(device = %mac, image = %image, reason, %detail, "message dropped");
    }

    /// A publish whose topic is not UTF-8.
    pub fn reject_topic_bytes(&self) {
        self.metrics.reject("unknown_topic");
        warn!("message with a non-UTF-8 topic dropped");
    }

    /// Loads or registers the device; false if it is unknown and may not register.
    fn ensure_device(
        &mut self,
        mac: &str,
        wire_id: &str,
        dialect: Dialect,
        now: DateTime<Utc>,
    ) -> bool {
        if !self.devices.contains_key(mac) {
            let rec = match self.store.device(mac) {
                Ok(Some(r)) => r,
                Ok(None) if self.site.auto_register => {
                    let idx = self.registrations;
                    self.registrations += 1;
                    let mut rec = DeviceRecord::new(
                        mac,
                        dialect,
                        &self.site.id,
                        idx,
                        self.schedule.slot_for_index(idx),
                        now,
                    );
                    rec.wire_id = wire_id.to_string();
                    info!(device = %mac, %dialect, slot = rec.stagger_slot, "device registered on first contact");
                    self.batch.device(&rec);
                    rec
                }
                Ok(None) => return false,
                Err(e) => {
                    warn!(device = %mac, error = %e, "cannot read device registry");
                    return false;
                }
            };
            self.devices
                .insert(mac.to_string(), Device { rec, session: None });
        }
        let Some(dev) = self.devices.get_mut(mac) else {
            return false;
        };
        if dev.rec.status == "revoked" {
            return false;
        }
        let mut changed = false;
        if !dev.rec.dialect_pinned && dev.rec.dialect != dialect {
            info!(device = %mac, from = %dev.rec.dialect, to = %dialect, "device dialect learned from its topic");
            dev.rec.dialect = dialect;
            changed = true;
        }
        if dev.rec.wire_id != wire_id {
            dev.rec.wire_id = wire_id.to_string();
            changed = true;
        }
        if changed {
            self.batch.device(&dev.rec);
        }
        true
    }

    /// Applies an admin's registry change (`device issue` / `device revoke`)
    /// to the cached and stored record; the caller commits. Returns the new
    /// record and the certificate serials to revoke.
    pub fn apply_registry(
        &mut self,
        change: &crate::registry::RegistryChange,
        now: DateTime<Utc>,
    ) -> Result<(DeviceRecord, Vec<String>), IngestError> {
        let mac =
            crate::ident::normalize(change.mac()).map_err(crate::registry::RegistryError::from)?;
        let existing = match self.devices.get(&mac) {
            Some(d) => Some(d.rec.clone()),
            None => self.store.device(&mac)?,
        };
        let idx = self.registrations;
        let slot = self.schedule.slot_for_index(idx);
        let mut fresh = false;
        let (rec, revoke) = crate::registry::apply_change(existing, change, |m| {
            fresh = true;
            DeviceRecord::new(m, self.site.default_dialect, &self.site.id, idx, slot, now)
        })?;
        if fresh {
            self.registrations += 1;
        }
        info!(device = %mac, status = %rec.status, serial = rec.cert_serial.as_deref().unwrap_or("-"), "device registry changed by an admin");
        self.batch.device(&rec);
        match self.devices.get_mut(&mac) {
            Some(d) => d.rec = rec.clone(),
            None => {
                self.devices.insert(
                    mac,
                    Device {
                        rec: rec.clone(),
                        session: None,
                    },
                );
            }
        }
        Ok((rec, revoke))
    }

    fn device_base(&self, mac: &str) -> u32 {
        self.devices
            .get(mac)
            .map(|d| d.rec.chunk_base.unwrap_or(d.rec.dialect.chunk_base()))
            .unwrap_or(1)
    }

    /// Queues a message for after the commit, logging it in the commands table.
    fn send(&mut self, mac: &str, msg: Outbound, requires_image: Option<u64>, now: DateTime<Utc>) {
        let Some(dev) = self.devices.get(mac) else {
            return;
        };
        let (topic, payload) =
            msg.render(dev.rec.dialect, &dev.rec.wire_id, self.schedule.timezone());
        debug!(device = %mac, kind = msg.kind(), %topic, "command queued");
        self.batch.commands.push(CommandRecord {
            mac: mac.to_string(),
            at: now,
            kind: msg.kind().to_string(),
            topic: topic.clone(),
            payload: String::from_utf8_lossy(&payload).into_owned(),
        });
        let durable = matches!(msg, Outbound::AckOk { .. } | Outbound::NextWake { .. });
        self.outbound.push(Publish {
            mac: mac.to_string(),
            topic,
            payload,
            requires_image,
            durable,
        });
    }

    /// Timers: quiet gaps, hard timeouts, idle sessions.
    pub fn tick(&mut self, now: DateTime<Utc>) {
        let gap = Duration::milliseconds(self.cfg.quiet_gap_ms as i64);
        let hard = Duration::seconds(self.cfg.hard_timeout_s as i64);
        let mut due: Vec<(Key, &'static str)> = Vec::new();
        let mut evict: Vec<Key> = Vec::new();
        for (k, a) in &self.active {
            let in_play = self.slots.is_streaming(k) || a.chunks_this_round > 0;
            if a.rec.metadata.is_none() {
                if a.last_chunk_at.is_none_or(|t| now - t > hard) {
                    evict.push(k.clone());
                }
                continue;
            }
            if !in_play {
                continue;
            }
            let quiet = a.chunks_this_round > 0 && a.last_chunk_at.is_some_and(|t| now - t >= gap);
            if quiet {
                due.push((k.clone(), "stream quiet"));
            } else if now - a.round_started_at >= hard {
                due.push((k.clone(), "hard timeout"));
            }
        }
        for k in evict {
            self.discard(&k);
        }
        for (k, why) in due {
            let device_base = self.device_base(&k.0);
            let missing = self.active.get(&k).and_then(|a| a.missing(device_base));
            match missing {
                Some(m) if m.is_empty() => self.finalize(&k, now),
                Some(m) => self.request_missing(&k, m, why, now),
                None => {}
            }
        }
        let idle = Duration::minutes(10);
        // A device between wakes lives only in the store: its record is
        // written with every change, so dropping it here loses nothing, and
        // the cache stays proportional to devices awake, not registered.
        let busy: HashSet<&str> = self
            .active
            .keys()
            .chain(self.slots.waiting())
            .map(|k| k.0.as_str())
            .collect();
        let pending = &self.batch.devices;
        self.devices.retain(|mac, d| {
            if d.session
                .as_ref()
                .is_some_and(|s| now - s.last_activity > idle)
            {
                d.session = None;
            }
            d.session.is_some() || busy.contains(mac.as_str()) || pending.contains_key(mac)
        });
        self.evaluate_alerts(now);
    }

    /// The devices holding a streaming slot.
    pub fn streaming_devices(&self) -> Vec<String> {
        self.slots.streaming().map(|k| k.0.clone()).collect()
    }

    /// The devices whose announced image waits for a streaming slot.
    pub fn waiting_devices(&self) -> Vec<String> {
        self.slots.waiting().map(|k| k.0.clone()).collect()
    }

    /// Number of captures in memory (bounded by devices streaming, not bytes).
    pub fn active_captures(&self) -> usize {
        self.active.len()
    }

    /// Number of device records cached (devices awake, not devices registered).
    pub fn cached_devices(&self) -> usize {
        self.devices.len()
    }
}
