//! Model-based test of the conversation: random fleets of devices (both
//! dialects, an SD queue each, drifting clocks) and random faults (lossy,
//! duplicated and cut streams, disconnects, gateway restarts and crashes,
//! chunks without METADATA, empty/oversize/out-of-range chunks, camera
//! failures, images that can never be accepted), with the invariants checked
//! after every step:
//! - every image a device is ACKed is stored byte-exact, and only of its own
//!   bytes (every image in the model differs from every other);
//! - nothing is sent to a device whose session ended, and a device that
//!   announced an image has an answer or waits for a slot;
//! - no streaming slot is held by a device whose session ended;
//! - held bytes and captures in memory stay within the configured bounds;
//! - each failed capture has exactly one alert;
//!
//! and, at the end, every device drains its whole queue over a few clean wakes.

use super::{Gw, Sent};
use barngate::clock::Clock;
use barngate::config::Config;
use barngate::store::CaptureState;
use base64::Engine as _;
use chrono::Duration;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Good,
    /// The camera failed: `image_size` 0, `error` 4.
    CameraFailure,
    /// More chunks than `ingest.max_chunks_per_image`: never accepted.
    Unacceptable,
}

#[derive(Clone, Debug)]
struct Img {
    name: String,
    bytes: Vec<u8>,
    chunk: usize,
    ts: String,
    kind: Kind,
}

#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    /// Per mille of chunks lost, duplicated.
    loss: u16,
    dup: u16,
    /// Disconnect after this many chunks of this wake.
    cut: Option<u16>,
}

#[derive(Clone, Debug)]
enum Op {
    Wake(usize, Faults),
    Capture(usize, Kind),
    Disconnect(usize),
    Restart,
    Crash,
    Tick(u16),
    /// Chunks for an image the device never announces.
    Stray(usize, u8),
    /// A chunk of the current image that is empty (0), oversize (1) or out of range (2).
    BadChunk(usize, u8),
}

struct Dev {
    mac: String,
    v1: bool,
    queue: VecDeque<Img>,
    connected: bool,
    current: Option<String>,
    rounds: u32,
    /// Sent METADATA and no answer yet.
    awaiting: bool,
    faults: Faults,
    chunks_this_wake: u16,
    made: u32,
    /// Device clock offset, seconds (drift).
    skew: i64,
    rng: u64,
}

impl Dev {
    fn topic(&self, ch: &str) -> String {
        if self.v1 {
            format!("device/{}/{ch}", self.mac)
        } else {
            format!("ESP32CAM/{}/{ch}", self.mac)
        }
    }

    fn roll(&mut self) -> u16 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 1000) as u16
    }

    fn capture(&mut self, idx: usize, kind: Kind, day: i64) {
        self.made += 1;
        let n = 1 + (self.made as usize * 37 + idx * 11) % 200;
        // Unique bytes: the device, the image number and the position.
        let bytes: Vec<u8> = (0..n)
            .map(|i| ((i as u32 * 131 + self.made * 7919 + idx as u32 * 104_729) % 251) as u8)
            .chain([idx as u8, self.made as u8, (self.made >> 8) as u8])
            .collect();
        let t =
            chrono::DateTime::from_timestamp(1_772_438_400 + day * 3600 + self.skew, 0).unwrap();
        self.queue.push_back(Img {
            name: format!("img_{:03}.jpg", self.made),
            bytes: if kind == Kind::CameraFailure {
                Vec::new()
            } else {
                bytes
            },
            chunk: 8 + (self.made as usize * 13) % 40,
            ts: t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            kind,
        });
    }

    fn metadata(&mut self, name: &str) -> Vec<(String, Vec<u8>)> {
        let Some(img) = self.queue.iter().find(|i| i.name == name).cloned() else {
            return Vec::new();
        };
        self.current = Some(img.name.clone());
        self.rounds = 0;
        self.awaiting = true;
        let (size, chunk, error) = match img.kind {
            Kind::Good => (img.bytes.len(), img.chunk, 0),
            Kind::CameraFailure => (0, img.chunk, 4),
            Kind::Unacceptable => (50_000, 1, 0),
        };
        let v = json!({"device_id": self.mac, "capture_timestamp": img.ts, "image_name": img.name,
                       "image_size": size, "max_chunk_size": chunk,
                       "total_chunks_count": size.div_ceil(chunk), "error": error, "temperature": 20.5});
        vec![(self.topic("data"), v.to_string().into_bytes())]
    }

    fn chunk_msg(&self, img: &Img, pos: usize, body: &[u8]) -> (String, Vec<u8>) {
        let id = if self.v1 { pos } else { pos + 1 };
        let payload = if self.v1 {
            json!(base64::engine::general_purpose::STANDARD.encode(body))
        } else {
            json!(body)
        };
        let v = json!({"device_id": self.mac, "image_name": img.name, "chunk_id": id,
                       "max_chunk_size": img.chunk, "payload": payload});
        (self.topic("data"), v.to_string().into_bytes())
    }

    /// The chunks at `positions`, with this wake's faults. `None` when the
    /// stream is cut (the device disconnects).
    fn stream(&mut self, positions: &[usize]) -> (Vec<(String, Vec<u8>)>, bool) {
        let Some(img) = self
            .current
            .as_ref()
            .and_then(|n| self.queue.iter().find(|i| &i.name == n))
            .cloned()
        else {
            return (Vec::new(), false);
        };
        let mut out = Vec::new();
        for &pos in positions {
            if let Some(cut) = self.faults.cut {
                if self.chunks_this_wake >= cut {
                    return (out, true);
                }
            }
            self.chunks_this_wake += 1;
            let Some(body) = img
                .bytes
                .get(pos * img.chunk..((pos + 1) * img.chunk).min(img.bytes.len()))
            else {
                continue;
            };
            if self.roll() < self.faults.loss {
                continue;
            }
            let m = self.chunk_msg(&img, pos, body);
            if self.roll() < self.faults.dup {
                out.push(m.clone());
            }
            out.push(m);
        }
        (out, false)
    }

    fn next_pending(&mut self) -> Vec<(String, Vec<u8>)> {
        match self.queue.front().map(|i| i.name.clone()) {
            Some(n) => self.metadata(&n),
            None => {
                self.current = None;
                Vec::new()
            }
        }
    }
}

struct World {
    g: Gw,
    devs: Vec<Dev>,
    day: i64,
    /// Faults of the model's own making (a bug in the gateway).
    acked_good: usize,
}

impl World {
    fn new(n: usize, v1_mask: u8, cfg: Config, seed: u64) -> World {
        let devs = (0..n)
            .map(|i| Dev {
                mac: format!("B8F86200{:04X}", i + 1),
                v1: v1_mask & (1 << i) != 0,
                queue: VecDeque::new(),
                connected: false,
                current: None,
                rounds: 0,
                awaiting: false,
                faults: Faults::default(),
                chunks_this_wake: 0,
                made: 0,
                skew: (i as i64 - 1) * 170,
                rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 + 1),
            })
            .collect();
        World {
            g: Gw::new(cfg),
            devs,
            day: 0,
            acked_good: 0,
        }
    }

    fn publish(&mut self, msgs: Vec<(String, Vec<u8>)>) -> Sent {
        let mut out = Vec::new();
        for (t, p) in msgs {
            if std::env::var("MODEL_TRACE").is_ok() {
                eprintln!("{t} <- {}", String::from_utf8_lossy(&p[..p.len().min(150)]));
            }
            self.g.e.handle(&t, &p, self.g.clock.now());
        }
        out.extend(self.g.commit());
        out
    }

    fn disconnect(&mut self, d: usize) {
        if self.devs[d].connected {
            self.devs[d].connected = false;
            self.devs[d].awaiting = false;
            let mac = self.devs[d].mac.clone();
            self.g.e.session_ended(&mac, self.g.clock.now());
        }
    }

    /// Delivers the gateway's messages and the devices' answers until quiet.
    fn pump(&mut self, mut sent: Sent) -> Result<(), TestCaseError> {
        for _ in 0..10_000 {
            if sent.is_empty() {
                return Ok(());
            }
            let mut replies = Vec::new();
            let mut cut = Vec::new();
            for (mac, _topic, v) in sent {
                if std::env::var("MODEL_TRACE").is_ok() {
                    eprintln!("gw -> {mac}: {v}");
                }
                let d = self
                    .devs
                    .iter()
                    .position(|x| x.mac == mac)
                    .expect("known device");
                prop_assert!(
                    self.devs[d].connected,
                    "sent to a device whose session ended: {mac} {v}"
                );
                let (msgs, was_cut) = self.react(d, &v)?;
                replies.extend(msgs);
                if was_cut {
                    cut.push(d);
                }
            }
            sent = self.publish(replies);
            for d in &cut {
                self.disconnect(*d);
            }
            if !cut.is_empty() {
                // A slot freed by the disconnect is handed on at once.
                sent.extend(self.g.commit());
                sent.retain(|(m, _, _)| cut.iter().all(|d| *m != self.devs[*d].mac));
            }
        }
        Err(TestCaseError::fail("the conversation never went quiet"))
    }

    fn react(
        &mut self,
        d: usize,
        v: &Value,
    ) -> Result<(Vec<(String, Vec<u8>)>, bool), TestCaseError> {
        let name = v
            .get("image_name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let dev = &mut self.devs[d];
        if v.get("ACK_OK").is_some() {
            dev.awaiting = false;
            if !name.is_empty() {
                if let Some(pos) = dev.queue.iter().position(|i| i.name == name) {
                    let img = dev.queue.remove(pos).unwrap_or_else(|| unreachable!());
                    let cap = self.g.store.latest_capture(&dev.mac, &name).unwrap();
                    let cap = cap.expect("an ACKed image has a capture");
                    if img.kind == Kind::Good {
                        let stored = self.g.store.image_bytes(cap.id).unwrap();
                        prop_assert_eq!(
                            stored.as_deref(),
                            Some(img.bytes.as_slice()),
                            "ACKed image {} of {} not stored byte-exact",
                            name,
                            dev.mac
                        );
                        self.acked_good += 1;
                    } else {
                        prop_assert_eq!(
                            cap.state,
                            CaptureState::Failed,
                            "a released image is recorded failed"
                        );
                    }
                }
                if dev.current.as_deref() == Some(name.as_str()) {
                    dev.current = None;
                }
            }
            if dev.v1 && !name.is_empty() {
                return Ok((Vec::new(), false)); // waits for send_image
            }
            return Ok((dev.next_pending(), false));
        }
        if let Some(n) = v.get("send_image").and_then(Value::as_str) {
            dev.awaiting = false;
            if dev.current.as_deref() == Some(n) {
                let img = dev.queue.iter().find(|i| i.name == n).cloned();
                let Some(img) = img else {
                    return Ok((Vec::new(), false));
                };
                let all: Vec<usize> = (0..img.bytes.len().div_ceil(img.chunk)).collect();
                return Ok(dev.stream(&all));
            }
            if dev.queue.iter().any(|i| i.name == n) {
                return Ok((dev.metadata(n), false));
            }
            return Ok((dev.next_pending(), false));
        }
        if let Some(ids) = v.get("missing_chunks").and_then(Value::as_array) {
            dev.awaiting = false;
            if dev.current.as_deref() != Some(name.as_str()) || dev.rounds >= 3 {
                return Ok((Vec::new(), false)); // gives up; the image stays pending
            }
            dev.rounds += 1;
            let base = if dev.v1 { 0 } else { 1 };
            let pos: Vec<usize> = ids
                .iter()
                .filter_map(Value::as_u64)
                .map(|i| (i as usize).saturating_sub(base))
                .collect();
            return Ok(dev.stream(&pos));
        }
        if v.get("capture_image").is_some() {
            dev.awaiting = false;
            let day = self.day;
            dev.capture(d, Kind::Good, day);
            return Ok((dev.next_pending(), false));
        }
        if v.get("next_wake").is_some() {
            dev.awaiting = false;
            // Sleeps: the connection ends.
            return Ok((Vec::new(), true));
        }
        Ok((Vec::new(), false))
    }

    fn wake(&mut self, d: usize, faults: Faults) -> Result<(), TestCaseError> {
        self.disconnect(d);
        let dev = &mut self.devs[d];
        dev.connected = true;
        dev.faults = faults;
        dev.chunks_this_wake = 0;
        dev.current = None;
        let hello = json!({"device_id": dev.mac, "status": "alive", "pendingImg": dev.queue.len()});
        let msg = (dev.topic("status"), hello.to_string().into_bytes());
        let sent = self.publish(vec![msg]);
        self.pump(sent)
    }

    fn gateway_down(&mut self, crash: bool) {
        for d in &mut self.devs {
            d.connected = false;
            d.awaiting = false;
        }
        if crash {
            // Whatever was not committed is lost; nothing was acknowledged for it.
            let cfg = self.g.cfg.clone();
            self.g.e = Gw::engine(&cfg, &self.g.store, &self.g.metrics);
        } else {
            self.g.restart();
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let n = self.devs.len();
        match *op {
            Op::Wake(d, f) => self.wake(d % n, f)?,
            Op::Capture(d, kind) => {
                let day = self.day;
                self.devs[d % n].capture(d % n, kind, day);
            }
            Op::Disconnect(d) => {
                self.disconnect(d % n);
                let sent = self.g.commit();
                self.pump(sent)?;
            }
            Op::Restart => self.gateway_down(false),
            Op::Crash => self.gateway_down(true),
            Op::Tick(s) => {
                for _ in 0..s {
                    self.g.clock.advance(Duration::seconds(1));
                    self.g.e.tick(self.g.clock.now());
                    let sent = self.g.commit();
                    self.pump(sent)?;
                }
                self.day += 1;
            }
            Op::Stray(d, k) => {
                let dev = &self.devs[d % n];
                if dev.connected {
                    let img = Img {
                        name: format!("stray_{k}.jpg"),
                        bytes: vec![k; 40],
                        chunk: 16,
                        ts: String::new(),
                        kind: Kind::Good,
                    };
                    let msgs = (0..2)
                        .map(|p| dev.chunk_msg(&img, p, &img.bytes[p * 16..(p + 1) * 16]))
                        .collect();
                    let sent = self.publish(msgs);
                    self.pump(sent)?;
                }
            }
            Op::BadChunk(d, k) => {
                let dev = &self.devs[d % n];
                let img = dev
                    .current
                    .as_ref()
                    .and_then(|c| dev.queue.iter().find(|i| &i.name == c))
                    .cloned();
                if let (true, Some(img)) = (dev.connected, img) {
                    let total = img.bytes.len().div_ceil(img.chunk);
                    let msg = match k % 3 {
                        0 => dev.chunk_msg(&img, 0, &[]),
                        1 => dev.chunk_msg(&img, 0, &vec![0xEE; img.chunk + 1]),
                        _ => dev.chunk_msg(&img, total + 3, &[1, 2, 3]),
                    };
                    let sent = self.publish(vec![msg]);
                    self.pump(sent)?;
                }
            }
        }
        self.check()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let e = &self.g.e;
        let connected: Vec<&str> = self
            .devs
            .iter()
            .filter(|d| d.connected)
            .map(|d| d.mac.as_str())
            .collect();
        for mac in e.streaming_devices() {
            prop_assert!(
                connected.contains(&mac.as_str()),
                "slot held by {mac}, whose session ended"
            );
        }
        let waiting = e.waiting_devices();
        for d in &self.devs {
            if d.connected && d.awaiting {
                prop_assert!(
                    waiting.contains(&d.mac),
                    "{} announced an image and has no answer",
                    d.mac
                );
            }
        }
        let held = self.g.metrics.held_chunk_bytes.load(Ordering::Relaxed) as usize;
        prop_assert!(held <= self.g.cfg.ingest.held_chunk_bytes, "held {held}");
        for d in &self.devs {
            let open = self.g.store.open_captures(&d.mac).unwrap().len();
            prop_assert!(
                open <= self.g.cfg.ingest.max_open_captures_per_device,
                "{} has {open} unfinished captures stored",
                d.mac
            );
        }
        let per_device = 1 + self.g.cfg.ingest.max_unannounced_per_device;
        prop_assert!(
            e.active_captures() <= connected.len() * per_device,
            "{} captures in memory",
            e.active_captures()
        );
        Ok(())
    }

    fn check_alerts(&self) -> Result<(), TestCaseError> {
        let alerts = self.g.store.alerts().unwrap();
        for d in &self.devs {
            for c in self.g.store.captures(Some(&d.mac)).unwrap() {
                let camera = c
                    .metadata
                    .as_ref()
                    .is_some_and(|m| m.image_size == 0 && m.error > 0);
                if c.failures > 0 && !camera {
                    let n = alerts.iter().filter(|a| a.capture_id == Some(c.id)).count();
                    prop_assert_eq!(
                        n,
                        1,
                        "capture {} of {} failed {} times: {} alerts",
                        c.id,
                        d.mac,
                        c.failures,
                        n
                    );
                }
            }
        }
        Ok(())
    }

    /// Clean wakes until every queue is empty.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        let bad: usize = self
            .devs
            .iter()
            .map(|d| {
                d.queue
                    .iter()
                    .filter(|i| i.kind == Kind::Unacceptable)
                    .count()
            })
            .sum();
        let rounds = 3 * bad + 3;
        for _ in 0..rounds {
            for d in 0..self.devs.len() {
                self.wake(d, Faults::default())?;
                self.check()?;
                self.disconnect(d);
                let sent = self.g.commit();
                self.pump(sent)?;
            }
            self.g.clock.advance(Duration::hours(8));
            self.g.e.tick(self.g.clock.now());
            self.g.commit();
        }
        for d in &self.devs {
            prop_assert!(
                d.queue.is_empty(),
                "{} still has {:?} pending",
                d.mac,
                d.queue.iter().map(|i| &i.name).collect::<Vec<_>>()
            );
        }
        self.check_alerts()
    }
}

fn faults() -> impl Strategy<Value = Faults> {
    (
        prop_oneof![Just(0u16), 0u16..300],
        prop_oneof![Just(0u16), 0u16..200],
        proptest::option::weighted(0.2, 0u16..40),
    )
        .prop_map(|(loss, dup, cut)| Faults { loss, dup, cut })
}

/// `restarts`: weight of gateway restarts and crashes.
fn op(restarts: u32) -> impl Strategy<Value = Op> {
    let kind = prop_oneof![8 => Just(Kind::Good), 1 => Just(Kind::CameraFailure), 1 => Just(Kind::Unacceptable)];
    prop_oneof![
        6 => (0usize..4, faults()).prop_map(|(d, f)| Op::Wake(d, f)),
        5 => (0usize..4, kind).prop_map(|(d, k)| Op::Capture(d, k)),
        2 => (0usize..4).prop_map(Op::Disconnect),
        restarts => Just(Op::Restart),
        restarts => Just(Op::Crash),
        3 => prop_oneof![1u16..5, 50u16..200].prop_map(Op::Tick),
        1 => (0usize..4, 0u8..6).prop_map(|(d, k)| Op::Stray(d, k)),
        1 => (0usize..4, 0u8..3).prop_map(|(d, k)| Op::BadChunk(d, k)),
    ]
}

fn config(held: usize, streaming: usize, page: usize) -> Config {
    let mut cfg = Config::default();
    cfg.ingest.held_chunk_bytes = held;
    cfg.ingest.max_streaming = streaming;
    cfg.ingest.max_missing_ids = page;
    cfg.ingest.max_chunks_per_image = 10_000;
    cfg.ingest.max_open_captures_per_device = 2;
    cfg
}

/// Cases per test (two tests: ≥ 10,000 in all by default).
fn cases() -> u32 {
    std::env::var("CONVERSATION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

/// A fleet and a gateway: devices, which of them speak v1, the held-bytes
/// budget, streaming slots, missing ids per message, and a seed.
#[derive(Debug, Clone)]
struct Setup {
    n: usize,
    v1_mask: u8,
    held: usize,
    streaming: usize,
    page: usize,
    seed: u64,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1usize..4,
        any::<u8>(),
        prop_oneof![Just(0usize), 100usize..2_000, Just(8usize << 20)],
        1usize..3,
        prop_oneof![Just(2usize), Just(256usize)],
        any::<u64>(),
    )
        .prop_map(|(n, v1_mask, held, streaming, page, seed)| Setup {
            n,
            v1_mask,
            held,
            streaming,
            page,
            seed,
        })
}

fn run(s: &Setup, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut w = World::new(s.n, s.v1_mask, config(s.held, s.streaming, s.page), s.seed);
    for op in ops {
        w.apply(op)?;
    }
    w.drain()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn conversation_model(s in setup(), ops in proptest::collection::vec(op(1), 1..40)) {
        run(&s, &ops)?;
    }

    /// The same with the gateway restarting or crashing often.
    #[test]
    fn conversation_model_with_gateway_restarts(s in setup(), ops in proptest::collection::vec(op(6), 1..40)) {
        run(&s, &ops)?;
    }
}
