//! The gateway's publishes to a connected device, written straight into its
//! front session instead of through the broker.
//!
//! Through the broker, each command or ACK_OK crosses the router, the
//! device's loopback connection and a socket read in the front: a few
//! messages per wake, but a thousand devices waking at once make it a share
//! of the machine. So when the front holds a *clean* session for the device
//! and the broker has granted its subscription to the topic at QoS 0 or 1,
//! the ingest hands the message to the session's downlink ([`Outlet`]),
//! which writes it as a PUBLISH at the granted QoS — what rumqttd would have
//! sent. QoS 1 packet ids count from [`FIRST_PKID`] up; rumqttd numbers its
//! own from 1 to 100, so the device's PUBACKs for ours are told apart and
//! kept from the broker. Everything else (no session, a persistent session,
//! which rumqttd must be able to resend to; no subscription yet; QoS 2; a
//! downlink queue full because the device is not reading) goes through the
//! broker as before.

use crate::metrics::Metrics;
use rumqttd::protocol::{QoS, SubscribeReasonCode};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tracing::warn;

/// The first packet id of the front's own QoS 1 publishes (rumqttd uses
/// 1..=100 on a connection).
pub const FIRST_PKID: u16 = 0x8000;

/// Messages waiting for one device's downlink. A wake needs a few; a full
/// queue means the device stopped reading, and the broker path takes over.
const QUEUE: usize = 32;

/// One publish for a device's downlink.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
}

/// A session's direct downlink: the subscriptions the broker granted and
/// the queue. A plain deque under the same small lock, not a channel: a
/// channel allocates its slots up front, 2 KiB for each of a thousand
/// sessions that mostly wait.
#[derive(Default)]
pub(super) struct Direct {
    state: Mutex<State>,
    /// Wakes the downlink when the queue gets a message.
    queued: Notify,
    /// A local session (no broker connection behind it): what it cannot
    /// take is lost, as the broker drops what a clean session's full
    /// queue cannot take.
    local: bool,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Outgoing>,
    /// The downlink has ended: nothing more is taken directly.
    closed: bool,
    /// Topics the broker acknowledged, with the granted QoS. A device may
    /// subscribe only its own exact topics, so these are not filters.
    granted: Vec<(String, QoS)>,
    /// SUBSCRIBEs forwarded to the broker and not yet acknowledged, by
    /// packet id.
    pending: Vec<(u16, Vec<String>)>,
}

impl Direct {
    pub(super) fn new(local: bool) -> Self {
        Direct {
            local,
            ..Direct::default()
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A SUBSCRIBE on its way to the broker: its topics count once the
    /// broker's SUBACK grants them ([`Direct::granted`]).
    pub(super) fn subscribing(&self, pkid: u16, topics: Vec<String>) {
        let mut s = self.state();
        s.pending.retain(|(p, _)| *p != pkid);
        s.pending.push((pkid, topics));
    }

    /// The broker's SUBACK for `pkid`: each topic of that SUBSCRIBE at the
    /// QoS granted (a refusal or QoS 2 leaves the topic to the broker).
    pub(super) fn granted(&self, pkid: u16, codes: &[SubscribeReasonCode]) {
        let mut s = self.state();
        let Some(i) = s.pending.iter().position(|(p, _)| *p == pkid) else {
            return;
        };
        let (_, topics) = s.pending.swap_remove(i);
        for (topic, code) in topics.into_iter().zip(codes) {
            s.granted.retain(|(t, _)| *t != topic);
            let qos = match code {
                SubscribeReasonCode::QoS0 | SubscribeReasonCode::Success(QoS::AtMostOnce) => {
                    QoS::AtMostOnce
                }
                SubscribeReasonCode::QoS1 | SubscribeReasonCode::Success(QoS::AtLeastOnce) => {
                    QoS::AtLeastOnce
                }
                _ => continue,
            };
            s.granted.push((topic, qos));
        }
    }

    /// A local session's SUBSCRIBE, granted by the front at once.
    pub(super) fn grant(&self, filters: Vec<(String, QoS)>) {
        let mut s = self.state();
        for (topic, qos) in filters {
            s.granted.retain(|(t, _)| *t != topic);
            s.granted.push((topic, qos));
        }
    }

    /// An UNSUBSCRIBE: the topics stop at once (before the broker has it,
    /// so nothing is written directly after the device asked to stop).
    pub(super) fn unsubscribe(&self, topics: &[String]) {
        self.state().granted.retain(|(t, _)| !topics.contains(t));
    }

    #[cfg(test)]
    fn qos_for(&self, topic: &str) -> Option<QoS> {
        self.state().qos_for(topic)
    }

    /// Queues a publish at its topic's granted QoS, or hands it back (and
    /// says whether that was because the queue is full).
    fn offer(&self, topic: String, payload: Vec<u8>) -> Result<(), (String, Vec<u8>, bool)> {
        {
            let mut s = self.state();
            let qos = match s.qos_for(&topic) {
                Some(q) if !s.closed && s.queue.len() < QUEUE => q,
                q => {
                    let full = q.is_some() && !s.closed;
                    return Err((topic, payload, full));
                }
            };
            s.queue.push_back(Outgoing {
                topic,
                payload,
                qos,
            });
        }
        self.queued.notify_one();
        Ok(())
    }

    /// Waits until something is queued (or was, since the last take).
    pub(super) async fn wait(&self) {
        self.queued.notified().await
    }

    /// Everything queued now, oldest first.
    pub(super) fn take(&self) -> VecDeque<Outgoing> {
        std::mem::take(&mut self.state().queue)
    }

    /// The downlink is gone: later messages go through the broker.
    pub(super) fn close(&self) {
        self.state().closed = true;
    }
}

impl State {
    fn qos_for(&self, topic: &str) -> Option<QoS> {
        self.granted
            .iter()
            .find(|(t, _)| t == topic)
            .map(|(_, q)| *q)
    }
}

/// The front's sessions, by device: the map [`super::Front`] keeps and the
/// ingest's [`Outlet`] reads.
pub(super) type Sessions = Arc<Mutex<HashMap<String, super::Session>>>;

/// The ingest's way into the front's sessions.
#[derive(Clone)]
pub struct Outlet {
    pub(super) sessions: Sessions,
    pub(super) metrics: Arc<Metrics>,
}

impl Outlet {
    /// Queues `payload` for `device`'s open session when it can take it
    /// directly; otherwise hands topic and payload back, for the broker.
    pub fn deliver(
        &self,
        device: &str,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<(), (String, Vec<u8>)> {
        let direct = {
            let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            s.get(device).and_then(|s| s.direct.clone())
        };
        let Some(direct) = direct else {
            return Err((topic, payload));
        };
        match direct.offer(topic, payload) {
            Ok(()) => {
                Metrics::inc(&self.metrics.commands_direct);
                Ok(())
            }
            Err((topic, payload, full)) => {
                if full && direct.local {
                    Metrics::inc(&self.metrics.commands_dropped);
                    warn!(device = %device, %topic, queued = QUEUE, "message to the device dropped: its session is not reading");
                }
                Err((topic, payload))
            }
        }
    }
}

/// Packet ids of the front's QoS 1 publishes on one connection.
pub(super) struct PacketIds(u16);

impl PacketIds {
    pub(super) fn new() -> Self {
        PacketIds(FIRST_PKID)
    }

    pub(super) fn next(&mut self) -> u16 {
        let id = self.0;
        self.0 = if id == u16::MAX { FIRST_PKID } else { id + 1 };
        id
    }
}

/// Whether a device's PUBACK answers one of the front's own publishes.
pub(super) fn is_ours(pkid: u16) -> bool {
    pkid >= FIRST_PKID
}

/// Appends an MQTT 3.1.1 PUBLISH (not retained, not a duplicate) to `out`.
/// `pkid` is written for QoS 1 and 2 only. (rumqttd's `Publish` keeps QoS and
/// packet id crate-private, so it cannot encode one for us.)
pub(super) fn encode_publish(topic: &str, payload: &[u8], qos: QoS, pkid: u16, out: &mut Vec<u8>) {
    let qos = qos as u8;
    let id_len = if qos > 0 { 2 } else { 0 };
    let mut len = 2 + topic.len() + id_len + payload.len();
    out.push(0x30 | (qos << 1));
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use rumqttd::protocol::Packet;

    #[test]
    fn encoded_publishes_parse_back_as_sent() {
        for (qos, pkid, size) in [
            (QoS::AtMostOnce, 0, 0usize),
            (QoS::AtLeastOnce, FIRST_PKID, 100),
            (QoS::AtLeastOnce, u16::MAX, 127),
            (QoS::AtLeastOnce, 40_000, 128),
            (QoS::AtMostOnce, 0, 16_500),
            (QoS::AtLeastOnce, 33_000, 2_100_000),
        ] {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let topic = "ESP32CAM/AABBCCDDEEFF/ack";
            let mut out = Vec::new();
            encode_publish(topic, &payload, qos, pkid, &mut out);
            let header = rumqttd::protocol::v4::check(out.iter(), 4 << 20).unwrap();
            assert_eq!(header.frame_length(), out.len(), "one whole packet");
            let Ok(Packet::Publish(p, _)) =
                crate::front::frame::parse(BytesMut::from(&out[..]), 4 << 20)
            else {
                panic!("not a PUBLISH");
            };
            assert_eq!(&p.topic[..], topic.as_bytes());
            assert_eq!(&p.payload[..], &payload[..]);
            assert_eq!(p.qos(), qos);
            assert!(!p.retain);
            if qos != QoS::AtMostOnce {
                assert_eq!(p.pkid(), pkid);
            }
        }
    }

    #[test]
    fn packet_ids_stay_in_the_fronts_range() {
        let mut ids = PacketIds::new();
        let first = ids.next();
        assert_eq!(first, FIRST_PKID);
        for _ in 0..70_000 {
            let id = ids.next();
            assert!(is_ours(id), "{id}");
        }
        assert!(!is_ours(100), "rumqttd's ids are not ours");
    }

    /// The ingest's outlet takes a message only for an open session with
    /// the topic granted and room in its queue; anything else comes back
    /// whole, for the broker. Also for a local session, where a full queue
    /// loses the message (as the broker's clean session would) and is
    /// counted.
    #[test]
    fn the_outlet_hands_back_what_it_cannot_queue() {
        for local in [false, true] {
            outlet_hands_back(local);
        }
    }

    fn outlet_hands_back(local: bool) {
        let metrics = Arc::new(Metrics::default());
        let outlet = Outlet {
            sessions: Arc::new(Mutex::new(HashMap::new())),
            metrics: metrics.clone(),
        };
        let topic = || "ESP32CAM/AABBCCDDEEFF/cmd".to_string();
        let back = outlet.deliver("AABBCCDDEEFF", topic(), b"x".to_vec());
        assert_eq!(back, Err((topic(), b"x".to_vec())), "no session");

        let direct = Arc::new(Direct::new(local));
        let (kill, _) = tokio::sync::watch::channel(false);
        outlet.sessions.lock().unwrap().insert(
            "AABBCCDDEEFF".into(),
            super::super::Session {
                id: 1,
                serial: None,
                kill,
                direct: Some(direct.clone()),
            },
        );
        assert!(
            outlet.deliver("AABBCCDDEEFF", topic(), vec![1]).is_err(),
            "not subscribed"
        );
        direct.subscribing(1, vec![topic()]);
        direct.granted(1, &[SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
        for i in 0..QUEUE {
            let p = (i as u32).to_be_bytes().to_vec();
            assert_eq!(outlet.deliver("AABBCCDDEEFF", topic(), p), Ok(()));
        }
        let full = outlet.deliver("AABBCCDDEEFF", topic(), b"late".to_vec());
        assert_eq!(full, Err((topic(), b"late".to_vec())), "queue full");
        let dropped = metrics
            .commands_dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(dropped, u64::from(local), "counted as dropped when local");
        let taken = direct.take();
        assert_eq!(taken.len(), QUEUE);
        assert_eq!(taken[0].payload, 0u32.to_be_bytes(), "oldest first");
        assert!(taken.iter().all(|m| m.qos == QoS::AtLeastOnce));
        assert_eq!(
            metrics
                .commands_direct
                .load(std::sync::atomic::Ordering::Relaxed),
            QUEUE as u64
        );
        direct.close();
        assert!(
            outlet.deliver("AABBCCDDEEFF", topic(), vec![2]).is_err(),
            "downlink gone"
        );
    }

    #[test]
    fn only_granted_qos_0_and_1_topics_go_direct() {
        let d = Direct::default();
        let t = |s: &str| s.to_string();
        d.subscribing(1, vec![t("a/cmd"), t("a/ack")]);
        assert_eq!(d.qos_for("a/cmd"), None, "not before the SUBACK");
        d.granted(
            1,
            &[
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Success(QoS::ExactlyOnce),
            ],
        );
        assert_eq!(d.qos_for("a/cmd"), Some(QoS::AtLeastOnce));
        assert_eq!(d.qos_for("a/ack"), None, "QoS 2 stays with the broker");
        d.granted(9, &[SubscribeReasonCode::QoS0]);
        d.subscribing(2, vec![t("a/ack")]);
        d.granted(2, &[SubscribeReasonCode::QoS0]);
        assert_eq!(d.qos_for("a/ack"), Some(QoS::AtMostOnce));
        d.subscribing(3, vec![t("a/cmd")]);
        d.granted(3, &[SubscribeReasonCode::Failure]);
        assert_eq!(d.qos_for("a/cmd"), None, "a refused resubscription");
        d.unsubscribe(&[t("a/ack")]);
        assert_eq!(d.qos_for("a/ack"), None);
    }
}
