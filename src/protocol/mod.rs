//! The firmware wire protocol (GATEWAY.md §1): topics, the two dialects,
//! inbound HELLO / METADATA / CHUNK parsing and outbound message rendering,
//! one file per wire concept.
//!
//! Pure: no IO, no clock, no state. Field names are exact and case-sensitive.

mod data;
mod dialect;
mod envelope;
mod error;
mod hello;
mod outbound;
mod scan;
#[cfg(test)]
mod tests;
mod topic;

pub use data::{metadata_image_name, parse_timestamp, Chunk, DataMessage, Metadata};
pub use dialect::{Channel, Dialect};
pub use error::{ProtocolError, MAX_CHUNK_SIZE, MAX_IMAGE_NAME};
pub use hello::Hello;
pub use outbound::{format_wake, Outbound};
pub use topic::{normalize_device_id, parse_topic, topic, Topic};
