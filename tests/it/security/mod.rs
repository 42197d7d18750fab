//! Per-device identity, end to end: the `barngate` CLI (ca init, device
//! issue, device revoke), the TLS front with real clients (rumqttc and
//! mosquitto_pub/mosquitto_sub), identity-bound topics, live revocation and
//! the loopback broker's secret.

use crate::support::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `barngate device issue MAC --out DIR`; returns the serial it printed.
fn issue(data_dir: &Path, mac: &str, out: &Path) -> String {
    let o = cli(
        data_dir,
        &["device", "issue", mac, "--out", out.to_str().unwrap()],
    );
    issued_serial(&o.stdout)
}

/// mosquitto_pub over TLS to the device listener, QoS 1 (waits for PUBACK).
fn mosquitto_pub(
    addr: std::net::SocketAddr,
    certs: Option<(&Path, &str)>,
    ca: Option<&Path>,
    client_id: &str,
    topic: &str,
    msg: &str,
) -> Output {
    let mut c = Command::new("mosquitto_pub");
    c.args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-i", client_id, "-t", topic, "-m", msg, "-q", "1"]);
    if let Some(ca) = ca {
        c.arg("--cafile").arg(ca);
    }
    if let Some((dir, mac)) = certs {
        c.arg("--cert")
            .arg(dir.join(format!("{mac}.crt.pem")))
            .arg("--key")
            .arg(dir.join(format!("{mac}.key.pem")));
    }
    c.output().expect("mosquitto_pub is installed (.ci/run)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioned_device_completes_a_wake_over_mutual_tls() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mac = "B8F862F9CFB8";
    // Offline: CA, then a device issued before the gateway ever ran.
    let o = cli(data.path(), &["ca", "init", "--hostname", "barn.local"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("barn.local"));
    let serial = cli(
        data.path(),
        &[
            "device",
            "issue",
            "b8:f8:62:f9:cf:b8",
            "--location",
            "Barn 1",
            "--dialect",
            "firmware",
            "--out",
            out.path().to_str().unwrap(),
        ],
    );
    let serial = issued_serial(&serial.stdout);
    for f in [
        "ca.crt.pem",
        &format!("{mac}.crt.pem"),
        &format!("{mac}.key.pem"),
    ] {
        assert!(out.path().join(f).is_file(), "{f}");
    }
    let header = std::fs::read_to_string(out.path().join(format!("{mac}.h"))).unwrap();
    assert!(header.contains("BEGIN CERTIFICATE") && header.contains("PRIVATE KEY"));
    let key_mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(data.path().join("certs/ca.key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(key_mode, 0o600);

    let gw = start_gateway_exact(data.path(), test_config()).await;
    assert!(gw.plain_addr.is_none(), "no plaintext listener by default");
    let rec = gw.store.device(mac).unwrap().expect("registered offline");
    assert_eq!(rec.cert_serial.as_deref(), Some(serial.as_str()));
    assert_eq!(rec.location.as_deref(), Some("Barn 1"));
    assert!(rec.dialect_pinned);

    let certs = DeviceCerts::load(out.path(), mac);
    let mut d = Device::connect_tls(gw.mqtt_addr, mac, false, &certs).await;
    d.hello(0).await;
    let (ch, v) = d.expect("capture_image").await;
    assert_eq!(ch, "cmd");
    assert_eq!(v["capture_image"], true);
    let img = image_bytes(1, 3000);
    d.deliver("img_1.jpg", &img, 200, "2025-01-03T10:00:00Z")
        .await;
    assert_eq!(gw.store.images(Some(mac)).unwrap().len(), 1);
    drop(d);

    // mosquitto_pub with the issued files: a HELLO from the same device.
    let hellos = gw.metrics.hellos.load(std::sync::atomic::Ordering::Relaxed);
    let ca = out.path().join("ca.crt.pem");
    let r = mosquitto_pub(
        gw.mqtt_addr,
        Some((out.path(), mac)),
        Some(&ca),
        mac,
        &format!("ESP32CAM/{mac}/status"),
        &hello(mac),
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m = gw.metrics.clone();
    eventually(WAIT, "mosquitto HELLO handled", || {
        m.hellos.load(std::sync::atomic::Ordering::Relaxed) > hellos
    })
    .await;
    gw.shutdown().await.unwrap();
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_and_plaintext_are_refused_at_the_handshake() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let ca = gw.pki.ca_cert_path();
    let mac = "AABBCCDD0003";
    let topic = format!("ESP32CAM/{mac}/status");

    // A certificate from another site's CA.
    let other = tempfile::tempdir().unwrap();
    let other_pki = barngate::pki::Pki::new(other.path().join("certs"));
    other_pki.init_ca(&Default::default()).unwrap();
    let other_out = other.path().join("out");
    other_pki.issue_device(mac, 30, &other_out).unwrap();
    let r = mosquitto_pub(
        gw.mqtt_addr,
        Some((&other_out, mac)),
        Some(&ca),
        mac,
        &topic,
        &hello(mac),
    );
    assert!(!r.status.success(), "foreign CA accepted");
    rejected(&gw, "tls_unknown_ca", 1).await;

    // An expired certificate from the right CA.
    let expired = out.path().join("expired");
    gw.pki
        .issue_device_at(
            mac,
            1,
            &expired,
            chrono::Utc::now() - chrono::Duration::days(10),
        )
        .unwrap();
    let r = mosquitto_pub(
        gw.mqtt_addr,
        Some((&expired, mac)),
        Some(&ca),
        mac,
        &topic,
        &hello(mac),
    );
    assert!(!r.status.success(), "expired certificate accepted");
    rejected(&gw, "tls_expired", 1).await;

    // No client certificate at all.
    let r = mosquitto_pub(gw.mqtt_addr, None, Some(&ca), mac, &topic, &hello(mac));
    assert!(!r.status.success(), "no certificate accepted");
    rejected(&gw, "tls_no_certificate", 1).await;

    // Plaintext MQTT on the TLS port.
    let r = mosquitto_pub(gw.mqtt_addr, None, None, mac, &topic, &hello(mac));
    assert!(!r.status.success(), "plaintext accepted on the TLS port");
    rejected(&gw, "tls_handshake_failed", 1).await;

    // A good certificate whose CONNECT claims another device.
    issue(data.path(), mac, out.path());
    let r = mosquitto_pub(
        gw.mqtt_addr,
        Some((out.path(), mac)),
        Some(&ca),
        "AABBCCDD0004",
        "ESP32CAM/AABBCCDD0004/status",
        &hello("AABBCCDD0004"),
    );
    assert!(!r.status.success(), "client id mismatch accepted");
    rejected(&gw, "client_id_mismatch", 1).await;

    // None of it was stored.
    assert!(gw.store.device("AABBCCDD0004").unwrap().is_none());
    assert_eq!(
        gw.metrics
            .messages_in
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let body = gw.metrics.render();
    assert!(
        body.contains("barngate_rejected_total{reason=\"tls_unknown_ca\"} 1"),
        "{body}"
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_the_open_session_within_a_second() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let mac = "AABBCCDD0005";
    let serial = issue(data.path(), mac, out.path());
    assert_eq!(
        gw.store
            .device(mac)
            .unwrap()
            .unwrap()
            .cert_serial
            .as_deref(),
        Some(serial.as_str()),
        "registered through the running gateway"
    );
    let certs = DeviceCerts::load(out.path(), mac);
    let mut d = Device::connect_tls(gw.mqtt_addr, mac, false, &certs).await;
    d.hello(0).await;
    d.expect("capture_image").await;

    let t = Instant::now();
    let o = cli(data.path(), &["device", "revoke", mac]);
    d.expect_disconnect(Duration::from_secs(1)).await;
    let took = t.elapsed();
    eprintln!("revoke → disconnected in {took:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("revoked"));
    assert_eq!(gw.store.device(mac).unwrap().unwrap().status, "revoked");
    let list = gw.pki.load_revoked().unwrap();
    assert!(list.contains(&serial), "{list:?}");

    // A new connection with the revoked certificate is refused.
    let r = mosquitto_pub(
        gw.mqtt_addr,
        Some((out.path(), mac)),
        Some(&gw.pki.ca_cert_path()),
        mac,
        &format!("ESP32CAM/{mac}/status"),
        &hello(mac),
    );
    assert!(!r.status.success(), "revoked certificate accepted");
    rejected(&gw, "tls_revoked", 1).await;
    gw.shutdown().await.unwrap();

    // Revocation survives a restart.
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let r = mosquitto_pub(
        gw.mqtt_addr,
        Some((out.path(), mac)),
        Some(&gw.pki.ca_cert_path()),
        mac,
        &format!("ESP32CAM/{mac}/status"),
        &hello(mac),
    );
    assert!(
        !r.status.success(),
        "revoked certificate accepted after restart"
    );
    rejected(&gw, "tls_revoked", 1).await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reissue_rotates_and_a_reconnect_replaces_the_old_session() {
    let data = tempfile::tempdir().unwrap();
    let old = tempfile::tempdir().unwrap();
    let new = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let mac = "AABBCCDD0006";
    issue(data.path(), mac, old.path());
    let old_certs = DeviceCerts::load(old.path(), mac);
    let mut first = Device::connect_tls(gw.mqtt_addr, mac, false, &old_certs).await;
    // The same device reconnecting (a new wake): the old session is closed.
    let mut second = Device::connect_tls(gw.mqtt_addr, mac, false, &old_certs).await;
    first.expect_disconnect(WAIT).await;
    second.hello(0).await;
    second.expect("capture_image").await;

    // Re-issue: the open session with the old certificate is closed and the
    // old certificate stops working; the new one works.
    issue(data.path(), mac, new.path());
    second.expect_disconnect(Duration::from_secs(1)).await;
    let r = mosquitto_pub(
        gw.mqtt_addr,
        Some((old.path(), mac)),
        Some(&gw.pki.ca_cert_path()),
        mac,
        &format!("ESP32CAM/{mac}/status"),
        &hello(mac),
    );
    assert!(!r.status.success(), "rotated certificate accepted");
    rejected(&gw, "tls_revoked", 1).await;
    let new_certs = DeviceCerts::load(new.path(), mac);
    let mut d = Device::connect_tls(gw.mqtt_addr, mac, false, &new_certs).await;
    d.hello(0).await;
    d.expect("capture_image").await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loopback_broker_admits_only_the_front() {
    let data = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let mac = "AABBCCDD0007";
    let topic = format!("ESP32CAM/{mac}/status");
    // No credentials.
    let r = mosquitto_pub(gw.broker_addr, None, None, mac, &topic, &hello(mac));
    assert!(
        !r.status.success(),
        "broker admitted a client without the secret"
    );
    // A guessed password.
    let r = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &gw.broker_addr.port().to_string()])
        .args(["-i", mac, "-t", &topic, "-m", &hello(mac), "-q", "1"])
        .args(["-u", barngate::front::BROKER_USER, "-P", "guess"])
        .output()
        .unwrap();
    assert!(!r.status.success(), "broker admitted a wrong secret");
    // rumqttc: the CONNACK refuses.
    let mut opts = rumqttc::MqttOptions::new(mac, "127.0.0.1", gw.broker_addr.port());
    opts.set_credentials(barngate::front::BROKER_USER, "guess");
    let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            match ev.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    return a.code != rumqttc::ConnectReturnCode::Success
                }
                Ok(_) => {}
                Err(_) => return true,
            }
        }
    })
    .await
    .expect("an answer from the broker");
    assert!(refused);
    drop(client);
    assert!(gw.store.device(mac).unwrap().is_none());
    assert_eq!(
        gw.metrics
            .messages_in
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    gw.shutdown().await.unwrap();
}

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

/// Device A's session ends and device B connects, taking A's place in the
/// broker (rumqttd reuses a closed connection's slot); A comes back. The
/// replies to A reach A and never B. Guards the broker's disconnect
/// clean-up of parked subscriptions (`vendor/rumqttd/PATCHES.md`,
/// `DataLog::clean`): a waiter left behind would deliver A's commands to
/// whichever connection got the slot next.
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

/// A TLS client (Python's `ssl`, OpenSSL) that keeps its session: three
/// connections with the same client certificate, each sending a CONNECT
/// and reading the CONNACK; the second and third offer the session of the
/// one before (TLS 1.2 session id, TLS 1.3 ticket). Between the second and
/// the third it prints `ready` and waits for a line on stdin.
const RESUMING_CLIENT: &str = r#"
import socket, ssl, sys
host, port, ca, cert, key, mac, ver = sys.argv[1:8]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
v = ssl.TLSVersion.TLSv1_3 if ver == "1.3" else ssl.TLSVersion.TLSv1_2
ctx.minimum_version = v
ctx.maximum_version = v
cid = mac.encode()
connect = bytes([0x10, 12 + len(cid)]) + b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid

def attempt(label, session):
    data, reused, sess, err = b"", False, None, ""
    try:
        raw = socket.create_connection((host, int(port)), timeout=10)
        s = ctx.wrap_socket(raw, server_hostname=host, session=session)
        reused = s.session_reused
        s.sendall(connect)
        while len(data) < 4:
            part = s.recv(4 - len(data))
            if not part:
                break
            data += part
        sess = s.session
        s.close()
    except (OSError, ssl.SSLError, ValueError) as e:
        err = repr(e)
    print(f"{label} connack={data.hex()} reused={reused} error={err}", flush=True)
    return sess

first = attempt("first", None)
second = attempt("second", first)
print("ready", flush=True)
sys.stdin.readline()
attempt("third", second or first)
"#;

/// Runs [`RESUMING_CLIENT`] for `mac` with TLS `version`, calling `between`
/// after the second connection; returns the three result lines.
fn resuming_client(
    addr: std::net::SocketAddr,
    ca: &Path,
    certs: &Path,
    mac: &str,
    version: &str,
    between: impl FnOnce(),
) -> Vec<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(RESUMING_CLIENT)
        .args(["127.0.0.1", &addr.port().to_string()])
        .arg(ca)
        .arg(certs.join(format!("{mac}.crt.pem")))
        .arg(certs.join(format!("{mac}.key.pem")))
        .args([mac, version])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "client ended early: {lines:?}"
        );
        if line.trim() == "ready" {
            break;
        }
        lines.push(line.trim().to_string());
    }
    between();
    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    lines.push(line.trim().to_string());
    assert!(child.wait().unwrap().success());
    lines
}

/// Finding: a client that kept a TLS session (1.2 session id or 1.3 ticket)
/// resumed it after its certificate was revoked or rotated, and the resumed
/// handshake did not verify the certificate again. The gateway now offers
/// no resumption at all, and the front checks the peer certificate's serial
/// against the live revocation set after every handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificate_cannot_resume_a_tls_session() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let ca = gw.pki.ca_cert_path();
    let cases = [
        ("AABBCCDD0201", "1.3", "revoke"),
        ("AABBCCDD0202", "1.2", "revoke"),
        ("AABBCCDD0203", "1.3", "reissue"),
        ("AABBCCDD0204", "1.2", "reissue"),
    ];
    let mut refused = 0;
    for (mac, version, action) in cases {
        issue(data.path(), mac, out.path());
        let certs = out.path().to_path_buf();
        let dir = data.path().to_path_buf();
        let (addr, ca, m) = (gw.mqtt_addr, ca.clone(), mac.to_string());
        let lines = tokio::task::spawn_blocking(move || {
            resuming_client(addr, &ca, &certs, &m, version, || {
                if action == "revoke" {
                    cli(&dir, &["device", "revoke", &m]);
                } else {
                    let fresh = dir.join("fresh");
                    cli(
                        &dir,
                        &["device", "issue", &m, "--out", fresh.to_str().unwrap()],
                    );
                }
            })
        })
        .await
        .unwrap();
        eprintln!("TLS {version} {action}: {lines:?}");
        let what = format!("TLS {version}, {action}: {lines:?}");
        assert!(lines[0].starts_with("first connack=20020000 "), "{what}");
        // No resumption, even for a certificate that is still valid.
        assert!(
            lines[1].starts_with("second connack=20020000 reused=False"),
            "{what}"
        );
        // After the revocation the old certificate gets no session at all.
        assert!(lines[2].starts_with("third "), "{what}");
        assert!(!lines[2].contains("connack=2002"), "{what}");
        assert!(lines[2].contains("reused=False"), "{what}");
        refused += 1;
        rejected(&gw, "tls_revoked", refused).await;
    }
    gw.shutdown().await.unwrap();
}

/// A TLS client that completes the handshake, prints `ready`, waits for a
/// line on stdin, then sends its CONNECT and prints the CONNACK it gets and
/// whether the connection is still open a moment later.
const PAUSING_CLIENT: &str = r#"
import socket, ssl, sys
host, port, ca, cert, key, mac = sys.argv[1:7]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
cid = mac.encode()
connect = bytes([0x10, 12 + len(cid)]) + b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
s = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=5), server_hostname=host)
print("ready", flush=True)
sys.stdin.readline()
data, state = b"", "open"
try:
    s.sendall(connect)
    while len(data) < 4:
        part = s.recv(4 - len(data))
        if not part:
            break
        data += part
    s.settimeout(1.0)
    try:
        if s.recv(1) == b"":
            state = "closed"
    except socket.timeout:
        pass
except (OSError, ssl.SSLError) as e:
    state = "closed"
print(f"connack={data.hex()} {state}", flush=True)
"#;

/// Finding: a connection that had finished its TLS handshake but not yet
/// sent CONNECT (so had no session in the front) was missed by a
/// revocation, and then ran as a session of the revoked certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_between_handshake_and_connect_is_not_missed() {
    use std::io::{BufRead, BufReader, Write};
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let mac = "AABBCCDD0301";
    issue(data.path(), mac, out.path());
    let (addr, ca, dir) = (
        gw.mqtt_addr,
        gw.pki.ca_cert_path(),
        data.path().to_path_buf(),
    );
    let certs = out.path().to_path_buf();
    let line = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(PAUSING_CLIENT)
            .args(["127.0.0.1", &addr.port().to_string()])
            .arg(&ca)
            .arg(certs.join(format!("{mac}.crt.pem")))
            .arg(certs.join(format!("{mac}.key.pem")))
            .arg(mac)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        cli(&dir, &["device", "revoke", mac]);
        child.stdin.take().unwrap().write_all(b"\n").unwrap();
        line.clear();
        out.read_line(&mut line).unwrap();
        assert!(child.wait().unwrap().success());
        line.trim().to_string()
    })
    .await
    .unwrap();
    // CONNACK 0x05 (not authorised), then the connection is closed.
    assert_eq!(line, "connack=20020005 closed");
    rejected(&gw, "tls_revoked", 1).await;
    assert!(gw.front.connected().is_empty());
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

/// Makes a directory refuse new files while it lives: `chattr +i` (root
/// included), or where that is not possible, `revoked.json` in it replaced
/// by a directory, so it can be neither read nor replaced.
struct Unwritable {
    dir: std::path::PathBuf,
    immutable: bool,
}

impl Unwritable {
    fn new(dir: &Path) -> Unwritable {
        let immutable = Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !immutable {
            let list = dir.join("revoked.json");
            let _ = std::fs::rename(&list, dir.join("revoked.json.kept"));
            std::fs::create_dir(&list).unwrap();
        }
        Unwritable {
            dir: dir.to_path_buf(),
            immutable,
        }
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        if self.immutable {
            let _ = Command::new("chattr").arg("-i").arg(&self.dir).status();
        } else {
            let list = self.dir.join("revoked.json");
            let _ = std::fs::remove_dir(&list);
            let _ = std::fs::rename(self.dir.join("revoked.json.kept"), &list);
        }
    }
}

/// Finding: a revocation changed the registry and the live set before
/// `revoked.json` was written, with no lock around the file: a failed write
/// left a revocation that a restart forgot, and of two revocations at once
/// one could be lost from the file. `revoked.json` is now written first,
/// durably and under a lock; a failure there changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_is_on_disk_before_it_takes_effect() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let (a, b, c) = ("AABBCCDD0501", "AABBCCDD0502", "AABBCCDD0503");
    let serials: Vec<String> = [a, b, c]
        .iter()
        .map(|m| issue(data.path(), m, out.path()))
        .collect();

    // Two revocations at once: both persist, in the file and the registry.
    let runs: Vec<_> = [a, b]
        .iter()
        .map(|m| {
            let (dir, m) = (data.path().to_path_buf(), m.to_string());
            std::thread::spawn(move || cli(&dir, &["device", "revoke", &m]))
        })
        .collect();
    for r in runs {
        r.join().unwrap();
    }
    let listed = gw.pki.load_revoked().unwrap();
    for (m, s) in [a, b].iter().zip(&serials) {
        assert!(listed.contains(s), "{m} {s} not in {listed:?}");
        assert_eq!(gw.store.device(m).unwrap().unwrap().status, "revoked");
        assert!(gw.front.is_revoked(s));
    }

    // revoked.json cannot be written: the revocation fails with an error
    // naming the file and changes nothing; the device stays connected.
    let certs = DeviceCerts::load(out.path(), c);
    let mut d = Device::connect_tls(gw.mqtt_addr, c, false, &certs).await;
    {
        let _stuck = Unwritable::new(gw.pki.dir());
        let o = barngate()
            .arg("--data-dir")
            .arg(data.path())
            .args(["device", "revoke", c])
            .env("BARNGATE_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "revocation reported done");
        assert!(err.contains("revoked.json"), "{err}");
        assert_eq!(gw.store.device(c).unwrap().unwrap().status, "active");
        assert!(!gw.front.is_revoked(&serials[2]));
        d.hello(0).await;
        d.expect("capture_image").await;
    }
    // Once it can be written, the revocation goes through.
    cli(data.path(), &["device", "revoke", c]);
    d.expect_disconnect(WAIT).await;
    assert!(gw.pki.load_revoked().unwrap().contains(&serials[2]));
    assert_eq!(gw.store.device(c).unwrap().unwrap().status, "revoked");
    gw.shutdown().await.unwrap();
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

/// A TLS client (Python's `ssl`) that, for each line on stdin
/// (`CONNECT-hex AFTER-hex-or-- WAIT-s`), connects with the client
/// certificate, sends the CONNECT, reads the CONNACK, sends AFTER, and
/// prints the CONNACK and whether the gateway closed the connection within
/// WAIT seconds.
const CONNECT_CLIENT: &str = r#"
import socket, ssl, sys, time
host, port, ca, cert, key = sys.argv[1:6]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
for line in sys.stdin:
    connect, after, wait = line.split()
    data, state = b"", "open"
    try:
        s = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=5), server_hostname=host)
        s.sendall(bytes.fromhex(connect))
        while len(data) < 4:
            part = s.recv(4 - len(data))
            if not part:
                state = "closed"
                break
            data += part
        if after != "-" and state == "open":
            s.sendall(bytes.fromhex(after))
        if state == "open":
            s.settimeout(float(wait))
            try:
                if s.recv(1) == b"":
                    state = "closed"
            except socket.timeout:
                pass
            except (OSError, ssl.SSLError):
                state = "closed"
        s.close()
    except (OSError, ssl.SSLError) as e:
        state = "closed"
    print(f"connack={data.hex()} {state}", flush=True)
"#;

/// An MQTT CONNECT: protocol `name` and `level`, clean session, keep-alive
/// `keep_alive`, client id `cid` and optionally a QoS 0 will on `will`.
fn connect_packet(
    name: &str,
    level: u8,
    keep_alive: u16,
    cid: &str,
    will: Option<&str>,
) -> Vec<u8> {
    let string = |v: &mut Vec<u8>, s: &str| {
        v.extend_from_slice(&(s.len() as u16).to_be_bytes());
        v.extend_from_slice(s.as_bytes());
    };
    let mut body = Vec::new();
    string(&mut body, name);
    body.push(level);
    body.push(0x02 | if will.is_some() { 0x04 } else { 0 });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    string(&mut body, cid);
    if let Some(topic) = will {
        string(&mut body, topic);
        string(&mut body, "gone");
    }
    assert!(body.len() < 128);
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

/// Runs [`CONNECT_CLIENT`] with `mac`'s certificate for each
/// (CONNECT, bytes after the CONNACK, seconds to wait for the close).
fn connect_client(
    addr: std::net::SocketAddr,
    ca: &Path,
    certs: &Path,
    mac: &str,
    cases: &[(Vec<u8>, Option<Vec<u8>>, f32)],
) -> Vec<String> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(CONNECT_CLIENT)
        .args(["127.0.0.1", &addr.port().to_string()])
        .arg(ca)
        .arg(certs.join(format!("{mac}.crt.pem")))
        .arg(certs.join(format!("{mac}.key.pem")))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut input = String::new();
    for (connect, after, wait) in cases {
        let after = after.as_ref().map_or("-".to_string(), hex::encode);
        input += &format!("{} {after} {wait}\n", hex::encode(connect));
    }
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Finding: a CONNECT the front refused (a client id that is not the
/// certificate's MAC or not a device id, another MQTT version, a will on
/// another device's topic) was answered by closing the connection with no
/// CONNACK, so a device could not tell why; and every close after the
/// CONNECT, a keep-alive expiry or a malformed packet included, was logged
/// as an identity violation. Each refusal now gets its MQTT 3.1.1 return
/// code first, and only identity faults count as identity violations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_gets_a_connack_with_its_return_code() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), test_config()).await;
    let ca = gw.pki.ca_cert_path();
    let (mac, other) = ("AABBCCDD0701", "AABBCCDD0702");
    issue(data.path(), mac, out.path());
    let status = format!("ESP32CAM/{mac}/status");
    let cases: Vec<(Vec<u8>, Option<Vec<u8>>, f32, &str)> = vec![
        // Another device's client id, an ill-formed one, none: 0x02.
        (
            connect_packet("MQTT", 4, 60, other, None),
            None,
            2.0,
            "20020002 closed",
        ),
        (
            connect_packet("MQTT", 4, 60, "aa:bb-cc:dd-07:01", None),
            None,
            2.0,
            "20020002 closed",
        ),
        (
            connect_packet("MQTT", 4, 60, "", None),
            None,
            2.0,
            "20020002 closed",
        ),
        // MQTT 5, MQTT 3.1 and an unknown level: 0x01.
        (
            connect_packet("MQTT", 5, 60, mac, None),
            None,
            2.0,
            "20020001 closed",
        ),
        (
            connect_packet("MQIsdp", 3, 60, mac, None),
            None,
            2.0,
            "20020001 closed",
        ),
        (
            connect_packet("MQTT", 9, 60, mac, None),
            None,
            2.0,
            "20020001 closed",
        ),
        // A will on another device's topic: 0x05.
        (
            connect_packet(
                "MQTT",
                4,
                60,
                mac,
                Some(&format!("ESP32CAM/{other}/status")),
            ),
            None,
            2.0,
            "20020005 closed",
        ),
        // Accepted: its own id and will; stays open.
        (
            connect_packet("MQTT", 4, 60, mac, Some(&status)),
            None,
            0.5,
            "20020000 open",
        ),
        // Accepted, then a malformed packet (a remaining length of five
        // bytes), then silence past 1.5 × a 1 s keep-alive: both closed.
        (
            connect_packet("MQTT", 4, 60, mac, None),
            Some(vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            5.0,
            "20020000 closed",
        ),
        (
            connect_packet("MQTT", 4, 1, mac, None),
            None,
            5.0,
            "20020000 closed",
        ),
    ];
    let input: Vec<_> = cases
        .iter()
        .map(|(c, a, w, _)| (c.clone(), a.clone(), *w))
        .collect();
    let (addr, ca2, certs, m) = (
        gw.mqtt_addr,
        ca.clone(),
        out.path().to_path_buf(),
        mac.to_string(),
    );
    let lines = tokio::task::spawn_blocking(move || connect_client(addr, &ca2, &certs, &m, &input))
        .await
        .unwrap();
    assert_eq!(lines.len(), cases.len(), "{lines:?}");
    for (line, (connect, _, _, want)) in lines.iter().zip(&cases) {
        assert_eq!(
            line,
            &format!("connack={want}"),
            "CONNECT {}",
            hex::encode(connect)
        );
    }
    rejected(&gw, "client_id_mismatch", 1).await;
    rejected(&gw, "bad_client_id", 2).await;
    rejected(&gw, "unsupported_protocol", 3).await;
    rejected(&gw, "will_not_allowed", 1).await;
    rejected(&gw, "malformed_mqtt", 1).await;
    rejected(&gw, "keepalive_timeout", 1).await;
    // The malformed packet and the keep-alive expiry are not identity
    // violations; the four refusals above are.
    let violations = || {
        gw.metrics
            .identity_violations
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(violations(), 4);
    assert!(gw
        .metrics
        .render()
        .contains("barngate_identity_violations_total 4"));

    // mosquitto_pub reports the return codes it was given.
    let pub_with = |id: &str, version: &str| {
        let r = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &gw.mqtt_addr.port().to_string()])
            .args(["-i", id, "-t", &status, "-m", "x", "-q", "1", "-V", version])
            .arg("--cafile")
            .arg(&ca)
            .arg("--cert")
            .arg(out.path().join(format!("{mac}.crt.pem")))
            .arg("--key")
            .arg(out.path().join(format!("{mac}.key.pem")))
            .output()
            .unwrap();
        assert!(!r.status.success(), "{id} {version} accepted");
        String::from_utf8_lossy(&r.stderr).to_string()
    };
    let err = pub_with(other, "311");
    assert!(err.contains("identifier rejected"), "{err}");
    let err = pub_with(mac, "31");
    assert!(err.contains("unacceptable protocol version"), "{err}");
    let err = pub_with(mac, "5");
    assert!(err.contains("Unsupported Protocol Version"), "{err}");
    rejected(&gw, "unsupported_protocol", 5).await;
    assert_eq!(violations(), 5);
    gw.shutdown().await.unwrap();
}

/// Finding: the site CA's private key, which can mint a certificate for any
/// device, sat on the Pi next to the network-facing process, with no way
/// to keep it elsewhere. `ca init` now creates a root and an issuing
/// intermediate; the root key can be exported and removed, and the gateway
/// keeps serving and issuing devices (signed by the intermediate, verified
/// up to the root by mosquitto and by the gateway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_ca_key_can_be_taken_off_the_gateway() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let offline = out.path().join("offline");
    cli(data.path(), &["ca", "init", "--hostname", "barn.local"]);
    let certs = data.path().join("certs");
    assert!(certs.join("issuing.crt.pem").is_file());
    let o = cli(
        data.path(),
        &["ca", "export-root", "--out", offline.to_str().unwrap()],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("ca.key.pem"));
    cli(data.path(), &["ca", "remove-root-key"]);
    assert!(!certs.join("ca.key.pem").exists());
    assert!(offline.join("ca.key.pem").is_file());
    assert_eq!(
        std::fs::read(offline.join("ca.crt.pem")).unwrap(),
        std::fs::read(certs.join("ca.crt.pem")).unwrap()
    );

    // The gateway starts (no new CA), and issues a device while running.
    let gw = start_gateway_exact(data.path(), test_config()).await;
    assert!(!certs.join("ca.key.pem").exists());
    let mac = "AABBCCDD0801";
    issue(data.path(), mac, out.path());
    let der = std::fs::read(out.path().join(format!("{mac}.crt.pem"))).unwrap();
    let text = String::from_utf8_lossy(&der);
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(
        x.issuer()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        barngate::pki::ISSUING_COMMON_NAME
    );

    // mosquitto_pub verifies the gateway up to the root in ca.crt.pem and
    // presents the device certificate, which the gateway verifies through
    // the intermediate.
    let ca = out.path().join("ca.crt.pem");
    let r = mosquitto_pub(
        gw.mqtt_addr,
        Some((out.path(), mac)),
        Some(&ca),
        mac,
        &format!("ESP32CAM/{mac}/status"),
        &hello(mac),
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m = gw.metrics.clone();
    eventually(WAIT, "HELLO handled", || {
        m.hellos.load(std::sync::atomic::Ordering::Relaxed) >= 1
    })
    .await;
    // Revocation still applies to intermediate-signed certificates.
    cli(data.path(), &["device", "revoke", mac]);
    let r = mosquitto_pub(
        gw.mqtt_addr,
        Some((out.path(), mac)),
        Some(&ca),
        mac,
        &format!("ESP32CAM/{mac}/status"),
        &hello(mac),
    );
    assert!(!r.status.success(), "revoked certificate accepted");
    rejected(&gw, "tls_revoked", 1).await;
    gw.shutdown().await.unwrap();
}
