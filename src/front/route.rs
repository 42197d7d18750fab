//! Where each device packet after CONNECT goes: checked against the topic
//! rules, a device publish intercepted for the ingest (with the front's own
//! acknowledgement), anything else to the broker.

use super::frame::{parse, PUBLISH};
use super::topics::{check_publish_topic, check_subscribe_filter};
use super::violation::Violation;
use crate::ingest::queue::{Inbound, Payload};
use crate::protocol::DataMessage;
use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{Packet, QoS};

/// Where a device packet (after CONNECT) goes.
pub(super) enum Route {
    /// To the broker, parsed (any packet but a QoS 0/1 non-retained
    /// PUBLISH). Boxed: a packet is large and rare; a chunk's route is not.
    Broker {
        packet: Box<Packet>,
        control: Control,
    },
    /// A device publish for the ingest, and what acknowledges it.
    Ingest { message: Inbound, ack: Ack },
}

/// How the front acknowledges a publish it hands to the ingest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Ack {
    /// QoS 0.
    None,
    /// QoS 1: PUBACK.
    Puback(u16),
}

/// What the front needs of a packet it forwards to the broker.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Control {
    /// A SUBSCRIBE: its filters count against the session's caps, and the
    /// broker's SUBACK is awaited before the next publish goes to the ingest.
    Subscribe { filters: Vec<(String, QoS)> },
    /// Anything else.
    Other,
}

/// Checks one packet after CONNECT against the device's identity and routes
/// it. Publishes are parsed in place (no copy); the broker carries the rare
/// ones the ingest does not take (retained, QoS 2: it keeps the retained
/// message and runs the QoS 2 handshake).
pub(super) fn route(
    frame: BytesMut,
    device: &str,
    max: usize,
    topic: &mut Bytes,
) -> Result<Route, Violation> {
    let kind = frame.first().map_or(0, |b| b >> 4);
    if kind != PUBLISH {
        let (packet, control) = check_packet(frame, device, max)?;
        return Ok(Route::Broker {
            packet: Box::new(packet),
            control,
        });
    }
    let Packet::Publish(p, _) = parse(frame, max)? else {
        return Err(Violation::Malformed("not a PUBLISH".into()));
    };
    check_publish_topic(&p.topic, device)?;
    let ack = match p.qos() {
        QoS::AtMostOnce if !p.retain => Ack::None,
        QoS::AtLeastOnce if !p.retain => Ack::Puback(p.pkid()),
        _ => {
            return Ok(Route::Broker {
                packet: Box::new(Packet::Publish(p, None)),
                control: Control::Other,
            });
        }
    };
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
/// identity (parsed whole, so a malformed one closes the connection before
/// it reaches the broker); returns it and what the front needs of it.
fn check_packet(frame: BytesMut, device: &str, max: usize) -> Result<(Packet, Control), Violation> {
    let packet = parse(frame, max)?;
    let control = match &packet {
        Packet::Publish(p, _) => check_publish_topic(&p.topic, device).map(|()| Control::Other)?,
        Packet::Subscribe(s, _) => {
            for f in &s.filters {
                check_subscribe_filter(&f.path, device)?;
            }
            Control::Subscribe {
                filters: s.filters.iter().map(|f| (f.path.clone(), f.qos)).collect(),
            }
        }
        Packet::Connect(..) => return Err(Violation::SecondConnect),
        Packet::ConnAck(..) | Packet::SubAck(..) | Packet::UnsubAck(..) | Packet::PingResp(_) => {
            return Err(Violation::ServerPacket)
        }
        _ => Control::Other,
    };
    Ok((packet, control))
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
