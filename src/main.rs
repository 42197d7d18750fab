//! The `barngate` command line: a thin edge over the library.

// mimalloc, without transparent huge pages (feature `no_thp`): chunk payloads
// are allocated on the front's threads and freed on the ingest thread, and
// glibc malloc spent ~15–20 % of the gateway's CPU on that traffic (bench at
// 1,000 devices: +15 % chunk msgs/s, −12 % CPU). Huge pages had 1,000 idle
// connections cost 150+ MiB; without them the RSS stays under the target.
// `--no-default-features` builds on the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};
use barngate::admin::{self, Exported, ImageView, Request};
use barngate::clock::SystemClock;
use barngate::provision::{self, RegistryChange};
use barngate::server::{self, Gateway, GatewayOptions, DB_FILE};
use barngate::store::Store;
use barngate::upstream::SyncStatus;
use base64::Engine as _;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "barngate",
    version,
    about = "On-site TLS MQTT gateway for sleepy ESP32-CAM camera nodes"
)]
struct Cli {
    /// Data directory: database, certificates, config, admin socket.
    #[arg(long, global = true, env = "BARNGATE_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Config file (default: <data-dir>/barngate.toml, written on first run).
    #[arg(long, global = true, env = "BARNGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway: broker, ingest, database, dashboard.
    Serve {
        /// Device listener address (overrides mqtt.listen).
        #[arg(long)]
        mqtt_listen: Option<SocketAddr>,
        /// HTTP address for the dashboard, /metrics and /healthz (overrides http.listen).
        #[arg(long)]
        http_listen: Option<SocketAddr>,
    },
    /// Devices in the registry.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// The site certificate authority.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Images received.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Upstream forwarding state.
    Sync {
        #[command(subcommand)]
        cmd: SyncCmd,
    },
    /// Upstream (cloud) setup.
    Upstream {
        #[command(subcommand)]
        cmd: UpstreamCmd,
    },
    /// Print the commented configuration template.
    Configfile,
    /// Gateway administration.
    Admin {
        #[command(subcommand)]
        cmd: AdminCmd,
    },
    /// Run simulated ESP32-CAM nodes: in simulated time against an
    /// in-process gateway (default), or in real time against `--gateway`.
    Simulate(SimulateArgs),
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Set the dashboard password (needed when HTTP is not on loopback).
    SetPassword {
        /// Read the password from the first line of stdin, without prompting.
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create the site root CA, its issuing intermediate and the gateway's
    /// TLS server certificate (ECDSA P-256) under <data-dir>/certs. `serve`
    /// does this on first start.
    Init {
        /// DNS name devices use to reach the gateway (repeatable).
        #[arg(long = "hostname")]
        hostnames: Vec<String>,
        /// IP address devices use to reach the gateway (repeatable).
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
    },
    /// Copy the root CA certificate and key to DIR (key 0600), to keep
    /// offline before `ca remove-root-key`.
    ExportRoot {
        #[arg(long)]
        out: PathBuf,
    },
    /// Delete the root CA key from the gateway. Devices and the server
    /// certificate are signed by the intermediate from then on; creating a
    /// new intermediate (or CA) needs the exported key.
    RemoveRootKey,
}

#[derive(clap::Args)]
struct SimulateArgs {
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

#[derive(Subcommand)]
enum SyncCmd {
    /// Backlog, oldest queued item's age, last success, last error.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UpstreamCmd {
    /// Apply the cloud schema migrations the database lacks (safe to re-run)
    /// and create the object bucket if absent.
    #[command(alias = "init-schema")]
    Migrate,
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Issue a device certificate, register the device and write
    /// {MAC}.crt.pem, {MAC}.key.pem, ca.crt.pem and {MAC}.h into --out.
    /// Re-issuing rotates: the previous certificate (and password) stops working.
    Issue {
        /// The device's MAC (any common spelling).
        mac: String,
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        location: Option<String>,
        /// Pin the device's dialect: firmware or v1.
        #[arg(long)]
        dialect: Option<barngate::protocol::Dialect>,
        /// Certificate validity in days.
        #[arg(long, default_value_t = barngate::pki::DEFAULT_DEVICE_DAYS)]
        days: u32,
        /// Output directory for the device's files.
        #[arg(long)]
        out: PathBuf,
        /// Also issue a random MQTT password for the password listener
        /// (mqtt.password_listen): printed once, written to {MAC}.password
        /// and into {MAC}.h; only its argon2 hash is kept. Without it, a
        /// re-issue removes the device's password.
        #[arg(long)]
        password: bool,
    },
    /// Revoke a device: its certificate stops working at once (also on the
    /// running gateway, whose open session with it is closed).
    Revoke {
        /// The device's MAC (any common spelling).
        mac: String,
    },
    /// List registered devices.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// List complete images, oldest first.
    List {
        /// Only this device (MAC, any common spelling).
        #[arg(long)]
        device: Option<String>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Write one complete image to a file.
    Export {
        #[arg(long)]
        device: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Logs to stderr through a writer thread: a wake of a thousand devices
/// logs ~10,000 lines a second, and one `write` each on the ingest and
/// front threads cost them several per cent. The thread writes what is
/// queued in 8 KiB blocks and flushes whenever the queue is empty; a full
/// queue makes the logging thread wait rather than drop lines. The queue
/// holds 4,096 lines (its slots are allocated up front: the default
/// 128,000 cost 4 MiB of resident memory). Keep the guard until exit:
/// dropping it flushes the rest.
fn init_tracing() -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::{filter::filter_fn, prelude::*, EnvFilter};
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(4096)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let filter = EnvFilter::try_from_env("BARNGATE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn"));
    // rumqttd opens error-level spans around every packet (the topic
    // formatted with Debug); our log lines never show them, and they cost
    // the broker thread a few per cent. Its events still pass.
    let no_broker_spans = filter_fn(|m| !(m.is_span() && m.target().starts_with("rumqttd")));
    tracing_subscriber::registry()
        .with(filter)
        .with(no_broker_spans)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                // Colour codes only on a terminal, not in a file or the journal.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    guard
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve {
            mqtt_listen,
            http_listen,
        } => {
            let _log = init_tracing();
            serve(
                &cli.data_dir,
                cli.config.as_deref(),
                mqtt_listen,
                http_listen,
            )
            .await
        }
        Cmd::Admin {
            cmd: AdminCmd::SetPassword { password_stdin },
        } => set_password(&cli.data_dir, password_stdin),
        Cmd::Ca {
            cmd: CaCmd::Init { hostnames, ips },
        } => {
            server::ensure_data_dir(&cli.data_dir)?;
            let pki = server::pki(&cli.data_dir);
            let mut opts = barngate::pki::CaInitOptions::detected();
            opts.hostnames.extend(hostnames);
            opts.ips.extend(ips);
            let r = pki.init_ca(&opts)?;
            println!("site CA:            {}", r.ca_cert_path.display());
            println!("CA fingerprint:     {}", r.ca_fingerprint_sha256);
            println!("CA valid until:     {}", r.ca_not_after.to_rfc3339());
            println!("server certificate: {}", r.server.cert_path.display());
            println!("server names:       {}", r.server.sans.join(", "));
            println!("issuing CA:         {}", pki.issuing_cert_path().display());
            println!("root CA key:        {} (export it with `barngate ca export-root --out DIR`, then `barngate ca remove-root-key`)", pki.ca_key_path().display());
            Ok(())
        }
        Cmd::Ca {
            cmd: CaCmd::ExportRoot { out },
        } => {
            let pki = server::pki(&cli.data_dir);
            for f in pki.export_root(&out)? {
                println!("exported {}", f.display());
            }
            println!("keep these offline: the key is needed to create a new issuing CA");
            Ok(())
        }
        Cmd::Ca {
            cmd: CaCmd::RemoveRootKey,
        } => {
            let pki = server::pki(&cli.data_dir);
            let removed = pki.remove_root_key()?;
            println!(
                "removed {}; devices are issued by {}",
                removed.display(),
                pki.issuing_cert_path().display()
            );
            Ok(())
        }
        Cmd::Device {
            cmd:
                DeviceCmd::Issue {
                    mac,
                    site,
                    location,
                    dialect,
                    days,
                    out,
                    password,
                },
        } => {
            let pki = server::pki(&cli.data_dir);
            let password = password.then(barngate::devpass::generate);
            let now = chrono::Utc::now();
            let issued = pki.issue_device_with(&mac, days, &out, password.as_deref(), now)?;
            // The hash is in place before the registry change: on a running
            // gateway that change revokes the previous serial (and with it
            // the previous password).
            let passwords = barngate::devpass::PasswordStore::new(pki.dir());
            let had_password = match &password {
                Some(pw) => {
                    passwords.set(&issued.mac, &issued.serial_hex, pw, now)?;
                    false
                }
                None => passwords.remove(&issued.mac)?,
            };
            let change = RegistryChange::Issue {
                mac: issued.mac.clone(),
                serial: issued.serial_hex.clone(),
                site,
                location,
                dialect,
            };
            let o = registry(&cli.data_dir, cli.config.as_deref(), &pki, change).await?;
            println!(
                "device {} registered (serial {})",
                issued.mac, issued.serial_hex
            );
            println!("valid until {}", issued.not_after.to_rfc3339());
            for p in [
                &issued.paths.cert,
                &issued.paths.key,
                &issued.paths.ca_cert,
                &issued.paths.header,
            ] {
                println!("  {}", p.display());
            }
            if let (Some(pw), Some(p)) = (&password, &issued.paths.password) {
                println!("  {}", p.display());
                println!("MQTT user name: {}", issued.mac);
                println!("MQTT password:  {pw}");
                println!("(shown once; only its hash is kept)");
            }
            if had_password {
                println!("previous MQTT password removed");
            }
            for s in o.revoked_serials {
                println!("previous certificate {s} revoked");
            }
            Ok(())
        }
        Cmd::Device {
            cmd: DeviceCmd::Revoke { mac },
        } => {
            let pki = server::pki(&cli.data_dir);
            let o = registry(
                &cli.data_dir,
                cli.config.as_deref(),
                &pki,
                RegistryChange::Revoke { mac },
            )
            .await?;
            println!("device {} revoked", o.device.mac);
            for s in o.revoked_serials {
                println!("certificate {s} revoked");
            }
            for d in o.closed_sessions {
                println!("open session of {d} closed");
            }
            Ok(())
        }
        Cmd::Simulate(args) => {
            let _log = std::env::var_os("BARNGATE_LOG").map(|_| init_tracing());
            simulate(&cli.data_dir, cli.config.as_deref(), args).await
        }
        Cmd::Sync {
            cmd: SyncCmd::Status { json },
        } => {
            let v = query(&cli.data_dir, Request::SyncStatus).await?;
            let st: SyncStatus = serde_json::from_value(v)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                let t = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into())
                };
                match st.enabled {
                    Some(false) => println!(
                        "upstream:         disabled (upstream.enabled = false): nothing is sent; the backlog grows until it is enabled"
                    ),
                    Some(true) => println!("upstream:         enabled"),
                    None => println!("upstream:         unknown (no gateway has started with this database since)"),
                }
                println!("backlog:          {} items", st.backlog);
                println!(
                    "oldest queued:    {}",
                    match (st.oldest_queued_at, st.oldest_age_seconds) {
                        (Some(at), Some(age)) => format!("{} ({age} s ago)", at.to_rfc3339()),
                        _ => "-".into(),
                    }
                );
                println!("last success:     {}", t(st.last_success_at));
                match &st.last_error {
                    Some(e) => println!("last error:       {} ({})", e, t(st.last_error_at)),
                    None => println!("last error:       -"),
                }
                println!("failures since:   {}", st.consecutive_failures);
                println!("delivered total:  {}", st.delivered_total);
            }
            Ok(())
        }
        Cmd::Upstream {
            cmd: UpstreamCmd::Migrate,
        } => {
            let _log = init_tracing();
            let cfg = server::load_config(&cli.data_dir, cli.config.as_deref())?;
            let r = barngate::upstream::migrate(&cfg.upstream).await?;
            let bucket = &cfg.upstream.bucket;
            let schema = if r.schema.applied.is_empty() {
                format!("cloud schema at version {} (up to date)", r.schema.to)
            } else {
                format!(
                    "cloud schema migrated from version {} to {}",
                    r.schema.from, r.schema.to
                )
            };
            if r.bucket_created {
                eprintln!("{schema}; bucket {bucket} created");
            } else {
                eprintln!("{schema}; bucket {bucket} already there");
            }
            Ok(())
        }
        Cmd::Configfile => {
            print!("{}", barngate::config::TEMPLATE);
            Ok(())
        }
        Cmd::Device {
            cmd: DeviceCmd::List { json },
        } => {
            let v = query(&cli.data_dir, Request::DeviceList).await?;
            let devices: Vec<admin::DeviceView> = serde_json::from_value(v)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else if devices.is_empty() {
                println!("no devices registered");
            } else {
                println!(
                    "{:<14} {:<9} {:<8} {:<25} {:<25} {:>7}",
                    "DEVICE", "DIALECT", "STATUS", "LAST SEEN", "NEXT WAKE", "PENDING"
                );
                for d in devices {
                    let t = |t: Option<chrono::DateTime<chrono::Utc>>| {
                        t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
                    };
                    println!(
                        "{:<14} {:<9} {:<8} {:<25} {:<25} {:>7}",
                        d.mac,
                        d.dialect,
                        d.status,
                        t(d.last_seen),
                        t(d.next_wake),
                        d.pending_reported
                    );
                }
            }
            Ok(())
        }
        Cmd::Image {
            cmd: ImageCmd::List { device, json },
        } => {
            let v = query(&cli.data_dir, Request::ImageList { device }).await?;
            let images: Vec<ImageView> = serde_json::from_value(v)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else if images.is_empty() {
                println!("no images");
            } else {
                println!(
                    "{:<14} {:<32} {:>8} {:<9} {:<25} SHA-256",
                    "DEVICE", "IMAGE", "BYTES", "ORIGIN", "RECEIVED"
                );
                for i in images {
                    println!(
                        "{:<14} {:<32} {:>8} {:<9} {:<25} {}",
                        i.device,
                        i.image_name,
                        i.size,
                        i.origin,
                        i.received_at.to_rfc3339(),
                        i.sha256
                    );
                }
            }
            Ok(())
        }
        Cmd::Image {
            cmd: ImageCmd::Export { device, name, out },
        } => {
            let v = query(&cli.data_dir, Request::ImageExport { device, name }).await?;
            let e: Exported = serde_json::from_value(v)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(e.data)
                .context("image data from the gateway is not base64")?;
            std::fs::write(&out, &bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!(
                "wrote {} ({} bytes, sha256 {}) from device {}",
                out.display(),
                bytes.len(),
                e.image.sha256,
                e.image.device
            );
            Ok(())
        }
    }
}

/// A registry change through the running gateway, or on the database.
async fn registry(
    data_dir: &Path,
    config: Option<&Path>,
    pki: &barngate::pki::Pki,
    change: RegistryChange,
) -> Result<barngate::provision::RegistryOutcome> {
    let cfg = if config.is_some() || data_dir.join(server::CONFIG_FILE).exists() {
        server::load_config(data_dir, config)?
    } else {
        barngate::config::Config::default()
    };
    server::ensure_data_dir(data_dir)?;
    Ok(provision::apply(data_dir, &data_dir.join(DB_FILE), pki, &cfg, change).await?)
}

/// Asks the running gateway, or reads the database when none runs.
async fn query(data_dir: &Path, req: Request) -> Result<serde_json::Value> {
    if let Some(v) = admin::client::remote(data_dir, &req).await? {
        return Ok(v);
    }
    let db = data_dir.join(DB_FILE);
    if !db.exists() {
        bail!(
            "no database at {} (is --data-dir right? `barngate serve` creates it)",
            db.display()
        );
    }
    let store = server::open_store(&db)?;
    let v = admin::answer(&store, &req, chrono::Utc::now());
    if v["ok"].as_bool() == Some(true) {
        Ok(v["data"].clone())
    } else {
        bail!("{}", v["error"].as_str().unwrap_or("unknown error"))
    }
}

async fn serve(
    data_dir: &Path,
    config: Option<&Path>,
    mqtt_listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
) -> Result<()> {
    server::ensure_data_dir(data_dir)?;
    let cfg = server::load_config(data_dir, config)?;
    let mut gw = Gateway::start(
        GatewayOptions {
            data_dir: data_dir.to_path_buf(),
            config: cfg,
            mqtt_listen,
            http_listen,
        },
        Arc::new(SystemClock),
    )
    .await?;
    // One line on stdout for supervisors and tests.
    println!(
        "barngate ready mqtt={} http={} broker={}",
        gw.mqtt_addr, gw.http_addr, gw.broker_addr
    );
    // systemd `Type=notify`: ready now (a no-op without NOTIFY_SOCKET).
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stopped_by_error = tokio::select! {
        _ = tokio::signal::ctrl_c() => false,
        _ = term.recv() => false,
        _ = gw.ingest_stopped() => true,
    };
    tracing::info!("shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    gw.shutdown().await?;
    if stopped_by_error {
        bail!("the ingest stopped on an error (see the log above)");
    }
    Ok(())
}

/// `admin set-password`: reads the password (prompting on a terminal unless
/// `--password-stdin`) and stores its argon2 hash in the data directory.
fn set_password(data_dir: &Path, from_stdin: bool) -> Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    server::ensure_data_dir(data_dir)?;
    let stdin = std::io::stdin();
    let prompt = !from_stdin && stdin.is_terminal();
    let read = |label: &str| -> Result<String> {
        if prompt {
            eprint!("{label}: ");
            std::io::stderr().flush()?;
        }
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    };
    let pw = read("New dashboard password")?;
    if prompt && read("Repeat it")? != pw {
        bail!("the passwords differ; nothing changed");
    }
    barngate::http::auth::set_password(data_dir, &pw)?;
    eprintln!(
        "dashboard password set ({}); a running gateway uses it at the next login",
        barngate::http::auth::password_path(data_dir).display()
    );
    Ok(())
}

async fn simulate(data_dir: &Path, config: Option<&Path>, a: SimulateArgs) -> Result<()> {
    use barngate::sim::{self, Faults, FleetOptions, Outage, RestartKind};
    use chrono::{Duration, Utc};
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
