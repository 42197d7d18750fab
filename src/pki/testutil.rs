//! Shared helpers of the PKI unit tests: a temporary site, in-memory TLS
//! handshakes.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::ca::CaInitOptions;
use super::dir::Pki;
use super::issue::IssuedDevice;

pub(super) fn t0() -> DateTime<Utc> {
    Utc::now()
}

pub(super) fn new_pki() -> (tempfile::TempDir, Pki) {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path().join("certs"));
    (tmp, pki)
}

#[cfg(unix)]
pub(super) fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

pub(super) fn client_config(
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

/// Moves everything `from` has to send into `to`, which processes it.
fn transfer<A: rustls::SideData, B: rustls::SideData>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
) -> Result<(), rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets()?;
    }
    Ok(())
}

/// Runs a handshake in memory. Returns the server connection on success,
/// the first error (server side checked first) otherwise.
pub(super) fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<rustls::ServerConfig>,
) -> Result<ServerConnection, rustls::Error> {
    let mut c = ClientConnection::new(client, ServerName::try_from("localhost").unwrap())?;
    let mut s = ServerConnection::new(server)?;
    for _ in 0..10 {
        transfer(&mut c, &mut s)?;
        transfer(&mut s, &mut c)?;
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() {
            return Ok(s);
        }
    }
    panic!("handshake did not finish");
}

/// A site CA with one device certificate: (temp dir, pki, device, CA
/// PEM, device certificate PEM, device key PEM).
pub(super) fn site_with_device() -> (tempfile::TempDir, Pki, IssuedDevice, String, String, String) {
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
