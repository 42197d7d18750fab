//! Site PKI: everything about certificates, keys and device identities.
//!
//! This module owns the `<data_dir>/certs` directory:
//!
//! | file | what |
//! |---|---|
//! | `ca.crt.pem`, `ca.key.pem` | the site root CA (ECDSA P-256, 10 years): the trust anchor devices and the device listener use |
//! | `issuing.crt.pem`, `issuing.key.pem` | the issuing intermediate CA, signed by the root: it signs device and server certificates |
//! | `server.crt.pem`, `server.key.pem` | the gateway's TLS server certificate (5 years), followed by the intermediate (the chain devices verify up to the root) |
//! | `revoked.json` | revoked device certificate serials |
//!
//! The root key is needed only to create the intermediate: it can be
//! exported ([`Pki::export_root`]) and removed from the gateway
//! ([`Pki::remove_root_key`]); everything else keeps working with the
//! intermediate. A data directory from before the intermediate (no
//! `issuing.*`) keeps signing with the root, whose key then stays.
//!
//! It creates the CA ([`Pki::init_ca`], [`Pki::ensure_ca`]), issues device
//! client certificates together with an Arduino/ESP-IDF header
//! ([`Pki::issue_device`]), keeps the revocation list ([`Pki::revoke_serial`],
//! [`Pki::load_revoked`]), builds the rustls server configuration that
//! requires a client certificate from the site CA ([`Pki::server_tls_config`])
//! and extracts a device identity from a peer certificate ([`peer_identity`]).
//!
//! A device's identity is its MAC address written as 12 upper-case hex digits
//! (see [`normalize_mac`]); it is the certificate's subject CN. Serial numbers
//! are written as lower-case hex without leading zeros (see
//! [`normalize_serial`]) everywhere: in [`IssuedDevice`], [`PeerIdentity`] and
//! `revoked.json`.
//!
//! Private key files are created with mode 0600; every file is written to a
//! temporary file and renamed into place, so a crash never leaves a torn file.
//!
//! One file per concept: [`Pki`] and its directory (`dir`), errors
//! (`error`), identities and serials (`identity`), certificate building
//! blocks (`x509`), what the CA signs (`issue`), the CA itself (`ca`), the
//! firmware header (`header`), the revocation list (`revocation`), rustls
//! configuration (`tls`) and crash-safe file writes (`files`).

mod ca;
mod dir;
mod error;
mod files;
mod header;
mod identity;
mod issue;
mod revocation;
#[cfg(test)]
mod testutil;
mod tls;
mod x509;

pub use ca::{CaInitOptions, CaInitReport, CA_COMMON_NAME, CA_VALIDITY_DAYS, ISSUING_COMMON_NAME};
pub use dir::Pki;
pub use error::PkiError;
pub(crate) use files::{create_private_dir, write_atomic};
pub use header::device_header;
pub use identity::{
    normalize_mac, normalize_serial, peer_identity, sha256_fingerprint, PeerIdentity,
};
pub use issue::{
    DeviceFiles, IssuedDevice, ServerCertReport, DEFAULT_DEVICE_DAYS, DEVICE_URI_PREFIX,
    SERVER_VALIDITY_DAYS,
};
pub use revocation::{RevocationList, RevokedCert, SharedRevoked};
pub use tls::{aes_in_hardware, read_ca_file, tls_provider};
pub use x509::ORGANIZATION;
