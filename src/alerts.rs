//! The alert rules of architecture-v1.md "Alerting & Monitoring" that depend
//! on time and device state: missed wake, low battery, device error code and
//! prolonged offline. [`evaluate`] is pure: device records, the open alerts
//! and `now` in, the alerts to raise and resolve out. The ingest thread (the
//! only database writer) applies it periodically (`Engine::tick`), so alerts
//! are stored, queued upstream and resolved in the same batches as the data.
//!
//! The fifth rule, "image failed after 3 retries", is an event: the ingest
//! raises it when a capture fails and resolves it when that image completes.

use crate::store::DeviceRecord;
use chrono::{DateTime, Duration, Utc};
use std::collections::HashMap;

/// How often (in clock time) the ingest re-evaluates the rules.
pub const EVAL_INTERVAL_S: i64 = 60;
/// A device not seen for this long after its next wake missed it.
pub const MISSED_WAKE_GRACE: Duration = Duration::hours(1);
/// A device not seen for this long is offline (critical).
pub const OFFLINE_AFTER: Duration = Duration::hours(24);
/// A device seen this recently is "online" on the dashboard.
pub const ONLINE_WITHIN: Duration = Duration::hours(2);
/// Battery percentages below which a warning / a critical alert is raised.
pub const BATTERY_WARNING: f64 = 20.0;
pub const BATTERY_CRITICAL: f64 = 10.0;

pub const MISSED_WAKE: &str = "missed_wake";
pub const LOW_BATTERY: &str = "low_battery";
pub const DEVICE_ERROR: &str = "device_error";
pub const IMAGE_FAILED: &str = "image_failed";
pub const OFFLINE: &str = "offline";

/// The kinds [`evaluate`] owns (raises and resolves).
pub const RULE_KINDS: [&str; 4] = [MISSED_WAKE, LOW_BATTERY, DEVICE_ERROR, OFFLINE];

/// An alert whose condition holds now.
#[derive(Debug, Clone, PartialEq)]
pub struct Raise {
    pub mac: String,
    pub kind: &'static str,
    pub severity: &'static str,
    pub message: String,
}

/// What the rules say should change.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Changes {
    /// Open alerts whose condition cleared (or whose severity changed):
    /// resolve these first.
    pub resolve: Vec<(String, &'static str)>,
    pub raise: Vec<Raise>,
}

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| "never".into())
}

/// The alerts of the four state rules that hold for `d` at `now`.
pub fn conditions(d: &DeviceRecord, now: DateTime<Utc>) -> Vec<Raise> {
    let mut out = Vec::new();
    if d.status != "active" {
        return out;
    }
    let mac = &d.mac;
    let mut raise = |kind, severity, message| {
        out.push(Raise {
            mac: mac.clone(),
            kind,
            severity,
            message,
        })
    };
    if let Some(next) = d.next_wake {
        let seen_since = d.last_seen.is_some_and(|s| s >= next);
        if next + MISSED_WAKE_GRACE < now && !seen_since {
            raise(
                MISSED_WAKE,
                "warning",
                format!(
                    "Device {mac} missed scheduled wake at {}. Last seen: {}.",
                    when(Some(next)),
                    when(d.last_seen)
                ),
            );
        }
    }
    if let Some(b) = d.battery.filter(|b| b.is_finite()) {
        let severity = if b < BATTERY_CRITICAL {
            Some("critical")
        } else if b < BATTERY_WARNING {
            Some("warning")
        } else {
            None
        };
        if let Some(severity) = severity {
            raise(
                LOW_BATTERY,
                severity,
                format!("Device {mac} battery at {b:.0}%. Requires maintenance."),
            );
        }
    }
    if let Some(code) = d.last_error.filter(|c| *c > 0) {
        raise(
            DEVICE_ERROR,
            "error",
            format!("Device {mac} reported error code {code}."),
        );
    }
    // A device never seen counts from its registration.
    let seen = d.last_seen.unwrap_or(d.registered_at);
    if seen < now - OFFLINE_AFTER {
        raise(
            OFFLINE,
            "critical",
            format!(
                "Device {mac} offline for >24 hours. Last seen: {}.",
                when(d.last_seen)
            ),
        );
    }
    out
}

/// Compares the rules' verdict with the open alerts (`(mac, kind)` →
/// severity) and says what to resolve and raise. Kinds other than
/// [`RULE_KINDS`] are left alone. Devices not in `devices` keep their alerts.
pub fn evaluate<'a>(
    devices: impl IntoIterator<Item = &'a DeviceRecord>,
    open: &HashMap<(String, &'static str), String>,
    now: DateTime<Utc>,
) -> Changes {
    let mut ch = Changes::default();
    for d in devices {
        let holds = conditions(d, now);
        for kind in RULE_KINDS {
            let want = holds.iter().find(|r| r.kind == kind);
            let have = open.get(&(d.mac.clone(), kind));
            match (want, have) {
                (Some(w), Some(sev)) if sev == w.severity => {}
                (Some(w), Some(_)) => {
                    ch.resolve.push((d.mac.clone(), kind));
                    ch.raise.push(w.clone());
                }
                (Some(w), None) => ch.raise.push(w.clone()),
                (None, Some(_)) => ch.resolve.push((d.mac.clone(), kind)),
                (None, None) => {}
            }
        }
    }
    ch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::protocol::Dialect;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 8, 0, 0).unwrap()
    }

    fn dev(now: DateTime<Utc>) -> DeviceRecord {
        let mut d = DeviceRecord::new("AABBCCDDEEFF", Dialect::Firmware, "s", 0, 0, now);
        d.site = None;
        d.last_seen = Some(now);
        d.next_wake = Some(now + Duration::hours(8));
        d
    }

    /// Applies changes to an open-alert map the way the ingest does.
    fn apply(open: &mut HashMap<(String, &'static str), String>, ch: &Changes) {
        for k in &ch.resolve {
            open.remove(k);
        }
        for r in &ch.raise {
            open.insert((r.mac.clone(), r.kind), r.severity.to_string());
        }
    }

    fn kinds(ch: &Changes) -> Vec<&'static str> {
        ch.raise.iter().map(|r| r.kind).collect()
    }

    #[test]
    fn healthy_device_raises_nothing() {
        let c = ManualClock::new(t0());
        let d = dev(c.now());
        assert_eq!(evaluate([&d], &HashMap::new(), c.now()), Changes::default());
    }

    #[test]
    fn missed_wake_fires_an_hour_after_next_wake_and_resolves_when_seen() {
        let c = ManualClock::new(t0());
        let mut d = dev(c.now());
        let mut open = HashMap::new();
        c.advance(Duration::hours(9)); // next wake + 1 h exactly: not yet
        assert!(evaluate([&d], &open, c.now()).raise.is_empty());
        c.advance(Duration::minutes(1));
        let ch = evaluate([&d], &open, c.now());
        assert_eq!(kinds(&ch), vec![MISSED_WAKE]);
        assert_eq!(ch.raise[0].severity, "warning");
        assert!(ch.raise[0].message.contains("missed scheduled wake"));
        apply(&mut open, &ch);
        // Re-evaluating does not raise it again.
        assert_eq!(evaluate([&d], &open, c.now()), Changes::default());
        // The device wakes late and gets a new next wake: resolved.
        d.last_seen = Some(c.now());
        d.next_wake = Some(c.now() + Duration::hours(8));
        let ch = evaluate([&d], &open, c.now());
        assert_eq!(ch.resolve, vec![(d.mac.clone(), MISSED_WAKE)]);
        assert!(ch.raise.is_empty());
    }

    #[test]
    fn low_battery_warns_below_20_escalates_below_10_and_resolves() {
        let c = ManualClock::new(t0());
        let mut d = dev(c.now());
        let mut open = HashMap::new();
        d.battery = Some(20.0);
        assert!(evaluate([&d], &open, c.now()).raise.is_empty());
        d.battery = Some(19.5);
        let ch = evaluate([&d], &open, c.now());
        assert_eq!(kinds(&ch), vec![LOW_BATTERY]);
        assert_eq!(ch.raise[0].severity, "warning");
        apply(&mut open, &ch);
        c.advance(Duration::hours(12));
        d.last_seen = Some(c.now());
        d.battery = Some(9.0);
        let ch = evaluate([&d], &open, c.now());
        assert_eq!(ch.resolve, vec![(d.mac.clone(), LOW_BATTERY)]);
        assert_eq!(ch.raise[0].severity, "critical");
        apply(&mut open, &ch);
        d.battery = Some(95.0); // batteries replaced
        let ch = evaluate([&d], &open, c.now());
        assert_eq!(ch.resolve, vec![(d.mac.clone(), LOW_BATTERY)]);
        assert!(ch.raise.is_empty());
        // A device that never reports a battery never alerts on it.
        d.battery = None;
        assert_eq!(evaluate([&d], &HashMap::new(), c.now()), Changes::default());
    }

    #[test]
    fn device_error_code_fires_and_clears_with_a_zero_code() {
        let c = ManualClock::new(t0());
        let mut d = dev(c.now());
        let mut open = HashMap::new();
        d.last_error = Some(0);
        assert!(evaluate([&d], &open, c.now()).raise.is_empty());
        d.last_error = Some(3);
        let ch = evaluate([&d], &open, c.now());
        assert_eq!(kinds(&ch), vec![DEVICE_ERROR]);
        assert_eq!(ch.raise[0].severity, "error");
        assert!(ch.raise[0].message.contains("error code 3"));
        apply(&mut open, &ch);
        d.last_error = Some(0);
        let ch = evaluate([&d], &open, c.now());
        assert_eq!(ch.resolve, vec![(d.mac.clone(), DEVICE_ERROR)]);
    }

    #[test]
    fn offline_after_24_hours_is_critical_and_resolves_on_contact() {
        let c = ManualClock::new(t0());
        let mut d = dev(c.now());
        d.next_wake = None; // isolate the offline rule
        let mut open = HashMap::new();
        c.advance(Duration::hours(24));
        assert!(evaluate([&d], &open, c.now()).raise.is_empty());
        c.advance(Duration::minutes(1));
        let ch = evaluate([&d], &open, c.now());
        assert_eq!(kinds(&ch), vec![OFFLINE]);
        assert_eq!(ch.raise[0].severity, "critical");
        apply(&mut open, &ch);
        c.advance(Duration::days(4));
        assert_eq!(evaluate([&d], &open, c.now()), Changes::default());
        d.last_seen = Some(c.now());
        let ch = evaluate([&d], &open, c.now());
        assert_eq!(ch.resolve, vec![(d.mac.clone(), OFFLINE)]);
    }

    #[test]
    fn revoked_devices_have_their_alerts_resolved_and_other_kinds_are_untouched() {
        let c = ManualClock::new(t0());
        let mut d = dev(c.now());
        let mut open = HashMap::new();
        open.insert((d.mac.clone(), OFFLINE), "critical".to_string());
        open.insert((d.mac.clone(), IMAGE_FAILED), "error".to_string());
        d.status = "revoked".into();
        c.advance(Duration::days(3));
        let ch = evaluate([&d], &open, c.now());
        assert_eq!(ch.resolve, vec![(d.mac.clone(), OFFLINE)]);
        assert!(ch.raise.is_empty());
    }
}
