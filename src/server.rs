//! `serve`: wires the store, the embedded broker, the ingest thread, the
//! device front, the admin socket and HTTP together, and shuts them down.

use crate::admin;
use crate::broker::{self, BrokerError};
use crate::clock::SharedClock;
use crate::config::{Config, ConfigError, TEMPLATE};
use crate::devpass::PasswordStore;
use crate::front::{Front, FrontConfig};
use crate::http;
use crate::ingest::{Engine, IngestError};
use crate::metrics::Metrics;
use crate::pki::{Pki, PkiError};
use crate::provision::{self, Live, REGISTRY_QUEUE};
use crate::schedule::Schedule;
use crate::store::{Store, StoreError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{error, info, warn};

pub const DB_FILE: &str = "barngate.redb";
pub const CONFIG_FILE: &str = "barngate.toml";
/// The site PKI's directory inside the data directory.
pub const CERTS_DIR: &str = "certs";

/// The site PKI of a data directory.
pub fn pki(data_dir: &Path) -> Pki {
    Pki::new(data_dir.join(CERTS_DIR))
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Provision(#[from] provision::ProvisionError),
    #[error("upstream: {0}")]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// Binds a TCP listener; the error names what it was for and the address.
async fn bind(
    addr: SocketAddr,
    what: &'static str,
) -> Result<(tokio::net::TcpListener, SocketAddr), ServeError> {
    let io = |source| ServeError::Io {
        what,
        path: addr.to_string(),
        source,
    };
    let l = tokio::net::TcpListener::bind(addr).await.map_err(io)?;
    let a = l.local_addr().map_err(io)?;
    Ok((l, a))
}

/// Creates the data directory (0700: it holds keys and a farm's images).
/// An existing one is left as it is, with a warning if others can enter it.
pub fn ensure_data_dir(dir: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.exists() {
        crate::fsmode::create_private_dir_all(dir).map_err(|source| ServeError::Io {
            what: "cannot create data directory",
            path: dir.display().to_string(),
            source,
        })?;
        info!(dir = %dir.display(), "data directory created");
    } else if let Ok(m) = std::fs::metadata(dir) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "data directory is open to other users; `chmod 700` it");
        }
    }
    Ok(())
}

/// Opens the database at `path`, created 0600 (an existing one with group
/// or other access is narrowed to 0600 first).
pub fn open_store(path: &Path) -> Result<Store, ServeError> {
    let narrowed = crate::fsmode::private_file(path).map_err(|source| ServeError::Io {
        what: "cannot create database",
        path: path.display().to_string(),
        source,
    })?;
    if narrowed {
        info!(path = %path.display(), "database file made private (0600)");
    }
    Ok(Store::open(path)?)
}

/// The config in effect: `--config FILE` if given; else `<data_dir>/barngate.toml`,
/// written from the commented template on first run.
pub fn load_config(data_dir: &Path, explicit: Option<&Path>) -> Result<Config, ServeError> {
    if let Some(p) = explicit {
        return Ok(Config::load(p)?);
    }
    let p = data_dir.join(CONFIG_FILE);
    if p.exists() {
        return Ok(Config::load(&p)?);
    }
    if data_dir.exists() {
        crate::fsmode::write_new_private(&p, TEMPLATE.as_bytes()).map_err(|source| {
            ServeError::Io {
                what: "cannot write config",
                path: p.display().to_string(),
                source,
            }
        })?;
        info!(path = %p.display(), "default config written");
    }
    let mut cfg = Config::default();
    cfg.upstream.apply_env(|k| std::env::var(k).ok())?;
    cfg.validate()?;
    Ok(cfg)
}

pub struct GatewayOptions {
    pub data_dir: PathBuf,
    pub config: Config,
    pub mqtt_listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
}

/// A running gateway.
pub struct Gateway {
    /// The device listener (TLS, client certificate required).
    pub mqtt_addr: SocketAddr,
    /// The plaintext loopback listener, when configured.
    pub plain_addr: Option<SocketAddr>,
    /// The password listener (TLS, no client certificate), when configured.
    pub password_addr: Option<SocketAddr>,
    pub pki: Pki,
    pub front: Front,
    pub http_addr: SocketAddr,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    data_dir: PathBuf,
    stop: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    ingest: Option<std::thread::JoinHandle<Result<(), BrokerError>>>,
    ingest_done: watch::Receiver<bool>,
}

impl Gateway {
    pub async fn start(opts: GatewayOptions, clock: SharedClock) -> Result<Gateway, ServeError> {
        let cfg = opts.config;
        cfg.validate()?;
        for (key, why) in cfg.mqtt.deprecated_keys() {
            warn!(key, "deprecated config key ignored: {why}");
        }
        ensure_data_dir(&opts.data_dir)?;
        let store = Arc::new(open_store(&opts.data_dir.join(DB_FILE))?);
        let metrics = Arc::new(Metrics::default());
        let schedule = Schedule::new(&cfg.schedule, cfg.timezone()?);
        let engine = Engine::new(
            cfg.ingest.clone(),
            cfg.site.clone(),
            schedule,
            store.clone(),
            metrics.clone(),
        )?;
        let pki = pki(&opts.data_dir);
        if pki.ensure_ca()? {
            info!(dir = %pki.dir().display(), "site CA and gateway certificate created");
        }
        for serial in provision::reconcile_revocations(&store, &pki)? {
            info!(serial = %serial, "revoked.json completed from the registry");
        }
        let revoked = pki.shared_revoked()?;
        let tls = Arc::new(pki.server_tls_config(revoked.clone())?);
        info!(
            aes_in_hardware = crate::pki::aes_in_hardware(),
            preferred = ?tls.crypto_provider().cipher_suites.first().map(|s| s.suite()),
            "TLS cipher suite order"
        );
        let b = broker::start(&cfg.mqtt)?;
        let (to_ingest, inbound) = broker::ingest_queue();
        {
            let (link_rx, to_ingest) = (b.link_rx, to_ingest.clone());
            std::thread::Builder::new()
                .name("ingest-link".into())
                .spawn(move || broker::pump_link(link_rx, to_ingest))
                .map_err(|source| ServeError::Io {
                    what: "cannot start ingest link thread",
                    path: String::new(),
                    source,
                })?;
        }
        let front = Front::new(
            FrontConfig {
                attach: b.attach,
                ingest: to_ingest,
                max_connections: cfg.mqtt.max_connections,
                max_handshakes: cfg.mqtt.max_handshakes,
                max_handshakes_per_ip: cfg.mqtt.max_handshakes_per_ip,
                handshake_timeout: std::time::Duration::from_millis(cfg.mqtt.handshake_timeout_ms),
                max_packet_size: cfg.mqtt.max_payload_size,
                passwords: PasswordStore::new(pki.dir()),
                max_filters_per_subscribe: cfg.mqtt.max_filters_per_subscribe,
                max_filters_per_session: cfg.mqtt.max_filters_per_session,
            },
            metrics.clone(),
            revoked,
        );
        let (registry_tx, registry_rx) = flume::bounded(REGISTRY_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, ingest_done) = watch::channel(false);
        let ingest = {
            let stop = stop.clone();
            let clock = clock.clone();
            let replies = broker::Replies::new(b.link_tx);
            std::thread::Builder::new()
                .name("ingest".into())
                .spawn(move || {
                    let r = broker::run_ingest(engine, replies, inbound, clock, stop, registry_rx);
                    if let Err(e) = &r {
                        error!(error = %e, "ingest stopped");
                    }
                    let _ = done_tx.send(true);
                    r
                })
                .map_err(|source| ServeError::Io {
                    what: "cannot start ingest thread",
                    path: String::new(),
                    source,
                })?
        };
        let (shutdown, shutdown_rx) = watch::channel(false);

        let mqtt_listen = opts.mqtt_listen.unwrap_or(cfg.mqtt.listen);
        let (listener, mqtt_addr) = bind(mqtt_listen, "cannot listen for devices on").await?;
        tokio::spawn(front.clone().run_tls(listener, tls, shutdown_rx.clone()));
        let plain_addr = match cfg.mqtt.plain_listen {
            Some(addr) => {
                let (l, a) = bind(addr, "cannot listen for plaintext MQTT on").await?;
                tracing::warn!(addr = %a, "plaintext MQTT listener enabled (loopback, no certificates)");
                tokio::spawn(front.clone().run_plain(l, shutdown_rx.clone()));
                Some(a)
            }
            None => None,
        };

        let password_addr = match cfg.mqtt.password_listen {
            Some(addr) => {
                let tls = Arc::new(pki.server_tls_config_server_auth_only()?);
                let (l, a) = bind(addr, "cannot listen for password MQTT on").await?;
                info!(addr = %a, "password MQTT listener enabled (TLS, per-device passwords)");
                tokio::spawn(front.clone().run_password(l, tls, shutdown_rx.clone()));
                Some(a)
            }
            None => None,
        };
        tokio::spawn(provision::watch_revocation_file(
            pki.clone(),
            front.clone(),
            shutdown_rx.clone(),
        ));

        tokio::spawn(release_freed_memory(metrics.clone(), shutdown_rx.clone()));

        let admin_listener = admin::bind(&opts.data_dir)?;
        let live = Live {
            registry: registry_tx,
            pki: pki.clone(),
            front: front.clone(),
            store: store.clone(),
            changes: Default::default(),
        };
        tokio::spawn(admin::server::serve(
            admin_listener,
            store.clone(),
            live,
            clock.clone(),
            shutdown_rx.clone(),
        ));

        // `sync status` tells whether forwarding is on, even from the database.
        let enabled = cfg.upstream.enabled;
        if let Err(e) = store.update_sync_state(|s| s.enabled = Some(enabled)) {
            tracing::warn!(error = %e, "cannot record the upstream setting");
        }
        if !enabled {
            let backlog = store.outbox_stats().map(|o| o.backlog).unwrap_or(0);
            tracing::info!(
                backlog,
                "upstream forwarding disabled (upstream.enabled = false): results are kept in the local outbox only"
            );
        }
        if cfg.upstream.enabled {
            let fwd = crate::upstream::Forwarder::new(
                cfg.upstream.clone(),
                cfg.site.id.clone(),
                store.clone(),
                metrics.clone(),
                clock.clone(),
                opts.data_dir.clone(),
            )?;
            tokio::spawn(fwd.run(shutdown_rx.clone()));
        }

        let http_listen = opts.http_listen.unwrap_or(cfg.http.listen);
        let (http_listener, http_addr) = bind(http_listen, "cannot listen for HTTP on").await?;
        let require_login = !http_addr.ip().is_loopback();
        if require_login && !http::auth::password_is_set(&opts.data_dir) {
            tracing::warn!(http = %http_addr, "dashboard is not on loopback and no admin password is set: run `barngate admin set-password`");
        }
        if require_login && !cfg.http.metrics_require_login {
            tracing::info!(http = %http_addr, "/metrics is readable without a login (http.metrics_require_login = false)");
        }
        let app = http::router(http::HttpState::new(
            store.clone(),
            metrics.clone(),
            clock.clone(),
            cfg.timezone()?,
            opts.data_dir.clone(),
            require_login,
            &cfg.http,
        ));
        let mut http_shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let _ = axum::serve(http_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = http_shutdown.changed().await;
                })
                .await;
        });
        info!(mqtt = %mqtt_addr, http = %http_addr, data_dir = %opts.data_dir.display(), "gateway running");
        Ok(Gateway {
            mqtt_addr,
            plain_addr,
            password_addr,
            pki,
            front,
            http_addr,
            store,
            metrics,
            data_dir: opts.data_dir,
            stop,
            shutdown,
            ingest: Some(ingest),
            ingest_done,
        })
    }

    /// Resolves when the ingest thread has stopped (an error is fatal).
    pub async fn ingest_stopped(&mut self) {
        while !*self.ingest_done.borrow() {
            if self.ingest_done.changed().await.is_err() {
                return;
            }
        }
    }

    /// Stops accepting, commits what is pending, and releases the database.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        let _ = self.shutdown.send(true);
        self.stop.store(true, Ordering::Relaxed);
        let r = match self.ingest.take() {
            Some(h) => tokio::task::spawn_blocking(move || h.join())
                .await
                .ok()
                .and_then(|j| j.ok())
                .unwrap_or(Ok(())),
            None => Ok(()),
        };
        let _ = std::fs::remove_file(admin::socket_path(&self.data_dir));
        r.map_err(ServeError::from)
    }
}

/// After a wake burst, the buffers of the connections that closed are free
/// but stay in the C allocator's heap: the gateway still held 108 MiB five
/// seconds after a 1,000-device burst with every device gone. When the number
/// of open device connections has fallen by a good part since its high, the
/// free heap pages go back to the kernel (`malloc_trim`, glibc only; a few
/// milliseconds, at most once per check interval). The `barngate` binary
/// allocates with mimalloc, which returns free pages itself after its purge
/// delay; this keeps a library user on the system allocator as small.
async fn release_freed_memory(
    metrics: Arc<crate::metrics::Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering;
    let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
    let mut high = 0u64;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        let open = metrics.connections.load(Ordering::Relaxed);
        high = high.max(open);
        if high >= 64 && open <= high / 2 {
            high = open;
            let _ = tokio::task::spawn_blocking(trim_heap).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(released, "free heap returned to the kernel");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}
