//! The admin endpoint of a running gateway: one JSON request per line on
//! the Unix socket, answered from the store or, for registry changes,
//! through `provision::apply_live`.

use super::{answer, Request};
use crate::provision::{self, Live};
use crate::store::Store;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tracing::warn;

/// Serves requests, one JSON line in, one JSON line out, until shutdown.
pub async fn serve(
    listener: UnixListener,
    store: Arc<Store>,
    live: Live,
    clock: crate::clock::SharedClock,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let sock = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { warn!(error = %e, "admin accept failed"); continue; }
            },
            _ = shutdown.changed() => return,
        };
        let store = store.clone();
        let live = live.clone();
        let clock = clock.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Registry { change }) => {
                        match provision::apply_live(&live, change).await {
                            Ok(o) => serde_json::json!({"ok": true, "data": o}),
                            Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
                        }
                    }
                    Ok(req) => {
                        let store = store.clone();
                        let now = clock.now();
                        tokio::task::spawn_blocking(move || answer(&store, &req, now))
                            .await
                            .unwrap_or_else(
                                |e| serde_json::json!({"ok": false, "error": e.to_string()}),
                            )
                    }
                    Err(e) => {
                        serde_json::json!({"ok": false, "error": format!("bad request: {e}")})
                    }
                };
                let mut out = resp.to_string();
                out.push('\n');
                if w.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}
