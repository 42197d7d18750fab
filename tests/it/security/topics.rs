//! Identity-bound topics: another device's topics close the connection;
//! only well-formed device ids, and a bounded number of topic filters.

use super::{issue, mosquitto_pub};
use crate::support::*;
use std::path::Path;
use std::process::{Command, Output};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_devices_topics_close_the_connection() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let (a, b) = ("AABBCCDD0001", "AABBCCDD0002");
    issue(data.path(), a, out.path());
    let ca = out.path().join("ca.crt.pem");

    // mosquitto_pub as A to B's status: no PUBACK, connection closed.
    let r = mosquitto_pub(
        gw.mqtt_addr,
        Some((out.path(), a)),
        Some(&ca),
        a,
        &format!("ESP32CAM/{b}/status"),
        &hello(b),
    );
    assert!(!r.status.success(), "publish to another device's topic");
    rejected(&gw, "publish_not_allowed", 1).await;

    // rumqttc as A: a publish to B's data topic (other dialect) closes it.
    let certs = DeviceCerts::load(out.path(), a);
    let mut d = Device::connect_tls(gw.mqtt_addr, a, false, &certs).await;
    d.client
        .publish(
            format!("device/{b}/data"),
            rumqttc::QoS::AtLeastOnce,
            false,
            hello(b),
        )
        .await
        .unwrap();
    d.expect_disconnect(WAIT).await;
    rejected(&gw, "publish_not_allowed", 2).await;

    // Subscribing to B's commands closes it too.
    let mut d = Device::connect_tls(gw.mqtt_addr, a, false, &certs).await;
    d.client
        .subscribe(format!("ESP32CAM/{b}/cmd"), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    d.expect_disconnect(WAIT).await;
    rejected(&gw, "subscribe_not_allowed", 1).await;

    // A wildcard subscription with mosquitto_sub: refused the same way.
    let r = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &gw.mqtt_addr.port().to_string()])
        .args(["-i", a, "-t", "ESP32CAM/+/cmd", "-C", "1", "-W", "5"])
        .arg("--cafile")
        .arg(&ca)
        .arg("--cert")
        .arg(out.path().join(format!("{a}.crt.pem")))
        .arg("--key")
        .arg(out.path().join(format!("{a}.key.pem")))
        .output()
        .unwrap();
    assert!(!r.status.success());
    rejected(&gw, "subscribe_not_allowed", 2).await;

    // Nothing of it reached the ingest.
    assert!(gw.store.device(b).unwrap().is_none());
    assert_eq!(
        gw.metrics
            .messages_in
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    gw.shutdown().await.unwrap();
}

/// mosquitto_sub over TLS as `mac` with its certificate from `certs`, one
/// SUBSCRIBE carrying every filter in `topics`; waits at most 2 s for one
/// message.
fn mosquitto_sub(
    addr: std::net::SocketAddr,
    ca: &Path,
    certs: &Path,
    client_id: &str,
    mac: &str,
    topics: &[String],
) -> Output {
    let mut c = Command::new("mosquitto_sub");
    c.args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-i", client_id, "-C", "1", "-W", "2", "-q", "1"])
        .arg("--cafile")
        .arg(ca)
        .arg("--cert")
        .arg(certs.join(format!("{mac}.crt.pem")))
        .arg("--key")
        .arg(certs.join(format!("{mac}.key.pem")));
    for t in topics {
        c.args(["-t", t]);
    }
    c.output().expect("mosquitto_sub is installed (.ci/run)")
}

/// Finding: client ids and topics accepted any spelling that had 12 hex
/// digits once `:`/`-` were dropped and whitespace trimmed (mixed
/// separators, pairs run together), and names that are not MACs at all;
/// and a device could subscribe to any number of spellings of its own
/// topics, each a filter the broker keeps memory for. Only the three
/// spellings of a MAC are device ids now, and topic filters are capped per
/// SUBSCRIBE and per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_well_formed_device_ids_and_a_bounded_number_of_filters() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let ca = gw.pki.ca_cert_path();
    let mac = "AABBCCDD0401";
    issue(data.path(), mac, out.path());

    // Client ids: the accepted spellings connect (no message within the
    // wait: exit code 27); the others are refused.
    for id in [
        "AABBCCDD0401",
        "aabbccdd0401",
        "aa:bb:cc:dd:04:01",
        "AA-BB-CC-DD-04-01",
    ] {
        let r = mosquitto_sub(
            gw.mqtt_addr,
            &ca,
            out.path(),
            id,
            mac,
            &[format!("ESP32CAM/{mac}/cmd")],
        );
        assert_eq!(
            r.status.code(),
            Some(27),
            "{id}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    }
    let mut bad_ids = 0;
    for id in ["aa:bb-cc:dd-04:01", "AABB:CCDD:0401", "AA:BB:CCDD0401"] {
        let r = mosquitto_sub(
            gw.mqtt_addr,
            &ca,
            out.path(),
            id,
            mac,
            &[format!("ESP32CAM/{mac}/cmd")],
        );
        assert_ne!(r.status.code(), Some(27), "client id {id:?} accepted");
        bad_ids += 1;
        rejected(&gw, "bad_client_id", bad_ids).await;
    }
    // Topics: an ill-formed spelling of its own id is not its own topic.
    // (mosquitto_sub reconnects after a close that follows its CONNACK, so
    // these refusals show in the metrics, not in its exit code.)
    mosquitto_sub(
        gw.mqtt_addr,
        &ca,
        out.path(),
        mac,
        mac,
        &["ESP32CAM/aa:bb-cc:dd-04:01/cmd".into()],
    );
    rejected(&gw, "subscribe_not_allowed", 1).await;

    // Filters: eight spellings of its own topics in one SUBSCRIBE are
    // served; nine close the connection.
    let spellings: Vec<String> = [
        "AABBCCDD0401",
        "aabbccdd0401",
        "aa:bb:cc:dd:04:01",
        "AA:BB:CC:DD:04:01",
        "aa-bb-cc-dd-04-01",
        "AA-BB-CC-DD-04-01",
        "AaBbCcDd0401",
        "aA:bB:cC:dD:04:01",
        "aA-bB-cC-dD-04-01",
    ]
    .iter()
    .map(|id| format!("ESP32CAM/{id}/cmd"))
    .collect();
    let r = mosquitto_sub(gw.mqtt_addr, &ca, out.path(), mac, mac, &spellings[..8]);
    assert_eq!(
        r.status.code(),
        Some(27),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(gw.metrics.rejected("too_many_filters"), 0);
    mosquitto_sub(gw.mqtt_addr, &ca, out.path(), mac, mac, &spellings);
    rejected(&gw, "too_many_filters", 1).await;

    // Per connection: 2 (cmd, ack) + 8 + 6 distinct filters are served,
    // one more closes the connection.
    let certs = DeviceCerts::load(out.path(), mac);
    let mut d = Device::connect_tls(gw.mqtt_addr, mac, false, &certs).await;
    let more: Vec<String> = spellings[1..]
        .iter()
        .chain(spellings[1..].iter())
        .enumerate()
        .map(|(i, t)| {
            if i < 8 {
                t.clone()
            } else {
                t.replace("/cmd", "/ack")
            }
        })
        .collect();
    let filters = |ts: &[String]| {
        ts.iter()
            .map(|t| rumqttc::SubscribeFilter::new(t.clone(), rumqttc::QoS::AtLeastOnce))
            .collect::<Vec<_>>()
    };
    d.client.subscribe_many(filters(&more[..8])).await.unwrap();
    d.client
        .subscribe_many(filters(&more[8..14]))
        .await
        .unwrap();
    d.hello(0).await;
    d.expect("capture_image").await;
    d.client
        .subscribe_many(filters(&more[14..15]))
        .await
        .unwrap();
    d.expect_disconnect(WAIT).await;
    rejected(&gw, "too_many_filters", 2).await;
    gw.shutdown().await.unwrap();
}
