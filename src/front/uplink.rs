//! The device-to-gateway half of a session: reads the device's packets,
//! routes each, hands publishes to the ingest and forwards the rest to the
//! broker (or, in a local session, has the front answer them).

use super::direct;
use super::downlink::Replies;
use super::frame::{next_frame, puback_packet, read_now, ready_frame, short_packet, PUBREC};
use super::local::answer;
use super::route::{route, Ack, Control, Route};
use super::topics::count_filters;
use super::violation::Violation;
use crate::ingest::queue::Inbound;
use bytes::{Bytes, BytesMut};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Reads beyond the first per uplink pass (each up to 4 KiB).
const PASS_READS: usize = 16;

/// The device-to-gateway half of a session.
pub(super) struct Uplink<'a> {
    pub(super) device: &'a str,
    pub(super) max_packet: usize,
    /// The device's CONNECT keep-alive, seconds (0: none).
    pub(super) keep_alive: u16,
    /// Longest wait for the broker's CONNACK/SUBACK.
    pub(super) ack_wait: Duration,
    pub(super) max_filters_per_subscribe: usize,
    pub(super) max_filters_per_session: usize,
    pub(super) ingest: &'a flume::Sender<Inbound>,
    /// The session's direct downlink, whose subscriptions it keeps.
    pub(super) direct: Option<&'a direct::Direct>,
    /// Set when the device sends DISCONNECT: a local session then drops
    /// its will.
    pub(super) disconnected: &'a AtomicBool,
}

/// Where the packets of a session that are not the ingest's go.
pub(super) enum Upstream<'a, W> {
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
    /// Reads the device's packets until it closes: checks each, hands
    /// publishes to the ingest and forwards the rest to the broker (or, in
    /// a local session, answers them).
    pub(super) async fn run<R, W>(
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
                        } => count_filters(
                            &mut filters_seen,
                            filters,
                            self.max_filters_per_subscribe,
                            self.max_filters_per_session,
                        )
                        .map(|()| r),
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

async fn to_broker<W: AsyncWrite + Unpin>(up_w: &mut W, bytes: &[u8]) -> Result<(), Violation> {
    up_w.write_all(bytes)
        .await
        .map_err(|e| Violation::Io(format!("broker write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
