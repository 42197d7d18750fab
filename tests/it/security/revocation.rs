//! Live revocation: the open session closed within a second, no TLS session
//! resumption past a revocation, no gap between handshake and CONNECT, and
//! `revoked.json` written before a revocation takes effect.

use super::{issue, mosquitto_pub};
use crate::support::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

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
