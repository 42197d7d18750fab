//! The front's CONNECT policy: each refused CONNECT gets a CONNACK with its
//! MQTT 3.1.1 return code, and only identity faults count as identity
//! violations.

use super::issue;
use crate::support::*;
use std::path::Path;
use std::process::Command;

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
