//! `barngate simulate`: firmware-faithful ESP32-CAM nodes (GATEWAY.md §2).
//!
//! This module owns the device model — SD card files (`images/`,
//! `metadata.txt`, `pendingImage.txt`), Wi-Fi retries, the drifting crystal
//! and the offline wake estimate, the HELLO → METADATA → chunks → ACK_OK
//! session with targeted resends, fault injection and the synthetic petri-dish
//! JPEGs — and two drivers for it:
//! - [`Simulation`]: simulated time, in process. A discrete-event loop feeds
//!   an [`Engine`] directly and advances a [`ManualClock`], so days of
//!   operation for a hundred devices run in seconds (tests, load models);
//! - [`run_mqtt`]: real time over MQTT against a running gateway (demos).
//!
//! [`SimDevice`] is transport-agnostic: it is fed wakes, messages, timer
//! firings and disconnects and answers with [`Action`]s stamped in true time.

use crate::clock::{Clock, ManualClock, SystemClock};
use crate::config::Config;
use crate::ingest::{Engine, IngestError, Publish};
use crate::metrics::Metrics;
use crate::protocol::{self, Channel, Dialect};
use crate::schedule::Schedule;
use crate::store::{Store, StoreError};
use base64::Engine as _;
use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::{debug, info, warn};

/// Wi-Fi connection attempts before offline mode.
pub const WIFI_ATTEMPTS: u32 = 3;
/// How long each Wi-Fi attempt waits.
pub const WIFI_ATTEMPT_TIMEOUT: Duration = Duration::seconds(8);
/// Rounds of `missing_chunks` the firmware answers for one image before it
/// gives up on it for this wake (the image stays pending).
pub const DEVICE_RETRY_ROUNDS: u32 = 3;
/// Smallest and largest chunk size the firmware supports.
pub const CHUNK_SIZE_RANGE: std::ops::RangeInclusive<usize> = 128..=1024;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("SD card {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("simulator option `{option}`: {message}")]
    Option {
        option: &'static str,
        message: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("MQTT: {0}")]
    Mqtt(String),
    #[error("JPEG encoding: {0}")]
    Jpeg(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn opt_err(option: &'static str, message: impl Into<String>) -> SimError {
    SimError::Option {
        option,
        message: message.into(),
    }
}

// ---------------------------------------------------------------- randomness

/// SplitMix64: small, seedable, good enough for fault injection.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: f64) -> bool {
        pct > 0.0 && self.f64() * 100.0 < pct
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }
}

// -------------------------------------------------------------------- chunks

/// Splits an image into `chunk_size`-byte chunks (the last may be shorter).
pub fn split_chunks(data: &[u8], chunk_size: usize) -> Vec<&[u8]> {
    data.chunks(chunk_size.max(1)).collect()
}

/// Reassembles chunks keyed by id (`base`-based); `None` while any is missing.
pub fn assemble(chunks: &HashMap<u32, Vec<u8>>, base: u32, total: u32) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for id in base..base + total {
        out.extend_from_slice(chunks.get(&id)?);
    }
    Some(out)
}

/// The ids in `base..base+total` not yet received, ascending.
pub fn missing_ids(received: &BTreeSet<u32>, base: u32, total: u32) -> Vec<u32> {
    (base..base + total)
        .filter(|i| !received.contains(i))
        .collect()
}

// --------------------------------------------------------------------- Wi-Fi

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WifiOutcome {
    /// Associated on attempt `attempt` (1-based), `after` the wake.
    Connected { attempt: u32, after: Duration },
    /// Every attempt timed out: offline mode `after` the wake (3 × 8 s).
    Offline { after: Duration },
}

/// The firmware's Wi-Fi loop: attempt `i` (1-based) starts `(i−1) × 8 s`
/// after the wake and, when `attempt_ok(i)` says the network is there,
/// associates `assoc` later; after three timed-out attempts it goes offline.
pub fn wifi_connect(mut attempt_ok: impl FnMut(u32) -> bool, assoc: Duration) -> WifiOutcome {
    for attempt in 1..=WIFI_ATTEMPTS {
        let start = WIFI_ATTEMPT_TIMEOUT * (attempt as i32 - 1);
        if attempt_ok(attempt) {
            return WifiOutcome::Connected {
                attempt,
                after: start + assoc.min(WIFI_ATTEMPT_TIMEOUT),
            };
        }
    }
    WifiOutcome::Offline {
        after: WIFI_ATTEMPT_TIMEOUT * WIFI_ATTEMPTS as i32,
    }
}

// ------------------------------------------------------------ device clock

/// The device's sense of time: no RTC battery, so the last NTP time plus
/// the crystal's count since then. `drift` is the crystal's rate error
/// (+0.005 = runs 0.5 % fast).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceClock {
    pub last_ntp_time: DateTime<Utc>,
    /// True time of that sync.
    pub synced_at: DateTime<Utc>,
    pub drift: f64,
}

impl DeviceClock {
    pub fn new(true_now: DateTime<Utc>, drift: f64) -> DeviceClock {
        DeviceClock {
            last_ntp_time: true_now,
            synced_at: true_now,
            drift,
        }
    }

    /// NTP resync (every online wake).
    pub fn sync(&mut self, true_now: DateTime<Utc>) {
        self.last_ntp_time = true_now;
        self.synced_at = true_now;
    }

    /// `estimated_now = last_ntp_time + elapsed since that sync` (as the
    /// drifting crystal counts it).
    pub fn estimated_now(&self, true_now: DateTime<Utc>) -> DateTime<Utc> {
        let elapsed = (true_now - self.synced_at).num_milliseconds() as f64;
        self.last_ntp_time + Duration::milliseconds((elapsed * (1.0 + self.drift)).round() as i64)
    }

    /// True time that passes while the crystal counts `device` time.
    pub fn true_duration(&self, device: Duration) -> Duration {
        Duration::milliseconds(
            (device.num_milliseconds() as f64 / (1.0 + self.drift)).round() as i64,
        )
    }
}

/// Offline: the next wake from the last next wakes the gateway gave
/// (`last_next_wake + 24 h` for each remembered daily slot): the earliest
/// such instant at least `min_gap` after `estimated_now`. With one
/// remembered wake this is exactly the reference firmware's formula.
pub fn offline_next_wake(
    remembered: &[DateTime<Utc>],
    estimated_now: DateTime<Utc>,
    min_gap: Duration,
) -> Option<DateTime<Utc>> {
    let floor = estimated_now + min_gap;
    remembered
        .iter()
        .map(|r| {
            let behind = (floor - *r).num_milliseconds();
            let day = Duration::days(1).num_milliseconds();
            let k = if behind < 0 { 0 } else { behind / day + 1 };
            *r + Duration::milliseconds(k * day)
        })
        .min()
}

/// A wake time as the gateway sends it: `5:30PM` (site time zone; the next
/// such wall time after `now`) or ISO-8601.
pub fn parse_wake(s: &str, tz: Tz, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if let Some(t) = protocol::parse_timestamp(s) {
        return Some(t);
    }
    let t = NaiveTime::parse_from_str(s.trim(), "%I:%M%p").ok()?;
    let today = now.with_timezone(&tz).date_naive();
    for d in 0..=2 {
        let naive = (today + Duration::days(d)).and_time(t);
        let at = tz
            .from_local_datetime(&naive)
            .earliest()
            .or_else(|| {
                tz.from_local_datetime(&(naive + Duration::hours(1)))
                    .earliest()
            })?
            .with_timezone(&Utc);
        if at > now {
            return Some(at);
        }
    }
    None
}

// ------------------------------------------------------------------ SD card

/// One line of `metadata.txt`.
#[derive(Debug, Clone, PartialEq)]
pub struct SdEntry {
    pub name: String,
    pub timestamp: String,
    pub pending: bool,
    pub size: u32,
    pub temperature: f64,
    pub humidity: f64,
    pub pressure: f64,
    pub gas_resistance: f64,
}

impl SdEntry {
    fn line(&self) -> String {
        format!(
            "{}|{}|PendingToSend={}|temp={:.1}|hum={:.1}|pres={:.1}|gas={:.1}|size={}",
            self.name,
            self.timestamp,
            self.pending,
            self.temperature,
            self.humidity,
            self.pressure,
            self.gas_resistance,
            self.size
        )
    }

    fn parse(line: &str) -> Option<SdEntry> {
        let mut f = line.split('|');
        let name = f.next()?.to_string();
        let timestamp = f.next()?.to_string();
        let pending = f.next()?.strip_prefix("PendingToSend=")? == "true";
        let mut e = SdEntry {
            name,
            timestamp,
            pending,
            size: 0,
            temperature: 0.0,
            humidity: 0.0,
            pressure: 0.0,
            gas_resistance: 0.0,
        };
        for kv in f {
            let (k, v) = kv.split_once('=')?;
            match k {
                "temp" => e.temperature = v.parse().ok()?,
                "hum" => e.humidity = v.parse().ok()?,
                "pres" => e.pressure = v.parse().ok()?,
                "gas" => e.gas_resistance = v.parse().ok()?,
                "size" => e.size = v.parse().ok()?,
                _ => {}
            }
        }
        Some(e)
    }
}

/// A device's SD card: `images/`, `metadata.txt` (full log) and
/// `pendingImage.txt` (unsent only, oldest first; its line count is
/// `pendingImg`).
#[derive(Debug, Clone)]
pub struct SdCard {
    root: PathBuf,
}

impl SdCard {
    pub fn open(root: &Path) -> Result<SdCard, SimError> {
        let images = root.join("images");
        std::fs::create_dir_all(&images).map_err(io_err(&images))?;
        for f in ["metadata.txt", "pendingImage.txt"] {
            let p = root.join(f);
            if !p.exists() {
                std::fs::write(&p, b"").map_err(io_err(&p))?;
            }
        }
        Ok(SdCard {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn read_lines(&self, file: &str) -> Result<Vec<String>, SimError> {
        let p = self.root.join(file);
        let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
        Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect())
    }

    fn write_lines(&self, file: &str, lines: &[String]) -> Result<(), SimError> {
        let p = self.root.join(file);
        let tmp = self.root.join(format!("{file}.tmp"));
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io_err(&p))
    }

    fn append(&self, file: &str, line: &str) -> Result<(), SimError> {
        let p = self.root.join(file);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&p)
            .map_err(io_err(&p))?;
        writeln!(f, "{line}").map_err(io_err(&p))
    }

    /// Stores a capture: the image file, a `metadata.txt` line with
    /// `PendingToSend=true` and a `pendingImage.txt` line.
    pub fn store(&self, entry: &SdEntry, jpeg: &[u8]) -> Result<(), SimError> {
        let p = self.root.join("images").join(&entry.name);
        std::fs::write(&p, jpeg).map_err(io_err(&p))?;
        let e = SdEntry {
            pending: true,
            ..entry.clone()
        };
        self.append("metadata.txt", &e.line())?;
        self.append(
            "pendingImage.txt",
            &format!("{}|{}", entry.name, entry.timestamp),
        )
    }

    /// Unsent image names, oldest first.
    pub fn pending(&self) -> Result<Vec<String>, SimError> {
        Ok(self
            .read_lines("pendingImage.txt")?
            .into_iter()
            .map(|l| l.split('|').next().unwrap_or("").to_string())
            .collect())
    }

    /// `pendingImg`: the line count of `pendingImage.txt`.
    pub fn pending_count(&self) -> Result<u32, SimError> {
        Ok(self.read_lines("pendingImage.txt")?.len() as u32)
    }

    /// ACK_OK: removes `name` from `pendingImage.txt` and flips its flag in
    /// `metadata.txt`. False when it was not pending.
    pub fn mark_sent(&self, name: &str) -> Result<bool, SimError> {
        let lines = self.read_lines("pendingImage.txt")?;
        let before = lines.len();
        let kept: Vec<String> = lines
            .into_iter()
            .filter(|l| l.split('|').next() != Some(name))
            .collect();
        if kept.len() == before {
            return Ok(false);
        }
        self.write_lines("pendingImage.txt", &kept)?;
        let meta: Vec<String> = self
            .read_lines("metadata.txt")?
            .into_iter()
            .map(|l| match SdEntry::parse(&l) {
                Some(e) if e.name == name && e.pending => SdEntry {
                    pending: false,
                    ..e
                }
                .line(),
                _ => l,
            })
            .collect();
        self.write_lines("metadata.txt", &meta)?;
        Ok(true)
    }

    /// Every capture ever made, in capture order.
    pub fn entries(&self) -> Result<Vec<SdEntry>, SimError> {
        Ok(self
            .read_lines("metadata.txt")?
            .iter()
            .filter_map(|l| SdEntry::parse(l))
            .collect())
    }

    pub fn entry(&self, name: &str) -> Result<Option<SdEntry>, SimError> {
        Ok(self.entries()?.into_iter().find(|e| e.name == name))
    }

    pub fn image(&self, name: &str) -> Result<Vec<u8>, SimError> {
        let p = self.root.join("images").join(name);
        std::fs::read(&p).map_err(io_err(&p))
    }

    pub fn has_image(&self, name: &str) -> bool {
        self.root.join("images").join(name).exists()
    }
}

// --------------------------------------------------------------- petri dish

/// A JPEG of a petri dish whose colonies (placed by `seed`) grow with `day`.
pub fn petri_jpeg(seed: u64, day: f64, width: u16, height: u16) -> Result<Vec<u8>, SimError> {
    let (w, h) = (width as usize, height as usize);
    let mut rng = Rng::new(seed);
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let dish_r = (w.min(h) as f64) * 0.46;
    struct Colony {
        x: f64,
        y: f64,
        r: f64,
        rgb: [f64; 3],
    }
    let palette = [
        [236.0, 228.0, 200.0],
        [250.0, 250.0, 240.0],
        [226.0, 196.0, 90.0],
        [120.0, 150.0, 90.0],
        [200.0, 120.0, 110.0],
    ];
    let n = 6 + (rng.next_u64() % 18) as usize;
    let mut colonies = Vec::with_capacity(n);
    for _ in 0..n {
        let a = rng.range(0.0, std::f64::consts::TAU);
        let d = dish_r * 0.85 * rng.f64().sqrt();
        let appears = rng.range(0.0, 3.0);
        let rate = rng.range(1.5, 5.0) * dish_r / 100.0;
        let max_r = rng.range(6.0, 22.0) * dish_r / 100.0;
        let r = ((day - appears).max(0.0) * rate).min(max_r);
        let rgb = palette[(rng.next_u64() % palette.len() as u64) as usize];
        if r > 0.3 {
            colonies.push(Colony {
                x: cx + d * a.cos(),
                y: cy + d * a.sin(),
                r,
                rgb,
            });
        }
    }
    let mut px = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
            let dd = ((fx - cx).powi(2) + (fy - cy).powi(2)).sqrt();
            let mut c = if dd > dish_r + 3.0 {
                [40.0, 42.0, 48.0]
            } else if dd > dish_r {
                [190.0, 196.0, 205.0] // the rim
            } else {
                let shade = 1.0 - 0.15 * (dd / dish_r);
                [205.0 * shade, 160.0 * shade, 95.0 * shade] // agar
            };
            for col in &colonies {
                let cd = ((fx - col.x).powi(2) + (fy - col.y).powi(2)).sqrt();
                if cd < col.r && dd < dish_r {
                    let edge = ((col.r - cd) / 1.5).min(1.0);
                    let center = 1.0 - 0.25 * (cd / col.r);
                    for (ck, rk) in c.iter_mut().zip(col.rgb) {
                        *ck = *ck * (1.0 - edge) + rk * center * edge;
                    }
                }
            }
            let i = (y * w + x) * 3;
            for (p, ck) in px[i..i + 3].iter_mut().zip(c) {
                *p = ck.clamp(0.0, 255.0) as u8;
            }
        }
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 75)
        .encode(&px, width, height, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| SimError::Jpeg(e.to_string()))?;
    Ok(out)
}

// ------------------------------------------------------------------- faults

/// A span of true time in which Wi-Fi is down (for some or all devices).
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Device indices affected; `None` = all.
    pub devices: Option<Vec<usize>>,
}

impl Outage {
    /// `FROM-TO[:I,J,…]`: days after `start` (fractions allowed), optionally
    /// only for some device indices. `1-5` is "offline days 1–5".
    pub fn parse(s: &str, start: DateTime<Utc>) -> Result<Outage, SimError> {
        let bad = || opt_err("outage", format!("{s:?} is not FROM-TO[:I,J,...] in days"));
        let (span, devs) = match s.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let (a, b) = span.split_once('-').ok_or_else(bad)?;
        let a: f64 = a.trim().parse().map_err(|_| bad())?;
        let b: f64 = b.trim().parse().map_err(|_| bad())?;
        if !(a >= 0.0 && b > a && b < 3650.0) {
            return Err(bad());
        }
        let devices = match devs {
            None => None,
            Some(d) => Some(
                d.split(',')
                    .map(|x| x.trim().parse::<usize>().map_err(|_| bad()))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let ms = |d: f64| Duration::milliseconds((d * 86_400_000.0) as i64);
        Ok(Outage {
            from: start + ms(a),
            to: start + ms(b),
            devices,
        })
    }

    pub fn covers(&self, device: usize, t: DateTime<Utc>) -> bool {
        t >= self.from && t < self.to && self.devices.as_ref().is_none_or(|d| d.contains(&device))
    }
}

/// How a simulated gateway restart happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartKind {
    /// Commits and publishes what it owes, then stops.
    Graceful,
    /// Stops without committing: the uncommitted batch is lost.
    Crash,
}

#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Percentage of chunk publishes lost.
    pub loss_pct: f64,
    /// Percentage of chunk publishes delivered twice.
    pub dup_pct: f64,
    /// Percentage of chunks delayed behind later ones.
    pub reorder_pct: f64,
    /// Percentage of image streams cut off by a disconnect.
    pub disconnect_pct: f64,
    /// Percentage of Wi-Fi attempts failing outside outages.
    pub wifi_fail_pct: f64,
    pub outages: Vec<Outage>,
    /// Gateway restarts (simulated time only).
    pub restarts: Vec<(DateTime<Utc>, RestartKind)>,
}

impl Faults {
    fn wifi_up(&self, device: usize, t: DateTime<Utc>) -> bool {
        !self.outages.iter().any(|o| o.covers(device, t))
    }
}

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
enum State {
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
    pub chunks_reordered: u64,
    pub disconnects: u64,
    pub timeouts: u64,
    /// Images in the order their ACK_OK arrived.
    pub delivered_names: Vec<String>,
}

/// One simulated ESP32-CAM node.
pub struct SimDevice {
    pub params: DeviceParams,
    pub sd: SdCard,
    pub clock: DeviceClock,
    pub stats: DeviceStats,
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

    fn topic(&self, ch: Channel) -> String {
        protocol::topic(self.params.dialect, &self.params.id, ch)
    }

    fn timer(&mut self, at: DateTime<Utc>) -> Action {
        self.token += 1;
        Action::Timer {
            at,
            token: self.token,
        }
    }

    /// Keeps one remembered wake per daily slot (same time of day ± 45 min).
    fn remember(&mut self, w: DateTime<Utc>) {
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
    fn fallback_wake(&mut self, true_now: DateTime<Utc>) -> DateTime<Utc> {
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

    fn sleep_until_device_time(&mut self, true_now: DateTime<Utc>, w: DateTime<Utc>) -> Action {
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
    fn give_up_wake(&mut self, true_now: DateTime<Utc>) -> Result<Vec<Action>, SimError> {
        if !self.captured_this_wake && !self.told_to_sleep {
            self.capture(true_now)?;
        }
        let until = self.fallback_wake(true_now);
        self.state = State::Asleep;
        Ok(vec![Action::Sleep { until }])
    }

    /// Takes a picture and queues it on the SD card.
    fn capture(&mut self, true_now: DateTime<Utc>) -> Result<String, SimError> {
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

    fn metadata_msg(&self, entry: &SdEntry) -> Vec<u8> {
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

    fn chunk_msg(&self, name: &str, id: u32, part: &[u8]) -> Vec<u8> {
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
    fn next_pending(&mut self, t: DateTime<Utc>) -> Result<Vec<Action>, SimError> {
        let pending = self.sd.pending()?;
        let Some(name) = pending.first() else {
            self.state = State::AwaitCommand;
            return Ok(vec![self.timer(t + self.params.response_timeout)]);
        };
        self.send_metadata(name.clone(), t)
    }

    fn send_metadata(&mut self, name: String, t: DateTime<Utc>) -> Result<Vec<Action>, SimError> {
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
    fn stream(
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

    fn ack(&mut self, name: &str, t: DateTime<Utc>) -> Result<Vec<Action>, SimError> {
        if !name.is_empty() && self.sd.mark_sent(name)? {
            self.stats.delivered += 1;
            self.stats.delivered_names.push(name.to_string());
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

// ------------------------------------------------------------------ summary

/// What a run produced, for the progress line and the final report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub devices: usize,
    pub wakes: u64,
    pub offline_wakes: u64,
    pub captured: u64,
    pub delivered: u64,
    pub pending: u64,
    pub retry_rounds: u64,
    pub gave_up: u64,
    pub chunks_sent: u64,
    pub chunks_lost: u64,
    pub chunks_duplicated: u64,
    /// Chunks sent out of order (swapped with a later one).
    pub chunks_reordered: u64,
    pub disconnects: u64,
    pub timeouts: u64,
    pub gateway_restarts: u64,
    /// Most devices streaming at once (the gateway's `streaming` gauge).
    pub max_streaming: u64,
    /// Simulated time covered.
    pub simulated: Duration,
}

impl Summary {
    fn add(&mut self, s: &DeviceStats, pending: u32) {
        self.devices += 1;
        self.wakes += s.wakes;
        self.offline_wakes += s.offline_wakes;
        self.captured += s.captured;
        self.delivered += s.delivered;
        self.pending += pending as u64;
        self.retry_rounds += s.retry_rounds;
        self.gave_up += s.gave_up;
        self.chunks_sent += s.chunks_sent;
        self.chunks_lost += s.chunks_lost;
        self.chunks_duplicated += s.chunks_duplicated;
        self.chunks_reordered += s.chunks_reordered;
        self.disconnects += s.disconnects;
        self.timeouts += s.timeouts;
    }

    pub fn loss_pct(&self) -> f64 {
        if self.chunks_sent == 0 {
            0.0
        } else {
            100.0 * self.chunks_lost as f64 / self.chunks_sent as f64
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "devices {}  simulated {:.1} h  wakes {} ({} offline)",
            self.devices,
            self.simulated.num_seconds() as f64 / 3600.0,
            self.wakes,
            self.offline_wakes
        )?;
        writeln!(
            f,
            "images captured {}  delivered {}  pending {}  given up (this wake) {}",
            self.captured, self.delivered, self.pending, self.gave_up
        )?;
        writeln!(
            f,
            "retries (missing_chunks rounds) {}  chunks sent {}  lost {} ({:.2} %)  duplicated {}",
            self.retry_rounds,
            self.chunks_sent,
            self.chunks_lost,
            self.loss_pct(),
            self.chunks_duplicated
        )?;
        write!(
            f,
            "disconnects {}  timeouts {}  gateway restarts {}  max streaming at once {}",
            self.disconnects, self.timeouts, self.gateway_restarts, self.max_streaming
        )
    }
}

// ---------------------------------------------------------- fleet options

/// Which dialect the fleet speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialectMix {
    Firmware,
    V1,
    /// Alternating, firmware first.
    Mixed,
}

impl std::str::FromStr for DialectMix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "firmware" => Ok(DialectMix::Firmware),
            "v1" => Ok(DialectMix::V1),
            "mixed" => Ok(DialectMix::Mixed),
            o => Err(format!("unknown dialect {o:?} (firmware, v1 or mixed)")),
        }
    }
}

impl DialectMix {
    fn for_index(self, i: usize) -> Dialect {
        match self {
            DialectMix::Firmware => Dialect::Firmware,
            DialectMix::V1 => Dialect::V1,
            DialectMix::Mixed if i.is_multiple_of(2) => Dialect::Firmware,
            DialectMix::Mixed => Dialect::V1,
        }
    }
}

/// A fleet of simulated devices.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub devices: usize,
    pub dialect: DialectMix,
    pub chunk_size: usize,
    /// Largest crystal error; each device draws its own in ±this (0.005 = 0.5 %).
    pub max_drift: f64,
    pub seed: u64,
    /// SD cards live in `<sd_root>/<device id>/`.
    pub sd_root: PathBuf,
    pub wakes_per_day: usize,
    pub response_timeout: Duration,
    pub chunk_interval: Duration,
    pub image_width: u16,
    pub image_height: u16,
    /// First wakes are spread over this long after the start.
    pub first_wake_spread: Duration,
    pub faults: Faults,
    /// Site time zone the devices read `5:30PM` in.
    pub timezone: Tz,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            devices: 1,
            dialect: DialectMix::Firmware,
            chunk_size: 1024,
            max_drift: 0.005,
            seed: 1,
            sd_root: PathBuf::from("sim-sd"),
            wakes_per_day: 2,
            response_timeout: Duration::seconds(60),
            chunk_interval: Duration::milliseconds(10),
            image_width: 320,
            image_height: 240,
            first_wake_spread: Duration::seconds(60),
            faults: Faults::default(),
            timezone: Tz::UTC,
        }
    }
}

impl FleetOptions {
    pub fn validate(&self) -> Result<(), SimError> {
        if self.devices == 0 || self.devices > 100_000 {
            return Err(opt_err("devices", "must be 1..=100000"));
        }
        if !CHUNK_SIZE_RANGE.contains(&self.chunk_size) {
            return Err(opt_err("chunk-size", "must be 128..=1024 bytes"));
        }
        if !(0.0..=0.05).contains(&self.max_drift) {
            return Err(opt_err("drift", "must be 0..=5 %"));
        }
        let f = &self.faults;
        for (name, v) in [
            ("loss", f.loss_pct),
            ("dup", f.dup_pct),
            ("reorder", f.reorder_pct),
            ("disconnect", f.disconnect_pct),
            ("wifi-fail", f.wifi_fail_pct),
        ] {
            if !(0.0..=100.0).contains(&v) {
                return Err(opt_err(name, "must be a percentage 0..=100"));
            }
        }
        if self.image_width < 16 || self.image_height < 16 {
            return Err(opt_err("image-size", "at least 16×16"));
        }
        Ok(())
    }

    /// The `i`-th device's MAC-style id.
    pub fn device_id(i: usize) -> String {
        format!("B8F862{:06X}", i + 1)
    }

    fn build_devices(&self, start: DateTime<Utc>) -> Result<Vec<SimDevice>, SimError> {
        self.validate()?;
        let mut rng = Rng::new(self.seed);
        (0..self.devices)
            .map(|i| {
                let id = Self::device_id(i);
                let sd = SdCard::open(&self.sd_root.join(&id))?;
                let params = DeviceParams {
                    index: i,
                    id,
                    dialect: self.dialect.for_index(i),
                    chunk_size: self.chunk_size,
                    drift: rng.range(-self.max_drift, self.max_drift),
                    tz: self.timezone,
                    wakes_per_day: self.wakes_per_day,
                    response_timeout: self.response_timeout,
                    assoc: Duration::milliseconds(1500),
                    capture_time: Duration::milliseconds(800),
                    chunk_interval: self.chunk_interval,
                    image_width: self.image_width,
                    image_height: self.image_height,
                    inoculated_at: start,
                    location: format!("Barn {} / shelf {}", i / 50 + 1, i % 50 + 1),
                };
                Ok(SimDevice::new(params, sd, start, rng.next_u64()))
            })
            .collect()
    }

    fn first_wake(&self, i: usize, start: DateTime<Utc>) -> DateTime<Utc> {
        let spread = self.first_wake_spread.num_milliseconds().max(1);
        start + Duration::milliseconds(spread * i as i64 / self.devices.max(1) as i64)
    }
}

// ------------------------------------------------- simulated-time driver

enum Ev {
    Wake(usize),
    Timer(usize, u64),
    ToGateway(String, Vec<u8>),
    ToDevice(usize, u64, Vec<u8>),
    Disconnect(usize, u64),
    Tick,
    Restart(RestartKind),
    GatewayUp,
}

/// Devices and an in-process [`Engine`] in simulated time: a priority queue
/// of wake-ups, timers and message deliveries; the [`ManualClock`] jumps
/// from one event to the next.
pub struct Simulation {
    opts: FleetOptions,
    cfg: Config,
    clock: ManualClock,
    start: DateTime<Utc>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    engine: Option<Engine>,
    devices: Vec<SimDevice>,
    by_wire: HashMap<String, usize>,
    queue: BinaryHeap<Reverse<(i64, u64)>>,
    events: HashMap<u64, Ev>,
    seq: u64,
    in_flight: usize,
    tick_scheduled: bool,
    /// Device → gateway and gateway → device latency.
    pub latency: Duration,
    /// How long a restarting gateway is away.
    pub restart_downtime: Duration,
    restarts: u64,
    max_streaming: u64,
    dropped_while_down: u64,
    /// Print a progress line every this much simulated time.
    pub progress_every: Option<Duration>,
    next_progress: DateTime<Utc>,
}

impl Simulation {
    /// A fleet against a gateway built from `cfg` over `store`, starting at `start`.
    pub fn new(
        opts: FleetOptions,
        mut cfg: Config,
        store: Arc<Store>,
        start: DateTime<Utc>,
    ) -> Result<Simulation, SimError> {
        cfg.validate()
            .map_err(|e| opt_err("config", e.to_string()))?;
        let metrics = Arc::new(Metrics::default());
        let engine = Self::engine(&cfg, &store, &metrics)?;
        let mut opts = opts;
        opts.timezone = engine.timezone();
        cfg.site.timezone = opts.timezone.name().to_string();
        let devices = opts.build_devices(start)?;
        let by_wire = devices
            .iter()
            .enumerate()
            .map(|(i, d)| (d.params.id.clone(), i))
            .collect();
        let mut sim = Simulation {
            clock: ManualClock::new(start),
            start,
            cfg,
            store,
            metrics,
            engine: Some(engine),
            devices,
            by_wire,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            in_flight: 0,
            tick_scheduled: false,
            latency: Duration::milliseconds(15),
            restart_downtime: Duration::seconds(10),
            restarts: 0,
            max_streaming: 0,
            dropped_while_down: 0,
            progress_every: None,
            next_progress: start,
            opts,
        };
        for i in 0..sim.devices.len() {
            let at = sim.opts.first_wake(i, start);
            sim.push(at, Ev::Wake(i));
        }
        for (at, kind) in sim.opts.faults.restarts.clone() {
            sim.push(at, Ev::Restart(kind));
        }
        sim.push(start, Ev::Tick);
        sim.tick_scheduled = true;
        Ok(sim)
    }

    fn engine(
        cfg: &Config,
        store: &Arc<Store>,
        metrics: &Arc<Metrics>,
    ) -> Result<Engine, SimError> {
        let tz = cfg
            .timezone()
            .map_err(|e| opt_err("config", e.to_string()))?;
        Ok(Engine::new(
            cfg.ingest.clone(),
            cfg.site.clone(),
            Schedule::new(&cfg.schedule, tz),
            store.clone(),
            metrics.clone(),
        )?)
    }

    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
    pub fn start(&self) -> DateTime<Utc> {
        self.start
    }
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
    pub fn devices(&self) -> &[SimDevice] {
        &self.devices
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Fault settings, changeable between runs (e.g. heal the network).
    pub fn faults_mut(&mut self) -> &mut Faults {
        &mut self.opts.faults
    }
    /// Restarts the gateway at `at` (simulated time).
    pub fn schedule_restart(&mut self, at: DateTime<Utc>, kind: RestartKind) {
        self.push(at, Ev::Restart(kind));
    }
    /// When the next queued event happens.
    pub fn next_event_at(&self) -> Option<DateTime<Utc>> {
        self.queue
            .peek()
            .and_then(|Reverse((ms, _))| Utc.timestamp_millis_opt(*ms).single())
    }
    /// Messages that reached a gateway that was down.
    pub fn dropped_while_down(&self) -> u64 {
        self.dropped_while_down
    }

    fn push(&mut self, at: DateTime<Utc>, ev: Ev) {
        if matches!(ev, Ev::ToGateway(..) | Ev::ToDevice(..)) {
            self.in_flight += 1;
        }
        self.seq += 1;
        self.queue.push(Reverse((at.timestamp_millis(), self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn apply(&mut self, i: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Publish { at, topic, payload } => {
                    self.push(at + self.latency, Ev::ToGateway(topic, payload))
                }
                Action::Timer { at, token } => self.push(at, Ev::Timer(i, token)),
                Action::Sleep { until } => self.push(until, Ev::Wake(i)),
            }
        }
    }

    fn route(&mut self, out: Vec<Publish>, now: DateTime<Utc>) {
        for p in out {
            let Ok(t) = protocol::parse_topic(&p.topic) else {
                continue;
            };
            if let Some(&i) = self.by_wire.get(t.wire_id) {
                let session = self.devices[i].session();
                self.push(now + self.latency, Ev::ToDevice(i, session, p.payload));
            }
        }
    }

    fn commit(&mut self, now: DateTime<Utc>) -> Result<(), SimError> {
        if let Some(e) = self.engine.as_mut() {
            let out = e.commit(now)?;
            self.route(out, now);
        }
        Ok(())
    }

    fn observe(&mut self) {
        self.max_streaming = self
            .max_streaming
            .max(self.metrics.streaming.load(Ordering::Relaxed));
    }

    fn busy(&self) -> bool {
        self.in_flight > 0 || self.devices.iter().any(SimDevice::is_awake)
    }

    /// Runs every event up to and including `until`.
    pub fn run_until(&mut self, until: DateTime<Utc>) -> Result<(), SimError> {
        while let Some(Reverse((ms, seq))) = self.queue.peek().copied() {
            if ms > until.timestamp_millis() {
                break;
            }
            self.queue.pop();
            let Some(ev) = self.events.remove(&seq) else {
                continue;
            };
            let now = Utc
                .timestamp_millis_opt(ms)
                .single()
                .unwrap_or_else(|| self.clock.now());
            self.clock.set(now);
            self.step(ev, now)?;
            if let Some(every) = self.progress_every {
                if now >= self.next_progress {
                    eprintln!(
                        "[{}] {}",
                        now.format("%Y-%m-%d %H:%M"),
                        self.progress_line()
                    );
                    self.next_progress = now + every;
                }
            }
        }
        self.clock.set(until.max(self.clock.now()));
        Ok(())
    }

    /// Runs for `d` of simulated time from now.
    pub fn run_for(&mut self, d: Duration) -> Result<Summary, SimError> {
        let until = self.clock.now() + d;
        self.run_until(until)?;
        Ok(self.summary())
    }

    fn step(&mut self, ev: Ev, now: DateTime<Utc>) -> Result<(), SimError> {
        let faults = self.opts.faults.clone();
        match ev {
            Ev::Wake(i) => {
                let a = self.devices[i].wake(now, &faults)?;
                self.apply(i, a);
                if !self.tick_scheduled {
                    self.tick_scheduled = true;
                    self.push(now, Ev::Tick);
                }
            }
            Ev::Timer(i, token) => {
                let a = self.devices[i].on_timer(now, token)?;
                self.apply(i, a);
            }
            Ev::Disconnect(i, session) => {
                if self.devices[i].session() == session {
                    let a = self.devices[i].on_disconnect(now)?;
                    self.apply(i, a);
                }
            }
            Ev::ToDevice(i, session, payload) => {
                self.in_flight -= 1;
                if self.devices[i].session() == session {
                    let a = self.devices[i].on_message(now, &payload, &faults)?;
                    self.apply(i, a);
                }
            }
            Ev::ToGateway(topic, payload) => {
                self.in_flight -= 1;
                match self.engine.as_mut() {
                    None => self.dropped_while_down += 1,
                    Some(e) => {
                        e.handle(&topic, &payload, now);
                        let wants = e.wants_commit();
                        self.observe();
                        if wants {
                            self.commit(now)?;
                        }
                    }
                }
            }
            Ev::Tick => {
                if let Some(e) = self.engine.as_mut() {
                    e.tick(now);
                    self.observe();
                }
                self.commit(now)?;
                if self.busy() {
                    self.push(now + Duration::milliseconds(50), Ev::Tick);
                } else {
                    self.tick_scheduled = false;
                }
            }
            Ev::Restart(kind) => {
                if let Some(mut e) = self.engine.take() {
                    self.restarts += 1;
                    warn!(?kind, "simulated gateway restart");
                    if kind == RestartKind::Graceful {
                        // As `serve` shuts down: everything to disk.
                        let out = e.flush(now)?;
                        self.route(out, now);
                    }
                    drop(e);
                    self.metrics.streaming.store(0, Ordering::Relaxed);
                    self.metrics.waiting.store(0, Ordering::Relaxed);
                    // The broker goes with it: every connected device drops.
                    let after = if kind == RestartKind::Graceful {
                        self.latency * 2
                    } else {
                        Duration::zero()
                    };
                    for i in 0..self.devices.len() {
                        if self.devices[i].is_awake() {
                            let s = self.devices[i].session();
                            self.push(now + after, Ev::Disconnect(i, s));
                        }
                    }
                    self.push(now + self.restart_downtime, Ev::GatewayUp);
                }
            }
            Ev::GatewayUp => {
                self.engine = Some(Self::engine(&self.cfg, &self.store, &self.metrics)?);
                info!("simulated gateway back up");
            }
        }
        Ok(())
    }

    fn progress_line(&self) -> String {
        let s = self.summary();
        format!(
            "awake {:>4}  captured {:>6}  delivered {:>6}  pending {:>5}  retries {:>5}  streaming {}",
            self.devices.iter().filter(|d| d.is_awake()).count(),
            s.captured,
            s.delivered,
            s.pending,
            s.retry_rounds,
            self.metrics.streaming.load(Ordering::Relaxed)
        )
    }

    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for d in &self.devices {
            s.add(&d.stats, d.pending());
        }
        s.gateway_restarts = self.restarts;
        s.max_streaming = self.max_streaming;
        s.simulated = self.clock.now() - self.start;
        s
    }
}

// ------------------------------------------------------ real-time MQTT driver

/// How the devices reach the gateway's broker. Plain MQTT for now; TLS with
/// issued device certificates (`--ca`, `--cert-dir`) slots in here.
#[derive(Debug, Clone)]
pub struct Connection {
    pub host: String,
    pub port: u16,
    pub keep_alive: std::time::Duration,
    /// How long to wait for CONNACK and SUBACKs.
    pub connect_timeout: std::time::Duration,
    /// Mutual TLS: the site CA and a directory of issued device
    /// certificates (`{MAC}.crt.pem`, `{MAC}.key.pem`, as `device issue` writes them).
    pub tls: Option<ConnTls>,
}

#[derive(Debug, Clone)]
pub struct ConnTls {
    pub ca: Vec<u8>,
    pub cert_dir: std::path::PathBuf,
}

impl Connection {
    /// `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Connection, SimError> {
        let bad = || opt_err("gateway", format!("{s:?} is not HOST:PORT"));
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Connection {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            keep_alive: std::time::Duration::from_secs(30),
            connect_timeout: std::time::Duration::from_secs(10),
            tls: None,
        })
    }

    /// Connects over mutual TLS with the CA file and the devices' certificates in `cert_dir`.
    pub fn with_tls(mut self, ca: &Path, cert_dir: &Path) -> Result<Connection, SimError> {
        let ca = std::fs::read(ca)
            .map_err(|e| opt_err("ca", format!("cannot read {}: {e}", ca.display())))?;
        self.tls = Some(ConnTls {
            ca,
            cert_dir: cert_dir.to_path_buf(),
        });
        Ok(self)
    }

    fn options(&self, client_id: &str) -> Result<rumqttc::MqttOptions, SimError> {
        let mut o = rumqttc::MqttOptions::new(client_id, self.host.clone(), self.port);
        o.set_keep_alive(self.keep_alive);
        o.set_clean_session(true);
        o.set_max_packet_size(1 << 20, 1 << 20);
        if let Some(t) = &self.tls {
            let read = |ext: &str| {
                let p = t.cert_dir.join(format!("{client_id}.{ext}"));
                std::fs::read(&p).map_err(|e| {
                    opt_err(
                        "cert-dir",
                        format!(
                            "cannot read {} ({e}); issue it with `barngate device issue {client_id} --out {}`",
                            p.display(),
                            t.cert_dir.display()
                        ),
                    )
                })
            };
            o.set_transport(rumqttc::Transport::tls(
                t.ca.clone(),
                Some((read("crt.pem")?, read("key.pem")?)),
                None,
            ));
        }
        Ok(o)
    }
}

enum Wire {
    Message(Vec<u8>),
    SubAck,
    Down(String),
}

fn instant_at(at: DateTime<Utc>) -> tokio::time::Instant {
    let d = (at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::Instant::now() + d
}

/// One wake session over MQTT; returns when the device sleeps until.
async fn mqtt_session(
    dev: &mut SimDevice,
    conn: &Connection,
    faults: &Faults,
    first: Vec<Action>,
) -> Result<DateTime<Utc>, SimError> {
    let mut queue: Vec<Action> = first;
    if let Some(until) = queue.iter().find_map(|a| match a {
        Action::Sleep { until } => Some(*until),
        _ => None,
    }) {
        if !queue.iter().any(|a| matches!(a, Action::Publish { .. })) {
            return Ok(until); // offline wake
        }
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(conn.options(&dev.params.id)?, 256);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Wire>(256);
    let poller = tokio::spawn(async move {
        loop {
            let w = match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    Wire::Message(p.payload.to_vec())
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => Wire::SubAck,
                Ok(_) => continue,
                Err(e) => Wire::Down(e.to_string()),
            };
            let down = matches!(w, Wire::Down(_));
            if tx.send(w).await.is_err() || down {
                return;
            }
        }
    });
    let result = async {
        for ch in [Channel::Cmd, Channel::Ack] {
            client
                .subscribe(dev.topic(ch), rumqttc::QoS::AtLeastOnce)
                .await
                .map_err(|e| SimError::Mqtt(e.to_string()))?;
        }
        let mut subacks = 0;
        let deadline = tokio::time::Instant::now() + conn.connect_timeout;
        while subacks < 2 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Wire::SubAck)) => subacks += 1,
                Ok(Some(Wire::Message(_))) => {}
                Ok(Some(Wire::Down(e))) => return Err(SimError::Mqtt(e)),
                Ok(None) | Err(_) => {
                    return Err(SimError::Mqtt(format!(
                        "no SUBACK from {}:{} within {:?}",
                        conn.host, conn.port, conn.connect_timeout
                    )))
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        warn!(device = %dev.params.id, error = %e, "cannot reach the gateway");
        poller.abort();
        let a = dev.on_disconnect(Utc::now())?;
        return Ok(sleep_of(&a).unwrap_or_else(|| Utc::now() + Duration::hours(1)));
    }
    let mut sleep_until: Option<DateTime<Utc>> = None;
    loop {
        // Publishes in time order; a Sleep waits for the publishes before it.
        queue.sort_by_key(|a| match a {
            Action::Publish { at, .. } | Action::Timer { at, .. } => *at,
            Action::Sleep { .. } => DateTime::<Utc>::MAX_UTC,
        });
        let now = Utc::now();
        let mut new = Vec::new();
        while let Some(a) = queue.first() {
            let due = match a {
                Action::Publish { at, .. } | Action::Timer { at, .. } => *at <= now,
                Action::Sleep { .. } => true,
            };
            if !due {
                break;
            }
            match queue.remove(0) {
                Action::Publish { topic, payload, .. } => {
                    if let Err(e) = client
                        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                        .await
                    {
                        warn!(device = %dev.params.id, error = %e, "publish failed");
                    }
                }
                Action::Timer { token, .. } => new.extend(dev.on_timer(now, token)?),
                Action::Sleep { until } => sleep_until = Some(until),
            }
        }
        if !new.is_empty() {
            queue.extend(new);
            continue;
        }
        if let Some(pos) = queue.iter().position(|a| matches!(a, Action::Sleep { .. })) {
            if let Action::Sleep { until } = queue.remove(pos) {
                sleep_until = Some(until);
            }
        }
        if let Some(until) = sleep_until {
            if !queue.iter().any(|a| matches!(a, Action::Publish { .. })) {
                // Let QoS 1 publishes drain before disconnecting.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let _ = client.disconnect().await;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                poller.abort();
                return Ok(until);
            }
        }
        let next_at = queue
            .iter()
            .filter_map(|a| match a {
                Action::Publish { at, .. } | Action::Timer { at, .. } => Some(*at),
                Action::Sleep { .. } => None,
            })
            .min()
            .unwrap_or_else(|| Utc::now() + Duration::hours(1));
        tokio::select! {
            w = rx.recv() => match w {
                Some(Wire::Message(p)) => {
                    let a = dev.on_message(Utc::now(), &p, faults)?;
                    queue.extend(a);
                }
                Some(Wire::SubAck) => {}
                Some(Wire::Down(e)) => return lost(dev, &poller, &e),
                None => return lost(dev, &poller, "event loop ended"),
            },
            _ = tokio::time::sleep_until(instant_at(next_at)) => {}
        }
    }
}

fn lost(
    dev: &mut SimDevice,
    poller: &tokio::task::JoinHandle<()>,
    why: &str,
) -> Result<DateTime<Utc>, SimError> {
    warn!(device = %dev.params.id, error = %why, "connection to the gateway lost");
    poller.abort();
    let a = dev.on_disconnect(Utc::now())?;
    Ok(sleep_of(&a).unwrap_or_else(|| Utc::now() + Duration::hours(1)))
}

fn sleep_of(actions: &[Action]) -> Option<DateTime<Utc>> {
    actions.iter().find_map(|a| match a {
        Action::Sleep { until } => Some(*until),
        _ => None,
    })
}

/// Runs the fleet in real time against the gateway at `conn` until `stop`
/// resolves; prints a progress line every `progress` when given.
pub async fn run_mqtt(
    opts: FleetOptions,
    conn: Connection,
    progress: Option<std::time::Duration>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Summary, SimError> {
    let start = SystemClock.now();
    let devices = opts.build_devices(start)?;
    let faults = Arc::new(opts.faults.clone());
    let slots: Arc<std::sync::Mutex<Vec<(DeviceStats, u32)>>> =
        Arc::new(std::sync::Mutex::new(vec![
            (DeviceStats::default(), 0);
            devices.len()
        ]));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut dev) in devices.into_iter().enumerate() {
        let first = opts.first_wake(i, start);
        let (conn, faults, slots) = (conn.clone(), faults.clone(), slots.clone());
        tasks.spawn(async move {
            let mut wake_at = first;
            loop {
                tokio::time::sleep_until(instant_at(wake_at)).await;
                let first = dev.wake(Utc::now(), &faults)?;
                wake_at = mqtt_session(&mut dev, &conn, &faults, first).await?;
                let pending = dev.pending();
                if let Ok(mut s) = slots.lock() {
                    s[i] = (dev.stats.clone(), pending);
                }
                info!(device = %dev.params.id, wake = %wake_at, pending, "asleep");
            }
            #[allow(unreachable_code)]
            Ok::<(), SimError>(())
        });
    }
    let summarize = |slots: &std::sync::Mutex<Vec<(DeviceStats, u32)>>| {
        let mut s = Summary::default();
        if let Ok(v) = slots.lock() {
            for (st, p) in v.iter() {
                s.add(st, *p);
            }
        }
        s.simulated = Utc::now() - start;
        s
    };
    let ticker = async {
        let Some(every) = progress else {
            return std::future::pending::<()>().await;
        };
        loop {
            tokio::time::sleep(every).await;
            let s = summarize(&slots);
            eprintln!(
                "[{}] captured {}  delivered {}  pending {}  retries {}  lost chunks {}",
                Utc::now().format("%H:%M:%S"),
                s.captured,
                s.delivered,
                s.pending,
                s.retry_rounds,
                s.chunks_lost
            );
        }
    };
    let failed = async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Err(e)) => return e,
                Err(e) if e.is_panic() => {
                    return SimError::Mqtt(format!("device task panicked: {e}"))
                }
                _ => {}
            }
        }
        std::future::pending().await
    };
    tokio::select! {
        _ = stop => {}
        _ = ticker => {}
        e = failed => return Err(e),
    }
    tasks.abort_all();
    Ok(summarize(&slots))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn chunks_split_and_assemble_in_any_order() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let parts = split_chunks(&data, 128);
        assert_eq!(parts.len(), 8);
        assert_eq!(parts[7].len(), 1000 - 7 * 128);
        for base in [0u32, 1] {
            let mut m = HashMap::new();
            for (i, p) in parts.iter().enumerate().rev() {
                m.insert(i as u32 + base, p.to_vec());
            }
            assert_eq!(assemble(&m, base, 8).unwrap(), data);
            m.remove(&(3 + base));
            assert_eq!(assemble(&m, base, 8), None);
        }
        assert_eq!(split_chunks(&data[..1024.min(data.len())], 1000).len(), 1);
    }

    #[test]
    fn missing_indices_are_exactly_the_gaps() {
        let got: BTreeSet<u32> = [1, 2, 4, 6].into_iter().collect();
        assert_eq!(missing_ids(&got, 1, 7), vec![3, 5, 7]);
        let got: BTreeSet<u32> = [0, 1, 2].into_iter().collect();
        assert_eq!(missing_ids(&got, 0, 3), Vec::<u32>::new());
        assert_eq!(missing_ids(&BTreeSet::new(), 0, 2), vec![0, 1]);
    }

    fn entry(name: &str, ts: &str) -> SdEntry {
        SdEntry {
            name: name.into(),
            timestamp: ts.into(),
            pending: true,
            size: 3,
            temperature: 21.5,
            humidity: 50.0,
            pressure: 1012.0,
            gas_resistance: 120.0,
        }
    }

    #[test]
    fn pending_queue_append_and_remove_on_the_sd_card() {
        let dir = tempfile::tempdir().unwrap();
        let sd = SdCard::open(dir.path()).unwrap();
        assert_eq!(sd.pending_count().unwrap(), 0);
        for (n, ts) in [
            ("a.jpg", "2026-01-01T08:00:00Z"),
            ("b.jpg", "2026-01-01T16:00:00Z"),
            ("c.jpg", "2026-01-02T08:00:00Z"),
        ] {
            sd.store(&entry(n, ts), &[0xFF, 0xD8, 0xD9]).unwrap();
        }
        assert_eq!(sd.pending().unwrap(), vec!["a.jpg", "b.jpg", "c.jpg"]);
        assert_eq!(sd.pending_count().unwrap(), 3);
        let pend = std::fs::read_to_string(dir.path().join("pendingImage.txt")).unwrap();
        assert_eq!(pend.lines().next().unwrap(), "a.jpg|2026-01-01T08:00:00Z");
        assert!(sd.mark_sent("b.jpg").unwrap());
        assert!(!sd.mark_sent("b.jpg").unwrap(), "already sent");
        assert!(!sd.mark_sent("zzz.jpg").unwrap());
        assert_eq!(sd.pending().unwrap(), vec!["a.jpg", "c.jpg"]);
        let meta = std::fs::read_to_string(dir.path().join("metadata.txt")).unwrap();
        let lines: Vec<&str> = meta.lines().collect();
        assert_eq!(lines.len(), 3, "the full log keeps every capture");
        assert!(lines[0].starts_with("a.jpg|2026-01-01T08:00:00Z|PendingToSend=true|temp=21.5"));
        assert!(lines[1].contains("|PendingToSend=false|"), "{}", lines[1]);
        assert!(lines[2].contains("|PendingToSend=true|"));
        assert_eq!(sd.entry("c.jpg").unwrap().unwrap().size, 3);
        assert_eq!(sd.image("a.jpg").unwrap(), vec![0xFF, 0xD8, 0xD9]);
        // Reopening keeps the card's contents.
        let again = SdCard::open(dir.path()).unwrap();
        assert_eq!(again.pending_count().unwrap(), 2);
    }

    #[test]
    fn wifi_three_attempts_of_eight_seconds_then_offline() {
        let assoc = Duration::milliseconds(1500);
        assert_eq!(
            wifi_connect(|_| true, assoc),
            WifiOutcome::Connected {
                attempt: 1,
                after: assoc
            }
        );
        let mut tried = Vec::new();
        let out = wifi_connect(
            |a| {
                tried.push(a);
                a == 3
            },
            assoc,
        );
        assert_eq!(
            out,
            WifiOutcome::Connected {
                attempt: 3,
                after: Duration::seconds(16) + assoc
            }
        );
        assert_eq!(tried, vec![1, 2, 3]);
        let mut n = 0;
        assert_eq!(
            wifi_connect(
                |_| {
                    n += 1;
                    false
                },
                assoc
            ),
            WifiOutcome::Offline {
                after: Duration::seconds(24)
            }
        );
        assert_eq!(n, 3, "exactly three attempts");
    }

    #[test]
    fn offline_time_is_last_ntp_plus_drifting_elapsed() {
        let sync = t("2026-01-01T08:00:00Z");
        let mut c = DeviceClock::new(sync, 0.005);
        let day_later = sync + Duration::days(1);
        // +0.5 % over 24 h: 7.2 minutes fast.
        assert_eq!(
            c.estimated_now(day_later),
            day_later + Duration::milliseconds(432_000)
        );
        assert_eq!(
            c.true_duration(Duration::seconds(1005)),
            Duration::seconds(1000)
        );
        c.sync(day_later);
        assert_eq!(
            c.estimated_now(day_later),
            day_later,
            "NTP resync clears drift"
        );
        let slow = DeviceClock::new(sync, -0.005);
        assert!(slow.estimated_now(day_later) < day_later);
    }

    #[test]
    fn offline_next_wake_is_last_next_wake_plus_a_day() {
        let w8 = t("2026-01-02T08:00:00Z");
        let w16 = t("2026-01-01T16:00:00Z");
        // One remembered wake: the reference formula, last_next_wake + 24 h.
        assert_eq!(
            offline_next_wake(&[w8], w8, Duration::minutes(30)),
            Some(w8 + Duration::days(1))
        );
        // Two daily slots: the next one after now.
        assert_eq!(
            offline_next_wake(&[w16, w8], w8 + Duration::minutes(1), Duration::minutes(30)),
            Some(t("2026-01-02T16:00:00Z"))
        );
        // Days behind (a long outage): still the next slot after now.
        assert_eq!(
            offline_next_wake(&[w16, w8], t("2026-01-05T09:00:00Z"), Duration::minutes(30)),
            Some(t("2026-01-05T16:00:00Z"))
        );
        assert_eq!(offline_next_wake(&[], w8, Duration::minutes(30)), None);
    }

    #[test]
    fn wake_times_are_read_in_both_dialects() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let now = t("2026-01-10T12:00:00Z"); // 13:00 in Berlin
        assert_eq!(
            parse_wake("5:30PM", tz, now),
            Some(t("2026-01-10T16:30:00Z"))
        );
        assert_eq!(
            parse_wake("8:00AM", tz, now),
            Some(t("2026-01-11T07:00:00Z"))
        );
        assert_eq!(
            parse_wake("12:05AM", tz, now),
            Some(t("2026-01-10T23:05:00Z"))
        );
        assert_eq!(
            parse_wake("2026-01-11T07:00:00Z", tz, now),
            Some(t("2026-01-11T07:00:00Z"))
        );
        assert_eq!(parse_wake("soon", tz, now), None);
    }

    #[test]
    fn outages_parse_as_day_ranges() {
        let s = t("2026-01-01T00:00:00Z");
        let o = Outage::parse("1-5", s).unwrap();
        assert_eq!(
            (o.from, o.to),
            (t("2026-01-02T00:00:00Z"), t("2026-01-06T00:00:00Z"))
        );
        assert!(o.covers(7, t("2026-01-03T00:00:00Z")));
        assert!(!o.covers(7, t("2026-01-06T00:00:00Z")));
        let o = Outage::parse("0.5-1:0,2", s).unwrap();
        assert!(o.covers(2, t("2026-01-01T13:00:00Z")));
        assert!(!o.covers(1, t("2026-01-01T13:00:00Z")));
        for bad in ["5-1", "x-2", "1", "1-2:a"] {
            assert!(Outage::parse(bad, s).is_err(), "{bad}");
        }
    }

    #[test]
    fn petri_dish_is_a_jpeg_whose_colonies_grow() {
        let a = petri_jpeg(42, 0.0, 160, 120).unwrap();
        let b = petri_jpeg(42, 4.0, 160, 120).unwrap();
        assert_eq!(&a[..3], &[0xFF, 0xD8, 0xFF]);
        assert_eq!(&a[a.len() - 2..], &[0xFF, 0xD9]);
        assert_ne!(a, b, "day 4 differs from day 0");
        assert!(b.len() > a.len(), "more colonies, more detail");
        assert_eq!(a, petri_jpeg(42, 0.0, 160, 120).unwrap(), "deterministic");
    }

    fn device(dir: &Path, dialect: Dialect) -> SimDevice {
        let now = t("2026-01-01T08:00:00Z");
        let params = DeviceParams {
            index: 0,
            id: "B8F862000001".into(),
            dialect,
            chunk_size: 128,
            drift: 0.0,
            tz: Tz::UTC,
            wakes_per_day: 2,
            response_timeout: Duration::seconds(60),
            assoc: Duration::seconds(1),
            capture_time: Duration::seconds(1),
            chunk_interval: Duration::milliseconds(10),
            image_width: 64,
            image_height: 48,
            inoculated_at: now,
            location: "Barn".into(),
        };
        SimDevice::new(params, SdCard::open(dir).unwrap(), now, 7)
    }

    fn publishes(a: &[Action]) -> Vec<Value> {
        a.iter()
            .filter_map(|a| match a {
                Action::Publish { payload, .. } => serde_json::from_slice(payload).ok(),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn device_resends_only_listed_chunks_and_gives_up_after_three_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = device(dir.path(), Dialect::Firmware);
        let f = Faults::default();
        let now = t("2026-01-01T08:00:00Z");
        let a = d.wake(now, &f).unwrap();
        assert_eq!(publishes(&a)[0]["pendingImg"], 0);
        let a = d
            .on_message(
                now,
                br#"{"device_id":"B8F862000001","capture_image":true}"#,
                &f,
            )
            .unwrap();
        let meta = &publishes(&a)[0];
        let name = meta["image_name"].as_str().unwrap().to_string();
        let total = meta["total_chunks_count"].as_u64().unwrap();
        assert_eq!(d.pending(), 1, "queued on the SD card before sending");
        let a = d
            .on_message(now, json!({"send_image": name}).to_string().as_bytes(), &f)
            .unwrap();
        let chunks = publishes(&a);
        assert_eq!(chunks.len() as u64, total);
        assert_eq!(chunks[0]["chunk_id"], 1, "firmware: 1-based");
        assert!(chunks[0]["payload"].is_array());
        let miss = json!({"image_name": name, "missing_chunks": [2, 3]}).to_string();
        for round in 1..=3 {
            let a = d.on_message(now, miss.as_bytes(), &f).unwrap();
            let ids: Vec<u64> = publishes(&a)
                .iter()
                .map(|c| c["chunk_id"].as_u64().unwrap())
                .collect();
            assert_eq!(ids, vec![2, 3], "round {round}: only the listed chunks");
        }
        let a = d.on_message(now, miss.as_bytes(), &f).unwrap();
        assert!(publishes(&a).is_empty(), "gave up after 3 rounds");
        assert_eq!(d.stats.gave_up, 1);
        assert_eq!(d.pending(), 1, "it stays pending");
        let a = d
            .on_message(
                now,
                br#"{"device_id":"B8F862000001","next_wake":"4:00PM"}"#,
                &f,
            )
            .unwrap();
        assert_eq!(
            a,
            vec![Action::Sleep {
                until: t("2026-01-01T16:00:00Z")
            }]
        );
        // Next wake: HELLO reports it, the cue starts the resend, ACK_OK clears it.
        let later = t("2026-01-01T16:00:00Z");
        let a = d.wake(later, &f).unwrap();
        assert_eq!(publishes(&a)[0]["pendingImg"], 1);
        let a = d
            .on_message(
                later,
                br#"{"image_name":"","ACK_OK":{"next_wake_time":"8:00AM"}}"#,
                &f,
            )
            .unwrap();
        assert_eq!(publishes(&a)[0]["image_name"], name.as_str());
        let a = d
            .on_message(
                later,
                json!({"image_name": name, "missing_chunks": [2, 3]})
                    .to_string()
                    .as_bytes(),
                &f,
            )
            .unwrap();
        assert_eq!(
            publishes(&a).len(),
            2,
            "resumed with only the missing chunks"
        );
        d.on_message(
            later,
            json!({"image_name": name, "ACK_OK": {"next_wake_time": "8:00AM"}})
                .to_string()
                .as_bytes(),
            &f,
        )
        .unwrap();
        assert_eq!(d.pending(), 0);
        assert!(!d.sd.entry(&name).unwrap().unwrap().pending);
    }

    #[test]
    fn v1_device_sends_zero_based_base64_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = device(dir.path(), Dialect::V1);
        let f = Faults::default();
        let now = t("2026-01-01T08:00:00Z");
        let a = d.wake(now, &f).unwrap();
        match &a[0] {
            Action::Publish { topic, .. } => assert_eq!(topic, "device/B8F862000001/status"),
            other => panic!("{other:?}"),
        }
        let a = d.on_message(now, br#"{"capture_image":true}"#, &f).unwrap();
        let name = publishes(&a)[0]["image_name"].as_str().unwrap().to_string();
        let a = d
            .on_message(now, json!({"send_image": name}).to_string().as_bytes(), &f)
            .unwrap();
        let c = &publishes(&a)[0];
        assert_eq!(c["chunk_id"], 0);
        assert!(c["payload"].is_string());
        d.on_message(
            now,
            json!({"image_name": name, "ACK_OK": true, "next_wake_time": "2026-01-01T16:00:00Z"})
                .to_string()
                .as_bytes(),
            &f,
        )
        .unwrap();
        assert_eq!(d.pending(), 0);
    }
}
