//! The HTTP side of `serve`: `/healthz` for systemd and monitors, `/metrics`
//! in the Prometheus text format.

use crate::metrics::Metrics;
use crate::store::Store;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::fmt::Write as _;
use std::sync::Arc;

#[derive(Clone)]
pub struct HttpState {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub clock: crate::clock::SharedClock,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz(State(s): State<HttpState>) -> impl IntoResponse {
    match s.store.schema_version() {
        Ok(_) => (StatusCode::OK, "ok\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n"),
    }
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    let mut body = s.metrics.render();
    let store = s.store.clone();
    let now = s.clock.now();
    if let Ok(Ok(st)) =
        tokio::task::spawn_blocking(move || crate::upstream::status(&store, now)).await
    {
        crate::upstream::render_metrics(&st, &mut body);
    }
    let store = s.store.clone();
    if let Ok(Ok(c)) = tokio::task::spawn_blocking(move || store.counts()).await {
        for (name, help, v) in [
            ("devices_registered", "Devices in the registry.", c.devices),
            ("images_stored", "Complete images stored locally.", c.images),
            ("alerts_stored", "Alerts recorded.", c.alerts),
        ] {
            let _ = writeln!(body, "# HELP barngate_{name} {help}");
            let _ = writeln!(body, "# TYPE barngate_{name} gauge");
            let _ = writeln!(body, "barngate_{name} {v}");
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
