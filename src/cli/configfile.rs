//! `barngate configfile`: the commented configuration template.

use anyhow::Result;

pub(super) fn run() -> Result<()> {
    print!("{}", barngate::config::TEMPLATE);
    Ok(())
}
