//! [`Pki`]: the `<data_dir>/certs` directory, its file names and what is in it.

use std::fs;
use std::path::{Path, PathBuf};

use super::error::{io_err, PkiError};

pub(super) const CA_CERT_FILE: &str = "ca.crt.pem";
const CA_KEY_FILE: &str = "ca.key.pem";
const ISSUING_CERT_FILE: &str = "issuing.crt.pem";
const ISSUING_KEY_FILE: &str = "issuing.key.pem";
const SERVER_CERT_FILE: &str = "server.crt.pem";
const SERVER_KEY_FILE: &str = "server.key.pem";
const REVOKED_FILE: &str = "revoked.json";

/// The site PKI rooted at `<data_dir>/certs`.
#[derive(Debug, Clone)]
pub struct Pki {
    pub(super) dir: PathBuf,
}

impl Pki {
    pub fn new(certs_dir: impl Into<PathBuf>) -> Pki {
        Pki {
            dir: certs_dir.into(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }
    pub fn ca_key_path(&self) -> PathBuf {
        self.dir.join(CA_KEY_FILE)
    }
    pub fn issuing_cert_path(&self) -> PathBuf {
        self.dir.join(ISSUING_CERT_FILE)
    }
    pub fn issuing_key_path(&self) -> PathBuf {
        self.dir.join(ISSUING_KEY_FILE)
    }
    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.join(SERVER_CERT_FILE)
    }
    pub fn server_key_path(&self) -> PathBuf {
        self.dir.join(SERVER_KEY_FILE)
    }
    pub fn revoked_path(&self) -> PathBuf {
        self.dir.join(REVOKED_FILE)
    }

    /// True when the CA certificate and a key that signs are present (the
    /// root's, or the issuing intermediate's).
    pub fn exists(&self) -> bool {
        self.ca_cert_path().is_file() && (self.ca_key_path().is_file() || self.has_intermediate())
    }

    /// True when an issuing intermediate signs (its certificate and key).
    pub fn has_intermediate(&self) -> bool {
        self.issuing_cert_path().is_file() && self.issuing_key_path().is_file()
    }

    /// True when the root CA's private key is on this machine.
    pub fn has_root_key(&self) -> bool {
        self.ca_key_path().is_file()
    }

    /// The CA certificate, PEM.
    pub fn ca_cert_pem(&self) -> Result<String, PkiError> {
        if !self.exists() {
            return Err(PkiError::NoCa(self.dir.clone()));
        }
        let path = self.ca_cert_path();
        fs::read_to_string(&path).map_err(io_err(&path))
    }
}
