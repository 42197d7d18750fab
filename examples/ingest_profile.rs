//! In-process driver of the ingest engine for profiling (bench/RESULTS.md,
//! "Where the time goes"): no network, no broker — pre-encoded firmware
//! messages are fed straight into `ingest::Engine` and committed to a redb
//! store in a temporary directory, the way `broker::run_ingest` does.
//!
//! ```text
//! cargo build --release --example ingest_profile
//! target/release/examples/ingest_profile --devices 100            # msgs/s
//! valgrind --tool=callgrind target/release/examples/ingest_profile --devices 20
//! target/release/examples/ingest_profile --parse-only             # protocol::DataMessage::parse alone
//! ```
//!
//! Phases: HELLO of every device, commit; METADATA of every device, commit;
//! then chunk `i` of every device in turn, committing every `--batch`
//! messages (the last chunk of each image finalises it and queues ACK_OK).

use barngate::clock::SystemClock;
use barngate::config::Config;
use barngate::ingest::Engine;
use barngate::metrics::Metrics;
use barngate::protocol::DataMessage;
use barngate::schedule::Schedule;
use barngate::store::Store;
use clap::Parser;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20)]
    devices: usize,
    #[arg(long, default_value_t = 51_200)]
    image_size: usize,
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Messages handled between two commits (the runner's MAX_BATCH is 4096;
    /// under load a commit follows every receive burst).
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Only time `DataMessage::parse` of the chunk messages.
    #[arg(long)]
    parse_only: bool,
    /// With `--parse-only`: parse the messages this many times over (a small
    /// `--devices` keeps them in cache, as the front's freshly decrypted
    /// records are).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Install the gateway's log subscriber (info level, to a sink).
    #[arg(long, default_value_t = true)]
    log: bool,
}

fn image(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x & 0xFF) as u8
        })
        .collect()
}

fn json_bytes(part: &[u8]) -> String {
    let mut s = String::with_capacity(part.len() * 4 + 2);
    s.push('[');
    for (i, b) in part.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&b.to_string());
    }
    s.push(']');
    s
}

fn main() {
    let a = Args::parse();
    if a.log {
        tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_writer(std::io::sink)
            .init();
    }
    let total = a.image_size.div_ceil(a.chunk);
    let macs: Vec<String> = (0..a.devices).map(|d| format!("B8F84000{d:04X}")).collect();
    // Pre-encoded chunk messages: chunks[d][i].
    let chunks: Vec<Vec<(String, Vec<u8>)>> = macs
        .iter()
        .enumerate()
        .map(|(d, mac)| {
            let img = image(d as u64 + 1, a.image_size);
            img.chunks(a.chunk)
                .enumerate()
                .map(|(i, p)| {
                    (
                        format!("ESP32CAM/{mac}/data"),
                        format!(
                            r#"{{"device_id":"{mac}","image_name":"img_{d:05}.jpg","chunk_id":{},"max_chunk_size":{},"payload":{}}}"#,
                            i + 1,
                            a.chunk,
                            json_bytes(p)
                        )
                        .into_bytes(),
                    )
                })
                .collect()
        })
        .collect();
    let n_chunks = a.devices * total;
    if a.parse_only {
        let t0 = Instant::now();
        let mut bytes = 0usize;
        for _ in 0..a.rounds {
            for i in 0..total {
                for dev in &chunks {
                    if let Ok(DataMessage::Chunk(c)) = DataMessage::parse(&dev[i].1, 16 << 20) {
                        bytes += c.payload.len();
                    }
                }
            }
        }
        let s = t0.elapsed().as_secs_f64();
        let msgs = n_chunks * a.rounds;
        println!(
            "parse only: {msgs} chunk messages, {bytes} bytes in {s:.3} s = {:.0} msgs/s, {:.2} ns per payload byte",
            msgs as f64 / s,
            s * 1e9 / bytes.max(1) as f64
        );
        return;
    }

    let dir = std::env::temp_dir().join(format!("barngate-ingest-profile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = Config::default();
    cfg.site.timezone = "UTC".into();
    let store = Arc::new(Store::open(&dir.join("barngate.redb")).unwrap());
    let metrics = Arc::new(Metrics::default());
    let schedule = Schedule::new(&cfg.schedule, cfg.timezone().unwrap());
    let mut engine = Engine::new(
        cfg.ingest.clone(),
        cfg.site.clone(),
        schedule,
        store.clone(),
        metrics.clone(),
    )
    .unwrap();
    let clock = SystemClock;
    use barngate::clock::Clock;
    let mut out = 0usize;
    let t_hello = Instant::now();
    for (d, mac) in macs.iter().enumerate() {
        let hello = format!(r#"{{"device_id":"{mac}","status":"alive","pendingImg":0}}"#);
        engine.handle(
            &format!("ESP32CAM/{mac}/status"),
            hello.as_bytes(),
            clock.now(),
        );
        let _ = d;
    }
    let hello_handled = t_hello.elapsed();
    out += engine.commit(clock.now()).unwrap().len();
    let hello_s = t_hello.elapsed();
    let t_meta = Instant::now();
    for (d, mac) in macs.iter().enumerate() {
        let meta = format!(
            r#"{{"device_id":"{mac}","capture_timestamp":"2025-06-01T08:00:00Z","image_name":"img_{d:05}.jpg","image_size":{},"max_chunk_size":{},"total_chunks_count":{total},"location":"bench","error":0,"temperature":21.5,"humidity":50.0,"pressure":1013.0,"gas_resistance":100.0}}"#,
            a.image_size, a.chunk
        );
        engine.handle(
            &format!("ESP32CAM/{mac}/data"),
            meta.as_bytes(),
            clock.now(),
        );
    }
    let meta_handled = t_meta.elapsed();
    out += engine.commit(clock.now()).unwrap().len();
    let meta_s = t_meta.elapsed();
    println!(
        "wake start: {} HELLO handled in {:.1} ms + commit {:.1} ms; METADATA handled in {:.1} ms + commit {:.1} ms",
        macs.len(),
        hello_handled.as_secs_f64() * 1e3,
        (hello_s - hello_handled).as_secs_f64() * 1e3,
        meta_handled.as_secs_f64() * 1e3,
        (meta_s - meta_handled).as_secs_f64() * 1e3,
    );
    let t0 = Instant::now();
    let mut commits = 0;
    let mut n = 0;
    for i in 0..total {
        for dev in &chunks {
            let (topic, payload) = &dev[i];
            engine.handle(topic, payload, clock.now());
            n += 1;
            if n % a.batch == 0 {
                out += engine.commit(clock.now()).unwrap().len();
                commits += 1;
            }
        }
    }
    out += engine.commit(clock.now()).unwrap().len();
    commits += 1;
    let s = t0.elapsed().as_secs_f64();
    let complete = metrics
        .images_complete
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "engine: {n_chunks} chunk messages in {s:.3} s = {:.0} msgs/s ({commits} commits, {complete} images complete, {out} replies)",
        n_chunks as f64 / s
    );
    drop(engine);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
