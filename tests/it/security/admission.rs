//! Who gets in and how far: the TLS handshake budgets (a timeout, a global
//! cap and a per-address share) and the loopback broker, which admits only
//! the front and never hands one device's commands to another.

use super::issue;
use crate::support::*;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_handshakes_time_out_and_are_capped() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut cfg = test_config();
    cfg.mqtt.max_handshakes = 2;
    cfg.mqtt.handshake_timeout_ms = 1000;
    let gw = start_gateway_exact(data.path(), cfg).await;
    // Two sockets that never speak hold both handshake slots...
    let idle: Vec<_> = futures_idle(gw.mqtt_addr, 2).await;
    // ...so a third connection is refused at once...
    let _third = tokio::net::TcpStream::connect(gw.mqtt_addr).await.unwrap();
    rejected(&gw, "too_many_handshakes", 1).await;
    // ...until the idle ones time out.
    rejected(&gw, "tls_handshake_timeout", 2).await;
    drop(idle);
    let mac = "AABBCCDD0008";
    issue(data.path(), mac, out.path());
    let certs = DeviceCerts::load(out.path(), mac);
    let mut d = Device::connect_tls(gw.mqtt_addr, mac, false, &certs).await;
    d.hello(0).await;
    d.expect("capture_image").await;
    gw.shutdown().await.unwrap();
}

async fn futures_idle(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    v
}

/// Finding: one host could hold every TLS handshake slot with idle
/// sockets and lock every device out. Each source address now gets a share
/// of the handshakes (`mqtt.max_handshakes_per_ip`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_from_one_address_do_not_lock_out_the_others() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let mac = "AABBCCDD0601";
    issue(data.path(), mac, out.path());
    // 200 sockets from 127.0.0.1 that never start a handshake.
    let idle = futures_idle(gw.mqtt_addr, 200).await;
    let m = gw.metrics.clone();
    eventually(WAIT, "the idle sockets accepted", || {
        m.rejected("too_many_handshakes_per_ip") + m.rejected("too_many_handshakes") >= 136
    })
    .await;
    // A device from another address is still served at once.
    let r = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &gw.mqtt_addr.port().to_string()])
        .args(["-A", "127.0.0.2"])
        .args(["-i", mac, "-t", &format!("ESP32CAM/{mac}/status")])
        .args(["-m", &hello(mac), "-q", "1"])
        .arg("--cafile")
        .arg(gw.pki.ca_cert_path())
        .arg("--cert")
        .arg(out.path().join(format!("{mac}.crt.pem")))
        .arg("--key")
        .arg(out.path().join(format!("{mac}.key.pem")))
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(gw.metrics.rejected("too_many_handshakes"), 0);
    rejected(&gw, "too_many_handshakes_per_ip", 192).await;
    drop(idle);
    gw.shutdown().await.unwrap();
}

/// Device A's session ends and device B connects, taking A's place in the
/// broker (rumqttd reuses a closed connection's slot); A comes back. The
/// replies to A reach A and never B. Guards the broker's disconnect
/// clean-up of parked subscriptions (`vendor/rumqttd/PATCHES.md`,
/// `DataLog::clean`): a waiter left behind would deliver A's commands to
/// whichever connection got the slot next. A clean session's filters are
/// forgotten when it ends (`DataLog::remove_filter`), so B's filters take
/// A's old filter slots too: a stale topic-to-filter entry would deliver
/// A's replies to B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_broker_slot_never_gets_another_devices_commands() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let (a, b) = ("AABBCCDD0101", "AABBCCDD0102");
    issue(data.path(), a, out.path());
    issue(data.path(), b, out.path());
    let (ca, cb) = (
        DeviceCerts::load(out.path(), a),
        DeviceCerts::load(out.path(), b),
    );
    for _ in 0..3 {
        let mut da = Device::connect_tls(gw.mqtt_addr, a, false, &ca).await;
        da.hello(0).await;
        da.recv().await;
        da.client.disconnect().await.unwrap();
        da.expect_disconnect(WAIT).await;
        let mut db = Device::connect_tls(gw.mqtt_addr, b, false, &cb).await;
        let mut da = Device::connect_tls(gw.mqtt_addr, a, false, &ca).await;
        da.hello(0).await;
        da.recv().await;
        db.expect_silence(Duration::from_millis(500)).await;
        for d in [da, db] {
            d.client.disconnect().await.unwrap();
        }
    }
    gw.shutdown().await.unwrap();
}
