//! End-to-end: real MQTT clients (rumqttc) over loopback against an
//! in-process gateway, for both dialects and the wake-session flow.

use crate::support::*;
use barngate::store::{CaptureState, Origin};
use serde_json::json;
use std::time::Duration;

fn is_firmware_time(s: &str) -> bool {
    // H:MMAM / H:MMPM
    let (hm, ampm) = s.split_at(s.len() - 2);
    let mut it = hm.split(':');
    let h: u32 = it.next().unwrap().parse().unwrap();
    let m = it.next().unwrap();
    (ampm == "AM" || ampm == "PM") && (1..=12).contains(&h) && m.len() == 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_online_wake_firmware_dialect() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(dir.path(), test_config()).await;
    let mut d = Device::connect(gw.plain_addr.unwrap(), "B8F862F9CFB8", false).await;
    d.hello(0).await;
    let (ch, v) = d.expect("capture_image").await;
    assert_eq!(ch, "cmd");
    assert_eq!(
        v,
        json!({"device_id": "B8F862F9CFB8", "capture_image": true})
    );
    let img = image_bytes(1, 5000);
    let ack = d
        .deliver("img_20250103_100000.jpg", &img, 128, "2025-01-03T10:00:00Z")
        .await;
    let next = ack["ACK_OK"]["next_wake_time"].as_str().unwrap();
    assert!(is_firmware_time(next), "{next}");
    assert_eq!(ack.as_object().unwrap().len(), 3, "exact fields: {ack}");
    // After the current capture: told to sleep.
    let (_, v) = d.expect("next_wake").await;
    assert_eq!(v["next_wake"], next);

    let images = gw.store.images(Some("B8F862F9CFB8")).unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].sha256.as_deref().unwrap(), sha256_hex(&img));
    assert_eq!(images[0].origin, Origin::Current);
    assert_eq!(gw.store.image_bytes(images[0].id).unwrap().unwrap(), img);
    let dev = gw.store.device("B8F862F9CFB8").unwrap().unwrap();
    assert!(dev.next_wake.is_some(), "next wake stored in the registry");
    let raw = images[0].raw_metadata.as_deref().unwrap();
    assert!(raw.contains("firmware_extra"), "unknown fields kept: {raw}");
    assert_eq!(
        gw.store.telemetry("B8F862F9CFB8").unwrap()[0].temperature,
        Some(22.5)
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_chunks_are_requested_exactly_until_ack() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(dir.path(), test_config()).await;
    let mut d = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE01", false).await;
    d.hello(0).await;
    d.expect("capture_image").await;
    let img = image_bytes(2, 3000);
    let name = "img_a.jpg";
    d.send_metadata(name, &img, 100, "2025-01-03T10:00:00Z")
        .await;
    d.expect("send_image").await;
    // 30 chunks (ids 1..=30); lose positions 4, 9 and 29 (ids 5, 10, 30 — the last).
    let sent: Vec<usize> = (0..30).filter(|i| ![4, 9, 29].contains(i)).collect();
    d.send_chunks(name, &img, 100, &sent).await;
    // The last index never arrived: the quiet gap triggers the request.
    let (ch, v) = d.expect("missing_chunks").await;
    assert_eq!(ch, "cmd", "firmware: missing_chunks on /cmd");
    assert_eq!(v["missing_chunks"], json!([5, 10, 30]));
    // Resend only one of them: the round's last id (30) arrives → targeted retry.
    d.send_chunks(name, &img, 100, &[29]).await;
    let (_, v) = d.expect("missing_chunks").await;
    assert_eq!(v["missing_chunks"], json!([5, 10]));
    d.send_chunks(name, &img, 100, &[4, 9]).await;
    let (_, ack) = d.expect("ACK_OK").await;
    assert_eq!(ack["image_name"], name);
    let cap = gw
        .store
        .latest_capture("AABBCCDDEE01", name)
        .unwrap()
        .unwrap();
    assert_eq!(cap.state, CaptureState::Complete);
    assert_eq!(cap.retries, 2);
    assert_eq!(gw.store.image_bytes(cap.id).unwrap().unwrap(), img);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_of_five_drained_one_by_one_then_new_capture() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(dir.path(), test_config()).await;
    let mut d = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE02", false).await;
    d.hello(5).await;
    // Firmware dialect: ACK_OK is the cue to send the oldest pending image.
    let (ch, cue) = d.expect("ACK_OK").await;
    assert_eq!(ch, "ack");
    assert!(cue["ACK_OK"]["next_wake_time"].is_string());
    let mut sent = Vec::new();
    for day in 0..5 {
        let img = image_bytes(10 + day, 2000 + day as usize * 10);
        let name = format!("img_2025010{}_080000.jpg", day + 1);
        let ts = format!("2025-01-0{}T08:00:00Z", day + 1);
        d.deliver(&name, &img, 256, &ts).await;
        sent.push((name, img));
    }
    // Backlog drained: a new capture is requested.
    d.expect("capture_image").await;
    let img = image_bytes(99, 4000);
    d.deliver("img_now.jpg", &img, 256, "2026-11-25T08:00:00Z")
        .await;
    d.expect("next_wake").await;
    let images = gw.store.images(Some("AABBCCDDEE02")).unwrap();
    assert_eq!(images.len(), 6);
    for (cap, (name, img)) in images.iter().zip(&sent) {
        assert_eq!(&cap.image_name, name, "oldest first");
        assert_eq!(cap.origin, Origin::Recovery);
        assert_eq!(gw.store.image_bytes(cap.id).unwrap().unwrap(), *img);
    }
    assert_eq!(images[5].origin, Origin::Current);
    let sessions = gw.store.sessions("AABBCCDDEE02").unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].pending_reported, 5);
    assert_eq!(sessions[0].images_completed, 6);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_dialect_zero_based_base64_iso_times() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(dir.path(), test_config()).await;
    let mut d = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE03", true).await;
    d.hello(0).await;
    let (ch, _) = d.expect("capture_image").await;
    assert_eq!(ch, "cmd");
    let img = image_bytes(3, 1500);
    let name = "image_001.jpg";
    d.send_metadata(name, &img, 128, "2025-08-29T14:30:00Z")
        .await;
    d.expect("send_image").await;
    let sent: Vec<usize> = (0..12).filter(|i| *i != 3).collect();
    d.send_chunks(name, &img, 128, &sent).await;
    let (ch, v) = d.expect("missing_chunks").await;
    assert_eq!(ch, "ack", "v1: missing_chunks on /ack");
    assert_eq!(v["missing_chunks"], json!([3]), "0-based ids");
    d.send_chunks(name, &img, 128, &[3]).await;
    let (ch, ack) = d.expect("ACK_OK").await;
    assert_eq!(ch, "ack");
    assert_eq!(ack["ACK_OK"], json!(true));
    let t = ack["next_wake_time"].as_str().unwrap();
    assert!(
        t.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(t).is_ok(),
        "{t}"
    );
    let (_, v) = d.expect("next_wake").await;
    assert_eq!(v["next_wake"], t);
    let cap = gw
        .store
        .latest_capture("AABBCCDDEE03", name)
        .unwrap()
        .unwrap();
    assert_eq!(gw.store.image_bytes(cap.id).unwrap().unwrap(), img);
    let dev = gw.store.device("AABBCCDDEE03").unwrap().unwrap();
    assert_eq!(dev.dialect, barngate::protocol::Dialect::V1);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_reordering_and_chunks_before_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(dir.path(), test_config()).await;
    let mut d = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE04", false).await;
    d.hello(0).await;
    d.expect("capture_image").await;
    let img = image_bytes(4, 2048);
    let name = "shuffled.jpg";
    // Five chunks arrive before their METADATA.
    d.send_chunks(name, &img, 128, &[15, 2, 7, 7, 0]).await;
    d.send_metadata(name, &img, 128, "2025-01-03T10:00:00Z")
        .await;
    // The gateway already has some: it asks only for what is missing.
    let (_, v) = d.expect("missing_chunks").await;
    let want: Vec<u32> = (1..=16).filter(|id| ![16, 3, 8, 1].contains(id)).collect();
    assert_eq!(v["missing_chunks"], json!(want));
    let mut rest: Vec<usize> = (0..16).filter(|i| ![15, 2, 7, 0].contains(i)).collect();
    rest.reverse();
    rest.extend([5, 5, 9]); // duplicates
    d.send_chunks(name, &img, 128, &rest).await;
    let (_, ack) = d.expect("ACK_OK").await;
    assert_eq!(ack["image_name"], name);
    let cap = gw
        .store
        .latest_capture("AABBCCDDEE04", name)
        .unwrap()
        .unwrap();
    assert_eq!(gw.store.image_bytes(cap.id).unwrap().unwrap(), img);
    // A repeated METADATA for the complete image is re-ACKed, not stored twice.
    d.expect("next_wake").await;
    d.send_metadata(name, &img, 128, "2025-01-03T10:00:00Z")
        .await;
    let (_, ack) = d.expect("ACK_OK").await;
    assert_eq!(ack["image_name"], name);
    assert_eq!(gw.store.images(Some("AABBCCDDEE04")).unwrap().len(), 1);
    // Same name, different image: kept as a new version.
    d.expect("next_wake").await;
    let img2 = image_bytes(5, 700);
    d.deliver(name, &img2, 128, "2025-01-04T10:00:00Z").await;
    let images = gw.store.images(Some("AABBCCDDEE04")).unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[1].version, 2);
    assert_eq!(gw.store.image_bytes(images[0].id).unwrap().unwrap(), img);
    assert_eq!(gw.store.image_bytes(images[1].id).unwrap().unwrap(), img2);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_limit_reached_marks_failed_and_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(dir.path(), test_config()).await;
    let mut d = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE05", false).await;
    d.hello(0).await;
    d.expect("capture_image").await;
    let img = image_bytes(6, 1000);
    let name = "never.jpg";
    d.send_metadata(name, &img, 100, "2025-01-03T10:00:00Z")
        .await;
    d.expect("send_image").await;
    d.send_chunks(name, &img, 100, &[0, 1, 3, 4, 5, 6, 7, 8, 9])
        .await;
    for round in 1..=3 {
        let (_, v) = d.expect("missing_chunks").await;
        assert_eq!(v["missing_chunks"], json!([3]), "round {round}");
        // The device "resends" but chunk 3 is lost every time.
    }
    let (_, v) = d.expect("next_wake").await;
    assert!(v["next_wake"].is_string());
    let cap = gw
        .store
        .latest_capture("AABBCCDDEE05", name)
        .unwrap()
        .unwrap();
    assert_eq!(cap.state, CaptureState::Failed);
    assert_eq!(cap.retries, 3);
    let alerts = gw.store.alerts().unwrap();
    assert!(
        alerts
            .iter()
            .any(|a| a.kind == "image_failed" && a.mac == "AABBCCDDEE05"),
        "{alerts:?}"
    );
    // Next wake: the device announces it again and sends the one missing chunk.
    d.hello(1).await;
    d.expect("ACK_OK").await;
    d.send_metadata(name, &img, 100, "2025-01-03T10:00:00Z")
        .await;
    let (_, v) = d.expect("missing_chunks").await;
    assert_eq!(v["missing_chunks"], json!([3]), "no full re-upload");
    d.send_chunks(name, &img, 100, &[2]).await;
    d.expect("ACK_OK").await;
    let cap = gw
        .store
        .latest_capture("AABBCCDDEE05", name)
        .unwrap()
        .unwrap();
    assert_eq!(cap.state, CaptureState::Complete);
    assert!(
        gw.store
            .alerts()
            .unwrap()
            .iter()
            .all(|a| a.resolved_at.is_some()),
        "alert resolved"
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restart_mid_image_resumes_with_missing_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_bytes(7, 6400);
    let name = "half.jpg";
    {
        let mut cfg = test_config();
        cfg.ingest.quiet_gap_ms = 60_000; // no retry round before the restart
        let gw = start_gateway(dir.path(), cfg).await;
        let mut d = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE06", false).await;
        d.hello(0).await;
        d.expect("capture_image").await;
        d.send_metadata(name, &img, 128, "2025-01-03T10:00:00Z")
            .await;
        d.expect("send_image").await;
        let first_half: Vec<usize> = (0..25).collect();
        d.send_chunks(name, &img, 128, &first_half).await;
        // Wait until the gateway has seen them, then stop it.
        let deadline = std::time::Instant::now() + WAIT;
        while gw.metrics.chunks.load(std::sync::atomic::Ordering::Relaxed) < 25 {
            assert!(std::time::Instant::now() < deadline, "chunks not received");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gw.shutdown().await.unwrap();
    }
    let gw = start_gateway(dir.path(), test_config()).await;
    let mut d = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE06", false).await;
    d.hello(1).await;
    d.expect("ACK_OK").await;
    d.send_metadata(name, &img, 128, "2025-01-03T10:00:00Z")
        .await;
    let (_, v) = d.expect("missing_chunks").await;
    let want: Vec<u32> = (26..=50).collect();
    assert_eq!(v["missing_chunks"], json!(want), "only the second half");
    let second: Vec<usize> = (25..50).collect();
    d.send_chunks(name, &img, 128, &second).await;
    d.expect("ACK_OK").await;
    let cap = gw
        .store
        .latest_capture("AABBCCDDEE06", name)
        .unwrap()
        .unwrap();
    assert_eq!(gw.store.image_bytes(cap.id).unwrap().unwrap(), img);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_counted_and_harms_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(dir.path(), test_config()).await;
    let mut good = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE07", false).await;
    let bad = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE08", false).await;
    good.hello(0).await;
    good.expect("capture_image").await;
    let img = image_bytes(8, 3000);
    good.send_metadata("good.jpg", &img, 100, "2025-01-03T10:00:00Z")
        .await;
    good.expect("send_image").await;
    let half: Vec<usize> = (0..15).collect();
    good.send_chunks("good.jpg", &img, 100, &half).await;
    let bads: Vec<&str> = vec![
        "not json",
        r#"{"device_id":"x","status":"alive","pendingImg":"three"}"#,
        r#"{"device_id":"x","status":"alive"}"#,
        r#"{"device_id":"x","image_name":"good.jpg","capture_timestamp":"t","image_size":1000,"max_chunk_size":100,"total_chunks_count":3,"error":0}"#,
        r#"{"device_id":"x","image_name":"b.jpg","chunk_id":1,"payload":[1,2,300]}"#,
        r#"{"device_id":"x","image_name":"b.jpg","chunk_id":1,"payload":"%%%notbase64"}"#,
        r#"{"device_id":"x","image_name":"b.jpg","chunk_id":-4,"payload":[1]}"#,
        r#"{"device_id":"x","image_name":"../../etc/passwd","chunk_id":1,"payload":[1]}"#,
        r#"{"hello":"world"}"#,
    ];
    for (i, b) in bads.iter().enumerate() {
        let ch = if i < 3 { "status" } else { "data" };
        bad.publish(ch, b.as_bytes().to_vec()).await;
    }
    // Chunk ids out of range for a known image.
    bad.hello(0).await;
    let img_b = image_bytes(9, 500);
    bad.send_metadata("b2.jpg", &img_b, 100, "2025-01-03T10:00:00Z")
        .await;
    bad.publish(
        "data",
        br#"{"device_id":"x","image_name":"b2.jpg","chunk_id":999,"payload":[1]}"#.to_vec(),
    )
    .await;
    bad.publish(
        "data",
        format!(
            r#"{{"device_id":"x","image_name":"b2.jpg","chunk_id":1,"payload":{}}}"#,
            serde_json::to_string(&vec![1u8; 101]).unwrap()
        )
        .into_bytes(),
    )
    .await;
    // An oversize image announcement.
    let huge = serde_json::json!({"device_id":"x","image_name":"huge.jpg","capture_timestamp":"t","image_size": 2_000_000_000u64,"max_chunk_size":1000,"total_chunks_count":2_000_000,"error":0});
    bad.publish("data", huge.to_string().into_bytes()).await;
    // An unknown topic under its own prefix: the front closes the connection.
    bad.client
        .publish(
            "ESP32CAM/AABBCCDDEE08/weird",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    // The good device finishes unharmed.
    let rest: Vec<usize> = (15..30).collect();
    good.send_chunks("good.jpg", &img, 100, &rest).await;
    good.expect("ACK_OK").await;
    let cap = gw
        .store
        .latest_capture("AABBCCDDEE07", "good.jpg")
        .unwrap()
        .unwrap();
    assert_eq!(gw.store.image_bytes(cap.id).unwrap().unwrap(), img);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let m = &gw.metrics;
        let ok = m.rejected("malformed_json") >= 3
            && m.rejected("missing_field") >= 1
            && m.rejected("invalid_field") >= 3
            && m.rejected("total_chunks_mismatch") >= 1
            && m.rejected("unknown_message") >= 1
            && m.rejected("chunk_out_of_range") >= 1
            && m.rejected("chunk_oversize") >= 1
            && m.rejected("publish_not_allowed") >= 1;
        if ok {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", m.render());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = gw.metrics.render();
    assert!(
        body.contains("barngate_rejected_total{reason=\"malformed_json\"}"),
        "{body}"
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_reconnecting_mid_image_resumes_without_full_reupload() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config();
    cfg.ingest.quiet_gap_ms = 60_000; // the device vanishes before any retry round
    let gw = start_gateway(dir.path(), cfg).await;
    let img = image_bytes(11, 5000);
    let name = "interrupted.jpg";
    {
        let mut d = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE09", false).await;
        d.hello(0).await;
        d.expect("capture_image").await;
        d.send_metadata(name, &img, 250, "2025-01-03T10:00:00Z")
            .await;
        d.expect("send_image").await;
        d.send_chunks(name, &img, 250, &(0..12).collect::<Vec<_>>())
            .await;
        let deadline = std::time::Instant::now() + WAIT;
        while gw.metrics.chunks.load(std::sync::atomic::Ordering::Relaxed) < 12 {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d.client.disconnect().await.unwrap();
    }
    let mut d = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE09", false).await;
    d.hello(1).await;
    d.expect("ACK_OK").await;
    d.send_metadata(name, &img, 250, "2025-01-03T10:00:00Z")
        .await;
    let (_, v) = d.expect("missing_chunks").await;
    assert_eq!(v["missing_chunks"], json!((13..=20).collect::<Vec<u32>>()));
    d.send_chunks(name, &img, 250, &(12..20).collect::<Vec<_>>())
        .await;
    d.expect("ACK_OK").await;
    let cap = gw
        .store
        .latest_capture("AABBCCDDEE09", name)
        .unwrap()
        .unwrap();
    assert_eq!(gw.store.image_bytes(cap.id).unwrap().unwrap(), img);
    assert_eq!(
        cap.origin,
        Origin::Current,
        "a capture requested in its session"
    );
    gw.shutdown().await.unwrap();
}

/// A device whose connection drops mid-image frees its streaming slot at
/// once: the device waiting for the slot is told to stream right away, not
/// after the dropped one's retry rounds time out, and the dropped image
/// raises no `image_failed` (it is parked, resumed at the next wake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_frees_the_streaming_slot_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config();
    cfg.ingest.max_streaming = 1;
    let gw = start_gateway(dir.path(), cfg).await;
    let addr = gw.plain_addr.unwrap();
    let mut a = Device::connect(addr, "AABBCCDDEE21", false).await;
    a.hello(0).await;
    a.expect("capture_image").await;
    let img_a = image_bytes(21, 3000);
    a.send_metadata("a.jpg", &img_a, 100, "2025-01-03T10:00:00Z")
        .await;
    a.expect("send_image").await;
    a.send_chunks("a.jpg", &img_a, 100, &[0, 1, 2]).await;
    let mut b = Device::connect(addr, "AABBCCDDEE22", false).await;
    b.hello(0).await;
    b.expect("capture_image").await;
    let img_b = image_bytes(22, 2000);
    b.send_metadata("b.jpg", &img_b, 100, "2025-01-03T10:00:00Z")
        .await;
    b.expect_silence(Duration::from_millis(400)).await;
    a.client.disconnect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), b.expect("send_image"))
        .await
        .expect("the slot is handed on at once");
    let all: Vec<usize> = (0..20).collect();
    b.send_chunks("b.jpg", &img_b, 100, &all).await;
    b.expect("ACK_OK").await;
    assert!(
        gw.metrics
            .sessions_ended
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    let alerts = gw.store.alerts().unwrap();
    assert!(
        alerts
            .iter()
            .all(|x| !(x.mac == "AABBCCDDEE21" && x.kind == "image_failed")),
        "{alerts:?}"
    );
    let cap = gw
        .store
        .latest_capture("AABBCCDDEE21", "a.jpg")
        .unwrap()
        .unwrap();
    assert_ne!(cap.state, CaptureState::Failed);
    gw.shutdown().await.unwrap();
}
