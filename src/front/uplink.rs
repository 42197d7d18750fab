//! The device-to-gateway half of a session: reads the device's packets,
//! routes each, hands publishes to the ingest and the rest to the broker's
//! session.

use super::downlink::Replies;
use super::frame::{next_frame, puback_packet, read_now, ready_frame};
use super::route::{route, Ack, Control, Route};
use super::topics::count_filters;
use super::violation::Violation;
use crate::ingest::queue::Inbound;
use bytes::{Bytes, BytesMut};
use rumqttd::embedded::EmbeddedLink;
use rumqttd::protocol::Packet;
use std::collections::HashSet;
use std::time::Duration;
use tokio::io::AsyncRead;
use tokio::sync::watch;

/// Reads beyond the first per uplink pass (each up to 4 KiB).
const PASS_READS: usize = 16;

/// The device-to-gateway half of a session.
pub(super) struct Uplink<'a> {
    pub(super) device: &'a str,
    pub(super) max_packet: usize,
    /// The device's CONNECT keep-alive, seconds (0: none).
    pub(super) keep_alive: u16,
    /// Longest wait for the broker's SUBACK.
    pub(super) ack_wait: Duration,
    pub(super) max_filters_per_subscribe: usize,
    pub(super) max_filters_per_session: usize,
    pub(super) ingest: &'a flume::Sender<Inbound>,
}

impl Uplink<'_> {
    /// Reads the device's packets until it closes: checks each, hands
    /// publishes to the ingest and the rest to the broker's session (`link`).
    /// A publish for the ingest waits until the broker has answered every
    /// SUBSCRIBE before it (`acks` counts its SUBACKs), so the ingest's
    /// reply finds the subscription in place.
    pub(super) async fn run<R>(
        self,
        dev_r: &mut R,
        buf: &mut BytesMut,
        link: &EmbeddedLink,
        mut acks: watch::Receiver<u64>,
        replies: &Replies,
    ) -> Result<(), Violation>
    where
        R: AsyncRead + Unpin,
    {
        // MQTT 3.1.1 §3.1.2.10: a server closes a client silent for 1.5 ×
        // its keep-alive. (The broker's session has no timer of its own.)
        let idle =
            (self.keep_alive > 0).then(|| Duration::from_millis(self.keep_alive as u64 * 1500));
        // SUBACKs due so far, which a publish for the ingest waits for.
        let mut awaited = 0u64;
        // How many of them are known to have arrived (the watch is read
        // only while some are outstanding, not on every publish).
        let mut arrived: u64 = 0;
        // Every distinct topic filter subscribed to (`count_filters`).
        let mut filters_seen: HashSet<String> = HashSet::new();
        // The topic of the session's chunks, shared by all of them.
        let mut topic = Bytes::new();
        // A pass's PUBACKs, encoded, go to the downlink together once the
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
            // and the broker-bound ones go together. A violation still lets
            // the packets before it through, as if they had been forwarded
            // one by one.
            let mut next = Some(first);
            let mut run = Vec::new();
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
                let routed =
                    route(frame, self.device, self.max_packet, &mut topic).and_then(|r| match &r {
                        Route::Broker {
                            control: Control::Subscribe { filters },
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
                    Ok(Route::Broker { packet, control }) => {
                        awaited += u64::from(matches!(control, Control::Subscribe { .. }));
                        run.push(*packet);
                    }
                    Ok(Route::Ingest { message, ack }) => {
                        to_broker(link, &mut run).await?;
                        if arrived < awaited {
                            let wait = acks.wait_for(|n| *n >= awaited);
                            match tokio::time::timeout(self.ack_wait, wait).await {
                                Ok(Ok(n)) => arrived = *n,
                                // The downlink ended: the broker ended the session.
                                Ok(Err(_)) => return Ok(()),
                                Err(_) => return Err(Violation::BrokerTimeout),
                            }
                        }
                        self.ingest
                            .send_async(message)
                            .await
                            .map_err(|_| Violation::Io("the ingest has stopped".into()))?;
                        if let Ack::Puback(id) = ack {
                            acks_out.extend_from_slice(&puback_packet(id));
                        }
                    }
                    Err(v) => {
                        violation = Some(v);
                        break;
                    }
                }
            }
            to_broker(link, &mut run).await?;
            replies.push(&acks_out).await;
            acks_out.clear();
            if let Some(v) = violation {
                return Err(v);
            }
        }
    }
}

async fn to_broker(link: &EmbeddedLink, packets: &mut Vec<Packet>) -> Result<(), Violation> {
    link.send(packets.drain(..))
        .await
        .map_err(|e| Violation::Io(format!("broker: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

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
        let (_acks_tx, acks_rx) = watch::channel(0u64);
        let link = crate::front::tests::link(device).await;
        let replies = Replies::default();
        let up = Uplink {
            device,
            max_packet: 1 << 20,
            keep_alive: 0,
            ack_wait: Duration::from_secs(5),
            max_filters_per_subscribe: 8,
            max_filters_per_session: 16,
            ingest: &ingest,
        };
        let mut buf = BytesMut::with_capacity(512);
        up.run(&mut r, &mut buf, &link, acks_rx, &replies)
            .await
            .unwrap();
        assert_eq!(queued.len(), 10);
        let mut batch = Vec::new();
        replies.take_into(&mut batch);
        let want: Vec<u8> = (1..=10u16).flat_map(puback_packet).collect();
        assert_eq!(batch, want);
    }
}
