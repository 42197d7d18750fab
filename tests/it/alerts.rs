//! Every alert rule fires and resolves through the real ingest engine, in
//! simulated time (ManualClock): missed wake, offline, low battery (warning →
//! critical → resolved), device error, image failed after the retry limit.

use barngate::clock::{Clock, ManualClock};
use barngate::config::Config;
use barngate::ingest::Engine;
use barngate::metrics::Metrics;
use barngate::schedule::Schedule;
use barngate::store::{AlertRecord, Store};
use chrono::{Duration, TimeZone, Utc};
use serde_json::json;
use std::sync::Arc;

const MAC: &str = "B8F862F9CFB8";

struct Rig {
    engine: Engine,
    store: Arc<Store>,
    clock: ManualClock,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
        let mut cfg = Config::default();
        cfg.site.timezone = "UTC".into();
        cfg.ingest.quiet_gap_ms = 300;
        let schedule = Schedule::new(&cfg.schedule, chrono_tz::UTC);
        let engine = Engine::new(
            cfg.ingest,
            cfg.site,
            schedule,
            store.clone(),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 2, 7, 59, 0).unwrap());
        Rig {
            engine,
            store,
            clock,
            _dir: dir,
        }
    }

    fn send(&mut self, channel: &str, v: serde_json::Value) {
        let now = self.clock.now();
        self.engine.handle(
            &format!("ESP32CAM/{MAC}/{channel}"),
            v.to_string().as_bytes(),
            now,
        );
        self.engine.commit(now).unwrap();
    }

    fn hello(&mut self) {
        self.send(
            "status",
            json!({"device_id": MAC, "status": "alive", "pendingImg": 0}),
        );
    }

    /// Moves the clock and lets the engine's timers run (alert rules included).
    fn advance(&mut self, d: Duration) {
        self.clock.advance(d);
        let now = self.clock.now();
        self.engine.tick(now);
        self.engine.commit(now).unwrap();
    }

    fn open(&self) -> Vec<AlertRecord> {
        let mut v: Vec<AlertRecord> = self
            .store
            .alerts()
            .unwrap()
            .into_iter()
            .filter(|a| a.resolved_at.is_none())
            .collect();
        v.sort_by(|a, b| a.kind.cmp(&b.kind));
        v
    }

    fn open_kinds(&self) -> Vec<(String, String)> {
        self.open()
            .into_iter()
            .map(|a| (a.kind, a.severity))
            .collect()
    }

    fn metadata(&mut self, name: &str, size: usize, battery: f64, error: i64) {
        self.send(
            "data",
            json!({"device_id": MAC, "capture_timestamp": "2026-03-02T08:00:00Z", "image_name": name,
                   "image_size": size, "max_chunk_size": 100, "total_chunks_count": size.div_ceil(100),
                   "error": error, "battery": battery, "temperature": 20.0}),
        );
    }

    fn chunk(&mut self, name: &str, id: u32, len: usize) {
        self.send(
            "data",
            json!({"device_id": MAC, "image_name": name, "chunk_id": id, "max_chunk_size": 100,
                   "payload": vec![7u8; len]}),
        );
    }
}

fn kinds(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn missed_wake_and_offline_fire_and_resolve_in_simulated_time() {
    let mut r = Rig::new();
    r.hello();
    r.metadata("a.jpg", 100, 90.0, 0);
    r.chunk("a.jpg", 1, 100);
    let next = r
        .store
        .device(MAC)
        .unwrap()
        .unwrap()
        .next_wake
        .expect("next wake assigned");
    r.advance(Duration::seconds(61));
    assert!(r.open().is_empty());
    // Just past next wake + 1 h: missed.
    let until = next + Duration::hours(1) + Duration::minutes(1) - r.clock.now();
    r.advance(until);
    assert_eq!(r.open_kinds(), kinds(&[("missed_wake", "warning")]));
    let upstream = r.store.outbox(10_000).unwrap();
    assert!(
        upstream.iter().any(|o| o.kind == "alert"),
        "queued upstream"
    );
    // Five days of silence: offline too, each raised once.
    for _ in 0..(5 * 24) {
        r.advance(Duration::hours(1));
    }
    assert_eq!(
        r.open_kinds(),
        kinds(&[("missed_wake", "warning"), ("offline", "critical")])
    );
    assert_eq!(r.store.alerts().unwrap().len(), 2, "no duplicates");
    // The device comes back: both resolve at the next evaluation.
    r.hello();
    r.advance(Duration::seconds(61));
    assert!(r.open().is_empty(), "{:?}", r.open());
    assert!(r
        .store
        .alerts()
        .unwrap()
        .iter()
        .all(|a| a.resolved_at.is_some()));
}

#[test]
fn low_battery_and_device_error_follow_what_the_device_reports() {
    let mut r = Rig::new();
    r.hello();
    r.metadata("a.jpg", 150, 18.0, 0);
    r.chunk("a.jpg", 1, 100);
    r.chunk("a.jpg", 2, 50);
    r.advance(Duration::seconds(61));
    assert_eq!(r.open_kinds(), kinds(&[("low_battery", "warning")]));
    assert!(r.open()[0].message.contains("battery at 18%"));
    // Next wake: 8 % and an error code.
    r.advance(Duration::hours(8));
    r.hello();
    r.metadata("b.jpg", 100, 8.0, 4);
    r.chunk("b.jpg", 1, 100);
    r.advance(Duration::seconds(61));
    assert_eq!(
        r.open_kinds(),
        kinds(&[("device_error", "error"), ("low_battery", "critical")])
    );
    // Batteries replaced, error cleared.
    r.advance(Duration::hours(8));
    r.hello();
    r.metadata("c.jpg", 100, 100.0, 0);
    r.chunk("c.jpg", 1, 100);
    r.advance(Duration::seconds(61));
    assert!(r.open().is_empty(), "{:?}", r.open());
    let all = r.store.alerts().unwrap();
    assert_eq!(all.iter().filter(|a| a.kind == "low_battery").count(), 2);
    assert_eq!(all.iter().filter(|a| a.kind == "device_error").count(), 1);
}

#[test]
fn image_failed_after_the_retry_limit_resolves_when_the_image_completes() {
    let mut r = Rig::new();
    r.hello();
    r.metadata("lossy.jpg", 300, 90.0, 0);
    r.chunk("lossy.jpg", 1, 100);
    // Chunks 2 and 3 never come: 3 rounds of missing_chunks (each waits
    // out the hard timeout), then failed.
    r.advance(Duration::seconds(1));
    for _ in 0..4 {
        r.advance(Duration::seconds(61));
    }
    assert_eq!(r.open_kinds(), kinds(&[("image_failed", "error")]));
    assert!(
        r.open()[0].message.contains("after 3 retries"),
        "{}",
        r.open()[0].message
    );
    // The device sends it again at its next wake, completely.
    r.advance(Duration::hours(8));
    r.hello();
    r.metadata("lossy.jpg", 300, 90.0, 0);
    for id in 1..=3 {
        r.chunk("lossy.jpg", id, 100);
    }
    r.advance(Duration::seconds(1));
    assert!(r.open().is_empty(), "{:?}", r.open());
}
