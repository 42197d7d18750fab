//! The front, packet by packet, with a raw MQTT 3.1.1 client on the
//! loopback plaintext listener (the same session code as TLS): a device's
//! QoS 0/1 publishes go to the ingest without the broker and the front
//! answers QoS 1 itself, waits for the broker's CONNACK and SUBACK before a
//! publish, keeps the device's keep-alive (0 included), carries retained
//! and QoS 2 publishes and wills through the broker, closes a session whose
//! broker never acknowledges it (`broker_timeout`), and the gateway's
//! replies reach clean and persistent sessions through the broker.

use crate::support::raw::{
    connect_packet, contains, encode, hello, parse_publish, publish, subscribe_packet, Raw,
};
use crate::support::*;
use rumqttd::protocol::{Connect, Packet, QoS};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_right_after_subscribe_gets_its_reply() {
    let data = tempfile::tempdir().unwrap();
    let gw = start_gateway(data.path(), test_config()).await;
    let addr = gw.plain_addr.unwrap();
    // CONNECT, SUBSCRIBE and HELLO in one write, as a hurried firmware does:
    // the front must not hand the HELLO to the ingest before the broker has
    // the subscription, or the reply would go nowhere.
    for n in 0..20 {
        let mac = format!("AABBCC00{n:04X}");
        let mut d = Raw::open(addr).await;
        let mut bytes = encode(vec![
            connect_packet(&mac, 30, true),
            subscribe_packet(1, &[(&format!("ESP32CAM/{mac}/cmd"), QoS::AtLeastOnce)]),
        ]);
        bytes.extend_from_slice(&publish(
            &format!("ESP32CAM/{mac}/status"),
            &hello(&mac),
            1,
            false,
            false,
            2,
        ));
        d.send(&bytes).await;
        // The reply and the front's PUBACK of the HELLO, in either order:
        // the broker may deliver the reply before the front writes the
        // PUBACKs of the pass that carried the HELLO.
        let (mut reply, mut acked) = (false, false);
        let seen = d
            .until(|t, f| {
                reply |= t == 3 && contains(f, "capture_image");
                acked |= t == 4;
                reply && acked
            })
            .await;
        let kinds: Vec<u8> = seen.iter().map(|(t, _)| *t).collect();
        assert_eq!(kinds[0], 2, "CONNACK first: {kinds:?}");
        assert!(kinds.contains(&9), "SUBACK: {kinds:?}");
        let puback = seen.iter().find(|(t, _)| *t == 4).expect("PUBACK");
        assert_eq!(
            &puback.1[..],
            &[0x40, 0x02, 0x00, 0x02],
            "PUBACK for packet 2"
        );
    }
    assert_eq!(gw.metrics.hellos.load(Ordering::Relaxed), 20);
    assert!(gw.metrics.render().contains("\nbarngate_ingest_queue "));
    gw.shutdown().await.unwrap();
}

/// The gateway's replies reach a clean and a persistent session through the
/// broker, at the QoS it granted, numbered by rumqttd; the device's PUBACKs
/// for them go back to the broker, and the session stays sound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_reach_clean_and_persistent_sessions_through_the_broker() {
    let data = tempfile::tempdir().unwrap();
    let gw = start_gateway(data.path(), test_config()).await;
    let addr = gw.plain_addr.unwrap();
    for (n, clean, qos) in [
        (1, true, QoS::AtLeastOnce),
        (2, true, QoS::AtMostOnce),
        (3, false, QoS::AtLeastOnce),
    ] {
        let mac = format!("AABBCC4400{n:02X}");
        let mut d = Raw::open(addr).await;
        d.send(&encode(vec![
            connect_packet(&mac, 30, clean),
            subscribe_packet(1, &[(&format!("ESP32CAM/{mac}/cmd"), qos)]),
        ]))
        .await;
        d.until(|t, _| t == 9).await;
        for _ in 0..3u16 {
            d.send(&publish(
                &format!("ESP32CAM/{mac}/status"),
                &hello(&mac),
                0,
                false,
                false,
                0,
            ))
            .await;
            let seen = d.until(|t, f| t == 3 && contains(f, "capture_image")).await;
            let (first, pkid, _) = parse_publish(&seen.last().unwrap().1);
            assert_eq!(first & 0x06, (qos as u8) << 1, "{mac}: granted QoS");
            if let Some(id) = pkid {
                assert!(id <= 100, "{mac}: rumqttd's id {id}");
                let [hi, lo] = id.to_be_bytes();
                d.send(&[0x40, 0x02, hi, lo]).await;
            }
            // The session is still sound: the broker answers a PINGREQ.
            d.send(&[0xC0, 0x00]).await;
            d.until(|t, _| t == 13).await;
        }
    }
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_and_qos2_publishes_reach_the_ingest() {
    let data = tempfile::tempdir().unwrap();
    let gw = start_gateway(data.path(), test_config()).await;
    let mac = "AABBCC110001";
    let mut d = Raw::open(gw.plain_addr.unwrap()).await;
    d.send(&encode(vec![
        connect_packet(mac, 30, true),
        subscribe_packet(1, &[(&format!("ESP32CAM/{mac}/cmd"), QoS::AtLeastOnce)]),
    ]))
    .await;
    d.until(|t, _| t == 9).await;
    // QoS 2: the broker answers PUBREC, then PUBCOMP
    // to our PUBREL; the ingest still gets the HELLO.
    d.send(&publish(
        &format!("ESP32CAM/{mac}/status"),
        &hello(mac),
        2,
        false,
        false,
        7,
    ))
    .await;
    d.until(|t, f| t == 5 && f[2..4] == [0, 7]).await;
    d.send(&[0x62, 0x02, 0x00, 0x07]).await;
    let seen = d.until(|t, f| t == 3 && contains(f, "capture_image")).await;
    let _ = seen;
    assert!(gw.store.device(mac).unwrap().is_some());
    // Retained (QoS 1): through the broker, whose PUBACK answers it.
    let hellos = gw.metrics.hellos.load(Ordering::Relaxed);
    d.send(&publish(
        &format!("ESP32CAM/{mac}/status"),
        &hello(mac),
        1,
        true,
        false,
        8,
    ))
    .await;
    d.until(|t, f| t == 4 && f[2..4] == [0, 8]).await;
    let deadline = Instant::now() + WAIT;
    while gw.metrics.hellos.load(Ordering::Relaxed) == hellos {
        assert!(Instant::now() < deadline, "retained HELLO not ingested");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_keeps_the_devices_keep_alive() {
    let data = tempfile::tempdir().unwrap();
    let gw = start_gateway(data.path(), test_config()).await;
    let addr = gw.plain_addr.unwrap();

    // Keep-alive 1 s and only publishes (no PINGREQ, as a busy client does):
    // the broker never sees them, yet it must not drop the session.
    let mac = "AABBCC220001";
    let mut busy = Raw::open(addr).await;
    busy.send(&encode(vec![connect_packet(mac, 1, true)])).await;
    busy.until(|t, _| t == 2).await;
    let start = Instant::now();
    let mut pkid = 1u16;
    while start.elapsed() < Duration::from_millis(2500) {
        busy.send(&publish(
            &format!("ESP32CAM/{mac}/status"),
            &hello(mac),
            1,
            false,
            false,
            pkid,
        ))
        .await;
        busy.until(|t, _| t == 4).await;
        pkid += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    drop(busy);
    let m = gw.metrics.clone();
    let deadline = Instant::now() + WAIT;
    while m.connections.load(Ordering::Relaxed) > 0 {
        assert!(Instant::now() < deadline, "busy device still connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(m.rejected("keepalive_timeout"), 0, "busy device kept");

    // Keep-alive 0 means none (MQTT 3.1.1 §3.1.2.10): silent, yet kept.
    let mut never = Raw::open(addr).await;
    never
        .send(&encode(vec![connect_packet("AABBCC220003", 0, true)]))
        .await;
    never.until(|t, _| t == 2).await;

    // Silent past 1.5 × keep-alive: the front closes it.
    let mut silent = Raw::open(addr).await;
    silent
        .send(&encode(vec![connect_packet("AABBCC220002", 1, true)]))
        .await;
    silent.until(|t, _| t == 2).await;
    let t0 = Instant::now();
    assert!(
        silent.next(Duration::from_secs(10)).await.is_none(),
        "closed"
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    assert_eq!(gw.metrics.rejected("keepalive_timeout"), 1);
    // The keep-alive 0 device, as silent for as long, still answers.
    never.send(&[0xC0, 0x00]).await; // PINGREQ
    let pong = never.until(|t, _| t == 13).await;
    assert!(pong.iter().any(|(t, _)| *t == 13), "PINGRESP");
    gw.shutdown().await.unwrap();
}

/// A front alone, on a plaintext loopback listener, whose broker has no room
/// for a device session, and whose ingest queue the test reads.
struct Bare {
    _front: barngate::front::Front,
    addr: SocketAddr,
    from_front: flume::Receiver<barngate::broker::Inbound>,
    metrics: std::sync::Arc<barngate::metrics::Metrics>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::watch::Sender<bool>,
    /// The link that takes the broker's one connection.
    _full: (rumqttd::local::LinkTx, rumqttd::local::LinkRx),
}

async fn bare_front() -> Bare {
    use barngate::front::{Front, FrontConfig};
    use barngate::metrics::Metrics;
    use std::sync::Arc;

    // Room for one connection, which the test's own link takes.
    let mut config = barngate::broker::rumqttd_config(&Default::default());
    config.router.max_connections = 1;
    let broker = rumqttd::Broker::new(config);
    let full = broker.link("full").unwrap();
    let attach = broker.attach();
    let (to_ingest, from_front) = barngate::broker::ingest_queue();
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let front = Front::new(
        FrontConfig {
            attach,
            ingest: to_ingest,
            max_connections: 4,
            max_handshakes: 4,
            max_handshakes_per_ip: 4,
            handshake_timeout: Duration::from_millis(300),
            max_packet_size: 1 << 16,
            passwords: barngate::devpass::PasswordStore::new(dir.path()),
            max_filters_per_subscribe: 8,
            max_filters_per_session: 16,
        },
        metrics.clone(),
        Default::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(front.clone().run_plain(listener, stop_rx));
    Bare {
        _front: front,
        addr,
        from_front,
        metrics,
        _dir: dir,
        _stop: stop,
        _full: full,
    }
}

/// If the broker does not admit the session (no room for another
/// connection), the device gets CONNACK 3 (server unavailable) at once, the
/// refusal is counted as `broker_refused`, and its publish never reaches the
/// ingest (its reply could not reach the device).
#[tokio::test]
async fn a_broker_without_room_refuses_the_connect_as_unavailable() {
    let bare = bare_front().await;
    let (addr, from_front, metrics) = (bare.addr, &bare.from_front, &bare.metrics);

    let mac = "AABBCC330001";
    let mut dev = Raw::open(addr).await;
    let mut first = encode(vec![connect_packet(mac, 30, true)]);
    first.extend_from_slice(&publish(
        &format!("ESP32CAM/{mac}/status"),
        &hello(mac),
        1,
        false,
        false,
        1,
    ));
    dev.send(&first).await;
    let (t, connack) = dev.next(WAIT).await.expect("a CONNACK");
    assert_eq!((t, &connack[..]), (2, &[0x20, 0x02, 0x00, 0x03][..]));
    assert!(dev.next(WAIT).await.is_none(), "then closed");
    assert_eq!(metrics.rejected("broker_refused"), 1);
    assert!(
        only_session_ends(from_front),
        "the publish did not reach the ingest"
    );
}

/// True when the front handed the ingest nothing but the ends of sessions.
fn only_session_ends(rx: &flume::Receiver<barngate::broker::Inbound>) -> bool {
    rx.try_iter()
        .all(|m| matches!(m.payload, barngate::broker::Payload::SessionEnded))
}

/// A session's will goes through the broker: published when the connection
/// drops without DISCONNECT (the ingest gets it, here a HELLO), not after a
/// DISCONNECT. The CONNACK accepts a clean session with no session present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_will_is_published_on_a_drop_and_not_after_disconnect() {
    use rumqttd::protocol::LastWill;
    let data = tempfile::tempdir().unwrap();
    let gw = start_gateway(data.path(), test_config()).await;
    let addr = gw.plain_addr.unwrap();
    let mac = "AABBCC550001";
    let connect_will = || {
        Packet::Connect(
            Connect {
                keep_alive: 30,
                client_id: mac.into(),
                clean_session: true,
            },
            None,
            Some(LastWill {
                topic: format!("ESP32CAM/{mac}/status").into_bytes().into(),
                message: hello(mac).into(),
                qos: QoS::AtLeastOnce,
                retain: false,
            }),
            None,
            None,
        )
    };
    let hellos = || gw.metrics.hellos.load(Ordering::Relaxed);
    let disconnected = || async {
        let deadline = Instant::now() + WAIT;
        while gw.metrics.connections.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < deadline, "disconnected");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };

    // With DISCONNECT: no will.
    let mut d = Raw::open(addr).await;
    d.send(&encode(vec![connect_will()])).await;
    let (t, connack) = d.next(WAIT).await.unwrap();
    assert_eq!((t, &connack[..]), (2, &[0x20, 0x02, 0x00, 0x00][..]));
    d.send(&[0xE0, 0x00]).await;
    assert!(d.next(WAIT).await.is_none(), "closed after DISCONNECT");
    disconnected().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hellos(), 0, "no will after DISCONNECT");

    // Dropped without DISCONNECT: the will reaches the ingest.
    let mut d = Raw::open(addr).await;
    d.send(&encode(vec![connect_will()])).await;
    assert_eq!(d.next(WAIT).await.unwrap().0, 2);
    drop(d);
    let deadline = Instant::now() + WAIT;
    while hellos() == 0 {
        assert!(Instant::now() < deadline, "will not ingested");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.metrics.rejected("broker_timeout"), 0);
    gw.shutdown().await.unwrap();
}
