//! The device-facing front: the only way into the embedded broker.
//!
//! It owns the device listeners. The TLS listener requires a client
//! certificate from the site CA (rustls, checked against the live revocation
//! set); the device's identity is the MAC in that certificate. The optional
//! plaintext listener (loopback only) takes the CONNECT client id as the
//! identity. Either way the front then reads the MQTT packets the device
//! sends (parsed with `rumqttd::protocol::v4`) and enforces:
//!
//! - the first packet is CONNECT and its client id is the identity;
//! - PUBLISH (and the CONNECT will) only to the device's own `…/status` and
//!   `…/data`; SUBSCRIBE only to its own `…/cmd` and `…/ack` (both dialects).
//!
//! A violation closes the connection before any of it reaches the broker. The
//! CONNECT is re-encoded with the per-process broker secret as its password,
//! so the loopback broker admits the front and nothing else. The front keeps
//! one session per device: a new connection of the same MAC closes the old
//! one first (a rumqttd quirk lets the old one kick the new one otherwise),
//! and a revocation closes the sessions of the revoked certificate at once.

use crate::metrics::Metrics;
use crate::pki::{peer_identity, PeerIdentity, SharedRevoked};
use crate::protocol::{normalize_device_id, parse_topic, Channel};
use bytes::BytesMut;
use rumqttd::protocol::v4::{check, V4};
use rumqttd::protocol::{Error as MqttError, LastWill, Login, Packet, Protocol};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Settings of the front.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// The loopback broker.
    pub upstream: SocketAddr,
    /// The broker's per-process secret (CONNECT password).
    pub secret: Arc<str>,
    pub max_connections: usize,
    pub max_handshakes: usize,
    /// TLS handshake timeout; also the longest wait for the CONNECT packet.
    pub handshake_timeout: Duration,
    /// Largest MQTT packet accepted from a device.
    pub max_packet_size: usize,
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
    SecondConnect,
    ServerPacket,
    Malformed(String),
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
            Violation::Malformed(_) => "malformed_mqtt",
            Violation::Io(_) => "connection_error",
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::NotConnect => write!(f, "first packet is not CONNECT"),
            Violation::ClientIdMismatch { client_id } => {
                write!(
                    f,
                    "CONNECT client id {client_id:?} is not the certificate's MAC"
                )
            }
            Violation::BadClientId { client_id } => {
                write!(f, "CONNECT client id {client_id:?} is not a device id")
            }
            Violation::Publish { topic } => write!(f, "publish to {topic:?} not allowed"),
            Violation::Subscribe { filter } => write!(f, "subscribe to {filter:?} not allowed"),
            Violation::SecondConnect => write!(f, "second CONNECT"),
            Violation::ServerPacket => write!(f, "server-only packet from a device"),
            Violation::Malformed(e) => write!(f, "malformed MQTT: {e}"),
            Violation::Io(e) => write!(f, "{e}"),
        }
    }
}

struct Session {
    id: u64,
    serial: Option<String>,
    kill: watch::Sender<bool>,
}

struct Inner {
    cfg: FrontConfig,
    metrics: Arc<Metrics>,
    revoked: SharedRevoked,
    sessions: Mutex<HashMap<String, Session>>,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    next_id: AtomicU64,
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
                cfg,
                metrics,
                revoked,
                sessions: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
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

    /// Adds serials to the live revocation set (new handshakes fail) and
    /// closes the open sessions made with them. Returns the devices closed.
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

    fn refuse(&self, reason: &'static str) {
        Metrics::inc(&self.inner.metrics.connections_refused);
        self.inner.metrics.reject(reason);
    }

    /// Accepts TLS connections until shutdown.
    pub async fn run_tls(
        self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let acceptor = TlsAcceptor::from(tls);
        loop {
            let (sock, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => { warn!(error = %e, "accept failed"); continue; }
                },
                _ = shutdown.changed() => return,
            };
            let Some(permit) = self.connection_permit(peer) else {
                continue;
            };
            let Ok(hs) = self.inner.handshakes.clone().try_acquire_owned() else {
                self.refuse("too_many_handshakes");
                warn!(%peer, max_handshakes = self.inner.cfg.max_handshakes, "connection refused: too many TLS handshakes in progress");
                continue;
            };
            let front = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = sock.set_nodelay(true);
                let timeout = front.inner.cfg.handshake_timeout;
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
                debug!(%peer, device = %id.mac, serial = %id.serial_hex, "TLS handshake complete");
                front.session(stream, peer, Some(id), permit).await;
            });
        }
    }

    /// Accepts plaintext connections (loopback only) until shutdown.
    pub async fn run_plain(self, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        loop {
            let (sock, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => { warn!(error = %e, "accept failed"); continue; }
                },
                _ = shutdown.changed() => return,
            };
            let Some(permit) = self.connection_permit(peer) else {
                continue;
            };
            let front = self.clone();
            tokio::spawn(async move {
                let _ = sock.set_nodelay(true);
                front.session(sock, peer, None, permit).await;
            });
        }
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
    async fn session<S>(
        &self,
        stream: S,
        peer: SocketAddr,
        cert: Option<PeerIdentity>,
        permit: OwnedSemaphorePermit,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let metrics = self.inner.metrics.clone();
        let cfg = &self.inner.cfg;
        let cert_mac = cert.as_ref().map(|c| c.mac.clone());
        let shown = cert_mac.clone().unwrap_or_else(|| "-".into());
        let (mut dev_r, mut dev_w) = tokio::io::split(stream);
        let mut buf = BytesMut::with_capacity(4096);

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
        let (device, connect_bytes) = match self.check_connect(frame, cert_mac.as_deref()) {
            Ok(v) => v,
            Err(v) => {
                metrics.reject(v.reason());
                warn!(%peer, device = %shown, reason = v.reason(), violation = %v, "connection closed: identity violation");
                return;
            }
        };

        let (kill_tx, mut kill_rx) = watch::channel(false);
        let conn_id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.take_over(&device, conn_id, cert.as_ref(), kill_tx)
            .await;

        let result = async {
            let mut up = TcpStream::connect(cfg.upstream).await?;
            up.set_nodelay(true)?;
            up.write_all(&connect_bytes).await?;
            let (mut up_r, mut up_w) = up.into_split();
            Metrics::inc(&metrics.connections);
            info!(%peer, device = %device, tls = cert.is_some(), "device connected");
            let to_broker = async {
                loop {
                    match next_frame(&mut dev_r, &mut buf, cfg.max_packet_size).await {
                        Ok(Some(frame)) => {
                            check_packet(&frame, &device, cfg.max_packet_size)?;
                            up_w.write_all(&frame)
                                .await
                                .map_err(|e| Violation::Io(format!("broker write: {e}")))?;
                        }
                        Ok(None) => return Ok(()),
                        Err(v) => return Err(v),
                    }
                }
            };
            let to_device = tokio::io::copy(&mut up_r, &mut dev_w);
            let r: Result<(), Violation> = tokio::select! {
                r = to_broker => r,
                _ = to_device => Ok(()),
                _ = kill_rx.wait_for(|k| *k) => {
                    debug!(device = %device, "session closed by the gateway");
                    Ok(())
                }
            };
            metrics.connections.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(()) => {}
                Err(Violation::Io(e)) => debug!(%peer, device = %device, error = %e, "connection closed"),
                Err(v) => {
                metrics.reject(v.reason());
                warn!(%peer, device = %device, certificate = %shown, reason = v.reason(), violation = %v, "connection closed: identity violation");
                }
            }
            let _ = dev_w.shutdown().await;
            Ok::<(), std::io::Error>(())
        }
        .await;
        if let Err(e) = result {
            warn!(%peer, device = %device, error = %e, "cannot reach the embedded broker");
        }
        self.release(&device, conn_id);
        info!(%peer, device = %device, "device disconnected");
        drop(permit);
    }

    /// Validates the CONNECT and re-encodes it with the broker secret.
    fn check_connect(
        &self,
        frame: BytesMut,
        cert_mac: Option<&str>,
    ) -> Result<(String, BytesMut), Violation> {
        let packet = parse(frame, self.inner.cfg.max_packet_size)?;
        let Packet::Connect(connect, _, will, _, _) = packet else {
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
            check_publish_topic(topic, &device)?;
        }
        let login = Login {
            username: BROKER_USER.into(),
            password: self.inner.cfg.secret.to_string(),
        };
        let mut out = BytesMut::new();
        V4.write(
            Packet::Connect(connect, None, will, None, Some(login)),
            &mut out,
        )
        .map_err(|e| Violation::Malformed(e.to_string()))?;
        Ok((device, out))
    }

    /// Registers the session of `device`, closing an older one first.
    async fn take_over(
        &self,
        device: &str,
        conn_id: u64,
        cert: Option<&PeerIdentity>,
        kill: watch::Sender<bool>,
    ) {
        let old = {
            let mut s = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            s.insert(
                device.to_string(),
                Session {
                    id: conn_id,
                    serial: cert.map(|c| c.serial_hex.clone()),
                    kill,
                },
            )
        };
        if let Some(old) = old {
            info!(device = %device, "new connection replaces the open session");
            let _ = old.kill.send(true);
            // Resolves once the old session task has dropped its receiver.
            let _ = tokio::time::timeout(TAKEOVER_WAIT, old.kill.closed()).await;
        }
    }

    fn release(&self, device: &str, conn_id: u64) {
        let mut s = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if s.get(device).is_some_and(|x| x.id == conn_id) {
            s.remove(device);
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Reads the next whole MQTT frame (raw bytes). `Ok(None)` on a clean EOF.
async fn next_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<BytesMut>, Violation> {
    loop {
        if !buf.is_empty() {
            match check(buf.iter(), max) {
                Ok(h) => return Ok(Some(buf.split_to(h.frame_length()))),
                Err(MqttError::InsufficientBytes(_)) => {}
                Err(e) => return Err(Violation::Malformed(e.to_string())),
            }
        }
        buf.reserve(4096);
        match r.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(Violation::Io("connection closed inside a packet".into())),
            Ok(_) => {}
            Err(e) => return Err(Violation::Io(format!("read: {e}"))),
        }
    }
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
    allowed.contains(&t.channel) && normalize_device_id(t.wire_id).is_ok_and(|id| id == device)
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

/// Checks one packet after CONNECT against the device's identity.
fn check_packet(frame: &BytesMut, device: &str, max: usize) -> Result<(), Violation> {
    match parse(frame.clone(), max)? {
        Packet::Publish(p, _) => check_publish_topic(&p.topic, device),
        Packet::Subscribe(s, _) => {
            for f in &s.filters {
                if !own_topic(&f.path, device, &[Channel::Cmd, Channel::Ack]) {
                    return Err(Violation::Subscribe {
                        filter: truncate(&f.path),
                    });
                }
            }
            Ok(())
        }
        Packet::Connect(..) => Err(Violation::SecondConnect),
        Packet::ConnAck(..) | Packet::SubAck(..) | Packet::UnsubAck(..) | Packet::PingResp(_) => {
            Err(Violation::ServerPacket)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
