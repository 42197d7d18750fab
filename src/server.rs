//! `serve`: wires the store, the embedded broker, the ingest thread, the
//! device front, the admin socket and HTTP together, and shuts them down.

use crate::admin;
use crate::broker::{self, BrokerError};
use crate::clock::SharedClock;
use crate::config::{Config, ConfigError, TEMPLATE};
use crate::http;
use crate::ingest::{Engine, IngestError};
use crate::metrics::Metrics;
use crate::schedule::Schedule;
use crate::store::{Store, StoreError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{error, info};

pub const DB_FILE: &str = "barngate.redb";
pub const CONFIG_FILE: &str = "barngate.toml";

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
    #[error("upstream: {0}")]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// Creates the data directory (0700: it holds keys and a farm's images).
pub fn ensure_data_dir(dir: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::Io {
            what: "cannot create data directory",
            path: dir.display().to_string(),
            source,
        })?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        info!(dir = %dir.display(), "data directory created");
    }
    Ok(())
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
        std::fs::write(&p, TEMPLATE).map_err(|source| ServeError::Io {
            what: "cannot write config",
            path: p.display().to_string(),
            source,
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
    pub mqtt_addr: SocketAddr,
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
        ensure_data_dir(&opts.data_dir)?;
        let store = Arc::new(Store::open(&opts.data_dir.join(DB_FILE))?);
        let metrics = Arc::new(Metrics::default());
        let schedule = Schedule::new(&cfg.schedule, cfg.timezone()?);
        let engine = Engine::new(
            cfg.ingest.clone(),
            cfg.site.clone(),
            schedule,
            store.clone(),
            metrics.clone(),
        )?;
        let b = broker::start(&cfg.mqtt, None)?;
        let upstream = b.addr;
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, ingest_done) = watch::channel(false);
        let ingest = {
            let stop = stop.clone();
            let clock = clock.clone();
            std::thread::Builder::new()
                .name("ingest".into())
                .spawn(move || {
                    let r = broker::run_ingest(engine, b.link_tx, b.link_rx, clock, stop);
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
        let listener = tokio::net::TcpListener::bind(mqtt_listen)
            .await
            .map_err(|source| ServeError::Io {
                what: "cannot listen for devices on",
                path: mqtt_listen.to_string(),
                source,
            })?;
        let mqtt_addr = listener.local_addr().map_err(|source| ServeError::Io {
            what: "listener",
            path: mqtt_listen.to_string(),
            source,
        })?;
        tokio::spawn(crate::front::run_plain(
            listener,
            upstream,
            cfg.mqtt.max_connections,
            metrics.clone(),
            shutdown_rx.clone(),
        ));

        let admin_listener = admin::bind(&opts.data_dir)?;
        tokio::spawn(admin::serve(
            admin_listener,
            store.clone(),
            clock.clone(),
            shutdown_rx.clone(),
        ));

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
        let http_listener = tokio::net::TcpListener::bind(http_listen)
            .await
            .map_err(|source| ServeError::Io {
                what: "cannot listen for HTTP on",
                path: http_listen.to_string(),
                source,
            })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| ServeError::Io {
                what: "listener",
                path: http_listen.to_string(),
                source,
            })?;
        let app = http::router(http::HttpState {
            store: store.clone(),
            metrics: metrics.clone(),
            clock: clock.clone(),
        });
        let mut http_shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            let _ = axum::serve(http_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = http_shutdown.changed().await;
                })
                .await;
        });
        info!(mqtt = %mqtt_addr, http = %http_addr, data_dir = %opts.data_dir.display(), "gateway running");
        Ok(Gateway {
            mqtt_addr,
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
