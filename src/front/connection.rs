//! One device connection after its handshake: the CONNECT (and a password
//! login's check), the session's registration, then its [`uplink`] and
//! [`downlink`] until either ends, the gateway closes it or a newer
//! connection of the same device replaces it.
//!
//! [`uplink`]: super::uplink
//! [`downlink`]: super::downlink

use super::downlink::{downlink, Replies};
use super::frame::{connack_refusal, next_frame};
use super::identity::{Auth, Connect, Refusal};
use super::listen::HandshakeSlot;
use super::uplink::Uplink;
use super::violation::{
    Violation, CONNACK_IDENTIFIER_REJECTED, CONNACK_NOT_AUTHORIZED, CONNACK_SERVER_UNAVAILABLE,
};
use super::{Front, LOG_TARGET};
use crate::ingest::queue::{Inbound, Payload};
use crate::metrics::Metrics;
use bytes::BytesMut;
use rumqttd::embedded::AttachError;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::Protocol;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::{debug, info, warn};

impl Front {
    /// One device connection after the handshake: CONNECT, then its
    /// session in the broker, until either side ends it.
    ///
    /// The stream comes already split (its halves share it through an
    /// `Arc`): an async fn keeps its arguments for its whole life, and a TLS
    /// stream passed whole would take ≈ 1.3 KB in every session's task
    /// after it has moved on.
    pub(super) async fn session<S>(
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
                debug!(target: LOG_TARGET, %peer, device = %shown, error = %e, "connection closed before CONNECT");
                return;
            }
            Ok(Err(e)) => {
                metrics.reject(e.reason());
                warn!(target: LOG_TARGET, %peer, device = %shown, error = %e, "connection closed");
                return;
            }
            Err(_) => {
                metrics.reject("connect_timeout");
                warn!(target: LOG_TARGET, %peer, device = %shown, "connection closed: no CONNECT in time");
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
                warn!(target: LOG_TARGET, %peer, device = %r.device, reason = r.reason, error = %r.detail, "password login refused");
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
                warn!(target: LOG_TARGET, %peer, device = %shown, reason = v.reason(), connack = code, violation = %v, "CONNECT refused: {}", v.class());
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
            packet,
        } = connect;

        let (kill_tx, mut kill_rx) = watch::channel(false);
        let conn_id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        if !self
            .take_over(&device, conn_id, ident.as_ref(), kill_tx)
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
            warn!(target: LOG_TARGET, %peer, device = %device, reason, "connection refused: credentials revoked before the session started");
            let _ = dev_w
                .write_all(&connack_refusal(CONNACK_NOT_AUTHORIZED))
                .await;
            let _ = dev_w.shutdown().await;
            return;
        }

        // The broker's session. Bounded like the CONNECT: a router too busy
        // to answer must not hold the connection open.
        let attached =
            tokio::time::timeout(cfg.handshake_timeout, cfg.attach.connect(packet)).await;
        let (link, connack) = match attached {
            Ok(Ok(v)) => v,
            failed => {
                let (code, error) = match failed {
                    Ok(Err(e @ AttachError::InvalidClientId)) => {
                        (CONNACK_IDENTIFIER_REJECTED, e.to_string())
                    }
                    Ok(Err(e)) => (CONNACK_SERVER_UNAVAILABLE, e.to_string()),
                    _ => (CONNACK_SERVER_UNAVAILABLE, "no answer in time".into()),
                };
                self.refuse("broker_refused");
                warn!(target: LOG_TARGET, %peer, device = %device, error = %error, "connection refused: the broker did not admit the session");
                let _ = dev_w.write_all(&connack_refusal(code)).await;
                let _ = dev_w.shutdown().await;
                self.release(&device, conn_id);
                return;
            }
        };
        let mut first = BytesMut::new();
        if V4.write(connack, &mut first).is_err() || dev_w.write_all(&first).await.is_err() {
            debug!(target: LOG_TARGET, %peer, device = %device, "connection closed before its CONNACK");
        } else {
            Metrics::inc(&metrics.connections);
            let via = ident.as_ref().map_or("plaintext", |i| i.via);
            info!(target: LOG_TARGET, %peer, device = %device, auth = via, keep_alive_s = keep_alive, "device connected");
            let replies = Replies::default();
            let (acks_tx, acks_rx) = watch::channel(0u64);
            let up = Uplink {
                device: &device,
                max_packet: cfg.max_packet_size,
                keep_alive,
                ack_wait: cfg.handshake_timeout,
                max_filters_per_subscribe: cfg.max_filters_per_subscribe,
                max_filters_per_session: cfg.max_filters_per_session,
                ingest: &cfg.ingest,
            };
            let to_broker = up.run(&mut dev_r, &mut buf, &link, acks_rx, &replies);
            let to_device = downlink(&link, &mut dev_w, &replies, acks_tx);
            let r: Result<(), Violation> = tokio::select! {
                r = to_broker => r,
                _ = to_device => Ok(()),
                _ = kill_rx.wait_for(|k| *k) => {
                    debug!(target: LOG_TARGET, device = %device, "session closed by the gateway");
                    Ok(())
                }
            };
            metrics.connections.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(()) => {}
                Err(Violation::Io(e)) => {
                    debug!(target: LOG_TARGET, %peer, device = %device, error = %e, "connection closed")
                }
                Err(v) => {
                    self.count(&v);
                    warn!(target: LOG_TARGET, %peer, device = %device, identity = %shown, reason = v.reason(), violation = %v, "connection closed: {}", v.class());
                }
            }
            let _ = dev_w.shutdown().await;
        }
        // The broker ends the session as for a closed connection: it
        // publishes the will unless the device sent DISCONNECT. Before the
        // session is released, so that a newer connection of the device
        // (waiting in `take_over`) starts after it.
        link.close().await;
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
        info!(target: LOG_TARGET, %peer, device = %device, "device disconnected");
        drop(permit);
    }
}
