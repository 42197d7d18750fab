//! `bench ciphers`: the cost of TLS record protection per cipher suite.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `bench ciphers`: seal (client) and open (server) `records` records of
/// `size` bytes per TLS 1.3 suite, over an in-memory rustls connection pair.
pub fn ciphers(size: usize, records: usize, rounds: usize) {
    use rustls::CipherSuite as C;
    use std::io::Read;
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let cert_der = cert.der().clone();
    let key_der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    let suites = [
        C::TLS13_AES_128_GCM_SHA256,
        C::TLS13_AES_256_GCM_SHA384,
        C::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    let only = |suite: C| {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites.retain(|s| s.suite() == suite);
        Arc::new(p)
    };
    let aes = barngate::pki::aes_in_hardware();
    let preferred = barngate::pki::tls_provider(aes).cipher_suites[0].suite();
    println!(
        "AES-GCM in hardware: {aes}; the gateway prefers {preferred:?}; {records} records of {size} B per suite, best of {rounds}"
    );
    let payload = vec![0x5au8; size];
    let mut best = vec![(f64::MAX, f64::MAX); suites.len()];
    for _ in 0..rounds {
        for (i, suite) in suites.iter().enumerate() {
            let server_cfg = Arc::new(
                rustls::ServerConfig::builder_with_provider(only(*suite))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("versions")
                    .with_no_client_auth()
                    .with_single_cert(vec![cert_der.clone()], key_der.clone_key())
                    .expect("server config"),
            );
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert_der.clone()).expect("root");
            let client_cfg = Arc::new(
                rustls::ClientConfig::builder_with_provider(only(*suite))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            );
            let mut c = rustls::Connection::from(
                rustls::ClientConnection::new(
                    client_cfg,
                    rustls_pki_types::ServerName::try_from("localhost").expect("name"),
                )
                .expect("client"),
            );
            let mut s = rustls::Connection::from(
                rustls::ServerConnection::new(server_cfg).expect("server"),
            );
            // Everything `from` has to send, read and processed by `to`.
            fn pump(
                from: &mut rustls::Connection,
                to: &mut rustls::Connection,
                wire: &mut Vec<u8>,
            ) {
                wire.clear();
                while from.wants_write() {
                    from.write_tls(wire).expect("write_tls");
                }
                let mut rd = &wire[..];
                while !rd.is_empty() {
                    to.read_tls(&mut rd).expect("read_tls");
                    to.process_new_packets().expect("TLS");
                }
            }
            let mut wire = Vec::new();
            while c.is_handshaking() || s.is_handshaking() {
                pump(&mut c, &mut s, &mut wire);
                pump(&mut s, &mut c, &mut wire);
            }
            let (mut seal, mut open) = (Duration::ZERO, Duration::ZERO);
            let mut out = vec![0u8; size + 64];
            for _ in 0..records {
                wire.clear();
                let t = Instant::now();
                c.writer().write_all(&payload).expect("seal");
                while c.wants_write() {
                    c.write_tls(&mut wire).expect("seal");
                }
                let t1 = Instant::now();
                let mut rd = &wire[..];
                while !rd.is_empty() {
                    s.read_tls(&mut rd).expect("open");
                    s.process_new_packets().expect("open");
                }
                let mut got = 0;
                while got < size {
                    got += s.reader().read(&mut out).expect("plaintext");
                }
                open += t1.elapsed();
                seal += t1 - t;
            }
            let per = |d: Duration| d.as_nanos() as f64 / records as f64;
            best[i].0 = best[i].0.min(per(seal));
            best[i].1 = best[i].1.min(per(open));
        }
    }
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>9}",
        "suite", "seal ns", "open ns", "both ns", "MB/s"
    );
    for (suite, (seal, open)) in suites.iter().zip(&best) {
        let both = seal + open;
        println!(
            "{:<34} {:>10.0} {:>10.0} {:>10.0} {:>9.0}",
            format!("{suite:?}"),
            seal,
            open,
            both,
            size as f64 / both * 1e3
        );
    }
}
