//! Admin queries (device list, image list, image export) and the local admin
//! endpoint that serves them while `serve` holds the database: the requests
//! and answers here, the endpoint in [`server`], the CLI's side in [`client`].
//!
//! redb admits one process at a time, so a running gateway answers on a Unix
//! socket (`<data_dir>/admin.sock`, mode 0600); when no gateway runs, the
//! CLI opens the database itself. Both paths run the same query functions.

use crate::protocol::normalize_device_id;
use crate::registry::RegistryChange;
use crate::store::{CaptureRecord, DeviceRecord, Store, StoreError};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokio::net::UnixListener;

pub mod client;
pub mod server;

pub const SOCKET_NAME: &str = "admin.sock";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("no complete image {name:?} from device {device}")]
    NoSuchImage { device: String, name: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("admin socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("the running gateway answered: {0}")]
    Remote(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    DeviceList,
    ImageList {
        device: Option<String>,
    },
    ImageExport {
        device: String,
        name: String,
    },
    /// A registry change (`device issue` / `device revoke`), applied by the
    /// running gateway's single writer.
    Registry {
        change: RegistryChange,
    },
    SyncStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceView {
    pub mac: String,
    pub dialect: String,
    pub site: Option<String>,
    pub location: Option<String>,
    pub firmware_version: Option<String>,
    pub status: String,
    pub registered_at: DateTime<Utc>,
    pub last_seen: Option<DateTime<Utc>>,
    pub next_wake: Option<DateTime<Utc>>,
    pub battery: Option<f64>,
    pub pending_reported: u32,
    pub cert_serial: Option<String>,
}

impl From<&DeviceRecord> for DeviceView {
    fn from(d: &DeviceRecord) -> Self {
        DeviceView {
            mac: d.mac.clone(),
            dialect: d.dialect.to_string(),
            site: d.site.clone(),
            location: d.location.clone(),
            firmware_version: d.firmware_version.clone(),
            status: d.status.clone(),
            registered_at: d.registered_at,
            last_seen: d.last_seen,
            next_wake: d.next_wake,
            battery: d.battery,
            pending_reported: d.pending_reported,
            cert_serial: d.cert_serial.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageView {
    pub device: String,
    pub image_name: String,
    pub version: u32,
    pub capture_id: u64,
    pub size: u32,
    pub sha256: String,
    pub captured_at: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub acked_at: Option<DateTime<Utc>>,
    pub origin: String,
    pub retries: u32,
}

impl From<&CaptureRecord> for ImageView {
    fn from(c: &CaptureRecord) -> Self {
        ImageView {
            device: c.mac.clone(),
            image_name: c.image_name.clone(),
            version: c.version,
            capture_id: c.id,
            size: c.image_size().unwrap_or(0),
            sha256: c.sha256.clone().unwrap_or_default(),
            captured_at: c.device_time,
            received_at: c.first_seen_at,
            acked_at: c.acked_at,
            origin: match c.origin {
                crate::store::Origin::Current => "current".into(),
                crate::store::Origin::Recovery => "recovery".into(),
            },
            retries: c.retries,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Exported {
    pub image: ImageView,
    /// base64 over the socket; decoded by the client.
    pub data: String,
}

fn mac_arg(s: &str) -> Result<String, AdminError> {
    normalize_device_id(s).map_err(|e| AdminError::Invalid(e.to_string()))
}

pub fn device_list(store: &Store) -> Result<Vec<DeviceView>, AdminError> {
    Ok(store.devices()?.iter().map(DeviceView::from).collect())
}

pub fn image_list(store: &Store, device: Option<&str>) -> Result<Vec<ImageView>, AdminError> {
    let mac = device.map(mac_arg).transpose()?;
    Ok(store
        .images(mac.as_deref())?
        .iter()
        .map(ImageView::from)
        .collect())
}

pub fn image_export(
    store: &Store,
    device: &str,
    name: &str,
) -> Result<(ImageView, Vec<u8>), AdminError> {
    let mac = mac_arg(device)?;
    let not_found = || AdminError::NoSuchImage {
        device: mac.clone(),
        name: name.to_string(),
    };
    let cap = store
        .images(Some(&mac))?
        .into_iter()
        .rev()
        .find(|c| c.image_name == name)
        .ok_or_else(not_found)?;
    let bytes = store.image_bytes(cap.id)?.ok_or_else(not_found)?;
    Ok((ImageView::from(&cap), bytes))
}

/// Answers one request against the store, as JSON.
pub fn answer(store: &Store, req: &Request, now: DateTime<Utc>) -> serde_json::Value {
    let r: Result<serde_json::Value, AdminError> = match req {
        Request::SyncStatus => crate::upstream::status(store, now)
            .map(|v| serde_json::json!(v))
            .map_err(AdminError::from),
        Request::DeviceList => device_list(store).map(|v| serde_json::json!(v)),
        Request::ImageList { device } => {
            image_list(store, device.as_deref()).map(|v| serde_json::json!(v))
        }
        Request::ImageExport { device, name } => {
            image_export(store, device, name).map(|(image, bytes)| {
                serde_json::json!(Exported {
                    image,
                    data: base64::engine::general_purpose::STANDARD.encode(bytes),
                })
            })
        }
        Request::Registry { .. } => Err(AdminError::Invalid(
            "registry changes need the running gateway or provision::apply_offline".into(),
        )),
    };
    match r {
        Ok(data) => serde_json::json!({"ok": true, "data": data}),
        Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
    }
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Binds the admin socket with 0600 permissions, replacing a stale one.
pub fn bind(data_dir: &Path) -> Result<UnixListener, AdminError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = socket_path(data_dir);
    let err = |source| AdminError::Socket {
        path: path.display().to_string(),
        source,
    };
    // Bound inside a new directory only the owner can enter, made 0600
    // there, then moved into place: the socket is never reachable by
    // anyone else, whatever the process umask (which is process-wide, so
    // not changed here).
    let private = data_dir.join(format!(".admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(err)?;
    let staged = private.join(SOCKET_NAME);
    let placed = UnixListener::bind(&staged)
        .and_then(|l| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
            let _ = std::fs::remove_file(&path);
            std::fs::rename(&staged, &path)?;
            Ok(l)
        })
        .map_err(err);
    let _ = std::fs::remove_dir_all(&private);
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding: the socket was bound with the process umask and made 0600
    /// only afterwards, so for a moment anyone could connect. It is now
    /// bound in a directory only the owner can enter and moved into place
    /// at 0600; what is checked here is where it ends up and that the
    /// staging directory is gone.
    #[tokio::test]
    async fn the_admin_socket_is_only_the_owners() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..2 {
            let listener = bind(dir.path()).unwrap();
            let path = socket_path(dir.path());
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, [SOCKET_NAME]);
            let (_c, accepted) =
                tokio::join!(tokio::net::UnixStream::connect(&path), listener.accept());
            accepted.unwrap();
        }
    }
}
