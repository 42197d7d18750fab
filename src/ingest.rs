//! The ingest engine: the wake-session flow and the capture state machine of
//! GATEWAY.md §1 for both dialects. It owns every in-flight capture, the
//! device sessions and the streaming slots.
//!
//! [`Engine`] is synchronous and does no network IO: it is fed
//! `(topic, payload, now)` and ticks, collects its changes in a
//! [`Batch`], and queues outbound messages. The runner
//! (`broker::run_ingest`) commits the batch and only then publishes the
//! messages — so no ACK_OK ever precedes the durable commit of its image.

use crate::config::{IngestConfig, SiteConfig};
use crate::metrics::Metrics;
use crate::protocol::{
    normalize_device_id, parse_topic, Channel, Chunk, DataMessage, Dialect, Hello, Metadata,
    Outbound, ProtocolError,
};
use crate::schedule::Schedule;
use crate::store::{
    AlertRecord, Batch, CaptureRecord, CaptureState, CommandRecord, CommitReport, DeviceRecord,
    Finalize, Origin, SessionRecord, Store, StoreError, TelemetryRecord,
};
use chrono::{DateTime, Duration, Utc};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::{debug, info, warn};

type Key = (String, String);

/// Bytes a held chunk counts for besides its payload (its entry and
/// allocation), so that empty chunks cannot be held without limit.
const HELD_CHUNK_OVERHEAD: usize = 64;

/// A message to publish once the batch it belongs to is committed.
#[derive(Debug, Clone)]
pub struct Publish {
    pub mac: String,
    pub topic: String,
    pub payload: Vec<u8>,
    /// Send only if this capture's finalisation committed.
    pub requires_image: Option<u64>,
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

struct Active {
    rec: CaptureRecord,
    /// Chunk id as sent → byte length.
    chunks: BTreeMap<u32, u32>,
    last_chunk_at: Option<DateTime<Utc>>,
    round_started_at: DateTime<Utc>,
    /// Ids requested in the current `missing_chunks` round (one page).
    round_ids: Option<Vec<u32>>,
    chunks_this_round: u32,
    /// The id of the round's latest chunk, and whether the round's chunks
    /// have come in ascending order (as firmware sends them): then the
    /// round's last id means whatever is missing was lost.
    prev_id: Option<u32>,
    ascending: bool,
    /// `rec.retries` when this attempt began: `ingest.retry_limit` counts
    /// the rounds of one attempt, `rec.retries` those of every attempt.
    retries_at_start: u32,
    /// Received chunk bytes not yet in the batch, in arrival order. They go
    /// to the batch when the image completes (so a whole image is written
    /// once, into IMAGES, not first as partial runs) or when the capture
    /// leaves memory, gets over `ingest.held_chunk_bytes`, or the engine
    /// flushes. No chunk is acknowledged by the application before its image
    /// is stored, so a crash loses only bytes the device is asked for again.
    held: Vec<(u32, Vec<u8>)>,
    /// Allocated bytes of `held`.
    held_bytes: usize,
}

/// Moves a capture's held chunks into the batch, after any of its chunks
/// already there (a repeated id: the later wins).
fn spill(batch: &mut Batch, total: &mut usize, a: &mut Active) {
    *total -= a.held_bytes;
    a.held_bytes = 0;
    for (id, bytes) in a.held.drain(..) {
        batch.chunk(a.rec.id, id, bytes);
    }
}

impl Active {
    fn base(&self, device_base: u32) -> u32 {
        self.rec.chunk_base.unwrap_or(device_base)
    }

    fn missing(&self, device_base: u32) -> Option<Vec<u32>> {
        let total = self.rec.total_chunks()?;
        let base = self.base(device_base);
        Some(
            (base..base + total)
                .filter(|i| !self.chunks.contains_key(i))
                .collect(),
        )
    }

    /// Ids requested in this round (all of them in the first).
    fn round_len(&self) -> Option<usize> {
        match &self.round_ids {
            Some(ids) => Some(ids.len()),
            None => self.rec.total_chunks().map(|t| t as usize),
        }
    }

    fn round_last_id(&self, device_base: u32) -> Option<u32> {
        match &self.round_ids {
            Some(ids) => ids.iter().max().copied(),
            None => self
                .rec
                .total_chunks()
                .map(|t| self.base(device_base) + t.saturating_sub(1)),
        }
    }
}

pub struct Engine {
    cfg: IngestConfig,
    site: SiteConfig,
    schedule: Schedule,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    devices: HashMap<String, Device, ahash::RandomState>,
    active: HashMap<Key, Active, ahash::RandomState>,
    /// MAC → image names in `active`: a device's captures without a scan
    /// of every device's.
    active_names: HashMap<String, Vec<String>, ahash::RandomState>,
    streaming: HashSet<Key, ahash::RandomState>,
    waiting: VecDeque<Key>,
    /// The keys in `waiting`, for membership without a scan.
    waiting_set: HashSet<Key, ahash::RandomState>,
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
}

impl Engine {
    /// The counters this engine reports to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn new(
        cfg: IngestConfig,
        site: SiteConfig,
        schedule: Schedule,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Engine, IngestError> {
        let orphans = store.remove_orphan_partials()?;
        if orphans > 0 {
            warn!(
                orphans,
                "chunks of images that never got their METADATA removed from the database"
            );
        }
        store.set_command_retention(cfg.max_stored_commands);
        let next_capture_id = store.next_capture_id()?;
        let next_alert_id = store.max_alert_id()? + 1;
        let registrations = store.device_count()?;
        let mut open_alerts = HashMap::new();
        for a in store.alerts()? {
            if a.resolved_at.is_none() {
                if let Some(kind) = alert_kind(&a.kind) {
                    open_alerts.insert((a.mac.clone(), kind, a.capture_id), a);
                }
            }
        }
        Ok(Engine {
            cfg,
            site,
            schedule,
            store,
            metrics,
            devices: HashMap::default(),
            active: HashMap::default(),
            active_names: HashMap::default(),
            streaming: HashSet::default(),
            waiting: VecDeque::new(),
            waiting_set: HashSet::default(),
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

    pub fn store(&self) -> &Arc<Store> {
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
        // Only what is acknowledged must be on disk before the message goes out.
        batch.relaxed = !durable && out.is_empty();
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
                    let mut rec = crate::provision::new_record(
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
        change: &crate::provision::RegistryChange,
        now: DateTime<Utc>,
    ) -> Result<(DeviceRecord, Vec<String>), crate::provision::ProvisionError> {
        let mac = crate::pki::normalize_mac(change.mac())?;
        let existing = match self.devices.get(&mac) {
            Some(d) => Some(d.rec.clone()),
            None => self.store.device(&mac)?,
        };
        let idx = self.registrations;
        let slot = self.schedule.slot_for_index(idx);
        let mut fresh = false;
        let (rec, revoke) = crate::provision::apply_change(existing, change, |m| {
            fresh = true;
            crate::provision::new_record(
                m,
                self.site.default_dialect,
                &self.site.id,
                idx,
                slot,
                now,
            )
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
        self.outbound.push(Publish {
            mac: mac.to_string(),
            topic,
            payload,
            requires_image,
        });
    }

    fn capture_due(&self, dev: &DeviceRecord, now: DateTime<Utc>) -> bool {
        let slot_start =
            self.schedule
                .slot_start(&dev.mac, dev.schedule.as_deref(), dev.stagger_slot, now);
        dev.last_current_capture_at
            .is_none_or(|t| t < slot_start - Duration::minutes(5))
    }

    /// Computes, stores and returns the device's next wake.
    fn assign_next_wake(&mut self, mac: &str, now: DateTime<Utc>) -> DateTime<Utc> {
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

    fn on_hello(&mut self, mac: &str, h: Hello, now: DateTime<Utc>) {
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
        if let Some(v) = h.firmware_version.clone() {
            dev.rec.firmware_version = Some(v);
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

    fn request_capture(&mut self, mac: &str, now: DateTime<Utc>) {
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
    fn send_next_pending(&mut self, mac: &str, done: Option<&str>, now: DateTime<Utc>) {
        let name = self.oldest_incomplete(mac, done).unwrap_or_default();
        info!(device = %mac, image = %name, "next pending image requested");
        self.send(mac, Outbound::SendImage { image_name: name }, None, now);
    }

    fn oldest_incomplete(&self, mac: &str, done: Option<&str>) -> Option<String> {
        let caps = self.store.captures(Some(mac)).ok()?;
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

    /// Removes a device's in-flight captures from memory (they stay in the
    /// database, resumable) and frees their streaming slots.
    fn park_device_captures(&mut self, mac: &str, now: DateTime<Utc>) {
        for k in self.active_keys(mac) {
            self.park(&k, now);
        }
    }

    /// Takes a capture out of memory and frees its slot: an announced one
    /// is kept (its chunks stored as a partial, resumable), chunks without
    /// METADATA are discarded (they belong to no capture anyone can resume).
    fn park(&mut self, key: &Key, now: DateTime<Utc>) {
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
    fn discard(&mut self, key: &Key) {
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

    /// Brings a capture into memory from the database, with its chunk map.
    fn activate(&mut self, rec: CaptureRecord, now: DateTime<Utc>) -> Result<(), StoreError> {
        let key = (rec.mac.clone(), rec.image_name.clone());
        let rec_retries = rec.retries;
        let mut chunks = BTreeMap::new();
        for (id, len) in self.store.chunk_lengths(rec.id)? {
            chunks.insert(id, len);
        }
        for (cid, id, bytes) in &self.batch.chunks {
            if *cid == rec.id {
                chunks.insert(*id, bytes.len() as u32);
            }
        }
        self.insert_active(
            key,
            Active {
                rec,
                chunks,
                last_chunk_at: None,
                round_started_at: now,
                round_ids: None,
                chunks_this_round: 0,
                prev_id: None,
                ascending: true,
                retries_at_start: rec_retries,
                held: Vec::new(),
                held_bytes: 0,
            },
        );
        Ok(())
    }

    /// The newest capture with this name that is not in memory: from the
    /// uncommitted batch (just completed or failed) or else the database.
    fn lookup_capture(&self, mac: &str, name: &str) -> Result<Option<CaptureRecord>, StoreError> {
        match self.batch.capture_named(mac, name) {
            Some(c) => Ok(Some(c.clone())),
            None => self.store.latest_capture(mac, name),
        }
    }

    fn new_capture(
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

    fn origin_for(&self, mac: &str, meta: &Metadata, now: DateTime<Utc>) -> Origin {
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

    fn on_metadata(&mut self, mac: &str, meta: Metadata, raw: &[u8], now: DateTime<Utc>) {
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
        a.round_ids = None;
        a.round_started_at = now;
        a.chunks_this_round = 0;
        a.prev_id = None;
        a.ascending = true;
        self.batch.capture(&a.rec);
        self.grant_or_queue(key, now);
    }

    /// A METADATA's readings: kept with the capture, as telemetry and on
    /// the device record.
    fn record_metadata(
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
    fn capture_for_outcome(&mut self, mac: &str, name: &str, now: DateTime<Utc>) -> CaptureRecord {
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
    fn camera_failure(&mut self, mac: &str, meta: Metadata, raw: &[u8], now: DateTime<Utc>) {
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
    fn refuse_metadata(
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

    /// Lets the capture stream if a slot is free, else queues it.
    fn grant_or_queue(&mut self, key: Key, now: DateTime<Utc>) {
        if self.streaming.contains(&key) || self.streaming.len() < self.cfg.max_streaming {
            self.streaming.insert(key.clone());
            self.go(&key, now);
        } else if !self.waiting_set.contains(&key) {
            info!(device = %key.0, image = %key.1, streaming = self.streaming.len(), "streaming slots full: device waits");
            self.waiting_set.insert(key.clone());
            self.waiting.push_back(key);
        }
        self.update_gauges();
    }

    /// Tells the device to stream: the whole image, only what is missing,
    /// or nothing (already complete).
    fn go(&mut self, key: &Key, now: DateTime<Utc>) {
        let device_base = self.device_base(&key.0);
        let Some(a) = self.active.get_mut(key) else {
            return;
        };
        a.round_started_at = now;
        a.chunks_this_round = 0;
        a.prev_id = None;
        a.ascending = true;
        let mut missing = a.missing(device_base).unwrap_or_default();
        missing.truncate(self.cfg.max_missing_ids);
        if a.chunks.is_empty() {
            a.round_ids = None;
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
            a.round_ids = Some(missing.clone());
            a.rec.state = CaptureState::MissingRequested;
            self.batch.capture(&a.rec);
            Metrics::inc(&self.metrics.missing_rounds);
            self.metrics
                .missing_chunks_requested
                .fetch_add(missing.len() as u64, Ordering::Relaxed);
            self.send(
                &key.0,
                Outbound::MissingChunks {
                    image_name: key.1.clone(),
                    chunk_ids: missing,
                },
                None,
                now,
            );
        }
    }

    fn insert_active(&mut self, key: Key, a: Active) {
        let names = self.active_names.entry(key.0.clone()).or_default();
        if !names.contains(&key.1) {
            names.push(key.1.clone());
        }
        self.active.insert(key, a);
    }

    /// A device's captures in memory.
    fn active_keys(&self, mac: &str) -> Vec<Key> {
        self.active_names
            .get(mac)
            .map(|names| names.iter().map(|n| (mac.to_string(), n.clone())).collect())
            .unwrap_or_default()
    }

    /// Takes a capture out of memory, held chunks and all.
    fn take_active(&mut self, key: &Key) -> Option<Active> {
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
    fn deactivate(&mut self, key: &Key) -> Option<Active> {
        let mut a = self.take_active(key)?;
        if !a.held.is_empty() {
            spill(&mut self.batch, &mut self.held_bytes, &mut a);
            self.update_gauges();
        }
        Some(a)
    }

    fn release_slot(&mut self, key: &Key, now: DateTime<Utc>) {
        if self.waiting_set.remove(key) {
            self.waiting.retain(|k| k != key);
        }
        if self.streaming.remove(key) {
            while self.streaming.len() < self.cfg.max_streaming {
                let Some(next) = self.waiting.pop_front() else {
                    break;
                };
                self.waiting_set.remove(&next);
                if self.active.contains_key(&next) {
                    self.streaming.insert(next.clone());
                    info!(device = %next.0, image = %next.1, "streaming slot granted");
                    self.go(&next, now);
                }
            }
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        self.metrics
            .held_chunk_bytes
            .store(self.held_bytes as u64, Ordering::Relaxed);
        self.metrics
            .streaming
            .store(self.streaming.len() as u64, Ordering::Relaxed);
        self.metrics
            .waiting
            .store(self.waiting.len() as u64, Ordering::Relaxed);
    }

    /// `mac` is taken by value: it becomes the capture key without another
    /// allocation (this runs for every chunk, on the one ingest thread).
    fn on_chunk(&mut self, mac: String, mut c: Chunk, now: DateTime<Utc>) {
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
        if a.chunks.insert(id, len).is_some() {
            Metrics::inc(&self.metrics.chunk_duplicates);
        }
        self.metrics
            .chunk_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        a.last_chunk_at = Some(now);
        a.chunks_this_round += 1;
        a.ascending &= a.prev_id.is_none_or(|p| p <= id);
        a.prev_id = Some(id);
        a.rec.chunks_received = a.chunks.len() as u32;
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
    fn check_progress(&mut self, key: &Key, last_id: Option<u32>, now: DateTime<Utc>) {
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
        } else if last_id.is_some()
            && last_id == a.round_last_id(device_base)
            && a.ascending
            && (a.chunks_this_round > 1 || a.round_len() == Some(1))
        {
            // One MQTT session delivers in order: once the round's last id
            // is here after the others in order, what is missing is known,
            // and asked for at once. A device that sends out of order (or
            // whose only chunk this round is the last) waits for the quiet gap.
            let missing = a.missing(device_base).unwrap_or_default();
            self.request_missing(key, missing, "last chunk of the round arrived", now);
        }
    }

    /// Asks for what is missing, a page (`ingest.max_missing_ids`) at a time.
    /// A round counts against `ingest.retry_limit` unless the previous page
    /// arrived whole (then this is the next page, not a retry).
    fn request_missing(&mut self, key: &Key, mut missing: Vec<u32>, why: &str, now: DateTime<Utc>) {
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
        a.round_ids = Some(missing.clone());
        a.round_started_at = now;
        a.chunks_this_round = 0;
        a.prev_id = None;
        a.ascending = true;
        info!(device = %key.0, image = %key.1, missing = all_missing, requested = missing.len(), round = rounds,
              retries_left = limit.saturating_sub(rounds), why, ids = ?&missing[..missing.len().min(20)], "missing chunks requested");
        self.batch.capture(&a.rec);
        Metrics::inc(&self.metrics.missing_rounds);
        self.metrics
            .missing_chunks_requested
            .fetch_add(missing.len() as u64, Ordering::Relaxed);
        self.send(
            &key.0,
            Outbound::MissingChunks {
                image_name: key.1.clone(),
                chunk_ids: missing,
            },
            None,
            now,
        );
    }

    fn fail(&mut self, key: &Key, reason: String, now: DateTime<Utc>) {
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

    fn finalize(&mut self, key: &Key, now: DateTime<Utc>) {
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

    fn fail_and_forget_chunks(&mut self, key: &Key, reason: String, now: DateTime<Utc>) {
        if let Some(a) = self.active.get(key) {
            self.batch.drop_chunks.push(a.rec.id);
        }
        self.fail(key, reason, now);
    }

    /// ACK_OK with the next wake, then the session's next step. `stored`:
    /// the image is (being) stored; false when it is released without one.
    fn acknowledge(
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

    fn device_error(&mut self, mac: &str, code: i64, now: DateTime<Utc>) {
        warn!(device = %mac, code, "device reported an error code");
        self.raise_alert(
            mac,
            "device_error",
            "error",
            format!("Device {mac} reported error code {code}."),
            None,
            now,
        );
    }

    fn raise_alert(
        &mut self,
        mac: &str,
        kind: &'static str,
        severity: &str,
        message: String,
        capture_id: Option<u64>,
        now: DateTime<Utc>,
    ) {
        let k = (mac.to_string(), kind, capture_id);
        if self.open_alerts.contains_key(&k) {
            return;
        }
        let a = AlertRecord {
            id: self.next_alert_id,
            mac: mac.to_string(),
            kind: kind.to_string(),
            severity: severity.to_string(),
            message,
            triggered_at: now,
            resolved_at: None,
            capture_id,
        };
        self.next_alert_id += 1;
        warn!(device = %mac, alert = kind, severity, message = %a.message, "alert raised");
        self.batch.alert(&a);
        self.open_alerts.insert(k, a);
    }

    fn resolve_alert(&mut self, mac: &str, kind: &'static str, now: DateTime<Utc>) {
        self.resolve_alert_key((mac.to_string(), kind, None), now);
    }

    fn resolve_alert_key(&mut self, k: (String, &'static str, Option<u64>), now: DateTime<Utc>) {
        let (mac, kind) = (k.0.clone(), k.1);
        if let Some(mut a) = self.open_alerts.remove(&k) {
            a.resolved_at = Some(now);
            info!(device = %mac, alert = kind, "alert resolved");
            self.batch.alert(&a);
        }
    }

    fn resolve_alert_for_capture(&mut self, mac: &str, capture_id: u64, now: DateTime<Utc>) {
        self.resolve_alert_key((mac.to_string(), "image_failed", Some(capture_id)), now);
    }

    /// Timers: quiet gaps, hard timeouts, idle sessions.
    pub fn tick(&mut self, now: DateTime<Utc>) {
        let gap = Duration::milliseconds(self.cfg.quiet_gap_ms as i64);
        let hard = Duration::seconds(self.cfg.hard_timeout_s as i64);
        let mut due: Vec<(Key, &'static str)> = Vec::new();
        let mut evict: Vec<Key> = Vec::new();
        for (k, a) in &self.active {
            let in_play = self.streaming.contains(k) || a.chunks_this_round > 0;
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
            .chain(self.waiting.iter())
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
        self.streaming.iter().map(|k| k.0.clone()).collect()
    }

    /// The devices whose announced image waits for a streaming slot.
    pub fn waiting_devices(&self) -> Vec<String> {
        self.waiting.iter().map(|k| k.0.clone()).collect()
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

fn alert_kind(s: &str) -> Option<&'static str> {
    match s {
        "image_failed" => Some("image_failed"),
        "device_error" => Some("device_error"),
        "missed_wake" => Some("missed_wake"),
        "low_battery" => Some("low_battery"),
        "offline" => Some("offline"),
        _ => None,
    }
}

impl Engine {
    /// A publish whose topic is not UTF-8.
    pub fn reject_topic_bytes(&self) {
        self.metrics.reject("unknown_topic");
        warn!("message with a non-UTF-8 topic dropped");
    }
}

// --- Periodic alert rules (src/alerts.rs) -----------------------------------
impl Engine {
    /// Every `alerts::EVAL_INTERVAL_S` of clock time: runs the state rules
    /// over the registry (with this thread's newer in-memory records) and
    /// raises / resolves alerts in the pending batch.
    pub fn evaluate_alerts(&mut self, now: DateTime<Utc>) {
        let interval = Duration::seconds(crate::alerts::EVAL_INTERVAL_S);
        if self
            .alerts_evaluated_at
            .is_some_and(|t| now >= t && now - t < interval)
        {
            return;
        }
        self.alerts_evaluated_at = Some(now);
        let open: HashMap<(String, &'static str), String> = self
            .open_alerts
            .iter()
            .filter(|(k, _)| k.2.is_none())
            .map(|(k, a)| ((k.0.clone(), k.1), a.severity.clone()))
            .collect();
        // One stored record at a time, this thread's newer in-memory record
        // in its place.
        let mut changes = crate::alerts::Changes::default();
        let mut merge = |c: crate::alerts::Changes| {
            changes.resolve.extend(c.resolve);
            changes.raise.extend(c.raise);
        };
        let mut cached_seen: HashSet<&str> = HashSet::new();
        let visited = self.store.for_each_device(|stored| {
            let d = match self.devices.get_key_value(&stored.mac) {
                Some((mac, d)) => {
                    cached_seen.insert(mac.as_str());
                    &d.rec
                }
                None => &stored,
            };
            merge(crate::alerts::evaluate(std::iter::once(d), &open, now));
        });
        if let Err(e) = visited {
            warn!(error = %e, "cannot read the registry for alert rules");
            return;
        }
        // Registered in the batch not yet committed.
        let unstored = self
            .devices
            .iter()
            .filter(|(mac, _)| !cached_seen.contains(mac.as_str()))
            .map(|(_, d)| &d.rec);
        merge(crate::alerts::evaluate(unstored, &open, now));
        for (mac, kind) in changes.resolve {
            self.resolve_alert(&mac, kind, now);
        }
        for r in changes.raise {
            self.raise_alert(&r.mac, r.kind, r.severity, r.message, None, now);
        }
    }
}
