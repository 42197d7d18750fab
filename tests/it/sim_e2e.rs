//! End-to-end in simulated time: simulated ESP32-CAM fleets against the real
//! ingest engine and store (GATEWAY.md §7 test plan).

use crate::support::sim::*;
use barngate::sim::{DialectMix, Outage, RestartKind};
use barngate::store::Origin;
use chrono::Duration;

#[test]
fn clean_online_both_dialects() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = fleet(dir.path(), 4);
    opts.dialect = DialectMix::Mixed;
    let mut sim = sim(dir.path(), opts, config());
    let s = sim.run_for(Duration::days(2)).unwrap();
    println!("{s}");
    assert!(s.totals.captured >= 4 * 4, "{s}");
    assert_eq!(s.totals.delivered, s.totals.captured, "{s}");
    assert_eq!(s.pending, 0);
    assert_eq!(s.totals.retry_rounds, 0);
    assert_eq!(s.totals.offline_wakes, 0);
    assert_eq!(s.totals.timeouts, 0, "{s}");
    assert_consistent(&sim);
}

#[test]
fn online_with_lost_duplicated_and_reordered_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = fleet(dir.path(), 4);
    opts.dialect = DialectMix::Mixed;
    opts.chunk_size = 128;
    opts.faults.loss_pct = 5.0;
    opts.faults.dup_pct = 2.0;
    opts.faults.reorder_pct = 5.0;
    let mut sim = sim(dir.path(), opts, config());
    let s = sim.run_for(Duration::days(2)).unwrap();
    println!("{s}");
    assert!(s.totals.chunks_lost > 0 && s.totals.retry_rounds > 0, "{s}");
    assert!((2.0..10.0).contains(&s.loss_pct()), "{s}");
    assert_eq!(
        s.totals.delivered, s.totals.captured,
        "every image completes by targeted resends: {s}"
    );
    assert_eq!(s.pending, 0);
    // Only missing chunks were asked for: never more than were lost, but
    // for chunks still in flight behind a round's last id that overtook
    // them (the gateway asks as soon as the last id arrives in order).
    let requested = sim
        .metrics()
        .missing_chunks_requested
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        requested <= s.totals.chunks_lost + s.totals.chunks_reordered,
        "requested {requested}, lost {}, reordered {}",
        s.totals.chunks_lost,
        s.totals.chunks_reordered
    );
    assert_consistent(&sim);
}

#[test]
fn five_days_offline_then_drained_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = fleet(dir.path(), 1);
    opts.max_drift = 0.0;
    let mut sim = sim(dir.path(), opts, config());
    // A day online to learn both daily wakes, then Wi-Fi down from day 1
    // 09:00 to day 6 12:00 (the start, day 0, is 07:00).
    let outage = Outage::parse("1.0834-6.2084", start()).unwrap();
    sim.faults_mut().outages.push(outage);
    sim.run_until(start() + Duration::hours(25)).unwrap();
    assert_eq!(sim.summary().pending, 0);
    sim.run_until(start() + Duration::hours(6 * 24 + 5))
        .unwrap();
    let s = sim.summary();
    let online_before = s.totals.delivered;
    assert_eq!(
        s.totals.offline_wakes, 10,
        "2 captures a day for 5 days: {s}"
    );
    assert_eq!(s.pending, 10);
    let d = &sim.devices()[0];
    assert_eq!(
        d.sd.pending_count().unwrap(),
        10,
        "pendingImg = lines of pendingImage.txt"
    );
    let queued = d.sd.pending().unwrap();
    sim.run_until(start() + Duration::days(8)).unwrap();
    let s = sim.summary();
    println!("{s}");
    assert_eq!(s.pending, 0, "{s}");
    assert_eq!(s.totals.delivered, s.totals.captured);
    let d = &sim.devices()[0];
    let after: Vec<String> = d.delivered_names[online_before as usize..].to_vec();
    assert_eq!(
        &after[..10],
        &queued[..],
        "backlog sent oldest first, one at a time"
    );
    let images = sim.store().images(Some(&d.params.id)).unwrap();
    let recovered: Vec<_> = images
        .iter()
        .filter(|c| c.origin == Origin::Recovery)
        .collect();
    assert_eq!(recovered.len(), 10);
    for (c, name) in recovered.iter().zip(&queued) {
        assert_eq!(&c.image_name, name);
    }
    assert!(d.sd.entries().unwrap().iter().all(|e| !e.pending));
    assert_consistent(&sim);
}

#[test]
fn hundred_devices_twice_daily_for_three_days_within_the_streaming_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.ingest.max_streaming = 3;
    cfg.schedule.window_minutes = 1; // everyone wakes inside one minute
    let mut opts = fleet(dir.path(), 100);
    opts.dialect = DialectMix::Mixed;
    opts.chunk_size = 1024;
    opts.chunk_interval = Duration::milliseconds(40);
    let t = std::time::Instant::now();
    let mut sim = sim(dir.path(), opts, cfg);
    let s = sim.run_for(Duration::days(3)).unwrap();
    println!("{s}\nwall {:?}", t.elapsed());
    assert!(s.totals.captured >= 100 * 6, "{s}");
    assert_eq!(s.totals.delivered, s.totals.captured, "{s}");
    assert_eq!(s.pending, 0);
    assert_eq!(s.totals.chunks_lost, 0);
    assert_eq!(s.totals.retry_rounds, 0, "{s}");
    assert_eq!(s.totals.timeouts, 0, "{s}");
    assert!(s.max_streaming <= 3, "{s}");
    assert_eq!(
        s.max_streaming, 3,
        "the limit was reached: back-pressure exercised"
    );
    assert_consistent(&sim);
}

#[test]
fn gateway_restart_during_a_drain() {
    for (dialect, kind) in [
        (DialectMix::Firmware, RestartKind::Crash),
        (DialectMix::V1, RestartKind::Graceful),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = fleet(dir.path(), 2);
        opts.dialect = dialect;
        opts.chunk_size = 128;
        opts.chunk_interval = Duration::milliseconds(30);
        let mut sim = sim(dir.path(), opts, config());
        sim.faults_mut()
            .outages
            .push(Outage::parse("0.1-2.1", start()).unwrap());
        sim.run_until(start() + Duration::hours(50)).unwrap();
        let backlog = sim.summary().pending;
        assert!(backlog >= 6, "{}", sim.summary());
        // Step until the drain is under way, then restart the gateway.
        let before = sim.summary().totals.delivered;
        loop {
            let now = sim.now();
            sim.run_until(now + Duration::milliseconds(200)).unwrap();
            if sim.summary().totals.delivered >= before + 2 {
                break;
            }
            assert!(
                sim.now() < start() + Duration::days(4),
                "drain never started"
            );
        }
        let now = sim.now();
        sim.schedule_restart(now + Duration::milliseconds(300), kind);
        let s = sim.run_for(Duration::days(2)).unwrap();
        println!("{dialect:?} {kind:?}: {s}");
        assert_eq!(s.gateway_restarts, 1);
        assert!(s.totals.disconnects >= 1, "{s}");
        assert_eq!(s.pending, 0, "{s}");
        assert_eq!(s.totals.delivered, s.totals.captured, "{s}");
        assert_consistent(&sim);
    }
}

#[test]
fn disconnects_mid_stream_resume_with_only_the_missing_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = fleet(dir.path(), 6);
    opts.dialect = DialectMix::Mixed;
    opts.chunk_size = 256;
    opts.faults.disconnect_pct = 30.0;
    let mut sim = sim(dir.path(), opts, config());
    let s = sim.run_for(Duration::days(2)).unwrap();
    assert!(s.totals.disconnects > 0, "{s}");
    assert_eq!(s.totals.delivered + s.pending, s.totals.captured, "{s}");
    assert_consistent(&sim);
    // The network heals: everything drains.
    sim.faults_mut().disconnect_pct = 0.0;
    let s = sim.run_for(Duration::days(2)).unwrap();
    println!("{s}");
    assert_eq!(s.pending, 0, "{s}");
    assert_eq!(s.totals.delivered, s.totals.captured);
    let resumed = sim
        .metrics()
        .missing_rounds
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        resumed > 0,
        "partly received images resumed with missing_chunks"
    );
    assert_consistent(&sim);
}
