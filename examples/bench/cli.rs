//! The command line: the subcommands and the options they share ([`Common`]).

use crate::conn::Loader;
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "barngate benchmark and fault-injection runner")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum Enc {
    /// Firmware dialect: JSON byte arrays (the real wire format).
    Json,
    /// base64 strings in the firmware topics.
    Base64,
}

#[derive(clap::Args, Clone)]
pub struct Common {
    /// Image size in bytes.
    #[arg(long, default_value_t = 51_200)]
    pub image_size: usize,
    /// Chunk size in bytes.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    #[arg(long, value_enum, default_value_t = Enc::Json)]
    pub encoding: Enc,
    /// Fraction of chunks dropped by devices on the first pass (0.05 = 5 %).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// The gateway binary.
    #[arg(long, default_value = "target/release/barngate")]
    pub gateway_bin: PathBuf,
    /// Gateway `ingest.quiet_gap_ms` (the seed worker uses the same gap).
    #[arg(long, default_value_t = 2000)]
    pub quiet_gap_ms: u64,
    /// Gateway `ingest.commit_interval_ms`.
    #[arg(long, default_value_t = 200)]
    pub commit_interval_ms: u64,
    /// Gateway `ingest.max_streaming` (the gateway's default).
    #[arg(long, default_value_t = 48)]
    pub max_streaming: u32,
    /// `load` only: CA certificate (PEM) the devices trust. With --cert-dir.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// `load` only: directory with `{MAC}.crt.pem` and `{MAC}.key.pem`.
    #[arg(long)]
    pub cert_dir: Option<PathBuf>,
    /// Connect to the gateway's loopback plaintext listener
    /// (`mqtt.plain_listen`) instead of the mutual-TLS listener.
    #[arg(long)]
    pub gateway_plain: bool,
    /// Pin the stack under test to CPU 0 and the load generator to CPU 1
    /// (`taskset`), so that neither takes the other's core.
    #[arg(long)]
    pub pin: bool,
    /// The devices' MQTT client (see bench/RESULTS.md, "Workload").
    #[arg(long, value_enum, default_value_t = Loader::Raw)]
    pub loader: Loader,
    /// Give up on a wake after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Gateway, ceiling and seed stack side by side over a sweep of device counts.
    Run {
        #[command(flatten)]
        c: Common,
        /// Device counts to sweep.
        #[arg(long, value_delimiter = ',', default_value = "10,50,200,500")]
        devices: Vec<usize>,
        /// Stacks to run.
        #[arg(long, value_delimiter = ',', default_value = "gateway,ceiling,seed")]
        stacks: Vec<String>,
        /// Results (JSON lines) go here; bench/plot.py draws the PNG from it.
        #[arg(long, default_value = "bench/results.jsonl")]
        out: PathBuf,
        /// Rounds per device count: every stack runs once per round, in
        /// turn, and the summary gives the median of the rounds (single
        /// runs on a shared 2-core machine vary by ±10–20 %).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// Two gateway binaries side by side: `--gateway-bin` (the candidate)
    /// and `--baseline-bin` take turns, one wake each, for several rounds;
    /// prints every run and the medians. On a noisy machine only alternating
    /// runs compare two builds.
    Ab {
        #[command(flatten)]
        c: Common,
        /// The binary to compare against.
        #[arg(long)]
        baseline_bin: PathBuf,
        /// Devices per wake.
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Rounds (each runs the baseline, then the candidate).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// A wake burst against the gateway with pre-registered devices:
    /// zero loss and RSS.
    Burst {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        #[arg(long, default_value_t = 10_000)]
        registered: usize,
        /// Only connect the devices (measure memory), do not wake them.
        #[arg(long)]
        connect_only: bool,
    },
    /// A backlog drain, gateway and ceiling side by side: every device
    /// wakes with `--pending` images on its SD card and sends them one after
    /// the other; reports the device's awake time per image (METADATA →
    /// ACK_OK), chunk msgs/s and the stack's CPU, medians over `--repeat`
    /// rounds (the stacks take turns).
    #[command(
        mut_arg("image_size", |a| a.default_value("49152")),
        mut_arg("loss", |a| a.default_value("0.05"))
    )]
    Drain {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 50)]
        devices: usize,
        /// Pending images per device (its HELLO's `pendingImg`).
        #[arg(long, default_value_t = 16)]
        pending: u32,
        /// Stacks to run: `ceiling` is bare rumqttd as it comes (no
        /// TCP_NODELAY on the connections it accepts), `ceiling-nodelay`
        /// the same with TCP_NODELAY set, as the gateway's front sets it.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "gateway,ceiling,ceiling-nodelay"
        )]
        stacks: Vec<String>,
        /// Rounds: every stack runs once per round, in turn; the summary
        /// gives the medians.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
    /// kill -9 of the gateway at random moments during a device run.
    Crash {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 50)]
        devices: usize,
        #[arg(long, default_value_t = 20)]
        trials: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// TLS record protection per cipher suite, in memory (no sockets): what
    /// sealing and opening a chunk-sized record costs with each suite the
    /// gateway offers, and which one it prefers on this CPU.
    Ciphers {
        /// Plaintext bytes per record (a firmware chunk message is ≈ 2 KB).
        #[arg(long, default_value_t = 2048)]
        size: usize,
        /// Records per suite and round.
        #[arg(long, default_value_t = 50_000)]
        records: usize,
        /// Rounds (the suites take turns; the best round is kept).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Run the load generator once against a broker already running.
    Load {
        #[command(flatten)]
        c: Common,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Only connect the devices, do not wake them.
        #[arg(long)]
        connect_only: bool,
        /// Report this process's memory once every device is connected.
        #[arg(long)]
        watch_pid: Option<u32>,
    },
}

impl Common {
    pub fn enc(&self) -> Enc {
        self.encoding
    }
}
