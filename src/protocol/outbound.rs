//! What the gateway sends a device, rendered for its dialect.

use super::dialect::{Channel, Dialect};
use super::topic::topic;
use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use serde::Serialize;

/// A message the gateway sends to a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    CaptureImage,
    SendImage {
        image_name: String,
    },
    NextWake {
        at: DateTime<Utc>,
    },
    MissingChunks {
        image_name: String,
        chunk_ids: Vec<u32>,
    },
    AckOk {
        image_name: String,
        next_wake: DateTime<Utc>,
    },
}

#[derive(Serialize)]
pub(crate) struct AckOkFirmware<'a> {
    device_id: &'a str,
    image_name: &'a str,
    #[serde(rename = "ACK_OK")]
    ack_ok: NextWakeTime,
}

#[derive(Serialize)]
pub(crate) struct NextWakeTime {
    next_wake_time: String,
}

#[derive(Serialize)]
pub(crate) struct AckOkV1<'a> {
    device_id: &'a str,
    image_name: &'a str,
    #[serde(rename = "ACK_OK")]
    ack_ok: bool,
    next_wake_time: String,
}

#[derive(Serialize)]
pub(crate) struct CaptureImageMsg<'a> {
    device_id: &'a str,
    capture_image: bool,
}

#[derive(Serialize)]
pub(crate) struct SendImageMsg<'a> {
    device_id: &'a str,
    send_image: &'a str,
}

#[derive(Serialize)]
pub(crate) struct NextWakeMsg<'a> {
    device_id: &'a str,
    next_wake: String,
}

#[derive(Serialize)]
pub(crate) struct MissingChunksMsg<'a> {
    device_id: &'a str,
    image_name: &'a str,
    missing_chunks: &'a [u32],
}

/// Formats a wake time for the dialect: `5:30PM` in the site's zone, or
/// ISO-8601 UTC.
pub fn format_wake(dialect: Dialect, at: DateTime<Utc>, tz: Tz) -> String {
    match dialect {
        Dialect::Firmware => at.with_timezone(&tz).format("%-I:%M%p").to_string(),
        Dialect::V1 => at.to_rfc3339_opts(SecondsFormat::Secs, true),
    }
}

impl Outbound {
    pub fn kind(&self) -> &'static str {
        match self {
            Outbound::CaptureImage => "capture_image",
            Outbound::SendImage { .. } => "send_image",
            Outbound::NextWake { .. } => "next_wake",
            Outbound::MissingChunks { .. } => "missing_chunks",
            Outbound::AckOk { .. } => "ack_ok",
        }
    }

    pub fn channel(&self, dialect: Dialect) -> Channel {
        match (self, dialect) {
            (Outbound::AckOk { .. }, _) => Channel::Ack,
            (Outbound::MissingChunks { .. }, Dialect::V1) => Channel::Ack,
            _ => Channel::Cmd,
        }
    }

    /// Renders `(topic, payload)` for a device that uses `wire_id` in its topics.
    pub fn render(&self, dialect: Dialect, wire_id: &str, tz: Tz) -> (String, Vec<u8>) {
        let device_id = wire_id;
        let json = match self {
            Outbound::CaptureImage => serde_json::to_vec(&CaptureImageMsg {
                device_id,
                capture_image: true,
            }),
            Outbound::SendImage { image_name } => serde_json::to_vec(&SendImageMsg {
                device_id,
                send_image: image_name,
            }),
            Outbound::NextWake { at } => serde_json::to_vec(&NextWakeMsg {
                device_id,
                next_wake: format_wake(dialect, *at, tz),
            }),
            Outbound::MissingChunks {
                image_name,
                chunk_ids,
            } => serde_json::to_vec(&MissingChunksMsg {
                device_id,
                image_name,
                missing_chunks: chunk_ids,
            }),
            Outbound::AckOk {
                image_name,
                next_wake,
            } => match dialect {
                Dialect::Firmware => serde_json::to_vec(&AckOkFirmware {
                    device_id,
                    image_name,
                    ack_ok: NextWakeTime {
                        next_wake_time: format_wake(dialect, *next_wake, tz),
                    },
                }),
                Dialect::V1 => serde_json::to_vec(&AckOkV1 {
                    device_id,
                    image_name,
                    ack_ok: true,
                    next_wake_time: format_wake(dialect, *next_wake, tz),
                }),
            },
        }
        .unwrap_or_default();
        (topic(dialect, wire_id, self.channel(dialect)), json)
    }
}
