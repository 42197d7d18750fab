//! One firmware-faithful device ([`SimDevice`]): transport-agnostic, fed
//! wakes, messages, timer firings and disconnects, answering with
//! [`Action`]s stamped in true time.

use super::base::{
    offline_next_wake, parse_wake, split_chunks, wifi_connect, DeviceClock, Rng, SimError,
    WifiOutcome, DEVICE_RETRY_ROUNDS, WIFI_ATTEMPTS, WIFI_ATTEMPT_TIMEOUT,
};
use super::faults::Faults;
use super::petri::petri_jpeg;
use super::sd::{SdCard, SdEntry};
use crate::protocol::{self, Channel, Dialect};
use base64::Engine as _;
use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};
use tracing::{debug, info, warn};

// ------------------------------------------------------------------- device

/// Per-device knobs.
#[derive(Debug, Clone)]
pub struct DeviceParams {
    /// Index in the fleet (for outages).
    pub index: usize,
    /// The MAC-style id used in topics and payloads.
    pub id: String,
    pub dialect: Dialect,
    pub chunk_size: usize,
    /// Crystal rate error (0.005 = +0.5 %).
    pub drift: f64,
    /// The site's time zone (to read `5:30PM`).
    pub tz: Tz,
    /// Daily wake slots remembered for offline scheduling.
    pub wakes_per_day: usize,
    /// How long the device waits for the gateway before giving up the wake.
    pub response_timeout: Duration,
    /// Wi-Fi association time once the network is there.
    pub assoc: Duration,
    /// Camera + sensor time for one capture.
    pub capture_time: Duration,
    /// Spacing of consecutive chunk publishes.
    pub chunk_interval: Duration,
    pub image_width: u16,
    pub image_height: u16,
    /// When the dish was inoculated (day 0 of colony growth).
    pub inoculated_at: DateTime<Utc>,
    pub location: String,
}

/// What a device does next; times are true time.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Publish {
        at: DateTime<Utc>,
        topic: String,
        payload: Vec<u8>,
    },
    /// Call [`SimDevice::on_timer`] with `token` at `at`.
    Timer { at: DateTime<Utc>, token: u64 },
    /// Disconnect and deep-sleep until `until`.
    Sleep { until: DateTime<Utc> },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum State {
    Asleep,
    /// HELLO sent or an image finished: waiting for the gateway's command.
    AwaitCommand,
    /// METADATA sent: waiting for send_image / missing_chunks / ACK_OK.
    AwaitGo {
        name: String,
    },
    /// Chunks sent: waiting for ACK_OK / missing_chunks.
    AwaitResult {
        name: String,
        rounds: u32,
    },
}

/// Counters one device keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStats {
    pub wakes: u64,
    pub offline_wakes: u64,
    pub wifi_retries: u64,
    pub captured: u64,
    pub delivered: u64,
    pub retry_rounds: u64,
    pub gave_up: u64,
    pub chunks_sent: u64,
    pub chunks_lost: u64,
    pub chunks_duplicated: u64,
    /// Chunks sent out of order (swapped with a later one).
    pub chunks_reordered: u64,
    pub disconnects: u64,
    pub timeouts: u64,
}

impl DeviceStats {
    /// Adds another device's counters to these (a fleet's totals).
    pub fn add(&mut self, o: &DeviceStats) {
        self.wakes += o.wakes;
        self.offline_wakes += o.offline_wakes;
        self.wifi_retries += o.wifi_retries;
        self.captured += o.captured;
        self.delivered += o.delivered;
        self.retry_rounds += o.retry_rounds;
        self.gave_up += o.gave_up;
        self.chunks_sent += o.chunks_sent;
        self.chunks_lost += o.chunks_lost;
        self.chunks_duplicated += o.chunks_duplicated;
        self.chunks_reordered += o.chunks_reordered;
        self.disconnects += o.disconnects;
        self.timeouts += o.timeouts;
    }
}

/// One simulated ESP32-CAM node.
pub struct SimDevice {
    pub params: DeviceParams,
    pub sd: SdCard,
    pub clock: DeviceClock,
    pub stats: DeviceStats,
    /// Images in the order their ACK_OK arrived.
    pub delivered_names: Vec<String>,
    /// The last next wakes received, one per daily slot.
    remembered: Vec<DateTime<Utc>>,
    /// The next wake the gateway gave in this session.
    session_next_wake: Option<DateTime<Utc>>,
    state: State,
    /// Bumped on every wake: messages for an older session are ignored.
    session: u64,
    token: u64,
    captured_this_wake: bool,
    told_to_sleep: bool,
    rng: Rng,
}

impl SimDevice {
    pub fn new(params: DeviceParams, sd: SdCard, now: DateTime<Utc>, seed: u64) -> SimDevice {
        SimDevice {
            clock: DeviceClock::new(now, params.drift),
            params,
            sd,
            stats: DeviceStats::default(),
            delivered_names: Vec::new(),
            remembered: Vec::new(),
            session_next_wake: None,
            state: State::Asleep,
            session: 0,
            token: 0,
            captured_this_wake: false,
            told_to_sleep: false,
            rng: Rng::new(seed),
        }
    }

    pub fn is_awake(&self) -> bool {
        self.state != State::Asleep
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn pending(&self) -> u32 {
        self.sd.pending_count().unwrap_or(0)
    }

    pub(crate) fn topic(&self, ch: Channel) -> String {
        protocol::topic(self.params.dialect, &self.params.id, ch)
    }

    pub(crate) fn timer(&mut self, at: DateTime<Utc>) -> Action {
        self.token += 1;
        Action::Timer {
            at,
            token: self.token,
        }
    }

    /// Keeps one remembered wake per daily slot (same time of day ± 45 min).
    pub(crate) fn remember(&mut self, w: DateTime<Utc>) {
        let day = 86_400_000i64;
        let tod = |t: &DateTime<Utc>| t.timestamp_millis().rem_euclid(day);
        self.remembered.retain(|r| {
            let d = (tod(r) - tod(&w)).abs();
            d.min(day - d) > 45 * 60_000
        });
        self.remembered.push(w);
        let keep = self.params.wakes_per_day.max(1);
        if self.remembered.len() > keep {
            let drop = self.remembered.len() - keep;
            self.remembered.drain(..drop);
        }
    }

    /// The wake to sleep until when the gateway did not say (offline, or
    /// the session broke off): the gateway's word from this session if it
    /// is still ahead, else the remembered slots + 24 h.
    pub(crate) fn fallback_wake(&mut self, true_now: DateTime<Utc>) -> DateTime<Utc> {
        let est = self.clock.estimated_now(true_now);
        let target = match self.session_next_wake.filter(|w| *w > est) {
            Some(w) => w,
            None => {
                let w = offline_next_wake(&self.remembered, est, Duration::minutes(30))
                    .unwrap_or(est + Duration::hours(24 / self.params.wakes_per_day.max(1) as i64));
                self.remember(w);
                w
            }
        };
        true_now + self.clock.true_duration(target - est)
    }

    pub(crate) fn sleep_until_device_time(
        &mut self,
        true_now: DateTime<Utc>,
        w: DateTime<Utc>,
    ) -> Action {
        let est = self.clock.estimated_now(true_now);
        let until = true_now
            + self
                .clock
                .true_duration((w - est).max(Duration::seconds(1)));
        self.state = State::Asleep;
        debug!(device = %self.params.id, wake = %w, "deep sleep");
        Action::Sleep { until }
    }

    /// Ends the wake without a word from the gateway: capture if this wake
    /// has not (offline mode still captures on schedule), then sleep.
    pub(crate) fn give_up_wake(
        &mut self,
        true_now: DateTime<Utc>,
    ) -> Result<Vec<Action>, SimError> {
        if !self.captured_this_wake && !self.told_to_sleep {
            self.capture(true_now)?;
        }
        let until = self.fallback_wake(true_now);
        self.state = State::Asleep;
        Ok(vec![Action::Sleep { until }])
    }

    /// Takes a picture and queues it on the SD card.
    pub(crate) fn capture(&mut self, true_now: DateTime<Utc>) -> Result<String, SimError> {
        let est = self.clock.estimated_now(true_now);
        let mut name = format!("img_{}.jpg", est.format("%Y%m%d_%H%M%S"));
        let mut n = 1;
        while self.sd.has_image(&name) {
            n += 1;
            name = format!("img_{}_{n}.jpg", est.format("%Y%m%d_%H%M%S"));
        }
        let day = (est - self.params.inoculated_at).num_seconds() as f64 / 86_400.0;
        let seed = self.params.id.bytes().fold(1469598103934665603u64, |h, b| {
            (h ^ b as u64).wrapping_mul(1099511628211)
        });
        let jpeg = petri_jpeg(seed, day, self.params.image_width, self.params.image_height)?;
        let phase = day * std::f64::consts::TAU;
        let entry = SdEntry {
            name: name.clone(),
            timestamp: est.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            pending: true,
            size: jpeg.len() as u32,
            temperature: 21.0 + 3.0 * phase.sin() + self.rng.range(-0.3, 0.3),
            humidity: 55.0 + 8.0 * phase.cos() + self.rng.range(-1.0, 1.0),
            pressure: 1013.0 + self.rng.range(-4.0, 4.0),
            gas_resistance: 120.0 + self.rng.range(-15.0, 15.0),
        };
        self.sd.store(&entry, &jpeg)?;
        self.captured_this_wake = true;
        self.stats.captured += 1;
        info!(device = %self.params.id, image = %name, bytes = jpeg.len(), "image captured");
        Ok(name)
    }

    /// Wakes from deep sleep: Wi-Fi, then HELLO — or offline capture and sleep.
    pub fn wake(
        &mut self,
        true_now: DateTime<Utc>,
        faults: &Faults,
    ) -> Result<Vec<Action>, SimError> {
        self.session += 1;
        self.stats.wakes += 1;
        self.captured_this_wake = false;
        self.told_to_sleep = false;
        self.session_next_wake = None;
        let idx = self.params.index;
        let rng = &mut self.rng;
        let outcome = wifi_connect(
            |attempt| {
                let t = true_now + WIFI_ATTEMPT_TIMEOUT * (attempt as i32 - 1);
                faults.wifi_up(idx, t) && !rng.chance(faults.wifi_fail_pct)
            },
            self.params.assoc,
        );
        match outcome {
            WifiOutcome::Offline { after } => {
                self.stats.offline_wakes += 1;
                self.stats.wifi_retries += WIFI_ATTEMPTS as u64;
                let t = true_now + after;
                info!(device = %self.params.id, "Wi-Fi down after 3 attempts: offline mode");
                self.capture(t)?;
                let until = self.fallback_wake(t + self.params.capture_time);
                self.state = State::Asleep;
                Ok(vec![Action::Sleep { until }])
            }
            WifiOutcome::Connected { attempt, after } => {
                self.stats.wifi_retries += attempt as u64 - 1;
                let t = true_now + after;
                self.clock.sync(t); // NTP on every online wake
                let pending = self.sd.pending_count()?;
                self.state = State::AwaitCommand;
                let hello =
                    json!({"device_id": self.params.id, "status": "alive", "pendingImg": pending});
                debug!(device = %self.params.id, pending, "HELLO");
                let timer = self.timer(t + self.params.response_timeout);
                Ok(vec![
                    Action::Publish {
                        at: t,
                        topic: self.topic(Channel::Status),
                        payload: hello.to_string().into_bytes(),
                    },
                    timer,
                ])
            }
        }
    }

    /// The connection dropped (gateway restart, broker gone).
    pub fn on_disconnect(&mut self, true_now: DateTime<Utc>) -> Result<Vec<Action>, SimError> {
        if !self.is_awake() {
            return Ok(Vec::new());
        }
        self.stats.disconnects += 1;
        warn!(device = %self.params.id, "connection lost");
        self.give_up_wake(true_now)
    }

    pub fn on_timer(
        &mut self,
        true_now: DateTime<Utc>,
        token: u64,
    ) -> Result<Vec<Action>, SimError> {
        if token != self.token || !self.is_awake() {
            return Ok(Vec::new());
        }
        self.stats.timeouts += 1;
        warn!(device = %self.params.id, state = ?self.state, "no answer from the gateway: sleeping");
        self.give_up_wake(true_now)
    }

    pub(crate) fn metadata_msg(&self, entry: &SdEntry) -> Vec<u8> {
        let cs = self.params.chunk_size;
        json!({
            "device_id": self.params.id,
            "capture_timestamp": entry.timestamp,
            "image_name": entry.name,
            "image_size": entry.size,
            "max_chunk_size": cs,
            "total_chunks_count": (entry.size as usize).div_ceil(cs),
            "location": self.params.location,
            "error": 0,
            "temperature": entry.temperature,
            "humidity": entry.humidity,
            "pressure": entry.pressure,
            "gas_resistance": entry.gas_resistance,
        })
        .to_string()
        .into_bytes()
    }

    pub(crate) fn chunk_msg(&self, name: &str, id: u32, part: &[u8]) -> Vec<u8> {
        let payload = match self.params.dialect {
            Dialect::Firmware => json!(part),
            Dialect::V1 => json!(base64::engine::general_purpose::STANDARD.encode(part)),
        };
        json!({
            "device_id": self.params.id,
            "image_name": name,
            "chunk_id": id,
            "max_chunk_size": self.params.chunk_size,
            "payload": payload,
        })
        .to_string()
        .into_bytes()
    }

    /// Sends the oldest pending image's METADATA, or waits for a command.
    pub(crate) fn next_pending(&mut self, t: DateTime<Utc>) -> Result<Vec<Action>, SimError> {
        let pending = self.sd.pending()?;
        let Some(name) = pending.first() else {
            self.state = State::AwaitCommand;
            return Ok(vec![self.timer(t + self.params.response_timeout)]);
        };
        self.send_metadata(name.clone(), t)
    }

    pub(crate) fn send_metadata(
        &mut self,
        name: String,
        t: DateTime<Utc>,
    ) -> Result<Vec<Action>, SimError> {
        let Some(entry) = self.sd.entry(&name)? else {
            return Ok(Vec::new());
        };
        debug!(device = %self.params.id, image = %name, "METADATA");
        let payload = self.metadata_msg(&entry);
        self.state = State::AwaitGo { name };
        let timer = self.timer(t + self.params.response_timeout);
        Ok(vec![
            Action::Publish {
                at: t,
                topic: self.topic(Channel::Data),
                payload,
            },
            timer,
        ])
    }

    /// Streams the chunks at `positions` (0-based) without per-chunk ACKs,
    /// applying the injected faults.
    pub(crate) fn stream(
        &mut self,
        name: &str,
        positions: &[usize],
        rounds: u32,
        t: DateTime<Utc>,
        faults: &Faults,
    ) -> Result<Vec<Action>, SimError> {
        let image = self.sd.image(name)?;
        let parts = split_chunks(&image, self.params.chunk_size);
        let base = self.params.dialect.chunk_base();
        let cut = if self.rng.chance(faults.disconnect_pct) && !positions.is_empty() {
            Some((self.rng.f64() * positions.len() as f64) as usize)
        } else {
            None
        };
        let mut msgs: Vec<Vec<u8>> = Vec::with_capacity(positions.len());
        for (k, &p) in positions.iter().enumerate() {
            if cut == Some(k) {
                break;
            }
            let Some(part) = parts.get(p) else { continue };
            self.stats.chunks_sent += 1;
            if self.rng.chance(faults.loss_pct) {
                self.stats.chunks_lost += 1;
                continue;
            }
            let m = self.chunk_msg(name, p as u32 + base, part);
            if self.rng.chance(faults.dup_pct) {
                self.stats.chunks_duplicated += 1;
                msgs.push(m.clone());
            }
            msgs.push(m);
        }
        // Reordering: some chunks swap places with a later one.
        let n = msgs.len();
        for i in 0..n.saturating_sub(1) {
            if self.rng.chance(faults.reorder_pct) {
                let j = i + 1 + (self.rng.next_u64() as usize % (n - i - 1).min(5));
                msgs.swap(i, j);
                self.stats.chunks_reordered += 1;
            }
        }
        let mut out: Vec<Action> = Vec::with_capacity(n + 1);
        let topic = self.topic(Channel::Data);
        let mut at = t;
        for m in msgs {
            out.push(Action::Publish {
                at,
                topic: topic.clone(),
                payload: m,
            });
            at += self.params.chunk_interval;
        }
        if cut.is_some() {
            info!(device = %self.params.id, image = %name, "Wi-Fi dropped mid-stream");
            self.stats.disconnects += 1;
            out.extend(self.give_up_wake(at)?);
            return Ok(out);
        }
        self.state = State::AwaitResult {
            name: name.to_string(),
            rounds,
        };
        out.push(self.timer(at + self.params.response_timeout));
        Ok(out)
    }

    pub(crate) fn ack(&mut self, name: &str, t: DateTime<Utc>) -> Result<Vec<Action>, SimError> {
        if !name.is_empty() && self.sd.mark_sent(name)? {
            self.stats.delivered += 1;
            self.delivered_names.push(name.to_string());
            info!(device = %self.params.id, image = %name, "ACK_OK: removed from pendingImage.txt");
        }
        if self.params.dialect == Dialect::V1 {
            // A v1 device waits to be asked for its next image (`send_image`).
            self.state = State::AwaitCommand;
            return Ok(vec![self.timer(t + self.params.response_timeout)]);
        }
        self.next_pending(t)
    }

    /// A message from the gateway on `…/cmd` or `…/ack`.
    pub fn on_message(
        &mut self,
        true_now: DateTime<Utc>,
        payload: &[u8],
        faults: &Faults,
    ) -> Result<Vec<Action>, SimError> {
        if !self.is_awake() {
            return Ok(Vec::new());
        }
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            warn!(device = %self.params.id, "unparseable message from the gateway ignored");
            return Ok(Vec::new());
        };
        let t = true_now;
        let est = self.clock.estimated_now(t);
        let tz = self.params.tz;
        let str_field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        if let Some(ack) = v.get("ACK_OK") {
            let wake = ack
                .get("next_wake_time")
                .and_then(Value::as_str)
                .or_else(|| v.get("next_wake_time").and_then(Value::as_str))
                .and_then(|s| parse_wake(s, tz, est));
            if let Some(w) = wake {
                self.session_next_wake = Some(w);
                self.remember(w);
            }
            let name = str_field("image_name").unwrap_or_default();
            return match self.state.clone() {
                State::AwaitGo { name: cur } | State::AwaitResult { name: cur, .. }
                    if cur == name =>
                {
                    self.ack(&name, t)
                }
                State::AwaitCommand => self.ack(&name, t), // "" = the cue to drain
                _ => Ok(Vec::new()),
            };
        }
        if let Some(ids) = v.get("missing_chunks").and_then(Value::as_array) {
            let name = str_field("image_name").unwrap_or_default();
            let base = self.params.dialect.chunk_base();
            let positions: Vec<usize> = ids
                .iter()
                .filter_map(Value::as_u64)
                .filter(|i| *i >= base as u64)
                .map(|i| (i - base as u64) as usize)
                .collect();
            return match self.state.clone() {
                State::AwaitGo { name: cur } if cur == name => {
                    self.stream(&name, &positions, 0, t, faults)
                }
                State::AwaitResult { name: cur, rounds } if cur == name => {
                    if rounds >= DEVICE_RETRY_ROUNDS {
                        self.stats.gave_up += 1;
                        warn!(device = %self.params.id, image = %name, "giving up after 3 rounds; it stays pending");
                        self.state = State::AwaitCommand;
                        return Ok(vec![self.timer(t + self.params.response_timeout)]);
                    }
                    self.stats.retry_rounds += 1;
                    self.stream(&name, &positions, rounds + 1, t, faults)
                }
                _ => Ok(Vec::new()),
            };
        }
        if let Some(name) = str_field("send_image") {
            return match self.state.clone() {
                State::AwaitGo { name: cur } if cur == name => {
                    let total = (self.sd.entry(&name)?.map(|e| e.size).unwrap_or(0) as usize)
                        .div_ceil(self.params.chunk_size);
                    let all: Vec<usize> = (0..total).collect();
                    self.stream(&name, &all, 0, t, faults)
                }
                State::AwaitCommand => {
                    // v1: the gateway names a pending image to send.
                    if self.sd.pending()?.contains(&name) {
                        self.send_metadata(name, t)
                    } else {
                        self.next_pending(t)
                    }
                }
                _ => Ok(Vec::new()),
            };
        }
        if v.get("capture_image").is_some() {
            if self.state != State::AwaitCommand {
                return Ok(Vec::new());
            }
            self.capture(t)?;
            return self.next_pending(t + self.params.capture_time);
        }
        if let Some(s) = str_field("next_wake") {
            self.told_to_sleep = true;
            let w = parse_wake(&s, tz, est);
            return Ok(match w {
                Some(w) => {
                    self.session_next_wake = Some(w);
                    self.remember(w);
                    vec![self.sleep_until_device_time(t, w)]
                }
                None => {
                    warn!(device = %self.params.id, next_wake = %s, "unreadable next wake");
                    self.give_up_wake(t)?
                }
            });
        }
        Ok(Vec::new())
    }
}
