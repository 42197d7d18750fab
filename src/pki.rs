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

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Duration, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName as TlsDn, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate, X509Name};

/// Subject CN of the issuing intermediate CA.
pub const ISSUING_COMMON_NAME: &str = "barngate issuing CA";
/// Subject CN of the site CA.
pub const CA_COMMON_NAME: &str = "barngate site CA";
/// Subject O of every certificate this module creates.
pub const ORGANIZATION: &str = "barngate";
/// Default validity of a device certificate, in days.
pub const DEFAULT_DEVICE_DAYS: u32 = 825;
/// Validity of the site CA, in days (10 years).
pub const CA_VALIDITY_DAYS: i64 = 3653;
/// Validity of the gateway server certificate, in days (5 years).
pub const SERVER_VALIDITY_DAYS: i64 = 1827;
/// Prefix of the URI SAN put in device certificates (`urn:barngate:device:{MAC}`).
pub const DEVICE_URI_PREFIX: &str = "urn:barngate:device:";

/// How far `not_before` is moved into the past, so that a gateway or device
/// whose clock is somewhat behind (a Pi without RTC) still accepts new certs.
const BACKDATE: Duration = Duration::days(1);

const CA_CERT_FILE: &str = "ca.crt.pem";
const CA_KEY_FILE: &str = "ca.key.pem";
const ISSUING_CERT_FILE: &str = "issuing.crt.pem";
const ISSUING_KEY_FILE: &str = "issuing.key.pem";
const SERVER_CERT_FILE: &str = "server.crt.pem";
const SERVER_KEY_FILE: &str = "server.key.pem";
const REVOKED_FILE: &str = "revoked.json";

const KEY_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o700;

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

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------
// identities

/// Normalises a MAC address to the device id form (12 upper-case hex
/// digits): [`crate::ident::normalize`], with its error as a [`PkiError`].
pub fn normalize_mac(s: &str) -> Result<String, PkiError> {
    crate::ident::normalize(s).map_err(|e| PkiError::InvalidMac {
        input: e.input,
        reason: e.reason,
    })
}

/// Normalises a certificate serial number to lower-case hex without leading
/// zeros (an even number of digits, so it is the hex of the minimal big-endian
/// bytes). Accepts upper case, a `0x` prefix and `:` separators.
pub fn normalize_serial(s: &str) -> Result<String, PkiError> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let digits: String = t.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PkiError::InvalidSerial(s.to_string()));
    }
    let trimmed = digits.trim_start_matches('0').to_ascii_lowercase();
    Ok(match trimmed.len() {
        0 => "00".to_string(),
        n if n % 2 == 1 => format!("0{trimmed}"),
        _ => trimmed,
    })
}

fn serial_hex_from_bytes(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    if start == bytes.len() {
        return "00".to_string();
    }
    hex::encode(&bytes[start..])
}

/// The identity a TLS peer proved with its client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Device id (normalised MAC) from the subject CN.
    pub mac: String,
    /// Serial number, as [`normalize_serial`] writes it.
    pub serial_hex: String,
    pub not_after: DateTime<Utc>,
}

/// Extracts the device identity from a (DER) device certificate. Does not
/// verify anything: use it on a certificate rustls already verified.
pub fn peer_identity(cert_der: &[u8]) -> Result<PeerIdentity, PkiError> {
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| PkiError::Certificate(format!("cannot parse certificate: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| PkiError::Certificate("certificate has no subject CN".into()))?
        .as_str()
        .map_err(|e| PkiError::Certificate(format!("subject CN is not a string: {e}")))?;
    let mac = normalize_mac(cn)?;
    Ok(PeerIdentity {
        mac,
        serial_hex: serial_hex_from_bytes(cert.raw_serial()),
        not_after: x509_time(cert.validity().not_after.timestamp())?,
    })
}

/// SHA-256 fingerprint of a DER certificate, as `AB:CD:…`.
pub fn sha256_fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn x509_time(ts: i64) -> Result<DateTime<Utc>, PkiError> {
    DateTime::from_timestamp(ts, 0)
        .ok_or_else(|| PkiError::Certificate(format!("validity time {ts} out of range")))
}

/// Certificates hold whole seconds; so do the times this module reports.
fn whole_seconds(dt: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(dt.timestamp(), 0).unwrap_or(dt)
}

fn to_offset(dt: DateTime<Utc>) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp(dt.timestamp())
        .map_err(|e| PkiError::InvalidValidity(format!("{dt}: {e}")))
}

// ---------------------------------------------------------------------------
// results and options

/// Options of [`Pki::init_ca`].
#[derive(Debug, Clone, Default)]
pub struct CaInitOptions {
    /// DNS names the devices use to reach the gateway (e.g. `barngate.local`).
    pub hostnames: Vec<String>,
    /// IP addresses the devices use to reach the gateway.
    pub ips: Vec<IpAddr>,
    /// Replace an existing CA (invalidates every issued device certificate).
    pub force: bool,
    /// Issue time; `None` = now.
    pub now: Option<DateTime<Utc>>,
}

impl CaInitOptions {
    /// Options with this machine's host name (`host`, `host.local`) and its
    /// primary IP address, when they can be found. Used by [`Pki::ensure_ca`].
    pub fn detected() -> Self {
        let (hostnames, ips) = detect_server_names();
        CaInitOptions {
            hostnames,
            ips,
            ..Default::default()
        }
    }
}

/// What [`Pki::init_ca`] created.
#[derive(Debug, Clone)]
pub struct CaInitReport {
    pub ca_cert_path: PathBuf,
    pub server_cert_path: PathBuf,
    /// SHA-256 of the CA certificate, `AB:CD:…`.
    pub ca_fingerprint_sha256: String,
    pub ca_not_after: DateTime<Utc>,
    pub server: ServerCertReport,
}

/// What [`Pki::issue_server_cert`] created.
#[derive(Debug, Clone)]
pub struct ServerCertReport {
    pub cert_path: PathBuf,
    /// Subject alternative names, as text (DNS names and IP addresses).
    pub sans: Vec<String>,
    pub not_after: DateTime<Utc>,
}

/// Files written by [`Pki::issue_device`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFiles {
    /// `{MAC}.crt.pem`
    pub cert: PathBuf,
    /// `{MAC}.key.pem` (mode 0600)
    pub key: PathBuf,
    /// `ca.crt.pem`
    pub ca_cert: PathBuf,
    /// `{MAC}.h` (contains the private key too; mode 0600)
    pub header: PathBuf,
    /// `{MAC}.password` (mode 0600), when a password was issued too.
    pub password: Option<PathBuf>,
}

/// A freshly issued device certificate. The caller records `serial_hex` as
/// the device's current serial in the registry.
#[derive(Debug, Clone)]
pub struct IssuedDevice {
    pub mac: String,
    pub serial_hex: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub paths: DeviceFiles,
}

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

// ---------------------------------------------------------------------------
// the PKI directory

/// The site PKI rooted at `<data_dir>/certs`.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

/// The CA that signs (the intermediate, or the root of a CA without one).
struct LoadedCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The root certificate, PEM: what devices trust.
    root_pem: String,
    /// What follows a certificate it signs in a chain (the intermediate's
    /// PEM; empty when the root signs).
    chain_pem: String,
    subject_raw: Vec<u8>,
    not_after: DateTime<Utc>,
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

    /// Creates the site root CA, its issuing intermediate and the gateway
    /// server certificate (signed by the intermediate). Refuses when a CA
    /// exists unless `opts.force`. The server certificate's SANs are
    /// `opts.hostnames`, `opts.ips`, `localhost`, `127.0.0.1` and `::1`.
    pub fn init_ca(&self, opts: &CaInitOptions) -> Result<CaInitReport, PkiError> {
        if self.exists() && !opts.force {
            return Err(PkiError::CaExists(self.dir.clone()));
        }
        let sans = server_sans(&opts.hostnames, &opts.ips)?;
        let now = whole_seconds(opts.now.unwrap_or_else(Utc::now));
        create_private_dir(&self.dir)?;

        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let ca_not_after = now + Duration::days(CA_VALIDITY_DAYS);
        let mut params = CertificateParams::default();
        // A random site id in the CA subject keeps two sites' CAs apart (a
        // device of the neighbouring barn gets "unknown issuer", not a
        // signature failure against a same-named CA).
        let mut site_id = [0u8; 8];
        fill_random(&mut site_id)?;
        let mut ca_dn = DistinguishedName::new();
        ca_dn.push(DnType::OrganizationName, ORGANIZATION);
        ca_dn.push(
            DnType::OrganizationalUnitName,
            format!("site {}", hex::encode(site_id)),
        );
        ca_dn.push(DnType::CommonName, CA_COMMON_NAME);
        params.distinguished_name = ca_dn.clone();
        // Path length 1: the root signs the intermediate, which signs leaves.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = to_offset(now - BACKDATE)?;
        params.not_after = to_offset(ca_not_after)?;
        params.serial_number = Some(random_serial()?);
        let ca_cert = params.self_signed(&ca_key)?;
        let root_pem = ca_cert.pem();

        // The issuing intermediate: same site, valid as long as the root.
        let issuing_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut issuing_dn = DistinguishedName::new();
        for (t, v) in ca_dn.iter() {
            if *t != DnType::CommonName {
                issuing_dn.push(t.clone(), v.clone());
            }
        }
        issuing_dn.push(DnType::CommonName, ISSUING_COMMON_NAME);
        params.distinguished_name = issuing_dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(now - BACKDATE)?;
        params.not_after = to_offset(ca_not_after)?;
        params.serial_number = Some(random_serial()?);
        let issuing_cert = params.signed_by(&issuing_key, &ca_cert, &ca_key)?;
        if cert_issuer_raw(issuing_cert.der())? != cert_subject_raw(ca_cert.der())? {
            return Err(PkiError::Certificate(
                "the intermediate's issuer name does not match the root subject".into(),
            ));
        }
        let issuing_pem = issuing_cert.pem();
        let ca = LoadedCa {
            root_pem: root_pem.clone(),
            chain_pem: issuing_pem.clone(),
            subject_raw: cert_subject_raw(issuing_cert.der())?,
            cert: issuing_cert,
            key: issuing_key,
            not_after: ca_not_after,
        };

        // Written so that the root cert comes last: once `exists()` is true
        // the other files are there too. A forced re-init removes nothing
        // first, so every file is replaced.
        let server = self.write_server_cert(&ca, sans, now)?;
        write_atomic(
            &self.issuing_key_path(),
            ca.key.serialize_pem().as_bytes(),
            KEY_MODE,
        )?;
        write_atomic(
            &self.issuing_cert_path(),
            issuing_pem.as_bytes(),
            PUBLIC_MODE,
        )?;
        write_atomic(
            &self.ca_key_path(),
            ca_key.serialize_pem().as_bytes(),
            KEY_MODE,
        )?;
        write_atomic(&self.ca_cert_path(), root_pem.as_bytes(), PUBLIC_MODE)?;
        Ok(CaInitReport {
            ca_cert_path: self.ca_cert_path(),
            server_cert_path: self.server_cert_path(),
            ca_fingerprint_sha256: sha256_fingerprint(ca_cert.der()),
            ca_not_after,
            server,
        })
    }

    /// Creates the CA with [`CaInitOptions::detected`] when there is none
    /// (returns `true` then). When the CA exists but the server certificate
    /// or key is missing, re-issues the server certificate from the existing
    /// CA (returns `false`: devices stay valid).
    pub fn ensure_ca(&self) -> Result<bool, PkiError> {
        if !self.exists() {
            self.init_ca(&CaInitOptions::detected())?;
            return Ok(true);
        }
        if !self.server_cert_path().is_file() || !self.server_key_path().is_file() {
            let opts = CaInitOptions::detected();
            self.issue_server_cert(&opts.hostnames, &opts.ips, None)?;
        }
        Ok(false)
    }

    /// Replaces the gateway server certificate (e.g. the gateway's address
    /// changed), signed by the existing CA. Device certificates stay valid.
    pub fn issue_server_cert(
        &self,
        hostnames: &[String],
        ips: &[IpAddr],
        now: Option<DateTime<Utc>>,
    ) -> Result<ServerCertReport, PkiError> {
        let sans = server_sans(hostnames, ips)?;
        let ca = self.load_ca()?;
        self.write_server_cert(&ca, sans, whole_seconds(now.unwrap_or_else(Utc::now)))
    }

    fn write_server_cert(
        &self,
        ca: &LoadedCa,
        sans: Vec<SanType>,
        now: DateTime<Utc>,
    ) -> Result<ServerCertReport, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let not_after = (now + Duration::days(SERVER_VALIDITY_DAYS)).min(ca.not_after);
        let san_text = sans.iter().map(san_to_string).collect();
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("barngate gateway");
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(now - BACKDATE)?;
        params.not_after = to_offset(not_after)?;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
        check_issued_by(cert.der(), ca)?;
        write_atomic(
            &self.server_key_path(),
            key.serialize_pem().as_bytes(),
            KEY_MODE,
        )?;
        // The chain a device verifies up to the root it trusts.
        let chain = format!("{}{}", cert.pem(), ca.chain_pem);
        write_atomic(&self.server_cert_path(), chain.as_bytes(), PUBLIC_MODE)?;
        Ok(ServerCertReport {
            cert_path: self.server_cert_path(),
            sans: san_text,
            not_after,
        })
    }

    /// Issues a device client certificate valid for `days` days (clamped to
    /// the CA's expiry) and writes `{MAC}.crt.pem`, `{MAC}.key.pem`,
    /// `ca.crt.pem` and `{MAC}.h` into `out_dir` (created if needed). Every
    /// call creates a new key and a new random serial.
    pub fn issue_device(
        &self,
        mac: &str,
        days: u32,
        out_dir: &Path,
    ) -> Result<IssuedDevice, PkiError> {
        self.issue_device_at(mac, days, out_dir, Utc::now())
    }

    /// [`Pki::issue_device`] with an explicit issue time.
    pub fn issue_device_at(
        &self,
        mac: &str,
        days: u32,
        out_dir: &Path,
        now: DateTime<Utc>,
    ) -> Result<IssuedDevice, PkiError> {
        self.issue_device_with(mac, days, out_dir, None, now)
    }

    /// [`Pki::issue_device_at`]; with `password`, also writes
    /// `{MAC}.password` and puts it into the header as
    /// `BARNGATE_MQTT_PASSWORD` (the caller stores its hash).
    pub fn issue_device_with(
        &self,
        mac: &str,
        days: u32,
        out_dir: &Path,
        password: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<IssuedDevice, PkiError> {
        let mac = normalize_mac(mac)?;
        let now = whole_seconds(now);
        if days == 0 {
            return Err(PkiError::InvalidValidity(
                "a device certificate must be valid for at least 1 day".into(),
            ));
        }
        let ca = self.load_ca()?;
        let not_before = now - BACKDATE;
        let not_after = (now + Duration::days(i64::from(days))).min(ca.not_after);
        if not_after <= now {
            return Err(PkiError::InvalidValidity(format!(
                "the site CA expired at {}",
                ca.not_after
            )));
        }

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let serial = random_serial()?;
        let serial_hex = serial_hex_from_bytes(&serial.to_bytes());
        let uri = format!("{DEVICE_URI_PREFIX}{mac}");
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&mac);
        params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(not_before)?;
        params.not_after = to_offset(not_after)?;
        params.serial_number = Some(serial);
        let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
        check_issued_by(cert.der(), &ca)?;

        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        let mut header = device_header(
            &mac,
            &ca.root_pem,
            &cert_pem,
            &key_pem,
            &serial_hex,
            not_after,
        );
        if let Some(pw) = password {
            header = header_with_password(&header, &mac, pw);
        }

        create_private_dir(out_dir)?;
        let paths = DeviceFiles {
            cert: out_dir.join(format!("{mac}.crt.pem")),
            key: out_dir.join(format!("{mac}.key.pem")),
            ca_cert: out_dir.join(CA_CERT_FILE),
            header: out_dir.join(format!("{mac}.h")),
            password: password.map(|_| out_dir.join(format!("{mac}.password"))),
        };
        if let (Some(path), Some(pw)) = (&paths.password, password) {
            write_atomic(path, format!("{pw}\n").as_bytes(), KEY_MODE)?;
        }
        write_atomic(&paths.key, key_pem.as_bytes(), KEY_MODE)?;
        write_atomic(&paths.cert, cert_pem.as_bytes(), PUBLIC_MODE)?;
        write_atomic(&paths.ca_cert, ca.root_pem.as_bytes(), PUBLIC_MODE)?;
        write_atomic(&paths.header, header.as_bytes(), KEY_MODE)?;
        Ok(IssuedDevice {
            mac,
            serial_hex,
            not_before,
            not_after,
            paths,
        })
    }

    /// The CA that signs: the issuing intermediate when there is one, else
    /// the root.
    fn load_ca(&self) -> Result<LoadedCa, PkiError> {
        if !self.exists() {
            return Err(PkiError::NoCa(self.dir.clone()));
        }
        let root_path = self.ca_cert_path();
        let root_pem = fs::read_to_string(&root_path).map_err(io_err(&root_path))?;
        if self.has_intermediate() {
            let mut ca = self.load_signer(&self.issuing_cert_path(), &self.issuing_key_path())?;
            ca.chain_pem = fs::read_to_string(self.issuing_cert_path())
                .map_err(io_err(&self.issuing_cert_path()))?;
            ca.root_pem = root_pem;
            return Ok(ca);
        }
        let mut ca = self.load_signer(&root_path, &self.ca_key_path())?;
        ca.root_pem = root_pem;
        Ok(ca)
    }

    /// A CA certificate and its key, ready to sign.
    fn load_signer(&self, cert_path: &Path, key_path: &Path) -> Result<LoadedCa, PkiError> {
        let (cert_path, key_path) = (cert_path.to_path_buf(), key_path.to_path_buf());
        let pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Pem {
            path: cert_path.clone(),
            detail: e.to_string(),
        })?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Pem {
            path: key_path.clone(),
            detail: e.to_string(),
        })?;
        let (_, x509) = X509Certificate::from_der(&der)
            .map_err(|e| PkiError::Certificate(format!("{}: {e}", cert_path.display())))?;
        if x509.public_key().raw != key.public_key_der().as_slice() {
            return Err(PkiError::CaKeyMismatch(self.dir.clone()));
        }
        // rcgen signs with an issuer `Certificate`; rebuild one with the same
        // subject and key identifier as the stored CA (check_issued_by()
        // verifies the issuer name really matches).
        let mut params = CertificateParams::default();
        params.distinguished_name = dn_from_x509(x509.subject())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.key_identifier_method = x509
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => {
                    Some(KeyIdMethod::PreSpecified(id.0.to_vec()))
                }
                _ => None,
            })
            .unwrap_or(KeyIdMethod::Sha256);
        let not_after = x509_time(x509.validity().not_after.timestamp())?;
        let subject_raw = x509.subject().as_raw().to_vec();
        let cert = params.self_signed(&key)?;
        Ok(LoadedCa {
            cert,
            key,
            root_pem: String::new(),
            chain_pem: String::new(),
            subject_raw,
            not_after,
        })
    }

    /// Copies the root CA certificate and key to `out` (created 0700; the
    /// key 0600), for keeping offline. Returns the files written.
    pub fn export_root(&self, out: &Path) -> Result<Vec<PathBuf>, PkiError> {
        if !self.ca_cert_path().is_file() {
            return Err(PkiError::NoCa(self.dir.clone()));
        }
        if !self.has_root_key() {
            return Err(PkiError::NoRootKey(self.dir.clone()));
        }
        // Checks the pair before it is relied on offline.
        self.load_signer(&self.ca_cert_path(), &self.ca_key_path())?;
        create_private_dir(out)?;
        let mut written = Vec::new();
        for (from, mode) in [
            (self.ca_cert_path(), PUBLIC_MODE),
            (self.ca_key_path(), KEY_MODE),
        ] {
            let data = fs::read(&from).map_err(io_err(&from))?;
            let to = out.join(from.file_name().unwrap_or_default());
            write_atomic(&to, &data, mode)?;
            written.push(to);
        }
        Ok(written)
    }

    /// Deletes the root CA key from the certs directory (overwritten with
    /// zeros first; flash storage may still keep old blocks). Devices and
    /// the server certificate are then signed by the intermediate; a new
    /// intermediate, or a forced `ca init` replacing it, needs the exported
    /// key. Refused for a CA without an intermediate. Returns the path.
    pub fn remove_root_key(&self) -> Result<PathBuf, PkiError> {
        let path = self.ca_key_path();
        if !self.ca_cert_path().is_file() {
            return Err(PkiError::NoCa(self.dir.clone()));
        }
        if !self.has_root_key() {
            return Err(PkiError::NoRootKey(self.dir.clone()));
        }
        if !self.has_intermediate() {
            return Err(PkiError::RootKeyNeeded(self.dir.clone()));
        }
        // The intermediate must be usable before the root key goes.
        self.load_ca()?;
        let _lock = DirLock::exclusive(&self.dir)?;
        let len = fs::metadata(&path).map_err(io_err(&path))?.len() as usize;
        let wipe = (|| {
            let mut f = OpenOptions::new().write(true).open(&path)?;
            f.write_all(&vec![0u8; len])?;
            f.sync_all()
        })();
        wipe.map_err(io_err(&path))?;
        fs::remove_file(&path).map_err(io_err(&path))?;
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(path)
    }

    // -- revocation ---------------------------------------------------------

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

    // -- TLS ----------------------------------------------------------------

    /// A rustls server configuration (ring provider, TLS 1.2 and 1.3) with
    /// the gateway certificate, requiring a client certificate issued by the
    /// site CA. Handshakes from certificates whose serial is in `revoked` are
    /// refused as well (checked at handshake time, so updating the set takes
    /// effect without rebuilding); callers should still check the device
    /// registry with [`peer_identity`] afterwards. Every handshake is a full
    /// one (no session resumption), so every connection's certificate is
    /// verified. Reads the files on every call, so call it again to pick up
    /// a new server certificate.
    pub fn server_tls_config(
        &self,
        revoked: SharedRevoked,
    ) -> Result<rustls::ServerConfig, PkiError> {
        if !self.exists() {
            return Err(PkiError::NoCa(self.dir.clone()));
        }
        let ca_path = self.ca_cert_path();
        let pem_err = |path: &Path| {
            let path = path.to_path_buf();
            move |e: rustls_pki_types::pem::Error| PkiError::Pem {
                path,
                detail: e.to_string(),
            }
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca_path).map_err(pem_err(&ca_path))? {
            roots
                .add(cert.map_err(pem_err(&ca_path))?)
                .map_err(|e| PkiError::Tls(format!("{}: {e}", ca_path.display())))?;
        }
        let (chain, key) = self.server_identity()?;

        let provider = Arc::new(tls_provider(aes_in_hardware()));
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        // The intermediate that signs devices: a device presents only its
        // own certificate, and the chain to the root is completed here
        // (with this intermediate only: see `verify_client_cert`).
        let mut intermediates = Vec::new();
        if self.issuing_cert_path().is_file() {
            let path = self.issuing_cert_path();
            for cert in CertificateDer::pem_file_iter(&path).map_err(pem_err(&path))? {
                intermediates.push(cert.map_err(pem_err(&path))?);
            }
        }
        let verifier = Arc::new(RevocationCheckingVerifier {
            inner,
            revoked,
            intermediates,
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| PkiError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        config.ignore_client_order = true;
        // No session resumption: rustls does not verify the client
        // certificate of a resumed session again, so a kept TLS 1.2 session
        // id or TLS 1.3 ticket would outlive a revocation or rotation. No
        // session cache (TLS 1.2 ids, TLS 1.3 stateful tickets), no TLS 1.3
        // tickets sent, and rustls' default ticketer, which never issues
        // stateless tickets (a test checks it).
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }

    /// A rustls server configuration for the password listener: the same
    /// gateway certificate and protocol versions, no client certificate.
    pub fn server_tls_config_server_auth_only(&self) -> Result<rustls::ServerConfig, PkiError> {
        if !self.exists() {
            return Err(PkiError::NoCa(self.dir.clone()));
        }
        let (chain, key) = self.server_identity()?;
        let provider = Arc::new(tls_provider(aes_in_hardware()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| PkiError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        config.ignore_client_order = true;
        Ok(config)
    }

    /// The gateway's certificate chain and key.
    fn server_identity(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        let pem_err = |path: &Path| {
            let path = path.to_path_buf();
            move |e: rustls_pki_types::pem::Error| PkiError::Pem {
                path,
                detail: e.to_string(),
            }
        };
        let cert_path = self.server_cert_path();
        let key_path = self.server_key_path();
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .map_err(pem_err(&cert_path))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err(&cert_path))?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(pem_err(&key_path))?;
        Ok((chain, key))
    }
}

/// True when this CPU has AES and carry-less multiplication instructions
/// (x86_64 AES-NI + PCLMULQDQ, aarch64 AES + PMULL), so AES-GCM runs in
/// hardware. A Raspberry Pi 4 (Cortex-A72 in the BCM2711) has neither; a
/// Pi 5 (Cortex-A76) has both.
pub fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// ring's provider with the cipher suites in the gateway's order, which
/// its server configurations apply over the client's (`ignore_client_order`):
/// AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305 where AES-GCM runs in
/// hardware; ChaCha20-Poly1305 first where it does not (software AES is
/// several times slower than ChaCha20 there). rustls clients, like many,
/// put AES-256-GCM first. Every suite stays available: only the choice
/// among those a client offers changes.
pub fn tls_provider(aes_hardware: bool) -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| cipher_rank(s.suite(), aes_hardware));
    provider
}

/// Position of a suite in [`tls_provider`]'s order (stable sort: TLS 1.3
/// and 1.2 suites keep ring's relative order within a rank).
fn cipher_rank(suite: rustls::CipherSuite, aes_hardware: bool) -> u8 {
    use rustls::CipherSuite as C;
    let kind = match suite {
        C::TLS13_AES_128_GCM_SHA256
        | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        C::TLS13_AES_256_GCM_SHA384
        | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        C::TLS13_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 2,
        _ => 3,
    };
    // Rank by kind: [AES-128, AES-256, ChaCha20, other].
    let ranks: [u8; 4] = if aes_hardware {
        [0, 1, 2, 3]
    } else {
        [1, 2, 0, 3]
    };
    ranks[kind]
}

/// WebPKI client verification plus a check of the serial against the
/// revocation set.
#[derive(Debug)]
struct RevocationCheckingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: SharedRevoked,
    /// The site's issuing intermediate, the only one a device chain may
    /// go through (none for a root-only CA).
    intermediates: Vec<CertificateDer<'static>>,
}

impl ClientCertVerifier for RevocationCheckingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[TlsDn] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Only the site's own intermediate may stand between a device
        // certificate and the root: one the client sends is ignored, so an
        // intermediate the gateway no longer uses signs no device in.
        let verified = self
            .inner
            .verify_client_cert(end_entity, &self.intermediates, now)?;
        let id = peer_identity(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        let revoked = self
            .revoked
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if revoked.contains(&id.serial_hex) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---------------------------------------------------------------------------
// helpers

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Rebuilds an rcgen name from a parsed one (string types preserved).
fn dn_from_x509(name: &X509Name<'_>) -> Result<DistinguishedName, PkiError> {
    let bad = |what: &str| PkiError::Certificate(format!("CA subject: {what}"));
    let mut dn = DistinguishedName::new();
    for attr in name.iter_attributes() {
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| bad("attribute OID too large"))?
            .collect();
        let data = attr.attr_value().data;
        let text = std::str::from_utf8(data).map_err(|_| bad("attribute is not text"))?;
        let value = match attr.attr_value().header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_string()),
            Tag::PrintableString => DnValue::PrintableString(text.try_into()?),
            Tag::Ia5String => DnValue::Ia5String(text.try_into()?),
            _ => return Err(bad("unsupported attribute string type")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

fn cert_subject_raw(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, x509) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::Certificate(format!("cannot parse certificate: {e}")))?;
    Ok(x509.subject().as_raw().to_vec())
}

fn cert_issuer_raw(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, x509) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::Certificate(format!("cannot parse certificate: {e}")))?;
    Ok(x509.issuer().as_raw().to_vec())
}

fn check_issued_by(der: &[u8], ca: &LoadedCa) -> Result<(), PkiError> {
    let (_, x509) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::Certificate(format!("cannot parse certificate: {e}")))?;
    if x509.issuer().as_raw() != ca.subject_raw.as_slice() {
        return Err(PkiError::Certificate(
            "issued certificate's issuer name does not match the CA subject".into(),
        ));
    }
    Ok(())
}

fn fill_random(buf: &mut [u8]) -> Result<(), PkiError> {
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(buf)
        .map_err(|_| PkiError::Random)
}

/// A random positive serial of 16 bytes (126 random bits) whose first byte is
/// never zero, so its hex form has no leading zeros.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    fill_random(&mut bytes)?;
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn server_sans(hostnames: &[String], ips: &[IpAddr]) -> Result<Vec<SanType>, PkiError> {
    let mut out: Vec<SanType> = Vec::new();
    let mut push = |san: SanType| {
        if !out.contains(&san) {
            out.push(san);
        }
    };
    for h in hostnames {
        let h = h.trim();
        if let Ok(ip) = h.parse::<IpAddr>() {
            push(SanType::IpAddress(ip));
            continue;
        }
        let valid = !h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !valid {
            return Err(PkiError::InvalidHostname(h.to_string()));
        }
        push(SanType::DnsName(
            h.try_into()
                .map_err(|_| PkiError::InvalidHostname(h.to_string()))?,
        ));
    }
    for ip in ips {
        push(SanType::IpAddress(*ip));
    }
    push(SanType::DnsName("localhost".try_into()?));
    push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    Ok(out)
}

fn san_to_string(san: &SanType) -> String {
    match san {
        SanType::DnsName(n) => n.as_str().to_string(),
        SanType::IpAddress(ip) => ip.to_string(),
        SanType::URI(u) => u.as_str().to_string(),
        SanType::Rfc822Name(m) => m.as_str().to_string(),
        other => format!("{other:?}"),
    }
}

/// This machine's host name (`host` and `host.local`) and the address of the
/// interface carrying the default route (found without sending anything).
fn detect_server_names() -> (Vec<String>, Vec<IpAddr>) {
    let mut hostnames = Vec::new();
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 63
                && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if let Some(h) = host {
        if h != "localhost" {
            hostnames.push(format!("{h}.local"));
            hostnames.push(h);
        }
    }
    let mut ips = Vec::new();
    let primary = UdpSocket::bind(("0.0.0.0", 0))
        .and_then(|s| s.connect(("192.0.2.1", 9)).map(|_| s))
        .and_then(|s| s.local_addr());
    if let Ok(addr) = primary {
        if !addr.ip().is_unspecified() && !addr.ip().is_loopback() {
            ips.push(addr.ip());
        }
    }
    (hostnames, ips)
}

/// An exclusive `flock` on a directory, released when dropped (the file
/// closes). Serialises the read-change-write of a file in it between
/// threads (each takes its own open file) and processes.
struct DirLock {
    _file: fs::File,
}

impl DirLock {
    fn exclusive(dir: &Path) -> Result<DirLock, PkiError> {
        let file = fs::File::open(dir).map_err(io_err(dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            loop {
                // SAFETY: flock on a descriptor this function owns.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(io_err(dir)(e));
                }
            }
        }
        Ok(DirLock { _file: file })
    }
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(DIR_MODE);
    }
    #[cfg(not(unix))]
    let _ = DIR_MODE;
    builder.create(dir).map_err(io_err(dir))
}

/// Writes `data` to a new temporary file created with `mode`, then renames
/// it over `path`.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut file = opts.open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(&tmp);
        return Err(PkiError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    // Make the rename durable; not every platform can open a directory.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// device header

/// The `{MAC}.h` header for Arduino-ESP32 / ESP-IDF firmware.
pub fn device_header(
    mac: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    serial_hex: &str,
    not_after: DateTime<Utc>,
) -> String {
    let guard = format!("BARNGATE_DEVICE_{}_H", c_identifier(mac));
    let mut h = String::new();
    h.push_str(&format!(
        "/* barngate device credentials for {mac}\n\
         \x20* certificate serial {serial_hex}, valid until {}\n\
         \x20* Generated by barngate. KEEP THIS FILE SECRET: it contains the device private key.\n\
         \x20*\n\
         \x20* Arduino-ESP32:\n\
         \x20*   #include <WiFiClientSecure.h>\n\
         \x20*   #include \"{mac}.h\"\n\
         \x20*   WiFiClientSecure net;\n\
         \x20*   net.setCACert(BARNGATE_CA_CERT);\n\
         \x20*   net.setCertificate(BARNGATE_DEVICE_CERT);\n\
         \x20*   net.setPrivateKey(BARNGATE_DEVICE_KEY);\n\
         \x20*   // e.g. PubSubClient mqtt(net); mqtt.setServer(gateway_host, 8883);\n\
         \x20*   //      mqtt.connect(BARNGATE_DEVICE_ID);\n\
         \x20*\n\
         \x20* ESP-IDF (esp_mqtt_client_config_t):\n\
         \x20*   .broker.verification.certificate = BARNGATE_CA_CERT,\n\
         \x20*   .credentials.client_id = BARNGATE_DEVICE_ID,\n\
         \x20*   .credentials.authentication.certificate = BARNGATE_DEVICE_CERT,\n\
         \x20*   .credentials.authentication.key = BARNGATE_DEVICE_KEY,\n\
         \x20*/\n",
        not_after.format("%Y-%m-%d %H:%M:%S UTC")
    ));
    h.push_str(&format!("#ifndef {guard}\n#define {guard}\n\n"));
    h.push_str(&format!(
        "#define BARNGATE_DEVICE_ID {}\n\n",
        c_string_literal(mac)
    ));
    for (name, pem) in [
        ("BARNGATE_CA_CERT", ca_pem),
        ("BARNGATE_DEVICE_CERT", cert_pem),
        ("BARNGATE_DEVICE_KEY", key_pem),
    ] {
        h.push_str(&format!("static const char {name}[] =\n"));
        h.push_str(&c_string_lines(pem));
        h.push_str(";\n\n");
    }
    h.push_str(&format!("#endif /* {guard} */\n"));
    h
}

/// `header` (from [`device_header`]) with the device's MQTT password added,
/// for the password listener (`mqtt.password_listen`).
fn header_with_password(header: &str, mac: &str, password: &str) -> String {
    let guard_end = header.rfind("#endif").unwrap_or(header.len());
    let mut h = header[..guard_end].to_string();
    h.push_str(&format!(
        "/* Password listener (mqtt.password_listen), for firmware without a client\n\
         \x20* certificate: TLS with BARNGATE_CA_CERT only, then\n\
         \x20*   mqtt.connect(BARNGATE_DEVICE_ID, BARNGATE_DEVICE_ID, BARNGATE_MQTT_PASSWORD);\n\
         \x20* (client id and user name = the MAC). */\n\
         #define BARNGATE_MQTT_USERNAME {}\n\
         #define BARNGATE_MQTT_PASSWORD {}\n\n",
        c_string_literal(mac),
        c_string_literal(password)
    ));
    h.push_str(&header[guard_end..]);
    h
}

fn c_identifier(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Escapes text for the inside of a C string literal. Non-printable bytes
/// become 3-digit octal escapes (unlike `\x`, they cannot swallow a
/// following hex digit).
fn c_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            b'?' => out.push_str("\\?"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03o}")),
        }
    }
    out
}

fn c_string_literal(s: &str) -> String {
    format!("\"{}\"", c_escape(s))
}

/// One indented C string literal per line of `text` (each keeping its `\n`).
fn c_string_lines(text: &str) -> String {
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        out.push_str("    ");
        out.push_str(&c_string_literal(line));
        out.push('\n');
    }
    if out.is_empty() {
        out.push_str("    \"\"\n");
    }
    out.pop();
    out
}

// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, ServerConnection};
    use x509_parser::prelude::GeneralName;

    fn t0() -> DateTime<Utc> {
        Utc::now()
    }

    fn new_pki() -> (tempfile::TempDir, Pki) {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new(tmp.path().join("certs"));
        (tmp, pki)
    }

    fn opts(hosts: &[&str], ips: &[IpAddr]) -> CaInitOptions {
        CaInitOptions {
            hostnames: hosts.iter().map(|s| s.to_string()).collect(),
            ips: ips.to_vec(),
            ..Default::default()
        }
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn normalize_mac_accepts_common_forms() {
        for s in [
            "B8F862F9CFB8",
            "b8f862f9cfb8",
            "b8:f8:62:f9:cf:b8",
            "B8-F8-62-F9-CF-B8",
        ] {
            assert_eq!(normalize_mac(s).unwrap(), "B8F862F9CFB8", "{s:?}");
        }
    }

    #[test]
    fn normalize_mac_rejects_everything_else() {
        for s in [
            "",
            "B8F862F9CFB",
            "B8F862F9CFB8A",
            "B8F862F9CFBG",
            "B8:F8-62:F9:CF:B8",
            "B8.F8.62.F9.CF.B8",
            "B8:F8:62:F9:CFB8:",
            "B8F8:62F9:CFB8",
            "B8 F8 62 F9 CF B8",
            "ESP32CAM/B8F862F9CFB8",
            "B8F862F9CFé",
            " B8:F8:62:F9:CF:B8\n",
        ] {
            let err = normalize_mac(s).unwrap_err();
            assert!(matches!(err, PkiError::InvalidMac { .. }), "{s:?}");
            assert!(err.to_string().contains("invalid MAC address"), "{err}");
        }
    }

    #[test]
    fn normalize_serial_forms() {
        assert_eq!(normalize_serial("4A:0B:FF").unwrap(), "4a0bff");
        assert_eq!(normalize_serial("0x004a0bff").unwrap(), "4a0bff");
        assert_eq!(normalize_serial("a0bff").unwrap(), "0a0bff");
        assert_eq!(normalize_serial("0").unwrap(), "00");
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("").is_err());
        assert_eq!(serial_hex_from_bytes(&[0, 0x0a, 0x0b]), "0a0b");
    }

    #[test]
    fn init_ca_creates_files_and_refuses_twice() {
        let (_tmp, pki) = new_pki();
        assert!(!pki.exists());
        let ip: IpAddr = "192.168.1.50".parse().unwrap();
        let report = pki
            .init_ca(&opts(&["barngate.local", "10.0.0.9"], &[ip]))
            .unwrap();
        assert!(pki.exists());
        for p in [
            pki.ca_cert_path(),
            pki.ca_key_path(),
            pki.issuing_cert_path(),
            pki.issuing_key_path(),
            pki.server_cert_path(),
            pki.server_key_path(),
        ] {
            assert!(p.is_file(), "{}", p.display());
        }
        #[cfg(unix)]
        {
            assert_eq!(mode(&pki.ca_key_path()), 0o600);
            assert_eq!(mode(&pki.issuing_key_path()), 0o600);
            assert_eq!(mode(&pki.server_key_path()), 0o600);
            assert_eq!(mode(pki.dir()), 0o700);
        }
        assert_eq!(
            report.server.sans,
            [
                "barngate.local",
                "10.0.0.9",
                "192.168.1.50",
                "localhost",
                "127.0.0.1",
                "::1"
            ]
        );
        assert_eq!(report.ca_fingerprint_sha256.len(), 32 * 3 - 1);
        assert!(report.server.not_after < report.ca_not_after);

        // CA certificate contents.
        let ca_pem = fs::read(pki.ca_cert_path()).unwrap();
        let ca_der = CertificateDer::from_pem_slice(&ca_pem).unwrap();
        let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
        assert_eq!(
            ca.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            CA_COMMON_NAME
        );
        assert!(ca.basic_constraints().unwrap().unwrap().value.ca);
        let ku = ca.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let years = (ca.validity().not_after.timestamp() - ca.validity().not_before.timestamp())
            / 86_400
            / 365;
        assert_eq!(years, 10);

        // The intermediate: signed by the root, path length 0.
        let int_pem = fs::read(pki.issuing_cert_path()).unwrap();
        let int_der = CertificateDer::from_pem_slice(&int_pem).unwrap();
        let (_, int) = X509Certificate::from_der(&int_der).unwrap();
        assert_eq!(int.issuer().as_raw(), ca.subject().as_raw());
        let bc = int.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca && bc.path_len_constraint == Some(0));
        assert_eq!(
            ca.basic_constraints()
                .unwrap()
                .unwrap()
                .value
                .path_len_constraint,
            Some(1)
        );

        // Server certificate: signed by the intermediate, which follows it
        // in the file; SANs and EKU.
        let srv_pem = fs::read(pki.server_cert_path()).unwrap();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(&srv_pem)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], int_der);
        let srv_der = chain[0].clone();
        let (_, srv) = X509Certificate::from_der(&srv_der).unwrap();
        assert_eq!(srv.issuer().as_raw(), int.subject().as_raw());
        assert!(srv.extended_key_usage().unwrap().unwrap().value.server_auth);
        let san = srv.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san
            .general_names
            .iter()
            .map(|g| match g {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(b) => format!("ip{}", b.len()),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            ["barngate.local", "ip4", "ip4", "localhost", "ip4", "ip16"]
        );

        let err = pki.init_ca(&CaInitOptions::default()).unwrap_err();
        assert!(matches!(err, PkiError::CaExists(_)), "{err}");
        assert_eq!(fs::read(pki.ca_cert_path()).unwrap(), ca_pem);

        let forced = CaInitOptions {
            force: true,
            ..Default::default()
        };
        pki.init_ca(&forced).unwrap();
        assert_ne!(fs::read(pki.ca_cert_path()).unwrap(), ca_pem);
    }

    /// With the root key exported and removed, devices and server
    /// certificates are still issued (by the intermediate) and verified
    /// (up to the root); the root key comes back from the export.
    #[test]
    fn the_root_key_can_be_exported_and_removed() {
        let (tmp, pki, _dev, ca_pem, _, _) = site_with_device();
        let out = tmp.path().join("offline");
        let files = pki.export_root(&out).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(fs::read(out.join("ca.crt.pem")).unwrap(), ca_pem.as_bytes());
        assert_eq!(
            fs::read(out.join("ca.key.pem")).unwrap(),
            fs::read(pki.ca_key_path()).unwrap()
        );
        #[cfg(unix)]
        {
            assert_eq!(mode(&out.join("ca.key.pem")), 0o600);
            assert_eq!(mode(&out), 0o700);
        }
        pki.remove_root_key().unwrap();
        assert!(!pki.ca_key_path().exists());
        assert!(pki.exists(), "the intermediate still signs");
        assert!(!pki.ensure_ca().unwrap(), "no new CA on start");
        assert!(matches!(pki.remove_root_key(), Err(PkiError::NoRootKey(_))));
        assert!(matches!(pki.export_root(&out), Err(PkiError::NoRootKey(_))));

        let dev = pki
            .issue_device("B8F862F9CFB9", 825, &tmp.path().join("dev2"))
            .unwrap();
        assert_eq!(fs::read_to_string(&dev.paths.ca_cert).unwrap(), ca_pem);
        pki.issue_server_cert(&["barn.local".into()], &[], None)
            .unwrap();
        let server = Arc::new(
            pki.server_tls_config(pki.shared_revoked().unwrap())
                .unwrap(),
        );
        let cert = fs::read_to_string(&dev.paths.cert).unwrap();
        let key = fs::read_to_string(&dev.paths.key).unwrap();
        for tls12 in [false, true] {
            let s = handshake(
                client_config(&ca_pem, Some((&cert, &key)), tls12),
                server.clone(),
            )
            .unwrap_or_else(|e| panic!("tls12={tls12}: {e}"));
            let id = peer_identity(&s.peer_certificates().unwrap()[0]).unwrap();
            assert_eq!(id.serial_hex, dev.serial_hex);
        }
    }

    /// A device certificate from another intermediate under the same root
    /// (one the site no longer uses, or one made with a stolen root key) is
    /// refused even when the device sends that intermediate along.
    #[test]
    fn only_the_sites_own_intermediate_signs_devices_in() {
        let (_tmp, pki, _dev, ca_pem, _, _) = site_with_device();
        let root = pki
            .load_signer(&pki.ca_cert_path(), &pki.ca_key_path())
            .unwrap();
        let other_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = dn("another issuing CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.use_authority_key_identifier_extension = true;
        let other = p.signed_by(&other_key, &root.cert, &root.key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = dn("B8F862F9CFB8");
        p.subject_alt_names = vec![SanType::URI(
            format!("{DEVICE_URI_PREFIX}B8F862F9CFB8")
                .try_into()
                .unwrap(),
        )];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial().unwrap());
        let leaf = p.signed_by(&key, &other, &other_key).unwrap();
        let server = Arc::new(
            pki.server_tls_config(pki.shared_revoked().unwrap())
                .unwrap(),
        );
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let client =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(rustls::DEFAULT_VERSIONS)
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    vec![leaf.der().clone(), other.der().clone()],
                    PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
                )
                .unwrap();
        let err = handshake(Arc::new(client), server).unwrap_err();
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );
    }

    /// A CA from before the intermediate (root only) keeps issuing with the
    /// root and keeps its root key.
    #[test]
    fn a_root_only_ca_keeps_issuing_with_the_root() {
        let (tmp, pki) = new_pki();
        pki.init_ca(&CaInitOptions::default()).unwrap();
        fs::remove_file(pki.issuing_cert_path()).unwrap();
        fs::remove_file(pki.issuing_key_path()).unwrap();
        pki.issue_server_cert(&[], &[], None).unwrap();
        let srv = fs::read(pki.server_cert_path()).unwrap();
        assert_eq!(CertificateDer::pem_slice_iter(&srv).count(), 1);
        let dev = pki
            .issue_device("B8F862F9CFB8", 825, &tmp.path().join("dev"))
            .unwrap();
        let der = CertificateDer::from_pem_file(&dev.paths.cert).unwrap();
        let (_, x) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(
            x.issuer()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            CA_COMMON_NAME
        );
        let ca_pem = pki.ca_cert_pem().unwrap();
        let server = Arc::new(
            pki.server_tls_config(pki.shared_revoked().unwrap())
                .unwrap(),
        );
        let cert = fs::read_to_string(&dev.paths.cert).unwrap();
        let key = fs::read_to_string(&dev.paths.key).unwrap();
        handshake(client_config(&ca_pem, Some((&cert, &key)), false), server).unwrap();
        assert!(matches!(
            pki.remove_root_key(),
            Err(PkiError::RootKeyNeeded(_))
        ));
        assert!(pki.ca_key_path().is_file());
    }

    #[test]
    fn init_ca_rejects_bad_hostname() {
        let (_tmp, pki) = new_pki();
        let err = pki.init_ca(&opts(&["bad host"], &[])).unwrap_err();
        assert!(matches!(err, PkiError::InvalidHostname(_)));
        assert!(!pki.exists());
    }

    #[test]
    fn ensure_ca_creates_once_and_repairs_server_cert() {
        let (_tmp, pki) = new_pki();
        assert!(pki.ensure_ca().unwrap());
        let ca = fs::read(pki.ca_cert_path()).unwrap();
        assert!(!pki.ensure_ca().unwrap());
        fs::remove_file(pki.server_key_path()).unwrap();
        assert!(!pki.ensure_ca().unwrap());
        assert!(pki.server_key_path().is_file());
        assert_eq!(fs::read(pki.ca_cert_path()).unwrap(), ca);
    }

    #[test]
    fn issue_device_without_ca_fails() {
        let (tmp, pki) = new_pki();
        let err = pki
            .issue_device("B8F862F9CFB8", 825, &tmp.path().join("out"))
            .unwrap_err();
        assert!(matches!(err, PkiError::NoCa(_)), "{err}");
    }

    /// Decodes the C string literals of `name` in the header, checking that
    /// every line is one `"…\n"` literal of PEM characters.
    fn header_constant(header: &str, name: &str) -> String {
        let start = format!("static const char {name}[] =\n");
        let body = header.split(&start).nth(1).expect(name);
        let body = &body[..body.find(';').unwrap()];
        let mut out = String::new();
        for line in body.lines() {
            let lit = line
                .trim()
                .strip_prefix('"')
                .and_then(|l| l.strip_suffix("\\n\""))
                .unwrap_or_else(|| panic!("bad literal line {line:?}"));
            assert!(
                lit.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/= -".contains(&b)),
                "unexpected characters in {lit:?}"
            );
            out.push_str(lit);
            out.push('\n');
        }
        out
    }

    #[test]
    fn issue_device_writes_files_and_header() {
        let (tmp, pki) = new_pki();
        pki.init_ca(&CaInitOptions::default()).unwrap();
        let out = tmp.path().join("out").join("dev");
        let issued = pki.issue_device("b8:f8:62:f9:cf:b8", 825, &out).unwrap();
        assert_eq!(issued.mac, "B8F862F9CFB8");
        assert_eq!(issued.paths.cert, out.join("B8F862F9CFB8.crt.pem"));
        assert_eq!(issued.paths.key, out.join("B8F862F9CFB8.key.pem"));
        assert_eq!(issued.paths.ca_cert, out.join("ca.crt.pem"));
        assert_eq!(issued.paths.header, out.join("B8F862F9CFB8.h"));
        #[cfg(unix)]
        {
            assert_eq!(mode(&issued.paths.key), 0o600);
            assert_eq!(mode(&issued.paths.header), 0o600);
        }
        assert_eq!(issued.serial_hex.len(), 32);
        assert_eq!(
            normalize_serial(&issued.serial_hex).unwrap(),
            issued.serial_hex
        );
        let days = (issued.not_after - issued.not_before).num_days();
        assert_eq!(days, 826); // 825 + 1 day backdating

        let cert_pem = fs::read_to_string(&issued.paths.cert).unwrap();
        let key_pem = fs::read_to_string(&issued.paths.key).unwrap();
        let ca_pem = fs::read_to_string(&issued.paths.ca_cert).unwrap();
        assert_eq!(ca_pem, pki.ca_cert_pem().unwrap());

        let header = fs::read_to_string(&issued.paths.header).unwrap();
        assert!(header.contains("#ifndef BARNGATE_DEVICE_B8F862F9CFB8_H\n"));
        assert!(header.contains("#define BARNGATE_DEVICE_B8F862F9CFB8_H\n"));
        assert!(header
            .trim_end()
            .ends_with("#endif /* BARNGATE_DEVICE_B8F862F9CFB8_H */"));
        assert!(header.contains("#define BARNGATE_DEVICE_ID \"B8F862F9CFB8\"\n"));
        for call in ["setCACert(", "setCertificate(", "setPrivateKey("] {
            assert!(header.contains(call), "{call}");
        }
        assert_eq!(header_constant(&header, "BARNGATE_CA_CERT"), ca_pem);
        assert_eq!(header_constant(&header, "BARNGATE_DEVICE_CERT"), cert_pem);
        assert_eq!(header_constant(&header, "BARNGATE_DEVICE_KEY"), key_pem);

        // Identity and certificate contents.
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let id = peer_identity(&der).unwrap();
        assert_eq!(id.mac, "B8F862F9CFB8");
        assert_eq!(id.serial_hex, issued.serial_hex);
        assert_eq!(id.not_after, issued.not_after);
        let (_, x509) = X509Certificate::from_der(&der).unwrap();
        assert!(
            x509.extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .client_auth
        );
        assert!(
            !x509
                .extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .server_auth
        );
        let san = x509.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(
            san.general_names,
            [GeneralName::URI("urn:barngate:device:B8F862F9CFB8")]
        );

        // Re-issue: new serial and key.
        let again = pki.issue_device("B8F862F9CFB8", 30, &out).unwrap();
        assert_ne!(again.serial_hex, issued.serial_hex);
        assert_ne!(fs::read_to_string(&again.paths.key).unwrap(), key_pem);
        assert_eq!((again.not_after - again.not_before).num_days(), 31);

        assert!(matches!(
            pki.issue_device("nope", 825, &out),
            Err(PkiError::InvalidMac { .. })
        ));
        assert!(matches!(
            pki.issue_device("B8F862F9CFB8", 0, &out),
            Err(PkiError::InvalidValidity(_))
        ));
    }

    #[test]
    fn device_validity_is_clamped_to_ca() {
        let (tmp, pki) = new_pki();
        let report = pki.init_ca(&CaInitOptions::default()).unwrap();
        let issued = pki
            .issue_device("B8F862F9CFB8", 20_000, tmp.path())
            .unwrap();
        assert_eq!(issued.not_after, report.ca_not_after);
    }

    #[test]
    fn header_escapes_c_specials() {
        assert_eq!(
            c_string_lines("a\"b\\c?\n\x01\n"),
            "    \"a\\\"b\\\\c\\?\\n\"\n    \"\\001\\n\""
        );
    }

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

    // -- TLS handshakes -----------------------------------------------------

    fn client_config(
        ca_pem: &str,
        cert_and_key: Option<(&str, &str)>,
        tls12_only: bool,
    ) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            rustls::DEFAULT_VERSIONS
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
        Arc::new(match cert_and_key {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        })
    }

    /// Runs a handshake in memory. Returns the server connection on success,
    /// the first error (server side checked first) otherwise.
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<ServerConnection, rustls::Error> {
        let mut c = ClientConnection::new(client, ServerName::try_from("localhost").unwrap())?;
        let mut s = ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() {
                return Ok(s);
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn cipher_order_follows_the_hardware() {
        use rustls::CipherSuite as C;
        let order = |aes| -> Vec<C> {
            tls_provider(aes)
                .cipher_suites
                .iter()
                .map(|s| s.suite())
                .collect()
        };
        let with = order(true);
        let tls13 = |v: &[C]| -> Vec<C> {
            v.iter()
                .copied()
                .filter(|c| format!("{c:?}").starts_with("TLS13_"))
                .collect()
        };
        assert_eq!(
            tls13(&with),
            &[
                C::TLS13_AES_128_GCM_SHA256,
                C::TLS13_AES_256_GCM_SHA384,
                C::TLS13_CHACHA20_POLY1305_SHA256
            ]
        );
        let without = order(false);
        assert_eq!(
            tls13(&without),
            &[
                C::TLS13_CHACHA20_POLY1305_SHA256,
                C::TLS13_AES_128_GCM_SHA256,
                C::TLS13_AES_256_GCM_SHA384
            ]
        );
        let pos = |v: &[C], c: C| v.iter().position(|x| *x == c).unwrap();
        // TLS 1.2 suites follow the same rule.
        assert!(
            pos(&with, C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
                < pos(&with, C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)
        );
        assert!(
            pos(&without, C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)
                < pos(&without, C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
        );
        // Nothing is dropped.
        assert_eq!(
            with.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
        assert_eq!(without.len(), with.len());
    }

    /// A site CA with one device certificate: (temp dir, pki, device, CA
    /// PEM, device certificate PEM, device key PEM).
    fn site_with_device() -> (tempfile::TempDir, Pki, IssuedDevice, String, String, String) {
        let (tmp, pki) = new_pki();
        pki.init_ca(&CaInitOptions::default()).unwrap();
        let dev = pki
            .issue_device("B8F862F9CFB8", 825, &tmp.path().join("dev"))
            .unwrap();
        let ca_pem = pki.ca_cert_pem().unwrap();
        let cert = fs::read_to_string(&dev.paths.cert).unwrap();
        let key = fs::read_to_string(&dev.paths.key).unwrap();
        (tmp, pki, dev, ca_pem, cert, key)
    }

    #[test]
    fn the_server_picks_its_own_cipher_order_over_the_clients() {
        let (_tmp, pki, _dev, ca_pem, cert, key) = site_with_device();
        let server = Arc::new(
            pki.server_tls_config(pki.shared_revoked().unwrap())
                .unwrap(),
        );
        let want = tls_provider(aes_in_hardware());
        for tls12 in [false, true] {
            // rustls' client offers AES-256-GCM first.
            let s = handshake(
                client_config(&ca_pem, Some((&cert, &key)), tls12),
                server.clone(),
            )
            .unwrap();
            let got = s.negotiated_cipher_suite().unwrap();
            let first = want
                .cipher_suites
                .iter()
                .find(|c| c.version() == got.version())
                .unwrap();
            assert_eq!(got.suite(), first.suite(), "tls12={tls12}");
        }
    }

    #[test]
    fn tls_handshake_requires_a_valid_unrevoked_device_cert() {
        let (tmp, pki, dev, ca_pem, cert, key) = site_with_device();
        let revoked = pki.shared_revoked().unwrap();
        let server = Arc::new(pki.server_tls_config(revoked.clone()).unwrap());

        // Valid device, TLS 1.3 and TLS 1.2; the server sees the identity.
        for tls12 in [false, true] {
            let s = handshake(
                client_config(&ca_pem, Some((&cert, &key)), tls12),
                server.clone(),
            )
            .unwrap_or_else(|e| panic!("tls12={tls12}: {e}"));
            let expected = if tls12 {
                rustls::ProtocolVersion::TLSv1_2
            } else {
                rustls::ProtocolVersion::TLSv1_3
            };
            assert_eq!(s.protocol_version(), Some(expected));
            let peer = &s.peer_certificates().unwrap()[0];
            let id = peer_identity(peer).unwrap();
            assert_eq!(id.mac, "B8F862F9CFB8");
            assert_eq!(id.serial_hex, dev.serial_hex);
        }

        // No client certificate.
        let err = handshake(client_config(&ca_pem, None, false), server.clone()).unwrap_err();
        assert_eq!(err, rustls::Error::NoCertificatesPresented);

        // A device certificate from another CA.
        let (tmp2, other) = new_pki();
        other.init_ca(&CaInitOptions::default()).unwrap();
        let foreign = other
            .issue_device("B8F862F9CFB8", 825, &tmp2.path().join("dev"))
            .unwrap();
        let fcert = fs::read_to_string(&foreign.paths.cert).unwrap();
        let fkey = fs::read_to_string(&foreign.paths.key).unwrap();
        let err = handshake(
            client_config(&ca_pem, Some((&fcert, &fkey)), false),
            server.clone(),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );

        // The gateway's own server certificate is not a client certificate.
        let scert = fs::read_to_string(pki.server_cert_path()).unwrap();
        let skey = fs::read_to_string(pki.server_key_path()).unwrap();
        let err = handshake(
            client_config(&ca_pem, Some((&scert, &skey)), false),
            server.clone(),
        )
        .unwrap_err();
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );

        // Revocation takes effect on the live config.
        assert!(pki.revoke_serial(&dev.mac, &dev.serial_hex).unwrap());
        *revoked.write().unwrap() = pki.load_revoked().unwrap();
        let err = handshake(
            client_config(&ca_pem, Some((&cert, &key)), false),
            server.clone(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        );

        // A re-issued certificate (new serial) works again.
        let new = pki
            .issue_device("B8F862F9CFB8", 825, &tmp.path().join("dev"))
            .unwrap();
        let cert = fs::read_to_string(&new.paths.cert).unwrap();
        let key = fs::read_to_string(&new.paths.key).unwrap();
        handshake(client_config(&ca_pem, Some((&cert, &key)), false), server).unwrap();
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

    /// Resumption would skip the client certificate check: the device
    /// listener's config keeps no sessions and issues no tickets.
    #[test]
    fn the_device_listener_offers_no_session_resumption() {
        let (_tmp, pki, ..) = site_with_device();
        let config = pki
            .server_tls_config(pki.shared_revoked().unwrap())
            .unwrap();
        assert!(!config.ticketer.enabled(), "stateless tickets");
        assert_eq!(config.send_tls13_tickets, 0);
        assert!(!config.session_storage.can_cache(), "session cache");
        let id = vec![1u8; 32];
        assert!(!config.session_storage.put(id.clone(), vec![2u8; 8]));
        assert!(config.session_storage.get(&id).is_none());
    }

    #[test]
    fn new_server_cert_keeps_devices_valid() {
        let (tmp, pki) = new_pki();
        pki.init_ca(&CaInitOptions::default()).unwrap();
        let dev = pki.issue_device("B8F862F9CFB8", 825, tmp.path()).unwrap();
        let report = pki
            .issue_server_cert(&["gw.example".to_string()], &[], Some(t0()))
            .unwrap();
        assert_eq!(report.sans[0], "gw.example");
        let server = Arc::new(
            pki.server_tls_config(pki.shared_revoked().unwrap())
                .unwrap(),
        );
        let cert = fs::read_to_string(&dev.paths.cert).unwrap();
        let key = fs::read_to_string(&dev.paths.key).unwrap();
        handshake(
            client_config(&pki.ca_cert_pem().unwrap(), Some((&cert, &key)), false),
            server,
        )
        .unwrap();
    }

    #[test]
    fn server_tls_config_without_ca_fails() {
        let (_tmp, pki) = new_pki();
        let err = pki
            .server_tls_config(Arc::new(RwLock::new(HashSet::new())))
            .unwrap_err();
        assert!(matches!(err, PkiError::NoCa(_)));
    }
}
