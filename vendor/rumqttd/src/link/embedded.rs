//! barngate patch: sessions whose transport the embedding application drives.
//!
//! An application that terminates its clients' connections itself (its own TLS
//! and identity, its own checks on every packet) hands the router a client's
//! parsed packets and writes back the packets the router returns. The router
//! serves the session exactly as it serves a network connection: CONNACK,
//! SUBACK, UNSUBACK, PINGRESP, the QoS 1 and 2 acknowledgements, deliveries,
//! wills, retained messages, persistent sessions. Nothing is spawned and no
//! socket or buffer is kept per session: the application's own connection
//! task is the only one. What `RemoteLink` and `Network` do around the
//! router (reading and framing the socket, the keep-alive timer, the packet
//! size limit) is the application's to do.
//!
//! A session ends with [`EmbeddedLink::close`] (or when it is dropped), as a
//! closed network connection ends: the router removes it (keeping a
//! persistent session's state) and publishes its will unless the client sent
//! DISCONNECT. Will delay intervals (MQTT 5) are not supported: the will is
//! published when the session ends.

use crate::link::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use crate::protocol::{ConnAck, ConnectReturnCode, Packet};
use crate::router::Event;
use crate::ConnectionId;
use flume::r#async::SendFut;
use flume::{SendError, Sender, TrySendError};
use std::pin::Pin;
use std::mem;
use std::sync::atomic::{AtomicBool, Ordering};

/// Why a session could not start.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("not a CONNECT packet")]
    NotConnect,
    /// MQTT-3.1.3-8: a persistent session needs a client id. Answer the
    /// client with [`AttachError::connack`] and close the connection.
    #[error("a persistent session needs a client id")]
    InvalidClientId,
    /// The router refused the session (no room for another connection, an
    /// invalid client id) or has stopped.
    #[error("the router did not admit the session: {0}")]
    Refused(#[from] LinkError),
}

impl AttachError {
    /// The CONNACK that tells the client why, where MQTT has a return code.
    pub fn connack(&self) -> Option<Packet> {
        match self {
            AttachError::InvalidClientId => Some(Packet::ConnAck(
                ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::ClientIdentifierNotValid,
                },
                None,
            )),
            _ => None,
        }
    }
}

/// Starts sessions on a running router; cheap to clone.
#[derive(Clone, Debug)]
pub struct Attach {
    router_tx: Sender<(ConnectionId, Event)>,
}

impl Attach {
    pub(crate) fn new(router_tx: Sender<(ConnectionId, Event)>) -> Attach {
        Attach { router_tx }
    }

    /// Registers the session a client's CONNECT asks for (a
    /// `Packet::Connect`; its login, if any, is the application's to check)
    /// and returns it with the router's CONNACK for the client.
    pub async fn connect(&self, connect: Packet) -> Result<(EmbeddedLink, Packet), AttachError> {
        let Packet::Connect(connect, props, will, will_props, _) = connect else {
            return Err(AttachError::NotConnect);
        };
        if connect.client_id.is_empty() && !connect.clean_session {
            return Err(AttachError::InvalidClientId);
        }
        let topic_alias_max = props.as_ref().and_then(|p| p.topic_alias_max);
        let has_will = will.is_some();
        let (link_tx, link_rx, ack) = LinkBuilder::new(&connect.client_id, self.router_tx.clone())
            .clean_session(connect.clean_session)
            .last_will(will)
            .last_will_properties(will_props)
            .topic_alias_max(topic_alias_max.unwrap_or(0))
            .build_async()
            .await?;
        let connack = Option::<Packet>::from(ack).ok_or(LinkError::NotConnectionAck)?;
        let link = EmbeddedLink {
            link_tx,
            link_rx,
            client_id: connect.client_id,
            has_will,
            disconnected: AtomicBool::new(false),
            wake_pending: AtomicBool::new(false),
            ended: false,
        };
        Ok((link, connack))
    }
}

/// One session whose transport the application drives (see the module).
pub struct EmbeddedLink {
    link_tx: LinkTx,
    link_rx: LinkRx,
    client_id: String,
    /// The CONNECT carried a will: the end of the session publishes it.
    has_will: bool,
    /// The client sent DISCONNECT: the router ends the session itself (and
    /// has deleted the will).
    disconnected: AtomicBool,
    /// The router unscheduled the link and has not been told it is ready
    /// again (`recv` was cancelled before it could).
    wake_pending: AtomicBool,
    ended: bool,
}

impl EmbeddedLink {
    pub fn id(&self) -> ConnectionId {
        self.link_rx.id()
    }

    /// Hands the client's packets (after its CONNECT) to the router, in
    /// order. Waits while the router's queue is full.
    pub async fn send(&self, packets: impl IntoIterator<Item = Packet>) -> Result<(), LinkError> {
        {
            let mut buffer = self.link_tx.buffer();
            let before = buffer.len();
            for p in packets {
                if matches!(p, Packet::Disconnect(..)) {
                    self.disconnected.store(true, Ordering::Relaxed);
                }
                buffer.push_back(p);
            }
            if buffer.len() == before {
                return Ok(());
            }
        }
        // Bound before the wait: a `Result` in an `if let` would live
        // across it and take an event's room in the future.
        let wait = to_router(self.link_tx.router_tx(), (self.id(), Event::DeviceData))?;
        if let Some(wait) = wait {
            wait.await?;
        }
        Ok(())
    }

    /// Waits for the router's next packets for the client and appends them
    /// to `out`, in order. An error means the router has ended the session
    /// (after the client's DISCONNECT, or for a newer session with its
    /// client id): close the connection. Cancel-safe: what it took is in
    /// `out`, and a wake it could not send is sent by the next call.
    pub async fn recv(&self, out: &mut Vec<Packet>) -> Result<(), LinkError> {
        if self.wake_pending.load(Ordering::Relaxed) {
            self.wake().await?;
        }
        self.link_rx.router_rx.recv_async().await?;
        // Taken whole, so that an idle session keeps no queue (a
        // notification is ~ 250 B); the router starts a new one.
        let queue = mem::take(&mut *self.link_rx.send_buffer.lock());
        let mut unscheduled = false;
        for n in queue {
            match Option::<Packet>::from(n) {
                Some(p) => out.push(p),
                None => unscheduled = true,
            }
        }
        if unscheduled {
            // The router stops sending to a link that is behind until the
            // link says it is ready again.
            self.wake_pending.store(true, Ordering::Relaxed);
            self.wake().await?;
        }
        Ok(())
    }

    /// Tells the router the link is ready again.
    async fn wake(&self) -> Result<(), LinkError> {
        let wait = to_router(self.link_tx.router_tx(), (self.id(), Event::Ready))?;
        if let Some(wait) = wait {
            wait.await?;
        }
        self.wake_pending.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// What ends the session, unless the router has ended it already (after
    /// the client's DISCONNECT, or for a newer session): then its connection
    /// id may already be another session's, and its will is gone.
    fn ending(&mut self) -> bool {
        !(std::mem::replace(&mut self.ended, true)
            || self.disconnected.load(Ordering::Relaxed)
            || self.link_rx.router_rx.is_disconnected())
    }

    /// The events that end the session: the disconnection, then the will
    /// (which the router publishes if it still has it).
    fn end_event(&mut self, will: bool) -> (ConnectionId, Event) {
        let event = match will {
            false => Event::Disconnect,
            true => Event::PublishWill((mem::take(&mut self.client_id), None)),
        };
        (self.id(), event)
    }

    /// Ends the session as a closed network connection does.
    pub async fn close(mut self) {
        if !self.ending() {
            return;
        }
        for will in [false, true] {
            if will && !self.has_will {
                break;
            }
            let event = self.end_event(will);
            // An `Option` across the wait, not the `Result`: its error
            // holds a whole event.
            if let Some(wait) = to_router(self.link_tx.router_tx(), event).ok().flatten() {
                let _ = wait.await;
            }
        }
    }
}

impl Drop for EmbeddedLink {
    /// A session dropped without [`EmbeddedLink::close`] (its task was
    /// cancelled) ends the same way, waiting for room in the router's queue
    /// as a network connection's end does.
    fn drop(&mut self) {
        if self.ending() {
            for will in [false, true] {
                if will && !self.has_will {
                    break;
                }
                let event = self.end_event(will);
                let _ = self.link_tx.router_tx().send(event);
            }
        }
    }
}

/// A wait for room in the router's queue.
type Wait = Pin<Box<SendFut<'static, (ConnectionId, Event)>>>;

/// Puts `event` on the router's queue at once if it has room (the usual
/// case); else returns the wait for room, boxed: an event is large, and an
/// inline wait would make every session's future larger by one.
fn to_router(
    tx: &Sender<(ConnectionId, Event)>,
    event: (ConnectionId, Event),
) -> Result<Option<Wait>, LinkError> {
    match tx.try_send(event) {
        Ok(()) => Ok(None),
        Err(TrySendError::Full(e)) => Ok(Some(Box::pin(tx.clone().into_send_async(e)))),
        Err(TrySendError::Disconnected(e)) => Err(LinkError::Send(SendError(e))),
    }
}
