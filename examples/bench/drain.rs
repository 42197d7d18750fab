//! `bench drain`: a backlog drain, the gateway and the ceiling side by side.

use crate::cli::Common;
use crate::load::{mac, run_load, LoadCfg, LoadResult, RUN_BASE};
use crate::report::report_errors;
use crate::stack::{peak_rss_mib, start_ceiling, start_gateway, tmpdir};
use crate::tls::gateway_tls;

/// One drain run of one stack.
#[derive(Clone)]
pub struct DrainRow {
    pub stack: String,
    pub images: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub chunk_msgs: u64,
    pub resent: u64,
    pub elapsed_s: f64,
    pub chunk_msgs_per_s: f64,
    /// The stack's CPU seconds from the first HELLO to the last ACK_OK.
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
}

pub fn drain_row(stack: &str, r: &LoadResult, rss: f64) -> DrainRow {
    let mut l: Vec<f64> = r
        .wakes
        .iter()
        .flat_map(|w| w.acks.iter().map(|d| d.as_secs_f64() * 1000.0))
        .collect();
    l.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if l.is_empty() {
            return f64::NAN;
        }
        l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1]
    };
    DrainRow {
        stack: stack.into(),
        images: l.len(),
        p50_ms: pct(0.5),
        p90_ms: pct(0.9),
        p99_ms: pct(0.99),
        chunk_msgs: r.chunk_msgs,
        resent: r.resent,
        elapsed_s: r.elapsed,
        chunk_msgs_per_s: r.chunk_msgs as f64 / r.elapsed,
        cpu_s: r.stack_wake.map_or(f64::NAN, |w| w.0),
        peak_rss_mib: rss,
    }
}

pub fn print_drain(rows: &[DrainRow]) {
    println!(
        "{:<16} {:>7} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10} {:>7} {:>8}",
        "stack",
        "images",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "chunks",
        "resent",
        "chunks/s",
        "cpu s",
        "rss MiB"
    );
    for r in rows {
        println!(
            "{:<16} {:>7} {:>8.0} {:>8.0} {:>8.0} {:>9} {:>8} {:>10.0} {:>7.2} {:>8.1}",
            r.stack,
            r.images,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.chunk_msgs,
            r.resent,
            r.chunk_msgs_per_s,
            r.cpu_s,
            r.peak_rss_mib
        );
    }
}

/// `bench drain`: `devices` devices each drain `pending` images, gateway
/// (mutual TLS, certificates issued as for `run`) and ceiling (plaintext)
/// taking turns for `repeat` rounds.
pub async fn scenario_drain(
    c: Common,
    devices: usize,
    pending: u32,
    stacks: Vec<String>,
    repeat: usize,
) {
    let cfg = LoadCfg::from(&c);
    let plain = LoadCfg {
        tls: None,
        ..cfg.clone()
    };
    let n = devices;
    println!(
        "drain: {n} devices x {pending} pending images x {} B ({} B chunks, {} chunks), loss {:.0} % (first pass), QoS 1, {:?}; gateway over mTLS, ceiling plaintext",
        c.image_size,
        c.chunk,
        c.image_size.div_ceil(c.chunk),
        c.loss * 100.0,
        c.encoding
    );
    let mut rows: Vec<DrainRow> = Vec::new();
    for stack in (0..repeat.max(1)).flat_map(|_| stacks.iter()) {
        let row = match stack.as_str() {
            "gateway" => {
                let dir = tmpdir(&format!("drain{n}"));
                let ids: Vec<String> = (0..n).map(|d| mac(RUN_BASE, d)).collect();
                let cfg = LoadCfg {
                    tls: gateway_tls(&c, &dir, &ids),
                    ..cfg.clone()
                };
                let (mut p, addr) = start_gateway(&c, &dir);
                let r = run_load(addr, RUN_BASE, n, pending, &cfg, None, Some(p.pid())).await;
                let rss = peak_rss_mib(p.pid());
                p.term();
                report_errors(&r);
                let _ = std::fs::remove_dir_all(&dir);
                drain_row("gateway", &r, rss)
            }
            "ceiling" | "ceiling-nodelay" => {
                let (mut p, addr) = start_ceiling(&c, stack == "ceiling-nodelay");
                let r = run_load(addr, RUN_BASE, n, pending, &plain, None, Some(p.pid())).await;
                let rss = peak_rss_mib(p.pid());
                p.kill9();
                report_errors(&r);
                drain_row(stack, &r, rss)
            }
            other => panic!("unknown stack {other}"),
        };
        print_drain(std::slice::from_ref(&row));
        rows.push(row);
    }
    let median = |s: &str, f: fn(&DrainRow) -> f64| {
        let mut v: Vec<f64> = rows.iter().filter(|r| r.stack == s).map(f).collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    println!("\nmedians of {} rounds:", repeat.max(1));
    let med: Vec<DrainRow> = stacks
        .iter()
        .filter_map(|s| {
            let r = rows.iter().find(|r| &r.stack == s)?;
            let m = |f: fn(&DrainRow) -> f64| median(s, f).unwrap_or(f64::NAN);
            Some(DrainRow {
                // The fewest images any round ACKed.
                images: rows
                    .iter()
                    .filter(|r| &r.stack == s)
                    .map(|r| r.images)
                    .min()
                    .unwrap_or(0),
                p50_ms: m(|r| r.p50_ms),
                p90_ms: m(|r| r.p90_ms),
                p99_ms: m(|r| r.p99_ms),
                chunk_msgs: m(|r| r.chunk_msgs as f64) as u64,
                resent: m(|r| r.resent as f64) as u64,
                elapsed_s: m(|r| r.elapsed_s),
                chunk_msgs_per_s: m(|r| r.chunk_msgs_per_s),
                cpu_s: m(|r| r.cpu_s),
                peak_rss_mib: m(|r| r.peak_rss_mib),
                ..r.clone()
            })
        })
        .collect();
    print_drain(&med);
    let expect = n * pending as usize;
    for r in &med {
        println!(
            "{}: {} of {expect} images ACKed in every round{}",
            r.stack,
            r.images,
            if r.images == expect { "" } else { " (SHORT)" }
        );
    }
    for other in stacks.iter().filter(|s| s.starts_with("ceiling")) {
        let ratio = |f: fn(&DrainRow) -> f64| Some(median("gateway", f)? / median(other, f)?);
        if let (Some(p50), Some(p90), Some(p99), Some(tput), Some(cpu)) = (
            ratio(|r| r.p50_ms),
            ratio(|r| r.p90_ms),
            ratio(|r| r.p99_ms),
            ratio(|r| r.chunk_msgs_per_s),
            ratio(|r| r.cpu_s),
        ) {
            println!(
                "gateway/{other}: p50 {p50:.2}x (target <= 1.30x, {}), p90 {p90:.2}x, p99 {p99:.2}x, chunk msgs/s {tput:.2} (target >= 0.75, {}), CPU s {cpu:.2}x",
                if p50 <= 1.3 { "met" } else { "NOT met" },
                if tput >= 0.75 { "met" } else { "NOT met" },
            );
        }
    }
}
