//! Topics: `ESP32CAM/{id}/{channel}` and `device/{id}/{channel}`.

use super::dialect::{Channel, Dialect};
use super::error::{invalid, ProtocolError};

/// A parsed device topic, borrowing the device id as it appeared on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    pub dialect: Dialect,
    pub wire_id: &'a str,
    pub channel: Channel,
}

pub fn parse_topic(topic: &str) -> Result<Topic<'_>, ProtocolError> {
    let unknown = || ProtocolError::UnknownTopic(truncate(topic, 120));
    let mut parts = topic.split('/');
    let (Some(prefix), Some(id), Some(last), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unknown());
    };
    let dialect = match prefix {
        "ESP32CAM" => Dialect::Firmware,
        "device" => Dialect::V1,
        _ => return Err(unknown()),
    };
    let channel = match last {
        "status" => Channel::Status,
        "data" => Channel::Data,
        "cmd" => Channel::Cmd,
        "ack" => Channel::Ack,
        _ => return Err(unknown()),
    };
    if id.is_empty() {
        return Err(unknown());
    }
    Ok(Topic {
        dialect,
        wire_id: id,
        channel,
    })
}

pub fn topic(dialect: Dialect, wire_id: &str, channel: Channel) -> String {
    format!("{}/{}/{}", dialect.prefix(), wire_id, channel.as_str())
}

/// The device id in a topic or client id: [`crate::ident::normalize`]
/// (a MAC, normalised), with its error as a [`ProtocolError`].
pub fn normalize_device_id(s: &str) -> Result<String, ProtocolError> {
    crate::ident::normalize(s).map_err(|e| invalid("device_id", e.to_string()))
}

pub(crate) fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}
