//! Where each device packet after CONNECT goes: checked against the topic
//! rules, a device publish intercepted for the ingest (with the front's own
//! acknowledgement), anything else to the broker or, in a local session,
//! to the front's own answers.

use super::direct;
use super::frame::{parse, PUBACK, PUBLISH};
use super::topics::{check_publish_topic, check_subscribe_filter};
use super::violation::Violation;
use crate::ingest::queue::{Inbound, Payload};
use crate::protocol::DataMessage;
use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Packet, Protocol, QoS};

/// Where a device packet (after CONNECT) goes.
pub(super) enum Route {
    /// Any packet but a PUBLISH: to the broker as it is (a broker session),
    /// or answered by the front (a local session).
    Control { frame: BytesMut, control: Control },
    /// A device publish for the ingest, and what acknowledges it.
    Ingest { message: Inbound, ack: Ack },
    /// The device's PUBACK for one of the front's own publishes: the broker
    /// never sent that packet id.
    Ours,
}

/// How the front acknowledges a publish it hands to the ingest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Ack {
    /// QoS 0.
    None,
    /// QoS 1: PUBACK.
    Puback(u16),
    /// QoS 2 (local sessions only): PUBREC, then PUBCOMP on the PUBREL.
    Pubrec(u16),
}

/// A device packet other than PUBLISH, as far as a session needs it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Control {
    Subscribe {
        pkid: u16,
        filters: Vec<(String, QoS)>,
    },
    Unsubscribe {
        pkid: u16,
        topics: Vec<String>,
    },
    PingReq,
    /// The second half of a device's QoS 2 publish.
    PubRel(u16),
    Disconnect,
    /// Acknowledgements of the broker's publishes (PUBACK, PUBREC, PUBCOMP).
    Other,
}

/// Checks one packet after CONNECT against the device's identity and routes
/// it. Publishes are parsed in place (no copy); the rare ones a broker
/// session's broker must carry (retained, QoS 2) are re-encoded. In a local
/// session (`local`) every publish goes to the ingest: a retained one as an
/// ordinary publish (the broker's retained store only ever served the
/// ingest, subscribed from the start), QoS 2 acknowledged by the front.
pub(super) fn route(
    frame: BytesMut,
    device: &str,
    max: usize,
    local: bool,
    topic: &mut Bytes,
) -> Result<Route, Violation> {
    let kind = frame.first().map_or(0, |b| b >> 4);
    if kind == PUBACK
        && frame.len() == 4
        && direct::is_ours(u16::from_be_bytes([frame[2], frame[3]]))
    {
        return Ok(Route::Ours);
    }
    if kind != PUBLISH {
        let control = check_packet(&frame, device, max)?;
        return Ok(Route::Control { frame, control });
    }
    let Packet::Publish(p, _) = parse(frame, max)? else {
        return Err(Violation::Malformed("not a PUBLISH".into()));
    };
    check_publish_topic(&p.topic, device)?;
    let ack = match p.qos() {
        QoS::AtMostOnce => Ack::None,
        QoS::AtLeastOnce => Ack::Puback(p.pkid()),
        QoS::ExactlyOnce => Ack::Pubrec(p.pkid()),
    };
    if !local && (p.retain || p.qos() == QoS::ExactlyOnce) {
        let mut frame = BytesMut::new();
        V4.write(Packet::Publish(p, None), &mut frame)
            .map_err(|e| Violation::Malformed(e.to_string()))?;
        return Ok(Route::Control {
            frame,
            control: Control::Other,
        });
    }
    // Chunks are decoded here, on the front's threads, not on the one
    // ingest thread. Anything else (HELLO, METADATA, a bad message) goes
    // as it is, and the ingest parses and reports it.
    // (`u32::MAX`: the image size bound is METADATA's, which is not kept.)
    let chunk = if p.topic.ends_with(b"/data") {
        match DataMessage::parse(&p.payload, u32::MAX) {
            Ok(DataMessage::Chunk(c)) => Some(c),
            _ => None,
        }
    } else {
        None
    };
    let message = match chunk {
        Some(c) => Inbound {
            topic: shared_topic(topic, &p.topic),
            payload: Payload::Chunk(c),
        },
        None => Inbound {
            topic: p.topic,
            payload: Payload::Raw(p.payload),
        },
    };
    Ok(Route::Ingest { message, ack })
}

/// `topic` as a `Bytes` of its own, shared with the session's earlier
/// chunks on the same topic (`cache`). Not a slice of the frame: that would
/// keep the whole read buffer alive until the ingest thread frees the
/// chunk; not a copy per chunk: that is an allocation per chunk, freed on
/// the ingest thread.
fn shared_topic(cache: &mut Bytes, topic: &[u8]) -> Bytes {
    if cache[..] != *topic {
        *cache = Bytes::copy_from_slice(topic);
    }
    cache.clone()
}

/// Checks one packet after CONNECT (not a PUBLISH) against the device's
/// identity; returns what a session needs of it.
fn check_packet(frame: &BytesMut, device: &str, max: usize) -> Result<Control, Violation> {
    match parse(frame.clone(), max)? {
        Packet::Publish(p, _) => check_publish_topic(&p.topic, device).map(|()| Control::Other),
        Packet::Subscribe(s, _) => {
            for f in &s.filters {
                check_subscribe_filter(&f.path, device)?;
            }
            Ok(Control::Subscribe {
                pkid: s.pkid,
                filters: s.filters.into_iter().map(|f| (f.path, f.qos)).collect(),
            })
        }
        Packet::Unsubscribe(u, _) => Ok(Control::Unsubscribe {
            pkid: u.pkid,
            topics: u.filters,
        }),
        Packet::PingReq(_) => Ok(Control::PingReq),
        Packet::PubRel(r, _) => Ok(Control::PubRel(r.pkid)),
        Packet::Disconnect(..) => Ok(Control::Disconnect),
        Packet::Connect(..) => Err(Violation::SecondConnect),
        Packet::ConnAck(..) | Packet::SubAck(..) | Packet::UnsubAck(..) | Packet::PingResp(_) => {
            Err(Violation::ServerPacket)
        }
        _ => Ok(Control::Other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's chunks share one topic allocation; another topic gets
    /// its own.
    #[test]
    fn chunks_share_their_topic() {
        let mut cache = Bytes::new();
        let a = shared_topic(&mut cache, b"ESP32CAM/AABBCCDDEEFF/data");
        let b = shared_topic(&mut cache, b"ESP32CAM/AABBCCDDEEFF/data");
        assert_eq!(a, b);
        assert_eq!(a.as_ptr(), b.as_ptr(), "one allocation");
        let c = shared_topic(&mut cache, b"device/AABBCCDDEEFF/data");
        assert_eq!(&c[..], b"device/AABBCCDDEEFF/data");
        assert_ne!(c.as_ptr(), a.as_ptr());
        assert_eq!(
            &a[..],
            b"ESP32CAM/AABBCCDDEEFF/data",
            "earlier ones unchanged"
        );
    }
}
