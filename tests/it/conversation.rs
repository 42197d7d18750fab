//! The wake/capture conversation as an unlucky or hostile device has it:
//! one regression test per fault that once left a device stuck, starved or
//! mixed up, driven against the engine in manual time (no sockets), and a
//! model-based test (`model::conversation_model`) that checks the invariants after
//! every step of random fleets of firmware-faithful and hostile devices.

mod model;

use barngate::clock::{Clock, ManualClock};
use barngate::config::Config;
use barngate::ingest::Engine;
use barngate::metrics::Metrics;
use barngate::schedule::Schedule;
use barngate::store::{CaptureState, Store};
use chrono::{Duration, TimeZone, Utc};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The engine over an in-memory store that outlives it (a restart is a new
/// engine on the same store), in manual time.
struct Gw {
    cfg: Config,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    clock: ManualClock,
    e: Engine,
}

/// A message the gateway sent: (device MAC, topic, payload).
type Sent = Vec<(String, String, Value)>;

impl Gw {
    fn new(cfg: Config) -> Gw {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let metrics = Arc::new(Metrics::default());
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 2, 8, 10, 0).unwrap());
        let e = Self::engine(&cfg, &store, &metrics);
        Gw {
            cfg,
            store,
            metrics,
            clock,
            e,
        }
    }

    fn engine(cfg: &Config, store: &Arc<Store>, metrics: &Arc<Metrics>) -> Engine {
        Engine::new(
            cfg.ingest.clone(),
            cfg.site.clone(),
            Schedule::new(&cfg.schedule, chrono_tz::Tz::UTC),
            store.clone(),
            metrics.clone(),
        )
        .unwrap()
    }

    /// The gateway stops (flushing, as on SIGTERM) and starts again.
    fn restart(&mut self) {
        self.e.flush(self.clock.now()).unwrap();
        self.e = Self::engine(&self.cfg, &self.store, &self.metrics);
    }

    fn commit(&mut self) -> Sent {
        self.e
            .commit(self.clock.now())
            .unwrap()
            .into_iter()
            .map(|p| (p.mac, p.topic, serde_json::from_slice(&p.payload).unwrap()))
            .collect()
    }

    fn send(&mut self, topic: String, payload: Vec<u8>) -> Sent {
        self.e.handle(&topic, &payload, self.clock.now());
        self.commit()
    }

    fn hello(&mut self, mac: &str, pending: u32) -> Sent {
        self.send(
            format!("ESP32CAM/{mac}/status"),
            json!({"device_id": mac, "status": "alive", "pendingImg": pending})
                .to_string()
                .into_bytes(),
        )
    }

    fn meta(&mut self, mac: &str, name: &str, img: &[u8], chunk: usize) -> Sent {
        self.meta_raw(
            mac,
            json!({"device_id": mac, "capture_timestamp": "2026-03-02T08:00:00Z",
                   "image_name": name, "image_size": img.len(), "max_chunk_size": chunk,
                   "total_chunks_count": img.len().div_ceil(chunk), "error": 0}),
        )
    }

    fn meta_raw(&mut self, mac: &str, v: Value) -> Sent {
        self.send(format!("ESP32CAM/{mac}/data"), v.to_string().into_bytes())
    }

    /// Chunks at 0-based positions, sent with 1-based ids (the firmware's).
    fn chunks(
        &mut self,
        mac: &str,
        name: &str,
        img: &[u8],
        chunk: usize,
        positions: impl IntoIterator<Item = usize>,
    ) -> Sent {
        let mut out = Vec::new();
        for pos in positions {
            let part = &img[pos * chunk..((pos + 1) * chunk).min(img.len())];
            self.e.handle(
                &format!("ESP32CAM/{mac}/data"),
                json!({"device_id": mac, "image_name": name, "chunk_id": pos + 1,
                       "max_chunk_size": chunk, "payload": part})
                .to_string()
                .as_bytes(),
                self.clock.now(),
            );
            out.extend(self.commit());
        }
        out
    }

    fn tick_for(&mut self, total: Duration, step: Duration) -> Sent {
        let mut out = Vec::new();
        let end = self.clock.now() + total;
        while self.clock.now() < end {
            self.clock.advance(step);
            self.e.tick(self.clock.now());
            out.extend(self.commit());
        }
        out
    }

    fn stored_image(&self, mac: &str, name: &str) -> Option<Vec<u8>> {
        let c = self.store.latest_capture(mac, name).unwrap()?;
        self.store.image_bytes(c.id).unwrap()
    }

    fn open_alerts(&self, mac: &str, kind: &str) -> usize {
        self.store
            .alerts()
            .unwrap()
            .iter()
            .filter(|a| a.mac == mac && a.kind == kind && a.resolved_at.is_none())
            .count()
    }
}

fn has(sent: &Sent, mac: &str, field: &str) -> bool {
    sent.iter()
        .any(|(m, _, v)| m == mac && v.get(field).is_some())
}

fn image(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed)
        .collect()
}

const A: &str = "AABBCCDD0001";
const B: &str = "AABBCCDD0002";

/// Finding 1: chunks for an image never announced, then a restart, then
/// another device's new image: the new image must be only its own bytes.
#[test]
fn chunks_without_metadata_across_a_restart_never_join_another_devices_image() {
    let mut g = Gw::new(Config::default());
    let stray = image(0xA5, 1000);
    g.hello(A, 0);
    g.chunks(A, "stray.jpg", &stray, 100, 0..5);
    g.restart();
    let img = image(0x3C, 1000);
    g.hello(B, 0);
    let sent = g.meta(B, "b.jpg", &img, 100);
    assert!(
        has(&sent, B, "send_image"),
        "a new image is asked for whole: {sent:?}"
    );
    assert!(!has(&sent, B, "missing_chunks"), "{sent:?}");
    let sent = g.chunks(B, "b.jpg", &img, 100, 0..10);
    assert!(has(&sent, B, "ACK_OK"));
    assert_eq!(g.stored_image(B, "b.jpg").unwrap(), img);
    // Nothing of the stray image is left in the database.
    let next = g.store.next_capture_id().unwrap();
    for id in 1..next {
        if g.store.capture(id).unwrap().is_none() {
            assert!(g.store.chunk_lengths(id).unwrap().is_empty());
        }
    }
}

/// Finding 1, the other half: capture ids are never reused after a restart,
/// even when the highest id was only ever used by chunks.
#[test]
fn capture_ids_are_never_reused_after_a_restart() {
    let mut cfg = Config::default();
    cfg.ingest.held_chunk_bytes = 0; // chunks committed as they come
    let mut g = Gw::new(cfg);
    g.hello(A, 0);
    g.chunks(A, "stray.jpg", &image(1, 300), 100, 0..2);
    let used = g.store.next_capture_id().unwrap();
    g.restart();
    let img = image(2, 300);
    g.hello(B, 0);
    g.meta(B, "b.jpg", &img, 100);
    let id = g.store.latest_capture(B, "b.jpg").unwrap().unwrap().id;
    assert!(id >= used, "capture id {id} reused (next was {used})");
}

/// Finding 2: the example in firmware-protocol.md (4153 bytes, 128-byte
/// chunks, `total_chunks_count` 15) is answered and the image stored.
#[test]
fn metadata_whose_total_disagrees_with_its_size_is_answered_and_stored() {
    let mut g = Gw::new(Config::default());
    let img = image(7, 4153);
    g.hello(A, 0);
    let sent = g.meta_raw(
        A,
        json!({"device_id": A, "capture_timestamp": "2025-08-29T14:30:00Z", "image_name": "image_001.jpg",
               "image_size": 4153, "max_chunk_size": 128, "total_chunks_count": 15, "error": 0}),
    );
    assert!(has(&sent, A, "send_image"), "{sent:?}");
    let sent = g.chunks(A, "image_001.jpg", &img, 128, 0..33);
    assert!(has(&sent, A, "ACK_OK"), "{sent:?}");
    assert_eq!(g.stored_image(A, "image_001.jpg").unwrap(), img);
    assert_eq!(g.metrics.rejected("total_chunks_mismatch"), 1);
}

/// Finding 2: a camera failure (`image_size` 0, `error` > 0) is answered,
/// its readings and error kept and alerted, and the device moves on.
#[test]
fn camera_failure_metadata_is_recorded_alerted_and_released() {
    let mut g = Gw::new(Config::default());
    let sent = g.hello(A, 2);
    assert!(has(&sent, A, "ACK_OK"), "the cue to drain: {sent:?}");
    let sent = g.meta_raw(
        A,
        json!({"device_id": A, "capture_timestamp": "2026-03-01T08:00:00Z", "image_name": "dead.jpg",
               "image_size": 0, "max_chunk_size": 512, "total_chunks_count": 0, "error": 4,
               "temperature": 21.5}),
    );
    let ack = sent
        .iter()
        .find(|(_, _, v)| v.get("ACK_OK").is_some())
        .expect("released with ACK_OK");
    assert_eq!(ack.2["image_name"], "dead.jpg");
    let cap = g.store.latest_capture(A, "dead.jpg").unwrap().unwrap();
    assert_eq!(cap.state, CaptureState::Failed);
    assert_eq!(g.store.telemetry(A).unwrap()[0].temperature, Some(21.5));
    assert_eq!(g.open_alerts(A, "device_error"), 1);
    // The backlog goes on: the next pending image streams.
    let img = image(3, 900);
    assert!(has(&g.meta(A, "next.jpg", &img, 300), A, "send_image"));
    assert!(has(&g.chunks(A, "next.jpg", &img, 300, 0..3), A, "ACK_OK"));
}

/// Finding 2 / §8: a METADATA that can never be accepted is answered with
/// the next wake, and released after `release_after_refusals` wakes.
#[test]
fn unacceptable_metadata_is_answered_and_released_after_bounded_wakes() {
    let mut g = Gw::new(Config::default());
    let bad = json!({"device_id": A, "capture_timestamp": "2026-03-01T08:00:00Z", "image_name": "huge.jpg",
                     "image_size": 8_000_000, "max_chunk_size": 1, "total_chunks_count": 8_000_000, "error": 0});
    for wake in 1..=3 {
        g.hello(A, 1);
        let sent = g.meta_raw(A, bad.clone());
        if wake < 3 {
            assert!(has(&sent, A, "next_wake"), "wake {wake}: {sent:?}");
            assert!(!has(&sent, A, "ACK_OK"), "wake {wake}: {sent:?}");
        } else {
            assert!(has(&sent, A, "ACK_OK"), "released on wake 3: {sent:?}");
        }
        g.clock.advance(Duration::hours(8));
    }
    assert_eq!(g.metrics.rejected("too_many_chunks"), 3);
    assert_eq!(g.metrics.images_released.load(Ordering::Relaxed), 1);
    assert_eq!(g.open_alerts(A, "image_failed"), 1);
    assert_eq!(g.e.active_captures(), 0);
}

/// Finding 2: METADATA that does not parse still gets an answer.
#[test]
fn unparseable_metadata_gets_the_next_wake() {
    let mut g = Gw::new(Config::default());
    g.hello(A, 1);
    let sent = g.meta_raw(
        A,
        json!({"device_id": A, "capture_timestamp": "2026-03-01T08:00:00Z", "image_name": "x.jpg",
               "image_size": "big", "max_chunk_size": 100, "total_chunks_count": 1, "error": 0}),
    );
    assert!(has(&sent, A, "next_wake"), "{sent:?}");
}

/// Finding 3: a v1 device is asked for each pending image in turn, and no
/// new capture is requested until its backlog is drained.
#[test]
fn v1_drain_asks_for_every_pending_image_then_captures() {
    let mut g = Gw::new(Config::default());
    let topic = |ch: &str| format!("device/{A}/{ch}");
    let send = |g: &mut Gw, ch: &str, v: Value| g.send(topic(ch), v.to_string().into_bytes());
    let sent = send(
        &mut g,
        "status",
        json!({"device_id": A, "status": "alive", "pendingImg": 2}),
    );
    assert!(has(&sent, A, "send_image"), "{sent:?}");
    assert!(!has(&sent, A, "capture_image"), "{sent:?}");
    for (i, name) in ["old1.jpg", "old2.jpg"].iter().enumerate() {
        let img = image(i as u8, 500);
        let sent = send(
            &mut g,
            "data",
            json!({"device_id": A, "capture_timestamp": format!("2026-02-2{i}T08:00:00Z"), "image_name": name,
                   "image_size": 500, "max_chunk_size": 250, "total_chunks_count": 2, "error": 0}),
        );
        assert!(has(&sent, A, "send_image"), "{sent:?}");
        let mut sent = Vec::new();
        for pos in 0..2 {
            use base64::Engine as _;
            let b64 =
                base64::engine::general_purpose::STANDARD.encode(&img[pos * 250..(pos + 1) * 250]);
            sent.extend(send(
                &mut g,
                "data",
                json!({"device_id": A, "image_name": name, "chunk_id": pos, "payload": b64}),
            ));
        }
        assert!(has(&sent, A, "ACK_OK"), "{sent:?}");
        if i == 0 {
            assert!(
                has(&sent, A, "send_image"),
                "asked for the next pending image: {sent:?}"
            );
            assert!(!has(&sent, A, "capture_image"), "{sent:?}");
        } else {
            assert!(
                has(&sent, A, "capture_image"),
                "drained, then a capture: {sent:?}"
            );
        }
    }
}

/// Finding 4: a device that drops mid-stream frees its streaming slot at
/// once, is sent nothing more, and raises no `image_failed`.
#[test]
fn device_dropping_mid_stream_frees_its_slot_at_once() {
    let mut cfg = Config::default();
    cfg.ingest.max_streaming = 1;
    let mut g = Gw::new(cfg);
    let (ia, ib) = (image(1, 1000), image(2, 1000));
    g.hello(A, 0);
    g.meta(A, "a.jpg", &ia, 100);
    g.chunks(A, "a.jpg", &ia, 100, 0..4);
    g.hello(B, 0);
    let sent = g.meta(B, "b.jpg", &ib, 100);
    assert!(
        !has(&sent, B, "send_image"),
        "B waits for the slot: {sent:?}"
    );
    g.e.session_ended(A, g.clock.now());
    let sent = g.commit();
    assert!(
        has(&sent, B, "send_image"),
        "slot handed on at once: {sent:?}"
    );
    assert_eq!(g.metrics.streaming.load(Ordering::Relaxed), 1);
    let later = g.tick_for(Duration::minutes(5), Duration::seconds(5));
    assert!(
        later.iter().all(|(m, _, _)| m != A),
        "nothing to a gone device: {later:?}"
    );
    assert_eq!(g.open_alerts(A, "image_failed"), 0);
    // The next wake resumes from what arrived.
    g.hello(A, 1);
    let sent = g.meta(A, "a.jpg", &ia, 100);
    let ids = sent
        .iter()
        .find_map(|(_, _, v)| v.get("missing_chunks"))
        .expect("resumed");
    assert_eq!(ids.as_array().unwrap().len(), 6);
}

/// Finding 5: an error code in HELLO keeps `device_error` open through the
/// periodic alert pass.
#[test]
fn hello_error_keeps_device_error_open() {
    let mut g = Gw::new(Config::default());
    g.send(
        format!("ESP32CAM/{A}/status"),
        json!({"device_id": A, "status": "alive", "pendingImg": 0, "error": 7})
            .to_string()
            .into_bytes(),
    );
    assert_eq!(g.open_alerts(A, "device_error"), 1);
    g.tick_for(Duration::minutes(3), Duration::seconds(30));
    assert_eq!(g.open_alerts(A, "device_error"), 1);
}

/// Finding 6: a huge missing list is paged to `ingest.max_missing_ids`
/// and a fully delivered page is not counted as a failed round.
#[test]
fn missing_chunks_are_paged_and_a_delivered_page_is_no_retry() {
    let mut g = Gw::new(Config::default());
    let img = image(9, 1000 * 4);
    g.hello(A, 0);
    g.meta(A, "p.jpg", &img, 4);
    // Only the first and the last chunk arrive: 998 are missing.
    let sent = g.chunks(A, "p.jpg", &img, 4, [0, 999]);
    let mut pages = 0;
    let mut sent = sent;
    while let Some(ids) = sent
        .iter()
        .find_map(|(_, _, v)| v.get("missing_chunks"))
        .cloned()
    {
        let ids: Vec<usize> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as usize)
            .collect();
        assert!(ids.len() <= 256, "page of {}", ids.len());
        let payload = serde_json::to_vec(&sent[0].2).unwrap();
        assert!(
            payload.len() < 4096,
            "missing_chunks of {} bytes",
            payload.len()
        );
        pages += 1;
        sent = g.chunks(A, "p.jpg", &img, 4, ids.iter().map(|i| i - 1));
    }
    assert_eq!(pages, 4);
    assert!(has(&sent, A, "ACK_OK"), "{sent:?}");
    assert_eq!(g.stored_image(A, "p.jpg").unwrap(), img);
}

/// Finding 6: the command log is bounded.
#[test]
fn stored_commands_are_bounded() {
    let mut cfg = Config::default();
    cfg.ingest.max_stored_commands = 100;
    let mut g = Gw::new(cfg);
    for _ in 0..300 {
        g.hello(A, 0);
    }
    assert_eq!(g.store.commands(None).unwrap().len(), 100);
}

/// Finding 7: empty chunks count against the held-bytes budget.
#[test]
fn empty_chunks_count_against_the_held_budget() {
    let mut cfg = Config::default();
    cfg.ingest.held_chunk_bytes = 4096;
    let mut g = Gw::new(cfg);
    g.hello(A, 0);
    let img = vec![0u8; 0];
    g.meta_raw(
        A,
        json!({"device_id": A, "capture_timestamp": "2026-03-01T08:00:00Z", "image_name": "e.jpg",
               "image_size": 100_000, "max_chunk_size": 100, "total_chunks_count": 1000, "error": 0}),
    );
    for id in 1..=500u32 {
        g.e.handle(
            &format!("ESP32CAM/{A}/data"),
            json!({"image_name": "e.jpg", "chunk_id": id, "payload": img})
                .to_string()
                .as_bytes(),
            g.clock.now(),
        );
    }
    let held = g.metrics.held_chunk_bytes.load(Ordering::Relaxed);
    assert!(
        held > 0 && held <= 4096,
        "held {held}\n{}",
        g.metrics.render()
    );
}

/// Finding 7: one device cannot open unlimited captures without METADATA.
#[test]
fn unannounced_captures_per_device_are_bounded() {
    let mut g = Gw::new(Config::default());
    g.hello(A, 0);
    for i in 0..20 {
        g.chunks(A, &format!("n{i}.jpg"), &image(1, 100), 100, [0]);
    }
    assert_eq!(g.e.active_captures(), 2);
    assert_eq!(g.metrics.rejected("too_many_unannounced"), 18);
    // They go when the session does.
    g.e.session_ended(A, g.clock.now());
    assert_eq!(g.e.active_captures(), 0);
}

/// Finding 7: announced images left unfinished are bounded per device;
/// the oldest fails (alerted once) and its chunks go.
#[test]
fn unfinished_captures_per_device_are_bounded() {
    let mut cfg = Config::default();
    cfg.ingest.max_open_captures_per_device = 3;
    let mut g = Gw::new(cfg);
    g.hello(A, 0);
    for i in 0..10 {
        let name = format!("u{i}.jpg");
        let img = image(i as u8, 300);
        g.meta(A, &name, &img, 100);
        g.chunks(A, &name, &img, 100, [0]);
        assert!(g.store.open_captures(A).unwrap().len() <= 3);
    }
    g.e.session_ended(A, g.clock.now());
    g.commit();
    let open: Vec<String> = g
        .store
        .open_captures(A)
        .unwrap()
        .into_iter()
        .map(|c| c.image_name)
        .collect();
    assert_eq!(open, ["u7.jpg", "u8.jpg", "u9.jpg"]);
    assert_eq!(g.metrics.rejected("too_many_open_captures"), 7);
    assert_eq!(g.open_alerts(A, "image_failed"), 7);
    let u0 = g.store.latest_capture(A, "u0.jpg").unwrap().unwrap();
    assert_eq!(u0.state, CaptureState::Failed);
    assert!(g.store.chunk_lengths(u0.id).unwrap().is_empty());
    // Announced again, the image is received whole.
    g.hello(A, 1);
    let img = image(0, 300);
    g.meta(A, "u0.jpg", &img, 100);
    assert!(has(&g.chunks(A, "u0.jpg", &img, 100, 0..3), A, "ACK_OK"));
    assert_eq!(g.stored_image(A, "u0.jpg").unwrap(), img);
    assert_eq!(g.store.open_captures(A).unwrap().len(), 2);
}

/// Finding 8: the missing ids are asked for as soon as the round's last
/// chunk arrives, with no clock time passing.
#[test]
fn missing_chunks_requested_as_soon_as_the_last_chunk_arrives() {
    let mut g = Gw::new(Config::default());
    let img = image(5, 1000);
    g.hello(A, 0);
    g.meta(A, "m.jpg", &img, 100);
    let sent = g.chunks(A, "m.jpg", &img, 100, (0..10).filter(|p| *p != 4));
    let ids = sent
        .iter()
        .find_map(|(_, _, v)| v.get("missing_chunks"))
        .expect("asked at once");
    assert_eq!(ids, &json!([5]));
    let sent = g.chunks(A, "m.jpg", &img, 100, [4]);
    assert!(has(&sent, A, "ACK_OK"));
}

/// Finding 9: the slot's capture is remembered in the store, so a device
/// that left the cache is not asked to capture twice in one slot.
#[test]
fn current_capture_is_remembered_after_the_device_leaves_the_cache() {
    let mut g = Gw::new(Config::default());
    let img = image(4, 300);
    assert!(has(&g.hello(A, 0), A, "capture_image"));
    g.meta(A, "c.jpg", &img, 100);
    assert!(has(&g.chunks(A, "c.jpg", &img, 100, 0..3), A, "ACK_OK"));
    g.e.session_ended(A, g.clock.now());
    g.tick_for(Duration::minutes(12), Duration::minutes(1));
    assert_eq!(g.e.cached_devices(), 0);
    assert!(g
        .store
        .device(A)
        .unwrap()
        .unwrap()
        .last_current_capture_at
        .is_some());
    let sent = g.hello(A, 0);
    assert!(!has(&sent, A, "capture_image"), "{sent:?}");
    assert!(has(&sent, A, "next_wake"), "{sent:?}");
}

/// Finding 9: a failed capture resumed later keeps its failure and rounds.
#[test]
fn resumed_failed_capture_keeps_its_failure_and_rounds() {
    let mut g = Gw::new(Config::default());
    let img = image(6, 1000);
    g.hello(A, 0);
    g.meta(A, "f.jpg", &img, 100);
    g.chunks(A, "f.jpg", &img, 100, 0..5);
    // No more chunks: three rounds, then failed.
    g.tick_for(Duration::minutes(5), Duration::seconds(1));
    let c = g.store.latest_capture(A, "f.jpg").unwrap().unwrap();
    assert_eq!(
        (c.state, c.failures, c.retries),
        (CaptureState::Failed, 1, 3)
    );
    assert_eq!(g.open_alerts(A, "image_failed"), 1);
    g.hello(A, 1);
    g.meta(A, "f.jpg", &img, 100);
    assert!(has(&g.chunks(A, "f.jpg", &img, 100, 5..10), A, "ACK_OK"));
    let c = g.store.latest_capture(A, "f.jpg").unwrap().unwrap();
    assert_eq!((c.state, c.failures), (CaptureState::Complete, 1));
    assert!(c.retries >= 3, "rounds kept: {}", c.retries);
    assert_eq!(g.stored_image(A, "f.jpg").unwrap(), img);
    // The per-device totals (dashboard, /metrics) keep the failure too.
    let t = &g.store.capture_totals().unwrap()[A];
    assert_eq!((t.images_complete, t.failures, t.in_progress), (1, 1, 0));
    assert!(t.retries >= 3);
}

/// The awake time a device spends per image is mostly commits: only a
/// reply that promises something stored (ACK_OK: the image; a next wake:
/// the registry's copy) waits for a durable commit; `capture_image`,
/// `send_image` and `missing_chunks` go out after one without an fsync.
#[test]
fn only_replies_that_promise_a_stored_fact_wait_for_an_fsync() {
    use barngate::ingest::Records;
    use barngate::store::{
        AlertRecord, Batch, CaptureRecord, CommitReport, DeviceRecord, StoreError,
    };
    use std::sync::Mutex;

    /// The store, noting whether each commit was relaxed.
    struct Noting {
        inner: Store,
        relaxed: Mutex<Vec<bool>>,
    }
    impl Records for Noting {
        fn start(&self, n: u64) -> Result<u64, StoreError> {
            self.inner.start(n)
        }
        fn device(&self, mac: &str) -> Result<Option<DeviceRecord>, StoreError> {
            self.inner.device(mac)
        }
        fn for_each_device(&self, f: &mut dyn FnMut(DeviceRecord)) -> Result<(), StoreError> {
            Records::for_each_device(&self.inner, f)
        }
        fn device_count(&self) -> Result<u64, StoreError> {
            self.inner.device_count()
        }
        fn capture(&self, id: u64) -> Result<Option<CaptureRecord>, StoreError> {
            self.inner.capture(id)
        }
        fn latest_capture(
            &self,
            mac: &str,
            name: &str,
        ) -> Result<Option<CaptureRecord>, StoreError> {
            self.inner.latest_capture(mac, name)
        }
        fn open_captures(&self, mac: &str) -> Result<Vec<CaptureRecord>, StoreError> {
            self.inner.open_captures(mac)
        }
        fn chunk_lengths(&self, id: u64) -> Result<Vec<(u32, u32)>, StoreError> {
            self.inner.chunk_lengths(id)
        }
        fn open_alerts(&self) -> Result<Vec<AlertRecord>, StoreError> {
            Records::open_alerts(&self.inner)
        }
        fn next_ids(&self) -> Result<(u64, u64), StoreError> {
            self.inner.next_ids()
        }
        fn commit(
            &self,
            batch: Batch,
            now: chrono::DateTime<Utc>,
        ) -> Result<CommitReport, StoreError> {
            self.relaxed.lock().unwrap().push(batch.relaxed);
            self.inner.commit(batch, now)
        }
    }

    let cfg = Config::default();
    let store = Arc::new(Noting {
        inner: Store::open_in_memory().unwrap(),
        relaxed: Mutex::new(Vec::new()),
    });
    let mut e = Engine::new(
        cfg.ingest.clone(),
        cfg.site.clone(),
        Schedule::new(&cfg.schedule, chrono_tz::Tz::UTC),
        store.clone(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let now = Utc.with_ymd_and_hms(2026, 3, 2, 8, 10, 0).unwrap();
    let mut step = |topic: String, v: Value| -> (Vec<String>, bool) {
        e.handle(&topic, v.to_string().as_bytes(), now);
        let sent = e.commit(now).unwrap();
        let kinds = sent
            .iter()
            .map(|p| {
                let v: Value = serde_json::from_slice(&p.payload).unwrap();
                v.as_object()
                    .unwrap()
                    .keys()
                    .find(|k| *k != "device_id" && *k != "image_name")
                    .cloned()
                    .unwrap()
            })
            .collect();
        (kinds, *store.relaxed.lock().unwrap().last().unwrap())
    };
    let (kinds, relaxed) = step(
        format!("ESP32CAM/{A}/status"),
        json!({"device_id": A, "status": "alive", "pendingImg": 0}),
    );
    assert_eq!((kinds, relaxed), (vec!["capture_image".to_string()], true));
    let img = image(1, 200);
    let (kinds, relaxed) = step(
        format!("ESP32CAM/{A}/data"),
        json!({"device_id": A, "capture_timestamp": "2026-03-02T08:00:00Z", "image_name": "r.jpg",
               "image_size": 200, "max_chunk_size": 100, "total_chunks_count": 2, "error": 0}),
    );
    assert_eq!((kinds, relaxed), (vec!["send_image".to_string()], true));
    let (kinds, relaxed) = step(
        format!("ESP32CAM/{A}/data"),
        json!({"image_name": "r.jpg", "chunk_id": 1, "payload": &img[..100]}),
    );
    assert_eq!((kinds, relaxed), (vec![], true));
    let (kinds, relaxed) = step(
        format!("ESP32CAM/{A}/data"),
        json!({"image_name": "r.jpg", "chunk_id": 2, "payload": &img[100..]}),
    );
    assert_eq!(kinds, vec!["ACK_OK".to_string(), "next_wake".to_string()]);
    assert!(
        !relaxed,
        "the image and the next wake are durable before ACK_OK"
    );
}
