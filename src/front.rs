//! The device-facing listener. Every device connection is accepted here
//! (bounded by a semaphore) and relayed to the loopback broker.

use crate::metrics::Metrics;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

/// Relays plaintext MQTT connections to the broker at `upstream`.
pub async fn run_plain(
    listener: TcpListener,
    upstream: SocketAddr,
    max_connections: usize,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(max_connections));
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            Metrics::inc(&metrics.connections_refused);
            metrics.reject("too_many_connections");
            warn!(%peer, max_connections, "connection refused: too many connections");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            Metrics::inc(&metrics.connections);
            if let Err(e) = relay(sock, upstream).await {
                debug!(%peer, error = %e, "connection closed");
            }
            metrics.connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

async fn relay(mut sock: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let mut up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut sock, &mut up).await?;
    Ok(())
}
