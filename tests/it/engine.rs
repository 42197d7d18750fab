//! The ingest engine driven directly in simulated time (no sockets): property
//! tests for chunk assembly, back-pressure, and staggered wakes of 1,000
//! devices.

use barngate::clock::{Clock, ManualClock};
use barngate::config::Config;
use barngate::ingest::{Engine, Publish};
use barngate::metrics::Metrics;
use barngate::schedule::Schedule;
use barngate::store::Store;
use chrono::{Duration, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;

fn engine(dir: &std::path::Path, cfg: &Config) -> Engine {
    let store = Arc::new(Store::open(&dir.join("db.redb")).unwrap());
    Engine::new(
        cfg.ingest.clone(),
        cfg.site.clone(),
        Schedule::new(&cfg.schedule, chrono_tz::Tz::UTC),
        store,
        Arc::new(Metrics::default()),
    )
    .unwrap()
}

fn hello(id: &str, pending: u32) -> (String, Vec<u8>) {
    (
        format!("ESP32CAM/{id}/status"),
        json!({"device_id": id, "status": "alive", "pendingImg": pending})
            .to_string()
            .into_bytes(),
    )
}

fn metadata(id: &str, name: &str, size: usize, chunk: usize) -> (String, Vec<u8>) {
    (
        format!("ESP32CAM/{id}/data"),
        json!({"device_id": id, "capture_timestamp": "2026-01-01T08:00:00Z", "image_name": name,
               "image_size": size, "max_chunk_size": chunk, "total_chunks_count": size.div_ceil(chunk), "error": 0})
        .to_string()
        .into_bytes(),
    )
}

fn chunk(id: &str, name: &str, img: &[u8], chunk: usize, pos: usize) -> (String, Vec<u8>) {
    let part = &img[pos * chunk..((pos + 1) * chunk).min(img.len())];
    (
        format!("ESP32CAM/{id}/data"),
        json!({"device_id": id, "image_name": name, "chunk_id": pos + 1, "max_chunk_size": chunk, "payload": part})
            .to_string()
            .into_bytes(),
    )
}

fn payloads(out: &[Publish]) -> Vec<Value> {
    out.iter()
        .map(|p| serde_json::from_slice(&p.payload).unwrap())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any order, any duplicates, chunks before or after METADATA: the stored
    /// image is byte-identical and ACKed once.
    #[test]
    fn assembly_is_order_and_duplicate_agnostic(
        img in proptest::collection::vec(any::<u8>(), 1..3000),
        chunk_size in 1usize..300,
        seed in any::<u64>(),
        dup_every in 1usize..5,
        meta_at in 0usize..10,
        // Chunks held in memory: none, some (spilled when over), all.
        held in prop_oneof![Just(0usize), 0usize..6000, Just(8usize << 20)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 1, 8, 0, 0).unwrap());
        let mut cfg = Config::default();
        cfg.ingest.held_chunk_bytes = held;
        let mut e = engine(dir.path(), &cfg);
        let n = img.len().div_ceil(chunk_size);
        // A deterministic shuffle with duplicates.
        let mut order: Vec<usize> = (0..n).collect();
        let mut x = seed | 1;
        for i in (1..order.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let dups: Vec<usize> = order.iter().step_by(dup_every).copied().collect();
        order.extend(dups);
        let (t, p) = hello("AABBCCDDEEFF", 0);
        e.handle(&t, &p, clock.now());
        let meta_pos = meta_at.min(order.len());
        let mut acks = 0;
        for (i, pos) in order.iter().enumerate() {
            if i == meta_pos {
                let (t, p) = metadata("AABBCCDDEEFF", "p.jpg", img.len(), chunk_size);
                e.handle(&t, &p, clock.now());
            }
            let (t, p) = chunk("AABBCCDDEEFF", "p.jpg", &img, chunk_size, *pos);
            e.handle(&t, &p, clock.now());
            acks += payloads(&e.commit(clock.now()).unwrap()).iter().filter(|v| v.get("ACK_OK").is_some()).count();
        }
        if meta_pos >= order.len() {
            let (t, p) = metadata("AABBCCDDEEFF", "p.jpg", img.len(), chunk_size);
            e.handle(&t, &p, clock.now());
            acks += payloads(&e.commit(clock.now()).unwrap()).iter().filter(|v| v.get("ACK_OK").is_some()).count();
        }
        prop_assert_eq!(acks, 1);
        let cap = e.store().latest_capture("AABBCCDDEEFF", "p.jpg").unwrap().unwrap();
        prop_assert_eq!(e.store().image_bytes(cap.id).unwrap().unwrap(), img);
        prop_assert!(e.store().chunk_lengths(cap.id).unwrap().is_empty(), "chunks dropped after assembly");
    }
}

/// Chunks of an unfinished image wait in memory (not in the database) and
/// the image is written once when it completes; a flush, a budget of 0 or
/// an exceeded budget puts them in the database as before.
#[test]
fn chunks_wait_in_memory_until_the_image_completes() {
    let img: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let cid = |e: &Engine| {
        e.store()
            .latest_capture("AABBCCDDEEFF", "h.jpg")
            .unwrap()
            .unwrap()
            .id
    };
    let start = |e: &mut Engine, now| {
        let (t, p) = hello("AABBCCDDEEFF", 0);
        e.handle(&t, &p, now);
        let (t, p) = metadata("AABBCCDDEEFF", "h.jpg", img.len(), 100);
        e.handle(&t, &p, now);
        e.commit(now).unwrap();
    };
    let send = |e: &mut Engine, range: std::ops::Range<usize>, now| {
        for pos in range {
            let (t, p) = chunk("AABBCCDDEEFF", "h.jpg", &img, 100, pos);
            e.handle(&t, &p, now);
        }
        e.commit(now).unwrap()
    };
    let now = Utc.with_ymd_and_hms(2026, 1, 1, 8, 0, 0).unwrap();
    for (budget, stored_early) in [(8usize << 20, 0..=0), (0, 10..=10), (500, 1..=9)] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.ingest.held_chunk_bytes = budget;
        let mut e = engine(dir.path(), &cfg);
        start(&mut e, now);
        send(&mut e, 0..10, now);
        let id = cid(&e);
        let held = e
            .metrics()
            .held_chunk_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let stored = e.store().chunk_lengths(id).unwrap().len();
        assert!(
            stored_early.contains(&stored),
            "budget {budget}: {stored} chunks in the database before the image completes"
        );
        assert!(held <= budget as u64, "budget {budget}: {held} held");
        let out = send(&mut e, 10..30, now);
        assert!(payloads(&out).iter().any(|v| v.get("ACK_OK").is_some()));
        assert_eq!(e.store().image_bytes(id).unwrap().unwrap(), img);
        assert!(e.store().chunk_lengths(id).unwrap().is_empty());
        assert_eq!(
            e.metrics()
                .held_chunk_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
    // A shutdown's flush writes what is held, so a restart resumes from it.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut e = engine(dir.path(), &Config::default());
        start(&mut e, now);
        send(&mut e, 0..12, now);
        e.flush(now).unwrap();
        assert_eq!(e.store().chunk_lengths(cid(&e)).unwrap().len(), 12);
    }
    let mut e = engine(dir.path(), &Config::default());
    start(&mut e, now);
    let out = send(&mut e, 12..30, now);
    assert!(payloads(&out).iter().any(|v| v.get("ACK_OK").is_some()));
    assert_eq!(e.store().image_bytes(cid(&e)).unwrap().unwrap(), img);
}

#[test]
fn streaming_slots_bound_concurrent_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.ingest.max_streaming = 2;
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 1, 8, 0, 0).unwrap());
    let mut e = engine(dir.path(), &cfg);
    let ids: Vec<String> = (0..5).map(|i| format!("AABBCCDDEE{i:02}")).collect();
    let img = vec![7u8; 1000];
    for id in &ids {
        let (t, p) = hello(id, 0);
        e.handle(&t, &p, clock.now());
        let (t, p) = metadata(id, "a.jpg", img.len(), 100);
        e.handle(&t, &p, clock.now());
    }
    let out = e.commit(clock.now()).unwrap();
    let granted: Vec<&str> = out
        .iter()
        .filter(|p| p.payload.windows(10).any(|w| w == b"send_image"))
        .map(|p| p.mac.as_str())
        .collect();
    assert_eq!(
        granted,
        vec![ids[0].as_str(), ids[1].as_str()],
        "only two may stream"
    );
    // As each finishes, the next waiting device gets its slot, in order.
    let mut streaming: Vec<String> = granted.iter().map(|s| s.to_string()).collect();
    let mut done = HashSet::new();
    while let Some(id) = streaming.first().cloned() {
        streaming.remove(0);
        for pos in 0..10 {
            let (t, p) = chunk(&id, "a.jpg", &img, 100, pos);
            e.handle(&t, &p, clock.now());
        }
        done.insert(id.clone());
        for p in e.commit(clock.now()).unwrap() {
            if p.payload.windows(10).any(|w| w == b"send_image") {
                streaming.push(p.mac.clone());
            }
        }
        assert!(streaming.len() <= 2);
    }
    assert_eq!(done.len(), 5, "every device got its turn");
}

#[test]
fn thousand_devices_wake_in_distinct_slots_inside_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::default();
    // Wakes at 10:00 UTC: the next slot is 16:00 + stagger, window 60 min.
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 1, 10, 0, 0).unwrap());
    let mut e = engine(dir.path(), &cfg);
    let img = [1u8, 2, 3];
    for i in 0..1000 {
        let id = format!("AABBCC{i:06X}");
        let (t, p) = hello(&id, 0);
        e.handle(&t, &p, clock.now());
        let (t, p) = metadata(&id, "a.jpg", img.len(), 100);
        e.handle(&t, &p, clock.now());
        let (t, p) = chunk(&id, "a.jpg", &img, 100, 0);
        e.handle(&t, &p, clock.now());
        let acked = e
            .commit(clock.now())
            .unwrap()
            .iter()
            .any(|p| p.payload.windows(6).any(|w| w == b"ACK_OK"));
        assert!(acked, "{id}");
    }
    let devices = e.store().devices().unwrap();
    assert_eq!(devices.len(), 1000);
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 16, 0, 0).unwrap();
    let mut seen = HashSet::new();
    for d in &devices {
        let w = d.next_wake.expect("next wake stored");
        assert!(w >= start && w < start + Duration::minutes(60), "{w}");
        assert!(seen.insert(w), "two devices share the wake {w}");
    }
}

/// The engine keeps only devices that are awake: ten minutes after its wake a
/// device's record leaves memory (it is in the store), and its next wake
/// works from the stored record.
#[test]
fn devices_between_wakes_leave_the_cache_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 1, 8, 0, 0).unwrap());
    let mut e = engine(dir.path(), &Config::default());
    let img: Vec<u8> = (0..700u32).map(|i| (i * 7) as u8).collect();
    let wake = |e: &mut Engine, id: &str, name: &str, now| {
        for (t, p) in [hello(id, 0), metadata(id, name, img.len(), 100)] {
            e.handle(&t, &p, now);
        }
        for pos in 0..7 {
            let (t, p) = chunk(id, name, &img, 100, pos);
            e.handle(&t, &p, now);
        }
        payloads(&e.commit(now).unwrap())
            .iter()
            .filter(|v| v.get("ACK_OK").is_some())
            .count()
    };
    let ids: Vec<String> = (0..20).map(|i| format!("AABBCCDD00{i:02X}")).collect();
    for id in &ids {
        assert_eq!(wake(&mut e, id, "a.jpg", clock.now()), 1, "{id}");
    }
    assert_eq!(e.cached_devices(), 20);
    clock.advance(Duration::minutes(11));
    e.tick(clock.now());
    assert_eq!(e.cached_devices(), 0, "idle devices stay cached");
    assert_eq!(wake(&mut e, &ids[3], "b.jpg", clock.now()), 1);
    assert_eq!(e.cached_devices(), 1);
}
