//! The alerts page, and the alert table the device page shows too.

use super::layout::{esc, fmt_time, page};
use crate::http::{read, HttpState};
use crate::store::AlertRecord;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::fmt::Write as _;

/// Resolved alerts shown.
const RESOLVED_SHOWN: usize = 200;

pub(super) fn alert_table(
    s: &HttpState,
    id: &str,
    alerts: &[&AlertRecord],
    resolved: bool,
) -> String {
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
