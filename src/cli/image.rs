//! `barngate image`: images received.

use anyhow::{Context, Result};
use barngate::admin::{Exported, ImageView, Request};
use base64::Engine as _;
use clap::Subcommand;
use std::path::{Path, PathBuf};

use super::query::query;

#[derive(Subcommand)]
pub(super) enum ImageCmd {
    /// List complete images, oldest first.
    List {
        /// Only this device (MAC, any common spelling).
        #[arg(long)]
        device: Option<String>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Write one complete image to a file.
    Export {
        #[arg(long)]
        device: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
}

pub(super) async fn run(data_dir: &Path, cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::List { device, json } => {
            let v = query(data_dir, Request::ImageList { device }).await?;
            let images: Vec<ImageView> = serde_json::from_value(v)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else if images.is_empty() {
                println!("no images");
            } else {
                println!(
                    "{:<14} {:<32} {:>8} {:<9} {:<25} SHA-256",
                    "DEVICE", "IMAGE", "BYTES", "ORIGIN", "RECEIVED"
                );
                for i in images {
                    println!(
                        "{:<14} {:<32} {:>8} {:<9} {:<25} {}",
                        i.device,
                        i.image_name,
                        i.size,
                        i.origin,
                        i.received_at.to_rfc3339(),
                        i.sha256
                    );
                }
            }
            Ok(())
        }
        ImageCmd::Export { device, name, out } => {
            let v = query(data_dir, Request::ImageExport { device, name }).await?;
            let e: Exported = serde_json::from_value(v)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(e.data)
                .context("image data from the gateway is not base64")?;
            std::fs::write(&out, &bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!(
                "wrote {} ({} bytes, sha256 {}) from device {}",
                out.display(),
                bytes.len(),
                e.image.sha256,
                e.image.device
            );
            Ok(())
        }
    }
}
