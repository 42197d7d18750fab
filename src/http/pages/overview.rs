//! The overview page: fleet cards and one row per device.

use super::layout::{esc, fmt_opt, fmt_time, page};
use crate::http::HttpState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::fmt::Write as _;

pub async fn overview(State(s): State<HttpState>) -> Response {
    let snap = match s.snapshot().await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let online = snap.devices.iter().filter(|d| snap.online(d)).count();
    let with_alerts = snap.active_alerts_by_device.len();
    let mut b = String::new();
    let card = |b: &mut String, id: &str, label: &str, v: String| {
        let _ = write!(
            b,
            "<div class=\"card\" id=\"{id}\">{}<b>{}</b></div>",
            esc(label),
            esc(&v)
        );
    };
    b.push_str("<div class=\"cards\">");
    card(
        &mut b,
        "registered",
        "Devices registered",
        snap.devices.len().to_string(),
    );
    card(&mut b, "online", "Online (seen < 2 h)", online.to_string());
    card(
        &mut b,
        "offline",
        "Offline",
        (snap.devices.len() - online).to_string(),
    );
    card(
        &mut b,
        "with-alerts",
        "With active alerts",
        with_alerts.to_string(),
    );
    card(
        &mut b,
        "images-today",
        "Images today",
        snap.images_today.to_string(),
    );
    card(
        &mut b,
        "backlog",
        "Upstream backlog",
        snap.upstream_backlog.to_string(),
    );
    let last_sync = snap
        .sync
        .as_ref()
        .and_then(|s| s.last_success_at)
        .map(|t| t.with_timezone(&s.tz).format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| "never".into());
    card(&mut b, "last-sync", "Last sync", last_sync);
    b.push_str("</div><h2>Devices</h2>");
    if snap.devices.is_empty() {
        b.push_str("<p>No devices registered yet.</p>");
    } else {
        b.push_str("<table id=\"devices\"><tr><th>Device</th><th>Location</th><th>Status</th><th>Last seen</th>\
<th>Next wake</th><th>Pending</th><th>Battery</th><th>Images</th><th>Success</th><th>Alerts</th></tr>");
        let mut devices: Vec<_> = snap.devices.iter().collect();
        devices.sort_by(|a, b| a.mac.cmp(&b.mac));
        for d in devices {
            let st = snap.stats.get(&d.mac).cloned().unwrap_or_default();
            let (cls, status) = if d.status != "active" {
                ("bad", d.status.as_str())
            } else if snap.online(d) {
                ("ok", "online")
            } else {
                ("warn", "offline")
            };
            let alerts = snap
                .active_alerts_by_device
                .get(&d.mac)
                .copied()
                .unwrap_or(0);
            let _ = write!(
                b,
                "<tr><td><a href=\"/devices/{m}\">{m}</a></td><td>{loc}</td><td class=\"{cls}\">{status}</td>\
<td>{seen}</td><td>{next}</td><td>{pending}</td><td>{bat}</td><td>{imgs}</td><td>{succ}</td><td class=\"{acls}\">{alerts}</td></tr>",
                m = esc(&d.mac),
                loc = esc(d.location.as_deref().unwrap_or("")),
                seen = esc(&fmt_time(&s, d.last_seen)),
                next = esc(&fmt_time(&s, d.next_wake)),
                pending = d.pending_reported,
                bat = fmt_opt(d.battery, " %"),
                imgs = st.images_complete,
                succ = fmt_opt(st.success_rate().map(|r| r * 100.0), " %"),
                acls = if alerts > 0 { "bad" } else { "" },
            );
        }
        b.push_str("</table>");
    }
    page(&s, "Overview", &b).into_response()
}
