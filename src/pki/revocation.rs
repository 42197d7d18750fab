//! The revocation list, `revoked.json`, and the revoked serials the TLS
//! verifier checks.

use std::collections::HashSet;
use std::fs;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::dir::Pki;
use super::error::{io_err, PkiError};
use super::files::{create_private_dir, write_atomic, DirLock, PUBLIC_MODE};
use super::identity::{normalize_mac, normalize_serial};

/// One revoked certificate in `revoked.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCert {
    pub serial: String,
    pub mac: String,
    pub revoked_at: DateTime<Utc>,
}

/// Contents of `revoked.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    #[serde(default = "revocation_list_version")]
    pub version: u32,
    #[serde(default)]
    pub revoked: Vec<RevokedCert>,
}

fn revocation_list_version() -> u32 {
    1
}

/// Revoked serials shared with the TLS verifier; update it in place (after
/// [`Pki::revoke_serial`]) and new handshakes see the change.
pub type SharedRevoked = Arc<RwLock<HashSet<String>>>;

impl Pki {
    /// Reads `revoked.json` (an empty list when the file does not exist; an
    /// error when it is corrupt, so a damaged file never un-revokes anything).
    pub fn revocation_list(&self) -> Result<RevocationList, PkiError> {
        let path = self.revoked_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RevocationList {
                    version: revocation_list_version(),
                    revoked: Vec::new(),
                })
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|source| PkiError::RevocationList { path, source })
    }

    /// Adds a serial to `revoked.json`. Returns `false` when it was already
    /// revoked. See [`Pki::revoke_serials_at`].
    pub fn revoke_serial(&self, mac: &str, serial_hex: &str) -> Result<bool, PkiError> {
        self.revoke_serial_at(mac, serial_hex, Utc::now())
    }

    /// [`Pki::revoke_serial`] with an explicit revocation time.
    pub fn revoke_serial_at(
        &self,
        mac: &str,
        serial_hex: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, PkiError> {
        let added = self.revoke_serials_at(mac, &[serial_hex.to_string()], now)?;
        Ok(!added.is_empty())
    }

    /// Adds serials of `mac`'s certificates to `revoked.json` and returns
    /// those that were not there yet (normalised). The file is read,
    /// changed and replaced (a new file, synced, renamed over the old one,
    /// the directory synced) under an exclusive lock on the certificate
    /// directory, so concurrent revocations, in this process or another,
    /// all persist. Returns only once the change is on disk.
    pub fn revoke_serials_at(
        &self,
        mac: &str,
        serials: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, PkiError> {
        let mac = normalize_mac(mac)?;
        let serials = serials
            .iter()
            .map(|s| normalize_serial(s))
            .collect::<Result<Vec<_>, _>>()?;
        create_private_dir(&self.dir)?;
        let _lock = DirLock::exclusive(&self.dir)?;
        let mut list = self.revocation_list()?;
        let mut have: HashSet<String> = list
            .revoked
            .iter()
            .filter_map(|e| normalize_serial(&e.serial).ok())
            .collect();
        let mut added = Vec::new();
        for serial in serials {
            if have.insert(serial.clone()) {
                list.revoked.push(RevokedCert {
                    serial: serial.clone(),
                    mac: mac.clone(),
                    revoked_at: now,
                });
                added.push(serial);
            }
        }
        if added.is_empty() {
            return Ok(added);
        }
        let json = serde_json::to_vec_pretty(&list).map_err(|source| PkiError::RevocationList {
            path: self.revoked_path(),
            source,
        })?;
        write_atomic(&self.revoked_path(), &json, PUBLIC_MODE)?;
        Ok(added)
    }

    /// The revoked serials, normalised ([`normalize_serial`]).
    pub fn load_revoked(&self) -> Result<HashSet<String>, PkiError> {
        self.revocation_list()?
            .revoked
            .iter()
            .map(|r| normalize_serial(&r.serial))
            .collect()
    }

    /// [`Pki::load_revoked`] wrapped for [`Pki::server_tls_config`].
    pub fn shared_revoked(&self) -> Result<SharedRevoked, PkiError> {
        Ok(Arc::new(RwLock::new(self.load_revoked()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::testutil::*;

    #[test]
    fn revocation_list_roundtrip() {
        let (_tmp, pki) = new_pki();
        assert!(pki.load_revoked().unwrap().is_empty());
        assert!(pki.revoke_serial("b8:f8:62:f9:cf:b8", "4A:0B:FF").unwrap());
        assert!(!pki.revoke_serial("B8F862F9CFB8", "4a0bff").unwrap());
        assert!(pki.revoke_serial("B8F862F9CFB9", "0x7f01").unwrap());
        let set = pki.load_revoked().unwrap();
        assert_eq!(
            set,
            HashSet::from(["4a0bff".to_string(), "7f01".to_string()])
        );
        let list = pki.revocation_list().unwrap();
        assert_eq!(list.version, 1);
        assert_eq!(list.revoked[0].mac, "B8F862F9CFB8");
        assert!(list.revoked[0].revoked_at <= Utc::now());
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(pki.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["revoked.json"]);

        assert!(matches!(
            pki.revoke_serial("B8F862F9CFB8", "zz"),
            Err(PkiError::InvalidSerial(_))
        ));
        fs::write(pki.revoked_path(), "{not json").unwrap();
        assert!(matches!(
            pki.load_revoked(),
            Err(PkiError::RevocationList { .. })
        ));
    }

    /// Finding: `revoked.json` was read, changed and replaced with no lock,
    /// so of two revocations at once one could be lost.
    #[test]
    fn concurrent_revocations_all_persist() {
        let (_tmp, pki) = new_pki();
        let threads: Vec<_> = (0..16u8)
            .map(|i| {
                let pki = pki.clone();
                std::thread::spawn(move || {
                    let mac = format!("B8F862F9CF{i:02X}");
                    assert!(pki.revoke_serial(&mac, &format!("{:02x}", i + 1)).unwrap());
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let set = pki.load_revoked().unwrap();
        assert_eq!(set.len(), 16, "{set:?}");
        // One write for several serials; those already listed are skipped.
        let added = pki
            .revoke_serials_at(
                "B8F862F9CF00",
                &["01".into(), "0x11".into(), "12".into()],
                t0(),
            )
            .unwrap();
        assert_eq!(added, ["11", "12"]);
        assert_eq!(pki.load_revoked().unwrap().len(), 18);
    }
}
