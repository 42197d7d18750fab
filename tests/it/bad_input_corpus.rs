//! A corpus of bad input, one class at a time, sent over real MQTT to an
//! in-process gateway while a good device delivers an image concurrently.
//! Each class must be dropped with its own rejection reason counted (the
//! warn! log line carries the same error), and the good image must arrive
//! byte-exact.

use crate::support::*;
use rumqttc::QoS;
use serde_json::json;
use std::time::{Duration, Instant};

struct Class {
    name: &'static str,
    /// Topic (with `{id}` for the bad device's id).
    topic: &'static str,
    payload: Vec<u8>,
    reason: &'static str,
    /// How many rejections the class produces.
    count: u64,
}

fn class(
    name: &'static str,
    topic: &'static str,
    payload: impl Into<Vec<u8>>,
    reason: &'static str,
) -> Class {
    Class {
        name,
        topic,
        payload: payload.into(),
        reason,
        count: 1,
    }
}

const S: &str = "ESP32CAM/{id}/status";
const D: &str = "ESP32CAM/{id}/data";

fn corpus() -> Vec<Class> {
    let chunk = |body: &str| format!(r#"{{"device_id":"x","image_name":"b2.jpg",{body}}}"#);
    let meta = |size: i64, mcs: i64, total: i64| {
        json!({"device_id":"x","image_name":"m.jpg","capture_timestamp":"2025-01-03T10:00:00Z",
               "image_size":size,"max_chunk_size":mcs,"total_chunks_count":total,"error":0})
        .to_string()
    };
    let mut deep = "[".repeat(5000);
    deep.push_str(&"]".repeat(5000));
    let one_mb_array = format!(
        r#"{{"image_name":"b2.jpg","chunk_id":1,"payload":{}}}"#,
        serde_json::to_string(&vec![7u8; 300_000]).unwrap()
    );
    let mut one_mb_garbage = vec![b'x'; 1_000_000]; // under the client's 1 MiB packet limit
    one_mb_garbage[0] = b'{';
    vec![
        class("status: not JSON", S, "not json", "malformed_json"),
        class("status: pendingImg wrong type", S, r#"{"device_id":"x","status":"alive","pendingImg":"three"}"#, "malformed_json"),
        class("status: pendingImg missing", S, r#"{"device_id":"x","status":"alive"}"#, "missing_field"),
        class("status: negative pendingImg", S, r#"{"device_id":"x","status":"alive","pendingImg":-3}"#, "invalid_field"),
        class("data: truncated JSON", D, r#"{"device_id":"x","image_name":"#, "malformed_json"),
        class("data: empty payload", D, "", "malformed_json"),
        class("data: not UTF-8", D, vec![0xff, 0xfe, 0x00, 0x80], "malformed_json"),
        class("data: top-level array", D, "[1,2,3]", "malformed_json"),
        class("data: nesting bomb", D, deep, "malformed_json"),
        class("data: neither METADATA nor CHUNK", D, r#"{"hello":"world"}"#, "unknown_message"),
        class("chunk: byte value > 255", D, chunk(r#""chunk_id":1,"payload":[1,2,300]"#), "malformed_json"),
        class("chunk: negative byte value", D, chunk(r#""chunk_id":1,"payload":[1,-2]"#), "malformed_json"),
        class("chunk: invalid base64", D, chunk(r#""chunk_id":1,"payload":"%%%notbase64""#), "malformed_json"),
        class("chunk: payload wrong type", D, chunk(r#""chunk_id":1,"payload":{"a":1}"#), "malformed_json"),
        class("chunk: negative chunk_id", D, chunk(r#""chunk_id":-4,"payload":[1]"#), "invalid_field"),
        class("chunk: huge chunk_id", D, chunk(r#""chunk_id":99999999999999,"payload":[1]"#), "invalid_field"),
        class("chunk: fractional chunk_id", D, chunk(r#""chunk_id":1.5,"payload":[1]"#), "malformed_json"),
        class("chunk: chunk_id as string", D, chunk(r#""chunk_id":"1","payload":[1]"#), "malformed_json"),
        class("chunk: image_name missing", D, r#"{"chunk_id":1,"payload":[1]}"#, "missing_field"),
        class("chunk: path traversal name", D, r#"{"image_name":"../../etc/passwd","chunk_id":1,"payload":[1]}"#, "invalid_field"),
        class("chunk: huge image name", D, format!(r#"{{"image_name":"{}","chunk_id":1,"payload":[1]}}"#, "n".repeat(5000)), "invalid_field"),
        class("chunk: id beyond the announced total", D, chunk(r#""chunk_id":999,"payload":[1]"#), "chunk_out_of_range"),
        class("chunk: payload larger than max_chunk_size", D, chunk(&format!(r#""chunk_id":1,"payload":{}"#, serde_json::to_string(&vec![1u8; 101]).unwrap())), "chunk_oversize"),
        class("chunk: 1 MB byte array", D, one_mb_array, "invalid_field"),
        class("data: 1 MB of garbage", D, one_mb_garbage, "malformed_json"),
        class("metadata: negative image_size", D, meta(-5, 100, 1), "invalid_field"),
        // Answered, not dropped: recorded as a camera failure and released.
        class("metadata: zero image_size", D, meta(0, 100, 0), "no_image"),
        // Accepted with the chunk count the size and chunk size give.
        class("metadata: size/total mismatch", D, meta(1000, 100, 3), "total_chunks_mismatch"),
        class("metadata: image_size over the limit", D, meta(2_000_000_000, 1000, 2_000_000), "invalid_field"),
        class("metadata: zero max_chunk_size", D, meta(1000, 0, 1), "invalid_field"),
        class("metadata: image_size wrong type", D, r#"{"device_id":"x","image_name":"m.jpg","capture_timestamp":"t","image_size":"big","max_chunk_size":100,"total_chunks_count":1,"error":0}"#, "malformed_json"),
        // The front enforces the topic rules: the connection is closed.
        class("topic: unknown channel", "ESP32CAM/{id}/weird", "{}", "publish_not_allowed"),
        class("topic: unknown prefix level count", "ESP32CAM/{id}/data/extra", "{}", "publish_not_allowed"),
        class("topic: device id too long", "ESP32CAM/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/status", r#"{"device_id":"x","status":"alive","pendingImg":0}"#, "publish_not_allowed"),
        class("topic: device id with bad characters", "ESP32CAM/dev ice!/status", r#"{"device_id":"x","status":"alive","pendingImg":0}"#, "publish_not_allowed"),
        Class {
            name: "flood: 2,000 bad messages from one device",
            topic: D,
            payload: b"{flood".to_vec(),
            reason: "malformed_json",
            count: 2000,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_class_of_bad_input_is_rejected_and_harms_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config();
    // Let 1 MB publishes through the broker so the gateway's own checks see them.
    cfg.mqtt.max_payload_size = 2 << 20;
    let gw = start_gateway(dir.path(), cfg).await;
    let plain = gw.plain_addr.unwrap();
    let mut bad = Device::connect(plain, "AABBCCDDEE08", false).await;
    // A known image on the bad device, for the range and size classes.
    bad.hello(0).await;
    bad.expect("capture_image").await;
    bad.send_metadata("b2.jpg", &image_bytes(9, 500), 100, "2025-01-03T10:00:00Z")
        .await;
    bad.expect("send_image").await;

    // The good device delivers concurrently.
    let mut good = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE07", false).await;
    let img = image_bytes(8, 30_000);
    let good_img = img.clone();
    let good_task = tokio::spawn(async move {
        good.hello(0).await;
        good.expect("capture_image").await;
        good.send_metadata("good.jpg", &good_img, 512, "2025-01-03T10:00:00Z")
            .await;
        good.expect("send_image").await;
        for i in 0..good_img.len().div_ceil(512) {
            good.send_chunks("good.jpg", &good_img, 512, &[i]).await;
            tokio::task::yield_now().await;
        }
        good.expect("ACK_OK").await;
    });

    let classes = corpus();
    assert!(classes.len() >= 20);
    for c in &classes {
        let before = gw.metrics.rejected(c.reason);
        let total_before = gw.metrics.rejected_total();
        let topic = c.topic.replace("{id}", "AABBCCDDEE08");
        for _ in 0..c.count {
            bad.client
                .publish(topic.clone(), QoS::AtLeastOnce, false, c.payload.clone())
                .await
                .unwrap();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let now = gw.metrics.rejected(c.reason);
            if now >= before + c.count {
                assert_eq!(
                    gw.metrics.rejected_total() - total_before,
                    c.count,
                    "{}: rejected under another reason too\n{}",
                    c.name,
                    gw.metrics.render()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "class {:?} not rejected as {}\n{}",
                c.name,
                c.reason,
                gw.metrics.render()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if c.reason == "publish_not_allowed" {
            bad = Device::connect(plain, "AABBCCDDEE08", false).await;
        }
    }

    tokio::time::timeout(WAIT, good_task)
        .await
        .expect("good device finishes")
        .unwrap();
    let cap = gw
        .store
        .latest_capture("AABBCCDDEE07", "good.jpg")
        .unwrap()
        .unwrap();
    assert_eq!(gw.store.image_bytes(cap.id).unwrap().unwrap(), img);
    // The bad device's broker connection is still usable: nothing it sent
    // could take the gateway down.
    bad.hello(0).await;
    let _ = bad.recv().await;
    gw.shutdown().await.unwrap();
}
