//! The HTTP side of `serve`: the dashboard (server-rendered HTML, see
//! [`pages`]), `/metrics` in the Prometheus text format, `/healthz` for
//! systemd and monitors. Bound to anything but loopback, every page except
//! `/healthz`, `/metrics` and `/login` requires a login ([`auth`]), and
//! `/metrics` too with `http.metrics_require_login`.
//! All reads go through [`Store`] read methods on blocking threads.

pub mod auth;
mod pages;
pub mod stats;

use crate::clock::SharedClock;
use crate::config::{HttpConfig, SecureCookies};
use crate::metrics::Metrics;
use crate::store::Store;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono_tz::Tz;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone)]
pub struct HttpState {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
    /// Site time zone, for "today" and displayed times.
    pub tz: Tz,
    /// Where `admin.passwd` lives.
    pub data_dir: PathBuf,
    /// Pages require a login (HTTP bound to a non-loopback address).
    pub require_login: bool,
    pub sessions: Arc<auth::Sessions>,
    pub stats: Arc<stats::StatsCache>,
    /// Concurrent password checks and failures per address.
    pub login: Arc<auth::LoginLimits>,
    pub secure_cookies: SecureCookies,
    /// `/metrics` requires a login where pages do.
    pub metrics_require_login: bool,
}

impl HttpState {
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
        tz: Tz,
        data_dir: PathBuf,
        require_login: bool,
        cfg: &HttpConfig,
    ) -> HttpState {
        HttpState {
            login: Arc::new(auth::LoginLimits::new(cfg, clock.clone())),
            store,
            metrics,
            clock,
            tz,
            data_dir,
            require_login,
            sessions: Arc::default(),
            stats: Arc::default(),
            secure_cookies: cfg.secure_cookies,
            metrics_require_login: cfg.metrics_require_login,
        }
    }

    /// Whether the session cookie of a response to a request with
    /// `headers` is `Secure` (`http.secure_cookies`).
    fn secure_cookie(&self, headers: &HeaderMap) -> bool {
        match self.secure_cookies {
            SecureCookies::Always => true,
            SecureCookies::Never => false,
            SecureCookies::Auto => forwarded_https(headers),
        }
    }

    /// True when the request carries a valid session cookie.
    fn logged_in(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::token_from_cookies)
            .is_some_and(|t| self.sessions.valid(t, self.clock.now()))
    }

    /// The cached statistics snapshot (computed on a blocking thread).
    async fn snapshot(&self) -> Result<Arc<stats::Snapshot>, Response> {
        let (store, cache, now, tz) = (
            self.store.clone(),
            self.stats.clone(),
            self.clock.now(),
            self.tz,
        );
        match tokio::task::spawn_blocking(move || cache.get(&store, now, tz)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(unavailable(&e.to_string())),
            Err(e) => Err(unavailable(&e.to_string())),
        }
    }
}

/// True when a TLS-terminating proxy marked the request as HTTPS
/// (`X-Forwarded-Proto: https`, or `proto=https` in `Forwarded`). A client
/// that sends it itself only makes its own cookie `Secure`.
fn forwarded_https(headers: &HeaderMap) -> bool {
    let has = |name: &str, f: &dyn Fn(&str) -> bool| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(f)
    };
    has("x-forwarded-proto", &|v| {
        v.split(',')
            .next()
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
    }) || has("forwarded", &|v| {
        v.split([';', ',']).any(|kv| {
            kv.trim().split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("proto")
                    && v.trim().trim_matches('"').eq_ignore_ascii_case("https")
            })
        })
    })
}

/// The address a request comes from, for the login limits: the TCP peer,
/// or when the peer is on loopback (a reverse proxy on the same host) and
/// the request has an `X-Forwarded-For`, the last address in it (the one
/// the proxy added).
fn client_ip(peer: Option<SocketAddr>, headers: &HeaderMap) -> IpAddr {
    let peer = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip().to_canonical());
    if !peer.is_loopback() {
        return peer;
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .next_back()
        .and_then(|v| v.rsplit(',').next())
        .and_then(|a| a.trim().parse::<IpAddr>().ok())
        .map_or(peer, |a| a.to_canonical())
}

fn unavailable(msg: &str) -> Response {
    tracing::warn!(error = %msg, "HTTP read failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("database unavailable: {msg}\n"),
    )
        .into_response()
}

/// Runs a blocking store read off the async threads.
async fn read<T: Send + 'static>(
    s: &HttpState,
    f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Response> {
    let store = s.store.clone();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(&e.to_string())),
        Err(e) => Err(unavailable(&e.to_string())),
    }
}

pub fn router(state: HttpState) -> Router {
    let pages = Router::new()
        .route("/", get(pages::overview))
        .route("/devices/:mac", get(pages::device))
        .route("/images", get(pages::images))
        .route("/images/:id", get(pages::image))
        .route("/images/:id/raw", get(pages::image_raw))
        .route("/images/:id/download", get(pages::image_download))
        .route("/alerts", get(pages::alerts))
        .route("/logout", post(pages::logout))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_login,
        ));
    let metrics = Router::new().route("/metrics", get(metrics)).route_layer(
        axum::middleware::from_fn_with_state(state.clone(), metrics_login),
    );
    Router::new()
        .merge(pages)
        .merge(metrics)
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/healthz", get(healthz))
        .with_state(state)
}

/// `/metrics` with `http.metrics_require_login` where pages need a login:
/// 401 without a valid session (a scraper is not sent to a form).
async fn metrics_login(State(s): State<HttpState>, req: Request<Body>, next: Next) -> Response {
    if !(s.require_login && s.metrics_require_login) || s.logged_in(req.headers()) {
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, "login required\n").into_response()
    }
}

/// Lets a request through when no login is needed or its session is valid;
/// otherwise sends the browser to the login page.
async fn require_login(State(s): State<HttpState>, req: Request<Body>, next: Next) -> Response {
    if !s.require_login {
        return next.run(req).await;
    }
    if s.logged_in(req.headers()) {
        next.run(req).await
    } else {
        Redirect::to("/login").into_response()
    }
}

async fn healthz(State(s): State<HttpState>) -> impl IntoResponse {
    match s.store.schema_version() {
        Ok(_) => (StatusCode::OK, "ok\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n"),
    }
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn metrics(State(s): State<HttpState>) -> Response {
    let mut body = s.metrics.render();
    let snap = match s.snapshot().await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Some(sync) = &snap.sync {
        crate::upstream::render_metrics(sync, &mut body);
    }
    let mut gauge = |name: &str, help: &str, rows: &mut dyn Iterator<Item = (String, f64)>| {
        let _ = writeln!(body, "# HELP barngate_{name} {help}");
        let _ = writeln!(body, "# TYPE barngate_{name} gauge");
        for (labels, v) in rows {
            let _ = writeln!(body, "barngate_{name}{labels} {v}");
        }
    };
    let one = |v: f64| std::iter::once((String::new(), v));
    let online = snap.devices.iter().filter(|d| snap.online(d)).count();
    gauge(
        "devices_registered",
        "Devices in the registry.",
        &mut one(snap.devices.len() as f64),
    );
    gauge(
        "devices_online",
        "Devices seen in the last 2 hours.",
        &mut one(online as f64),
    );
    gauge(
        "images_today",
        "Images completed since local midnight.",
        &mut one(snap.images_today as f64),
    );
    let mut kinds: Vec<(String, String, u64)> = snap
        .active_alerts
        .iter()
        .map(|((k, sev), n)| (k.clone(), sev.clone(), *n))
        .collect();
    kinds.sort();
    gauge(
        "alerts_active",
        "Active (unresolved) alerts, by kind and severity.",
        &mut kinds.into_iter().map(|(k, sev, n)| {
            (
                format!("{{kind=\"{}\",severity=\"{}\"}}", label(&k), label(&sev)),
                n as f64,
            )
        }),
    );
    gauge(
        "alerts_active_total",
        "Active (unresolved) alerts.",
        &mut one(snap.active_alert_total() as f64),
    );
    let mut stats: Vec<&stats::DeviceStats> = snap.stats.values().collect();
    stats.sort_by(|a, b| a.mac.cmp(&b.mac));
    let dev = |m: &str| format!("{{device=\"{}\"}}", label(m));
    type Fig = fn(&stats::DeviceStats) -> Option<f64>;
    let per_device: [(&str, &str, Fig); 7] = [
        (
            "device_success_ratio",
            "Complete / (complete + failed) images, per device.",
            |s| s.success_rate(),
        ),
        (
            "device_average_retries",
            "missing_chunks rounds per finished image, per device.",
            |s| s.average_retries(),
        ),
        (
            "device_chunk_loss_percent",
            "Chunk transmissions lost (re-requested / sent), per device.",
            |s| s.chunk_loss_pct(),
        ),
        (
            "device_pending_images",
            "Pending images the device reported at its last wake.",
            |s| Some(s.pending as f64),
        ),
        (
            "device_pending_queue_age_seconds",
            "How long the device has had pending images (0 without).",
            |s| Some(s.pending_age_s as f64),
        ),
        (
            "device_images_complete",
            "Complete images stored, per device.",
            |s| Some(s.images_complete as f64),
        ),
        (
            "device_images_failed",
            "Captures currently failed, per device.",
            |s| Some(s.images_failed as f64),
        ),
    ];
    for (name, help, f) in per_device {
        gauge(
            name,
            help,
            &mut stats.iter().filter_map(|s| f(s).map(|v| (dev(&s.mac), v))),
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
