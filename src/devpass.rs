//! Per-device MQTT passwords for the optional password listener
//! (`mqtt.password_listen`), for firmware that cannot take a client
//! certificate yet.
//!
//! `device issue --password` generates a random password, shows it once and
//! stores only its argon2id hash in `<data_dir>/certs/passwords/{MAC}.json`
//! (0600), together with the serial of the certificate issued with it. The
//! password is bound to that serial: revoking the certificate (`device
//! revoke`, a rotating `device issue`, a hand-edited `revoked.json`) revokes
//! the password as well, through the same live revocation set.

use crate::pki::{create_private_dir, normalize_mac, write_atomic, PkiError};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chrono::{DateTime, Utc};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The passwords' directory inside `certs/`.
pub const PASSWORDS_DIR: &str = "passwords";
/// Characters of a generated password (62 symbols: ~190 bits).
pub const PASSWORD_LEN: usize = 32;
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

#[derive(Debug, thiserror::Error)]
pub enum DevPassError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a device password record: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// One device's stored password: the hash and the certificate serial it
/// is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordRecord {
    pub mac: String,
    pub serial: String,
    /// argon2id PHC string.
    pub hash: String,
    pub issued_at: DateTime<Utc>,
}

/// A new random password: [`PASSWORD_LEN`] letters and digits (no
/// character a C string, a shell or a TOML file would need to escape).
pub fn generate() -> String {
    let mut out = String::with_capacity(PASSWORD_LEN);
    let mut buf = [0u8; 64];
    while out.len() < PASSWORD_LEN {
        OsRng.fill_bytes(&mut buf);
        for b in buf {
            // Rejection sampling: 248 = 4 × 62, so no symbol is favoured.
            if (b as usize) < ALPHABET.len() * 4 && out.len() < PASSWORD_LEN {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    out
}

/// The argon2id hash of `password` (random salt), as a PHC string.
pub fn hash(password: &str) -> Result<String, DevPassError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| DevPassError::Hash(e.to_string()))
}

/// True when `password` matches the PHC string `hash`. Slow by design
/// (argon2): call it from `spawn_blocking`.
pub fn verify(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(h) => Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// Spends the time of a verification without a stored hash, so that an
/// unknown device is not told apart by the answer's timing.
pub fn verify_nothing(password: &str) {
    static DUMMY: OnceLock<Option<String>> = OnceLock::new();
    if let Some(h) = DUMMY.get_or_init(|| hash(&generate()).ok()) {
        let _ = verify(h, password);
    }
}

/// The stored password hashes, `<certs>/passwords/{MAC}.json`.
#[derive(Debug, Clone)]
pub struct PasswordStore {
    dir: PathBuf,
}

impl PasswordStore {
    /// The store inside a PKI directory (`<data_dir>/certs`).
    pub fn new(certs_dir: &Path) -> PasswordStore {
        PasswordStore {
            dir: certs_dir.join(PASSWORDS_DIR),
        }
    }

    pub fn path(&self, mac: &str) -> PathBuf {
        self.dir.join(format!("{mac}.json"))
    }

    /// Hashes `password` and stores it for `mac`, bound to `serial`,
    /// replacing an earlier one.
    pub fn set(
        &self,
        mac: &str,
        serial: &str,
        password: &str,
        now: DateTime<Utc>,
    ) -> Result<PathBuf, DevPassError> {
        let mac = normalize_mac(mac)?;
        let rec = PasswordRecord {
            mac: mac.clone(),
            serial: serial.to_string(),
            hash: hash(password)?,
            issued_at: now,
        };
        let path = self.path(&mac);
        let json = serde_json::to_vec_pretty(&rec).map_err(|source| DevPassError::Json {
            path: path.clone(),
            source,
        })?;
        create_private_dir(&self.dir)?;
        write_atomic(&path, &json, 0o600)?;
        Ok(path)
    }

    /// Removes the password of `mac`; `false` when it had none.
    pub fn remove(&self, mac: &str) -> Result<bool, DevPassError> {
        let path = self.path(&normalize_mac(mac)?);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(DevPassError::Io { path, source }),
        }
    }

    /// The record of `mac` (already normalised), if a password was issued.
    /// A record naming another MAC counts as none.
    pub fn get(&self, mac: &str) -> Result<Option<PasswordRecord>, DevPassError> {
        let path = self.path(mac);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(DevPassError::Io { path, source }),
        };
        let rec: PasswordRecord =
            serde_json::from_slice(&bytes).map_err(|source| DevPassError::Json { path, source })?;
        Ok((rec.mac == mac).then_some(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_long_and_plain() {
        let a = generate();
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, generate());
    }

    #[test]
    fn store_set_get_verify_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let s = PasswordStore::new(tmp.path());
        let pw = generate();
        let path = s.set("b8:f8:62:f9:cf:b8", "0a1b", &pw, Utc::now()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&pw), "only the hash is stored");
        let rec = s.get("B8F862F9CFB8").unwrap().unwrap();
        assert_eq!(rec.serial, "0a1b");
        assert!(verify(&rec.hash, &pw));
        assert!(!verify(&rec.hash, "wrong"));
        assert!(!verify("not a hash", &pw));
        assert!(s.get("AABBCCDDEEFF").unwrap().is_none());
        assert!(s.remove("B8F862F9CFB8").unwrap());
        assert!(!s.remove("B8F862F9CFB8").unwrap());
        assert!(s.get("B8F862F9CFB8").unwrap().is_none());
    }
}
