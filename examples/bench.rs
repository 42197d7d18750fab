//! The side-by-side benchmark and fault-injection runner (bench/RESULTS.md).
//!
//! ```text
//! cargo build --release && cargo build --release --example ceiling
//! cargo run --release --example bench -- run
//! cargo run --release --example bench -- burst      # 1,000-device wake burst, 10,000 registered
//! cargo run --release --example bench -- drain      # backlog drain: device awake time per image
//! cargo run --release --example bench -- crash      # kill -9 trials
//! cargo run --release --example bench -- load --addr 127.0.0.1:1883 --devices 10
//! ```
//!
//! Every stack runs as its own process (so its CPU seconds and peak RSS can be
//! read from /proc): the gateway is the real `barngate serve` binary, the
//! ceiling is the `ceiling` example (raw rumqttd + a local-link consumer),
//! the seed stack is Debian Mosquitto + `bench/baseline/worker.py`.
//! The load generator is in this process: D rumqttc devices, each doing one
//! wake (HELLO → capture_image → METADATA → send_image → all chunks without
//! per-chunk application ACKs → missing_chunks / ACK_OK).
//!
//! The gateway's device listener is MQTT over mutual TLS: before starting
//! `barngate serve` the runner creates the site CA in `<data dir>/certs`
//! (`Pki::init_ca`) and issues one client certificate per device
//! (`Pki::issue_device`, on all cores) into `<data dir>/devices`; every
//! device id is a MAC (`B8F8` + 8 hex digits, distinct per scenario) and each
//! device presents `{MAC}.crt.pem` / `{MAC}.key.pem`. The ceiling and the
//! seed stack are plaintext (they have no TLS front to compare with);
//! `--gateway-plain` runs the gateway's loopback plaintext listener instead,
//! to measure what TLS costs. `load --ca FILE --cert-dir DIR` connects to an
//! external broker with certificates from `DIR`.

use barngate::pki::{CaInitOptions, Pki};
use barngate::store::Store;
use base64::Engine as _;
use clap::{Parser, Subcommand, ValueEnum};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use serde_json::{json, Value};
use sha2::Digest;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

// The load generator shares the two cores with the stack it measures. With
// glibc malloc it spent about 45 % of its CPU allocating and freeing (the
// ~2 KiB chunk strings, rumqttc's and rustls's buffers, freed on another
// worker thread than the one that made them); mimalloc leaves more of the
// machine to the stack under test. The stacks keep their own allocators: the
// gateway's binary is built on mimalloc too (`src/main.rs`), the ceiling (a
// separate example) uses the system one.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The load generator keeps the pages it frees (mimalloc purges them 1 s
/// after they are freed, and they are faulted in again, zeroed, on next use;
/// the set-up before a wake takes longer than that):
/// those page faults were ≈ 18 % of its CPU inside the wake. Only this
/// process: the gateway keeps its own allocator settings.
/// `BENCH_FRESH_PAGES=1` turns this and [`prefault`] off (for A/B runs).
fn keep_freed_pages() {
    if fresh_pages() {
        return;
    }
    #[cfg(feature = "mimalloc")]
    {
        use std::os::raw::{c_int, c_long};
        extern "C" {
            fn mi_option_set(option: c_int, value: c_long);
        }
        // `mi_option_purge_delay` in mimalloc v3's `include/mimalloc.h`
        // (libmimalloc-sys 0.1.49 builds v3); -1: never purge.
        const MI_OPTION_PURGE_DELAY: c_int = 15;
        // SAFETY: mimalloc is this process's allocator (above) and reads
        // its options at any time; setting one has no other effect.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    }
}

fn fresh_pages() -> bool {
    std::env::var_os("BENCH_FRESH_PAGES").is_some()
}

/// Touches (and frees) `bytes` of memory before the devices connect, so
/// that their socket buffers, first written inside the wake, reuse pages
/// already resident (with [`keep_freed_pages`]) instead of faulting in
/// fresh ones in the measured time.
fn prefault(bytes: usize) {
    let mut v: Vec<u8> = Vec::with_capacity(bytes);
    // Non-zero: a zeroed allocation may map fresh pages without touching them.
    v.resize(bytes, 1);
    std::hint::black_box(&v);
}

#[derive(Parser)]
#[command(about = "barngate benchmark and fault-injection runner")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Enc {
    /// Firmware dialect: JSON byte arrays (the real wire format).
    Json,
    /// base64 strings in the firmware topics.
    Base64,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Image size in bytes.
    #[arg(long, default_value_t = 51_200)]
    image_size: usize,
    /// Chunk size in bytes.
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    #[arg(long, value_enum, default_value_t = Enc::Json)]
    encoding: Enc,
    /// Fraction of chunks dropped by devices on the first pass (0.05 = 5 %).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// The gateway binary.
    #[arg(long, default_value = "target/release/barngate")]
    gateway_bin: PathBuf,
    /// Gateway `ingest.quiet_gap_ms` (the seed worker uses the same gap).
    #[arg(long, default_value_t = 2000)]
    quiet_gap_ms: u64,
    /// Gateway `ingest.commit_interval_ms`.
    #[arg(long, default_value_t = 200)]
    commit_interval_ms: u64,
    /// Gateway `ingest.max_streaming` (the gateway's default).
    #[arg(long, default_value_t = 48)]
    max_streaming: u32,
    /// `load` only: CA certificate (PEM) the devices trust. With --cert-dir.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// `load` only: directory with `{MAC}.crt.pem` and `{MAC}.key.pem`.
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Connect to the gateway's loopback plaintext listener
    /// (`mqtt.plain_listen`) instead of the mutual-TLS listener.
    #[arg(long)]
    gateway_plain: bool,
    /// Pin the stack under test to CPU 0 and the load generator to CPU 1
    /// (`taskset`), so that neither takes the other's core.
    #[arg(long)]
    pin: bool,
    /// The devices' MQTT client (see bench/RESULTS.md, "Eighth round").
    #[arg(long, value_enum, default_value_t = Loader::Raw)]
    loader: Loader,
    /// Give up on a wake after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

#[derive(Subcommand)]
enum Cmd {
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

// ---------------------------------------------------------------- load generator

#[derive(Clone)]
struct LoadCfg {
    image_size: usize,
    chunk: usize,
    enc: Enc,
    loss: f64,
    tls: Option<(Vec<u8>, PathBuf)>,
    timeout: Duration,
    /// Pseudo-random seed for losses.
    seed: u64,
    /// Connect and subscribe, then disconnect without waking (memory probes).
    connect_only: bool,
    loader: Loader,
}

impl LoadCfg {
    fn from(c: &Common) -> LoadCfg {
        let tls = match (&c.ca, &c.cert_dir) {
            (Some(ca), Some(dir)) => Some((std::fs::read(ca).expect("read --ca"), dir.clone())),
            _ => None,
        };
        LoadCfg {
            image_size: c.image_size,
            chunk: c.chunk,
            enc: c.enc(),
            loss: c.loss,
            tls,
            timeout: Duration::from_secs(c.timeout_s),
            seed: 7,
            connect_only: false,
            loader: c.loader,
        }
    }
}

impl Common {
    fn enc(&self) -> Enc {
        self.encoding
    }
}

/// A device's image: a shared body (so payload strings are built once per
/// run) with the device index in its first bytes (so every SHA-256 differs).
struct Images {
    base: Vec<u8>,
    /// Encoded payload of every chunk of `base` but the first.
    encoded: Vec<String>,
    chunk: usize,
    enc: Enc,
}

fn image_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    let mut v = Vec::with_capacity(n);
    v.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xE0]);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push((x & 0xFF) as u8);
    }
    v.truncate(n);
    v
}

fn encode(enc: Enc, part: &[u8]) -> String {
    match enc {
        Enc::Json => {
            let mut s = String::with_capacity(part.len() * 4 + 2);
            s.push('[');
            for (i, b) in part.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                s.push_str(itoa(*b));
            }
            s.push(']');
            s
        }
        Enc::Base64 => format!(
            "\"{}\"",
            base64::engine::general_purpose::STANDARD.encode(part)
        ),
    }
}

fn itoa(b: u8) -> &'static str {
    static T: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    &T.get_or_init(|| (0..256).map(|i| i.to_string()).collect())[b as usize]
}

impl Images {
    fn new(size: usize, chunk: usize, enc: Enc) -> Images {
        let base = image_bytes(99, size);
        let encoded = base.chunks(chunk).skip(1).map(|p| encode(enc, p)).collect();
        Images {
            base,
            encoded,
            chunk,
            enc,
        }
    }
    fn total(&self) -> usize {
        self.base.len().div_ceil(self.chunk)
    }
    /// Device `dev`'s image (a drain's k-th pending image: `dev | k << 32`).
    fn image(&self, dev: u64) -> Vec<u8> {
        let mut v = self.base.clone();
        let tag = dev.to_le_bytes();
        let n = tag.len().min(v.len().saturating_sub(4));
        v[4..4 + n].copy_from_slice(&tag[..n]);
        v
    }
    /// Every chunk message of device `idx`'s image, built before the wake:
    /// building them during it had the load generator first-touch ~200 MB
    /// at 1,000 devices, and in this VM fresh pages cost ~10 % of the
    /// machine (kernel page zeroing) that the stack under test then lacked.
    /// The image's SHA-256 is taken here too (it was 7 % of the load
    /// generator's time inside the wake).
    fn prepare(&self, id: &str, idx: u64) -> Prepared {
        let name = image_name(idx);
        let img = self.image(idx);
        let first = encode(self.enc, &img[..self.chunk.min(img.len())]);
        Prepared {
            msgs: (0..self.total())
                .map(|i| self.chunk_msg(id, &name, &first, i))
                .collect(),
            sha256: hex::encode(sha2::Sha256::digest(&img)),
        }
    }
    /// Chunk at position `i` (0-based) as the firmware sends it (id = i + 1).
    fn chunk_msg(&self, id: &str, name: &str, first: &str, i: usize) -> Vec<u8> {
        use std::fmt::Write as _;
        let payload = if i == 0 { first } else { &self.encoded[i - 1] };
        // Sized up front: growing a 2 KiB string step by step was a good
        // part of the load generator's malloc time.
        let mut s = String::with_capacity(payload.len() + id.len() + name.len() + 96);
        let _ = write!(
            s,
            r#"{{"device_id":"{id}","image_name":"{name}","chunk_id":{},"max_chunk_size":{},"payload":{payload}}}"#,
            i + 1,
            self.chunk
        );
        s.into_bytes()
    }
}

/// A device's wake, built before it starts.
struct Prepared {
    msgs: Vec<Vec<u8>>,
    sha256: String,
}

fn image_name(idx: u64) -> String {
    format!("img_{idx:05}.jpg")
}

#[derive(Default)]
struct Counters {
    chunk_msgs: AtomicU64,
    resent: AtomicU64,
    missing_rounds: AtomicU64,
}

#[derive(Debug, Clone)]
struct Wake {
    id: String,
    name: String,
    sha256: String,
    /// HELLO → ACK_OK (a drain: HELLO → the last image's ACK_OK).
    latency: Option<Duration>,
    /// A drain: METADATA → ACK_OK of every image ACKed.
    acks: Vec<Duration>,
    error: Option<String>,
}

// ---------------------------------------------------------------- device connections

/// Which MQTT client the load generator's devices use.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Loader {
    /// A lean client: MQTT 3.1.1 packets encoded in place, over
    /// tokio-rustls over a buffered socket. Every packet is still its own
    /// TLS record, as firmware sends it, but a wake's chunks leave in a few
    /// large socket writes instead of one system call each: the generator
    /// shares the two cores with the stack it measures, so what it spends
    /// is taken from the stack.
    Raw,
    /// rumqttc's `AsyncClient` (the sixth- and seventh-round figures): one
    /// channel hop, one task wake-up and one `write` per publish.
    Rumqttc,
}

enum Conn {
    Mqttc(MqttcConn),
    Raw(RawConn),
}

struct MqttcConn {
    client: AsyncClient,
    rx: mpsc::Receiver<(String, Value)>,
    task: tokio::task::JoinHandle<()>,
}

impl Conn {
    /// Queues (raw) or sends (rumqttc) one QoS 1 publish.
    async fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        match self {
            Conn::Mqttc(c) => c
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
                .await
                .map_err(|e| e.to_string()),
            Conn::Raw(c) => c.publish(topic, payload).await,
        }
    }

    /// The next message the stack sends the device; `None` once the
    /// connection is gone. Sends whatever `publish` queued first.
    async fn recv(&mut self) -> Option<(String, Value)> {
        match self {
            Conn::Mqttc(c) => c.rx.recv().await,
            Conn::Raw(c) => c.recv().await.ok(),
        }
    }

    async fn disconnect(self) {
        match self {
            Conn::Mqttc(c) => {
                let _ = c.client.disconnect().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                c.task.abort();
            }
            Conn::Raw(mut c) => {
                let _ = c.io.write_all(&[0xE0, 0x00]).await;
                let _ = c.io.flush().await;
                let _ = c.io.shutdown().await;
            }
        }
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The lean client (`Loader::Raw`).
struct RawConn {
    /// TLS over a buffered socket (records pile up in the socket buffer
    /// until a flush), or the buffered socket alone.
    io: Box<dyn Io>,
    rbuf: bytes::BytesMut,
    /// One packet, built here and then written whole (one TLS record).
    wbuf: Vec<u8>,
    pkid: u16,
    /// Queued writes not yet flushed.
    dirty: bool,
}

/// The socket buffer: 64 KiB, so a 100-chunk wake (≈ 200 KB of JSON)
/// leaves in four writes.
const RAW_BUF: usize = 64 * 1024;

fn tls_client(ca: &[u8], dir: &Path, id: &str) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots
            .add(c.map_err(|e| format!("CA: {e}"))?)
            .map_err(|e| format!("CA: {e}"))?;
    }
    let cert_path = dir.join(format!("{id}.crt.pem"));
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let key_path = dir.join(format!("{id}.key.pem"));
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| e.to_string())
}

impl RawConn {
    async fn connect(addr: SocketAddr, id: &str, cfg: &LoadCfg) -> Result<RawConn, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let sock = tokio::io::BufStream::with_capacity(RAW_BUF, RAW_BUF, tcp);
        let io: Box<dyn Io> = match &cfg.tls {
            Some((ca, dir)) => {
                let conf = tls_client(ca, dir, id)?;
                let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(Arc::new(conf))
                    .connect(name, sock)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                Box::new(tls)
            }
            None => Box::new(sock),
        };
        let mut c = RawConn {
            io,
            rbuf: bytes::BytesMut::with_capacity(4096),
            wbuf: Vec::with_capacity(4096),
            pkid: 0,
            dirty: false,
        };
        let mut connect = rumqttc::Connect::new(id);
        connect.keep_alive = 60;
        connect.clean_session = true;
        c.send(|b| connect.write(b)).await?;
        match c.packet().await? {
            Packet::ConnAck(a) if a.code == rumqttc::ConnectReturnCode::Success => {}
            p => return Err(format!("{id}: refused: {p:?}")),
        }
        for ch in ["cmd", "ack"] {
            let pkid = c.next_pkid();
            let sub = rumqttc::Subscribe::new(format!("ESP32CAM/{id}/{ch}"), QoS::AtLeastOnce);
            let sub = rumqttc::Subscribe { pkid, ..sub };
            c.send(|b| sub.write(b)).await?;
        }
        let mut subacks = 0;
        while subacks < 2 {
            if let Packet::SubAck(_) = c.packet().await? {
                subacks += 1;
            }
        }
        Ok(c)
    }

    fn next_pkid(&mut self) -> u16 {
        self.pkid = self.pkid.checked_add(1).unwrap_or(1);
        self.pkid
    }

    /// Encodes one packet with rumqttc's codec and writes it (one record).
    async fn send(
        &mut self,
        enc: impl FnOnce(&mut bytes::BytesMut) -> Result<usize, rumqttc::mqttbytes::Error>,
    ) -> Result<(), String> {
        let mut b = bytes::BytesMut::new();
        enc(&mut b).map_err(|e| e.to_string())?;
        self.io.write_all(&b).await.map_err(|e| e.to_string())?;
        self.dirty = true;
        Ok(())
    }

    /// A QoS 1 PUBLISH, encoded in place (fixed header, remaining length,
    /// topic, packet id, payload) and written as one record.
    async fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        let pkid = self.next_pkid();
        let w = &mut self.wbuf;
        w.clear();
        w.push(0x32);
        let mut len = 2 + topic.len() + 2 + payload.len();
        loop {
            let byte = (len % 128) as u8;
            len /= 128;
            w.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        w.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        w.extend_from_slice(topic.as_bytes());
        w.extend_from_slice(&pkid.to_be_bytes());
        w.extend_from_slice(payload);
        self.io
            .write_all(&self.wbuf)
            .await
            .map_err(|e| e.to_string())?;
        self.dirty = true;
        Ok(())
    }

    /// Reads the next packet, flushing queued writes before it waits.
    async fn packet(&mut self) -> Result<Packet, String> {
        loop {
            match rumqttc::mqttbytes::v4::read(&mut self.rbuf, 1 << 20) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
            if self.dirty {
                self.io.flush().await.map_err(|e| e.to_string())?;
                self.dirty = false;
            }
            self.rbuf.reserve(4096);
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
        }
    }

    /// The next PUBLISH to the device (PUBACKing it), skipping PUBACKs.
    async fn recv(&mut self) -> Result<(String, Value), String> {
        loop {
            if let Packet::Publish(p) = self.packet().await? {
                if p.qos == QoS::AtLeastOnce {
                    let ack = rumqttc::PubAck::new(p.pkid);
                    self.send(|b| ack.write(b)).await?;
                }
                let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                return Ok((p.topic, v));
            }
        }
    }
}

async fn connect(addr: SocketAddr, id: &str, cfg: &LoadCfg) -> Result<Conn, String> {
    match cfg.loader {
        Loader::Raw => Ok(Conn::Raw(RawConn::connect(addr, id, cfg).await?)),
        Loader::Rumqttc => connect_rumqttc(addr, id, cfg).await.map(Conn::Mqttc),
    }
}

async fn connect_rumqttc(addr: SocketAddr, id: &str, cfg: &LoadCfg) -> Result<MqttcConn, String> {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_clean_session(true);
    if let Some((ca, dir)) = &cfg.tls {
        let cert = std::fs::read(dir.join(format!("{id}.crt.pem"))).map_err(|e| e.to_string())?;
        let key = std::fs::read(dir.join(format!("{id}.key.pem"))).map_err(|e| e.to_string())?;
        opts.set_transport(Transport::tls(ca.clone(), Some((cert, key)), None));
    }
    let (client, mut el) = AsyncClient::new(opts, 256);
    let (tx, rx) = mpsc::channel(256);
    let (sub_tx, mut sub_rx) = mpsc::channel(4);
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if tx.send((p.topic.clone(), v)).await.is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = sub_tx.send(()).await;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    for ch in ["cmd", "ack"] {
        client
            .subscribe(format!("ESP32CAM/{id}/{ch}"), QoS::AtLeastOnce)
            .await
            .map_err(|e| e.to_string())?;
    }
    for _ in 0..2 {
        match tokio::time::timeout(Duration::from_secs(30), sub_rx.recv()).await {
            Ok(Some(())) => {}
            _ => return Err(format!("{id}: no SUBACK")),
        }
    }
    Ok(MqttcConn { client, rx, task })
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One wake of device `idx`: returns when ACK_OK arrives (or on failure).
#[allow(clippy::too_many_arguments)]
async fn wake(
    conn: &mut Conn,
    id: &str,
    idx: u64,
    pending: u32,
    images: &Images,
    cfg: &LoadCfg,
    counters: &Counters,
    prepared: Prepared,
) -> Wake {
    let name = image_name(idx);
    let img = images.image(idx);
    let Prepared {
        msgs: mut prebuilt,
        sha256: sha,
    } = prepared;
    let first = encode(images.enc, &img[..images.chunk.min(img.len())]);
    let mut w = Wake {
        id: id.to_string(),
        name: name.clone(),
        sha256: sha,
        latency: None,
        acks: Vec::new(),
        error: None,
    };
    let total = images.total();
    let mut rng = Rng(cfg.seed ^ (idx.wrapping_mul(0x9E3779B97F4A7C15)) | 1);
    let pubd = |ch: &str| format!("ESP32CAM/{id}/{ch}");
    let hello = json!({"device_id": id, "status": "alive", "pendingImg": pending}).to_string();
    let meta = json!({
        "device_id": id, "capture_timestamp": "2025-06-01T08:00:00Z", "image_name": name,
        "image_size": img.len(), "max_chunk_size": images.chunk, "total_chunks_count": total,
        "location": "bench", "error": 0, "temperature": 21.5, "humidity": 50.0,
        "pressure": 1013.0, "gas_resistance": 100.0
    })
    .to_string();
    let data = pubd("data");
    let t0 = Instant::now();
    if let Err(e) = conn.publish(&pubd("status"), hello.as_bytes()).await {
        w.error = Some(format!("publish HELLO: {e}"));
        return w;
    }
    let deadline = t0 + cfg.timeout;
    let mut first_pass = true;
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), conn.recv()).await;
        let (topic, v) = match msg {
            Ok(Some(m)) => m,
            Ok(None) => {
                w.error = Some("connection lost".into());
                return w;
            }
            Err(_) => {
                w.error = Some("timeout".into());
                return w;
            }
        };
        let r = if v.get("capture_image").is_some()
            || (topic.ends_with("/ack") && v["image_name"] == "" && v.get("ACK_OK").is_some())
        {
            conn.publish(&data, meta.as_bytes()).await
        } else if v.get("send_image").is_some() {
            let mut r = Ok(());
            for i in 0..total {
                if first_pass && cfg.loss > 0.0 && rng.next() < cfg.loss {
                    continue;
                }
                counters.chunk_msgs.fetch_add(1, Ordering::Relaxed);
                let msg = match prebuilt.get_mut(i).map(std::mem::take) {
                    Some(m) if !m.is_empty() => m,
                    _ => images.chunk_msg(id, &name, &first, i),
                };
                r = conn.publish(&data, &msg).await;
                if r.is_err() {
                    break;
                }
            }
            first_pass = false;
            prebuilt = Vec::new();
            r
        } else if let Some(ids) = v.get("missing_chunks").and_then(|m| m.as_array()) {
            counters.missing_rounds.fetch_add(1, Ordering::Relaxed);
            first_pass = false;
            let mut r = Ok(());
            for cid in ids.iter().filter_map(|x| x.as_u64()) {
                let i = (cid as usize).wrapping_sub(1);
                if i >= total {
                    continue;
                }
                counters.chunk_msgs.fetch_add(1, Ordering::Relaxed);
                counters.resent.fetch_add(1, Ordering::Relaxed);
                r = conn
                    .publish(&data, &images.chunk_msg(id, &name, &first, i))
                    .await;
                if r.is_err() {
                    break;
                }
            }
            r
        } else if v.get("ACK_OK").is_some() && v["image_name"] == name.as_str() {
            w.latency = Some(t0.elapsed());
            return w;
        } else if v.get("next_wake").is_some() {
            w.error = Some("told next_wake instead of capture".into());
            return w;
        } else {
            Ok(())
        };
        if let Err(e) = r {
            w.error = Some(format!("publish: {e}"));
            return w;
        }
    }
}

/// The name of device `idx`'s `k`-th pending image (0 = the oldest).
fn pending_name(idx: u64, k: u32) -> String {
    format!("img_{idx:05}_{k:03}.jpg")
}

/// One wake of device `idx` that drains `pending` images from its SD card,
/// as the firmware does: HELLO with `pendingImg`; on ACK_OK (the first, with
/// an empty image name, is the cue) the next pending image's METADATA; on
/// `send_image` every chunk (each dropped with probability `cfg.loss`, on
/// the image's first pass only); on `missing_chunks` exactly those ids; on
/// the image's ACK_OK its METADATA → ACK_OK time is noted and the next image
/// follows. Other messages (a `capture_image` once the backlog is drained,
/// a `next_wake`) are not part of the drain and are ignored. Returns when
/// the last image is ACKed (or on failure, or when one image takes longer
/// than `cfg.timeout`).
async fn drain(
    conn: &mut Conn,
    id: &str,
    idx: u64,
    pending: u32,
    images: &Images,
    cfg: &LoadCfg,
    counters: &Counters,
) -> Wake {
    let mut w = Wake {
        id: id.to_string(),
        name: pending_name(idx, 0),
        sha256: String::new(),
        latency: None,
        acks: Vec::with_capacity(pending as usize),
        error: None,
    };
    let total = images.total();
    let mut rng = Rng(cfg.seed ^ (idx.wrapping_mul(0x9E3779B97F4A7C15)) | 1);
    let pubd = |ch: &str| format!("ESP32CAM/{id}/{ch}");
    let data = pubd("data");
    let hello = json!({"device_id": id, "status": "alive", "pendingImg": pending}).to_string();
    // The backlog: one image per past wake, 12 h apart, the oldest first.
    let oldest = chrono::Utc::now() - chrono::Duration::hours(12 * (pending as i64 + 1));
    // The image being sent: k, name, first chunk's payload, METADATA sent at.
    let mut k: u32 = 0;
    let mut name = String::new();
    let mut first = String::new();
    let mut sent_at: Option<Instant> = None;
    let mut first_pass = true;
    let t0 = Instant::now();
    if let Err(e) = conn.publish(&pubd("status"), hello.as_bytes()).await {
        w.error = Some(format!("publish HELLO: {e}"));
        return w;
    }
    let mut deadline = t0 + cfg.timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), conn.recv()).await;
        let (topic, v) = match msg {
            Ok(Some(m)) => m,
            Ok(None) => {
                w.error = Some(format!("connection lost at image {k}"));
                return w;
            }
            Err(_) => {
                w.error = Some(format!("timeout at image {k}"));
                return w;
            }
        };
        let is_ack = topic.ends_with("/ack") && v.get("ACK_OK").is_some();
        let cue = is_ack && sent_at.is_none() && v["image_name"] == "";
        let acked = is_ack && sent_at.is_some() && v["image_name"] == name.as_str();
        if acked {
            w.acks.push(sent_at.take().unwrap_or(t0).elapsed());
            k += 1;
            if k == pending {
                w.latency = Some(t0.elapsed());
                return w;
            }
        }
        let r = if cue || acked {
            name = pending_name(idx, k);
            let img = images.image(idx | (k as u64) << 32);
            first = encode(images.enc, &img[..images.chunk.min(img.len())]);
            let ts = oldest + chrono::Duration::hours(12 * k as i64);
            let meta = json!({
                "device_id": id,
                "capture_timestamp": ts.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                "image_name": name, "image_size": img.len(), "max_chunk_size": images.chunk,
                "total_chunks_count": total, "location": "bench", "error": 0,
                "temperature": 21.5, "humidity": 50.0, "pressure": 1013.0, "gas_resistance": 100.0
            })
            .to_string();
            first_pass = true;
            deadline = Instant::now() + cfg.timeout;
            sent_at = Some(Instant::now());
            conn.publish(&data, meta.as_bytes()).await
        } else if sent_at.is_some() && v.get("send_image").is_some() && first_pass {
            let mut r = Ok(());
            for i in 0..total {
                if cfg.loss > 0.0 && rng.next() < cfg.loss {
                    continue;
                }
                counters.chunk_msgs.fetch_add(1, Ordering::Relaxed);
                r = conn
                    .publish(&data, &images.chunk_msg(id, &name, &first, i))
                    .await;
                if r.is_err() {
                    break;
                }
            }
            first_pass = false;
            r
        } else if let Some(ids) = v.get("missing_chunks").and_then(|m| m.as_array()) {
            counters.missing_rounds.fetch_add(1, Ordering::Relaxed);
            first_pass = false;
            let mut r = Ok(());
            for cid in ids.iter().filter_map(|x| x.as_u64()) {
                let i = (cid as usize).wrapping_sub(1);
                if i >= total {
                    continue;
                }
                counters.chunk_msgs.fetch_add(1, Ordering::Relaxed);
                counters.resent.fetch_add(1, Ordering::Relaxed);
                r = conn
                    .publish(&data, &images.chunk_msg(id, &name, &first, i))
                    .await;
                if r.is_err() {
                    break;
                }
            }
            r
        } else {
            Ok(())
        };
        if let Err(e) = r {
            w.error = Some(format!("publish: {e}"));
            return w;
        }
    }
}

struct LoadResult {
    devices: usize,
    elapsed: f64,
    chunk_msgs: u64,
    resent: u64,
    wakes: Vec<Wake>,
    /// The watched process's memory once every device was connected and
    /// subscribed, before the wake (after a 2 s settle).
    connected: Option<Mem>,
    /// The stack's CPU seconds and page faults during the wake.
    stack_wake: Option<(f64, u64)>,
}

/// Resident memory of a process, MiB.
#[derive(Clone, Copy, Debug)]
struct Mem {
    rss: f64,
    peak: f64,
    /// Of `rss`: pages of the binary and other mapped files.
    file: f64,
}

fn mem_of(pid: u32) -> Mem {
    let field = |name: &str| -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|k| k.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    Mem {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
        file: field("RssFile:"),
    }
}

impl LoadResult {
    fn images(&self) -> usize {
        self.wakes.iter().filter(|w| w.latency.is_some()).count()
    }
    fn pct(&self, p: f64) -> f64 {
        let mut l: Vec<f64> = self
            .wakes
            .iter()
            .filter_map(|w| w.latency.map(|d| d.as_secs_f64() * 1000.0))
            .collect();
        if l.is_empty() {
            return f64::NAN;
        }
        l.sort_by(|a, b| a.total_cmp(b));
        l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1]
    }
}

/// First MAC index of each scenario, so their devices never collide.
const RUN_BASE: u32 = 0x0000_0000;
const BURST_BASE: u32 = 0x1000_0000;
const CRASH_BASE: u32 = 0x2000_0000;
const LOAD_BASE: u32 = 0x3000_0000;

/// Device `idx` of a scenario: a MAC, 12 upper-case hex digits.
fn mac(base: u32, idx: usize) -> String {
    format!("B8F8{:08X}", base.wrapping_add(idx as u32))
}

/// Connects, retrying: a thousand devices at once meet the gateway's
/// handshake limit (`mqtt.max_handshakes`) just as real ones would.
async fn connect_retry(addr: SocketAddr, id: &str, cfg: &LoadCfg) -> Result<Conn, String> {
    let mut last = String::new();
    for attempt in 0..30u64 {
        match connect(addr, id, cfg).await {
            Ok(c) => return Ok(c),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(50 + 50 * attempt.min(10))).await;
    }
    Err(format!("{id}: cannot connect: {last}"))
}

/// Creates the site CA in `<data_dir>/certs` (as `barngate ca init` would)
/// and issues a client certificate for every id into `<data_dir>/devices`,
/// on all cores. Returns the CA PEM and the certificate directory.
fn provision_tls(data_dir: &Path, ids: &[String]) -> (Vec<u8>, PathBuf) {
    let t0 = Instant::now();
    let pki = Pki::new(data_dir.join("certs"));
    if !pki.exists() {
        pki.init_ca(&CaInitOptions::default()).expect("init CA");
    }
    let out = data_dir.join("devices");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for part in ids.chunks(ids.len().div_ceil(threads).max(1)) {
            let (pki, out) = (&pki, &out);
            s.spawn(move || {
                for id in part {
                    if !out.join(format!("{id}.crt.pem")).exists() {
                        pki.issue_device(id, 30, out).expect("issue device cert");
                    }
                }
            });
        }
    });
    eprintln!(
        "mTLS: CA in {}, {} device certificates in {:.1} s",
        pki.dir().display(),
        ids.len(),
        t0.elapsed().as_secs_f64()
    );
    let ca = std::fs::read(pki.ca_cert_path()).expect("read CA cert");
    (ca, out)
}

/// Connects `n` devices, then wakes them all at once (a wake burst); with
/// `pending` > 0 every device drains that many pending images instead.
async fn run_load(
    addr: SocketAddr,
    base: u32,
    n: usize,
    pending: u32,
    cfg: &LoadCfg,
    watch: Option<u32>,
    stack_pid: Option<u32>,
) -> LoadResult {
    let images = Arc::new(Images::new(cfg.image_size, cfg.chunk, cfg.enc));
    if matches!(cfg.loader, Loader::Raw) && !fresh_pages() {
        prefault(n * 2 * RAW_BUF);
    }
    let counters = Arc::new(Counters::default());
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let go = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::new();
    for d in 0..n {
        let (images, counters, barrier, go, cfg) = (
            images.clone(),
            counters.clone(),
            barrier.clone(),
            go.clone(),
            cfg.clone(),
        );
        let id = mac(base, d);
        tasks.push(tokio::spawn(async move {
            // Stagger connection setup a little: a thousand SYNs at once
            // overflow the listen backlog.
            tokio::time::sleep(Duration::from_millis((d / 50) as u64 * 20)).await;
            let conn = connect_retry(addr, &id, &cfg).await;
            // (Not for `connect_only`, which never wakes, nor for a drain,
            // which builds each image's chunks when it sends them.)
            let prepared =
                (!cfg.connect_only && pending == 0).then(|| images.prepare(&id, d as u64));
            barrier.wait().await;
            go.wait().await;
            if cfg.connect_only {
                if let Ok(conn) = conn {
                    conn.disconnect().await;
                }
                return Wake {
                    id,
                    name: String::new(),
                    sha256: String::new(),
                    latency: None,
                    acks: Vec::new(),
                    error: None,
                };
            }
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    return Wake {
                        id,
                        name: String::new(),
                        sha256: String::new(),
                        latency: None,
                        acks: Vec::new(),
                        error: Some(e),
                    }
                }
            };
            let w = if pending > 0 {
                drain(&mut conn, &id, d as u64, pending, &images, &cfg, &counters).await
            } else {
                wake(
                    &mut conn,
                    &id,
                    d as u64,
                    pending,
                    &images,
                    &cfg,
                    &counters,
                    prepared.unwrap_or_else(|| images.prepare(&id, d as u64)),
                )
                .await
            };
            conn.disconnect().await;
            w
        }));
    }
    barrier.wait().await;
    let connected = match watch {
        Some(pid) => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Some(mem_of(pid))
        }
        None => None,
    };
    settle().await;
    // For profilers: a pause between connect and wake to attach to the
    // stack's process (`perf record -p PID` on the "waking" line).
    if let Some(ms) = std::env::var("BENCH_WAKE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        eprintln!("all {n} connected; waking in {ms} ms");
        tokio::time::sleep(Duration::from_millis(ms)).await;
        eprintln!("waking");
    }
    let me = std::process::id();
    let (own0, stack0) = (cpu_secs(me), stack_pid.map(cpu_secs));
    let faults0 = (minor_faults(me), stack_pid.map(minor_faults));
    go.wait().await;
    let t0 = Instant::now();
    let mut wakes = Vec::new();
    let mut last_ack = Duration::ZERO;
    for t in tasks {
        if let Ok(w) = t.await {
            if let Some(l) = w.latency {
                last_ack = last_ack.max(l);
            }
            wakes.push(w);
        }
    }
    let elapsed = if last_ack > Duration::ZERO {
        last_ack.as_secs_f64()
    } else {
        t0.elapsed().as_secs_f64()
    };
    let stack_wake = match (stack_pid, stack0, faults0.1) {
        (Some(pid), Some(c0), Some(f0)) => {
            Some((cpu_secs(pid) - c0, minor_faults(pid).saturating_sub(f0)))
        }
        _ => None,
    };
    eprintln!(
        "wake: {:.2} s; load generator {:.2} CPU s ({} page faults){}",
        t0.elapsed().as_secs_f64(),
        cpu_secs(me) - own0,
        minor_faults(me).saturating_sub(faults0.0),
        match stack_wake {
            Some((cpu, faults)) => format!(", stack {cpu:.2} CPU s ({faults} page faults)"),
            None => String::new(),
        }
    );
    LoadResult {
        devices: n,
        elapsed,
        chunk_msgs: counters.chunk_msgs.load(Ordering::Relaxed),
        resent: counters.resent.load(Ordering::Relaxed),
        wakes,
        connected,
        stack_wake,
    }
}

// ---------------------------------------------------------------- processes

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The fields of /proc/PID/stat after the command name (index 0 is field 3,
/// the state); empty if the process is gone.
fn stat_fields(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, after)| after.split_whitespace().map(String::from).collect())
        })
        .unwrap_or_default()
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let f = stat_fields(pid);
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // fields 14 and 15 of stat.
    (t(11) + t(12)) / clk_tck()
}

/// Minor page faults of a process so far (field 10 of stat).
fn minor_faults(pid: u32) -> u64 {
    stat_fields(pid)
        .get(7)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

/// VmHWM (peak RSS) in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

struct Proc {
    child: Child,
}
impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    fn term(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }
}
impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Waits for a line on the child's stdout that starts with `prefix`.
fn wait_line(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.take().expect("stdout piped");
    let mut r = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("process exited before printing {prefix:?}");
        }
        if line.starts_with(prefix) {
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || {
                let mut s = String::new();
                while r.read_line(&mut s).unwrap_or(0) > 0 {
                    s.clear();
                }
            });
            return line.trim().to_string();
        }
    }
}

fn gateway_config(c: &Common) -> String {
    let mut s = format!(
        "[site]\ntimezone = \"UTC\"\n[ingest]\nquiet_gap_ms = {}\ncommit_interval_ms = {}\nmax_streaming = {}\n",
        c.quiet_gap_ms, c.commit_interval_ms, c.max_streaming
    );
    // Every simulated device connects from this one address: its share of
    // the handshakes is the whole budget, as for devices spread over many.
    s += "[mqtt]\nmax_handshakes_per_ip = 64\n";
    if c.gateway_plain {
        s += &format!("plain_listen = \"127.0.0.1:{}\"\n", free_port());
    }
    s
}

/// The device-side TLS settings for the gateway in `dir` (CA and device
/// certificates created there first), or `None` with `--gateway-plain`.
fn gateway_tls(c: &Common, dir: &Path, ids: &[String]) -> Option<(Vec<u8>, PathBuf)> {
    (!c.gateway_plain).then(|| provision_tls(dir, ids))
}

/// Starts `barngate serve` on `dir`; returns the address devices connect to
/// (the mutual-TLS listener, or the plaintext one with `--gateway-plain`).
fn start_gateway(c: &Common, dir: &Path) -> (Proc, SocketAddr) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("bench.toml");
    if !cfg.exists() {
        std::fs::write(&cfg, gateway_config(c)).unwrap();
    }
    let plain: Option<SocketAddr> = std::fs::read_to_string(&cfg)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("plain_listen = "))
        .map(|a| a.trim_matches('"').parse().unwrap());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("gateway.log"))
        .unwrap();
    let mut child = stack_command(&c.gateway_bin)
        .arg("--data-dir")
        .arg(dir)
        .arg("--config")
        .arg(&cfg)
        .args([
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); run `cargo build --release` first",
                c.gateway_bin.display()
            )
        });
    let line = wait_line(&mut child, "barngate ready");
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mqtt="))
        .and_then(|a| a.parse().ok())
        .expect("mqtt address in the ready line");
    (Proc { child }, plain.unwrap_or(addr))
}

/// With `--pin`: stacks run on CPU 0 (`taskset` execs, so the pid stays the
/// process measured); the load generator was moved to CPU 1 in `main`.
static PIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn stack_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if PIN.load(Ordering::Relaxed) {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Starts the `ceiling` example; it asks for the missing ids of a round
/// whose last chunk never came after `c.quiet_gap_ms`, as the gateway does.
/// With `nodelay`, it sets TCP_NODELAY on the connections rumqttd accepted
/// (as the gateway's front does on its own).
fn start_ceiling(c: &Common, nodelay: bool) -> (Proc, SocketAddr) {
    // A sibling example, so it keeps the system allocator the gateway has.
    let exe = std::env::current_exe().unwrap().with_file_name("ceiling");
    let mut child = stack_command(&exe)
        .args(["--quiet-gap-ms", &c.quiet_gap_ms.to_string()])
        .args(nodelay.then_some("--nodelay"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); run `cargo build --release --example ceiling` first",
                exe.display()
            )
        });
    let line = wait_line(&mut child, "ceiling ready");
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mqtt="))
        .and_then(|a| a.parse().ok())
        .unwrap();
    (Proc { child }, addr)
}

fn free_port() -> u16 {
    barngate::broker::free_loopback_port()
        .expect("a free loopback port")
        .port()
}

fn start_seed(c: &Common, dir: &Path) -> (Proc, Proc, SocketAddr) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 100\nmax_queued_messages 100000\n"),
    )
    .unwrap();
    let mosq = stack_command("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto (apt-get install mosquitto)");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let worker = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/baseline/worker.py");
    let mut w = stack_command("python3")
        .arg(worker)
        .args(["--port", &port.to_string(), "--out"])
        .arg(dir.join("images"))
        .args(["--quiet-gap-ms", &c.quiet_gap_ms.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with paho-mqtt (pip install paho-mqtt)");
    wait_line(&mut w, "worker ready");
    (Proc { child: mosq }, Proc { child: w }, addr)
}

// ---------------------------------------------------------------- scenarios

#[derive(serde::Serialize, Clone)]
struct Row {
    stack: String,
    devices: usize,
    image_size: usize,
    chunk: usize,
    encoding: String,
    loss: f64,
    chunk_msgs: u64,
    resent: u64,
    elapsed_s: f64,
    chunk_msgs_per_s: f64,
    images: usize,
    failed: usize,
    images_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_s: f64,
    peak_rss_mib: f64,
}

fn row(stack: &str, c: &Common, r: &LoadResult, cpu_s: f64, rss: f64) -> Row {
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

fn print_table(rows: &[Row]) {
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

fn report_errors(r: &LoadResult) {
    for w in r.wakes.iter().filter(|w| w.error.is_some()).take(3) {
        eprintln!("  {}: {}", w.id, w.error.as_deref().unwrap_or(""));
    }
}

/// Busy and total jiffies of all CPUs (`/proc/stat`).
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// Before a wake: the previous run's dirty pages written back (`sync`) and
/// the CPUs quiet (under 10 % busy over 200 ms; at most 5 s), so that no
/// stack pays for the one measured before it (a seed run leaves ~100 MB of
/// files to write back, a gateway run its database).
async fn settle() {
    let _ = tokio::task::spawn_blocking(|| Command::new("sync").status()).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let Some((b0, t0)) = cpu_jiffies() else {
            return;
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some((b1, t1)) = cpu_jiffies() else {
            return;
        };
        if (b1 - b0) * 10 < (t1 - t0).max(1) {
            return;
        }
    }
}

/// The seed stack's files go to memory (`/dev/shm`) where there is one: on
/// this VM's disk (ext4, online discard) the ~1,000 files a seed run writes
/// and deletes left the disk slower for the next run that writes, which in
/// the sweep's order was always the gateway (its first wake after a seed run
/// took 20–30 % more CPU; on tmpfs, none). The seed loses nothing by it: it
/// does not fsync, and its files are faster to write in memory.
fn seed_dir(n: usize) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let d = shm.join(format!("barngate-bench-{}-seed{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        if std::fs::create_dir_all(&d).is_ok() {
            return d;
        }
    }
    tmpdir(&format!("seed{n}"))
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("barngate-bench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn scenario_run(
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
async fn gateway_once(c: &Common, cfg: &LoadCfg, n: usize) -> (Row, Option<(f64, u64)>) {
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

/// `bench ab`: the baseline and the candidate take turns.
async fn scenario_ab(c: Common, baseline: PathBuf, n: usize, rounds: usize) {
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

/// One drain run of one stack.
#[derive(Clone)]
struct DrainRow {
    stack: String,
    images: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    chunk_msgs: u64,
    resent: u64,
    elapsed_s: f64,
    chunk_msgs_per_s: f64,
    /// The stack's CPU seconds from the first HELLO to the last ACK_OK.
    cpu_s: f64,
    peak_rss_mib: f64,
}

fn drain_row(stack: &str, r: &LoadResult, rss: f64) -> DrainRow {
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

fn print_drain(rows: &[DrainRow]) {
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
async fn scenario_drain(
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

fn verify_images(dir: &Path, expect: &[Wake]) -> (usize, Vec<String>) {
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

async fn scenario_burst(c: Common, devices: usize, registered: usize, connect_only: bool) {
    let dir = tmpdir("burst");
    {
        let store = Store::open(&dir.join("barngate.redb")).unwrap();
        let now = chrono::Utc::now();
        for i in 0..registered {
            let id = mac(BURST_BASE, i);
            let rec = barngate::registry::new_record(
                &id,
                barngate::protocol::Dialect::Firmware,
                "site-1",
                i as u64,
                (i % 3600) as u32,
                now,
            );
            store.put_device(&rec, now).unwrap();
        }
    }
    let ids: Vec<String> = (0..devices).map(|d| mac(BURST_BASE, d)).collect();
    let cfg = LoadCfg {
        tls: gateway_tls(&c, &dir, &ids),
        connect_only,
        ..LoadCfg::from(&c)
    };
    let (mut p, addr) = start_gateway(&c, &dir);
    let idle_rss = peak_rss_mib(p.pid());
    let cpu0 = cpu_secs(p.pid());
    let r = run_load(
        addr,
        BURST_BASE,
        devices,
        0,
        &cfg,
        Some(p.pid()),
        Some(p.pid()),
    )
    .await;
    let cpu = cpu_secs(p.pid()) - cpu0;
    let rss = peak_rss_mib(p.pid());
    // What stays resident once the wake is over and the devices are gone.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = mem_of(p.pid());
    p.term();
    let conn = r.connected.unwrap_or(Mem {
        rss: 0.0,
        peak: 0.0,
        file: 0.0,
    });
    if connect_only {
        // No wake: nothing to verify.
        println!(
            "burst --connect-only: gateway RSS {idle_rss:.1} MiB after start ({registered} registered), {:.1} MiB with {devices} connected and idle (of which {:.1} MiB file-backed; peak so far {:.1}), {:.1} MiB 7 s after they left",
            conn.rss, conn.file, conn.peak, after.rss
        );
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let rw = row("gateway", &c, &r, cpu, rss);
    print_table(std::slice::from_ref(&rw));
    let errors: Vec<_> = r.wakes.iter().filter_map(|w| w.error.clone()).collect();
    let (ok, bad) = verify_images(&dir, &r.wakes);
    println!(
        "burst: {devices} devices ({registered} registered), loss {:.0} %: {} ACK_OK, {} errors {:?}, {ok} images byte-exact in the store, {} bad {:?}",
        c.loss * 100.0,
        r.images(),
        errors.len(),
        errors.iter().take(5).collect::<Vec<_>>(),
        bad.len(),
        bad.iter().take(5).collect::<Vec<_>>()
    );
    println!(
        "burst: resent {} chunks; gateway RSS {idle_rss:.1} MiB after start ({registered} registered), {:.1} MiB with {devices} connected and idle (of which {:.1} MiB file-backed; peak so far {:.1}), peak {rss:.1} MiB during the burst, {:.1} MiB 7 s after it, CPU {cpu:.1} s",
        r.resent, conn.rss, conn.file, conn.peak, after.rss
    );
    if !errors.is_empty() || !bad.is_empty() || ok != devices {
        eprintln!(
            "burst FAILED: {ok} of {devices} images byte-exact; data dir kept: {}",
            dir.display()
        );
        std::process::exit(1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

async fn scenario_crash(c: Common, devices: usize, trials: usize, seed: u64) {
    let dir = tmpdir("crash");
    let ids: Vec<String> = (0..devices).map(|d| mac(CRASH_BASE, d)).collect();
    let cfg = LoadCfg {
        tls: gateway_tls(&c, &dir, &ids),
        ..LoadCfg::from(&c)
    };
    let images = Arc::new(Images::new(c.image_size, c.chunk, c.enc()));
    let counters = Arc::new(Counters::default());
    let mut rng = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    // Every device delivers a new image each trial; one whose wake was cut
    // by the kill retries the same image (pendingImg=1) in the next trial.
    let mut current: Vec<u64> = (0..devices as u64).collect();
    let mut next_image = devices as u64;
    let mut acked: Vec<Wake> = Vec::new();
    let mut outstanding: Vec<Option<u64>> = vec![None; devices];
    let mut failures = Vec::new();
    let (mut cut_trials, mut mid_trials) = (0, 0);
    for trial in 0..=trials {
        let (mut p, addr) = start_gateway(&c, &dir);
        let last = trial == trials;
        let mut tasks = Vec::new();
        for d in 0..devices {
            if last && outstanding[d].is_none() {
                continue;
            }
            let (images, counters, cfg) = (images.clone(), counters.clone(), cfg.clone());
            let img = current[d];
            tasks.push(tokio::spawn(async move {
                let id = mac(CRASH_BASE, d);
                let mut conn = match connect(addr, &id, &cfg).await {
                    Ok(c) => c,
                    Err(_) => return (d, img, None),
                };
                let prepared = images.prepare(&id, img);
                let w = wake(&mut conn, &id, img, 1, &images, &cfg, &counters, prepared).await;
                if let Conn::Mqttc(c) = conn {
                    c.task.abort();
                }
                (d, img, Some(w))
            }));
        }
        if !last {
            // Within the wake: 50 devices connect and deliver in ~60–150 ms
            // here (the lean client; ~100–200 ms with rumqttc), so a later
            // kill would mostly land after the last ACK_OK.
            let span = if cfg.loader == Loader::Raw {
                130.0
            } else {
                250.0
            };
            let delay = Duration::from_millis(5 + (rng.next() * span) as u64);
            tokio::time::sleep(delay).await;
            p.kill9();
        }
        let mut cut = 0;
        for t in tasks {
            if let Ok((d, img, w)) = t.await {
                match w {
                    Some(w) if w.latency.is_some() => {
                        acked.push(w);
                        outstanding[d] = None;
                        current[d] = next_image;
                        next_image += 1;
                    }
                    _ => {
                        cut += 1;
                        outstanding[d] = Some(img);
                    }
                }
            }
        }
        if last {
            p.term();
        } else if cut > 0 {
            cut_trials += 1;
            if cut < devices {
                mid_trials += 1;
            }
        }
        // After the kill (or the final clean stop): every ACKed image intact.
        let (ok, bad) = verify_images(&dir, &acked);
        println!(
            "trial {trial:>2}{}: {} images ACKed so far, {ok} intact, {} bad; {cut} wakes cut by the kill",
            if last { " (no kill)" } else { "" },
            acked.len(),
            bad.len()
        );
        failures.extend(bad);
    }
    let left = outstanding.iter().filter(|o| o.is_some()).count();
    println!(
        "crash: {trials} kill -9 trials, {devices} devices: {cut_trials} kills cut wakes ({mid_trials} after some devices of that trial had their ACK_OK); {} images ACKed and intact, {left} never completed, {} integrity failures {:?}",
        acked.len(),
        failures.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    if left > 0 || !failures.is_empty() {
        std::process::exit(1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- ciphers

/// `bench ciphers`: seal (client) and open (server) `records` records of
/// `size` bytes per TLS 1.3 suite, over an in-memory rustls connection pair.
fn ciphers(size: usize, records: usize, rounds: usize) {
    use rustls::CipherSuite as C;
    use std::io::Read;
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let cert_der = cert.der().clone();
    let key_der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    let suites = [
        C::TLS13_AES_128_GCM_SHA256,
        C::TLS13_AES_256_GCM_SHA384,
        C::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    let only = |suite: C| {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites.retain(|s| s.suite() == suite);
        Arc::new(p)
    };
    let aes = barngate::pki::aes_in_hardware();
    let preferred = barngate::pki::tls_provider(aes).cipher_suites[0].suite();
    println!(
        "AES-GCM in hardware: {aes}; the gateway prefers {preferred:?}; {records} records of {size} B per suite, best of {rounds}"
    );
    let payload = vec![0x5au8; size];
    let mut best = vec![(f64::MAX, f64::MAX); suites.len()];
    for _ in 0..rounds {
        for (i, suite) in suites.iter().enumerate() {
            let server_cfg = Arc::new(
                rustls::ServerConfig::builder_with_provider(only(*suite))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("versions")
                    .with_no_client_auth()
                    .with_single_cert(vec![cert_der.clone()], key_der.clone_key())
                    .expect("server config"),
            );
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert_der.clone()).expect("root");
            let client_cfg = Arc::new(
                rustls::ClientConfig::builder_with_provider(only(*suite))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            );
            let mut c = rustls::Connection::from(
                rustls::ClientConnection::new(
                    client_cfg,
                    rustls_pki_types::ServerName::try_from("localhost").expect("name"),
                )
                .expect("client"),
            );
            let mut s = rustls::Connection::from(
                rustls::ServerConnection::new(server_cfg).expect("server"),
            );
            // Everything `from` has to send, read and processed by `to`.
            fn pump(
                from: &mut rustls::Connection,
                to: &mut rustls::Connection,
                wire: &mut Vec<u8>,
            ) {
                wire.clear();
                while from.wants_write() {
                    from.write_tls(wire).expect("write_tls");
                }
                let mut rd = &wire[..];
                while !rd.is_empty() {
                    to.read_tls(&mut rd).expect("read_tls");
                    to.process_new_packets().expect("TLS");
                }
            }
            let mut wire = Vec::new();
            while c.is_handshaking() || s.is_handshaking() {
                pump(&mut c, &mut s, &mut wire);
                pump(&mut s, &mut c, &mut wire);
            }
            let (mut seal, mut open) = (Duration::ZERO, Duration::ZERO);
            let mut out = vec![0u8; size + 64];
            for _ in 0..records {
                wire.clear();
                let t = Instant::now();
                c.writer().write_all(&payload).expect("seal");
                while c.wants_write() {
                    c.write_tls(&mut wire).expect("seal");
                }
                let t1 = Instant::now();
                let mut rd = &wire[..];
                while !rd.is_empty() {
                    s.read_tls(&mut rd).expect("open");
                    s.process_new_packets().expect("open");
                }
                let mut got = 0;
                while got < size {
                    got += s.reader().read(&mut out).expect("plaintext");
                }
                open += t1.elapsed();
                seal += t1 - t;
            }
            let per = |d: Duration| d.as_nanos() as f64 / records as f64;
            best[i].0 = best[i].0.min(per(seal));
            best[i].1 = best[i].1.min(per(open));
        }
    }
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>9}",
        "suite", "seal ns", "open ns", "both ns", "MB/s"
    );
    for (suite, (seal, open)) in suites.iter().zip(&best) {
        let both = seal + open;
        println!(
            "{:<34} {:>10.0} {:>10.0} {:>10.0} {:>9.0}",
            format!("{suite:?}"),
            seal,
            open,
            both,
            size as f64 / both * 1e3
        );
    }
}

fn main() {
    keep_freed_pages();
    let cli = Cli::parse();
    let pin = match &cli.cmd {
        Cmd::Run { c, .. }
        | Cmd::Ab { c, .. }
        | Cmd::Burst { c, .. }
        | Cmd::Crash { c, .. }
        | Cmd::Drain { c, .. }
        | Cmd::Load { c, .. } => c.pin,
        Cmd::Ciphers {
            size,
            records,
            rounds,
        } => {
            ciphers(*size, *records, *rounds);
            return;
        }
    };
    if pin {
        PIN.store(true, Ordering::Relaxed);
        // The load generator (this process, before its runtime starts, so
        // every thread inherits it) on CPU 1.
        // SAFETY: a zeroed cpu_set_t is valid; the call only reads it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(1, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                eprintln!("--pin: cannot move the load generator to CPU 1");
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Run {
                c,
                devices,
                stacks,
                out,
                repeat,
            } => scenario_run(c, devices, stacks, out, repeat).await,
            Cmd::Ab {
                c,
                baseline_bin,
                devices,
                rounds,
            } => scenario_ab(c, baseline_bin, devices, rounds).await,
            Cmd::Burst {
                c,
                devices,
                registered,
                connect_only,
            } => scenario_burst(c, devices, registered, connect_only).await,
            Cmd::Crash {
                c,
                devices,
                trials,
                seed,
            } => scenario_crash(c, devices, trials, seed).await,
            Cmd::Drain {
                c,
                devices,
                pending,
                stacks,
                repeat,
            } => scenario_drain(c, devices, pending, stacks, repeat).await,
            Cmd::Ciphers { .. } => unreachable!("handled before the runtime starts"),
            Cmd::Load {
                c,
                addr,
                devices,
                connect_only,
                watch_pid,
            } => {
                let cfg = LoadCfg {
                    connect_only,
                    ..LoadCfg::from(&c)
                };
                let r = run_load(addr, LOAD_BASE, devices, 0, &cfg, watch_pid, watch_pid).await;
                if let Some(m) = r.connected {
                    println!(
                        "connected: {devices} devices, RSS {:.1} MiB (peak {:.1})",
                        m.rss, m.peak
                    );
                }
                print_table(&[row("target", &c, &r, 0.0, 0.0)]);
                for w in r.wakes.iter().filter(|w| w.error.is_some()).take(5) {
                    println!("{}: {:?}", w.id, w.error);
                }
            }
        }
    });
}
