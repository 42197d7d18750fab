//! What lands in each upstream table: telemetry rows per capture, failed
//! captures with their status, device clocks that cannot be trusted, and
//! battery, wake and session columns.

use super::{backlog, commit_image, count, drain, failed_capture, t0, telemetry, LONG};
use crate::support::cloud::*;
use crate::support::*;
use barngate::store::{Batch, CaptureState, Finalize, Store};
use chrono::{DateTime, Duration as CDuration, TimeZone, Utc};
use std::sync::Arc;

/// Two captures stamped with the same device time used to share one
/// telemetry row (keyed by device and time): the second overwrote the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_captures_with_the_same_device_time_keep_two_telemetry_rows() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    let mac = "AABBCCDDEE21";
    commit_image(&store, 1, mac, "a.jpg", &image_bytes(1, 700), t0());
    // Same device time, other readings.
    let mut b = Batch::default();
    let mut t = telemetry(mac, 2, t0());
    t.temperature = Some(30.5);
    b.telemetry.push(t);
    store.commit(b, t0()).unwrap();
    assert_eq!(store.telemetry(mac).unwrap().len(), 2, "two rows locally");
    drain(&store, upstream_config(&pg, &objects), dir.path()).await;
    let c = pg.client().await;
    let rows = c
        .query(
            "SELECT gateway_capture_id, temperature, captured_at FROM device_telemetry
             WHERE device_mac = $1 ORDER BY gateway_capture_id",
            &[&mac],
        )
        .await
        .unwrap();
    let got: Vec<(i64, f64, DateTime<Utc>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(got, vec![(1, 21.5, t0()), (2, 30.5, t0())]);
}

/// A capture that failed after 3 rounds of missing-chunk requests used to
/// leave no row upstream; it arrives with its status, rounds, failures,
/// missing count and reason, and its row turns complete when it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_failed_after_3_rounds_has_a_row_with_status_failed() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    let mac = "AABBCCDDEE22";
    let mut b = Batch::default();
    b.capture(&failed_capture(7, mac, "lost.jpg", 5, 2, 3));
    store.commit(b, t0()).unwrap();
    assert_eq!(backlog(&store), 1, "the failed capture is queued");
    let cfg = upstream_config(&pg, &objects);
    drain(&store, cfg.clone(), dir.path()).await;
    let c = pg.client().await;
    let q = "SELECT status, retry_count, failures, missing_chunks, received_chunks, total_chunks,
                    failed_reason, object_key, gateway_capture_id
             FROM device_images WHERE device_mac = $1";
    let r = c.query_one(q, &[&mac]).await.unwrap();
    assert_eq!(r.get::<_, String>(0), "failed");
    assert_eq!(r.get::<_, i32>(1), 3, "rounds");
    assert_eq!(r.get::<_, i32>(2), 1, "failures");
    assert_eq!(r.get::<_, i32>(3), 3, "missing");
    assert_eq!(r.get::<_, i32>(4), 2);
    assert_eq!(r.get::<_, i32>(5), 5);
    assert!(r.get::<_, String>(6).contains("after 3 retries"));
    assert_eq!(r.get::<_, Option<String>>(7), None, "no object");
    assert_eq!(r.get::<_, i64>(8), 7);
    assert!(objects.keys("device-observations/").await.is_empty());

    // The device sends it again on a later wake and it completes.
    let bytes = image_bytes(7, 500);
    let mut cap = failed_capture(7, mac, "lost.jpg", 5, 5, 4);
    cap.state = CaptureState::Complete;
    cap.failed_reason = None;
    let mut b = Batch::default();
    b.capture(&cap);
    for i in 0..5u32 {
        b.chunk(
            7,
            i + 1,
            bytes[(i * 100) as usize..((i + 1) * 100) as usize].to_vec(),
        );
    }
    b.finalize.push(Finalize {
        capture_id: 7,
        chunk_ids: (1..=5).collect(),
    });
    assert!(store.commit(b, t0()).unwrap().failed.is_empty());
    drain(&store, cfg, dir.path()).await;
    let r = c.query_one(q, &[&mac]).await.unwrap();
    assert_eq!(r.get::<_, String>(0), "complete");
    assert_eq!(r.get::<_, i32>(1), 4);
    assert_eq!(r.get::<_, i32>(2), 1, "it failed once");
    assert_eq!(r.get::<_, i32>(3), 0);
    assert!(r.get::<_, Option<String>>(7).is_some());
    assert_eq!(count(&c, "SELECT count(*) FROM device_images").await, 1);
}

/// A device clock never set (1970) or far ahead used to pass through as
/// `captured_at`; now the device's time is kept in `captured_at_device`,
/// flagged, and `captured_at` is the gateway's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_clock_of_1970_is_flagged_and_captured_at_is_the_gateways() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    let mac = "AABBCCDDEE23";
    let epoch = Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 12).unwrap();
    let ahead = t0() + CDuration::days(3);
    for (id, at) in [(1u64, epoch), (2, ahead), (3, t0() - CDuration::days(4))] {
        commit_image(
            &store,
            id,
            mac,
            &format!("c{id}.jpg"),
            &image_bytes(id as u32, 300),
            at,
        );
        // The gateway first saw each at t0.
        let mut c = store.capture(id).unwrap().unwrap();
        c.first_seen_at = t0();
        let mut b = Batch::default();
        b.capture(&c);
        let mut t = telemetry(mac, id, at);
        t.received_at = t0();
        b.telemetry.push(t);
        store.commit(b, t0()).unwrap();
    }
    drain(&store, upstream_config(&pg, &objects), dir.path()).await;
    let c = pg.client().await;
    for table in ["device_images", "device_telemetry"] {
        let rows = c
            .query(
                &format!(
                    "SELECT captured_at, captured_at_device, device_time_valid FROM {table}
                     WHERE device_mac = $1 ORDER BY gateway_capture_id"
                ),
                &[&mac],
            )
            .await
            .unwrap();
        let got: Vec<(DateTime<Utc>, Option<DateTime<Utc>>, bool)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            got,
            vec![
                (t0(), Some(epoch), false),
                (t0(), Some(ahead), false),
                // Days old (an offline backlog) is believable.
                (
                    t0() - CDuration::days(4),
                    Some(t0() - CDuration::days(4)),
                    true
                ),
            ],
            "{table}"
        );
    }
}

/// What a device reports arrives in the column of its meaning: the HELLO's
/// and METADATA's `battery` is a percent, a voltage only when one was sent;
/// the hardware version, the Wi-Fi signal, the wake time and session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn battery_percent_lands_in_the_percent_column_and_wakes_are_recorded() {
    use serde_json::json;
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config();
    cfg.upstream = upstream_config(&pg, &objects);
    let gw = start_gateway(dir.path(), cfg).await;
    let store = gw.store.clone();
    let mac = "B8F862F9CF31";
    let mut d = Device::connect(gw.plain_addr.unwrap(), mac, false).await;
    let hello = json!({"device_id": mac, "status": "alive", "pendingImg": 0,
        "battery": 76.0, "battery_voltage": 3.91, "hardware_version": "ESP32-CAM rev2"});
    d.publish("status", hello.to_string().into_bytes()).await;
    d.expect("capture_image").await;
    let img = image_bytes(31, 1500);
    let mut m = d.metadata("a.jpg", &img, 500, "2026-03-01T08:00:00Z");
    m["battery"] = json!(75.0);
    m["wifi_rssi"] = json!(-61);
    d.publish("data", m.to_string().into_bytes()).await;
    d.expect("send_image").await;
    d.send_chunks("a.jpg", &img, 500, &[0, 1, 2]).await;
    d.expect("ACK_OK").await;
    eventually(LONG, "delivered", || {
        backlog(&store) == 0 && !store.images(Some(mac)).unwrap().is_empty()
    })
    .await;
    let c = pg.client().await;
    let r = c
        .query_one(
            "SELECT battery_percent, battery_voltage, hardware_version, last_wake_at
             FROM devices WHERE device_mac = $1",
            &[&mac],
        )
        .await
        .unwrap();
    let woke = store.sessions(mac).unwrap()[0].woke_at;
    assert_eq!(r.get::<_, Option<f64>>(0), Some(75.0), "latest percent");
    assert_eq!(
        r.get::<_, Option<f64>>(1),
        Some(3.91),
        "the HELLO's voltage"
    );
    assert_eq!(
        r.get::<_, Option<String>>(2).as_deref(),
        Some("ESP32-CAM rev2")
    );
    let last_wake: Option<DateTime<Utc>> = r.get(3);
    assert_eq!(
        last_wake.map(|t| t.timestamp_millis()),
        Some(woke.timestamp_millis())
    );
    let r = c
        .query_one(
            "SELECT battery_percent, battery_voltage, wifi_rssi, image_name, image_version
             FROM device_telemetry WHERE device_mac = $1",
            &[&mac],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, Option<f64>>(0), Some(75.0));
    assert_eq!(
        r.get::<_, Option<f64>>(1),
        None,
        "no voltage in this METADATA"
    );
    assert_eq!(r.get::<_, Option<i32>>(2), Some(-61));
    assert_eq!(r.get::<_, Option<String>>(3).as_deref(), Some("a.jpg"));
    assert_eq!(r.get::<_, Option<i32>>(4), Some(1));
    let r = c
        .query_one(
            "SELECT gateway_session_id, wifi_ok, mqtt_ok FROM device_wake_sessions
             WHERE device_mac = $1",
            &[&mac],
        )
        .await
        .unwrap();
    assert_eq!(
        r.get::<_, String>(0),
        format!("{mac}-{}", woke.timestamp_millis())
    );
    assert!(r.get::<_, bool>(1) && r.get::<_, bool>(2));
    gw.shutdown().await.unwrap();
}
