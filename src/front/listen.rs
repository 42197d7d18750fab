//! The device listeners: the accept loops of the certificate, password and
//! plaintext listeners, and admission (the connection cap, each TLS
//! listener's handshake budget and a source address's share of it).

use super::identity::{Auth, Identity};
use super::readahead::ReadAhead;
use super::{Front, LOG_TARGET};
use crate::pki::peer_identity;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// Which TLS listener accepted a connection.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum TlsMode {
    ClientCertificate,
    Password,
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
                        warn!(target: LOG_TARGET, %peer, reason, error = %detail, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        front.refuse("tls_handshake_timeout");
                        warn!(target: LOG_TARGET, %peer, timeout_ms = timeout.as_millis() as u64, "TLS handshake refused: timed out");
                        return;
                    }
                };
                if mode == TlsMode::Password {
                    debug!(target: LOG_TARGET, %peer, "TLS handshake complete (password listener)");
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
                            warn!(target: LOG_TARGET, %peer, error = %e, "TLS connection refused: no device identity in the certificate");
                            return;
                        }
                    },
                    None => {
                        front.refuse("tls_no_certificate");
                        warn!(target: LOG_TARGET, %peer, "TLS connection refused: no client certificate");
                        return;
                    }
                };
                // The verifier checked the serial during a full handshake;
                // this check holds for any handshake, a resumed one included
                // (rustls does not verify a resumed session's certificate).
                if front.is_revoked(&id.serial_hex) {
                    front.refuse("tls_revoked");
                    warn!(target: LOG_TARGET, %peer, device = %id.mac, serial = %id.serial_hex, "TLS connection refused: certificate revoked");
                    return;
                }
                debug!(target: LOG_TARGET, %peer, device = %id.mac, serial = %id.serial_hex, "TLS handshake complete");
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
                    Err(e) => { warn!(target: LOG_TARGET, error = %e, "accept failed"); continue; }
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
                warn!(target: LOG_TARGET, %peer, max_handshakes_per_ip = cfg.max_handshakes_per_ip, "connection refused: too many TLS handshakes in progress from this address");
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
            warn!(target: LOG_TARGET, %peer, max_handshakes = cfg.max_handshakes, "connection refused: too many TLS handshakes in progress");
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
                warn!(target: LOG_TARGET, %peer, max_connections = self.inner.cfg.max_connections, "connection refused: too many connections");
                None
            }
        }
    }
}

/// Concurrent argon2 password checks on a machine with `cores` cores: all
/// but one, at least one, at most four (each takes ~19 MiB).
pub(super) fn password_checks(cores: usize) -> usize {
    cores.saturating_sub(1).clamp(1, 4)
}

/// A handshake in progress: its place in the listener's budget and in its
/// source address's share, both given back when dropped.
pub(super) struct HandshakeSlot {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::tests::front;

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
}
