//! `barngate ca`: the site certificate authority.

use anyhow::Result;
use barngate::server;
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub(super) enum CaCmd {
    /// Create the site root CA, its issuing intermediate and the gateway's
    /// TLS server certificate (ECDSA P-256) under <data-dir>/certs. `serve`
    /// does this on first start.
    Init {
        /// DNS name devices use to reach the gateway (repeatable).
        #[arg(long = "hostname")]
        hostnames: Vec<String>,
        /// IP address devices use to reach the gateway (repeatable).
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
    },
    /// Copy the root CA certificate and key to DIR (key 0600), to keep
    /// offline before `ca remove-root-key`.
    ExportRoot {
        #[arg(long)]
        out: PathBuf,
    },
    /// Delete the root CA key from the gateway. Devices and the server
    /// certificate are signed by the intermediate from then on; creating a
    /// new intermediate (or CA) needs the exported key.
    RemoveRootKey,
}

pub(super) fn run(data_dir: &Path, cmd: CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Init { hostnames, ips } => {
            server::ensure_data_dir(data_dir)?;
            let pki = server::pki(data_dir);
            let mut opts = barngate::pki::CaInitOptions::detected();
            opts.hostnames.extend(hostnames);
            opts.ips.extend(ips);
            let r = pki.init_ca(&opts)?;
            println!("site CA:            {}", r.ca_cert_path.display());
            println!("CA fingerprint:     {}", r.ca_fingerprint_sha256);
            println!("CA valid until:     {}", r.ca_not_after.to_rfc3339());
            println!("server certificate: {}", r.server.cert_path.display());
            println!("server names:       {}", r.server.sans.join(", "));
            println!("issuing CA:         {}", pki.issuing_cert_path().display());
            println!("root CA key:        {} (export it with `barngate ca export-root --out DIR`, then `barngate ca remove-root-key`)", pki.ca_key_path().display());
            Ok(())
        }
        CaCmd::ExportRoot { out } => {
            let pki = server::pki(data_dir);
            for f in pki.export_root(&out)? {
                println!("exported {}", f.display());
            }
            println!("keep these offline: the key is needed to create a new issuing CA");
            Ok(())
        }
        CaCmd::RemoveRootKey => {
            let pki = server::pki(data_dir);
            let removed = pki.remove_root_key()?;
            println!(
                "removed {}; devices are issued by {}",
                removed.display(),
                pki.issuing_cert_path().display()
            );
            Ok(())
        }
    }
}
