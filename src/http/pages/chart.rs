//! Line charts as inline SVG.

use super::layout::esc;
use chrono::{DateTime, Utc};
use std::fmt::Write as _;

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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

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
