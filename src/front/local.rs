//! Local sessions (`mqtt.local_sessions`): a clean session the front serves
//! itself, with no broker connection behind it. The front accepts the
//! CONNECT, answers SUBSCRIBE, UNSUBSCRIBE, PINGREQ and the QoS 2 handshake
//! as the broker would, and hands the will to the ingest when the
//! connection closes without DISCONNECT. A device that had a persistent
//! session in the broker goes through the broker on its next clean CONNECT.

use super::direct;
use super::frame::{short_packet, CONNACK, PINGRESP, PUBCOMP, UNSUBACK};
use super::route::Control;
use super::{Front, LOG_TARGET};
use crate::ingest::queue::{Inbound, Payload};
use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{LastWill, Packet, Protocol, QoS, SubAck, SubscribeReasonCode};
use std::collections::HashSet;
use tracing::info;

/// The CONNACK of a local session: accepted, no session present (it is
/// clean).
pub(super) const CONNACK_ACCEPTED: [u8; 4] = [CONNACK << 4, 0x02, 0x00, 0x00];

impl Front {
    /// Whether a CONNECT of `device` can be a local session; remembers a
    /// persistent one (which the broker keeps after it closes).
    pub(super) fn local_session(&self, device: &str, clean: bool) -> bool {
        let mut p = self
            .inner
            .persistent
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !clean {
            p.insert(device.to_string());
            return false;
        }
        // A clean CONNECT through the broker ends the broker's session.
        !p.remove(device) && self.inner.cfg.local_sessions
    }
}

/// A local session's answer to a device packet (not DISCONNECT), appended
/// to `out`: what the broker would have answered.
pub(super) fn answer(
    control: Control,
    direct: Option<&direct::Direct>,
    unreleased: &mut HashSet<u16>,
    out: &mut Vec<u8>,
) {
    match control {
        Control::Subscribe { pkid, filters } => {
            // At most QoS 1: the ingest's replies are at-least-once, and a
            // server may grant less than asked (MQTT 3.1.1 §3.8.4).
            let filters: Vec<(String, QoS)> = filters
                .into_iter()
                .map(|(t, q)| match q {
                    QoS::ExactlyOnce => (t, QoS::AtLeastOnce),
                    q => (t, q),
                })
                .collect();
            let return_codes = filters
                .iter()
                .map(|(_, q)| SubscribeReasonCode::Success(*q))
                .collect();
            if let Some(d) = direct {
                d.grant(filters);
            }
            let mut b = BytesMut::new();
            if V4
                .write(Packet::SubAck(SubAck { pkid, return_codes }, None), &mut b)
                .is_ok()
            {
                out.extend_from_slice(&b);
            }
        }
        Control::Unsubscribe { pkid, topics } => {
            if let Some(d) = direct {
                d.unsubscribe(&topics);
            }
            out.extend_from_slice(&short_packet(UNSUBACK, pkid));
        }
        Control::PingReq => out.extend_from_slice(&[PINGRESP << 4, 0]),
        Control::PubRel(pkid) => {
            unreleased.remove(&pkid);
            out.extend_from_slice(&short_packet(PUBCOMP, pkid));
        }
        Control::Disconnect | Control::Other => {}
    }
}

/// Publishes a local session's will, as the broker would have on a close
/// without DISCONNECT: to the ingest (its topic was checked with the
/// CONNECT).
pub(super) async fn publish_will(ingest: &flume::Sender<Inbound>, device: &str, w: LastWill) {
    info!(target: LOG_TARGET, device = %device, topic = %String::from_utf8_lossy(&w.topic), "will published: the connection closed without DISCONNECT");
    let _ = ingest
        .send_async(Inbound {
            topic: w.topic,
            payload: Payload::Raw(w.message),
        })
        .await;
}
