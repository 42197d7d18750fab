//! The device-facing front: the only way into the embedded broker.
//!
//! It owns the device listeners. The TLS listener requires a client
//! certificate from the site CA (rustls, checked against the live revocation
//! set); the device's identity is the MAC in that certificate. The optional
//! password listener (TLS, server authentication only) takes the CONNECT
//! user name as the MAC and checks the password against its argon2 hash
//! ([`crate::devpass`]); the password is bound to a certificate serial, so
//! the same revocation set covers it. The optional plaintext listener
//! (loopback only) takes the CONNECT client id as the identity. Whichever
//! listener, the front then reads the MQTT packets the device sends (parsed
//! with `rumqttd::protocol::v4`) and enforces:
//!
//! - the first packet is CONNECT and its client id is the identity;
//! - PUBLISH (and the CONNECT will) only to the device's own `…/status` and
//!   `…/data`; SUBSCRIBE only to its own `…/cmd` and `…/ack` (both dialects).
//!
//! A violation closes the connection before any of it reaches the broker.
//!
//! A device's QoS 0/1 PUBLISHes to its own topics (every chunk) do not go
//! through the broker: the front hands them to the ingest queue
//! ([`crate::ingest::queue::Inbound`]; a CHUNK already decoded, on the front's
//! threads rather than the one ingest thread) and answers QoS 1 with its own
//! PUBACK. The front enforces the device's keep-alive itself. The other
//! way, the ingest's replies to a clean session go straight into its
//! downlink too ([`direct`]).
//!
//! A clean session is *local* (`mqtt.local_sessions`, the default): the
//! front also answers CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ and the QoS 2
//! handshake itself, hands retained publishes to the ingest like any other
//! and the will on a close without DISCONNECT, and opens no connection into
//! the broker. A persistent session goes *through the broker*, which keeps
//! it: the front opens a loopback connection for it and forwards every
//! packet but the ingest's publishes, with the CONNECT re-encoded with the
//! per-process broker secret as its credentials (a device's own password
//! never reaches the broker, so the loopback broker admits the front and
//! nothing else) and the longest keep-alive; a publish waits until the
//! broker has acknowledged the device's CONNECT and SUBSCRIBEs, so the
//! ingest's reply always finds the subscription in place, and its PUBACKs
//! are written between whole packets of the broker's downlink.
//!
//! The front keeps one session per device: a new connection of the same MAC
//! closes the old one first (a rumqttd quirk lets the old one kick the new
//! one otherwise), and a revocation closes the sessions of the revoked
//! certificate at once.

mod direct;

use direct::{encode_publish, Outgoing};
pub use direct::{Outlet, FIRST_PKID};

use crate::devpass::{self, PasswordStore};
use crate::ingest::queue::{Inbound, Payload};
use crate::metrics::Metrics;
use crate::pki::{peer_identity, SharedRevoked};
use crate::protocol::{normalize_device_id, parse_topic, Channel, DataMessage};
use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v4::{check, V4};
use rumqttd::protocol::{
    Error as MqttError, LastWill, Login, Packet, Protocol, QoS, SubAck, SubscribeReasonCode,
};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// The user name the front presents to the loopback broker.
pub const BROKER_USER: &str = "barngate-front";

/// How long a new connection waits for the old session of the same device
/// to be torn down.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

/// Bytes of replies (PUBACKs, a local session's answers) waiting for a
/// device's downlink before its uplink waits: a device that stops reading
/// stops being read.
const REPLIES_MAX: usize = 16 * 1024;

/// The uplink's replies to a device (PUBACKs; in a local session also
/// SUBACK, UNSUBACK, PINGRESP, PUBREC and PUBCOMP), encoded, on their way
/// to the downlink. Not a channel: a channel allocates its first block of slots
/// up front (≈ 1 KiB for each of a thousand idle sessions) and each batch
/// was a `Vec` of its own; here two buffers take turns. Both halves of a
/// session run in its one task, so the lock is never contended.
#[derive(Default)]
struct Replies {
    bytes: Mutex<Vec<u8>>,
    /// Wakes the downlink: there are bytes.
    queued: tokio::sync::Notify,
    /// Wakes the uplink: the downlink took the bytes.
    taken: tokio::sync::Notify,
}

impl Replies {
    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `packets` (whole packets), after waiting while
    /// [`REPLIES_MAX`] bytes are already waiting.
    async fn push(&self, packets: &[u8]) {
        if packets.is_empty() {
            return;
        }
        loop {
            let taken = self.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            {
                let mut b = self.bytes();
                if b.len() < REPLIES_MAX {
                    b.extend_from_slice(packets);
                    break;
                }
            }
            taken.await;
        }
        self.queued.notify_one();
    }

    /// Moves what is waiting to the end of `out`.
    fn take_into(&self, out: &mut Vec<u8>) {
        let mut b = self.bytes();
        if b.is_empty() {
            return;
        }
        if out.is_empty() {
            std::mem::swap(&mut *b, out);
        } else {
            out.extend_from_slice(&b);
            b.clear();
        }
        drop(b);
        self.taken.notify_one();
    }

    /// Until something is pushed (at once if something was pushed since the
    /// last wait).
    async fn wait(&self) {
        self.queued.notified().await
    }
}

/// Settings of the front.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// The loopback broker.
    pub upstream: SocketAddr,
    /// The ingest queue: devices' own publishes go there directly.
    pub ingest: flume::Sender<Inbound>,
    /// The broker's per-process secret (CONNECT password).
    pub secret: Arc<str>,
    pub max_connections: usize,
    /// TLS handshakes in progress at once, per listener (the certificate
    /// and the password listener each have this many).
    pub max_handshakes: usize,
    /// Of those, at most this many from one source address.
    pub max_handshakes_per_ip: usize,
    /// TLS handshake timeout; also the longest wait for the CONNECT packet.
    pub handshake_timeout: Duration,
    /// Largest MQTT packet accepted from a device.
    pub max_packet_size: usize,
    /// Device password hashes, for the password listener.
    pub passwords: PasswordStore,
    /// Clean sessions are local: the front answers CONNECT, SUBSCRIBE,
    /// PINGREQ and QoS 2 itself and hands a will to the ingest, with no
    /// broker connection behind the device (`mqtt.local_sessions`).
    pub local_sessions: bool,
    /// Most topic filters in one SUBSCRIBE (`mqtt.max_filters_per_subscribe`).
    pub max_filters_per_subscribe: usize,
    /// Most distinct topic filters one connection subscribes to
    /// (`mqtt.max_filters_per_session`).
    pub max_filters_per_session: usize,
}

/// A device's CONNECT, checked.
struct Connect {
    /// The device id (normalised MAC).
    device: String,
    /// The device's keep-alive, seconds.
    keep_alive: u16,
    clean: bool,
    will: Option<LastWill>,
    /// The CONNECT for the broker: the broker secret as credentials, the
    /// longest keep-alive (the front enforces the device's own).
    bytes: BytesMut,
}

/// Who a connection is, once authenticated.
#[derive(Debug, Clone)]
struct Identity {
    mac: String,
    /// The certificate serial the credentials belong to (revocation).
    serial: String,
    /// "certificate" or "password".
    via: &'static str,
}

/// How a connection authenticates.
enum Auth {
    /// A verified client certificate.
    Certificate(Identity),
    /// User name (the MAC) and password in the CONNECT.
    Password,
    /// Plaintext loopback listener: the client id is trusted.
    Trusted,
}

/// Which TLS listener accepted a connection.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum TlsMode {
    ClientCertificate,
    Password,
}

/// A password login refused: metric reason, CONNACK return code, log text.
struct Refusal {
    reason: &'static str,
    code: Option<u8>,
    device: String,
    detail: String,
}

/// MQTT 3.1.1 CONNACK return codes.
const CONNACK_UNSUPPORTED_PROTOCOL: u8 = 1;
const CONNACK_IDENTIFIER_REJECTED: u8 = 2;
const CONNACK_BAD_CREDENTIALS: u8 = 4;
const CONNACK_NOT_AUTHORIZED: u8 = 5;

/// A CONNACK refusing a CONNECT with return code `code`.
fn connack_refusal(code: u8) -> [u8; 4] {
    [CONNACK << 4, 0x02, 0x00, code]
}

/// Why a connection was closed by the front (also the metric reason).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Violation {
    NotConnect,
    ClientIdMismatch {
        client_id: String,
    },
    BadClientId {
        client_id: String,
    },
    Publish {
        topic: String,
    },
    Subscribe {
        filter: String,
    },
    /// A CONNECT whose will is on a topic the device may not publish to.
    Will {
        topic: String,
    },
    /// A CONNECT of another MQTT version (3.1's `MQIsdp`, 5, or unknown).
    UnsupportedProtocol {
        level: u8,
    },
    SecondConnect,
    ServerPacket,
    Malformed(String),
    /// Nothing from the device within 1.5 × its keep-alive.
    KeepAlive {
        secs: u16,
    },
    /// A SUBSCRIBE with more filters than one may carry, or one that takes
    /// the session past its distinct filters.
    TooManyFilters {
        count: usize,
        max: usize,
        per: &'static str,
    },
    /// The broker did not acknowledge the CONNECT or a SUBSCRIBE in time.
    BrokerTimeout,
    /// Not a violation: the connection broke.
    Io(String),
}

impl Violation {
    fn reason(&self) -> &'static str {
        match self {
            Violation::NotConnect | Violation::SecondConnect | Violation::ServerPacket => {
                "mqtt_protocol_violation"
            }
            Violation::ClientIdMismatch { .. } => "client_id_mismatch",
            Violation::BadClientId { .. } => "bad_client_id",
            Violation::Publish { .. } => "publish_not_allowed",
            Violation::Subscribe { .. } => "subscribe_not_allowed",
            Violation::Will { .. } => "will_not_allowed",
            Violation::UnsupportedProtocol { .. } => "unsupported_protocol",
            Violation::Malformed(_) => "malformed_mqtt",
            Violation::KeepAlive { .. } => "keepalive_timeout",
            Violation::TooManyFilters { .. } => "too_many_filters",
            Violation::BrokerTimeout => "broker_timeout",
            Violation::Io(_) => "connection_error",
        }
    }

    /// The CONNACK return code that refuses a CONNECT for this reason
    /// (MQTT 3.1.1 §3.2.2.3); `None` where the connection is just closed
    /// (a packet that is not a CONNECT, or not MQTT at all).
    fn connack_code(&self) -> Option<u8> {
        match self {
            Violation::UnsupportedProtocol { .. } => Some(CONNACK_UNSUPPORTED_PROTOCOL),
            Violation::ClientIdMismatch { .. } | Violation::BadClientId { .. } => {
                Some(CONNACK_IDENTIFIER_REJECTED)
            }
            Violation::Will { .. } => Some(CONNACK_NOT_AUTHORIZED),
            _ => None,
        }
    }

    /// What kind of close this is, for the log: only a device claiming or
    /// reaching for another identity's client id or topics is an identity
    /// violation (counted in `barngate_identity_violations_total`).
    fn class(&self) -> &'static str {
        match self {
            Violation::ClientIdMismatch { .. }
            | Violation::BadClientId { .. }
            | Violation::Publish { .. }
            | Violation::Subscribe { .. }
            | Violation::Will { .. } => "identity violation",
            Violation::KeepAlive { .. } => "keep-alive expired",
            Violation::TooManyFilters { .. } => "limit exceeded",
            Violation::BrokerTimeout => "broker timeout",
            Violation::UnsupportedProtocol { .. } => "unsupported protocol",
            Violation::NotConnect
            | Violation::SecondConnect
            | Violation::ServerPacket
            | Violation::Malformed(_) => "MQTT protocol error",
            Violation::Io(_) => "connection error",
        }
    }

    fn is_identity(&self) -> bool {
        self.class() == "identity violation"
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::NotConnect => write!(f, "first packet is not CONNECT"),
            Violation::ClientIdMismatch { client_id } => {
                write!(
                    f,
                    "CONNECT client id {client_id:?} is not the authenticated MAC"
                )
            }
            Violation::BadClientId { client_id } => {
                write!(f, "CONNECT client id {client_id:?} is not a device id")
            }
            Violation::Publish { topic } => write!(f, "publish to {topic:?} not allowed"),
            Violation::Subscribe { filter } => write!(f, "subscribe to {filter:?} not allowed"),
            Violation::Will { topic } => write!(f, "will on {topic:?} not allowed"),
            Violation::UnsupportedProtocol { level } => {
                write!(
                    f,
                    "CONNECT of protocol level {level}; only 4 (MQTT 3.1.1) is served"
                )
            }
            Violation::SecondConnect => write!(f, "second CONNECT"),
            Violation::ServerPacket => write!(f, "server-only packet from a device"),
            Violation::Malformed(e) => write!(f, "malformed MQTT: {e}"),
            Violation::KeepAlive { secs } => {
                write!(f, "no packet within 1.5 × the keep-alive of {secs} s")
            }
            Violation::TooManyFilters { count, max, per } => {
                write!(
                    f,
                    "{count} topic filters in one {per}, at most {max} allowed"
                )
            }
            Violation::BrokerTimeout => {
                write!(
                    f,
                    "the embedded broker did not acknowledge the session in time"
                )
            }
            Violation::Io(e) => write!(f, "{e}"),
        }
    }
}

struct Session {
    id: u64,
    serial: Option<String>,
    kill: watch::Sender<bool>,
    /// The downlink the ingest can write to directly (clean sessions).
    direct: Option<Arc<direct::Direct>>,
}

struct Inner {
    cfg: FrontConfig,
    metrics: Arc<Metrics>,
    revoked: SharedRevoked,
    sessions: direct::Sessions,
    connections: Arc<Semaphore>,
    /// Handshake budgets: the certificate listener's and the password
    /// listener's (which also covers the password check).
    handshakes: Arc<Semaphore>,
    password_handshakes: Arc<Semaphore>,
    /// Handshakes in progress per listener and source address.
    handshakes_by_ip: Arc<Mutex<HashMap<(TlsMode, IpAddr), usize>>>,
    /// Concurrent argon2 verifications (each takes ~19 MiB and a core):
    /// one core is always left for the devices already connected.
    verifications: Arc<Semaphore>,
    next_id: AtomicU64,
    /// Devices that had a persistent session in the broker since it
    /// started: their next clean CONNECT goes through the broker, which
    /// discards that session's state (a local session would leave it).
    persistent: Mutex<HashSet<String>>,
}

/// The device front; cheap to clone (shared state).
#[derive(Clone)]
pub struct Front {
    inner: Arc<Inner>,
}

/// How a TLS handshake failure is reported: (metric reason, log text).
fn classify_tls_error(e: &std::io::Error) -> (&'static str, String) {
    use rustls::{CertificateError as C, Error as E};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return ("tls_handshake_failed", e.to_string());
    };
    let reason = match tls {
        E::NoCertificatesPresented => "tls_no_certificate",
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => "tls_unknown_ca",
            C::Expired | C::ExpiredContext { .. } => "tls_expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "tls_not_yet_valid",
            C::Revoked => "tls_revoked",
            _ => "tls_bad_certificate",
        },
        _ => "tls_handshake_failed",
    };
    (reason, tls.to_string())
}

impl Front {
    pub fn new(cfg: FrontConfig, metrics: Arc<Metrics>, revoked: SharedRevoked) -> Front {
        Front {
            inner: Arc::new(Inner {
                connections: Arc::new(Semaphore::new(cfg.max_connections)),
                handshakes: Arc::new(Semaphore::new(cfg.max_handshakes)),
                password_handshakes: Arc::new(Semaphore::new(cfg.max_handshakes)),
                handshakes_by_ip: Arc::default(),
                verifications: Arc::new(Semaphore::new(password_checks(
                    std::thread::available_parallelism().map_or(1, |n| n.get()),
                ))),
                cfg,
                metrics,
                revoked,
                sessions: Arc::new(Mutex::new(HashMap::new())),
                next_id: AtomicU64::new(1),
                persistent: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// The ingest's handle for publishing straight into device sessions.
    pub fn outlet(&self) -> Outlet {
        Outlet {
            sessions: self.inner.sessions.clone(),
            metrics: self.inner.metrics.clone(),
        }
    }

    /// Devices with an open session now.
    pub fn connected(&self) -> Vec<String> {
        let s = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = s.keys().cloned().collect();
        v.sort();
        v
    }

    /// Adds serials to the live revocation set (new handshakes fail), then
    /// closes the open sessions made with them under the sessions lock (a
    /// session registering checks the set under that lock: `take_over`).
    /// Returns the devices closed.
    pub fn revoke(&self, serials: &[String]) -> Vec<String> {
        {
            let mut set = self
                .inner
                .revoked
                .write()
                .unwrap_or_else(|p| p.into_inner());
            for s in serials {
                set.insert(s.clone());
            }
        }
        let sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut closed = Vec::new();
        for (mac, s) in sessions.iter() {
            if s.serial.as_ref().is_some_and(|x| serials.contains(x)) {
                let _ = s.kill.send(true);
                closed.push(mac.clone());
            }
        }
        for mac in &closed {
            info!(device = %mac, "session closed: certificate revoked");
        }
        closed
    }

    /// True when `serial` is in the live revocation set.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.inner
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
    }

    fn refuse(&self, reason: &'static str) {
        Metrics::inc(&self.inner.metrics.connections_refused);
        self.inner.metrics.reject(reason);
    }

    /// Counts a connection closed for `v`, by reason; identity violations
    /// also in their own counter.
    fn count(&self, v: &Violation) {
        self.inner.metrics.reject(v.reason());
        if v.is_identity() {
            Metrics::inc(&self.inner.metrics.identity_violations);
        }
    }

    /// Accepts TLS connections with client certificates until shutdown.
    pub async fn run_tls(
        self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: watch::Receiver<bool>,
    ) {
        self.accept_tls(listener, tls, shutdown, TlsMode::ClientCertificate)
            .await
    }

    /// Accepts TLS connections that log in with a device password (`tls`
    /// asks for no client certificate) until shutdown.
    pub async fn run_password(
        self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: watch::Receiver<bool>,
    ) {
        self.accept_tls(listener, tls, shutdown, TlsMode::Password)
            .await
    }

    async fn accept_tls(
        self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        mut shutdown: watch::Receiver<bool>,
        mode: TlsMode,
    ) {
        let acceptor = TlsAcceptor::from(tls);
        loop {
            let Some((sock, peer, permit)) = self.accept(&listener, &mut shutdown).await else {
                return;
            };
            let Some(hs) = self.handshake_slot(mode, peer) else {
                continue;
            };
            let front = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = sock.set_nodelay(true);
                let timeout = front.inner.cfg.handshake_timeout;
                let sock = ReadAhead::new(sock);
                let stream = match tokio::time::timeout(timeout, acceptor.accept(sock)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let (reason, detail) = classify_tls_error(&e);
                        front.refuse(reason);
                        warn!(%peer, reason, error = %detail, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        front.refuse("tls_handshake_timeout");
                        warn!(%peer, timeout_ms = timeout.as_millis() as u64, "TLS handshake refused: timed out");
                        return;
                    }
                };
                if mode == TlsMode::Password {
                    debug!(%peer, "TLS handshake complete (password listener)");
                    // The handshake slot is held until the password is checked.
                    front
                        .session(
                            tokio::io::split(stream),
                            peer,
                            Auth::Password,
                            permit,
                            Some(hs),
                        )
                        .await;
                    return;
                }
                drop(hs);
                let id = match stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                {
                    Some(cert) => match peer_identity(cert) {
                        Ok(id) => id,
                        Err(e) => {
                            front.refuse("tls_bad_certificate");
                            warn!(%peer, error = %e, "TLS connection refused: no device identity in the certificate");
                            return;
                        }
                    },
                    None => {
                        front.refuse("tls_no_certificate");
                        warn!(%peer, "TLS connection refused: no client certificate");
                        return;
                    }
                };
                // The verifier checked the serial during a full handshake;
                // this check holds for any handshake, a resumed one included
                // (rustls does not verify a resumed session's certificate).
                if front.is_revoked(&id.serial_hex) {
                    front.refuse("tls_revoked");
                    warn!(%peer, device = %id.mac, serial = %id.serial_hex, "TLS connection refused: certificate revoked");
                    return;
                }
                debug!(%peer, device = %id.mac, serial = %id.serial_hex, "TLS handshake complete");
                let id = Identity {
                    mac: id.mac,
                    serial: id.serial_hex,
                    via: "certificate",
                };
                front
                    .session(
                        tokio::io::split(stream),
                        peer,
                        Auth::Certificate(id),
                        permit,
                        None,
                    )
                    .await;
            });
        }
    }

    /// Accepts plaintext connections (loopback only) until shutdown.
    pub async fn run_plain(self, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        loop {
            let Some((sock, peer, permit)) = self.accept(&listener, &mut shutdown).await else {
                return;
            };
            let front = self.clone();
            tokio::spawn(async move {
                let _ = sock.set_nodelay(true);
                front
                    .session(tokio::io::split(sock), peer, Auth::Trusted, permit, None)
                    .await;
            });
        }
    }

    /// The next connection within `mqtt.max_connections`; `None` on shutdown.
    async fn accept(
        &self,
        listener: &TcpListener,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
        loop {
            let (sock, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => { warn!(error = %e, "accept failed"); continue; }
                },
                _ = shutdown.changed() => return None,
            };
            if let Some(permit) = self.connection_permit(peer) {
                return Some((sock, peer, permit));
            }
        }
    }

    /// A place among the handshakes in progress on `mode`'s listener, if
    /// both its budget and the source address's share of it allow.
    fn handshake_slot(&self, mode: TlsMode, peer: SocketAddr) -> Option<HandshakeSlot> {
        let cfg = &self.inner.cfg;
        let budget = match mode {
            TlsMode::ClientCertificate => &self.inner.handshakes,
            TlsMode::Password => &self.inner.password_handshakes,
        };
        let key = (mode, peer.ip().to_canonical());
        {
            let mut by_ip = self
                .inner
                .handshakes_by_ip
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let n = by_ip.entry(key).or_insert(0);
            if *n >= cfg.max_handshakes_per_ip {
                drop(by_ip);
                self.refuse("too_many_handshakes_per_ip");
                warn!(%peer, max_handshakes_per_ip = cfg.max_handshakes_per_ip, "connection refused: too many TLS handshakes in progress from this address");
                return None;
            }
            *n += 1;
        }
        let ip = IpSlot {
            map: self.inner.handshakes_by_ip.clone(),
            key,
        };
        let Ok(permit) = budget.clone().try_acquire_owned() else {
            self.refuse("too_many_handshakes");
            warn!(%peer, max_handshakes = cfg.max_handshakes, "connection refused: too many TLS handshakes in progress");
            return None;
        };
        Some(HandshakeSlot {
            _permit: permit,
            _ip: ip,
        })
    }

    fn connection_permit(&self, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        match self.inner.connections.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                self.refuse("too_many_connections");
                warn!(%peer, max_connections = self.inner.cfg.max_connections, "connection refused: too many connections");
                None
            }
        }
    }

    /// One device connection after the handshake: CONNECT, then the relay.
    ///
    /// The stream comes already split (its halves share it through an
    /// `Arc`): an async fn keeps its arguments for its whole life, and a TLS
    /// stream passed whole would take ≈ 1.3 KB in every session's task
    /// after it has moved on.
    async fn session<S>(
        &self,
        (mut dev_r, mut dev_w): (tokio::io::ReadHalf<S>, tokio::io::WriteHalf<S>),
        peer: SocketAddr,
        auth: Auth,
        permit: OwnedSemaphorePermit,
        handshake: Option<HandshakeSlot>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let metrics = self.inner.metrics.clone();
        let cfg = &self.inner.cfg;
        let password = matches!(auth, Auth::Password);
        let mut ident = match auth {
            Auth::Certificate(id) => Some(id),
            Auth::Password | Auth::Trusted => None,
        };
        let shown = ident
            .as_ref()
            .map(|c| c.mac.clone())
            .unwrap_or_else(|| "-".into());
        let mut buf = BytesMut::with_capacity(512);

        // The CONNECT, within the handshake timeout.
        let first = tokio::time::timeout(
            cfg.handshake_timeout,
            next_frame(&mut dev_r, &mut buf, cfg.max_packet_size),
        )
        .await;
        let frame = match first {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return,
            Ok(Err(Violation::Io(e))) => {
                debug!(%peer, device = %shown, error = %e, "connection closed before CONNECT");
                return;
            }
            Ok(Err(e)) => {
                metrics.reject(e.reason());
                warn!(%peer, device = %shown, error = %e, "connection closed");
                return;
            }
            Err(_) => {
                metrics.reject("connect_timeout");
                warn!(%peer, device = %shown, "connection closed: no CONNECT in time");
                return;
            }
        };
        if password {
            // Bounded like the CONNECT itself: a queue of slow argon2
            // checks must not hold a connection open forever.
            let checked =
                tokio::time::timeout(cfg.handshake_timeout, self.password_identity(&frame)).await;
            let refusal = match checked {
                Ok(Ok(id)) => {
                    ident = Some(id);
                    None
                }
                Ok(Err(r)) => Some(r),
                Err(_) => Some(Refusal {
                    reason: "password_check_timeout",
                    code: Some(CONNACK_NOT_AUTHORIZED),
                    device: "-".into(),
                    detail: "password check did not finish in time".into(),
                }),
            };
            if let Some(r) = refusal {
                self.refuse(r.reason);
                warn!(%peer, device = %r.device, reason = r.reason, error = %r.detail, "password login refused");
                if let Some(code) = r.code {
                    let _ = dev_w.write_all(&connack_refusal(code)).await;
                }
                let _ = dev_w.shutdown().await;
                return;
            }
        }
        drop(handshake);
        let id_mac = ident.as_ref().map(|c| c.mac.clone());
        let shown = id_mac.clone().unwrap_or(shown);
        let connect = match self.check_connect(frame, id_mac.as_deref()) {
            Ok(v) => v,
            Err(v) => {
                self.count(&v);
                let code = v.connack_code();
                warn!(%peer, device = %shown, reason = v.reason(), connack = code, violation = %v, "CONNECT refused: {}", v.class());
                if let Some(code) = code {
                    let _ = dev_w.write_all(&connack_refusal(code)).await;
                }
                let _ = dev_w.shutdown().await;
                return;
            }
        };
        let Connect {
            device,
            keep_alive,
            clean,
            will,
            bytes: connect_bytes,
        } = connect;

        let (kill_tx, mut kill_rx) = watch::channel(false);
        let conn_id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let local = self.local_session(&device, clean);
        // A persistent session keeps the broker path: rumqttd resends its
        // unacknowledged QoS 1 messages when the device comes back.
        let direct = clean.then(|| Arc::new(direct::Direct::new(local)));
        if !self
            .take_over(&device, conn_id, ident.as_ref(), kill_tx, direct.clone())
            .await
        {
            // Revoked after the credentials were checked, before the session
            // was registered: `Front::revoke` could not see it.
            let reason = if password {
                "password_revoked"
            } else {
                "tls_revoked"
            };
            self.refuse(reason);
            warn!(%peer, device = %device, reason, "connection refused: credentials revoked before the session started");
            let _ = dev_w
                .write_all(&connack_refusal(CONNACK_NOT_AUTHORIZED))
                .await;
            let _ = dev_w.shutdown().await;
            return;
        }

        let disconnected = AtomicBool::new(false);
        let replies = Replies::default();
        let result = async {
            let mut broker = None;
            if local {
                // CONNACK: accepted, no session present (it is clean).
                dev_w.write_all(&[CONNACK << 4, 0x02, 0x00, 0x00]).await?;
                dev_w.flush().await?;
            } else {
                let mut up = TcpStream::connect(cfg.upstream).await?;
                up.set_nodelay(true)?;
                up.write_all(&connect_bytes).await?;
                broker = Some(up.into_split());
            }
            Metrics::inc(&metrics.connections);
            if local {
                Metrics::inc(&metrics.connections_local);
            }
            let via = ident.as_ref().map_or("plaintext", |i| i.via);
            let path = if local { "local" } else { "broker" };
            info!(%peer, device = %device, auth = via, keep_alive_s = keep_alive, session = path, "device connected");
            let (acks_tx, acks_rx) = watch::channel(0u64);
            let up = Uplink {
                device: &device,
                max_packet: cfg.max_packet_size,
                keep_alive,
                ack_wait: cfg.handshake_timeout,
                max_filters_per_subscribe: cfg.max_filters_per_subscribe,
                max_filters_per_session: cfg.max_filters_per_session,
                ingest: &cfg.ingest,
                direct: direct.as_deref(),
                disconnected: &disconnected,
            };
            let (up_r, upstream) = match broker.as_mut() {
                Some((r, w)) => (Some(r), Upstream::Broker { w, acks: acks_rx }),
                None => (None, Upstream::Local),
            };
            let to_broker = up.run(&mut dev_r, &mut buf, upstream, &replies);
            let to_device = downlink(up_r, &mut dev_w, &replies, acks_tx, direct.as_deref());
            let r: Result<(), Violation> = tokio::select! {
                r = to_broker => r,
                _ = to_device => Ok(()),
                _ = kill_rx.wait_for(|k| *k) => {
                    debug!(device = %device, "session closed by the gateway");
                    Ok(())
                }
            };
            metrics.connections.fetch_sub(1, Ordering::Relaxed);
            if local {
                metrics.connections_local.fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(d) = &direct {
                d.close();
            }
            match r {
                Ok(()) => {}
                Err(Violation::Io(e)) => debug!(%peer, device = %device, error = %e, "connection closed"),
                Err(v) => {
                    self.count(&v);
                    warn!(%peer, device = %device, identity = %shown, reason = v.reason(), violation = %v, "connection closed: {}", v.class());
                }
            }
            let _ = dev_w.shutdown().await;
            Ok::<(), std::io::Error>(())
        }
        .await;
        let connected = result.is_ok();
        match result {
            Err(e) if local => {
                debug!(%peer, device = %device, error = %e, "connection closed before CONNACK")
            }
            Err(e) => {
                warn!(%peer, device = %device, error = %e, "cannot reach the embedded broker")
            }
            Ok(()) => {}
        }
        // A local session's will: the broker would publish it now, to the
        // ingest (its topic was checked with the CONNECT).
        if let Some(w) =
            will.filter(|_| local && connected && !disconnected.load(Ordering::Relaxed))
        {
            info!(device = %device, topic = %String::from_utf8_lossy(&w.topic), "will published: the connection closed without DISCONNECT");
            let _ = cfg
                .ingest
                .send_async(Inbound {
                    topic: w.topic,
                    payload: Payload::Raw(w.message),
                })
                .await;
        }
        if self.release(&device, conn_id) {
            // A session replaced by a newer one of the same device ends silently.
            let _ = cfg
                .ingest
                .send_async(Inbound {
                    topic: bytes::Bytes::from(device.clone()),
                    payload: Payload::SessionEnded,
                })
                .await;
        }
        info!(%peer, device = %device, "device disconnected");
        drop(permit);
    }

    /// Checks the user name (the MAC) and password of a CONNECT against the
    /// stored hash, and the certificate serial the password is bound to
    /// against the live revocation set.
    async fn password_identity(&self, frame: &BytesMut) -> Result<Identity, Refusal> {
        let refusal = |reason, code, device: &str, detail: String| Refusal {
            reason,
            code,
            device: device.to_string(),
            detail,
        };
        let parsed = check_protocol_level(frame)
            .and_then(|()| parse(frame.clone(), self.inner.cfg.max_packet_size));
        let login = match parsed {
            Ok(Packet::Connect(_, _, _, _, login)) => login,
            Ok(_) => {
                return Err(refusal(
                    "mqtt_protocol_violation",
                    None,
                    "-",
                    Violation::NotConnect.to_string(),
                ))
            }
            Err(v) => return Err(refusal(v.reason(), v.connack_code(), "-", v.to_string())),
        };
        let Some(Login { username, password }) = login else {
            return Err(refusal(
                "password_missing",
                Some(CONNACK_BAD_CREDENTIALS),
                "-",
                "CONNECT without user name and password".into(),
            ));
        };
        let Ok(mac) = crate::pki::normalize_mac(&username) else {
            return Err(refusal(
                "password_bad_username",
                Some(CONNACK_BAD_CREDENTIALS),
                "-",
                format!("user name {:?} is not a device MAC", truncate(&username)),
            ));
        };
        let Ok(_slot) = self.inner.verifications.clone().acquire_owned().await else {
            return Err(refusal(
                "password_check_failed",
                None,
                &mac,
                "closed".into(),
            ));
        };
        let store = self.inner.cfg.passwords.clone();
        let m = mac.clone();
        let checked = tokio::task::spawn_blocking(move || match store.get(&m) {
            Ok(Some(rec)) => {
                let ok = devpass::verify(&rec.hash, &password);
                Ok(Some((rec.serial, ok)))
            }
            Ok(None) => {
                devpass::verify_nothing(&password);
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match checked {
            Err(e) => Err(refusal(
                "password_check_failed",
                Some(CONNACK_NOT_AUTHORIZED),
                &mac,
                e,
            )),
            Ok(None) => Err(refusal(
                "password_unknown_device",
                Some(CONNACK_BAD_CREDENTIALS),
                &mac,
                "no password issued for this device".into(),
            )),
            Ok(Some((_, false))) => Err(refusal(
                "password_wrong",
                Some(CONNACK_BAD_CREDENTIALS),
                &mac,
                "wrong password".into(),
            )),
            Ok(Some((serial, true))) if self.is_revoked(&serial) => Err(refusal(
                "password_revoked",
                Some(CONNACK_NOT_AUTHORIZED),
                &mac,
                format!("the password's certificate {serial} is revoked"),
            )),
            Ok(Some((serial, true))) => Ok(Identity {
                mac,
                serial,
                via: "password",
            }),
        }
    }

    /// Validates the CONNECT and re-encodes it with the broker secret and
    /// the longest keep-alive (the front enforces the device's own, which it
    /// returns).
    fn check_connect(&self, frame: BytesMut, cert_mac: Option<&str>) -> Result<Connect, Violation> {
        check_protocol_level(&frame)?;
        let packet = parse(frame, self.inner.cfg.max_packet_size)?;
        let Packet::Connect(mut connect, _, will, _, _) = packet else {
            return Err(Violation::NotConnect);
        };
        let claimed =
            normalize_device_id(&connect.client_id).map_err(|_| Violation::BadClientId {
                client_id: truncate(&connect.client_id),
            })?;
        let device = match cert_mac {
            Some(mac) if claimed != mac => {
                return Err(Violation::ClientIdMismatch {
                    client_id: truncate(&connect.client_id),
                })
            }
            _ => claimed,
        };
        if let Some(LastWill { topic, .. }) = &will {
            check_publish_topic(topic, &device).map_err(|_| Violation::Will {
                topic: truncate(&String::from_utf8_lossy(topic)),
            })?;
        }
        let login = Login {
            username: BROKER_USER.into(),
            password: self.inner.cfg.secret.to_string(),
        };
        let keep_alive = std::mem::replace(&mut connect.keep_alive, u16::MAX);
        let clean = connect.clean_session;
        let mut bytes = BytesMut::new();
        V4.write(
            Packet::Connect(connect, None, will.clone(), None, Some(login)),
            &mut bytes,
        )
        .map_err(|e| Violation::Malformed(e.to_string()))?;
        Ok(Connect {
            device,
            keep_alive,
            clean,
            will,
            bytes,
        })
    }

    /// Whether a CONNECT of `device` can be a local session; remembers a
    /// persistent one (which the broker keeps after it closes).
    fn local_session(&self, device: &str, clean: bool) -> bool {
        let mut p = self
            .inner
            .persistent
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !clean {
            p.insert(device.to_string());
            return false;
        }
        // A clean CONNECT through the broker ends the broker's session.
        !p.remove(device) && self.inner.cfg.local_sessions
    }

    /// Registers the session of `device`, closing an older one first.
    /// Returns `false`, registering nothing, when the identity's serial is
    /// revoked. The check runs under the sessions lock, which
    /// [`Front::revoke`] takes after adding to the revocation set: a
    /// revocation either finds the session registered (and closes it) or is
    /// in the set this check reads.
    async fn take_over(
        &self,
        device: &str,
        conn_id: u64,
        ident: Option<&Identity>,
        kill: watch::Sender<bool>,
        direct: Option<Arc<direct::Direct>>,
    ) -> bool {
        let old = {
            let mut s = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if ident.is_some_and(|i| self.is_revoked(&i.serial)) {
                return false;
            }
            s.insert(
                device.to_string(),
                Session {
                    id: conn_id,
                    serial: ident.map(|c| c.serial.clone()),
                    kill,
                    direct,
                },
            )
        };
        if let Some(old) = old {
            info!(device = %device, "new connection replaces the open session");
            let _ = old.kill.send(true);
            // Resolves once the old session task has dropped its receiver.
            let _ = tokio::time::timeout(TAKEOVER_WAIT, old.kill.closed()).await;
        }
        true
    }

    /// Forgets the session if it is still the device's current one (true).
    fn release(&self, device: &str, conn_id: u64) -> bool {
        let mut s = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if s.get(device).is_some_and(|x| x.id == conn_id) {
            s.remove(device);
            true
        } else {
            false
        }
    }
}

/// Concurrent argon2 password checks on a machine with `cores` cores: all
/// but one, at least one, at most four (each takes ~19 MiB).
fn password_checks(cores: usize) -> usize {
    cores.saturating_sub(1).clamp(1, 4)
}

/// A handshake in progress: its place in the listener's budget and in its
/// source address's share, both given back when dropped.
struct HandshakeSlot {
    _permit: OwnedSemaphorePermit,
    _ip: IpSlot,
}

/// One handshake counted against a source address.
struct IpSlot {
    map: Arc<Mutex<HashMap<(TlsMode, IpAddr), usize>>>,
    key: (TlsMode, IpAddr),
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A TLS connection's socket, read up to [`READ_AHEAD`] bytes at a time.
///
/// rustls asks its transport for at most 4 KiB per read, so a device
/// streaming chunks (~2 KiB each) cost one `recv` system call per two
/// chunks — the largest part of the front's kernel time. The buffer exists
/// only while the socket has data: it is freed when a read would block, so
/// an idle connection (most of 1,000) holds none.
struct ReadAhead<S> {
    inner: S,
    buf: Option<Box<[std::mem::MaybeUninit<u8>]>>,
    /// `buf[pos..end]` is read and not yet handed out.
    pos: usize,
    end: usize,
    /// Size of the next buffer: 4 KiB until a read fills one (handshakes,
    /// CONNECT, a few commands), then [`READ_AHEAD`].
    cap: usize,
}

const READ_AHEAD: usize = 64 * 1024;

impl<S> ReadAhead<S> {
    fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: None,
            pos: 0,
            end: 0,
            cap: 4096,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let me = self.get_mut();
        if me.pos == me.end {
            if out.remaining() >= READ_AHEAD {
                me.buf = None;
                return std::pin::Pin::new(&mut me.inner).poll_read(cx, out);
            }
            let cap = me.cap;
            if me.buf.as_ref().is_some_and(|b| b.len() < cap) {
                me.buf = None;
            }
            let buf = me.buf.get_or_insert_with(|| Box::new_uninit_slice(cap));
            let mut rb = tokio::io::ReadBuf::uninit(buf);
            match std::pin::Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    (me.pos, me.end) = (0, rb.filled().len());
                    if me.end == me.cap && me.cap < READ_AHEAD {
                        me.cap = READ_AHEAD;
                    }
                    if me.end == 0 {
                        me.buf = None;
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) => {
                    me.buf = None;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    me.buf = None;
                    return Poll::Pending;
                }
            }
        }
        let Some(buf) = me.buf.as_ref() else {
            return Poll::Ready(Ok(()));
        };
        let n = out.remaining().min(me.end - me.pos);
        // SAFETY: `buf[..end]` was filled by the read above.
        let filled = unsafe { std::slice::from_raw_parts(buf[me.pos..].as_ptr().cast::<u8>(), n) };
        out.put_slice(filled);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads the next whole MQTT frame (raw bytes). `Ok(None)` on a clean EOF.
async fn next_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<BytesMut>, Violation> {
    loop {
        if let Some(frame) = ready_frame(buf, max)? {
            return Ok(Some(frame));
        }
        // An idle device's buffer stays small (1,000 connections); it grows
        // to 4 KiB reads once packets flow.
        buf.reserve(if buf.is_empty() { 512 } else { 4096 });
        match r.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(Violation::Io("connection closed inside a packet".into())),
            Ok(_) => {}
            Err(e) => return Err(Violation::Io(format!("read: {e}"))),
        }
    }
}

/// Reads beyond the first per uplink pass (each up to 4 KiB).
const PASS_READS: usize = 16;

/// One read that does not wait: true if it added bytes to `buf`. EOF and
/// errors are left to the next waiting read, which reports them.
fn read_now<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> bool {
    use std::future::Future;
    // As `next_frame`: an idle device's buffer stays small.
    buf.reserve(if buf.is_empty() { 512 } else { 4096 });
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let read = std::pin::pin!(r.read_buf(buf));
    matches!(read.poll(&mut cx), std::task::Poll::Ready(Ok(n)) if n > 0)
}

/// The next whole packet already in `buf`, if any (no read).
fn ready_frame(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, Violation> {
    if buf.is_empty() {
        return Ok(None);
    }
    match check(buf.iter(), max) {
        Ok(h) => Ok(Some(buf.split_to(h.frame_length()))),
        Err(MqttError::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(Violation::Malformed(e.to_string())),
    }
}

/// Refuses a CONNECT of another MQTT version before it is parsed as 3.1.1:
/// protocol name `MQTT` (3.1.1, 5) or `MQIsdp` (3.1) with a level other
/// than 4. Anything else (not a CONNECT, another name, too short) is left
/// to the parser.
fn check_protocol_level(frame: &[u8]) -> Result<(), Violation> {
    if frame.first().map(|b| b >> 4) != Some(CONNECT) {
        return Ok(());
    }
    // The fixed header: one byte, then a remaining length of 1-4 bytes.
    let Some(len_end) = frame[1..].iter().take(4).position(|b| b & 0x80 == 0) else {
        return Ok(());
    };
    let v = &frame[2 + len_end..];
    let Some(name_len) = v
        .get(..2)
        .map(|n| u16::from_be_bytes([n[0], n[1]]) as usize)
    else {
        return Ok(());
    };
    let (Some(name), Some(&level)) = (v.get(2..2 + name_len), v.get(2 + name_len)) else {
        return Ok(());
    };
    if (name == b"MQTT" || name == b"MQIsdp") && level != 4 {
        return Err(Violation::UnsupportedProtocol { level });
    }
    Ok(())
}

/// Parses one frame. rumqttd's parser is not meant for hostile input, so a
/// panic in it is caught and treated as a malformed packet.
fn parse(frame: BytesMut, max: usize) -> Result<Packet, Violation> {
    let r = std::panic::catch_unwind(move || {
        let mut f = frame;
        V4.read_mut(&mut f, max)
    });
    match r {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(Violation::Malformed(e.to_string())),
        Err(_) => Err(Violation::Malformed("unparseable packet".into())),
    }
}

fn own_topic(topic: &str, device: &str, allowed: &[Channel]) -> bool {
    let Ok(t) = parse_topic(topic) else {
        return false;
    };
    // `device` is normalised, so the firmware's own spelling of it (the
    // usual case) matches without normalising the topic's.
    allowed.contains(&t.channel)
        && (t.wire_id == device || normalize_device_id(t.wire_id).is_ok_and(|id| id == device))
}

fn check_publish_topic(topic: &[u8], device: &str) -> Result<(), Violation> {
    let text = std::str::from_utf8(topic).unwrap_or("");
    if own_topic(text, device, &[Channel::Status, Channel::Data]) {
        Ok(())
    } else {
        Err(Violation::Publish {
            topic: truncate(&String::from_utf8_lossy(topic)),
        })
    }
}

/// Where a device packet (after CONNECT) goes.
enum Route {
    /// Any packet but a PUBLISH: to the broker as it is (a broker session),
    /// or answered by the front (a local session).
    Control { frame: BytesMut, control: Control },
    /// A device publish for the ingest, and what acknowledges it.
    Ingest { message: Inbound, ack: Ack },
    /// The device's PUBACK for one of the front's own publishes: the broker
    /// never sent that packet id.
    Ours,
}

/// How the front acknowledges a publish it hands to the ingest.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ack {
    /// QoS 0.
    None,
    /// QoS 1: PUBACK.
    Puback(u16),
    /// QoS 2 (local sessions only): PUBREC, then PUBCOMP on the PUBREL.
    Pubrec(u16),
}

/// A device packet other than PUBLISH, as far as a session needs it.
#[derive(Debug, PartialEq, Eq)]
enum Control {
    Subscribe {
        pkid: u16,
        filters: Vec<(String, QoS)>,
    },
    Unsubscribe {
        pkid: u16,
        topics: Vec<String>,
    },
    PingReq,
    /// The second half of a device's QoS 2 publish.
    PubRel(u16),
    Disconnect,
    /// Acknowledgements of the broker's publishes (PUBACK, PUBREC, PUBCOMP).
    Other,
}

const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const CONNACK: u8 = 2;
const PUBREC: u8 = 5;
const PUBCOMP: u8 = 7;
const UNSUBACK: u8 = 11;
const PINGRESP: u8 = 13;
const SUBACK: u8 = 9;

/// Checks one packet after CONNECT against the device's identity and routes
/// it. Publishes are parsed in place (no copy); the rare ones a broker
/// session's broker must carry (retained, QoS 2) are re-encoded. In a local
/// session (`local`) every publish goes to the ingest: a retained one as an
/// ordinary publish (the broker's retained store only ever served the
/// ingest, subscribed from the start), QoS 2 acknowledged by the front.
fn route(
    frame: BytesMut,
    device: &str,
    max: usize,
    local: bool,
    topic: &mut Bytes,
) -> Result<Route, Violation> {
    let kind = frame.first().map_or(0, |b| b >> 4);
    if kind == PUBACK
        && frame.len() == 4
        && direct::is_ours(u16::from_be_bytes([frame[2], frame[3]]))
    {
        return Ok(Route::Ours);
    }
    if kind != PUBLISH {
        let control = check_packet(&frame, device, max)?;
        return Ok(Route::Control { frame, control });
    }
    let Packet::Publish(p, _) = parse(frame, max)? else {
        return Err(Violation::Malformed("not a PUBLISH".into()));
    };
    check_publish_topic(&p.topic, device)?;
    let ack = match p.qos() {
        QoS::AtMostOnce => Ack::None,
        QoS::AtLeastOnce => Ack::Puback(p.pkid()),
        QoS::ExactlyOnce => Ack::Pubrec(p.pkid()),
    };
    if !local && (p.retain || p.qos() == QoS::ExactlyOnce) {
        let mut frame = BytesMut::new();
        V4.write(Packet::Publish(p, None), &mut frame)
            .map_err(|e| Violation::Malformed(e.to_string()))?;
        return Ok(Route::Control {
            frame,
            control: Control::Other,
        });
    }
    // Chunks are decoded here, on the front's threads, not on the one
    // ingest thread. Anything else (HELLO, METADATA, a bad message) goes
    // as it is, and the ingest parses and reports it.
    // (`u32::MAX`: the image size bound is METADATA's, which is not kept.)
    let chunk = if p.topic.ends_with(b"/data") {
        match DataMessage::parse(&p.payload, u32::MAX) {
            Ok(DataMessage::Chunk(c)) => Some(c),
            _ => None,
        }
    } else {
        None
    };
    let message = match chunk {
        Some(c) => Inbound {
            topic: shared_topic(topic, &p.topic),
            payload: Payload::Chunk(c),
        },
        None => Inbound {
            topic: p.topic,
            payload: Payload::Raw(p.payload),
        },
    };
    Ok(Route::Ingest { message, ack })
}

/// `topic` as a `Bytes` of its own, shared with the session's earlier
/// chunks on the same topic (`cache`). Not a slice of the frame: that would
/// keep the whole read buffer alive until the ingest thread frees the
/// chunk; not a copy per chunk: that is an allocation per chunk, freed on
/// the ingest thread.
fn shared_topic(cache: &mut Bytes, topic: &[u8]) -> Bytes {
    if cache[..] != *topic {
        *cache = Bytes::copy_from_slice(topic);
    }
    cache.clone()
}

/// The device-to-gateway half of a session.
struct Uplink<'a> {
    device: &'a str,
    max_packet: usize,
    /// The device's CONNECT keep-alive, seconds (0: none).
    keep_alive: u16,
    /// Longest wait for the broker's CONNACK/SUBACK.
    ack_wait: Duration,
    max_filters_per_subscribe: usize,
    max_filters_per_session: usize,
    ingest: &'a flume::Sender<Inbound>,
    /// The session's direct downlink, whose subscriptions it keeps.
    direct: Option<&'a direct::Direct>,
    /// Set when the device sends DISCONNECT: a local session then drops
    /// its will.
    disconnected: &'a AtomicBool,
}

/// Where the packets of a session that are not the ingest's go.
enum Upstream<'a, W> {
    /// A broker session: to the broker's loopback connection. A publish for
    /// the ingest waits until the broker has answered the CONNECT and every
    /// SUBSCRIBE before it (`acks` counts its CONNACK and SUBACKs).
    Broker {
        w: &'a mut W,
        acks: watch::Receiver<u64>,
    },
    /// A local session: the front answers them itself.
    Local,
}

impl Uplink<'_> {
    /// Counts a SUBSCRIBE's filters against the limits. `seen` is every
    /// distinct filter the connection has subscribed to: an UNSUBSCRIBE
    /// gives none back (the broker never frees a filter's memory, and a
    /// device needs two).
    fn count_filters(
        &self,
        seen: &mut HashSet<String>,
        filters: &[(String, QoS)],
    ) -> Result<(), Violation> {
        if filters.len() > self.max_filters_per_subscribe {
            return Err(Violation::TooManyFilters {
                count: filters.len(),
                max: self.max_filters_per_subscribe,
                per: "SUBSCRIBE",
            });
        }
        for (f, _) in filters {
            if !seen.contains(f) {
                if seen.len() == self.max_filters_per_session {
                    return Err(Violation::TooManyFilters {
                        count: seen.len() + 1,
                        max: self.max_filters_per_session,
                        per: "session",
                    });
                }
                seen.insert(f.clone());
            }
        }
        Ok(())
    }

    /// Reads the device's packets until it closes: checks each, hands
    /// publishes to the ingest and forwards the rest to the broker (or, in
    /// a local session, answers them).
    async fn run<R, W>(
        self,
        dev_r: &mut R,
        buf: &mut BytesMut,
        upstream: Upstream<'_, W>,
        replies: &Replies,
    ) -> Result<(), Violation>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (mut up_w, mut acks) = match upstream {
            Upstream::Broker { w, acks } => (Some(w), Some(acks)),
            Upstream::Local => (None, None),
        };
        let local = up_w.is_none();
        // MQTT 3.1.1 §3.1.2.10: a server closes a client silent for 1.5 ×
        // its keep-alive.
        let idle =
            (self.keep_alive > 0).then(|| Duration::from_millis(self.keep_alive as u64 * 1500));
        // Broker acknowledgements sent so far that a direct publish waits
        // for: the CONNECT's, then one per SUBSCRIBE (none locally).
        let mut awaited = u64::from(!local);
        // How many of them are known to have arrived (the watch is read
        // only while some are outstanding, not on every publish).
        let mut arrived: u64 = 0;
        // A local session's QoS 2 publishes handed over and not yet
        // released: a resend of one (same packet id) is not handed again.
        // A set, not a list: a device that never releases could otherwise
        // make every publish scan up to 65,535 ids.
        let mut unreleased: HashSet<u16> = HashSet::new();
        // Every distinct topic filter subscribed to (`count_filters`).
        let mut filters_seen: HashSet<String> = HashSet::new();
        // The topic of the session's chunks, shared by all of them.
        let mut topic = Bytes::new();
        // A pass's replies, encoded, go to the downlink together once the
        // pass is routed: one hand-over and one TLS record for a whole read
        // instead of one per publish.
        let mut acks_out = Vec::new();
        loop {
            let read = next_frame(dev_r, buf, self.max_packet);
            let first =
                match idle {
                    Some(limit) => tokio::time::timeout(limit, read).await.map_err(|_| {
                        Violation::KeepAlive {
                            secs: self.keep_alive,
                        }
                    })?,
                    None => read.await,
                };
            let Some(first) = first? else {
                return Ok(());
            };
            // Every further packet already read is routed in the same pass,
            // and the broker-bound ones join one write. The frames are
            // adjacent in `buf`, so `unsplit` only moves an index. A
            // violation still lets the packets before it through, as if
            // they had been forwarded one by one.
            let mut next = Some(first);
            let mut run = BytesMut::new();
            let mut violation = None;
            let mut extra = 0;
            loop {
                let frame = match next.take() {
                    Some(f) => f,
                    None => match ready_frame(buf, self.max_packet) {
                        Ok(Some(f)) => f,
                        // What the socket already holds joins the pass (a
                        // TLS read yields one or two records), up to a
                        // bound so one device cannot hold the thread.
                        Ok(None) if extra < PASS_READS && read_now(dev_r, buf) => {
                            extra += 1;
                            continue;
                        }
                        Ok(None) => break,
                        Err(v) => {
                            violation = Some(v);
                            break;
                        }
                    },
                };
                let routed = route(frame, self.device, self.max_packet, local, &mut topic)
                    .and_then(|r| match &r {
                        Route::Control {
                            control: Control::Subscribe { filters, .. },
                            ..
                        } => self.count_filters(&mut filters_seen, filters).map(|()| r),
                        _ => Ok(r),
                    });
                match routed {
                    Ok(Route::Control { frame, control }) if !local => {
                        awaited += u64::from(matches!(control, Control::Subscribe { .. }));
                        match (self.direct, control) {
                            (Some(d), Control::Subscribe { pkid, filters }) => {
                                d.subscribing(pkid, filters.into_iter().map(|(t, _)| t).collect())
                            }
                            (Some(d), Control::Unsubscribe { topics, .. }) => {
                                d.unsubscribe(&topics)
                            }
                            _ => {}
                        }
                        run.unsplit(frame);
                    }
                    Ok(Route::Control { control, .. }) => {
                        if control == Control::Disconnect {
                            self.disconnected.store(true, Ordering::Relaxed);
                            replies.push(&acks_out).await;
                            return Ok(());
                        }
                        let before = acks_out.len();
                        answer(control, self.direct, &mut unreleased, &mut acks_out);
                        // An answer goes out before anything the ingest
                        // might send on a topic just subscribed.
                        if acks_out.len() != before {
                            replies.push(&acks_out).await;
                            acks_out.clear();
                        }
                    }
                    Ok(Route::Ours) => {}
                    Ok(Route::Ingest { message, ack }) => {
                        if let Some(w) = up_w.as_deref_mut() {
                            if !run.is_empty() {
                                to_broker(w, &run).await?;
                                run.clear();
                            }
                        }
                        if let Some(acks) = acks.as_mut().filter(|_| arrived < awaited) {
                            let wait = acks.wait_for(|n| *n >= awaited);
                            match tokio::time::timeout(self.ack_wait, wait).await {
                                Ok(Ok(n)) => arrived = *n,
                                // The downlink ended: the broker closed.
                                Ok(Err(_)) => return Ok(()),
                                Err(_) => return Err(Violation::BrokerTimeout),
                            }
                        }
                        // (Inserted here: `false` means already there.)
                        let resent = matches!(ack, Ack::Pubrec(id) if !unreleased.insert(id));
                        if !resent {
                            self.ingest
                                .send_async(message)
                                .await
                                .map_err(|_| Violation::Io("the ingest has stopped".into()))?;
                        }
                        match ack {
                            Ack::None => {}
                            Ack::Puback(id) => acks_out.extend_from_slice(&puback_packet(id)),
                            Ack::Pubrec(id) => {
                                acks_out.extend_from_slice(&short_packet(PUBREC, id))
                            }
                        }
                    }
                    Err(v) => {
                        violation = Some(v);
                        break;
                    }
                }
            }
            if let Some(w) = up_w.as_deref_mut() {
                if !run.is_empty() {
                    to_broker(w, &run).await?;
                }
            }
            replies.push(&acks_out).await;
            acks_out.clear();
            if let Some(v) = violation {
                return Err(v);
            }
        }
    }
}

/// A local session's answer to a device packet (not DISCONNECT), appended
/// to `out`: what the broker would have answered.
fn answer(
    control: Control,
    direct: Option<&direct::Direct>,
    unreleased: &mut HashSet<u16>,
    out: &mut Vec<u8>,
) {
    match control {
        Control::Subscribe { pkid, filters } => {
            // At most QoS 1: the ingest's replies are at-least-once, and a
            // server may grant less than asked (MQTT 3.1.1 §3.8.4).
            let filters: Vec<(String, QoS)> = filters
                .into_iter()
                .map(|(t, q)| match q {
                    QoS::ExactlyOnce => (t, QoS::AtLeastOnce),
                    q => (t, q),
                })
                .collect();
            let return_codes = filters
                .iter()
                .map(|(_, q)| SubscribeReasonCode::Success(*q))
                .collect();
            if let Some(d) = direct {
                d.grant(filters);
            }
            let mut b = BytesMut::new();
            if V4
                .write(Packet::SubAck(SubAck { pkid, return_codes }, None), &mut b)
                .is_ok()
            {
                out.extend_from_slice(&b);
            }
        }
        Control::Unsubscribe { pkid, topics } => {
            if let Some(d) = direct {
                d.unsubscribe(&topics);
            }
            out.extend_from_slice(&short_packet(UNSUBACK, pkid));
        }
        Control::PingReq => out.extend_from_slice(&[PINGRESP << 4, 0]),
        Control::PubRel(pkid) => {
            unreleased.remove(&pkid);
            out.extend_from_slice(&short_packet(PUBCOMP, pkid));
        }
        Control::Disconnect | Control::Other => {}
    }
}

async fn to_broker<W: AsyncWrite + Unpin>(up_w: &mut W, bytes: &[u8]) -> Result<(), Violation> {
    up_w.write_all(bytes)
        .await
        .map_err(|e| Violation::Io(format!("broker write: {e}")))
}

/// The gateway-to-device half of a session: the broker's packets (none in a
/// local session), the front's PUBACKs and other answers, and the ingest's
/// direct publishes (`direct`), interleaved
/// only between whole packets. Counts the broker's CONNACK and SUBACKs into
/// `acks` for the uplink, and hands each SUBACK to the direct downlink
/// first, so the subscription is in place before the uplink lets a publish
/// through.
async fn downlink<R, W>(
    mut up_r: Option<&mut R>,
    dev_w: &mut W,
    replies: &Replies,
    acks: watch::Sender<u64>,
    direct: Option<&direct::Direct>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // The gateway sends a device a few small commands per wake; a 1 KiB
    // buffer keeps 1,000 idle connections small (it grows for a big one).
    let mut from_broker = BytesMut::with_capacity(if up_r.is_some() { 1024 } else { 0 });
    let mut ours = Vec::new();
    let mut acked = 0u64;
    let mut pkids = direct::PacketIds::new();
    let mut put = |m: Outgoing, out: &mut Vec<u8>| {
        let pkid = match m.qos {
            QoS::AtMostOnce => 0,
            _ => pkids.next(),
        };
        encode_publish(&m.topic, &m.payload, m.qos, pkid, out);
    };
    loop {
        if up_r.is_some() && from_broker.capacity() - from_broker.len() < 256 {
            from_broker.reserve(1024);
        }
        let mut whole = 0;
        tokio::select! {
            r = async {
                match up_r.as_deref_mut() {
                    Some(r) => r.read_buf(&mut from_broker).await,
                    // A local session has no broker connection.
                    None => std::future::pending().await,
                }
            } => {
                if r? == 0 {
                    return Ok(());
                }
                let before = acked;
                while let Ok(h) = check(from_broker[whole..].iter(), usize::MAX) {
                    let kind = from_broker[whole] >> 4;
                    if matches!(kind, CONNACK | SUBACK) {
                        acked += 1;
                    }
                    if let (SUBACK, Some(d)) = (kind, direct) {
                        let frame = &from_broker[whole..whole + h.frame_length()];
                        if let Ok(Packet::SubAck(a, _)) = parse(BytesMut::from(frame), usize::MAX) {
                            d.granted(a.pkid, &a.return_codes);
                        }
                    }
                    whole += h.frame_length();
                }
                if acked != before {
                    acks.send_replace(acked);
                }
            }
            () = replies.wait() => {}
            () = async {
                match direct {
                    Some(d) => d.wait().await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        // Replies first: a SUBACK goes out before anything the ingest sends
        // on the topic it grants.
        replies.take_into(&mut ours);
        if let Some(d) = direct {
            for m in d.take() {
                put(m, &mut ours);
            }
        }
        if whole > 0 {
            let broker_bytes = from_broker.split_to(whole);
            dev_w.write_all(&broker_bytes).await?;
        }
        if !ours.is_empty() {
            dev_w.write_all(&ours).await?;
            ours.clear();
        }
        dev_w.flush().await?;
    }
}

/// An MQTT 3.1.1 PUBACK.
fn puback_packet(pkid: u16) -> [u8; 4] {
    short_packet(PUBACK, pkid)
}

/// An MQTT 3.1.1 packet that is just a packet id (PUBACK, PUBREC, PUBCOMP,
/// UNSUBACK).
fn short_packet(kind: u8, pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [kind << 4, 0x02, hi, lo]
}

/// Checks one packet after CONNECT (not a PUBLISH) against the device's
/// identity; returns what a session needs of it.
fn check_packet(frame: &BytesMut, device: &str, max: usize) -> Result<Control, Violation> {
    match parse(frame.clone(), max)? {
        Packet::Publish(p, _) => check_publish_topic(&p.topic, device).map(|()| Control::Other),
        Packet::Subscribe(s, _) => {
            for f in &s.filters {
                if !own_topic(&f.path, device, &[Channel::Cmd, Channel::Ack]) {
                    return Err(Violation::Subscribe {
                        filter: truncate(&f.path),
                    });
                }
            }
            Ok(Control::Subscribe {
                pkid: s.pkid,
                filters: s.filters.into_iter().map(|f| (f.path, f.qos)).collect(),
            })
        }
        Packet::Unsubscribe(u, _) => Ok(Control::Unsubscribe {
            pkid: u.pkid,
            topics: u.filters,
        }),
        Packet::PingReq(_) => Ok(Control::PingReq),
        Packet::PubRel(r, _) => Ok(Control::PubRel(r.pkid)),
        Packet::Disconnect(..) => Ok(Control::Disconnect),
        Packet::Connect(..) => Err(Violation::SecondConnect),
        Packet::ConnAck(..) | Packet::SubAck(..) | Packet::UnsubAck(..) | Packet::PingResp(_) => {
            Err(Violation::ServerPacket)
        }
        _ => Ok(Control::Other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn front() -> (tempfile::TempDir, Front) {
        let dir = tempfile::tempdir().unwrap();
        let (ingest, _) = flume::bounded(1);
        let cfg = FrontConfig {
            upstream: "127.0.0.1:9".parse().unwrap(),
            ingest,
            secret: "secret".into(),
            max_connections: 4,
            max_handshakes: 4,
            max_handshakes_per_ip: 2,
            handshake_timeout: Duration::from_millis(300),
            max_packet_size: 1 << 16,
            passwords: PasswordStore::new(dir.path()),
            local_sessions: true,
            max_filters_per_subscribe: 8,
            max_filters_per_session: 16,
        };
        (
            dir,
            Front::new(cfg, Arc::default(), SharedRevoked::default()),
        )
    }

    /// Finding: one source address could take every handshake slot, and
    /// the password listener shared the certificate listener's budget.
    #[test]
    fn handshakes_are_shared_fairly() {
        let (_dir, front) = front();
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "[::ffff:127.0.0.2]:1000".parse().unwrap();
        let cert = TlsMode::ClientCertificate;
        let a1 = front.handshake_slot(cert, a).unwrap();
        let _a2 = front.handshake_slot(cert, a).unwrap();
        assert!(front.handshake_slot(cert, a).is_none(), "a's share is 2");
        let _b1 = front.handshake_slot(cert, b).unwrap();
        // The password listener's budget and shares are its own.
        let _p: Vec<_> = (0..2)
            .map(|_| front.handshake_slot(TlsMode::Password, a).unwrap())
            .collect();
        drop(a1);
        let _a3 = front.handshake_slot(cert, a).unwrap();
        // Budget of 4: a (2) and b (2) fill it.
        let _b2 = front.handshake_slot(cert, b).unwrap();
        let c: SocketAddr = "127.0.0.3:1".parse().unwrap();
        assert!(front.handshake_slot(cert, c).is_none(), "budget of 4");
        assert_eq!(
            front.inner.metrics.rejected("too_many_handshakes_per_ip"),
            1
        );
        assert_eq!(front.inner.metrics.rejected("too_many_handshakes"), 1);
        assert_eq!(password_checks(1), 1);
        assert_eq!(password_checks(2), 1);
        assert_eq!(password_checks(4), 3);
        assert_eq!(password_checks(64), 4);
    }

    /// Finding: a connection past its TLS handshake but not yet registered
    /// was not closed by a revocation. Registering checks the revocation
    /// set under the lock `Front::revoke` closes sessions under.
    #[tokio::test]
    async fn a_revocation_before_the_session_registers_is_not_missed() {
        let (_dir, front) = front();
        let mac = "AABBCCDDEEFF";
        let ident = |serial: &str| Identity {
            mac: mac.into(),
            serial: serial.into(),
            via: "certificate",
        };
        // The handshake is done; the revocation comes before the CONNECT.
        assert!(front.revoke(&["0a".into()]).is_empty(), "nothing open yet");
        let (kill, killed) = watch::channel(false);
        assert!(
            !front
                .take_over(mac, 1, Some(&ident("0a")), kill, None)
                .await
        );
        assert!(front.connected().is_empty());
        assert!(!*killed.borrow());
        // A certificate that is not revoked registers; a revocation after
        // that closes it.
        let (kill, mut killed) = watch::channel(false);
        assert!(
            front
                .take_over(mac, 2, Some(&ident("0b")), kill, None)
                .await
        );
        assert_eq!(front.connected(), [mac]);
        assert_eq!(front.revoke(&["0b".into()]), [mac]);
        assert!(*killed.borrow_and_update());
    }

    /// rustls' 4 KiB reads through the read-ahead get every byte in order,
    /// and the buffer is gone once the socket has nothing more.
    #[tokio::test]
    async fn read_ahead_passes_every_byte_and_frees_when_idle() {
        let (mut w, r) = tokio::io::duplex(8 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for part in sent.chunks(3_000) {
                w.write_all(part).await.unwrap();
            }
            w
        });
        let mut ra = ReadAhead::new(r);
        let mut got = Vec::new();
        while got.len() < data.len() {
            let mut b = [0u8; 4096];
            let n = ra.read(&mut b).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&b[..n]);
        }
        assert_eq!(got, data);
        // A filled 4 KiB buffer moved it to the full size.
        assert_eq!(ra.cap, READ_AHEAD);
        let _w = writer.await.unwrap();
        // Nothing left to read: the read is pending and the buffer freed.
        let mut b = [0u8; 16];
        let mut b = tokio::io::ReadBuf::new(&mut b);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(std::pin::Pin::new(&mut ra)
            .poll_read(&mut cx, &mut b)
            .is_pending());
        assert!(ra.buf.is_none());
    }

    /// Publishes already in the socket are routed in one pass, and their
    /// PUBACKs reach the downlink as one batch, in order.
    #[tokio::test]
    async fn a_pass_takes_what_is_readable_and_batches_its_pubacks() {
        let device = "AABBCCDDEEFF";
        let topic = format!("ESP32CAM/{device}/status");
        let mut wire = Vec::new();
        for pkid in 1..=10u16 {
            let payload = br#"{"status":"alive"}"#;
            wire.push(0x32);
            wire.push((2 + topic.len() + 2 + payload.len()) as u8);
            wire.extend_from_slice(&(topic.len() as u16).to_be_bytes());
            wire.extend_from_slice(topic.as_bytes());
            wire.extend_from_slice(&pkid.to_be_bytes());
            wire.extend_from_slice(payload);
        }
        let (mut w, mut r) = tokio::io::duplex(64 * 1024);
        w.write_all(&wire).await.unwrap();
        drop(w);
        let (ingest, queued) = flume::bounded(64);
        let (_acks_tx, acks_rx) = watch::channel(1u64);
        let replies = Replies::default();
        let up = Uplink {
            device,
            max_packet: 1 << 20,
            keep_alive: 0,
            ack_wait: Duration::from_secs(5),
            max_filters_per_subscribe: 8,
            max_filters_per_session: 16,
            ingest: &ingest,
            direct: None,
            disconnected: &AtomicBool::new(false),
        };
        let mut buf = BytesMut::with_capacity(512);
        let upstream = Upstream::Broker {
            w: &mut tokio::io::sink(),
            acks: acks_rx,
        };
        up.run(&mut r, &mut buf, upstream, &replies).await.unwrap();
        assert_eq!(queued.len(), 10);
        let mut batch = Vec::new();
        replies.take_into(&mut batch);
        let want: Vec<u8> = (1..=10u16).flat_map(puback_packet).collect();
        assert_eq!(batch, want);
    }

    /// Replies keep their order across hand-overs; the uplink waits while
    /// [`REPLIES_MAX`] bytes wait, and goes on once the downlink takes them.
    #[tokio::test]
    async fn replies_keep_order_and_hold_the_uplink_when_full() {
        use std::future::Future;
        let replies = Replies::default();
        let big = vec![7u8; REPLIES_MAX];
        replies.push(&[1, 2]).await;
        replies.push(&big).await;
        let mut third = std::pin::pin!(replies.push(&[3]));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(third.as_mut().poll(&mut cx).is_pending(), "full: waits");
        let mut out = Vec::new();
        replies.take_into(&mut out);
        assert_eq!(out.len(), 2 + REPLIES_MAX);
        assert_eq!(out[..2], [1, 2]);
        assert!(third.as_mut().poll(&mut cx).is_ready(), "room again");
        replies.take_into(&mut out);
        assert_eq!(out.last(), Some(&3));
        // The downlink's wait ends at once for what was pushed meanwhile.
        replies.push(&[4]).await;
        tokio::time::timeout(Duration::from_secs(5), replies.wait())
            .await
            .expect("woken");
    }

    /// A session's chunks share one topic allocation; another topic gets
    /// its own.
    #[test]
    fn chunks_share_their_topic() {
        let mut cache = Bytes::new();
        let a = shared_topic(&mut cache, b"ESP32CAM/AABBCCDDEEFF/data");
        let b = shared_topic(&mut cache, b"ESP32CAM/AABBCCDDEEFF/data");
        assert_eq!(a, b);
        assert_eq!(a.as_ptr(), b.as_ptr(), "one allocation");
        let c = shared_topic(&mut cache, b"device/AABBCCDDEEFF/data");
        assert_eq!(&c[..], b"device/AABBCCDDEEFF/data");
        assert_ne!(c.as_ptr(), a.as_ptr());
        assert_eq!(
            &a[..],
            b"ESP32CAM/AABBCCDDEEFF/data",
            "earlier ones unchanged"
        );
    }

    #[test]
    fn topic_rules() {
        let d = "AABBCCDDEEFF";
        assert!(own_topic(
            "ESP32CAM/AABBCCDDEEFF/status",
            d,
            &[Channel::Status]
        ));
        assert!(own_topic(
            "device/aa:bb:cc:dd:ee:ff/data",
            d,
            &[Channel::Data]
        ));
        assert!(!own_topic(
            "ESP32CAM/AABBCCDDEE00/status",
            d,
            &[Channel::Status]
        ));
        assert!(!own_topic(
            "ESP32CAM/AABBCCDDEEFF/cmd",
            d,
            &[Channel::Status]
        ));
        assert!(!own_topic("ESP32CAM/+/cmd", d, &[Channel::Cmd]));
        assert!(!own_topic("ESP32CAM/#", d, &[Channel::Cmd]));
        assert!(!own_topic("#", d, &[Channel::Cmd]));
    }
}
