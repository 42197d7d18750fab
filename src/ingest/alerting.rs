//! Alerts the ingest raises: events (`image_failed` per capture,
//! `device_error`) as they happen, and the time/state rules of
//! `crate::alerts` every `alerts::EVAL_INTERVAL_S` of clock time.

use super::{Engine, Records};
use crate::store::AlertRecord;
use chrono::{DateTime, Duration, Utc};
use std::collections::{HashMap, HashSet};
use tracing::{info, warn};

impl<S: Records> Engine<S> {
    pub(super) fn device_error(&mut self, mac: &str, code: i64, now: DateTime<Utc>) {
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

    pub(super) fn raise_alert(
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

    pub(super) fn resolve_alert(&mut self, mac: &str, kind: &'static str, now: DateTime<Utc>) {
        self.resolve_alert_key((mac.to_string(), kind, None), now);
    }

    pub(super) fn resolve_alert_key(
        &mut self,
        k: (String, &'static str, Option<u64>),
        now: DateTime<Utc>,
    ) {
        let (mac, kind) = (k.0.clone(), k.1);
        if let Some(mut a) = self.open_alerts.remove(&k) {
            a.resolved_at = Some(now);
            info!(device = %mac, alert = kind, "alert resolved");
            self.batch.alert(&a);
        }
    }

    pub(super) fn resolve_alert_for_capture(
        &mut self,
        mac: &str,
        capture_id: u64,
        now: DateTime<Utc>,
    ) {
        self.resolve_alert_key((mac.to_string(), "image_failed", Some(capture_id)), now);
    }

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
        let visited = self.store.for_each_device(&mut |stored| {
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

pub(super) fn alert_kind(s: &str) -> Option<&'static str> {
    match s {
        "image_failed" => Some("image_failed"),
        "device_error" => Some("device_error"),
        "missed_wake" => Some("missed_wake"),
        "low_battery" => Some("low_battery"),
        "offline" => Some("offline"),
        _ => None,
    }
}
