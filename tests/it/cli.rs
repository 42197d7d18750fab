//! The real binary: `serve` as a child process, a real mosquitto client, and
//! the admin commands both through the running gateway and on the database.

use crate::support::*;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Serve {
    child: Child,
    mqtt: SocketAddr,
    http: SocketAddr,
}

impl Serve {
    fn start(dir: &Path) -> Serve {
        let cfg = dir.join("test.toml");
        std::fs::write(
            &cfg,
            "[site]\ntimezone = \"UTC\"\n[ingest]\nquiet_gap_ms = 300\n",
        )
        .unwrap();
        let mut child = barngate()
            .args(["--data-dir"])
            .arg(dir.join("data"))
            .arg("--config")
            .arg(&cfg)
            .args([
                "serve",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).unwrap();
        assert!(line.starts_with("barngate ready "), "{line}");
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap()
                .parse()
                .unwrap()
        };
        let (mqtt, http) = (addr("mqtt="), addr("http="));
        Serve { child, mqtt, http }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "serve exits cleanly on SIGTERM: {st}");
                return;
            }
            assert!(Instant::now() < deadline, "serve did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    barngate()
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_mosquitto_client_and_admin_commands() {
    let dir = tempfile::tempdir().unwrap();
    // Provisioning works before the gateway ever ran.
    let out = run(dir.path(), &["ca", "init", "--hostname", "barn-gw.local"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let certs = dir.path().join("certs-out");
    let out = run(
        dir.path(),
        &[
            "device",
            "issue",
            "B8F862F9CFB8",
            "--out",
            certs.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serve = Serve::start(dir.path());
    let port = serve.mqtt.port().to_string();

    // A real mosquitto client over mutual TLS, as the device: HELLO → capture_image.
    let sub_out = Command::new("mosquitto_rr")
        .args([
            "-V",
            "mqttv311",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            "B8F862F9CFB8",
            "-q",
            "1",
            "-W",
            "20",
        ])
        .arg("--cafile")
        .arg(certs.join("ca.crt.pem"))
        .arg("--cert")
        .arg(certs.join("B8F862F9CFB8.crt.pem"))
        .arg("--key")
        .arg(certs.join("B8F862F9CFB8.key.pem"))
        .args([
            "-t",
            "ESP32CAM/B8F862F9CFB8/status",
            "-e",
            "ESP32CAM/B8F862F9CFB8/cmd",
        ])
        .args([
            "-m",
            r#"{"device_id":"B8F862F9CFB8","status":"alive","pendingImg":0}"#,
        ])
        .output()
        .expect("mosquitto_rr (Debian mosquitto-clients) is installed");
    assert!(
        sub_out.status.success(),
        "{}",
        String::from_utf8_lossy(&sub_out.stderr)
    );
    let msg = String::from_utf8_lossy(&sub_out.stdout);
    assert_eq!(
        msg.trim(),
        r#"{"device_id":"B8F862F9CFB8","capture_image":true}"#
    );

    // Deliver an image with an MQTT client library.
    let tls = DeviceCerts::load(&certs, "B8F862F9CFB8");
    let mut d = Device::connect_tls(serve.mqtt, "B8F862F9CFB8", false, &tls).await;
    let img = image_bytes(42, 4000);
    d.deliver("img_cli.jpg", &img, 512, "2025-01-03T10:00:00Z")
        .await;

    // Admin commands while serve runs (through the admin socket).
    let out = run(dir.path(), &["device", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["mac"], "B8F862F9CFB8");
    let out = run(
        dir.path(),
        &["image", "list", "--device", "b8:f8:62:f9:cf:b8", "--json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["sha256"], sha256_hex(&img));
    let file = dir.path().join("out.jpg");
    let out = run(
        dir.path(),
        &[
            "image",
            "export",
            "--device",
            "b8f862f9cfb8",
            "--name",
            "img_cli.jpg",
            "--out",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&file).unwrap(), img);
    let out = run(
        dir.path(),
        &[
            "image",
            "export",
            "--device",
            "B8F862F9CFB8",
            "--name",
            "nope.jpg",
            "--out",
            "/dev/null",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no complete image"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    serve.stop();

    // Without a running gateway the same commands read the database.
    let out = run(dir.path(), &["image", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["image_name"], "img_cli.jpg");
    let out = run(dir.path(), &["image", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("img_cli.jpg"));
    let out = run(
        dir.path(),
        &[
            "image",
            "export",
            "--device",
            "B8F862F9CFB8",
            "--name",
            "img_cli.jpg",
            "--out",
            file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    assert_eq!(std::fs::read(&file).unwrap(), img);
}

#[test]
fn config_errors_name_the_key_and_configfile_prints_the_template() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[ingest]\nretry_limit = 0\n").unwrap();
    let out = barngate()
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&bad)
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ingest.retry_limit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = barngate().arg("configfile").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        barngate::config::TEMPLATE
    );
    let out = run(dir.path(), &["image", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no database"));
}

/// Finding: `barngate.toml` written on first start and the database took
/// the umask's default mode (0644 under the usual 022), readable by every
/// user on the Pi, and the data directory was created with the umask's
/// mode and chmod-ed afterwards. They are now created private, whatever
/// the umask: directories 0700, the database, config, keys and the admin
/// password hash 0600.
#[test]
fn serve_creates_its_files_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fresh/data");
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    // `serve` on a data directory that does not exist yet, under umask 022.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_barngate"))
        .arg("--data-dir")
        .arg(&data)
        .args([
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("barngate ready "), "{line}");
    let serve = Serve {
        child,
        mqtt: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
    };
    // The admin password, set under the same umask.
    let mut set = Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_barngate"))
        .arg("--data-dir")
        .arg(&data)
        .args(["admin", "set-password", "--password-stdin"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        set.stdin
            .take()
            .unwrap()
            .write_all(b"barn door 42\n")
            .unwrap();
    }
    assert!(set.wait().unwrap().success());
    serve.stop();

    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(
        mode(&data.join("barngate.toml")),
        0o600,
        "config written on first start"
    );
    assert_eq!(mode(&data.join("barngate.redb")), 0o600, "database");
    assert_eq!(
        mode(&data.join("admin.passwd")),
        0o600,
        "admin password hash"
    );
    let certs = data.join("certs");
    assert_eq!(mode(&certs), 0o700, "certs directory");
    let mut keys = 0;
    for e in std::fs::read_dir(&certs).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let m = mode(&p);
        assert_eq!(m & 0o022, 0, "{name}: {m:o} writable by others");
        if name.contains("key") {
            assert_eq!(m, 0o600, "{name}");
            keys += 1;
        }
    }
    assert!(keys >= 2, "CA and server keys");
    // Nothing in the data directory is readable by group or others but
    // the public certificates inside the private certs/.
    for e in std::fs::read_dir(&data).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p) & 0o077, 0, "{}: {:o}", p.display(), mode(&p));
    }
}

/// The TCP ports process `pid` listens on (its socket inodes matched in
/// `/proc/net/tcp{,6}` in state LISTEN).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for row in text.lines().skip(1) {
            let f: Vec<&str> = row.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// The embedded broker has no listener: a device session reaches it only
/// through the front, so there is no loopback port to walk around the
/// front's identity and topic rules. `serve` listens on the device and
/// dashboard addresses it printed, and nowhere else.
#[test]
fn serve_listens_only_on_the_device_and_http_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path());
    let mut want = vec![serve.mqtt.port(), serve.http.port()];
    want.sort_unstable();
    assert_eq!(listening_ports(serve.child.id()), want);
    serve.stop();
}
