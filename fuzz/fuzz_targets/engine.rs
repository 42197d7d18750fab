#![no_main]
//! Drives the ingest engine with arbitrary message sequences, ticks and
//! commits against a real (temporary) store: it must never panic, and every
//! image the store holds as complete must match its recorded SHA-256 and size.
use arbitrary::Arbitrary;
use barngate::config::Config;
use barngate::ingest::Engine;
use barngate::metrics::Metrics;
use barngate::protocol::DataMessage;
use barngate::schedule::Schedule;
use barngate::store::Store;
use chrono::{Duration, TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

#[derive(Arbitrary, Debug)]
enum Op {
    Hello { dev: u8, pending: u8 },
    Meta { dev: u8, img: u8, size: u16, chunk: u8 },
    Chunk { dev: u8, img: u8, id: u16, len: u8, fill: u8 },
    Raw { dev: u8, channel: u8, payload: Vec<u8> },
    Tick { ms: u16 },
    Commit,
}

/// As the gateway's front does (bit 6 of `dev`): a data message that parses
/// as a CHUNK reaches the engine parsed (`Engine::handle_chunk`), anything
/// else raw; otherwise the engine parses it itself, as for the broker path.
fn deliver(engine: &mut Engine, dev: u8, channel: &str, payload: &[u8], now: chrono::DateTime<Utc>) {
    let topic = topic(dev, channel);
    if dev & 0x40 != 0 && channel == "data" {
        if let Ok(DataMessage::Chunk(c)) = DataMessage::parse(payload, u32::MAX) {
            return engine.handle_chunk(&topic, c, now);
        }
    }
    engine.handle(&topic, payload, now);
}

fn topic(dev: u8, channel: &str) -> String {
    let prefix = if dev & 0x80 == 0 { "ESP32CAM" } else { "device" };
    format!("{prefix}/AABBCCDDEE{:02X}/{channel}", dev & 0x03)
}

fuzz_target!(|ops: Vec<Op>| {
    // In memory: a file store per input fsyncs at every commit (19 execs/s).
    let store = Arc::new(Store::open_in_memory().unwrap());
    let mut cfg = Config::default();
    cfg.site.timezone = "UTC".into();
    cfg.ingest.max_image_size = 1 << 16;
    let schedule = Schedule::new(&cfg.schedule, cfg.timezone().unwrap());
    let metrics = Arc::new(Metrics::default());
    let mut engine = Engine::new(cfg.ingest.clone(), cfg.site.clone(), schedule, store.clone(), metrics).unwrap();
    let mut now = Utc.with_ymd_and_hms(2025, 6, 1, 8, 0, 0).unwrap();
    for op in ops.into_iter().take(200) {
        match op {
            Op::Hello { dev, pending } => {
                let p = format!(r#"{{"device_id":"x","status":"alive","pendingImg":{}}}"#, pending % 4);
                engine.handle(&topic(dev, "status"), p.as_bytes(), now);
            }
            Op::Meta { dev, img, size, chunk } => {
                let size = (size as u32 % 4096).max(1);
                let chunk = (chunk as u32).max(1);
                let p = format!(
                    r#"{{"device_id":"x","image_name":"i{}.jpg","capture_timestamp":"2025-06-01T08:00:00Z","image_size":{size},"max_chunk_size":{chunk},"total_chunks_count":{},"error":0}}"#,
                    img % 3,
                    size.div_ceil(chunk)
                );
                engine.handle(&topic(dev, "data"), p.as_bytes(), now);
            }
            Op::Chunk { dev, img, id, len, fill } => {
                let bytes = vec![fill; len as usize];
                let payload = if dev & 0x80 == 0 {
                    format!("{bytes:?}").replace(' ', "")
                } else {
                    format!("\"{}\"", {
                        use base64::Engine as _;
                        base64::engine::general_purpose::STANDARD.encode(&bytes)
                    })
                };
                let p = format!(
                    r#"{{"device_id":"x","image_name":"i{}.jpg","chunk_id":{},"payload":{payload}}}"#,
                    img % 3,
                    id % 300
                );
                deliver(&mut engine, dev, "data", p.as_bytes(), now);
            }
            Op::Raw { dev, channel, payload } => {
                let ch = ["status", "data", "cmd", "ack", "x"][channel as usize % 5];
                deliver(&mut engine, dev, ch, &payload, now);
            }
            Op::Tick { ms } => {
                now += Duration::milliseconds(ms as i64 * 10);
                engine.tick(now);
            }
            Op::Commit => {
                engine.commit(now).unwrap();
            }
        }
    }
    engine.commit(now).unwrap();
    for c in store.images(None).unwrap() {
        let bytes = store.image_bytes(c.id).unwrap().unwrap();
        assert_eq!(Some(bytes.len() as u32), c.image_size());
        use sha2::Digest;
        assert_eq!(c.sha256.as_deref(), Some(hex::encode(sha2::Sha256::digest(&bytes)).as_str()));
    }
});
