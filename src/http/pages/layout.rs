//! The frame every page shares (header, navigation, style) and the
//! formatting of what pages interpolate.

use crate::http::HttpState;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};

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

pub(super) fn page(s: &HttpState, title: &str, body: &str) -> Html<String> {
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

pub(super) fn fmt_time(s: &HttpState, t: Option<DateTime<Utc>>) -> String {
    t.map(|t| {
        t.with_timezone(&s.tz)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string()
    })
    .unwrap_or_else(|| "never".into())
}

pub(super) fn fmt_opt(v: Option<f64>, unit: &str) -> String {
    v.map(|v| format!("{v:.1}{unit}"))
        .unwrap_or_else(|| "–".into())
}

pub(super) fn not_found(s: &HttpState, what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        page(s, "Not found", &format!("<p>{}</p>", esc(what))),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
