//! A fleet: its options (devices, dialects, chunk sizes, faults) and the
//! summary of a run.

use super::base::{opt_err, Rng, SimError, CHUNK_SIZE_RANGE};
use super::device::{DeviceParams, DeviceStats, SimDevice};
use super::faults::Faults;
use super::sd::SdCard;
use crate::protocol::Dialect;
use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use std::fmt;
use std::path::PathBuf;

// ------------------------------------------------------------------ summary

/// What a run produced, for the progress line and the final report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub devices: usize,
    /// The devices' counters, summed.
    pub totals: DeviceStats,
    pub pending: u64,
    pub gateway_restarts: u64,
    /// Most devices streaming at once (the gateway's `streaming` gauge).
    pub max_streaming: u64,
    /// Simulated time covered.
    pub simulated: Duration,
}

impl Summary {
    pub(crate) fn add(&mut self, s: &DeviceStats, pending: u32) {
        self.devices += 1;
        self.totals.add(s);
        self.pending += pending as u64;
    }

    pub fn loss_pct(&self) -> f64 {
        if self.totals.chunks_sent == 0 {
            0.0
        } else {
            100.0 * self.totals.chunks_lost as f64 / self.totals.chunks_sent as f64
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
            self.totals.wakes,
            self.totals.offline_wakes
        )?;
        writeln!(
            f,
            "images captured {}  delivered {}  pending {}  given up (this wake) {}",
            self.totals.captured, self.totals.delivered, self.pending, self.totals.gave_up
        )?;
        writeln!(
            f,
            "retries (missing_chunks rounds) {}  chunks sent {}  lost {} ({:.2} %)  duplicated {}",
            self.totals.retry_rounds,
            self.totals.chunks_sent,
            self.totals.chunks_lost,
            self.loss_pct(),
            self.totals.chunks_duplicated
        )?;
        write!(
            f,
            "disconnects {}  timeouts {}  gateway restarts {}  max streaming at once {}",
            self.totals.disconnects,
            self.totals.timeouts,
            self.gateway_restarts,
            self.max_streaming
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
    pub(crate) fn for_index(self, i: usize) -> Dialect {
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

    pub(crate) fn build_devices(&self, start: DateTime<Utc>) -> Result<Vec<SimDevice>, SimError> {
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

    pub(crate) fn first_wake(&self, i: usize, start: DateTime<Utc>) -> DateTime<Utc> {
        let spread = self.first_wake_spread.num_milliseconds().max(1);
        start + Duration::milliseconds(spread * i as i64 / self.devices.max(1) as i64)
    }
}
