//! The command line: [`Cli`], its subcommands (one module each) and their
//! shared helpers (`log`, `query`).

mod admin;
mod ca;
mod configfile;
mod device;
mod image;
mod log;
mod query;
mod serve;
#[cfg(feature = "simulator")]
mod simulate;
mod sync;
mod upstream;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

use admin::AdminCmd;
use ca::CaCmd;
use device::DeviceCmd;
use image::ImageCmd;
#[cfg(feature = "simulator")]
use simulate::SimulateArgs;
use sync::SyncCmd;
use upstream::UpstreamCmd;

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
    #[cfg(feature = "simulator")]
    Simulate(SimulateArgs),
}

/// Parses the command line and runs the subcommand.
pub async fn run() -> Result<()> {
    let cli = Cli::parse();
    let data_dir = &cli.data_dir;
    let config = cli.config.as_deref();
    match cli.cmd {
        Cmd::Serve {
            mqtt_listen,
            http_listen,
        } => serve::run(data_dir, config, mqtt_listen, http_listen).await,
        Cmd::Device { cmd } => device::run(data_dir, config, cmd).await,
        Cmd::Ca { cmd } => ca::run(data_dir, cmd),
        Cmd::Image { cmd } => image::run(data_dir, cmd).await,
        Cmd::Sync { cmd } => sync::run(data_dir, cmd).await,
        Cmd::Upstream { cmd } => upstream::run(data_dir, config, cmd).await,
        Cmd::Configfile => configfile::run(),
        Cmd::Admin { cmd } => admin::run(data_dir, cmd),
        #[cfg(feature = "simulator")]
        Cmd::Simulate(args) => simulate::run(data_dir, config, args).await,
    }
}
