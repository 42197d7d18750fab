//! Errors of the site PKI.

use std::path::{Path, PathBuf};

/// Errors of the site PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("invalid MAC address {input:?}: {reason}")]
    InvalidMac { input: String, reason: &'static str },
    #[error("invalid certificate serial {0:?}: expected hex digits (optionally ':'-separated)")]
    InvalidSerial(String),
    #[error("invalid server hostname {0:?}: use letters, digits, '-', '.' (or an IP address)")]
    InvalidHostname(String),
    #[error("invalid validity: {0}")]
    InvalidValidity(String),
    #[error(
        "a site CA already exists in {0}; refusing to replace it (forcing a new CA \
         invalidates every device certificate issued so far)"
    )]
    CaExists(PathBuf),
    #[error("no site CA in {0}; create one first (`barngate ca init`)")]
    NoCa(PathBuf),
    #[error("the CA private key does not match the CA certificate in {0}")]
    CaKeyMismatch(PathBuf),
    #[error(
        "no root CA key in {0} (removed with `ca remove-root-key`); put the exported \
         ca.key.pem back into it for this"
    )]
    NoRootKey(PathBuf),
    #[error(
        "the site CA in {0} has no issuing intermediate (it predates them): its root key \
         signs the devices and cannot be removed"
    )]
    RootKeyNeeded(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot read PEM: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("invalid certificate: {0}")]
    Certificate(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: corrupt revocation list: {source}")]
    RevocationList {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("TLS configuration failed: {0}")]
    Tls(String),
    #[error("the system random number generator failed")]
    Random,
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}
