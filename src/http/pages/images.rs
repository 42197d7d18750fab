//! The images list, one image's page, and the image bytes (inline or as a
//! download).

use super::layout::{esc, fmt_opt, fmt_time, not_found, page};
use crate::http::{read, HttpState};
use crate::store::{CaptureRecord, CaptureState};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use chrono::NaiveDate;
use serde::Deserialize;
use std::fmt::Write as _;

/// Most images listed on one images page.
const IMAGES_PAGE: usize = 200;

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
    for (name, value) in [
        (header::CONTENT_TYPE, "image/jpeg"),
        // Device-sent bytes: a browser takes them as a JPEG and nothing else
        // (no sniffing into HTML), and nothing in them runs or loads
        // anything if it is opened as a document.
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; img-src 'self'; sandbox",
        ),
        // Stored images never change: let the browser keep them.
        (header::CACHE_CONTROL, "private, max-age=86400, immutable"),
    ] {
        h.insert(name, header::HeaderValue::from_static(value));
    }
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
