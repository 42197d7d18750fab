//! `barngate admin`: gateway administration.

use anyhow::{bail, Result};
use barngate::server;
use clap::Subcommand;
use std::path::Path;

#[derive(Subcommand)]
pub(super) enum AdminCmd {
    /// Set the dashboard password (needed when HTTP is not on loopback).
    SetPassword {
        /// Read the password from the first line of stdin, without prompting.
        #[arg(long)]
        password_stdin: bool,
    },
}

pub(super) fn run(data_dir: &Path, cmd: AdminCmd) -> Result<()> {
    match cmd {
        AdminCmd::SetPassword { password_stdin } => set_password(data_dir, password_stdin),
    }
}

/// `admin set-password`: reads the password (prompting on a terminal unless
/// `--password-stdin`) and stores its argon2 hash in the data directory.
fn set_password(data_dir: &Path, from_stdin: bool) -> Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    server::ensure_data_dir(data_dir)?;
    let stdin = std::io::stdin();
    let prompt = !from_stdin && stdin.is_terminal();
    let read = |label: &str| -> Result<String> {
        if prompt {
            eprint!("{label}: ");
            std::io::stderr().flush()?;
        }
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    };
    let pw = read("New dashboard password")?;
    if prompt && read("Repeat it")? != pw {
        bail!("the passwords differ; nothing changed");
    }
    barngate::http::auth::set_password(data_dir, &pw)?;
    eprintln!(
        "dashboard password set ({}); a running gateway uses it at the next login",
        barngate::http::auth::password_path(data_dir).display()
    );
    Ok(())
}
