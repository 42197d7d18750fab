//! Mutual TLS for the devices: the site CA and their certificates, issued
//! before a gateway starts, and each device's client configuration.

use crate::cli::Common;
use barngate::pki::{CaInitOptions, Pki};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub fn tls_client(ca: &[u8], dir: &Path, id: &str) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots
            .add(c.map_err(|e| format!("CA: {e}"))?)
            .map_err(|e| format!("CA: {e}"))?;
    }
    let cert_path = dir.join(format!("{id}.crt.pem"));
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let key_path = dir.join(format!("{id}.key.pem"));
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| e.to_string())
}

/// Creates the site CA in `<data_dir>/certs` (as `barngate ca init` would)
/// and issues a client certificate for every id into `<data_dir>/devices`,
/// on all cores. Returns the CA PEM and the certificate directory.
pub fn provision_tls(data_dir: &Path, ids: &[String]) -> (Vec<u8>, PathBuf) {
    let t0 = Instant::now();
    let pki = Pki::new(data_dir.join("certs"));
    if !pki.exists() {
        pki.init_ca(&CaInitOptions::default()).expect("init CA");
    }
    let out = data_dir.join("devices");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for part in ids.chunks(ids.len().div_ceil(threads).max(1)) {
            let (pki, out) = (&pki, &out);
            s.spawn(move || {
                for id in part {
                    if !out.join(format!("{id}.crt.pem")).exists() {
                        pki.issue_device(id, 30, out).expect("issue device cert");
                    }
                }
            });
        }
    });
    eprintln!(
        "mTLS: CA in {}, {} device certificates in {:.1} s",
        pki.dir().display(),
        ids.len(),
        t0.elapsed().as_secs_f64()
    );
    let ca = std::fs::read(pki.ca_cert_path()).expect("read CA cert");
    (ca, out)
}

/// The device-side TLS settings for the gateway in `dir` (CA and device
/// certificates created there first), or `None` with `--gateway-plain`.
pub fn gateway_tls(c: &Common, dir: &Path, ids: &[String]) -> Option<(Vec<u8>, PathBuf)> {
    (!c.gateway_plain).then(|| provision_tls(dir, ids))
}
