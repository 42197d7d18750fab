//! The site CA: the root, its issuing intermediate, and the custody of the
//! root key.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, UdpSocket};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use super::dir::Pki;
use super::error::{io_err, PkiError};
use super::files::{create_private_dir, write_atomic, DirLock, KEY_MODE, PUBLIC_MODE};
use super::identity::sha256_fingerprint;
use super::issue::{server_sans, LoadedCa, ServerCertReport};
use super::x509::{
    cert_issuer_raw, cert_subject_raw, fill_random, random_serial, to_offset, whole_seconds,
    BACKDATE, ORGANIZATION,
};

/// Subject CN of the issuing intermediate CA.
pub const ISSUING_COMMON_NAME: &str = "barngate issuing CA";
/// Subject CN of the site CA.
pub const CA_COMMON_NAME: &str = "barngate site CA";
/// Validity of the site CA, in days (10 years).
pub const CA_VALIDITY_DAYS: i64 = 3653;

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

impl Pki {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::identity::peer_identity;
    use crate::pki::testutil::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    use std::sync::Arc;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Name};

    /// The name's first common name.
    fn common_name<'a>(name: &'a X509Name) -> &'a str {
        name.iter_common_name().next().unwrap().as_str().unwrap()
    }

    fn opts(hosts: &[&str], ips: &[IpAddr]) -> CaInitOptions {
        CaInitOptions {
            hostnames: hosts.iter().map(|s| s.to_string()).collect(),
            ips: ips.to_vec(),
            ..Default::default()
        }
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
        assert_eq!(common_name(ca.subject()), CA_COMMON_NAME);
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
        assert_eq!(common_name(x.issuer()), CA_COMMON_NAME);
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
}
