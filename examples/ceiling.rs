//! The benchmark's ceiling stack (bench/RESULTS.md): raw rumqttd with the
//! gateway's router settings, and a local link that does nothing with a
//! chunk but note its id. Started by `bench run` and `bench drain`; prints
//! `ceiling ready mqtt=ADDR` and serves until killed.
//!
//! It is its own example (not a `bench` subcommand) so that it runs on the
//! system allocator, like the gateway, while the load generator uses mimalloc.

use serde_json::Value;
use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

/// The image a device is sending: which chunk ids (1-based) have arrived.
struct Img {
    name: String,
    total: u32,
    got: Vec<bool>,
    count: u32,
    /// The last id of the current round: the image's last chunk, then the
    /// highest id of the latest `missing_chunks`.
    round_last: u32,
    /// When the round's latest chunk arrived (`None`: no chunk this round).
    last_chunk_at: Option<Instant>,
    done: bool,
}

impl Img {
    fn missing(&self) -> Vec<u32> {
        (1..=self.total)
            .filter(|i| !self.got[*i as usize - 1])
            .collect()
    }
}

/// rumqttd with the gateway's settings (`broker::rumqttd_listener_config`) and a
/// local link subscribed to `ESP32CAM/#` that stores nothing. It answers
/// HELLO with capture_image (or, with `pendingImg` > 0, the ACK_OK cue with
/// an empty image name), METADATA with send_image; it notes the chunk ids
/// that arrive and, when a round's last id arrives with ids missing, asks
/// for exactly those at once (`missing_chunks`; if the last id itself was
/// lost, after the quiet gap, `--quiet-gap-ms`, 2000 by default, as the
/// gateway's bench config), and sends ACK_OK when every id is in. No
/// validation, no storage, no relay hop.
fn main() {
    use rumqttd::{local::LinkError, Broker, Notification};
    let mut args = std::env::args().skip(1);
    let mut quiet_gap = Duration::from_millis(2000);
    let mut nodelay = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quiet-gap-ms" => {
                let ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--quiet-gap-ms N");
                quiet_gap = Duration::from_millis(ms);
            }
            "--nodelay" => nodelay = true,
            other => panic!("unknown argument {other}"),
        }
    }
    let addr = barngate::broker::free_loopback_port().expect("a free loopback port");
    let config =
        barngate::broker::rumqttd_listener_config(&barngate::config::MqttConfig::default(), addr);
    let mut broker = Broker::new(config);
    let (mut tx, mut rx) = broker.link("ceiling").unwrap();
    tx.subscribe("ESP32CAM/#").unwrap();
    // rumqttd's error type is large; it is only ever dropped here.
    #[allow(clippy::result_large_err)]
    std::thread::spawn(move || broker.start());
    while std::net::TcpStream::connect(addr).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("ceiling ready mqtt={addr}");
    let _ = std::io::stdout().flush();
    let mut state: HashMap<String, Img> = HashMap::new();
    let tick = Duration::from_millis(50);
    let mut next_sweep = Instant::now() + tick;
    let mut nodelay_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now >= next_sweep {
            // Quiet gap: a round whose last id never came.
            next_sweep = now + tick;
            for (dev, s) in state.iter_mut() {
                if !s.done && s.last_chunk_at.is_some_and(|t| now - t >= quiet_gap) {
                    ask_missing(&mut tx, dev, s);
                }
            }
        }
        let n = match rx.recv_deadline(next_sweep) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(LinkError::RecvTimeout(_)) => continue,
            Err(_) => return,
        };
        let f = match n {
            Notification::Forward(f) => f,
            Notification::Unschedule => {
                let _ = rx.ready();
                continue;
            }
            _ => continue,
        };
        let topic = String::from_utf8_lossy(&f.publish.topic);
        let mut parts = topic.split('/');
        let (Some(_), Some(dev), Some(ch)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let dev = dev.to_string();
        let p = &f.publish.payload;
        match ch {
            "status" => {
                // Before the first reply to a device that has just connected.
                if nodelay && nodelay_at.is_none_or(|t| t.elapsed() > Duration::from_millis(20)) {
                    set_nodelay_all();
                    nodelay_at = Some(Instant::now());
                }
                let v: Value = serde_json::from_slice(p).unwrap_or(Value::Null);
                if v["pendingImg"].as_u64().unwrap_or(0) > 0 {
                    // The cue to send the oldest pending image.
                    let _ = tx.publish(
                        format!("ESP32CAM/{dev}/ack"),
                        format!(
                            r#"{{"device_id":"{dev}","image_name":"","ACK_OK":{{"next_wake_time":"5:30PM"}}}}"#
                        ),
                    );
                } else {
                    let _ = tx.publish(
                        format!("ESP32CAM/{dev}/cmd"),
                        format!(r#"{{"device_id":"{dev}","capture_image":true}}"#),
                    );
                }
            }
            "data" => {
                // METADATA is the only small data message without `chunk_id`.
                let Some(id) = chunk_id(p) else {
                    let v: Value = serde_json::from_slice(p).unwrap_or(Value::Null);
                    let name = v["image_name"].as_str().unwrap_or("").to_string();
                    let total = v["total_chunks_count"].as_u64().unwrap_or(0) as u32;
                    let _ = tx.publish(
                        format!("ESP32CAM/{dev}/cmd"),
                        format!(r#"{{"device_id":"{dev}","send_image":"{name}"}}"#),
                    );
                    state.insert(
                        dev,
                        Img {
                            name,
                            total,
                            got: vec![false; total as usize],
                            count: 0,
                            round_last: total,
                            last_chunk_at: None,
                            done: false,
                        },
                    );
                    continue;
                };
                let Some(s) = state.get_mut(&dev) else {
                    continue;
                };
                if s.done || id == 0 || id > s.total {
                    continue;
                }
                let seen = &mut s.got[id as usize - 1];
                if !*seen {
                    *seen = true;
                    s.count += 1;
                }
                s.last_chunk_at = Some(Instant::now());
                if s.count == s.total {
                    s.done = true;
                    let _ = tx.publish(
                        format!("ESP32CAM/{dev}/ack"),
                        format!(
                            r#"{{"device_id":"{dev}","image_name":"{}","ACK_OK":{{"next_wake_time":"5:30PM"}}}}"#,
                            s.name
                        ),
                    );
                } else if id == s.round_last {
                    ask_missing(&mut tx, &dev, s);
                }
            }
            _ => {}
        }
    }
}

/// `--nodelay`: TCP_NODELAY on every socket of this process. rumqttd does not
/// set it on the connections it accepts, so a small reply written while an
/// earlier one (a PUBACK) is unacknowledged waits for the device's delayed
/// ACK (Nagle); the gateway's front sets it on every device connection.
/// rumqttd offers no hook on accept, so the sockets are found in
/// /proc/self/fd (the listener and non-TCP sockets just refuse the option).
fn set_nodelay_all() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for e in dir.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let is_socket =
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        if is_socket {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads `one` only; a wrong fd just fails.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

/// `missing_chunks` with every id not yet in; starts the next round.
fn ask_missing(tx: &mut rumqttd::local::LinkTx, dev: &str, s: &mut Img) {
    let missing = s.missing();
    s.round_last = missing.iter().copied().max().unwrap_or(s.total);
    s.last_chunk_at = None;
    let ids = missing
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let _ = tx.publish(
        format!("ESP32CAM/{dev}/cmd"),
        format!(
            r#"{{"device_id":"{dev}","image_name":"{}","missing_chunks":[{ids}]}}"#,
            s.name
        ),
    );
}

/// The `chunk_id` of a chunk message (it precedes the payload), or `None`
/// for a message without one (METADATA).
fn chunk_id(p: &[u8]) -> Option<u32> {
    const KEY: &[u8] = b"\"chunk_id\":";
    let head = &p[..p.len().min(256)];
    let at = head.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = p[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    Some(digits.fold(0u32, |n, b| n.wrapping_mul(10) + (b - b'0') as u32))
}
