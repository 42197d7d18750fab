//! Fault injection: outages, gateway restarts, lost, duplicated and
//! reordered chunks, dropped connections.

use super::base::{opt_err, SimError};
use chrono::{DateTime, Duration, Utc};

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
    pub(crate) fn wifi_up(&self, device: usize, t: DateTime<Utc>) -> bool {
        !self.outages.iter().any(|o| o.covers(device, t))
    }
}
