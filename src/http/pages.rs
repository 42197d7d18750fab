//! The dashboard pages, rendered on the server as plain HTML with inline
//! SVG charts (no JavaScript): overview, device, images, alerts, login.
//! Everything interpolated goes through [`esc`].

use super::{auth, read, HttpState};
use crate::store::{AlertRecord, CaptureRecord, CaptureState, TelemetryRecord};
use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

/// Latest images shown on a device page.
const DEVICE_THUMBS: usize = 8;
/// Wake sessions shown on a device page.
const DEVICE_SESSIONS: usize = 20;
/// Most images listed on one images page.
const IMAGES_PAGE: usize = 200;
/// Resolved alerts shown.
const RESOLVED_SHOWN: usize = 200;
/// Most telemetry points drawn per chart (the newest).
const CHART_POINTS: usize = 500;

/// HTML-escapes text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#f6f6f3}\
header{background:#2f4f2f;color:#fff;padding:.6em 1em}header a{color:#fff;margin-right:1.2em;text-decoration:none}\
main{padding:1em;max-width:1100px}table{border-collapse:collapse;background:#fff;margin:.5em 0}\
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;font-size:.92em}\
.cards{display:flex;flex-wrap:wrap;gap:.8em}.card{background:#fff;border:1px solid #ddd;padding:.6em 1em;min-width:9em}\
.card b{display:block;font-size:1.6em}.ok{color:#2a7a2a}.bad{color:#b22}.warn{color:#b70}\
.thumbs img{margin:.2em;border:1px solid #ccc;background:#fff}svg.chart{background:#fff;border:1px solid #ddd;margin:.3em 0}\
form.inline{display:inline}";

fn page(s: &HttpState, title: &str, body: &str) -> Html<String> {
    let logout = if s.require_login {
        r#"<form class="inline" method="post" action="/logout"><button>Log out</button></form>"#
    } else {
        ""
    };
    Html(format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>{t} · barngate</title><style>{CSS}</style></head><body>\
<header><a href=\"/\"><b>barngate</b></a><a href=\"/\">Overview</a><a href=\"/images\">Images</a>\
<a href=\"/alerts\">Alerts</a>{logout}</header><main><h1>{t}</h1>{body}</main></body></html>",
        t = esc(title)
    ))
}

fn fmt_time(s: &HttpState, t: Option<DateTime<Utc>>) -> String {
    t.map(|t| {
        t.with_timezone(&s.tz)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string()
    })
    .unwrap_or_else(|| "never".into())
}

fn fmt_opt(v: Option<f64>, unit: &str) -> String {
    v.map(|v| format!("{v:.1}{unit}"))
        .unwrap_or_else(|| "–".into())
}

fn not_found(s: &HttpState, what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        page(s, "Not found", &format!("<p>{}</p>", esc(what))),
    )
        .into_response()
}

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

/// One line chart as inline SVG: time on x, value on y, min/max labelled.
pub fn chart(id: &str, title: &str, unit: &str, points: &[(DateTime<Utc>, f64)]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 170.0;
    const L: f64 = 56.0; // left margin for labels
    const T: f64 = 22.0;
    const B: f64 = 22.0;
    let mut o = format!(
        "<svg class=\"chart\" id=\"chart-{id}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\">\
<title>{t}</title><text x=\"{L}\" y=\"15\" font-size=\"13\">{t} ({u})</text>",
        t = esc(title),
        u = esc(unit)
    );
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|(_, v)| v.is_finite())
        .map(|(t, v)| (t.timestamp() as f64, *v))
        .collect();
    if pts.is_empty() {
        let _ = write!(
            o,
            "<text x=\"{L}\" y=\"{}\" font-size=\"12\" fill=\"#888\">no data</text></svg>",
            H / 2.0
        );
        return o;
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in &pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x1 - x0 < 1.0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    if y1 - y0 < 1e-9 {
        y0 -= 1.0;
        y1 += 1.0;
    }
    let sx = |x: f64| L + (x - x0) / (x1 - x0) * (W - L - 10.0);
    let sy = |y: f64| T + (y1 - y) / (y1 - y0) * (H - T - B);
    let _ = write!(
        o,
        "<line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{yb}\" stroke=\"#999\"/><line x1=\"{L}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\" stroke=\"#999\"/>\
<text x=\"{lx}\" y=\"{ty}\" font-size=\"11\" text-anchor=\"end\">{max:.1}</text><text x=\"{lx}\" y=\"{yb}\" font-size=\"11\" text-anchor=\"end\">{min:.1}</text>",
        yb = H - B,
        xr = W - 10.0,
        lx = L - 4.0,
        ty = T + 8.0,
        max = y1,
        min = y0
    );
    let fmt_day = |x: f64| {
        DateTime::<Utc>::from_timestamp(x as i64, 0)
            .map(|t| t.format("%m-%d %H:%M").to_string())
            .unwrap_or_default()
    };
    let _ = write!(
        o,
        "<text x=\"{L}\" y=\"{}\" font-size=\"11\">{}</text><text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
        H - 6.0,
        fmt_day(x0),
        W - 10.0,
        H - 6.0,
        fmt_day(x1)
    );
    let line: Vec<String> = pts
        .iter()
        .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
        .collect();
    let _ = write!(
        o,
        "<polyline fill=\"none\" stroke=\"#2f6f9f\" stroke-width=\"1.8\" points=\"{}\"/>",
        line.join(" ")
    );
    for (x, y) in pts.iter().rev().take(60) {
        let _ = write!(
            o,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.2\" fill=\"#2f6f9f\"/>",
            sx(*x),
            sy(*y)
        );
    }
    o.push_str("</svg>");
    o
}

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

fn alert_table(s: &HttpState, id: &str, alerts: &[&AlertRecord], resolved: bool) -> String {
    if alerts.is_empty() {
        return format!("<p id=\"{id}\">None.</p>");
    }
    let mut o = format!(
        "<table id=\"{id}\"><tr><th>Device</th><th>Kind</th><th>Severity</th><th>Message</th><th>Triggered</th>{}</tr>",
        if resolved { "<th>Resolved</th>" } else { "" }
    );
    for a in alerts {
        let cls = match a.severity.as_str() {
            "critical" | "error" => "bad",
            _ => "warn",
        };
        let _ = write!(
            o,
            "<tr><td><a href=\"/devices/{m}\">{m}</a></td><td>{k}</td><td class=\"{cls}\">{sev}</td><td>{msg}</td><td>{t}</td>{r}</tr>",
            m = esc(&a.mac),
            k = esc(&a.kind),
            sev = esc(&a.severity),
            msg = esc(&a.message),
            t = esc(&fmt_time(s, Some(a.triggered_at))),
            r = if resolved {
                format!("<td>{}</td>", esc(&fmt_time(s, a.resolved_at)))
            } else {
                String::new()
            }
        );
    }
    o.push_str("</table>");
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

#[derive(Deserialize)]
pub struct ImagesQuery {
    device: Option<String>,
    day: Option<String>,
}

pub async fn images(State(s): State<HttpState>, Query(q): Query<ImagesQuery>) -> Response {
    let device = q
        .device
        .filter(|d| !d.is_empty())
        .and_then(|d| crate::protocol::normalize_device_id(&d).ok());
    let day = q
        .day
        .filter(|d| !d.is_empty())
        .and_then(|d| NaiveDate::parse_from_str(&d, "%Y-%m-%d").ok());
    let dev = device.clone();
    let data = read(&s, move |st| {
        Ok((st.devices()?, st.images(dev.as_deref())?))
    })
    .await;
    let (devices, images) = match data {
        Ok(v) => v,
        Err(r) => return r,
    };
    let tz = s.tz;
    let day_of = |c: &CaptureRecord| {
        c.assembled_at
            .unwrap_or(c.first_seen_at)
            .with_timezone(&tz)
            .date_naive()
    };
    let mut days: Vec<NaiveDate> = images.iter().map(day_of).collect();
    days.sort();
    days.dedup();
    let mut b = String::from("<form method=\"get\" action=\"/images\">Device <select name=\"device\"><option value=\"\">all</option>");
    let mut macs: Vec<&str> = devices.iter().map(|d| d.mac.as_str()).collect();
    macs.sort();
    for m in macs {
        let _ = write!(
            b,
            "<option{} value=\"{m}\">{m}</option>",
            if device.as_deref() == Some(m) {
                " selected"
            } else {
                ""
            },
            m = esc(m)
        );
    }
    let _ = write!(
        b,
        "</select> Day <input type=\"date\" name=\"day\" value=\"{}\"> <button>Show</button></form>",
        day.map(|d| d.to_string()).unwrap_or_default()
    );
    b.push_str("<p id=\"days\">Days: ");
    let dq = device
        .as_deref()
        .map(|d| format!("device={}&amp;", esc(d)))
        .unwrap_or_default();
    for d in days.iter().rev().take(60) {
        let _ = write!(b, "<a href=\"/images?{dq}day={d}\">{d}</a> ");
    }
    b.push_str("</p>");
    let shown: Vec<&CaptureRecord> = images
        .iter()
        .rev()
        .filter(|c| day.is_none_or(|d| day_of(c) == d))
        .take(IMAGES_PAGE)
        .collect();
    if shown.is_empty() {
        b.push_str("<p>No images.</p>");
    } else {
        b.push_str("<table id=\"images\"><tr><th></th><th>Device</th><th>Image</th><th>Bytes</th><th>Received</th><th></th></tr>");
        for c in shown {
            let _ = write!(
                b,
                "<tr><td><a href=\"/images/{id}\"><img src=\"/images/{id}/raw\" width=\"96\" loading=\"lazy\" alt=\"\"></a></td>\
<td><a href=\"/devices/{m}\">{m}</a></td><td><a href=\"/images/{id}\">{n}</a></td><td>{size}</td><td>{t}</td>\
<td><a href=\"/images/{id}/download\">download</a></td></tr>",
                id = c.id,
                m = esc(&c.mac),
                n = esc(&c.image_name),
                size = c.image_size().unwrap_or(0),
                t = esc(&fmt_time(&s, c.assembled_at)),
            );
        }
        b.push_str("</table>");
    }
    page(&s, "Images", &b).into_response()
}

async fn complete_capture(s: &HttpState, id: u64) -> Result<CaptureRecord, Response> {
    match read(s, move |st| st.capture(id)).await? {
        Some(c) if c.state == CaptureState::Complete => Ok(c),
        _ => Err(not_found(s, "No such image.")),
    }
}

pub async fn image(State(s): State<HttpState>, Path(id): Path<u64>) -> Response {
    let c = match complete_capture(&s, id).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut b = format!(
        "<p><a href=\"/images/{id}/download\">Download</a> · <a href=\"/devices/{m}\">Device {m}</a></p>\
<img id=\"full\" src=\"/images/{id}/raw\" alt=\"{n}\" style=\"max-width:100%\">\
<table><tr><th>Device</th><td>{m}</td></tr><tr><th>Captured (device)</th><td>{dt}</td></tr>\
<tr><th>Received</th><td>{rt}</td></tr><tr><th>Bytes</th><td>{size}</td></tr><tr><th>SHA-256</th><td><code>{sha}</code></td></tr>\
<tr><th>Retries</th><td>{retries}</td></tr><tr><th>Origin</th><td>{origin:?}</td></tr>",
        m = esc(&c.mac),
        n = esc(&c.image_name),
        dt = esc(&fmt_time(&s, c.device_time)),
        rt = esc(&fmt_time(&s, c.assembled_at)),
        size = c.image_size().unwrap_or(0),
        sha = esc(c.sha256.as_deref().unwrap_or("")),
        retries = c.retries,
        origin = c.origin,
    );
    if let Some(m) = &c.metadata {
        let _ = write!(
            b,
            "<tr><th>Temperature</th><td>{}</td></tr><tr><th>Humidity</th><td>{}</td></tr>\
<tr><th>Pressure</th><td>{}</td></tr><tr><th>Gas resistance</th><td>{}</td></tr>",
            fmt_opt(m.temperature, " °C"),
            fmt_opt(m.humidity, " %"),
            fmt_opt(m.pressure, " hPa"),
            fmt_opt(m.gas_resistance, " kΩ")
        );
    }
    b.push_str("</table>");
    page(&s, &c.image_name, &b).into_response()
}

async fn image_response(s: HttpState, id: u64, download: bool) -> Response {
    let c = match complete_capture(&s, id).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let bytes = match read(&s, move |st| st.image_bytes(id)).await {
        Ok(Some(b)) => b,
        Ok(None) => return not_found(&s, "Image bytes missing."),
        Err(r) => return r,
    };
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("image/jpeg"),
    );
    // Device-sent bytes: a browser takes them as a JPEG and nothing else
    // (no sniffing into HTML), and nothing in them runs or loads anything
    // if it is opened as a document.
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static("default-src 'none'; img-src 'self'; sandbox"),
    );
    // Stored images never change: let the browser keep them.
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("private, max-age=86400, immutable"),
    );
    if download {
        // Device-sent names: keep a safe subset for the header.
        let name: String = format!("{}_{}", c.mac, c.image_name)
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() || "._-".contains(ch) {
                    ch
                } else {
                    '_'
                }
            })
            .collect();
        if let Ok(v) = header::HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    (h, bytes).into_response()
}

pub async fn image_raw(State(s): State<HttpState>, Path(id): Path<u64>) -> Response {
    image_response(s, id, false).await
}

pub async fn image_download(State(s): State<HttpState>, Path(id): Path<u64>) -> Response {
    image_response(s, id, true).await
}

pub async fn alerts(State(s): State<HttpState>) -> Response {
    let all = match read(&s, |st| st.alerts()).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let active: Vec<&AlertRecord> = all
        .iter()
        .rev()
        .filter(|a| a.resolved_at.is_none())
        .collect();
    let resolved: Vec<&AlertRecord> = all
        .iter()
        .rev()
        .filter(|a| a.resolved_at.is_some())
        .take(RESOLVED_SHOWN)
        .collect();
    let mut b = format!("<h2>Active ({})</h2>", active.len());
    b.push_str(&alert_table(&s, "active-alerts", &active, false));
    b.push_str("<h2>Resolved</h2>");
    b.push_str(&alert_table(&s, "resolved-alerts", &resolved, true));
    page(&s, "Alerts", &b).into_response()
}

fn login_page(s: &HttpState, msg: &str) -> Html<String> {
    let note = if auth::password_is_set(&s.data_dir) {
        String::new()
    } else {
        "<p class=\"bad\">No admin password is set: run <code>barngate admin set-password</code> on the gateway.</p>".into()
    };
    let mut b = format!("{note}<form id=\"login\" method=\"post\" action=\"/login\">");
    if !msg.is_empty() {
        let _ = write!(b, "<p class=\"bad\">{}</p>", esc(msg));
    }
    b.push_str("<label>Password <input type=\"password\" name=\"password\" autofocus></label> <button>Log in</button></form>");
    page(s, "Log in", &b)
}

pub async fn login_form(State(s): State<HttpState>) -> Response {
    if !s.require_login {
        return Redirect::to("/").into_response();
    }
    login_page(&s, "").into_response()
}

#[derive(Deserialize)]
pub struct LoginForm {
    password: String,
}

/// Checks the password within the login limits ([`auth::LoginLimits`]):
/// 429 for a locked-out address and 503 when no check is free in time,
/// neither running argon2.
pub async fn login(
    State(s): State<HttpState>,
    peer: Option<ConnectInfo<SocketAddr>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let ip = super::client_ip(peer.map(|c| c.0), &headers);
    let permit = match s.login.admit(ip).await {
        Ok(p) => p,
        Err(auth::NotChecked::LockedOut(left)) => {
            let secs = left.as_secs().max(1);
            tracing::warn!(client = %ip, retry_after_s = secs, "dashboard login refused: too many failures from this address");
            s.metrics.reject("login_locked_out");
            let page = login_page(
                &s,
                "Too many failed logins from this address; try again later.",
            );
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs.to_string())],
                page,
            )
                .into_response();
        }
        Err(auth::NotChecked::Busy) => {
            tracing::warn!(client = %ip, "dashboard login refused: password checks busy");
            s.metrics.reject("login_busy");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1".to_string())],
                login_page(&s, "The gateway is busy checking other logins; try again."),
            )
                .into_response();
        }
    };
    let m = s.metrics.clone();
    let running = m.login_checks_running.fetch_add(1, Ordering::Relaxed) + 1;
    m.login_checks_peak.fetch_max(running, Ordering::Relaxed);
    let dir = s.data_dir.clone();
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&dir, &f.password))
        .await
        .unwrap_or(false);
    m.login_checks_running.fetch_sub(1, Ordering::Relaxed);
    drop(permit);
    if !ok {
        let locked = s.login.failed(ip);
        tracing::warn!(client = %ip, locked_out = locked, "dashboard login failed");
        s.metrics.reject("login_failed");
        return (StatusCode::UNAUTHORIZED, login_page(&s, "Wrong password.")).into_response();
    }
    s.login.succeeded(ip);
    let token = s.sessions.create(s.clock.now());
    tracing::info!(client = %ip, "dashboard login");
    (
        [(
            header::SET_COOKIE,
            auth::set_cookie(&token, s.secure_cookie(&headers)),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

pub async fn logout(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(t) = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::token_from_cookies)
    {
        s.sessions.remove(t);
    }
    (
        [(
            header::SET_COOKIE,
            auth::clear_cookie(s.secure_cookie(&headers)),
        )],
        Redirect::to("/login"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn chart_draws_a_polyline_or_says_no_data() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 8, 0, 0).unwrap();
        let svg = chart(
            "t",
            "Temp <x>",
            "°C",
            &[(t, 20.0), (t + chrono::Duration::hours(8), 22.5)],
        );
        assert!(
            svg.contains("<polyline") && svg.contains("22.5") && svg.contains("Temp &lt;x&gt;")
        );
        assert!(chart("t", "T", "°C", &[]).contains("no data"));
        // One point and NaN do not divide by zero.
        let one = chart("t", "T", "°C", &[(t, 5.0), (t, f64::NAN)]);
        assert!(!one.contains("NaN") && !one.contains("inf"), "{one}");
    }
}
