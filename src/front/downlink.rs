//! The gateway-to-device half of a session: the broker's packets, the
//! uplink's replies ([`Replies`]) and the ingest's direct publishes, written
//! to the device between whole packets.

use super::direct::{self, encode_publish, Outgoing};
use super::frame::{parse, CONNACK, SUBACK};
use bytes::BytesMut;
use rumqttd::protocol::v4::check;
use rumqttd::protocol::{Packet, QoS};
use std::sync::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

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
pub(super) struct Replies {
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
    pub(super) async fn push(&self, packets: &[u8]) {
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
    pub(super) fn take_into(&self, out: &mut Vec<u8>) {
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
    pub(super) async fn wait(&self) {
        self.queued.notified().await
    }
}

/// The gateway-to-device half of a session: the broker's packets (none in a
/// local session), the front's PUBACKs and other answers, and the ingest's
/// direct publishes (`direct`), interleaved
/// only between whole packets. Counts the broker's CONNACK and SUBACKs into
/// `acks` for the uplink, and hands each SUBACK to the direct downlink
/// first, so the subscription is in place before the uplink lets a publish
/// through.
pub(super) async fn downlink<R, W>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
}
