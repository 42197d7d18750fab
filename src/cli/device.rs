//! `barngate device`: devices in the registry.

use anyhow::Result;
use barngate::admin::{self, Request};
use barngate::provision::{self, RegistryChange};
use barngate::server::{self, DB_FILE};
use clap::Subcommand;
use std::path::{Path, PathBuf};

use super::query::query;

#[derive(Subcommand)]
pub(super) enum DeviceCmd {
    /// Issue a device certificate, register the device and write
    /// {MAC}.crt.pem, {MAC}.key.pem, ca.crt.pem and {MAC}.h into --out.
    /// Re-issuing rotates: the previous certificate (and password) stops working.
    Issue {
        /// The device's MAC (any common spelling).
        mac: String,
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        location: Option<String>,
        /// Pin the device's dialect: firmware or v1.
        #[arg(long)]
        dialect: Option<barngate::protocol::Dialect>,
        /// Certificate validity in days.
        #[arg(long, default_value_t = barngate::pki::DEFAULT_DEVICE_DAYS)]
        days: u32,
        /// Output directory for the device's files.
        #[arg(long)]
        out: PathBuf,
        /// Also issue a random MQTT password for the password listener
        /// (mqtt.password_listen): printed once, written to {MAC}.password
        /// and into {MAC}.h; only its argon2 hash is kept. Without it, a
        /// re-issue removes the device's password.
        #[arg(long)]
        password: bool,
    },
    /// Revoke a device: its certificate stops working at once (also on the
    /// running gateway, whose open session with it is closed).
    Revoke {
        /// The device's MAC (any common spelling).
        mac: String,
    },
    /// List registered devices.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn run(data_dir: &Path, config: Option<&Path>, cmd: DeviceCmd) -> Result<()> {
    match cmd {
        DeviceCmd::Issue {
            mac,
            site,
            location,
            dialect,
            days,
            out,
            password,
        } => {
            let pki = server::pki(data_dir);
            let password = password.then(barngate::devpass::generate);
            let now = chrono::Utc::now();
            let issued = pki.issue_device_with(&mac, days, &out, password.as_deref(), now)?;
            // The hash is in place before the registry change: on a running
            // gateway that change revokes the previous serial (and with it
            // the previous password).
            let passwords = barngate::devpass::PasswordStore::new(pki.dir());
            let had_password = match &password {
                Some(pw) => {
                    passwords.set(&issued.mac, &issued.serial_hex, pw, now)?;
                    false
                }
                None => passwords.remove(&issued.mac)?,
            };
            let change = RegistryChange::Issue {
                mac: issued.mac.clone(),
                serial: issued.serial_hex.clone(),
                site,
                location,
                dialect,
            };
            let o = registry(data_dir, config, &pki, change).await?;
            println!(
                "device {} registered (serial {})",
                issued.mac, issued.serial_hex
            );
            println!("valid until {}", issued.not_after.to_rfc3339());
            for p in [
                &issued.paths.cert,
                &issued.paths.key,
                &issued.paths.ca_cert,
                &issued.paths.header,
            ] {
                println!("  {}", p.display());
            }
            if let (Some(pw), Some(p)) = (&password, &issued.paths.password) {
                println!("  {}", p.display());
                println!("MQTT user name: {}", issued.mac);
                println!("MQTT password:  {pw}");
                println!("(shown once; only its hash is kept)");
            }
            if had_password {
                println!("previous MQTT password removed");
            }
            for s in o.revoked_serials {
                println!("previous certificate {s} revoked");
            }
            Ok(())
        }
        DeviceCmd::Revoke { mac } => {
            let pki = server::pki(data_dir);
            let o = registry(data_dir, config, &pki, RegistryChange::Revoke { mac }).await?;
            println!("device {} revoked", o.device.mac);
            for s in o.revoked_serials {
                println!("certificate {s} revoked");
            }
            for d in o.closed_sessions {
                println!("open session of {d} closed");
            }
            Ok(())
        }
        DeviceCmd::List { json } => {
            let v = query(data_dir, Request::DeviceList).await?;
            let devices: Vec<admin::DeviceView> = serde_json::from_value(v)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else if devices.is_empty() {
                println!("no devices registered");
            } else {
                println!(
                    "{:<14} {:<9} {:<8} {:<25} {:<25} {:>7}",
                    "DEVICE", "DIALECT", "STATUS", "LAST SEEN", "NEXT WAKE", "PENDING"
                );
                for d in devices {
                    let t = |t: Option<chrono::DateTime<chrono::Utc>>| {
                        t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
                    };
                    println!(
                        "{:<14} {:<9} {:<8} {:<25} {:<25} {:>7}",
                        d.mac,
                        d.dialect,
                        d.status,
                        t(d.last_seen),
                        t(d.next_wake),
                        d.pending_reported
                    );
                }
            }
            Ok(())
        }
    }
}

/// A registry change through the running gateway, or on the database.
async fn registry(
    data_dir: &Path,
    config: Option<&Path>,
    pki: &barngate::pki::Pki,
    change: RegistryChange,
) -> Result<barngate::provision::RegistryOutcome> {
    let cfg = if config.is_some() || data_dir.join(server::CONFIG_FILE).exists() {
        server::load_config(data_dir, config)?
    } else {
        barngate::config::Config::default()
    };
    server::ensure_data_dir(data_dir)?;
    Ok(provision::apply(data_dir, &data_dir.join(DB_FILE), pki, &cfg, change).await?)
}
