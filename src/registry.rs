//! The device registry's changes, pure: an admin's change applied to a
//! record ([`apply_change`]) and the message that carries a change to the ingest
//! thread ([`RegistryOp`]). The writers are in `provision` (CLI and admin
//! socket) and `ingest` (the running gateway's one writer).

use crate::ident::InvalidDeviceId;
use crate::protocol::Dialect;
use crate::store::DeviceRecord;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    InvalidDevice(#[from] InvalidDeviceId),
    #[error("device {0} is not registered")]
    UnknownDevice(String),
}

/// A change to the device registry made by an admin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum RegistryChange {
    /// A certificate was issued: register the device (or update it) with
    /// this serial; a different previous serial is revoked (rotation).
    Issue {
        mac: String,
        serial: String,
        site: Option<String>,
        location: Option<String>,
        /// Pins the dialect when given.
        dialect: Option<Dialect>,
    },
    /// Mark the device revoked and revoke its certificate.
    Revoke { mac: String },
}

impl RegistryChange {
    pub fn mac(&self) -> &str {
        match self {
            RegistryChange::Issue { mac, .. } | RegistryChange::Revoke { mac } => mac,
        }
    }
}

/// A registry change for the ingest thread, with the channel for its answer.
pub struct RegistryOp {
    pub change: RegistryChange,
    pub reply: tokio::sync::oneshot::Sender<Result<(DeviceRecord, Vec<String>), String>>,
}

/// Capacity of the channel to the ingest loop: admin commands are rare.
pub const REGISTRY_QUEUE: usize = 16;

/// Applies `change` to a device record. `existing` is the current record,
/// `fresh` makes a new one for an unknown device (issue only). Returns the
/// new record and the serials to revoke. Pure: the callers store the result.
pub fn apply_change(
    existing: Option<DeviceRecord>,
    change: &RegistryChange,
    fresh: impl FnOnce(&str) -> DeviceRecord,
) -> Result<(DeviceRecord, Vec<String>), RegistryError> {
    let mac = crate::ident::normalize(change.mac())?;
    match change {
        RegistryChange::Issue {
            serial,
            site,
            location,
            dialect,
            ..
        } => {
            let mut rec = existing.unwrap_or_else(|| fresh(&mac));
            let mut revoke = Vec::new();
            if let Some(old) = rec.cert_serial.take() {
                if &old != serial {
                    revoke.push(old);
                }
            }
            rec.cert_serial = Some(serial.clone());
            rec.status = "active".into();
            if site.is_some() {
                rec.site = site.clone();
            }
            if location.is_some() {
                rec.location = location.clone();
            }
            if let Some(d) = dialect {
                rec.dialect = *d;
                rec.dialect_pinned = true;
            }
            Ok((rec, revoke))
        }
        RegistryChange::Revoke { .. } => {
            let mut rec = existing.ok_or_else(|| RegistryError::UnknownDevice(mac.clone()))?;
            rec.status = "revoked".into();
            let revoke = rec.cert_serial.iter().cloned().collect();
            Ok((rec, revoke))
        }
    }
}
