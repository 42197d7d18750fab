//! Questions to the running gateway, answered from the database when none
//! runs.

use anyhow::{bail, Result};
use barngate::admin::{self, Request};
use barngate::server::{self, DB_FILE};
use std::path::Path;

/// Asks the running gateway, or reads the database when none runs.
pub(super) async fn query(data_dir: &Path, req: Request) -> Result<serde_json::Value> {
    if let Some(v) = admin::client::remote(data_dir, &req).await? {
        return Ok(v);
    }
    let db = data_dir.join(DB_FILE);
    if !db.exists() {
        bail!(
            "no database at {} (is --data-dir right? `barngate serve` creates it)",
            db.display()
        );
    }
    let store = server::open_store(&db)?;
    let v = admin::answer(&store, &req, chrono::Utc::now());
    if v["ok"].as_bool() == Some(true) {
        Ok(v["data"].clone())
    } else {
        bail!("{}", v["error"].as_str().unwrap_or("unknown error"))
    }
}
