//! What the CA signs: the gateway server certificate and device client
//! certificates, and the CA loaded from disk to sign them.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use super::dir::{Pki, CA_CERT_FILE};
use super::error::{io_err, PkiError};
use super::files::{create_private_dir, write_atomic, KEY_MODE, PUBLIC_MODE};
use super::header::{device_header, header_with_password};
use super::identity::{normalize_mac, serial_hex_from_bytes};
use super::x509::{dn, dn_from_x509, random_serial, to_offset, whole_seconds, x509_time, BACKDATE};

/// Default validity of a device certificate, in days.
pub const DEFAULT_DEVICE_DAYS: u32 = 825;
/// Validity of the gateway server certificate, in days (5 years).
pub const SERVER_VALIDITY_DAYS: i64 = 1827;
/// Prefix of the URI SAN put in device certificates (`urn:barngate:device:{MAC}`).
pub const DEVICE_URI_PREFIX: &str = "urn:barngate:device:";

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

/// The CA that signs (the intermediate, or the root of a CA without one).
pub(super) struct LoadedCa {
    pub(super) cert: rcgen::Certificate,
    pub(super) key: KeyPair,
    /// The root certificate, PEM: what devices trust.
    pub(super) root_pem: String,
    /// What follows a certificate it signs in a chain (the intermediate's
    /// PEM; empty when the root signs).
    pub(super) chain_pem: String,
    pub(super) subject_raw: Vec<u8>,
    pub(super) not_after: DateTime<Utc>,
}

impl Pki {
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

    pub(super) fn write_server_cert(
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
    pub(super) fn load_ca(&self) -> Result<LoadedCa, PkiError> {
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
    pub(super) fn load_signer(
        &self,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<LoadedCa, PkiError> {
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

pub(super) fn server_sans(hostnames: &[String], ips: &[IpAddr]) -> Result<Vec<SanType>, PkiError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::ca::CaInitOptions;
    use crate::pki::identity::{normalize_serial, peer_identity};
    use crate::pki::testutil::*;
    use std::sync::Arc;
    use x509_parser::prelude::GeneralName;

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
}
