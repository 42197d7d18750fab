//! The gateway-to-device half of a session: the broker's packets and the
//! uplink's PUBACKs ([`Replies`]), written to the device between whole
//! packets.

use bytes::BytesMut;
use rumqttd::embedded::EmbeddedLink;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Packet, Protocol};
use std::sync::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Bytes of replies (the front's PUBACKs) waiting for a
/// device's downlink before its uplink waits: a device that stops reading
/// stops being read.
const REPLIES_MAX: usize = 16 * 1024;

/// The uplink's replies to a device (the PUBACKs of the publishes it hands
/// to the ingest), encoded, on their way to the downlink. Not a channel: a channel allocates its first block of slots
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

/// The gateway-to-device half of a session: the broker's packets and the
/// front's PUBACKs, interleaved only between whole packets. Counts the
/// broker's SUBACKs into `acks` for the uplink. Ends when the broker ends the
/// session (after the device's DISCONNECT, or for a newer session).
pub(super) async fn downlink<W>(
    link: &EmbeddedLink,
    dev_w: &mut W,
    replies: &Replies,
    acks: watch::Sender<u64>,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut from_broker = BytesMut::new();
    let mut ours = Vec::new();
    let mut acked = 0u64;
    loop {
        // Per pass: an idle session keeps no room for packets (392 B each).
        let mut packets = Vec::new();
        tokio::select! {
            r = link.recv(&mut packets) => {
                if r.is_err() {
                    return Ok(());
                }
            }
            () = replies.wait() => {}
        }
        if !packets.is_empty() {
            let before = acked;
            for p in packets.drain(..) {
                acked += u64::from(matches!(p, Packet::SubAck(..)));
                V4.write(p, &mut from_broker).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                })?;
            }
            if acked != before {
                acks.send_replace(acked);
            }
            dev_w.write_all(&from_broker).await?;
            from_broker.clear();
            // A big delivery's buffer is not kept by an idle session.
            if from_broker.capacity() > 4096 {
                from_broker = BytesMut::new();
            }
        }
        replies.take_into(&mut ours);
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
