//! `bench ab`: two gateway binaries taking turns.

use crate::cli::Common;
use crate::load::LoadCfg;
use crate::run::gateway_once;
use std::path::PathBuf;

/// `bench ab`: the baseline and the candidate take turns.
pub async fn scenario_ab(c: Common, baseline: PathBuf, n: usize, rounds: usize) {
    let cfg = LoadCfg::from(&c);
    let builds = [
        (
            "baseline",
            Common {
                gateway_bin: baseline,
                ..c.clone()
            },
        ),
        ("candidate", c),
    ];
    let mut runs: Vec<Vec<(f64, f64, u64, f64)>> = vec![Vec::new(), Vec::new()];
    println!("round  build        chunk msgs/s   wake CPU s   page faults   p50 ms");
    for round in 1..=rounds.max(1) {
        for (i, (name, c)) in builds.iter().enumerate() {
            let (r, wake) = gateway_once(c, &cfg, n).await;
            let (cpu, faults) = wake.unwrap_or((f64::NAN, 0));
            println!(
                "{round:>5}  {name:<10} {:>14.0} {cpu:>12.2} {faults:>13} {:>8.0}",
                r.chunk_msgs_per_s, r.p50_ms
            );
            runs[i].push((r.chunk_msgs_per_s, cpu, faults, r.p50_ms));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("\nmedians of {} rounds, {n} devices:", runs[0].len());
    for (i, (name, c)) in builds.iter().enumerate() {
        let col =
            |f: fn(&(f64, f64, u64, f64)) -> f64| median(&mut runs[i].iter().map(f).collect());
        println!(
            "{name:<10} {:>9.0} chunk msgs/s, wake CPU {:.2} s, {:.0} page faults, p50 {:.0} ms  ({})",
            col(|r| r.0),
            col(|r| r.1),
            col(|r| r.2 as f64),
            col(|r| r.3),
            c.gateway_bin.display()
        );
    }
    let wins = runs[0]
        .iter()
        .zip(&runs[1])
        .filter(|(b, c)| c.0 > b.0)
        .count();
    println!(
        "the candidate was faster in {wins} of {} rounds",
        runs[0].len()
    );
}
