//! `barngate sync`: upstream forwarding state.

use anyhow::Result;
use barngate::admin::Request;
use barngate::upstream::SyncStatus;
use clap::Subcommand;
use std::path::Path;

use super::query::query;

#[derive(Subcommand)]
pub(super) enum SyncCmd {
    /// Backlog, oldest queued item's age, last success, last error.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn run(data_dir: &Path, cmd: SyncCmd) -> Result<()> {
    match cmd {
        SyncCmd::Status { json } => {
            let v = query(data_dir, Request::SyncStatus).await?;
            let st: SyncStatus = serde_json::from_value(v)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                let t = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into())
                };
                match st.enabled {
                    Some(false) => println!(
                        "upstream:         disabled (upstream.enabled = false): nothing is sent; the backlog grows until it is enabled"
                    ),
                    Some(true) => println!("upstream:         enabled"),
                    None => println!("upstream:         unknown (no gateway has started with this database since)"),
                }
                println!("backlog:          {} items", st.backlog);
                println!(
                    "oldest queued:    {}",
                    match (st.oldest_queued_at, st.oldest_age_seconds) {
                        (Some(at), Some(age)) => format!("{} ({age} s ago)", at.to_rfc3339()),
                        _ => "-".into(),
                    }
                );
                println!("last success:     {}", t(st.last_success_at));
                match &st.last_error {
                    Some(e) => println!("last error:       {} ({})", e, t(st.last_error_at)),
                    None => println!("last error:       -"),
                }
                println!("failures since:   {}", st.consecutive_failures);
                println!("delivered total:  {}", st.delivered_total);
            }
            Ok(())
        }
    }
}
