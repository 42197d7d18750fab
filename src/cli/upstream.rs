//! `barngate upstream`: upstream (cloud) setup.

use anyhow::Result;
use barngate::server;
use clap::Subcommand;
use std::path::Path;

use super::log::init_tracing;

#[derive(Subcommand)]
pub(super) enum UpstreamCmd {
    /// Apply the cloud schema migrations the database lacks (safe to re-run)
    /// and create the object bucket if absent.
    #[command(alias = "init-schema")]
    Migrate,
}

pub(super) async fn run(data_dir: &Path, config: Option<&Path>, cmd: UpstreamCmd) -> Result<()> {
    match cmd {
        UpstreamCmd::Migrate => {
            let _log = init_tracing();
            let cfg = server::load_config(data_dir, config)?;
            let r = barngate::upstream::migrate(&cfg.upstream).await?;
            let bucket = &cfg.upstream.bucket;
            let schema = if r.schema.applied.is_empty() {
                format!("cloud schema at version {} (up to date)", r.schema.to)
            } else {
                format!(
                    "cloud schema migrated from version {} to {}",
                    r.schema.from, r.schema.to
                )
            };
            if r.bucket_created {
                eprintln!("{schema}; bucket {bucket} created");
            } else {
                eprintln!("{schema}; bucket {bucket} already there");
            }
            Ok(())
        }
    }
}
