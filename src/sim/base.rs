//! What the simulated firmware is made of: its constants and errors, a
//! deterministic random source, chunking, Wi-Fi retries and the drifting
//! device clock with its offline wake estimate.

use crate::ingest::IngestError;
use crate::protocol::{self};
use crate::store::StoreError;
use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

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

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub(crate) fn opt_err(option: &'static str, message: impl Into<String>) -> SimError {
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
