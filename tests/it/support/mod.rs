//! Shared helpers for the integration tests: an in-process gateway on
//! loopback ports and a device driven by a real MQTT client (rumqttc) (here),
//! a raw MQTT client (`raw`), the simulator harness (`sim`) and real
//! upstream servers (`cloud`).
#![allow(dead_code)]

pub mod cloud;
pub mod raw;
#[cfg(feature = "simulator")]
pub mod sim;

use barngate::clock::SystemClock;
use barngate::config::Config;
use barngate::server::{Gateway, GatewayOptions};
use base64::Engine as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(20);

/// A config for tests: short gaps so retries happen in well under a second.
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.site.timezone = "UTC".into();
    c.ingest.quiet_gap_ms = 300;
    c.ingest.hard_timeout_s = 5;
    c.ingest.commit_interval_ms = 20;
    c
}

/// A gateway with the loopback plaintext listener on (`gw.plain_addr`),
/// for tests that are not about transport security.
pub async fn start_gateway(dir: &Path, mut cfg: Config) -> Gateway {
    if cfg.mqtt.plain_listen.is_none() {
        cfg.mqtt.plain_listen = Some("127.0.0.1:0".parse().unwrap());
    }
    start_gateway_exact(dir, cfg).await
}

/// A gateway with exactly `cfg` (TLS listener only unless configured).
pub async fn start_gateway_exact(dir: &Path, cfg: Config) -> Gateway {
    Gateway::start(
        GatewayOptions {
            data_dir: dir.to_path_buf(),
            config: cfg,
            mqtt_listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
        },
        Arc::new(SystemClock),
    )
    .await
    .expect("gateway starts")
}

/// A deterministic pseudo-JPEG of `n` bytes.
pub fn image_bytes(seed: u32, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    let mut v = Vec::with_capacity(n);
    v.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xE0]);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push((x & 0xFF) as u8);
    }
    v.truncate(n);
    v
}

pub struct Device {
    pub id: String,
    pub prefix: &'static str,
    pub base: u32,
    pub client: AsyncClient,
    rx: mpsc::Receiver<(String, Value)>,
}

/// A device's TLS material (PEM), as `barngate device issue` writes it.
#[derive(Clone)]
pub struct DeviceCerts {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl DeviceCerts {
    /// Reads `{MAC}.crt.pem`, `{MAC}.key.pem` and `ca.crt.pem` from `dir`.
    pub fn load(dir: &Path, mac: &str) -> DeviceCerts {
        let r = |n: String| std::fs::read(dir.join(&n)).unwrap_or_else(|e| panic!("{n}: {e}"));
        DeviceCerts {
            ca: r("ca.crt.pem".into()),
            cert: r(format!("{mac}.crt.pem")),
            key: r(format!("{mac}.key.pem")),
        }
    }
}

impl Device {
    /// Connects over plaintext MQTT, subscribes to its cmd and ack topics
    /// and waits for the SUBACKs.
    pub async fn connect(addr: std::net::SocketAddr, id: &str, v1: bool) -> Device {
        Device::connect_with(addr, id, v1, None, None).await
    }

    /// [`Device::connect`] over TLS with a client certificate.
    pub async fn connect_tls(
        addr: std::net::SocketAddr,
        id: &str,
        v1: bool,
        certs: &DeviceCerts,
    ) -> Device {
        Device::connect_with(addr, id, v1, Some(certs), None).await
    }

    /// [`Device::connect`] to the password listener: TLS verifying the
    /// gateway with `ca` (PEM), user name = `id`.
    pub async fn connect_password(
        addr: std::net::SocketAddr,
        id: &str,
        ca: &[u8],
        password: &str,
    ) -> Device {
        Device::connect_with(addr, id, false, None, Some((ca, password))).await
    }

    async fn connect_with(
        addr: std::net::SocketAddr,
        id: &str,
        v1: bool,
        certs: Option<&DeviceCerts>,
        login: Option<(&[u8], &str)>,
    ) -> Device {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        if let Some(c) = certs {
            opts.set_transport(rumqttc::Transport::tls(
                c.ca.clone(),
                Some((c.cert.clone(), c.key.clone())),
                None,
            ));
        }
        if let Some((ca, password)) = login {
            opts.set_transport(rumqttc::Transport::tls(ca.to_vec(), None, None));
            opts.set_credentials(id, password);
        }
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::channel(1000);
        let (sub_tx, mut sub_rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if tx.send((p.topic.clone(), v)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(()).await;
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        let prefix = if v1 { "device" } else { "ESP32CAM" };
        for ch in ["cmd", "ack"] {
            client
                .subscribe(format!("{prefix}/{id}/{ch}"), QoS::AtLeastOnce)
                .await
                .unwrap();
        }
        for _ in 0..2 {
            tokio::time::timeout(WAIT, sub_rx.recv())
                .await
                .expect("suback");
        }
        Device {
            id: id.to_string(),
            prefix,
            base: if v1 { 0 } else { 1 },
            client,
            rx,
        }
    }

    pub async fn publish(&self, channel: &str, payload: Vec<u8>) {
        self.client
            .publish(
                format!("{}/{}/{}", self.prefix, self.id, channel),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }

    pub async fn hello(&self, pending: u32) {
        let p = json!({"device_id": self.id, "status": "alive", "pendingImg": pending});
        self.publish("status", p.to_string().into_bytes()).await;
    }

    pub fn metadata(&self, name: &str, image: &[u8], chunk: usize, ts: &str) -> Value {
        json!({
            "device_id": self.id,
            "capture_timestamp": ts,
            "image_name": name,
            "image_size": image.len(),
            "max_chunk_size": chunk,
            "total_chunks_count": image.len().div_ceil(chunk),
            "location": "Barn 1",
            "error": 0,
            "temperature": 22.5,
            "humidity": 50.2,
            "pressure": 1013.2,
            "gas_resistance": 120.5,
            "firmware_extra": "kept"
        })
    }

    pub async fn send_metadata(&self, name: &str, image: &[u8], chunk: usize, ts: &str) {
        let m = self.metadata(name, image, chunk, ts);
        self.publish("data", m.to_string().into_bytes()).await;
    }

    /// The chunk message for index `i` (0-based position in the image).
    pub fn chunk_msg(&self, name: &str, image: &[u8], chunk: usize, i: usize) -> Vec<u8> {
        let part = &image[i * chunk..((i + 1) * chunk).min(image.len())];
        let payload = if self.base == 0 {
            json!(base64::engine::general_purpose::STANDARD.encode(part))
        } else {
            json!(part)
        };
        json!({
            "device_id": self.id,
            "image_name": name,
            "chunk_id": i as u32 + self.base,
            "max_chunk_size": chunk,
            "payload": payload
        })
        .to_string()
        .into_bytes()
    }

    pub async fn send_chunks(&self, name: &str, image: &[u8], chunk: usize, positions: &[usize]) {
        for &i in positions {
            self.publish("data", self.chunk_msg(name, image, chunk, i))
                .await;
        }
    }

    /// Next message from the gateway, with its topic's last level.
    pub async fn recv(&mut self) -> (String, Value) {
        let (topic, v) = tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{}: no message from the gateway within {WAIT:?}", self.id))
            .expect("client alive");
        let last = topic.rsplit('/').next().unwrap_or("").to_string();
        (last, v)
    }

    /// Waits for a message carrying `field`; panics on anything else first.
    pub async fn expect(&mut self, field: &str) -> (String, Value) {
        let (ch, v) = self.recv().await;
        assert!(
            v.get(field).is_some(),
            "{}: expected `{field}`, got {ch}: {v}",
            self.id
        );
        (ch, v)
    }

    /// Waits until the gateway closes the connection (the client's event
    /// loop ends); panics after `within`. Messages before that are dropped.
    pub async fn expect_disconnect(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(_) => panic!("{}: still connected after {within:?}", self.id),
            }
        }
    }

    /// No message within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Ok(Some((t, v))) = tokio::time::timeout(d, self.rx.recv()).await {
            panic!("{}: unexpected message on {t}: {v}", self.id);
        }
    }

    /// The full happy path for one image: METADATA → send_image → chunks → ACK_OK.
    pub async fn deliver(&mut self, name: &str, image: &[u8], chunk: usize, ts: &str) -> Value {
        self.send_metadata(name, image, chunk, ts).await;
        let (_, v) = self.expect("send_image").await;
        assert_eq!(v["send_image"], name);
        let all: Vec<usize> = (0..image.len().div_ceil(chunk)).collect();
        self.send_chunks(name, image, chunk, &all).await;
        let (ch, ack) = self.expect("ACK_OK").await;
        assert_eq!(ch, "ack");
        assert_eq!(ack["image_name"], name);
        ack
    }
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// The real `barngate` binary, built by cargo for the tests.
pub fn barngate() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_barngate"))
}

/// Runs the real `barngate` binary on `data_dir`; panics with its stderr if it fails.
pub fn cli(data_dir: &Path, args: &[&str]) -> std::process::Output {
    let out = barngate()
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("BARNGATE_LOG", "warn")
        .output()
        .expect("run barngate");
    assert!(
        out.status.success(),
        "barngate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The serial that `barngate device issue` printed ("... (serial S) ...").
pub fn issued_serial(stdout: &[u8]) -> String {
    let text = String::from_utf8_lossy(stdout);
    text.split("(serial ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no serial in {text}"))
        .to_string()
}

/// A firmware HELLO with nothing pending.
pub fn hello(mac: &str) -> String {
    json!({"device_id": mac, "status": "alive", "pendingImg": 0}).to_string()
}

/// Polls `cond` until it holds, or panics with `what` after `within`.
pub async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the gateway has counted `reason` rejections `at_least` times.
pub async fn rejected(gw: &Gateway, reason: &str, at_least: u64) {
    let m = gw.metrics.clone();
    eventually(WAIT, &format!("metric {reason} >= {at_least}"), || {
        m.rejected(reason) >= at_least
    })
    .await;
}

/// One HTTP/1.1 request on a new connection to `addr`'s port on 127.0.0.1:
/// (status, head, body; a chunked body decoded). `headers` are whole lines
/// ("Name: value\r\n").
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String, Vec<u8>) {
    http_from("127.0.0.1", addr, method, path, headers, body).await
}

/// [`http`] from the loopback address `src` (127.0.0.2, ...).
pub async fn http_from(
    src: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String, Vec<u8>) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let host = format!("127.0.0.1:{}", addr.port());
    let mut s = sock.connect(host.parse().unwrap()).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP head");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut plain = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16)
                .unwrap();
            if n == 0 {
                break;
            }
            plain.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
            rest = &rest[nl + 2 + n + 2..];
        }
        body = plain;
    }
    (status, head, body)
}
