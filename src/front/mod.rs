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
//! Every session, clean or persistent, is the broker's: the front attaches
//! one in rumqttd's router for each device (`rumqttd::embedded`, in
//! process: the broker has no listener of its own) and hands it every
//! packet but the ingest's publishes, parsed, with the CONNECT's login
//! removed (the front has checked it). The broker answers CONNECT,
//! SUBSCRIBE, UNSUBSCRIBE, PINGREQ and the QoS 2 handshake, keeps retained
//! messages and persistent sessions, publishes the will, and carries the
//! gateway's replies to the device; the front writes what it returns.
//!
//! A device's QoS 0/1, non-retained PUBLISHes to its own topics (every
//! chunk) do not go through the broker: the front hands them to the ingest
//! queue ([`crate::ingest::queue::Inbound`]; a CHUNK already decoded, on
//! the front's threads rather than the one ingest thread) and answers QoS 1
//! with its own PUBACK, written between whole packets of the broker's
//! downlink (the device chose that packet id; the broker's own ids number
//! its publishes to the device, a separate space). Such a publish waits
//! until the broker has acknowledged the device's CONNECT and SUBSCRIBEs,
//! so the ingest's reply always finds the subscription in place. The broker
//! sees none of these publishes, so the front enforces the device's
//! keep-alive itself.
//!
//! The front keeps one session per device: a new connection of the same MAC
//! closes the old one first (a rumqttd quirk lets the old one kick the new
//! one otherwise), and a revocation closes the sessions of the revoked
//! certificate at once.
//!
//! The code, by concern:
//!
//! - `listen`: the listeners, the accept loops and admission (connection
//!   cap, handshake budgets per listener and per source address);
//! - `readahead`: the TLS socket read in large blocks;
//! - `identity`: who a connection is (certificate, password or trusted
//!   client id) and the CONNECT policy, with its CONNACK refusals;
//! - `violation`: why the front closes a connection, as metric, log and
//!   CONNACK return code;
//! - `frame`: reading whole MQTT frames, parsing them, and the short
//!   packets the front writes itself;
//! - `topics`: the topic rules for publish, will and subscribe, and the
//!   topic filter caps;
//! - `route`: where each device packet goes, the publishes intercepted
//!   for the ingest among them;
//! - `connection`: one connection from its CONNECT to its close;
//!   `uplink` and `downlink` are its two halves.

mod connection;
mod downlink;
mod frame;
mod identity;
mod listen;
mod readahead;
mod route;
mod topics;
mod uplink;
mod violation;

use crate::devpass::PasswordStore;
use crate::ingest::queue::Inbound;
use crate::metrics::Metrics;
use crate::pki::SharedRevoked;
use identity::Identity;
use listen::{password_checks, TlsMode};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tracing::info;
use violation::Violation;

/// The target of the front's log events, whichever of its files logs them.
const LOG_TARGET: &str = module_path!();

/// How long a new connection waits for the old session of the same device
/// to be torn down.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

/// Settings of the front.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// Starts each device's session in the broker.
    pub attach: rumqttd::embedded::Attach,
    /// The ingest queue: devices' own publishes go there directly.
    pub ingest: flume::Sender<Inbound>,
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
    /// Most topic filters in one SUBSCRIBE (`mqtt.max_filters_per_subscribe`).
    pub max_filters_per_subscribe: usize,
    /// Most distinct topic filters one connection subscribes to
    /// (`mqtt.max_filters_per_session`).
    pub max_filters_per_session: usize,
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
    /// The open session of each device.
    sessions: Mutex<HashMap<String, Session>>,
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
}

/// The device front; cheap to clone (shared state).
#[derive(Clone)]
pub struct Front {
    inner: Arc<Inner>,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One broker for the unit tests that need sessions in it.
    fn attach() -> rumqttd::embedded::Attach {
        static BROKER: std::sync::OnceLock<rumqttd::embedded::Attach> = std::sync::OnceLock::new();
        BROKER
            .get_or_init(|| {
                let b = crate::broker::start(&crate::config::MqttConfig::default())
                    .expect("embedded broker");
                b.attach
            })
            .clone()
    }

    /// A clean session of `device` in the test broker.
    pub(crate) async fn link(device: &str) -> rumqttd::embedded::EmbeddedLink {
        use rumqttd::protocol::{Connect, Packet};
        let connect = Connect {
            keep_alive: 60,
            client_id: device.into(),
            clean_session: true,
        };
        let (link, _connack) = attach()
            .connect(Packet::Connect(connect, None, None, None, None))
            .await
            .expect("a session");
        link
    }

    pub(super) fn front() -> (tempfile::TempDir, Front) {
        let dir = tempfile::tempdir().unwrap();
        let (ingest, _) = flume::bounded(1);
        let cfg = FrontConfig {
            attach: attach(),
            ingest,
            max_connections: 4,
            max_handshakes: 4,
            max_handshakes_per_ip: 2,
            handshake_timeout: Duration::from_millis(300),
            max_packet_size: 1 << 16,
            passwords: PasswordStore::new(dir.path()),
            max_filters_per_subscribe: 8,
            max_filters_per_session: 16,
        };
        (
            dir,
            Front::new(cfg, Arc::default(), SharedRevoked::default()),
        )
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
        assert!(!front.take_over(mac, 1, Some(&ident("0a")), kill).await);
        assert!(front.connected().is_empty());
        assert!(!*killed.borrow());
        // A certificate that is not revoked registers; a revocation after
        // that closes it.
        let (kill, mut killed) = watch::channel(false);
        assert!(front.take_over(mac, 2, Some(&ident("0b")), kill).await);
        assert_eq!(front.connected(), [mac]);
        assert_eq!(front.revoke(&["0b".into()]), [mac]);
        assert!(*killed.borrow_and_update());
    }
}
