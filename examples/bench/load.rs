//! The load generator: its settings, the devices' images and chunk messages,
//! and [`run_load`], which connects a fleet and wakes it all at once.

use crate::cli::{Common, Enc};
use crate::conn::{connect, Conn, Loader, RAW_BUF};
use crate::device::{drain, wake};
use crate::stack::{cpu_secs, mem_of, minor_faults, settle, Mem};
use crate::{fresh_pages, prefault};
use base64::Engine as _;
use sha2::Digest;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct LoadCfg {
    pub image_size: usize,
    pub chunk: usize,
    pub enc: Enc,
    pub loss: f64,
    pub tls: Option<(Vec<u8>, PathBuf)>,
    pub timeout: Duration,
    /// Pseudo-random seed for losses.
    pub seed: u64,
    /// Connect and subscribe, then disconnect without waking (memory probes).
    pub connect_only: bool,
    pub loader: Loader,
}

impl LoadCfg {
    pub fn from(c: &Common) -> LoadCfg {
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

/// A device's image: a shared body (so payload strings are built once per
/// run) with the device index in its first bytes (so every SHA-256 differs).
pub struct Images {
    pub base: Vec<u8>,
    /// Encoded payload of every chunk of `base` but the first.
    pub encoded: Vec<String>,
    pub chunk: usize,
    pub enc: Enc,
}

pub fn image_bytes(seed: u64, n: usize) -> Vec<u8> {
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

pub fn encode(enc: Enc, part: &[u8]) -> String {
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

pub fn itoa(b: u8) -> &'static str {
    static T: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    &T.get_or_init(|| (0..256).map(|i| i.to_string()).collect())[b as usize]
}

impl Images {
    pub fn new(size: usize, chunk: usize, enc: Enc) -> Images {
        let base = image_bytes(99, size);
        let encoded = base.chunks(chunk).skip(1).map(|p| encode(enc, p)).collect();
        Images {
            base,
            encoded,
            chunk,
            enc,
        }
    }
    pub fn total(&self) -> usize {
        self.base.len().div_ceil(self.chunk)
    }
    /// Device `dev`'s image (a drain's k-th pending image: `dev | k << 32`).
    pub fn image(&self, dev: u64) -> Vec<u8> {
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
    pub fn prepare(&self, id: &str, idx: u64) -> Prepared {
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
    pub fn chunk_msg(&self, id: &str, name: &str, first: &str, i: usize) -> Vec<u8> {
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
pub struct Prepared {
    pub msgs: Vec<Vec<u8>>,
    pub sha256: String,
}

pub fn image_name(idx: u64) -> String {
    format!("img_{idx:05}.jpg")
}

#[derive(Default)]
pub struct Counters {
    pub chunk_msgs: AtomicU64,
    pub resent: AtomicU64,
    pub missing_rounds: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct Wake {
    pub id: String,
    pub name: String,
    pub sha256: String,
    /// HELLO → ACK_OK (a drain: HELLO → the last image's ACK_OK).
    pub latency: Option<Duration>,
    /// A drain: METADATA → ACK_OK of every image ACKed.
    pub acks: Vec<Duration>,
    pub error: Option<String>,
}

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct LoadResult {
    pub devices: usize,
    pub elapsed: f64,
    pub chunk_msgs: u64,
    pub resent: u64,
    pub wakes: Vec<Wake>,
    /// The watched process's memory once every device was connected and
    /// subscribed, before the wake (after a 2 s settle).
    pub connected: Option<Mem>,
    /// The stack's CPU seconds and page faults during the wake.
    pub stack_wake: Option<(f64, u64)>,
}

impl LoadResult {
    pub fn images(&self) -> usize {
        self.wakes.iter().filter(|w| w.latency.is_some()).count()
    }
    pub fn pct(&self, p: f64) -> f64 {
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
pub const RUN_BASE: u32 = 0x0000_0000;
pub const BURST_BASE: u32 = 0x1000_0000;
pub const CRASH_BASE: u32 = 0x2000_0000;
pub const LOAD_BASE: u32 = 0x3000_0000;

/// Device `idx` of a scenario: a MAC, 12 upper-case hex digits.
pub fn mac(base: u32, idx: usize) -> String {
    format!("B8F8{:08X}", base.wrapping_add(idx as u32))
}

/// Connects, retrying: a thousand devices at once meet the gateway's
/// handshake limit (`mqtt.max_handshakes`) just as real ones would.
pub async fn connect_retry(addr: SocketAddr, id: &str, cfg: &LoadCfg) -> Result<Conn, String> {
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

/// Connects `n` devices, then wakes them all at once (a wake burst); with
/// `pending` > 0 every device drains that many pending images instead.
pub async fn run_load(
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
