//! HELLO: a device is awake and reports its backlog.

use super::error::{invalid, ProtocolError};
use serde::Deserialize;

/// HELLO: `{"device_id","status":"alive","pendingImg":N}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Hello {
    pub device_id: Option<String>,
    pub status: Option<String>,
    #[serde(rename = "pendingImg")]
    pub pending_img: Option<i64>,
    /// Optional extras some firmware sends.
    #[serde(default)]
    pub battery: Option<f64>,
    #[serde(default)]
    pub battery_voltage: Option<f64>,
    #[serde(default)]
    pub firmware_version: Option<String>,
    #[serde(default)]
    pub hardware_version: Option<String>,
    #[serde(default)]
    pub error: Option<i64>,
}

impl Hello {
    pub fn parse(payload: &[u8]) -> Result<Hello, ProtocolError> {
        let h: Hello =
            serde_json::from_slice(payload).map_err(|e| ProtocolError::Json(e.to_string()))?;
        match h.pending_img {
            None => Err(ProtocolError::MissingField("pendingImg")),
            Some(n) if n < 0 => Err(invalid("pendingImg", format!("negative count {n}"))),
            Some(_) => Ok(h),
        }
    }

    pub fn pending(&self) -> u32 {
        self.pending_img.unwrap_or(0).clamp(0, u32::MAX as i64) as u32
    }
}
