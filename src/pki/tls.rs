//! rustls server configurations: the device listener's (a client
//! certificate from the site CA, checked against the revocation set) and
//! the password listener's, and the cipher-suite order they share.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName as TlsDn, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use super::dir::Pki;
use super::error::PkiError;
use super::identity::peer_identity;
use super::revocation::SharedRevoked;

impl Pki {
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

/// The CA certificates in a PEM file (e.g. `upstream.pg_ca`); at least one.
pub fn read_ca_file(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read CA certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::ca::CaInitOptions;
    use crate::pki::issue::DEVICE_URI_PREFIX;
    use crate::pki::testutil::*;
    use crate::pki::x509::{dn, random_serial};
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use rustls::ClientConfig;
    use std::collections::HashSet;
    use std::fs;
    use std::sync::RwLock;

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
    fn server_tls_config_without_ca_fails() {
        let (_tmp, pki) = new_pki();
        let err = pki
            .server_tls_config(Arc::new(RwLock::new(HashSet::new())))
            .unwrap_err();
        assert!(matches!(err, PkiError::NoCa(_)));
    }
}
