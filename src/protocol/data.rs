//! The data topic's messages, METADATA and CHUNK, parsed and validated.

use super::envelope::{decode_payload, split_payload, Split};
use super::error::{invalid, ProtocolError, MAX_CHUNK_SIZE, MAX_IMAGE_NAME};
use super::topic::truncate;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// Every field that may appear on the data topic; METADATA and CHUNK share it.
/// Strings are borrowed from the message when they have no escapes, and the
/// payload is kept raw for [`decode_payload`]: a chunk costs no allocation
/// but its decoded bytes.
#[derive(Debug, Deserialize)]
pub(crate) struct RawData<'a> {
    #[serde(borrow)]
    device_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    image_name: Option<Cow<'a, str>>,
    capture_timestamp: Option<String>,
    image_size: Option<i64>,
    max_chunk_size: Option<i64>,
    total_chunks_count: Option<i64>,
    location: Option<String>,
    error: Option<i64>,
    temperature: Option<f64>,
    humidity: Option<f64>,
    pressure: Option<f64>,
    gas_resistance: Option<f64>,
    chunk_id: Option<i64>,
    #[serde(borrow)]
    payload: Option<&'a serde_json::value::RawValue>,
    battery: Option<f64>,
    sha256: Option<String>,
}

/// METADATA: announces an image and carries the sensor readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub device_id: String,
    pub image_name: String,
    /// As sent (kept verbatim); see [`Metadata::captured_at`].
    pub capture_timestamp: String,
    pub image_size: u32,
    pub max_chunk_size: u32,
    /// Chunks in the image: `ceil(image_size / max_chunk_size)`.
    pub total_chunks_count: u32,
    /// The device's `total_chunks_count` when it disagreed with the above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced_chunks: Option<u32>,
    pub error: i64,
    pub location: Option<String>,
    pub temperature: Option<f64>,
    pub humidity: Option<f64>,
    pub pressure: Option<f64>,
    pub gas_resistance: Option<f64>,
    pub battery: Option<f64>,
    /// Optional hex SHA-256 of the whole image, verified after assembly.
    pub sha256: Option<String>,
}

impl Metadata {
    /// The device-reported capture time, when it parses as ISO 8601.
    pub fn captured_at(&self) -> Option<DateTime<Utc>> {
        parse_timestamp(&self.capture_timestamp)
    }
}

pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    // Firmware without a zone designator: treat as UTC.
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S")
        .ok()
        .map(|n| n.and_utc())
}

/// CHUNK: one slice of an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    // The firmware's `device_id` field is checked (a string, when present)
    // and not kept: the topic names the device, and an owned copy was an
    // allocation per chunk on the front's threads for nothing.
    pub image_name: String,
    /// As sent: 1-based (firmware) or 0-based (v1).
    pub chunk_id: u32,
    pub max_chunk_size: Option<u32>,
    pub payload: Vec<u8>,
}

impl Chunk {
    /// A chunk from its fields, validated (the same checks whichever way
    /// the fields were read).
    fn checked(
        image_name: &str,
        chunk_id: i64,
        max_chunk_size: Option<i64>,
        payload: Vec<u8>,
    ) -> Result<DataMessage, ProtocolError> {
        check_image_name(image_name)?;
        let chunk_id = to_u32(chunk_id, "chunk_id")?;
        let max_chunk_size = match max_chunk_size {
            Some(v) => Some(to_u32(v, "max_chunk_size")?),
            None => None,
        };
        if payload.len() > MAX_CHUNK_SIZE as usize {
            return Err(invalid(
                "payload",
                format!("{} bytes exceeds {MAX_CHUNK_SIZE}", payload.len()),
            ));
        }
        Ok(DataMessage::Chunk(Chunk {
            image_name: image_name.to_string(),
            chunk_id,
            max_chunk_size,
            payload,
        }))
    }
}

/// A message on the `…/data` topic.
#[derive(Debug, Clone, PartialEq)]
pub enum DataMessage {
    Metadata(Box<Metadata>),
    Chunk(Chunk),
}

pub(crate) fn req<T>(v: Option<T>, field: &'static str) -> Result<T, ProtocolError> {
    v.ok_or(ProtocolError::MissingField(field))
}

pub(crate) fn to_u32(v: i64, field: &'static str) -> Result<u32, ProtocolError> {
    u32::try_from(v).map_err(|_| invalid(field, format!("{v} is out of range")))
}

pub(crate) fn check_image_name(name: &str) -> Result<(), ProtocolError> {
    if name.is_empty() {
        return Err(invalid("image_name", "empty"));
    }
    if name.len() > MAX_IMAGE_NAME {
        return Err(invalid(
            "image_name",
            format!("longer than {MAX_IMAGE_NAME} bytes"),
        ));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(invalid(
            "image_name",
            format!(
                "{:?} contains a path separator or control character",
                truncate(name, 40)
            ),
        ));
    }
    Ok(())
}

/// For a data payload that did not parse: `Some(..)` when it is recognisably
/// a METADATA (a JSON object with METADATA fields and no chunk fields), with
/// its image name when that is usable; `None` for anything else (a chunk, or
/// bytes no device would send as METADATA), which is not answered.
pub fn metadata_image_name(payload: &[u8]) -> Option<Option<String>> {
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(payload).ok()?;
    if v.contains_key("chunk_id") || v.contains_key("payload") {
        return None;
    }
    let metadata_like = [
        "image_size",
        "total_chunks_count",
        "max_chunk_size",
        "capture_timestamp",
    ]
    .iter()
    .any(|k| v.contains_key(*k));
    if !metadata_like {
        return None;
    }
    Some(
        v.get("image_name")
            .and_then(|n| n.as_str())
            .filter(|n| check_image_name(n).is_ok())
            .map(str::to_string),
    )
}

impl DataMessage {
    /// Parses and validates a data-topic payload. `max_image_size` bounds
    /// `image_size`.
    pub fn parse(payload: &[u8], max_image_size: u32) -> Result<DataMessage, ProtocolError> {
        Self::parse_with(payload, max_image_size, true)
    }

    /// `envelope`: false only in tests, to compare with serde alone.
    pub(crate) fn parse_with(
        payload: &[u8],
        max_image_size: u32,
        envelope: bool,
    ) -> Result<DataMessage, ProtocolError> {
        let (rest, decoded) = match split_payload(payload) {
            Some(Split {
                bytes,
                envelope: Some(e),
                ..
            }) if envelope => {
                return Chunk::checked(e.image_name, e.chunk_id, e.max_chunk_size, bytes);
            }
            Some(sp) => (Some(sp.rest()), Some(sp.bytes)),
            None => (None, None),
        };
        let raw: RawData = serde_json::from_slice(rest.as_deref().unwrap_or(payload))
            .map_err(|e| ProtocolError::Json(e.to_string()))?;
        if raw.chunk_id.is_some() || raw.payload.is_some() {
            // Checked in this order (as ever) before the payload is decoded.
            let image_name = req(raw.image_name, "image_name")?;
            check_image_name(&image_name)?;
            let chunk_id = req(raw.chunk_id, "chunk_id")?;
            to_u32(chunk_id, "chunk_id")?;
            let raw_payload = req(raw.payload, "payload")?;
            let payload = match decoded {
                Some(bytes) => bytes,
                None => decode_payload(raw_payload)?,
            };
            return Chunk::checked(&image_name, chunk_id, raw.max_chunk_size, payload);
        }
        if raw.total_chunks_count.is_none() && raw.image_size.is_none() {
            return Err(ProtocolError::UnknownDataMessage);
        }
        let device_id = req(raw.device_id, "device_id")?.into_owned();
        let image_name = req(raw.image_name, "image_name")?.into_owned();
        check_image_name(&image_name)?;
        let capture_timestamp = req(raw.capture_timestamp, "capture_timestamp")?;
        let image_size = to_u32(req(raw.image_size, "image_size")?, "image_size")?;
        let max_chunk_size = to_u32(req(raw.max_chunk_size, "max_chunk_size")?, "max_chunk_size")?;
        let total = to_u32(
            req(raw.total_chunks_count, "total_chunks_count")?,
            "total_chunks_count",
        )?;
        let error = req(raw.error, "error")?;
        if image_size > max_image_size {
            return Err(invalid(
                "image_size",
                format!("{image_size} bytes exceeds the limit of {max_image_size}"),
            ));
        }
        if max_chunk_size == 0 || max_chunk_size > MAX_CHUNK_SIZE {
            return Err(invalid(
                "max_chunk_size",
                format!("{max_chunk_size} is outside 1..={MAX_CHUNK_SIZE}"),
            ));
        }
        // The chunk count is the one under which both the announced size and
        // the announced chunk size hold; a `total_chunks_count` that says
        // otherwise is kept as `announced_chunks` and the engine reports it.
        // `image_size` 0 (a camera failure) means no chunks.
        let expected = image_size.div_ceil(max_chunk_size);
        let announced_chunks = (total != expected).then_some(total);
        Ok(DataMessage::Metadata(Box::new(Metadata {
            device_id,
            image_name,
            capture_timestamp,
            image_size,
            max_chunk_size,
            total_chunks_count: expected,
            announced_chunks,
            error,
            location: raw.location,
            temperature: raw.temperature,
            humidity: raw.humidity,
            pressure: raw.pressure,
            gas_resistance: raw.gas_resistance,
            battery: raw.battery,
            sha256: raw.sha256,
        })))
    }
}
