//! The records the tables hold, each stored as a JSON value.

use crate::protocol::{Dialect, Metadata};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The device registry entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceRecord {
    pub mac: String,
    /// The id as the device spells it in its topics (replies use it).
    pub wire_id: String,
    pub dialect: Dialect,
    /// Set by an admin: the dialect is not re-learned from topics.
    #[serde(default)]
    pub dialect_pinned: bool,
    /// Chunk-id base, once revealed by a chunk (0 or 1).
    #[serde(default)]
    pub chunk_base: Option<u32>,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub firmware_version: Option<String>,
    #[serde(default)]
    pub hardware_version: Option<String>,
    pub registered_at: DateTime<Utc>,
    #[serde(default)]
    pub last_seen: Option<DateTime<Utc>>,
    #[serde(default)]
    pub next_wake: Option<DateTime<Utc>>,
    /// Battery charge in percent, as the device reports it (`battery`).
    #[serde(default)]
    pub battery: Option<f64>,
    /// Battery voltage, only when the device sent one (`battery_voltage`).
    #[serde(default)]
    pub battery_voltage: Option<f64>,
    /// `active` or `revoked`.
    pub status: String,
    #[serde(default)]
    pub cert_serial: Option<String>,
    pub registration_index: u64,
    pub stagger_slot: u32,
    /// Per-device capture times (`HH:MM`), overriding the site's.
    #[serde(default)]
    pub schedule: Option<Vec<String>>,
    #[serde(default)]
    pub last_current_capture_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub pending_reported: u32,
    #[serde(default)]
    pub last_error: Option<i64>,
}

impl DeviceRecord {
    /// A new record, as the ingest makes one on first contact: active, in
    /// `site`, with its registration index and stagger slot.
    pub fn new(
        mac: &str,
        dialect: Dialect,
        site: &str,
        index: u64,
        slot: u32,
        now: DateTime<Utc>,
    ) -> DeviceRecord {
        DeviceRecord {
            mac: mac.to_string(),
            wire_id: mac.to_string(),
            dialect,
            dialect_pinned: false,
            chunk_base: None,
            site: Some(site.to_string()),
            location: None,
            firmware_version: None,
            hardware_version: None,
            registered_at: now,
            last_seen: None,
            next_wake: None,
            battery: None,
            battery_voltage: None,
            status: "active".into(),
            cert_serial: None,
            registration_index: index,
            stagger_slot: slot,
            schedule: None,
            last_current_capture_at: None,
            pending_reported: 0,
            last_error: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CaptureState {
    Announced,
    Receiving,
    MissingRequested,
    Complete,
    Failed,
}

impl CaptureState {
    /// Complete or failed: nothing more is expected for this capture.
    pub fn is_finished(self) -> bool {
        matches!(self, CaptureState::Complete | CaptureState::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CaptureState::Announced => "announced",
            CaptureState::Receiving => "receiving",
            CaptureState::MissingRequested => "missing_requested",
            CaptureState::Complete => "complete",
            CaptureState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Current,
    Recovery,
}

/// One image a device announced (or started sending), in any state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptureRecord {
    pub id: u64,
    pub mac: String,
    pub image_name: String,
    /// 1 for the first capture of this name; a different image under the
    /// same name becomes version 2, …
    pub version: u32,
    pub state: CaptureState,
    pub origin: Origin,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    /// The METADATA payload exactly as received, extra fields included.
    #[serde(default)]
    pub raw_metadata: Option<String>,
    /// Device-reported capture time.
    #[serde(default)]
    pub device_time: Option<DateTime<Utc>>,
    /// Gateway time of the first message about this capture.
    pub first_seen_at: DateTime<Utc>,
    #[serde(default)]
    pub metadata_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// `missing_chunks` rounds so far (over every attempt: a resumed
    /// capture keeps its count).
    pub retries: u32,
    /// Times this capture ended `failed` (it may complete later).
    #[serde(default)]
    pub failures: u32,
    /// Wakes on which its METADATA was refused (see
    /// `ingest.release_after_refusals`).
    #[serde(default)]
    pub refusals: u32,
    #[serde(default)]
    pub chunk_base: Option<u32>,
    #[serde(default)]
    pub chunks_received: u32,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub assembled_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub acked_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub failed_reason: Option<String>,
}

impl CaptureRecord {
    pub fn total_chunks(&self) -> Option<u32> {
        self.metadata.as_ref().map(|m| m.total_chunks_count)
    }
    pub fn image_size(&self) -> Option<u32> {
        self.metadata.as_ref().map(|m| m.image_size)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionRecord {
    pub mac: String,
    pub woke_at: DateTime<Utc>,
    pub pending_reported: u32,
    #[serde(default)]
    pub next_wake_assigned: Option<DateTime<Utc>>,
    #[serde(default)]
    pub capture_requested: bool,
    #[serde(default)]
    pub images_completed: u32,
    #[serde(default)]
    pub images_failed: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TelemetryRecord {
    pub mac: String,
    pub captured_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub capture_id: u64,
    pub temperature: Option<f64>,
    pub humidity: Option<f64>,
    pub pressure: Option<f64>,
    pub gas_resistance: Option<f64>,
    /// Battery charge in percent (METADATA `battery`).
    pub battery: Option<f64>,
    pub error: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandRecord {
    pub mac: String,
    pub at: DateTime<Utc>,
    pub kind: String,
    pub topic: String,
    pub payload: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AlertRecord {
    pub id: u64,
    pub mac: String,
    /// `image_failed`, `device_error`, `missed_wake`, `low_battery`, `offline`.
    pub kind: String,
    /// `warning`, `error`, `critical`.
    pub severity: String,
    pub message: String,
    pub triggered_at: DateTime<Utc>,
    #[serde(default)]
    pub resolved_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub capture_id: Option<u64>,
}

/// One item for the upstream forwarder, written in the same transaction as
/// the data it points at.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutboxItem {
    pub seq: u64,
    pub kind: String,
    pub mac: String,
    pub key: String,
    pub queued_at: DateTime<Utc>,
}

/// What the forwarder last did, kept across restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SyncState {
    #[serde(default)]
    pub last_success_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_error_at: Option<DateTime<Utc>>,
    /// Failed attempts since the last success.
    #[serde(default)]
    pub consecutive_failures: u64,
    #[serde(default)]
    pub delivered_total: u64,
    /// `upstream.enabled` as the gateway last started with (None: not
    /// started since this was recorded).
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// An image whose bytes are confirmed in object storage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UploadRecord {
    pub capture_id: u64,
    pub object_key: String,
    pub size: u64,
    pub uploaded_at: DateTime<Utc>,
    /// When the local bytes were deleted (retention or disk pressure).
    #[serde(default)]
    pub purged_at: Option<DateTime<Utc>>,
}
