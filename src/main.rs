//! The `barngate` command line: a thin edge over the library.

use anyhow::{bail, Context, Result};
use barngate::admin::{self, Exported, ImageView, Request};
use barngate::clock::SystemClock;
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
    /// Create the upstream PostgreSQL tables if absent.
    InitSchema,
}

#[derive(Subcommand)]
enum DeviceCmd {
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

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BARNGATE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve {
            mqtt_listen,
            http_listen,
        } => {
            init_tracing();
            serve(
                &cli.data_dir,
                cli.config.as_deref(),
                mqtt_listen,
                http_listen,
            )
            .await
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
            cmd: UpstreamCmd::InitSchema,
        } => {
            init_tracing();
            let cfg = server::load_config(&cli.data_dir, cli.config.as_deref())?;
            barngate::upstream::init_schema(&cfg.upstream).await?;
            eprintln!("upstream schema ready");
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

/// Asks the running gateway, or reads the database when none runs.
async fn query(data_dir: &Path, req: Request) -> Result<serde_json::Value> {
    if let Some(v) = admin::remote(data_dir, &req).await? {
        return Ok(v);
    }
    let db = data_dir.join(DB_FILE);
    if !db.exists() {
        bail!(
            "no database at {} (is --data-dir right? `barngate serve` creates it)",
            db.display()
        );
    }
    let store = Store::open(&db)?;
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
    println!("barngate ready mqtt={} http={}", gw.mqtt_addr, gw.http_addr);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stopped_by_error = tokio::select! {
        _ = tokio::signal::ctrl_c() => false,
        _ = term.recv() => false,
        _ = gw.ingest_stopped() => true,
    };
    tracing::info!("shutting down");
    gw.shutdown().await?;
    if stopped_by_error {
        bail!("the ingest stopped on an error (see the log above)");
    }
    Ok(())
}
