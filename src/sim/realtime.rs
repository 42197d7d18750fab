//! The real-time driver: devices over MQTT against a running gateway.

use super::base::{opt_err, SimError};
use super::device::{Action, DeviceStats, SimDevice};
use super::faults::Faults;
use super::fleet::{FleetOptions, Summary};
use crate::clock::{Clock, SystemClock};
use crate::protocol::Channel;
use chrono::{DateTime, Duration, Utc};
use std::path::Path;
use std::sync::Arc;
use tracing::{info, warn};

// ------------------------------------------------------ real-time MQTT driver

/// How the devices reach the gateway's broker. Plain MQTT for now; TLS with
/// issued device certificates (`--ca`, `--cert-dir`) slots in here.
#[derive(Debug, Clone)]
pub struct Connection {
    pub host: String,
    pub port: u16,
    pub keep_alive: std::time::Duration,
    /// How long to wait for CONNACK and SUBACKs.
    pub connect_timeout: std::time::Duration,
    /// Mutual TLS: the site CA and a directory of issued device
    /// certificates (`{MAC}.crt.pem`, `{MAC}.key.pem`, as `device issue` writes them).
    pub tls: Option<ConnTls>,
}

#[derive(Debug, Clone)]
pub struct ConnTls {
    pub ca: Vec<u8>,
    pub cert_dir: std::path::PathBuf,
}

impl Connection {
    /// `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Connection, SimError> {
        let bad = || opt_err("gateway", format!("{s:?} is not HOST:PORT"));
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Connection {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            keep_alive: std::time::Duration::from_secs(30),
            connect_timeout: std::time::Duration::from_secs(10),
            tls: None,
        })
    }

    /// Connects over mutual TLS with the CA file and the devices' certificates in `cert_dir`.
    pub fn with_tls(mut self, ca: &Path, cert_dir: &Path) -> Result<Connection, SimError> {
        let ca = std::fs::read(ca)
            .map_err(|e| opt_err("ca", format!("cannot read {}: {e}", ca.display())))?;
        self.tls = Some(ConnTls {
            ca,
            cert_dir: cert_dir.to_path_buf(),
        });
        Ok(self)
    }

    pub(crate) fn options(&self, client_id: &str) -> Result<rumqttc::MqttOptions, SimError> {
        let mut o = rumqttc::MqttOptions::new(client_id, self.host.clone(), self.port);
        o.set_keep_alive(self.keep_alive);
        o.set_clean_session(true);
        o.set_max_packet_size(1 << 20, 1 << 20);
        if let Some(t) = &self.tls {
            let read = |ext: &str| {
                let p = t.cert_dir.join(format!("{client_id}.{ext}"));
                std::fs::read(&p).map_err(|e| {
                    opt_err(
                        "cert-dir",
                        format!(
                            "cannot read {} ({e}); issue it with `barngate device issue {client_id} --out {}`",
                            p.display(),
                            t.cert_dir.display()
                        ),
                    )
                })
            };
            o.set_transport(rumqttc::Transport::tls(
                t.ca.clone(),
                Some((read("crt.pem")?, read("key.pem")?)),
                None,
            ));
        }
        Ok(o)
    }
}

pub(crate) enum Wire {
    Message(Vec<u8>),
    SubAck,
    Down(String),
}

pub(crate) fn instant_at(at: DateTime<Utc>) -> tokio::time::Instant {
    let d = (at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::Instant::now() + d
}

/// One wake session over MQTT; returns when the device sleeps until.
async fn mqtt_session(
    dev: &mut SimDevice,
    conn: &Connection,
    faults: &Faults,
    first: Vec<Action>,
) -> Result<DateTime<Utc>, SimError> {
    let mut queue: Vec<Action> = first;
    if let Some(until) = queue.iter().find_map(|a| match a {
        Action::Sleep { until } => Some(*until),
        _ => None,
    }) {
        if !queue.iter().any(|a| matches!(a, Action::Publish { .. })) {
            return Ok(until); // offline wake
        }
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(conn.options(&dev.params.id)?, 256);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Wire>(256);
    let poller = tokio::spawn(async move {
        loop {
            let w = match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    Wire::Message(p.payload.to_vec())
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => Wire::SubAck,
                Ok(_) => continue,
                Err(e) => Wire::Down(e.to_string()),
            };
            let down = matches!(w, Wire::Down(_));
            if tx.send(w).await.is_err() || down {
                return;
            }
        }
    });
    let result = async {
        for ch in [Channel::Cmd, Channel::Ack] {
            client
                .subscribe(dev.topic(ch), rumqttc::QoS::AtLeastOnce)
                .await
                .map_err(|e| SimError::Mqtt(e.to_string()))?;
        }
        let mut subacks = 0;
        let deadline = tokio::time::Instant::now() + conn.connect_timeout;
        while subacks < 2 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Wire::SubAck)) => subacks += 1,
                Ok(Some(Wire::Message(_))) => {}
                Ok(Some(Wire::Down(e))) => return Err(SimError::Mqtt(e)),
                Ok(None) | Err(_) => {
                    return Err(SimError::Mqtt(format!(
                        "no SUBACK from {}:{} within {:?}",
                        conn.host, conn.port, conn.connect_timeout
                    )))
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        warn!(device = %dev.params.id, error = %e, "cannot reach the gateway");
        poller.abort();
        let a = dev.on_disconnect(Utc::now())?;
        return Ok(sleep_of(&a).unwrap_or_else(|| Utc::now() + Duration::hours(1)));
    }
    let mut sleep_until: Option<DateTime<Utc>> = None;
    loop {
        // Publishes in time order; a Sleep waits for the publishes before it.
        queue.sort_by_key(|a| match a {
            Action::Publish { at, .. } | Action::Timer { at, .. } => *at,
            Action::Sleep { .. } => DateTime::<Utc>::MAX_UTC,
        });
        let now = Utc::now();
        let mut new = Vec::new();
        while let Some(a) = queue.first() {
            let due = match a {
                Action::Publish { at, .. } | Action::Timer { at, .. } => *at <= now,
                Action::Sleep { .. } => true,
            };
            if !due {
                break;
            }
            match queue.remove(0) {
                Action::Publish { topic, payload, .. } => {
                    if let Err(e) = client
                        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                        .await
                    {
                        warn!(device = %dev.params.id, error = %e, "publish failed");
                    }
                }
                Action::Timer { token, .. } => new.extend(dev.on_timer(now, token)?),
                Action::Sleep { until } => sleep_until = Some(until),
            }
        }
        if !new.is_empty() {
            queue.extend(new);
            continue;
        }
        if let Some(pos) = queue.iter().position(|a| matches!(a, Action::Sleep { .. })) {
            if let Action::Sleep { until } = queue.remove(pos) {
                sleep_until = Some(until);
            }
        }
        if let Some(until) = sleep_until {
            if !queue.iter().any(|a| matches!(a, Action::Publish { .. })) {
                // Let QoS 1 publishes drain before disconnecting.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let _ = client.disconnect().await;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                poller.abort();
                return Ok(until);
            }
        }
        let next_at = queue
            .iter()
            .filter_map(|a| match a {
                Action::Publish { at, .. } | Action::Timer { at, .. } => Some(*at),
                Action::Sleep { .. } => None,
            })
            .min()
            .unwrap_or_else(|| Utc::now() + Duration::hours(1));
        tokio::select! {
            w = rx.recv() => match w {
                Some(Wire::Message(p)) => {
                    let a = dev.on_message(Utc::now(), &p, faults)?;
                    queue.extend(a);
                }
                Some(Wire::SubAck) => {}
                Some(Wire::Down(e)) => return lost(dev, &poller, &e),
                None => return lost(dev, &poller, "event loop ended"),
            },
            _ = tokio::time::sleep_until(instant_at(next_at)) => {}
        }
    }
}

pub(crate) fn lost(
    dev: &mut SimDevice,
    poller: &tokio::task::JoinHandle<()>,
    why: &str,
) -> Result<DateTime<Utc>, SimError> {
    warn!(device = %dev.params.id, error = %why, "connection to the gateway lost");
    poller.abort();
    let a = dev.on_disconnect(Utc::now())?;
    Ok(sleep_of(&a).unwrap_or_else(|| Utc::now() + Duration::hours(1)))
}

pub(crate) fn sleep_of(actions: &[Action]) -> Option<DateTime<Utc>> {
    actions.iter().find_map(|a| match a {
        Action::Sleep { until } => Some(*until),
        _ => None,
    })
}

/// Runs the fleet in real time against the gateway at `conn` until `stop`
/// resolves; prints a progress line every `progress` when given.
pub async fn run_mqtt(
    opts: FleetOptions,
    conn: Connection,
    progress: Option<std::time::Duration>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Summary, SimError> {
    let start = SystemClock.now();
    let devices = opts.build_devices(start)?;
    let faults = Arc::new(opts.faults.clone());
    let slots: Arc<std::sync::Mutex<Vec<(DeviceStats, u32)>>> =
        Arc::new(std::sync::Mutex::new(vec![
            (DeviceStats::default(), 0);
            devices.len()
        ]));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut dev) in devices.into_iter().enumerate() {
        let first = opts.first_wake(i, start);
        let (conn, faults, slots) = (conn.clone(), faults.clone(), slots.clone());
        tasks.spawn(async move {
            let mut wake_at = first;
            loop {
                tokio::time::sleep_until(instant_at(wake_at)).await;
                let first = dev.wake(Utc::now(), &faults)?;
                wake_at = mqtt_session(&mut dev, &conn, &faults, first).await?;
                let pending = dev.pending();
                if let Ok(mut s) = slots.lock() {
                    s[i] = (dev.stats.clone(), pending);
                }
                info!(device = %dev.params.id, wake = %wake_at, pending, "asleep");
            }
            #[allow(unreachable_code)]
            Ok::<(), SimError>(())
        });
    }
    let summarize = |slots: &std::sync::Mutex<Vec<(DeviceStats, u32)>>| {
        let mut s = Summary::default();
        if let Ok(v) = slots.lock() {
            for (st, p) in v.iter() {
                s.add(st, *p);
            }
        }
        s.simulated = Utc::now() - start;
        s
    };
    let ticker = async {
        let Some(every) = progress else {
            return std::future::pending::<()>().await;
        };
        loop {
            tokio::time::sleep(every).await;
            let s = summarize(&slots);
            eprintln!(
                "[{}] captured {}  delivered {}  pending {}  retries {}  lost chunks {}",
                Utc::now().format("%H:%M:%S"),
                s.totals.captured,
                s.totals.delivered,
                s.pending,
                s.totals.retry_rounds,
                s.totals.chunks_lost
            );
        }
    };
    let failed = async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Err(e)) => return e,
                Err(e) if e.is_panic() => {
                    return SimError::Mqtt(format!("device task panicked: {e}"))
                }
                _ => {}
            }
        }
        std::future::pending().await
    };
    tokio::select! {
        _ = stop => {}
        _ = ticker => {}
        e = failed => return Err(e),
    }
    tasks.abort_all();
    Ok(summarize(&slots))
}
