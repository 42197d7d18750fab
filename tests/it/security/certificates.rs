//! Device certificates: `ca init`, `device issue` and reissue, mutual TLS
//! with real clients, bad certificates and plaintext refused at the
//! handshake, and the root CA key kept off the gateway.

use super::{issue, mosquitto_pub};
use crate::support::*;
use std::time::Duration;

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
