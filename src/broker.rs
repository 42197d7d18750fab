//! The embedded rumqttd broker and the ingest loop that consumes device
//! messages.
//!
//! rumqttd has no listener: devices reach it only through the gateway's
//! front (`front`), which attaches each device's session in its router.
//! The ingest reads one bounded queue of [`Inbound`] messages fed from two
//! places:
//!
//! - the front hands over a device's QoS 0/1 PUBLISHes to its own topics
//!   directly (the bulk: every chunk), so they skip the router; chunks
//!   arrive parsed ([`Payload::Chunk`]), decoded on the front's threads;
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
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot reserve a free loopback port: {0}")]
    Port(std::io::Error),
    /// Boxed: rumqttd's link error carries a whole router event.
    #[error("embedded broker link: {0}")]
    Link(Box<LinkError>),
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
    /// Starts the device sessions the front serves.
    pub attach: rumqttd::embedded::Attach,
    pub link_tx: LinkTx,
    pub link_rx: LinkRx,
}

/// A free port on 127.0.0.1 (bound, read, released).
pub fn free_loopback_port() -> Result<SocketAddr, BrokerError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(BrokerError::Port)?;
    l.local_addr().map_err(BrokerError::Port)
}

/// The embedded broker's rumqttd settings: no listener (the front attaches
/// every session), the router sized from `[mqtt]`.
pub fn rumqttd_config(cfg: &MqttConfig) -> Config {
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
        ..Default::default()
    }
}

/// The same router with one plaintext v4 listener on `listen`: bare rumqttd,
/// the benchmark's ceiling (`examples/ceiling.rs`).
pub fn rumqttd_listener_config(cfg: &MqttConfig, listen: SocketAddr) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: cfg.max_payload_size,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: false,
    };
    let server = ServerSettings {
        name: "ceiling".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    Config {
        v4: Some(HashMap::from([("ceiling".to_string(), server)])),
        ..rumqttd_config(cfg)
    }
}

/// Starts rumqttd's router on its own thread and returns what starts device
/// sessions in it and the ingest's local link, already subscribed.
pub fn start(cfg: &MqttConfig) -> Result<EmbeddedBroker, BrokerError> {
    let broker = Broker::new(rumqttd_config(cfg));
    let (mut link_tx, link_rx) = broker.link("barngate-ingest")?;
    for f in INGEST_FILTERS {
        link_tx.subscribe(f)?;
    }
    info!("embedded broker started (no listener: the front attaches every session)");
    Ok(EmbeddedBroker {
        attach: broker.attach(),
        link_tx,
        link_rx,
    })
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
