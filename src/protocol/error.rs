//! Protocol errors and their metric labels, and the size limits.

/// Largest `max_chunk_size` a device may announce.
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024;
/// Longest accepted image name, in bytes.
pub const MAX_IMAGE_NAME: usize = 200;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    #[error("invalid field `{field}`: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("message is neither METADATA nor CHUNK (no `total_chunks_count` or `chunk_id`)")]
    UnknownDataMessage,
}

impl ProtocolError {
    /// A short stable label, used as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolError::UnknownTopic(_) => "unknown_topic",
            ProtocolError::Json(_) => "malformed_json",
            ProtocolError::MissingField(_) => "missing_field",
            ProtocolError::InvalidField { .. } => "invalid_field",
            ProtocolError::UnknownDataMessage => "unknown_message",
        }
    }
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidField {
        field,
        reason: reason.into(),
    }
}
