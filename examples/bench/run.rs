//! `bench run`: the gateway, the ceiling and the seed stack side by side over
//! a sweep of device counts.

use crate::cli::Common;
use crate::load::{mac, run_load, LoadCfg, RUN_BASE};
use crate::report::{print_table, report_errors, row, Row};
use crate::stack::{
    cpu_secs, peak_rss_mib, seed_dir, start_ceiling, start_gateway, start_seed, tmpdir,
};
use crate::tls::gateway_tls;
use std::io::Write;
use std::path::PathBuf;

pub async fn scenario_run(
    c: Common,
    devices: Vec<usize>,
    stacks: Vec<String>,
    out: PathBuf,
    repeat: usize,
) {
    let cfg = LoadCfg::from(&c);
    // The ceiling and the seed stack have no TLS front: plaintext.
    let plain = LoadCfg {
        tls: None,
        ..cfg.clone()
    };
    let mut rows = Vec::new();
    let rounds = repeat.max(1);
    for &n in &devices {
        for stack in (0..rounds).flat_map(|_| stacks.iter()) {
            let r = match stack.as_str() {
                "gateway" => gateway_once(&c, &cfg, n).await.0,
                "ceiling" => {
                    let (mut p, addr) = start_ceiling(&c, false);
                    let cpu0 = cpu_secs(p.pid());
                    let r = run_load(addr, RUN_BASE, n, 0, &plain, None, Some(p.pid())).await;
                    let cpu = cpu_secs(p.pid()) - cpu0;
                    let rss = peak_rss_mib(p.pid());
                    p.kill9();
                    row("ceiling", &c, &r, cpu, rss)
                }
                "seed" => {
                    let dir = seed_dir(n);
                    let (mut m, mut w, addr) = start_seed(&c, &dir);
                    let cpu0 = cpu_secs(m.pid()) + cpu_secs(w.pid());
                    let r = run_load(addr, RUN_BASE, n, 0, &plain, None, Some(w.pid())).await;
                    let cpu = cpu_secs(m.pid()) + cpu_secs(w.pid()) - cpu0;
                    let rss = peak_rss_mib(m.pid()) + peak_rss_mib(w.pid());
                    w.kill9();
                    m.kill9();
                    let _ = std::fs::remove_dir_all(&dir);
                    report_errors(&r);
                    row("seed", &c, &r, cpu, rss)
                }
                other => panic!("unknown stack {other}"),
            };
            print_table(std::slice::from_ref(&r));
            rows.push(r);
        }
    }
    println!();
    print_table(&rows);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out)
        .unwrap();
    for r in &rows {
        writeln!(f, "{}", serde_json::to_string(r).unwrap()).unwrap();
    }
    // Ratios per device count, of the medians over the rounds. Chunk
    // msgs/s counts resends, which flatters a stack that loses messages
    // (the seed's Mosquitto drops QoS 1 messages past its queue limit);
    // images/s is what the site gets.
    let median = |s: &str, n: usize, f: fn(&Row) -> f64| {
        let mut v: Vec<f64> = rows
            .iter()
            .filter(|r| r.stack == s && r.devices == n)
            .map(f)
            .collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    if rounds > 1 {
        println!("\nmedians of {rounds} rounds:");
        let med: Vec<Row> = devices
            .iter()
            .flat_map(|&n| stacks.iter().map(move |s| (n, s)))
            .filter_map(|(n, s)| {
                let r = rows.iter().find(|r| &r.stack == s && r.devices == n)?;
                let m = |f: fn(&Row) -> f64| median(s, n, f).unwrap_or(0.0);
                Some(Row {
                    chunk_msgs: m(|r| r.chunk_msgs as f64) as u64,
                    resent: m(|r| r.resent as f64) as u64,
                    elapsed_s: m(|r| r.elapsed_s),
                    chunk_msgs_per_s: m(|r| r.chunk_msgs_per_s),
                    images: m(|r| r.images as f64) as usize,
                    failed: m(|r| r.failed as f64) as usize,
                    images_per_s: m(|r| r.images_per_s),
                    p50_ms: m(|r| r.p50_ms),
                    p99_ms: m(|r| r.p99_ms),
                    cpu_s: m(|r| r.cpu_s),
                    peak_rss_mib: m(|r| r.peak_rss_mib),
                    ..r.clone()
                })
            })
            .collect();
        print_table(&med);
    }
    for &n in &devices {
        let ratio =
            |f: fn(&Row) -> f64, other: &str| Some(median("gateway", n, f)? / median(other, n, f)?);
        if ratio(|r| r.chunk_msgs_per_s, "gateway").is_some() {
            let x = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.1}x"));
            let pc = |v: Option<f64>| v.map_or("-".into(), |x| format!("{:.0} %", x * 100.0));
            println!(
                "devices {n}: gateway/seed = {} (images/s {})  gateway/ceiling = {} (images/s {})",
                x(ratio(|r| r.chunk_msgs_per_s, "seed")),
                x(ratio(|r| r.images_per_s, "seed")),
                pc(ratio(|r| r.chunk_msgs_per_s, "ceiling")),
                pc(ratio(|r| r.images_per_s, "ceiling")),
            );
        }
    }
}

/// One wake of `n` devices against a fresh `barngate serve` (`c.gateway_bin`)
/// over mutual TLS: the row, and the gateway's CPU seconds and page faults
/// during the wake.
pub async fn gateway_once(c: &Common, cfg: &LoadCfg, n: usize) -> (Row, Option<(f64, u64)>) {
    let dir = tmpdir(&format!("gw{n}"));
    let ids: Vec<String> = (0..n).map(|d| mac(RUN_BASE, d)).collect();
    let cfg = LoadCfg {
        tls: gateway_tls(c, &dir, &ids),
        ..cfg.clone()
    };
    let (mut p, addr) = start_gateway(c, &dir);
    let cpu0 = cpu_secs(p.pid());
    let r = run_load(addr, RUN_BASE, n, 0, &cfg, None, Some(p.pid())).await;
    let cpu = cpu_secs(p.pid()) - cpu0;
    let rss = peak_rss_mib(p.pid());
    p.term();
    let _ = std::fs::remove_dir_all(&dir);
    report_errors(&r);
    (row("gateway", c, &r, cpu, rss), r.stack_wake)
}
