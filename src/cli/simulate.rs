//! `barngate simulate`: simulated ESP32-CAM nodes (the `simulator` feature).

use anyhow::{bail, Context, Result};
use barngate::server;
use barngate::sim::{self, Faults, FleetOptions, Outage, RestartKind};
use barngate::store::Store;
use chrono::{Duration, Utc};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::log::init_tracing;

#[derive(clap::Args)]
pub(super) struct SimulateArgs {
    /// A running gateway's device listener, HOST:PORT (real time over MQTT).
    /// Without it the fleet runs in simulated time against an in-process gateway.
    #[arg(long)]
    gateway: Option<String>,
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// firmware, v1 or mixed.
    #[arg(long, default_value = "firmware")]
    dialect: barngate::sim::DialectMix,
    /// Chunk size in bytes (128-1024).
    #[arg(long, default_value_t = 1024)]
    chunk_size: usize,
    /// Simulated days to run (simulated time).
    #[arg(long, default_value_t = 3.0)]
    days: f64,
    /// With --gateway: the site CA (`<data-dir>/certs/ca.crt.pem`) for mutual TLS.
    #[arg(long, requires = "cert_dir")]
    ca: Option<PathBuf>,
    /// With --gateway: directory of device certificates issued with
    /// `barngate device issue MAC --out DIR` (`{MAC}.crt.pem`, `{MAC}.key.pem`).
    /// Devices are B8F862000001, B8F862000002, …
    #[arg(long, requires = "ca")]
    cert_dir: Option<PathBuf>,
    /// Real-time run length in minutes (with --gateway; default: until Ctrl-C).
    #[arg(long)]
    minutes: Option<f64>,
    /// Percentage of chunks lost.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Percentage of chunks delivered twice.
    #[arg(long, default_value_t = 0.0)]
    dup: f64,
    /// Percentage of chunks reordered.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Percentage of image streams cut off by a disconnect.
    #[arg(long, default_value_t = 0.0)]
    disconnect: f64,
    /// Percentage of Wi-Fi attempts failing.
    #[arg(long, default_value_t = 0.0)]
    wifi_fail: f64,
    /// Wi-Fi outage, FROM-TO in days after the start, optionally :I,J device
    /// indices (e.g. `1-5` = offline days 1-5). Repeatable.
    #[arg(long)]
    outage: Vec<String>,
    /// Gateway restart (simulated time) this many hours after the start;
    /// append `!` for a crash without a final commit (e.g. `30!`). Repeatable.
    #[arg(long)]
    restart_at: Vec<String>,
    /// Largest crystal drift in percent (each device draws within ±this).
    #[arg(long, default_value_t = 0.5)]
    drift: f64,
    /// Random seed for drift and faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the devices' SD cards (and the in-process gateway's database) go
    /// (default: <data-dir>/sim).
    #[arg(long)]
    sd_dir: Option<PathBuf>,
    /// Simulation start, RFC 3339 (simulated time; default: tomorrow 07:00 UTC).
    #[arg(long)]
    start: Option<String>,
    /// Site time zone the devices read `5:30PM` in (with --gateway; in-process
    /// runs use the gateway config's).
    #[arg(long, default_value = "UTC")]
    timezone: String,
    /// Override ingest.max_streaming of the in-process gateway.
    #[arg(long)]
    max_streaming: Option<usize>,
    /// Image width and height in pixels.
    #[arg(long, default_value_t = 320)]
    width: u16,
    #[arg(long, default_value_t = 240)]
    height: u16,
}

pub(super) async fn run(data_dir: &Path, config: Option<&Path>, a: SimulateArgs) -> Result<()> {
    let _log = std::env::var_os("BARNGATE_LOG").map(|_| init_tracing());
    let start = match &a.start {
        Some(s) => chrono::DateTime::parse_from_rfc3339(s)
            .with_context(|| format!("--start {s:?} is not RFC 3339"))?
            .with_timezone(&Utc),
        None => (Utc::now() + Duration::days(1))
            .date_naive()
            .and_hms_opt(7, 0, 0)
            .context("valid time")?
            .and_utc(),
    };
    let real_start = Utc::now();
    let outage_base = if a.gateway.is_some() {
        real_start
    } else {
        start
    };
    let outages = a
        .outage
        .iter()
        .map(|o| Outage::parse(o, outage_base))
        .collect::<Result<Vec<_>, _>>()?;
    let mut restarts = Vec::new();
    for r in &a.restart_at {
        let (h, kind) = match r.strip_suffix('!') {
            Some(h) => (h, RestartKind::Crash),
            None => (r.as_str(), RestartKind::Graceful),
        };
        let h: f64 = h
            .parse()
            .with_context(|| format!("--restart-at {r:?} is not a number of hours"))?;
        restarts.push((
            start + Duration::milliseconds((h * 3_600_000.0) as i64),
            kind,
        ));
    }
    let sd_root = a.sd_dir.clone().unwrap_or_else(|| data_dir.join("sim"));
    let opts = FleetOptions {
        devices: a.devices,
        dialect: a.dialect,
        chunk_size: a.chunk_size,
        max_drift: a.drift / 100.0,
        seed: a.seed,
        sd_root: sd_root.clone(),
        image_width: a.width,
        image_height: a.height,
        timezone: a
            .timezone
            .parse()
            .map_err(|_| anyhow::anyhow!("--timezone {:?} is not an IANA time zone", a.timezone))?,
        faults: Faults {
            loss_pct: a.loss,
            dup_pct: a.dup,
            reorder_pct: a.reorder,
            disconnect_pct: a.disconnect,
            wifi_fail_pct: a.wifi_fail,
            outages,
            restarts,
        },
        ..FleetOptions::default()
    };
    let mut opts = opts;
    if a.gateway.is_some() {
        // Real time: first wakes 100 ms apart, so a demo starts at once.
        opts.first_wake_spread = Duration::milliseconds(100 * a.devices.min(6000) as i64);
    }
    opts.validate()?;
    eprintln!("SD cards in {}", sd_root.display());
    let t0 = std::time::Instant::now();
    let summary = match &a.gateway {
        Some(g) => {
            if !opts.faults.restarts.is_empty() {
                bail!("--restart-at needs the in-process gateway (drop --gateway)");
            }
            let mut conn = sim::Connection::parse(g)?;
            match (&a.ca, &a.cert_dir) {
                (Some(ca), Some(dir)) => conn = conn.with_tls(ca, dir)?,
                (None, None) => {}
                _ => bail!("--ca and --cert-dir go together (mutual TLS)"),
            }
            let minutes = a.minutes;
            let stop = async move {
                match minutes {
                    Some(m) => {
                        tokio::select! {
                            _ = tokio::time::sleep(std::time::Duration::from_secs_f64(m * 60.0)) => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                    }
                    None => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            };
            eprintln!(
                "{} devices against {g} in real time (Ctrl-C to stop)",
                a.devices
            );
            sim::run_mqtt(opts, conn, Some(std::time::Duration::from_secs(10)), stop).await?
        }
        None => {
            // The gateway's config when there is one; never written here.
            let file = config
                .map(Path::to_path_buf)
                .unwrap_or_else(|| data_dir.join(server::CONFIG_FILE));
            let mut cfg = if config.is_some() || file.exists() {
                barngate::config::Config::load(&file)?
            } else {
                barngate::config::Config::default()
            };
            if let Some(n) = a.max_streaming {
                cfg.ingest.max_streaming = n;
            }
            std::fs::create_dir_all(&sd_root)
                .with_context(|| format!("cannot create {}", sd_root.display()))?;
            let db = sd_root.join("gateway.redb");
            let store = Arc::new(Store::open(&db)?);
            eprintln!(
                "{} devices, {} simulated days from {start}, gateway database {}",
                a.devices,
                a.days,
                db.display()
            );
            let mut s = sim::Simulation::new(opts, cfg, store, start)?;
            s.progress_every = Some(Duration::hours(6));
            let d = Duration::milliseconds((a.days * 86_400_000.0) as i64);
            tokio::task::block_in_place(|| s.run_for(d))?
        }
    };
    println!("{summary}");
    eprintln!("wall time {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
