//! Result rows and tables, and the check of what the gateway stored.

use crate::cli::Common;
use crate::load::{LoadResult, Wake};
use barngate::store::Store;
use sha2::Digest;
use std::path::Path;

#[derive(serde::Serialize, Clone)]
pub struct Row {
    pub stack: String,
    pub devices: usize,
    pub image_size: usize,
    pub chunk: usize,
    pub encoding: String,
    pub loss: f64,
    pub chunk_msgs: u64,
    pub resent: u64,
    pub elapsed_s: f64,
    pub chunk_msgs_per_s: f64,
    pub images: usize,
    pub failed: usize,
    pub images_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
}

pub fn row(stack: &str, c: &Common, r: &LoadResult, cpu_s: f64, rss: f64) -> Row {
    Row {
        stack: stack.into(),
        devices: r.devices,
        image_size: c.image_size,
        chunk: c.chunk,
        encoding: format!("{:?}", c.encoding).to_lowercase(),
        loss: c.loss,
        chunk_msgs: r.chunk_msgs,
        resent: r.resent,
        elapsed_s: r.elapsed,
        chunk_msgs_per_s: r.chunk_msgs as f64 / r.elapsed,
        images: r.images(),
        failed: r.devices - r.images(),
        images_per_s: r.images() as f64 / r.elapsed,
        p50_ms: r.pct(0.5),
        p99_ms: r.pct(0.99),
        cpu_s,
        peak_rss_mib: rss,
    }
}

pub fn print_table(rows: &[Row]) {
    println!(
        "{:<8} {:>7} {:>9} {:>10} {:>8} {:>6} {:>9} {:>9} {:>7} {:>8}",
        "stack",
        "devices",
        "chunks",
        "chunks/s",
        "images/s",
        "failed",
        "p50 ms",
        "p99 ms",
        "cpu s",
        "rss MiB"
    );
    for r in rows {
        println!(
            "{:<8} {:>7} {:>9} {:>10.0} {:>8.1} {:>6} {:>9.0} {:>9.0} {:>7.2} {:>8.1}",
            r.stack,
            r.devices,
            r.chunk_msgs,
            r.chunk_msgs_per_s,
            r.images_per_s,
            r.failed,
            r.p50_ms,
            r.p99_ms,
            r.cpu_s,
            r.peak_rss_mib
        );
    }
}

pub fn report_errors(r: &LoadResult) {
    for w in r.wakes.iter().filter(|w| w.error.is_some()).take(3) {
        eprintln!("  {}: {}", w.id, w.error.as_deref().unwrap_or(""));
    }
}

pub fn verify_images(dir: &Path, expect: &[Wake]) -> (usize, Vec<String>) {
    let store = Store::open(&dir.join("barngate.redb")).expect("open store");
    let mut ok = 0;
    let mut bad = Vec::new();
    let images = store.images(None).expect("images");
    for w in expect {
        let found = images
            .iter()
            .find(|c| c.mac == w.id && c.image_name == w.name);
        match found {
            Some(c) => {
                let bytes = store.image_bytes(c.id).ok().flatten().unwrap_or_default();
                let sha = hex::encode(sha2::Sha256::digest(&bytes));
                if sha == w.sha256 && c.sha256.as_deref() == Some(sha.as_str()) {
                    ok += 1;
                } else {
                    bad.push(format!("{}/{}: sha mismatch", w.id, w.name));
                }
            }
            None => bad.push(format!("{}/{}: not stored", w.id, w.name)),
        }
    }
    (ok, bad)
}
