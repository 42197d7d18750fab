//! The embedded rumqttd broker and the ingest loop that consumes device
//! messages.
//!
//! rumqttd listens on loopback only; devices reach it through the gateway's
//! front (`front`). The ingest reads one bounded queue of [`Inbound`]
//! messages fed from two places:
//!
//! - the front hands over a device's QoS 0/1 PUBLISHes to its own topics
//!   directly (the bulk: every chunk), so they skip the loopback socket and
//!   the router; chunks arrive parsed ([`Payload::Chunk`]), decoded on the
//!   front's threads;
//! - a local link subscribed to both dialects' device topics carries what
//!   goes through the broker (wills, retained or QoS 2 publishes). Its
//!   pump thread honours the link contract: on `Notification::Unschedule` it
//!   calls `ready()`, or the router would stop forwarding.
//!
//! The gateway's own publishes (commands, ACK_OK) go out through
//! [`Replies`]: the local link into the broker, which owns the device
//! sessions and subscriptions and delivers them.

use crate::clock::SharedClock;
use crate::config::MqttConfig;
pub use crate::ingest::queue::{ingest_queue, Inbound, Payload, INGEST_QUEUE};
use crate::ingest::{Engine, IngestError, Publish};
use crate::registry::RegistryOp;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::{Broker, Config, ConnectionSettings, Notification, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot reserve a loopback port for the embedded broker: {0}")]
    Port(std::io::Error),
    /// Boxed: rumqttd's link error carries a whole router event.
    #[error("embedded broker link: {0}")]
    Link(Box<LinkError>),
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Ingest(#[from] IngestError),
}

impl From<LinkError> for BrokerError {
    fn from(e: LinkError) -> Self {
        BrokerError::Link(Box::new(e))
    }
}

/// The topic filters the ingest consumes: both dialects, every channel, so
/// that publishes to unknown topics are seen (and counted) too.
pub const INGEST_FILTERS: [&str; 2] = ["ESP32CAM/#", "device/#"];

/// Moves what the broker forwards on the ingest's local link into the
/// ingest queue, until either side is gone (blocking; own thread).
pub fn pump_link(mut rx: LinkRx, to_ingest: flume::Sender<Inbound>) {
    loop {
        match rx.recv() {
            Ok(Some(Notification::Forward(f))) => {
                let m = Inbound {
                    topic: f.publish.topic,
                    payload: Payload::Raw(f.publish.payload),
                };
                if to_ingest.send(m).is_err() {
                    return;
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                if rx.ready().is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

pub struct EmbeddedBroker {
    /// Where the broker listens (loopback).
    pub addr: SocketAddr,
    pub link_tx: LinkTx,
    pub link_rx: LinkRx,
}

/// A free port on 127.0.0.1 (bound, read, released).
pub fn free_loopback_port() -> Result<SocketAddr, BrokerError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(BrokerError::Port)?;
    l.local_addr().map_err(BrokerError::Port)
}

/// The embedded broker's rumqttd settings: one plaintext v4 listener on
/// `listen` (loopback), the router sized from `[mqtt]`. `auth_secret`, when
/// given, is the password every connection must present. The benchmark's
/// ceiling (`examples/ceiling.rs`) runs on the same settings.
pub fn rumqttd_config(cfg: &MqttConfig, listen: SocketAddr, auth_secret: Option<String>) -> Config {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: cfg.max_payload_size,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: false,
    };
    if let Some(secret) = auth_secret {
        connections.set_auth_handler(move |_client_id, _user, pass| {
            let ok = pass == secret;
            async move { ok }
        });
    }
    let server = ServerSettings {
        name: "barngate-loopback".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: cfg.max_connections + 16,
            max_outgoing_packet_count: 200,
            max_segment_size: cfg.segment_size,
            max_segment_count: cfg.segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("loopback".to_string(), server)])),
        ..Default::default()
    }
}

/// Starts rumqttd on a loopback port, on its own threads, and returns the
/// ingest's local link, already subscribed. `auth_secret`, when given, is
/// the password every MQTT connection must present (the front supplies it).
pub fn start(cfg: &MqttConfig, auth_secret: Option<String>) -> Result<EmbeddedBroker, BrokerError> {
    let addr = free_loopback_port()?;
    let config = rumqttd_config(cfg, addr, auth_secret.clone());
    let mut broker = Broker::new(config);
    let (mut link_tx, link_rx) = broker.link("barngate-ingest")?;
    for f in INGEST_FILTERS {
        link_tx.subscribe(f)?;
    }
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    // The listener binds on the broker thread; wait until it admits a
    // client. A bare TCP connect would do, but rumqttd logs every connection
    // that sends no CONNECT as an error; a real MQTT session does not.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let err = match probe(addr, auth_secret.as_deref()) {
            Ok(()) => break,
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(BrokerError::Port(std::io::Error::other(format!(
                "broker on {addr} did not admit the gateway: {err}"
            ))));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    info!(%addr, "embedded broker listening on loopback");
    Ok(EmbeddedBroker {
        addr,
        link_tx,
        link_rx,
    })
}

/// One MQTT session with the broker: CONNECT (with the front's credentials
/// when the broker checks them), CONNACK accepted, close.
fn probe(addr: SocketAddr, secret: Option<&str>) -> std::io::Result<()> {
    use rumqttd::protocol::v4::V4;
    use rumqttd::protocol::{Connect, Login, Packet, Protocol};
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let connect = Connect {
        keep_alive: 10,
        client_id: "barngate-probe".into(),
        clean_session: true,
    };
    let login = secret.map(|p| Login {
        username: crate::front::BROKER_USER.into(),
        password: p.to_string(),
    });
    let mut buf = bytes::BytesMut::new();
    V4.write(Packet::Connect(connect, None, None, None, login), &mut buf)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    s.write_all(&buf)?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(std::io::Error::other(format!(
            "broker refused the probe: CONNACK {connack:02x?}"
        )));
    }
    // Closed without a DISCONNECT packet: rumqttd 0.20 handles a DISCONNECT
    // and then the closed socket as two removals and logs the second as an
    // error ("no-connection id … is already gone").
    Ok(())
}

/// Where the ingest's publishes go: the broker, through the local link.
pub struct Replies {
    link: LinkTx,
}

impl Replies {
    pub fn new(link: LinkTx) -> Replies {
        Replies { link }
    }

    fn publish(&mut self, p: Publish) -> Result<(), BrokerError> {
        self.link.publish(p.topic, p.payload)?;
        Ok(())
    }

    fn publish_all(&mut self, out: Vec<Publish>) -> Result<(), BrokerError> {
        out.into_iter().try_for_each(|p| self.publish(p))
    }
}

/// Most messages handled between two commits.
const MAX_BATCH: usize = 4096;

/// The ingest loop (blocking; run it on its own thread): feeds the engine,
/// ticks its timers, commits, then publishes what the commit allowed.
pub fn run_ingest(
    mut engine: Engine,
    mut out: Replies,
    inbound: flume::Receiver<Inbound>,
    clock: SharedClock,
    stop: Arc<AtomicBool>,
    registry: flume::Receiver<RegistryOp>,
) -> Result<(), BrokerError> {
    let tick_every = Duration::from_millis(50);
    let mut last_tick = Instant::now();
    let handle = |engine: &mut Engine, m: Inbound| match std::str::from_utf8(&m.topic) {
        Ok(topic) => match m.payload {
            Payload::Raw(p) => engine.handle(topic, &p, clock.now()),
            Payload::Chunk(c) => engine.handle_chunk(topic, c, clock.now()),
            Payload::SessionEnded => engine.session_ended(topic, clock.now()),
        },
        Err(_) => engine.reject_topic_bytes(),
    };
    loop {
        if stop.load(Ordering::Relaxed) {
            out.publish_all(engine.flush(clock.now())?)?;
            return Ok(());
        }
        // Wait up to 20 ms for the first message, then take what is queued.
        match inbound.recv_deadline(Instant::now() + Duration::from_millis(20)) {
            Ok(m) => {
                handle(&mut engine, m);
                for m in inbound.try_iter().take(MAX_BATCH - 1) {
                    handle(&mut engine, m);
                }
                let left = inbound.len() as u64;
                engine.metrics().ingest_queue.store(left, Ordering::Relaxed);
            }
            Err(flume::RecvTimeoutError::Timeout) => {
                engine.metrics().ingest_queue.store(0, Ordering::Relaxed)
            }
            // Every sender gone: only shutdown is left to wait for.
            Err(flume::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(20))
            }
        }
        // Admin registry changes: applied and committed before the answer.
        while let Ok(op) = registry.try_recv() {
            let r = engine.apply_registry(&op.change, clock.now());
            if r.is_ok() {
                out.publish_all(engine.commit(clock.now())?)?;
            }
            let _ = op.reply.send(r.map_err(|e| e.to_string()));
        }
        if last_tick.elapsed() >= tick_every {
            engine.tick(clock.now());
            last_tick = Instant::now();
        }
        if engine.wants_commit() {
            out.publish_all(engine.commit(clock.now())?)?;
        }
    }
}
