//! The optional password listener (`mqtt.password_listen`) with real
//! clients (rumqttc and mosquitto_pub over TLS with server authentication
//! only), and revocation by editing `certs/revoked.json` by hand.

use crate::support::*;
use barngate::config::Config;
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// `barngate device issue MAC --password --out DIR`: (serial, password).
fn issue_password(data_dir: &Path, mac: &str, out: &Path) -> (String, String) {
    let o = cli(
        data_dir,
        &[
            "device",
            "issue",
            mac,
            "--password",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let serial = issued_serial(&o.stdout);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let password = text
        .lines()
        .find_map(|l| l.strip_prefix("MQTT password:"))
        .unwrap_or_else(|| panic!("no password in {text}"))
        .trim()
        .to_string();
    (serial, password)
}

fn password_cfg() -> Config {
    let mut c = test_config();
    c.mqtt.password_listen = Some("127.0.0.1:0".parse().unwrap());
    c
}

/// mosquitto_pub -u/-P over TLS (server authentication only), QoS 1.
fn mosquitto_pub_password(
    addr: SocketAddr,
    ca: &Path,
    client_id: &str,
    user: &str,
    password: &str,
    topic: &str,
    msg: &str,
) -> Output {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-i", client_id, "-u", user, "-P", password])
        .args(["-t", topic, "-m", msg, "-q", "1"])
        .arg("--cafile")
        .arg(ca)
        .output()
        .expect("mosquitto_pub is installed (.ci/run)")
}

/// A rumqttc login on the password listener: the CONNACK's outcome.
async fn login(addr: SocketAddr, ca: &[u8], client_id: &str, user: &str, pw: &str) -> bool {
    let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", addr.port());
    opts.set_transport(rumqttc::Transport::tls(ca.to_vec(), None, None));
    opts.set_credentials(user, pw);
    let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
    let ok = tokio::time::timeout(WAIT, async {
        loop {
            match ev.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    return a.code == rumqttc::ConnectReturnCode::Success
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .expect("an answer from the gateway");
    drop(client);
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_device_completes_a_wake() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), password_cfg()).await;
    let addr = gw.password_addr.expect("password listener on");
    let mac = "B8F862F9CFB9";
    let (serial, pw) = issue_password(data.path(), "b8:f8:62:f9:cf:b9", out.path());
    assert_eq!(pw.len(), barngate::devpass::PASSWORD_LEN);

    // The files: the password once in {MAC}.password (0600) and the header;
    // the gateway keeps only a hash, bound to the certificate's serial.
    use std::os::unix::fs::PermissionsExt;
    let pw_file = out.path().join(format!("{mac}.password"));
    assert_eq!(std::fs::read_to_string(&pw_file).unwrap().trim(), pw);
    let mode = std::fs::metadata(&pw_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let header = std::fs::read_to_string(out.path().join(format!("{mac}.h"))).unwrap();
    assert!(header.contains(&format!("#define BARNGATE_MQTT_PASSWORD \"{pw}\"")));
    let stored =
        std::fs::read_to_string(data.path().join(format!("certs/passwords/{mac}.json"))).unwrap();
    assert!(!stored.contains(&pw) && stored.contains("argon2id") && stored.contains(&serial));

    // rumqttc: TLS with the CA only, user name = MAC.
    let ca = std::fs::read(out.path().join("ca.crt.pem")).unwrap();
    let mut d = Device::connect_password(addr, mac, &ca, &pw).await;
    d.hello(0).await;
    let (_, v) = d.expect("capture_image").await;
    assert_eq!(v["capture_image"], true);
    d.deliver(
        "img_1.jpg",
        &image_bytes(7, 2500),
        200,
        "2025-01-03T10:00:00Z",
    )
    .await;
    assert_eq!(gw.store.images(Some(mac)).unwrap().len(), 1);
    drop(d);

    // mosquitto_pub -u -P --cafile.
    let hellos = gw.metrics.hellos.load(Ordering::Relaxed);
    let r = mosquitto_pub_password(
        addr,
        &out.path().join("ca.crt.pem"),
        mac,
        mac,
        &pw,
        &format!("ESP32CAM/{mac}/status"),
        &hello(mac),
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m = gw.metrics.clone();
    eventually(WAIT, "mosquitto HELLO handled", || {
        m.hellos.load(Ordering::Relaxed) > hellos
    })
    .await;

    // The certificate listener still wants a certificate.
    let r = mosquitto_pub_password(
        gw.mqtt_addr,
        &out.path().join("ca.crt.pem"),
        mac,
        mac,
        &pw,
        &format!("ESP32CAM/{mac}/status"),
        &hello(mac),
    );
    assert!(!r.status.success(), "password accepted on the mTLS port");
    rejected(&gw, "tls_no_certificate", 1).await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_logins_and_foreign_topics_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), password_cfg()).await;
    let addr = gw.password_addr.unwrap();
    let (a, b) = ("AABBCCDD0101", "AABBCCDD0102");
    let (_, pw) = issue_password(data.path(), a, out.path());
    let ca_path = out.path().join("ca.crt.pem");
    let ca = std::fs::read(&ca_path).unwrap();

    // Wrong password (rumqttc and mosquitto_pub).
    assert!(!login(addr, &ca, a, a, "not-the-password").await);
    rejected(&gw, "password_wrong", 1).await;
    let r = mosquitto_pub_password(
        addr,
        &ca_path,
        a,
        a,
        "guess",
        &format!("ESP32CAM/{a}/status"),
        &hello(a),
    );
    assert!(!r.status.success(), "wrong password accepted");
    rejected(&gw, "password_wrong", 2).await;
    // A's password for B, who has none.
    assert!(!login(addr, &ca, b, b, &pw).await);
    rejected(&gw, "password_unknown_device", 1).await;
    // No credentials at all; a user name that is no MAC.
    let r = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-i", a, "-t", &format!("ESP32CAM/{a}/status"), "-m", "x"])
        .arg("--cafile")
        .arg(&ca_path)
        .output()
        .unwrap();
    assert!(!r.status.success());
    rejected(&gw, "password_missing", 1).await;
    assert!(!login(addr, &ca, a, "admin", &pw).await);
    rejected(&gw, "password_bad_username", 1).await;
    // The right password, but the client id claims B.
    assert!(!login(addr, &ca, b, a, &pw).await);
    rejected(&gw, "client_id_mismatch", 1).await;

    // Logged in as A, publishing to B's topic: closed, nothing stored.
    let mut d = Device::connect_password(addr, a, &ca, &pw).await;
    d.client
        .publish(
            format!("ESP32CAM/{b}/status"),
            rumqttc::QoS::AtLeastOnce,
            false,
            hello(b),
        )
        .await
        .unwrap();
    d.expect_disconnect(WAIT).await;
    rejected(&gw, "publish_not_allowed", 1).await;
    // Subscribing to B's commands: closed too.
    let mut d = Device::connect_password(addr, a, &ca, &pw).await;
    d.client
        .subscribe(format!("ESP32CAM/{b}/cmd"), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    d.expect_disconnect(WAIT).await;
    rejected(&gw, "subscribe_not_allowed", 1).await;

    assert!(gw.store.device(b).unwrap().is_none());
    assert_eq!(gw.metrics.messages_in.load(Ordering::Relaxed), 0);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_covers_passwords_and_hand_edits() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), password_cfg()).await;
    let addr = gw.password_addr.unwrap();
    let ca = std::fs::read(gw.pki.ca_cert_path()).unwrap();

    // A password device revoked with the CLI while connected.
    let a = "AABBCCDD0201";
    let (_, pw) = issue_password(data.path(), a, out.path());
    let mut d = Device::connect_password(addr, a, &ca, &pw).await;
    d.hello(0).await;
    d.expect("capture_image").await;
    cli(data.path(), &["device", "revoke", a]);
    d.expect_disconnect(Duration::from_secs(1)).await;
    assert!(
        !login(addr, &ca, a, a, &pw).await,
        "revoked password accepted"
    );
    rejected(&gw, "password_revoked", 1).await;

    // A second password device, connected.
    let (serial_b, pw_b) = issue_password(data.path(), "AABBCCDD0202", out.path());
    let b = "AABBCCDD0202";
    let mut d = Device::connect_password(addr, b, &ca, &pw_b).await;
    d.hello(0).await;
    d.expect("capture_image").await;

    // revoked.json edited by hand (as an editor would: in place) revokes
    // B's serial: its open session closes within a second.
    let path = gw.pki.revoked_path();
    let mut list: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
        .expect("revoked.json exists after the CLI revocation");
    list["revoked"].as_array_mut().unwrap().push(json!({
        "serial": serial_b,
        "mac": b,
        "revoked_at": chrono::Utc::now(),
    }));
    let t = Instant::now();
    std::fs::write(&path, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
    d.expect_disconnect(Duration::from_secs(1)).await;
    eprintln!("revoked.json edit → disconnected in {:?}", t.elapsed());
    assert!(!login(addr, &ca, b, b, &pw_b).await);
    rejected(&gw, "password_revoked", 2).await;

    // A certificate device, revoked by a hand edit the same way.
    let c = "AABBCCDD0203";
    let o = cli(
        data.path(),
        &["device", "issue", c, "--out", out.path().to_str().unwrap()],
    );
    let serial_c = String::from_utf8_lossy(&o.stdout)
        .split("(serial ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap()
        .to_string();
    let certs = DeviceCerts::load(out.path(), c);
    let mut d = Device::connect_tls(gw.mqtt_addr, c, false, &certs).await;
    d.hello(0).await;
    d.expect("capture_image").await;
    list["revoked"].as_array_mut().unwrap().push(json!({
        "serial": serial_c,
        "mac": c,
        "revoked_at": chrono::Utc::now(),
    }));
    std::fs::write(&path, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
    d.expect_disconnect(Duration::from_secs(1)).await;
    assert!(gw.front.is_revoked(&serial_c));

    // A corrupt edit is ignored: nothing is un-revoked.
    std::fs::write(&path, b"{ not json").unwrap();
    let m = gw.metrics.clone();
    let before = m.rejected("password_revoked");
    assert!(!login(addr, &ca, b, b, &pw_b).await);
    assert!(m.rejected("password_revoked") > before);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reissue_without_password_removes_it() {
    let data = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let gw = start_gateway_exact(data.path(), password_cfg()).await;
    let addr = gw.password_addr.unwrap();
    let ca = std::fs::read(gw.pki.ca_cert_path()).unwrap();
    let mac = "AABBCCDD0301";
    let (_, pw) = issue_password(data.path(), mac, out.path());
    assert!(login(addr, &ca, mac, mac, &pw).await);
    let o = cli(
        data.path(),
        &[
            "device",
            "issue",
            mac,
            "--out",
            out.path().to_str().unwrap(),
        ],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("previous MQTT password removed"));
    assert!(!login(addr, &ca, mac, mac, &pw).await);
    rejected(&gw, "password_unknown_device", 1).await;
    gw.shutdown().await.unwrap();
}
