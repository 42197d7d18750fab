//! The CLI's side of the admin socket.

use super::{socket_path, AdminError, Request};
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Sends one request to a running gateway. `Ok(None)` when none is running.
pub async fn remote(
    data_dir: &Path,
    req: &Request,
) -> Result<Option<serde_json::Value>, AdminError> {
    let path = socket_path(data_dir);
    let err = |source| AdminError::Socket {
        path: path.display().to_string(),
        source,
    };
    let sock = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(err(e)),
    };
    let (r, mut w) = sock.into_split();
    let mut line = serde_json::to_string(req).map_err(|e| AdminError::Invalid(e.to_string()))?;
    line.push('\n');
    w.write_all(line.as_bytes()).await.map_err(err)?;
    let mut lines = BufReader::new(r).lines();
    let resp = lines.next_line().await.map_err(err)?.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&resp)
        .map_err(|e| AdminError::Remote(format!("unreadable answer: {e}")))?;
    if v["ok"].as_bool() == Some(true) {
        Ok(Some(v["data"].clone()))
    } else {
        Err(AdminError::Remote(
            v["error"].as_str().unwrap_or("unknown error").to_string(),
        ))
    }
}
