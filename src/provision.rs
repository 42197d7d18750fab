//! Device provisioning: the registry side of `device issue` and
//! `device revoke`, with one writer at a time.
//!
//! The certificate files are made by [`crate::pki`]; this module records the
//! result in the device registry and revokes the serials that stop being
//! valid (a rotated or revoked certificate). While `serve` runs, the ingest
//! thread is the database's only writer: the change travels over the admin
//! socket to the gateway, which writes the serials it revokes to
//! `revoked.json`, hands the change to the ingest loop through a bounded
//! channel ([`RegistryOp`]), then updates the live revocation set and closes
//! open sessions ([`apply_live`]), one change at a time. When no gateway
//! runs, the CLI opens the store itself ([`apply_offline`]), also writing
//! `revoked.json` first. At start the gateway adds to `revoked.json` any
//! revoked device's serial it lacks ([`reconcile_revocations`]).

use crate::admin::{self, AdminError, DeviceView, Request};
use crate::config::Config;
use crate::front::Front;
use crate::pki::{normalize_mac, Pki, PkiError};
use crate::protocol::Dialect;
pub use crate::registry::{
    apply_change, RegistryChange, RegistryError, RegistryOp, REGISTRY_QUEUE,
};
use crate::schedule::Schedule;
use crate::store::{DeviceRecord, Store, StoreError};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the gateway's ingest is not running")]
    IngestGone,
    #[error("{0}")]
    Invalid(String),
    #[error("cannot create database {path}: {source}")]
    Database {
        path: String,
        source: std::io::Error,
    },
}

/// What a registry change did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegistryOutcome {
    pub device: DeviceView,
    /// Certificate serials that stopped being valid (added to `revoked.json`).
    pub revoked_serials: Vec<String>,
    /// Devices whose open session was closed (live gateway only).
    #[serde(default)]
    pub closed_sessions: Vec<String>,
}

/// Adds `serials` to `revoked.json`, durably, in one write.
fn revoke_files(pki: &Pki, mac: &str, serials: &[String]) -> Result<(), ProvisionError> {
    if serials.is_empty() {
        return Ok(());
    }
    for s in pki.revoke_serials_at(mac, serials, Utc::now())? {
        info!(device = %mac, serial = %s, "certificate revoked");
    }
    Ok(())
}

/// Makes `revoked.json` hold the serial of every device the registry marks
/// revoked, adding the missing ones; returns the serials added. (A registry
/// change is written after `revoked.json`, so this finds only what an
/// older gateway or a hand edit left behind.) The other way round — a
/// serial in `revoked.json` whose device the registry still calls active —
/// is left as it is: the certificate stays refused, and `device issue` or
/// `device revoke` again brings the registry in line.
pub fn reconcile_revocations(store: &Store, pki: &Pki) -> Result<Vec<String>, ProvisionError> {
    let listed = pki.load_revoked()?;
    let mut added = Vec::new();
    for d in store.devices()? {
        let Some(serial) = d.cert_serial.as_deref().filter(|_| d.status == "revoked") else {
            continue;
        };
        let serial = crate::pki::normalize_serial(serial)?;
        if listed.contains(&serial) {
            continue;
        }
        warn!(device = %d.mac, serial = %serial, "device revoked in the registry but not in revoked.json: added");
        added.extend(pki.revoke_serials_at(&d.mac, &[serial], Utc::now())?);
    }
    Ok(added)
}

/// Applies a change with no gateway running: the CLI owns the database.
pub fn apply_offline(
    store: &Store,
    pki: &Pki,
    cfg: &Config,
    change: &RegistryChange,
) -> Result<RegistryOutcome, ProvisionError> {
    let mac = normalize_mac(change.mac())?;
    let now = Utc::now();
    let index = store.device_count()?;
    let tz = cfg
        .timezone()
        .map_err(|e| ProvisionError::Invalid(e.to_string()))?;
    let schedule = Schedule::new(&cfg.schedule, tz);
    let (rec, revoke) = apply_change(store.device(&mac)?, change, |m| {
        DeviceRecord::new(
            m,
            cfg.site.default_dialect,
            &cfg.site.id,
            index,
            schedule.slot_for_index(index),
            now,
        )
    })?;
    // Revoke first: a failure leaves the old certificate revoked rather
    // than a registry that claims a rotation which did not happen.
    revoke_files(pki, &mac, &revoke)?;
    store.put_device(&rec, now)?;
    Ok(RegistryOutcome {
        device: DeviceView::from(&rec),
        revoked_serials: revoke,
        closed_sessions: Vec::new(),
    })
}

/// What the running gateway needs to apply registry changes.
#[derive(Clone)]
pub struct Live {
    pub registry: flume::Sender<RegistryOp>,
    pub pki: Pki,
    pub front: Front,
    /// Read-only here: the serials a change revokes are known before the
    /// ingest applies it.
    pub store: std::sync::Arc<Store>,
    /// One registry change at a time, from its first read to its last
    /// effect.
    pub changes: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// Applies a change on the running gateway, one at a time: the serials it
/// revokes go to `revoked.json` first (on disk before anything else
/// changes; a failure there changes nothing); then the ingest thread
/// commits the registry; then the live revocation set and open sessions
/// follow.
pub async fn apply_live(
    live: &Live,
    change: RegistryChange,
) -> Result<RegistryOutcome, ProvisionError> {
    let mac = normalize_mac(change.mac())?;
    let _one = live.changes.lock().await;
    let blocking_failed = |e: tokio::task::JoinError| ProvisionError::Invalid(e.to_string());
    // The serials this change revokes, from the stored record: only
    // registry changes set a certificate serial or the revoked status,
    // and they run one at a time, under `changes`.
    let (store, c) = (live.store.clone(), change.clone());
    let planned = tokio::task::spawn_blocking(move || {
        let existing = store.device(&normalize_mac(c.mac())?)?;
        let fresh = |m: &str| DeviceRecord::new(m, Dialect::default(), "", 0, 0, Utc::now());
        let (_, revoke) = apply_change(existing, &c, fresh)?;
        Ok::<_, ProvisionError>(revoke)
    })
    .await
    .map_err(blocking_failed)??;
    let (pki, m, serials) = (live.pki.clone(), mac.clone(), planned.clone());
    tokio::task::spawn_blocking(move || revoke_files(&pki, &m, &serials))
        .await
        .map_err(blocking_failed)??;
    let (reply, answer) = tokio::sync::oneshot::channel();
    live.registry
        .send_async(RegistryOp { change, reply })
        .await
        .map_err(|_| ProvisionError::IngestGone)?;
    let (rec, mut revoke) = answer
        .await
        .map_err(|_| ProvisionError::IngestGone)?
        .map_err(ProvisionError::Invalid)?;
    // The ingest's answer is the registry's word; a serial the plan did
    // not have is written before it takes effect too.
    let unplanned: Vec<String> = revoke
        .iter()
        .filter(|s| !planned.contains(s))
        .cloned()
        .collect();
    if !unplanned.is_empty() {
        let (pki, m) = (live.pki.clone(), mac.clone());
        tokio::task::spawn_blocking(move || revoke_files(&pki, &m, &unplanned))
            .await
            .map_err(blocking_failed)??;
    }
    for s in planned {
        if !revoke.contains(&s) {
            revoke.push(s);
        }
    }
    let closed = live.front.revoke(&revoke);
    Ok(RegistryOutcome {
        device: DeviceView::from(&rec),
        revoked_serials: revoke,
        closed_sessions: closed,
    })
}

/// How often `revoked.json` is checked for changes made by hand.
pub const REVOKED_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// What identifies one version of a file without reading it.
fn file_stamp(path: &Path) -> Option<(Option<std::time::SystemTime>, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok(), m.len(), m.ino()))
}

/// Watches `revoked.json` for changes made outside the admin socket (an
/// editor, a config-management tool): serials added there join the live
/// revocation set and their open sessions are closed, within
/// [`REVOKED_POLL`] plus a read. Only additions are applied: a serial removed
/// by hand stays revoked until a restart, so a racing read can never
/// un-revoke anything; an unreadable file keeps the live set as it is.
pub async fn watch_revocation_file(
    pki: Pki,
    front: Front,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let path = pki.revoked_path();
    // The first tick always reads: a change between the gateway's own load
    // and this task's start is not missed.
    let mut last = None;
    let mut every = tokio::time::interval(REVOKED_POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        let p = path.clone();
        let stamp = tokio::task::spawn_blocking(move || file_stamp(&p))
            .await
            .ok()
            .flatten();
        if last == Some(stamp) {
            continue;
        }
        last = Some(stamp);
        let reader = pki.clone();
        let set = match tokio::task::spawn_blocking(move || reader.load_revoked()).await {
            Ok(Ok(set)) => set,
            Ok(Err(e)) => {
                warn!(path = %path.display(), error = %e, "revoked.json changed but cannot be read; the live revocation set is kept");
                continue;
            }
            Err(_) => continue,
        };
        let mut added: Vec<String> = set.into_iter().filter(|s| !front.is_revoked(s)).collect();
        if added.is_empty() {
            continue;
        }
        added.sort();
        for s in &added {
            info!(serial = %s, "certificate revoked (revoked.json edited)");
        }
        front.revoke(&added);
    }
}

/// Applies a change through the running gateway if there is one, else
/// directly on the store in `data_dir`.
pub async fn apply(
    data_dir: &Path,
    store_path: &Path,
    pki: &Pki,
    cfg: &Config,
    change: RegistryChange,
) -> Result<RegistryOutcome, ProvisionError> {
    let req = Request::Registry {
        change: change.clone(),
    };
    if let Some(v) = admin::client::remote(data_dir, &req).await? {
        return serde_json::from_value(v)
            .map_err(|e| ProvisionError::Invalid(format!("unreadable answer: {e}")));
    }
    crate::fsmode::private_file(store_path).map_err(|source| ProvisionError::Database {
        path: store_path.display().to_string(),
        source,
    })?;
    let store = Store::open(store_path)?;
    apply_offline(&store, pki, cfg, &change)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> DeviceRecord {
        DeviceRecord::new("AABBCCDDEEFF", Dialect::Firmware, "s", 0, 0, Utc::now())
    }

    /// A device the registry calls revoked whose serial `revoked.json`
    /// lacks (an older gateway wrote the registry first and stopped before
    /// the file) gets it back at start.
    #[test]
    fn reconcile_adds_revoked_devices_missing_from_the_list() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("db.redb")).unwrap();
        let pki = Pki::new(tmp.path().join("certs"));
        let mut gone = DeviceRecord::new("AABBCCDDEE01", Dialect::Firmware, "s", 0, 0, Utc::now());
        gone.status = "revoked".into();
        gone.cert_serial = Some("0A1B".into());
        let mut active =
            DeviceRecord::new("AABBCCDDEE02", Dialect::Firmware, "s", 1, 0, Utc::now());
        active.cert_serial = Some("0c".into());
        store.put_device(&gone, Utc::now()).unwrap();
        store.put_device(&active, Utc::now()).unwrap();
        assert_eq!(reconcile_revocations(&store, &pki).unwrap(), ["0a1b"]);
        let set = pki.load_revoked().unwrap();
        assert!(set.contains("0a1b") && !set.contains("0c"), "{set:?}");
        assert!(reconcile_revocations(&store, &pki).unwrap().is_empty());
    }

    #[test]
    fn issue_rotates_and_revoke_marks() {
        let issue = |serial: &str| RegistryChange::Issue {
            mac: "aa:bb:cc:dd:ee:ff".into(),
            serial: serial.into(),
            site: None,
            location: Some("Barn 2".into()),
            dialect: Some(Dialect::V1),
        };
        let (r, rv) = apply_change(None, &issue("01"), |_| rec()).unwrap();
        assert!(rv.is_empty());
        assert_eq!(r.cert_serial.as_deref(), Some("01"));
        assert!(r.dialect_pinned && r.dialect == Dialect::V1);
        assert_eq!(r.location.as_deref(), Some("Barn 2"));
        let (r, rv) = apply_change(Some(r), &issue("02"), |_| rec()).unwrap();
        assert_eq!(rv, vec!["01".to_string()]);
        let revoke = RegistryChange::Revoke {
            mac: "AABBCCDDEEFF".into(),
        };
        let (r, rv) = apply_change(Some(r), &revoke, |_| rec()).unwrap();
        assert_eq!(r.status, "revoked");
        assert_eq!(rv, vec!["02".to_string()]);
        assert!(matches!(
            apply_change(None, &revoke, |_| rec()),
            Err(RegistryError::UnknownDevice(_))
        ));
    }
}
