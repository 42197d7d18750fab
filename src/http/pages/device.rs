//! The device page: status, alerts, latest images, telemetry charts and
//! wake sessions.

use super::alerts::alert_table;
use super::chart::chart;
use super::layout::{esc, fmt_opt, fmt_time, not_found, page};
use crate::http::{read, HttpState};
use crate::store::{AlertRecord, CaptureRecord, TelemetryRecord};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use std::fmt::Write as _;

/// Latest images shown on a device page.
const DEVICE_THUMBS: usize = 8;
/// Wake sessions shown on a device page.
const DEVICE_SESSIONS: usize = 20;
/// Most telemetry points drawn per chart (the newest).
const CHART_POINTS: usize = 500;

fn thumbs(caps: &[CaptureRecord]) -> String {
    let mut o = String::from("<div class=\"thumbs\">");
    for c in caps {
        let _ = write!(
            o,
            "<a href=\"/images/{id}\"><img src=\"/images/{id}/raw\" width=\"160\" loading=\"lazy\" alt=\"{n}\" title=\"{n}\"></a>",
            id = c.id,
            n = esc(&c.image_name)
        );
    }
    o.push_str("</div>");
    o
}

pub async fn device(State(s): State<HttpState>, Path(mac): Path<String>) -> Response {
    let Ok(mac) = crate::protocol::normalize_device_id(&mac) else {
        return not_found(&s, "No such device.");
    };
    let snap = match s.snapshot().await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let m = mac.clone();
    type Data = (
        Option<crate::store::DeviceRecord>,
        Vec<crate::store::SessionRecord>,
        Vec<TelemetryRecord>,
        Vec<CaptureRecord>,
        Vec<AlertRecord>,
    );
    let data: Result<Data, _> = read(&s, move |st| {
        Ok((
            st.device(&m)?,
            st.sessions(&m)?,
            st.telemetry(&m)?,
            st.images(Some(&m))?,
            st.alerts()?.into_iter().filter(|a| a.mac == m).collect(),
        ))
    })
    .await;
    let (dev, sessions, telemetry, images, alerts) = match data {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(d) = dev else {
        return not_found(&s, &format!("Device {mac} is not registered."));
    };
    let st = snap.stats.get(&mac).cloned().unwrap_or_default();
    let online = d
        .last_seen
        .is_some_and(|t| s.clock.now() - t < crate::alerts::ONLINE_WITHIN);
    let mut b = String::new();
    let _ = write!(
        b,
        "<table id=\"device-info\">\
<tr><th>Status</th><td class=\"{cls}\">{status}</td></tr>\
<tr><th>Location</th><td>{loc}</td></tr>\
<tr><th>Last seen</th><td>{seen}</td></tr><tr><th>Next wake</th><td>{next}</td></tr>\
<tr><th>Pending images</th><td>{pending}</td></tr><tr><th>Pending queue age</th><td>{age}</td></tr>\
<tr><th>Firmware</th><td>{fw}</td></tr><tr><th>Dialect</th><td>{dialect}</td></tr>\
<tr><th>Battery</th><td>{bat}</td></tr>\
<tr><th>Images complete / failed</th><td>{ok} / {failed}</td></tr>\
<tr><th>Success rate</th><td id=\"success-rate\">{succ}</td></tr>\
<tr><th>Average retries</th><td>{retries}</td></tr>\
<tr><th>Chunk loss</th><td>{loss}</td></tr></table>",
        cls = if online { "ok" } else { "warn" },
        status = if d.status != "active" {
            esc(&d.status)
        } else if online {
            "online".into()
        } else {
            "offline".into()
        },
        loc = esc(d.location.as_deref().unwrap_or("–")),
        seen = esc(&fmt_time(&s, d.last_seen)),
        next = esc(&fmt_time(&s, d.next_wake)),
        pending = d.pending_reported,
        age = if st.pending_age_s > 0 {
            format!("{:.1} h", st.pending_age_s as f64 / 3600.0)
        } else {
            "–".into()
        },
        fw = esc(d.firmware_version.as_deref().unwrap_or("unknown")),
        dialect = esc(d.dialect.as_str()),
        bat = fmt_opt(d.battery, " %"),
        ok = st.images_complete,
        failed = st.images_failed,
        succ = fmt_opt(st.success_rate().map(|r| r * 100.0), " %"),
        retries = st
            .average_retries()
            .map(|v| format!("{v:.2}"))
            .unwrap_or_else(|| "–".into()),
        loss = fmt_opt(st.chunk_loss_pct(), " %"),
    );
    let active: Vec<&AlertRecord> = alerts.iter().filter(|a| a.resolved_at.is_none()).collect();
    b.push_str("<h2>Active alerts</h2>");
    b.push_str(&alert_table(&s, "device-alerts", &active, false));
    b.push_str("<h2>Latest images</h2>");
    let latest: Vec<CaptureRecord> = images.iter().rev().take(DEVICE_THUMBS).cloned().collect();
    if latest.is_empty() {
        b.push_str("<p>No images yet.</p>");
    } else {
        b.push_str(&thumbs(&latest));
        let _ = write!(
            b,
            "<p><a href=\"/images?device={}\">All images of this device</a></p>",
            esc(&mac)
        );
    }
    b.push_str("<h2>Telemetry</h2>");
    let tail = &telemetry[telemetry.len().saturating_sub(CHART_POINTS)..];
    let series = |f: fn(&TelemetryRecord) -> Option<f64>| -> Vec<(DateTime<Utc>, f64)> {
        tail.iter()
            .filter_map(|r| f(r).map(|v| (r.captured_at, v)))
            .collect()
    };
    b.push_str(&chart(
        "temperature",
        "Temperature",
        "°C",
        &series(|r| r.temperature),
    ));
    b.push_str(&chart("humidity", "Humidity", "%", &series(|r| r.humidity)));
    b.push_str(&chart(
        "pressure",
        "Pressure",
        "hPa",
        &series(|r| r.pressure),
    ));
    b.push_str(&chart(
        "gas",
        "Gas resistance",
        "kΩ",
        &series(|r| r.gas_resistance),
    ));
    b.push_str("<h2>Recent wake sessions</h2>");
    if sessions.is_empty() {
        b.push_str("<p>No wakes yet.</p>");
    } else {
        b.push_str("<table id=\"sessions\"><tr><th>Woke</th><th>Pending reported</th><th>Capture requested</th>\
<th>Images complete</th><th>Images failed</th><th>Next wake assigned</th></tr>");
        for x in sessions.iter().rev().take(DEVICE_SESSIONS) {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&fmt_time(&s, Some(x.woke_at))),
                x.pending_reported,
                if x.capture_requested { "yes" } else { "no" },
                x.images_completed,
                x.images_failed,
                esc(&fmt_time(&s, x.next_wake_assigned))
            );
        }
        b.push_str("</table>");
    }
    page(&s, &format!("Device {mac}"), &b).into_response()
}
