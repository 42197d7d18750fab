//! `barngate serve`: the gateway.

use anyhow::{bail, Result};
use barngate::clock::SystemClock;
use barngate::server::{self, Gateway, GatewayOptions};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use super::log::init_tracing;

pub(super) async fn run(
    data_dir: &Path,
    config: Option<&Path>,
    mqtt_listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
) -> Result<()> {
    let _log = init_tracing();
    server::ensure_data_dir(data_dir)?;
    let cfg = server::load_config(data_dir, config)?;
    let mut gw = Gateway::start(
        GatewayOptions {
            data_dir: data_dir.to_path_buf(),
            config: cfg,
            mqtt_listen,
            http_listen,
        },
        Arc::new(SystemClock),
    )
    .await?;
    // One line on stdout for supervisors and tests.
    println!("barngate ready mqtt={} http={}", gw.mqtt_addr, gw.http_addr);
    // systemd `Type=notify`: ready now (a no-op without NOTIFY_SOCKET).
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stopped_by_error = tokio::select! {
        _ = tokio::signal::ctrl_c() => false,
        _ = term.recv() => false,
        _ = gw.ingest_stopped() => true,
    };
    tracing::info!("shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    gw.shutdown().await?;
    if stopped_by_error {
        bail!("the ingest stopped on an error (see the log above)");
    }
    Ok(())
}
