//! MQTT 3.1.1 conformance of device sessions, which the embedded broker
//! serves (rumqttd, vendored with the fixes in `vendor/rumqttd/PATCHES.md`)
//! behind the front, checked over real mutual TLS with raw MQTT packets: a
//! device certificate issued by the gateway's CLI, the gateway's own TLS
//! listener, and packets written and read byte by byte. Mosquitto 2.0's
//! behaviour is the reference where MQTT 3.1.1 leaves a choice.
//!
//! Every session, clean (the firmware's) or persistent, goes through the
//! broker. A device may publish only to its own
//! `…/status` and `…/data` and subscribe only to its own `…/cmd` and
//! `…/ack`; the ingest answers a HELLO with `capture_image` and a METADATA
//! with `send_image`, on `…/cmd`: those answers show which publishes the
//! broker delivered, and when.

use crate::support::raw::{
    hello, id_packet, publish, pubrel, Raw, PUBACK, PUBCOMP, PUBREC, SUBACK, UNSUBACK,
};
use crate::support::*;
use barngate::server::Gateway;
use rumqttd::protocol::{Packet, QoS, Unsubscribe};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A gateway (TLS listener only) and a device certificate for `mac`.
struct Site {
    gw: Gateway,
    certs: DeviceCerts,
    _data: tempfile::TempDir,
    _out: tempfile::TempDir,
}

async fn site(mac: &str) -> Site {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    cli(
        data.path(),
        &[
            "device",
            "issue",
            mac,
            "--out",
            out.path().to_str().unwrap(),
        ],
    );
    let certs = DeviceCerts::load(out.path(), mac);
    Site {
        gw,
        certs,
        _data: data,
        _out: out,
    }
}

impl Site {
    async fn open(&self) -> Raw {
        Raw::open_tls(self.gw.mqtt_addr, &self.certs).await
    }

    /// Waits until the gateway has no device connected (a reconnect must
    /// find the previous session saved, not still closing).
    async fn all_disconnected(&self) {
        let deadline = Instant::now() + WAIT;
        while self.gw.metrics.connections.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < deadline, "still connected");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A METADATA announcing image `name`; the ingest answers `send_image`.
fn metadata(mac: &str, name: &str) -> Vec<u8> {
    json!({
        "device_id": mac,
        "capture_timestamp": "2026-01-01T00:00:00Z",
        "image_name": name,
        "image_size": 4000,
        "max_chunk_size": 1000,
        "total_chunks_count": 4,
        "location": "Barn 1",
        "error": 0,
        "temperature": 22.5,
        "humidity": 50.2,
        "pressure": 1013.2,
        "gas_resistance": 120.5
    })
    .to_string()
    .into_bytes()
}

fn status(mac: &str) -> String {
    format!("ESP32CAM/{mac}/status")
}

fn data(mac: &str) -> String {
    format!("ESP32CAM/{mac}/data")
}

fn cmd(mac: &str) -> String {
    format!("ESP32CAM/{mac}/cmd")
}

/// A session (clean or persistent), subscribed to its `…/cmd` at QoS 0,
/// after its first HELLO was answered (so that the ingest knows the device
/// and answers its METADATA).
async fn device(site: &Site, mac: &str, clean: bool) -> Raw {
    let mut d = site.open().await;
    d.connect(mac, clean).await;
    assert_eq!(d.subscribe(1, &[(&cmd(mac), QoS::AtMostOnce)]).await, [0]);
    d.send(&publish(&status(mac), &hello(mac), 0, false, false, 0))
        .await;
    let (_, _, v) = d.publish().await;
    assert!(v.get("capture_image").is_some(), "HELLO answered: {v}");
    d
}

/// The image the next `send_image` on `…/cmd` asks for.
async fn send_image(d: &mut Raw) -> String {
    let (_, _, v) = d.publish().await;
    v["send_image"]
        .as_str()
        .unwrap_or_else(|| panic!("expected send_image, got {v}"))
        .to_string()
}

/// Finding: a QoS 2 PUBLISH re-sent with DUP before the PUBREL was
/// recorded twice by rumqttd, so that the copy was delivered by the next
/// PUBREL: twice in all. MQTT-4.3.3-2: the receiver stores the packet id
/// until the PUBREL and must not deliver the message again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publish_resent_with_dup_before_pubrel_is_delivered_once() {
    let mac = "AABBCCEE0101";
    let site = site(mac).await;
    let mut d = device(&site, mac, true).await;
    d.send(&qos2_metadata(mac, "a.jpg", 7, false)).await;
    d.expect_frame(&id_packet(PUBREC << 4, 7)).await;
    d.send(&qos2_metadata(mac, "a.jpg", 7, true)).await;
    d.expect_frame(&id_packet(PUBREC << 4, 7)).await;
    d.send(&pubrel(7)).await;
    d.expect_frame(&id_packet(PUBCOMP << 4, 7)).await;
    assert_eq!(send_image(&mut d).await, "a.jpg");
    // The next QoS 2 message is the one its PUBREL delivers, not the copy.
    d.send(&qos2_metadata(mac, "b.jpg", 8, false)).await;
    d.expect_frame(&id_packet(PUBREC << 4, 8)).await;
    d.send(&pubrel(8)).await;
    d.expect_frame(&id_packet(PUBCOMP << 4, 8)).await;
    assert_eq!(send_image(&mut d).await, "b.jpg");
    assert_eq!(site.gw.metrics.metadata.load(Ordering::Relaxed), 2);
    d.ping().await;
    site.gw.shutdown().await.unwrap();
}

/// Finding: rumqttd kept the QoS 2 messages waiting for their PUBREL in one
/// queue, and any PUBREL released the oldest. MQTT-4.3.3-2: a PUBREL
/// releases the message with its packet id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_pubrel_releases_the_message_with_its_packet_id() {
    let mac = "AABBCCEE0201";
    let site = site(mac).await;
    let mut d = device(&site, mac, true).await;
    for (name, pkid) in [("a.jpg", 7), ("b.jpg", 8)] {
        d.send(&qos2_metadata(mac, name, pkid, false)).await;
        d.expect_frame(&id_packet(PUBREC << 4, pkid)).await;
    }
    d.send(&pubrel(8)).await;
    d.expect_frame(&id_packet(PUBCOMP << 4, 8)).await;
    assert_eq!(send_image(&mut d).await, "b.jpg");
    d.send(&pubrel(7)).await;
    d.expect_frame(&id_packet(PUBCOMP << 4, 7)).await;
    assert_eq!(send_image(&mut d).await, "a.jpg");
    d.ping().await;
    site.gw.shutdown().await.unwrap();
}

/// Finding: rumqttd closed the connection on a PUBREL with no message
/// waiting for it. MQTT-3.6.4-1: the answer to a PUBREL is a PUBCOMP with
/// its packet id, whether or not a message was waiting (the PUBREL may be a
/// resend of one already completed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubrel_with_nothing_pending_is_answered_with_pubcomp() {
    let mac = "AABBCCEE0301";
    let site = site(mac).await;
    let mut d = device(&site, mac, true).await;
    d.send(&pubrel(42)).await;
    d.expect_frame(&id_packet(PUBCOMP << 4, 42)).await;
    // Completed, then released again: PUBCOMP again, nothing delivered twice.
    d.send(&qos2_metadata(mac, "a.jpg", 9, false)).await;
    d.expect_frame(&id_packet(PUBREC << 4, 9)).await;
    d.send(&pubrel(9)).await;
    d.expect_frame(&id_packet(PUBCOMP << 4, 9)).await;
    assert_eq!(send_image(&mut d).await, "a.jpg");
    d.send(&pubrel(9)).await;
    d.expect_frame(&id_packet(PUBCOMP << 4, 9)).await;
    d.ping().await;
    assert_eq!(site.gw.metrics.metadata.load(Ordering::Relaxed), 1);
    site.gw.shutdown().await.unwrap();
}

/// Finding: after a reconnect, the PUBREL a client must re-send for a QoS 2
/// publish it had sent before (MQTT-4.4.0-1) made rumqttd close the
/// connection, every time, and the message was lost with the connection.
/// A persistent session keeps the QoS 2 messages received and not yet
/// released (MQTT 3.1.1 §3.1.2.4), and the re-sent PUBREL completes the
/// delivery (MQTT-3.6.4-1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubrel_resent_after_reconnect_completes_the_qos2_delivery() {
    let mac = "AABBCCEE0401";
    let site = site(mac).await;
    let mut d = device(&site, mac, false).await;
    d.send(&qos2_metadata(mac, "a.jpg", 5, false)).await;
    d.expect_frame(&id_packet(PUBREC << 4, 5)).await;
    drop(d);
    site.all_disconnected().await;

    let mut d = site.open().await;
    assert!(d.connect(mac, false).await, "session present");
    d.send(&pubrel(5)).await;
    d.expect_frame(&id_packet(PUBCOMP << 4, 5)).await;
    assert_eq!(send_image(&mut d).await, "a.jpg");
    d.ping().await;
    site.gw.shutdown().await.unwrap();
}

/// Finding: rumqttd acknowledged a SUBSCRIBE to a filter the session was
/// already subscribed to with the new QoS, yet kept delivering at the old
/// one. MQTT-3.8.4-3: the new subscription replaces the old, at its QoS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribe_at_another_qos_replaces_the_subscription() {
    let mac = "AABBCCEE0501";
    let site = site(mac).await;
    let mut d = device(&site, mac, true).await;
    let mut pkid = 2;
    for qos in [QoS::AtLeastOnce, QoS::AtMostOnce, QoS::AtLeastOnce] {
        let granted = d.subscribe(pkid, &[(&cmd(mac), qos)]).await;
        assert_eq!(granted, [qos as u8]);
        d.send(&publish(&status(mac), &hello(mac), 0, false, false, 0))
            .await;
        let (first, id, v) = d.publish().await;
        assert!(v.get("capture_image").is_some(), "{v}");
        assert_eq!((first >> 1) & 3, qos as u8, "delivered at the new QoS");
        if let Some(id) = id {
            d.send(&id_packet(PUBACK << 4, id)).await;
        }
        pkid += 1;
    }
    d.ping().await;
    site.gw.shutdown().await.unwrap();
}

/// Finding: rumqttd answered an UNSUBSCRIBE of two filters with two
/// UNSUBACKs, and one of a filter not subscribed to with none.
/// MQTT-3.10.4-4/-5: exactly one UNSUBACK per UNSUBSCRIBE, even if no
/// filter matched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_gets_exactly_one_unsuback_even_for_unknown_filters() {
    let mac = "AABBCCEE0601";
    let site = site(mac).await;
    let ack = format!("ESP32CAM/{mac}/ack");
    for clean in [true, false] {
        let mut d = site.open().await;
        d.connect(mac, clean).await;
        d.subscribe(1, &[(&cmd(mac), QoS::AtLeastOnce), (&ack, QoS::AtMostOnce)])
            .await;
        let unsubscribe = |pkid: u16, filters: &[&String]| {
            Packet::Unsubscribe(
                Unsubscribe {
                    pkid,
                    filters: filters.iter().map(|f| f.to_string()).collect(),
                },
                None,
            )
        };
        // Two filters: one UNSUBACK (the PINGRESP comes right after it).
        d.send_packet(unsubscribe(2, &[&cmd(mac), &ack])).await;
        d.expect_frame(&id_packet(UNSUBACK << 4, 2)).await;
        d.ping().await;
        // Neither is subscribed any more: still one UNSUBACK.
        d.send_packet(unsubscribe(3, &[&cmd(mac)])).await;
        d.expect_frame(&id_packet(UNSUBACK << 4, 3)).await;
        d.send_packet(unsubscribe(4, &[&cmd(mac), &ack])).await;
        d.expect_frame(&id_packet(UNSUBACK << 4, 4)).await;
        d.ping().await;
        d.send(&[0xE0, 0x00]).await;
        assert!(d.next(WAIT).await.is_none(), "closed after DISCONNECT");
        site.all_disconnected().await;
    }
    site.gw.shutdown().await.unwrap();
}

/// Finding: when a device came back to its persistent session, rumqttd
/// re-sent the QoS 1 messages it had not acknowledged with DUP = 0.
/// MQTT-3.3.1-1: DUP is 1 when the server re-delivers a PUBLISH (and, set
/// by the server for each delivery, 0 on a first one: MQTT-3.3.1-3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_redelivers_unacknowledged_qos1_publish_with_dup() {
    let mac = "AABBCCEE0701";
    let site = site(mac).await;
    let mut d = site.open().await;
    d.connect(mac, false).await;
    d.subscribe(1, &[(&cmd(mac), QoS::AtLeastOnce)]).await;
    d.send(&publish(&status(mac), &hello(mac), 0, false, false, 0))
        .await;
    let (first, id, v) = d.publish().await;
    assert!(v.get("capture_image").is_some(), "{v}");
    assert_eq!(first, 0x32, "QoS 1, DUP 0 on the first delivery");
    assert!(id.is_some());
    // Gone without the PUBACK.
    drop(d);
    site.all_disconnected().await;

    // Twice: still not acknowledged after the first re-delivery.
    let mut resumed = 0;
    let mut d = loop {
        resumed += 1;
        let mut d = site.open().await;
        assert!(d.connect(mac, false).await, "session present");
        let (first, again, v2) = d.publish().await;
        assert_eq!(v2, v, "the same message");
        assert_eq!(first, 0x3A, "QoS 1 with DUP 1 on the re-delivery");
        if resumed == 2 {
            d.send(&id_packet(PUBACK << 4, again.unwrap())).await;
            break d;
        }
        drop(d);
        site.all_disconnected().await;
    };
    d.ping().await;
    // A new message after it is a first delivery again.
    d.send(&publish(&status(mac), &hello(mac), 0, false, false, 0))
        .await;
    let (first, id2, _) = d.publish().await;
    assert_eq!(first, 0x32, "DUP 0 on a first delivery");
    d.send(&id_packet(PUBACK << 4, id2.unwrap())).await;
    d.ping().await;
    site.gw.shutdown().await.unwrap();
}

/// Finding: a SUBSCRIBE whose fixed header flags were not the reserved
/// 0b0010 was accepted. MQTT-3.8.1-1 (and MQTT-3.10.1-1 for UNSUBSCRIBE,
/// MQTT-3.6.1-1 for PUBREL, MQTT-2.2.2-2): the server treats it as
/// malformed and closes the connection, in a clean session and a persistent
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_with_wrong_reserved_flags_close_the_connection() {
    let mac = "AABBCCEE0801";
    let site = site(mac).await;
    let filter = cmd(mac);
    let mut sub = vec![0x80, (2 + 2 + filter.len() + 1) as u8, 0x00, 0x01];
    sub.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    sub.extend_from_slice(filter.as_bytes());
    sub.push(0x01);
    let mut unsub = vec![0xA0, (2 + 2 + filter.len()) as u8, 0x00, 0x02];
    unsub.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    unsub.extend_from_slice(filter.as_bytes());
    let mut closed = 0u64;
    for clean in [true, false] {
        for (what, bad) in [
            ("SUBSCRIBE 0x80", sub.clone()),
            ("SUBSCRIBE 0x83", [&[0x83][..], &sub[1..]].concat()),
            ("UNSUBSCRIBE 0xA0", unsub.clone()),
            ("PUBREL 0x60", id_packet(0x60, 3).to_vec()),
        ] {
            let mut d = site.open().await;
            d.connect(mac, clean).await;
            d.send(&bad).await;
            match d.next(WAIT).await {
                None => {}
                Some((t, f)) => panic!("{what} (clean {clean}): answered {t} {f:02X?}"),
            }
            closed += 1;
            site.all_disconnected().await;
        }
    }
    assert_eq!(site.gw.metrics.rejected("malformed_mqtt"), closed);
    assert_eq!(
        site.gw.metrics.identity_violations.load(Ordering::Relaxed),
        0,
        "a malformed packet is no identity violation"
    );
    // The correct flags are accepted in both.
    for clean in [true, false] {
        let mut d = site.open().await;
        d.connect(mac, clean).await;
        let mut good = sub.clone();
        good[0] = 0x82;
        d.send(&good).await;
        d.expect(SUBACK).await;
        d.send(&pubrel(3)).await;
        d.expect_frame(&id_packet(PUBCOMP << 4, 3)).await;
        let mut good = unsub.clone();
        good[0] = 0xA2;
        d.send(&good).await;
        d.expect_frame(&id_packet(UNSUBACK << 4, 2)).await;
        drop(d);
        site.all_disconnected().await;
    }
    site.gw.shutdown().await.unwrap();
}

/// The gateway's WARN and ERROR lines (of all tests of this binary, from
/// the first call on), for the tests that check what a close is logged as.
/// The gateway logs from its own tasks and threads, so the subscriber is
/// the process's global one: a binary may install only one.
fn captured_log() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOG: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global tracing subscriber in this test binary");
        buf
    })
    .clone()
}

struct LogWriter(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Finding (fixed in the front before these tests, pinned here over mutual
/// TLS for clean and persistent sessions): a keep-alive expiry and a malformed packet were
/// logged as identity violations. Each is logged and counted as what it is
/// (`keepalive_timeout`, `malformed_mqtt`), and neither is an identity
/// violation (MQTT 3.1.1 §3.1.2.10, §4.8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_expiry_and_malformed_packets_are_logged_as_what_they_are() {
    let log = captured_log();
    let mac = "AABBCCEE0901";
    let site = site(mac).await;
    for clean in [true, false] {
        // Silent past 1.5 × a keep-alive of 1 s.
        let mut d = site.open().await;
        d.connect_keep_alive(mac, clean, 1).await;
        assert!(d.next(WAIT).await.is_none(), "closed on keep-alive expiry");
        site.all_disconnected().await;
        // A remaining length of five bytes.
        let mut d = site.open().await;
        d.connect(mac, clean).await;
        d.send(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).await;
        assert!(d.next(WAIT).await.is_none(), "closed on a malformed packet");
        site.all_disconnected().await;
    }
    let m = &site.gw.metrics;
    assert_eq!(m.rejected("keepalive_timeout"), 2);
    assert_eq!(m.rejected("malformed_mqtt"), 2);
    assert_eq!(m.identity_violations.load(Ordering::Relaxed), 0);
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let closes: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("barngate::front: connection closed") && l.contains(mac))
        .collect();
    assert_eq!(closes.len(), 4, "{closes:#?}");
    let expired = closes
        .iter()
        .filter(|l| l.contains("keep-alive expired") && l.contains("keepalive_timeout"))
        .count();
    let malformed = closes
        .iter()
        .filter(|l| l.contains("MQTT protocol error") && l.contains("malformed_mqtt"))
        .count();
    assert_eq!((expired, malformed), (2, 2), "{closes:#?}");
    assert!(
        !text
            .lines()
            .any(|l| l.contains(mac) && l.contains("identity violation")),
        "{text}"
    );
    site.gw.shutdown().await.unwrap();
}

/// A device's QoS 2 METADATA publish (not retained) for image `name`, with
/// packet id `pkid`, re-sent (`dup`) or not.
fn qos2_metadata(mac: &str, name: &str, pkid: u16, dup: bool) -> Vec<u8> {
    publish(&data(mac), &metadata(mac, name), 2, false, dup, pkid)
}
