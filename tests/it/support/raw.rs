//! A raw MQTT 3.1.1 client, over plain TCP or mutual TLS, for the tests
//! that write and read packets byte by byte; the packet builders and
//! parsers they use.

use super::{DeviceCerts, WAIT};
use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Connect, Filter, Packet, Protocol, QoS, RetainForwardRule, Subscribe};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBCOMP: u8 = 7;
pub const SUBACK: u8 = 9;
pub const UNSUBACK: u8 = 11;
pub const PINGRESP: u8 = 13;

/// The connection under a [`Raw`]: plain TCP or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A raw MQTT 3.1.1 client.
pub struct Raw {
    stream: Box<dyn Stream>,
    buf: BytesMut,
}

impl Raw {
    /// A plain TCP connection to `addr` (the loopback plaintext listener).
    pub async fn open(addr: SocketAddr) -> Raw {
        Raw::over(TcpStream::connect(addr).await.unwrap())
    }

    /// A mutual TLS connection to `addr` with the device's certificate.
    pub async fn open_tls(addr: SocketAddr, certs: &DeviceCerts) -> Raw {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&certs.ca) {
            roots.add(c.unwrap()).unwrap();
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&certs.cert)
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(&certs.key).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .expect("TLS handshake with a device certificate");
        Raw::over(tls)
    }

    fn over(stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static) -> Raw {
        Raw {
            stream: Box::new(stream),
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    pub async fn send_packet(&mut self, p: Packet) {
        self.send(&encode(vec![p])).await;
    }

    /// The next packet from the gateway: (packet type, whole frame); `None`
    /// when the gateway closed the connection. Panics after `within`.
    pub async fn next(&mut self, within: Duration) -> Option<(u8, BytesMut)> {
        tokio::time::timeout(within, async {
            loop {
                match rumqttd::protocol::v4::check(self.buf.iter(), 1 << 20) {
                    Ok(h) => {
                        let frame = self.buf.split_to(h.frame_length());
                        return Some((frame[0] >> 4, frame));
                    }
                    Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("bad packet from the gateway: {e}"),
                }
                self.buf.reserve(4096);
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("a packet or a close in time")
    }

    /// Packets until one satisfies `done`; panics on a close.
    pub async fn until(&mut self, mut done: impl FnMut(u8, &[u8]) -> bool) -> Vec<(u8, BytesMut)> {
        let mut seen = Vec::new();
        loop {
            let (t, f) = self.next(WAIT).await.expect("connection open");
            let stop = done(t, &f);
            seen.push((t, f));
            if stop {
                return seen;
            }
        }
    }

    /// The next packet, which must be of type `kind`.
    pub async fn expect(&mut self, kind: u8) -> BytesMut {
        let (t, f) = self.next(WAIT).await.expect("connection open");
        assert_eq!(t, kind, "expected packet type {kind}, got {t}: {f:02X?}");
        f
    }

    /// The next packet, which must be `frame` exactly.
    pub async fn expect_frame(&mut self, frame: &[u8]) {
        let (_, f) = self.next(WAIT).await.expect("connection open");
        assert_eq!(&f[..], frame, "expected {frame:02X?}");
    }

    /// The next packet, which must be a PUBLISH: [`parse_publish`] of it.
    pub async fn publish(&mut self) -> (u8, Option<u16>, Value) {
        let f = self.expect(PUBLISH).await;
        parse_publish(&f)
    }

    /// PINGREQ, and the PINGRESP must be the very next packet: nothing else
    /// was pending, and the session is still open.
    pub async fn ping(&mut self) {
        self.send(&[0xC0, 0x00]).await;
        self.expect_frame(&[PINGRESP << 4, 0x00]).await;
    }

    /// CONNECT (keep-alive 60 s) and its CONNACK, which must accept it;
    /// returns the session-present flag.
    pub async fn connect(&mut self, mac: &str, clean: bool) -> bool {
        self.connect_keep_alive(mac, clean, 60).await
    }

    /// [`Raw::connect`] with keep-alive `keep_alive` seconds.
    pub async fn connect_keep_alive(&mut self, mac: &str, clean: bool, keep_alive: u16) -> bool {
        self.send_packet(connect_packet(mac, keep_alive, clean))
            .await;
        let f = self.expect(CONNACK).await;
        assert_eq!(f[3], 0, "CONNECT accepted: {f:02X?}");
        f[2] & 1 == 1
    }

    /// SUBSCRIBE and its SUBACK, which must carry `pkid`; returns the
    /// SUBACK's return codes.
    pub async fn subscribe(&mut self, pkid: u16, filters: &[(&str, QoS)]) -> Vec<u8> {
        self.send_packet(subscribe_packet(pkid, filters)).await;
        let f = self.expect(SUBACK).await;
        assert_eq!(f[2..4], pkid.to_be_bytes(), "SUBACK's packet id");
        f[4..].to_vec()
    }
}

/// `packets` encoded one after the other, as one write.
pub fn encode(packets: Vec<Packet>) -> BytesMut {
    let mut out = BytesMut::new();
    for p in packets {
        V4.write(p, &mut out).unwrap();
    }
    out
}

/// A CONNECT with client id `mac`, no will and no login.
pub fn connect_packet(mac: &str, keep_alive: u16, clean_session: bool) -> Packet {
    Packet::Connect(
        Connect {
            keep_alive,
            client_id: mac.into(),
            clean_session,
        },
        None,
        None,
        None,
        None,
    )
}

/// A SUBSCRIBE of `filters`, each at its QoS.
pub fn subscribe_packet(pkid: u16, filters: &[(&str, QoS)]) -> Packet {
    let filters = filters
        .iter()
        .map(|(path, qos)| Filter {
            path: path.to_string(),
            qos: *qos,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        })
        .collect();
    Packet::Subscribe(Subscribe { pkid, filters }, None)
}

/// A PUBLISH encoded by hand: rumqttd's `Publish` keeps QoS, DUP and the
/// packet id crate-private. `pkid` is written only for QoS 1 and 2.
pub fn publish(
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
    dup: bool,
    pkid: u16,
) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    let mut out = vec![(PUBLISH << 4) | (u8::from(dup) << 3) | (qos << 1) | u8::from(retain)];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    out
}

/// (first byte, packet id, payload as JSON or `Null`) of a PUBLISH frame.
pub fn parse_publish(frame: &[u8]) -> (u8, Option<u16>, Value) {
    let mut i = 1;
    while frame[i] & 0x80 != 0 {
        i += 1;
    }
    let topic_len = u16::from_be_bytes([frame[i + 1], frame[i + 2]]) as usize;
    let mut at = i + 3 + topic_len;
    let qos = (frame[0] >> 1) & 3;
    let pkid = (qos > 0).then(|| {
        at += 2;
        u16::from_be_bytes([frame[at - 2], frame[at - 1]])
    });
    let payload = serde_json::from_slice(&frame[at..]).unwrap_or(Value::Null);
    (frame[0], pkid, payload)
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK: a first byte and a packet id.
pub fn id_packet(first: u8, pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [first, 0x02, hi, lo]
}

/// PUBREL, with its reserved fixed header flags 0b0010.
pub fn pubrel(pkid: u16) -> [u8; 4] {
    id_packet(0x62, pkid)
}

/// [`super::hello`] as a payload.
pub fn hello(mac: &str) -> Vec<u8> {
    super::hello(mac).into_bytes()
}

/// Whether `needle` occurs in the bytes `hay`.
pub fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}
