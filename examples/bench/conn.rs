//! The devices' MQTT connections: the lean client ([`RawConn`]) or rumqttc.

use crate::load::LoadCfg;
use crate::tls::tls_client;
use clap::ValueEnum;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Which MQTT client the load generator's devices use.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum Loader {
    /// A lean client: MQTT 3.1.1 packets encoded in place, over
    /// tokio-rustls over a buffered socket. Every packet is still its own
    /// TLS record, as firmware sends it, but a wake's chunks leave in a few
    /// large socket writes instead of one system call each: the generator
    /// shares the two cores with the stack it measures, so what it spends
    /// is taken from the stack.
    Raw,
    /// rumqttc's `AsyncClient`: one channel hop, one task wake-up and one
    /// `write` per publish, about twice the lean client's CPU
    /// (bench/RESULTS.md, "Workload").
    Rumqttc,
}

pub enum Conn {
    Mqttc(MqttcConn),
    Raw(RawConn),
}

pub struct MqttcConn {
    pub client: AsyncClient,
    pub rx: mpsc::Receiver<(String, Value)>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Conn {
    /// Queues (raw) or sends (rumqttc) one QoS 1 publish.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        match self {
            Conn::Mqttc(c) => c
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
                .await
                .map_err(|e| e.to_string()),
            Conn::Raw(c) => c.publish(topic, payload).await,
        }
    }

    /// The next message the stack sends the device; `None` once the
    /// connection is gone. Sends whatever `publish` queued first.
    pub async fn recv(&mut self) -> Option<(String, Value)> {
        match self {
            Conn::Mqttc(c) => c.rx.recv().await,
            Conn::Raw(c) => c.recv().await.ok(),
        }
    }

    pub async fn disconnect(self) {
        match self {
            Conn::Mqttc(c) => {
                let _ = c.client.disconnect().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                c.task.abort();
            }
            Conn::Raw(mut c) => {
                let _ = c.io.write_all(&[0xE0, 0x00]).await;
                let _ = c.io.flush().await;
                let _ = c.io.shutdown().await;
            }
        }
    }
}

pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The lean client (`Loader::Raw`).
pub struct RawConn {
    /// TLS over a buffered socket (records pile up in the socket buffer
    /// until a flush), or the buffered socket alone.
    pub io: Box<dyn Io>,
    pub rbuf: bytes::BytesMut,
    /// One packet, built here and then written whole (one TLS record).
    pub wbuf: Vec<u8>,
    pub pkid: u16,
    /// Queued writes not yet flushed.
    pub dirty: bool,
}

/// The socket buffer: 64 KiB, so a 100-chunk wake (≈ 200 KB of JSON)
/// leaves in four writes.
pub const RAW_BUF: usize = 64 * 1024;

impl RawConn {
    pub async fn connect(addr: SocketAddr, id: &str, cfg: &LoadCfg) -> Result<RawConn, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let sock = tokio::io::BufStream::with_capacity(RAW_BUF, RAW_BUF, tcp);
        let io: Box<dyn Io> = match &cfg.tls {
            Some((ca, dir)) => {
                let conf = tls_client(ca, dir, id)?;
                let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(Arc::new(conf))
                    .connect(name, sock)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                Box::new(tls)
            }
            None => Box::new(sock),
        };
        let mut c = RawConn {
            io,
            rbuf: bytes::BytesMut::with_capacity(4096),
            wbuf: Vec::with_capacity(4096),
            pkid: 0,
            dirty: false,
        };
        let mut connect = rumqttc::Connect::new(id);
        connect.keep_alive = 60;
        connect.clean_session = true;
        c.send(|b| connect.write(b)).await?;
        match c.packet().await? {
            Packet::ConnAck(a) if a.code == rumqttc::ConnectReturnCode::Success => {}
            p => return Err(format!("{id}: refused: {p:?}")),
        }
        for ch in ["cmd", "ack"] {
            let pkid = c.next_pkid();
            let sub = rumqttc::Subscribe::new(format!("ESP32CAM/{id}/{ch}"), QoS::AtLeastOnce);
            let sub = rumqttc::Subscribe { pkid, ..sub };
            c.send(|b| sub.write(b)).await?;
        }
        let mut subacks = 0;
        while subacks < 2 {
            if let Packet::SubAck(_) = c.packet().await? {
                subacks += 1;
            }
        }
        Ok(c)
    }

    pub fn next_pkid(&mut self) -> u16 {
        self.pkid = self.pkid.checked_add(1).unwrap_or(1);
        self.pkid
    }

    /// Encodes one packet with rumqttc's codec and writes it (one record).
    pub async fn send(
        &mut self,
        enc: impl FnOnce(&mut bytes::BytesMut) -> Result<usize, rumqttc::mqttbytes::Error>,
    ) -> Result<(), String> {
        let mut b = bytes::BytesMut::new();
        enc(&mut b).map_err(|e| e.to_string())?;
        self.io.write_all(&b).await.map_err(|e| e.to_string())?;
        self.dirty = true;
        Ok(())
    }

    /// A QoS 1 PUBLISH, encoded in place (fixed header, remaining length,
    /// topic, packet id, payload) and written as one record.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        let pkid = self.next_pkid();
        let w = &mut self.wbuf;
        w.clear();
        w.push(0x32);
        let mut len = 2 + topic.len() + 2 + payload.len();
        loop {
            let byte = (len % 128) as u8;
            len /= 128;
            w.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        w.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        w.extend_from_slice(topic.as_bytes());
        w.extend_from_slice(&pkid.to_be_bytes());
        w.extend_from_slice(payload);
        self.io
            .write_all(&self.wbuf)
            .await
            .map_err(|e| e.to_string())?;
        self.dirty = true;
        Ok(())
    }

    /// Reads the next packet, flushing queued writes before it waits.
    pub async fn packet(&mut self) -> Result<Packet, String> {
        loop {
            match rumqttc::mqttbytes::v4::read(&mut self.rbuf, 1 << 20) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
            if self.dirty {
                self.io.flush().await.map_err(|e| e.to_string())?;
                self.dirty = false;
            }
            self.rbuf.reserve(4096);
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
        }
    }

    /// The next PUBLISH to the device (PUBACKing it), skipping PUBACKs.
    pub async fn recv(&mut self) -> Result<(String, Value), String> {
        loop {
            if let Packet::Publish(p) = self.packet().await? {
                if p.qos == QoS::AtLeastOnce {
                    let ack = rumqttc::PubAck::new(p.pkid);
                    self.send(|b| ack.write(b)).await?;
                }
                let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                return Ok((p.topic, v));
            }
        }
    }
}

pub async fn connect(addr: SocketAddr, id: &str, cfg: &LoadCfg) -> Result<Conn, String> {
    match cfg.loader {
        Loader::Raw => Ok(Conn::Raw(RawConn::connect(addr, id, cfg).await?)),
        Loader::Rumqttc => connect_rumqttc(addr, id, cfg).await.map(Conn::Mqttc),
    }
}

pub async fn connect_rumqttc(
    addr: SocketAddr,
    id: &str,
    cfg: &LoadCfg,
) -> Result<MqttcConn, String> {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_clean_session(true);
    if let Some((ca, dir)) = &cfg.tls {
        let cert = std::fs::read(dir.join(format!("{id}.crt.pem"))).map_err(|e| e.to_string())?;
        let key = std::fs::read(dir.join(format!("{id}.key.pem"))).map_err(|e| e.to_string())?;
        opts.set_transport(Transport::tls(ca.clone(), Some((cert, key)), None));
    }
    let (client, mut el) = AsyncClient::new(opts, 256);
    let (tx, rx) = mpsc::channel(256);
    let (sub_tx, mut sub_rx) = mpsc::channel(4);
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if tx.send((p.topic.clone(), v)).await.is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = sub_tx.send(()).await;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    for ch in ["cmd", "ack"] {
        client
            .subscribe(format!("ESP32CAM/{id}/{ch}"), QoS::AtLeastOnce)
            .await
            .map_err(|e| e.to_string())?;
    }
    for _ in 0..2 {
        match tokio::time::timeout(Duration::from_secs(30), sub_rx.recv()).await {
            Ok(Some(())) => {}
            _ => return Err(format!("{id}: no SUBACK")),
        }
    }
    Ok(MqttcConn { client, rx, task })
}
