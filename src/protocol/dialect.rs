//! The two dialects (`firmware`, `v1`) and the topic channels.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The two protocol dialects found in the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// firmware-protocol.md: `ESP32CAM/…`, 1-based chunk ids, byte arrays, `5:30PM` times.
    #[default]
    Firmware,
    /// architecture-v1.md: `device/…`, 0-based chunk ids, base64, ISO-8601 UTC times.
    V1,
}

impl Dialect {
    pub fn prefix(self) -> &'static str {
        match self {
            Dialect::Firmware => "ESP32CAM",
            Dialect::V1 => "device",
        }
    }

    /// The chunk-id base this dialect uses unless a device reveals otherwise.
    pub fn chunk_base(self) -> u32 {
        match self {
            Dialect::Firmware => 1,
            Dialect::V1 => 0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Firmware => "firmware",
            Dialect::V1 => "v1",
        }
    }
}

impl std::str::FromStr for Dialect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "firmware" => Ok(Dialect::Firmware),
            "v1" => Ok(Dialect::V1),
            other => Err(format!(
                "unknown dialect {other:?} (expected firmware or v1)"
            )),
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last topic level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Status,
    Data,
    Cmd,
    Ack,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Status => "status",
            Channel::Data => "data",
            Channel::Cmd => "cmd",
            Channel::Ack => "ack",
        }
    }
}
