//! Per-device identity, end to end: the `barngate` CLI (ca init, device
//! issue, device revoke), the TLS front with real clients (rumqttc and
//! mosquitto_pub/mosquitto_sub), identity-bound topics, live revocation and
//! the loopback broker's secret.

mod admission;
mod certificates;
mod connect;
mod revocation;
mod topics;

use crate::support::*;
use std::path::Path;
use std::process::{Command, Output};

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
