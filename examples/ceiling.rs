//! The benchmark's ceiling stack (bench/RESULTS.md): raw rumqttd with the
//! gateway's router settings, and a local link that does nothing with a
//! chunk but count it. Started by `bench run`; prints `ceiling ready
//! mqtt=ADDR` and serves until killed.
//!
//! It is its own example (not a `bench` subcommand) so that it runs on the
//! system allocator, like the gateway, while the load generator uses mimalloc.

use serde_json::Value;
use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

/// rumqttd with the gateway's settings (`broker::rumqttd_config`) and a
/// local link subscribed to `ESP32CAM/#` that does nothing with chunks but
/// count them; it answers HELLO with capture_image, METADATA with
/// send_image, and sends ACK_OK when a device's chunk count reaches the
/// announced total (no validation, no storage, no missing_chunks: run it
/// without loss).
fn main() {
    use rumqttd::{Broker, Notification};
    let addr = barngate::broker::free_loopback_port().expect("a free loopback port");
    let config =
        barngate::broker::rumqttd_config(&barngate::config::MqttConfig::default(), addr, None);
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
    // device → (image name, total, received)
    let mut state: HashMap<String, (String, u64, u64)> = HashMap::new();
    loop {
        let n = match rx.recv() {
            Ok(Some(n)) => n,
            Ok(None) => continue,
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
                let _ = tx.publish(
                    format!("ESP32CAM/{dev}/cmd"),
                    format!(r#"{{"device_id":"{dev}","capture_image":true}}"#),
                );
            }
            "data" => {
                // METADATA is the only small data message without `chunk_id`.
                if !memfind(p, b"\"chunk_id\"") {
                    let v: Value = serde_json::from_slice(p).unwrap_or(Value::Null);
                    let name = v["image_name"].as_str().unwrap_or("").to_string();
                    let total = v["total_chunks_count"].as_u64().unwrap_or(0);
                    let _ = tx.publish(
                        format!("ESP32CAM/{dev}/cmd"),
                        format!(r#"{{"device_id":"{dev}","send_image":"{name}"}}"#),
                    );
                    state.insert(dev, (name, total, 0));
                } else if let Some(s) = state.get_mut(&dev) {
                    s.2 += 1;
                    if s.2 == s.1 {
                        let _ = tx.publish(
                            format!("ESP32CAM/{dev}/ack"),
                            format!(
                                r#"{{"device_id":"{dev}","image_name":"{}","ACK_OK":{{"next_wake_time":"5:30PM"}}}}"#,
                                s.0
                            ),
                        );
                    }
                }
            }
            _ => {}
        }
    }
}

fn memfind(h: &[u8], n: &[u8]) -> bool {
    h.len() >= n.len() && h.windows(n.len()).take(64).any(|w| w == n)
}
