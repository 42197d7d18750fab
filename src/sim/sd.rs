//! The SD card: `images/`, `metadata.txt` (the full log) and
//! `pendingImage.txt` (the queue whose length is `pendingImg`).

use super::base::{io_err, SimError};
use std::io::Write as _;
use std::path::{Path, PathBuf};

// ------------------------------------------------------------------ SD card

/// One line of `metadata.txt`.
#[derive(Debug, Clone, PartialEq)]
pub struct SdEntry {
    pub name: String,
    pub timestamp: String,
    pub pending: bool,
    pub size: u32,
    pub temperature: f64,
    pub humidity: f64,
    pub pressure: f64,
    pub gas_resistance: f64,
}

impl SdEntry {
    pub(crate) fn line(&self) -> String {
        format!(
            "{}|{}|PendingToSend={}|temp={:.1}|hum={:.1}|pres={:.1}|gas={:.1}|size={}",
            self.name,
            self.timestamp,
            self.pending,
            self.temperature,
            self.humidity,
            self.pressure,
            self.gas_resistance,
            self.size
        )
    }

    pub(crate) fn parse(line: &str) -> Option<SdEntry> {
        let mut f = line.split('|');
        let name = f.next()?.to_string();
        let timestamp = f.next()?.to_string();
        let pending = f.next()?.strip_prefix("PendingToSend=")? == "true";
        let mut e = SdEntry {
            name,
            timestamp,
            pending,
            size: 0,
            temperature: 0.0,
            humidity: 0.0,
            pressure: 0.0,
            gas_resistance: 0.0,
        };
        for kv in f {
            let (k, v) = kv.split_once('=')?;
            match k {
                "temp" => e.temperature = v.parse().ok()?,
                "hum" => e.humidity = v.parse().ok()?,
                "pres" => e.pressure = v.parse().ok()?,
                "gas" => e.gas_resistance = v.parse().ok()?,
                "size" => e.size = v.parse().ok()?,
                _ => {}
            }
        }
        Some(e)
    }
}

/// A device's SD card: `images/`, `metadata.txt` (full log) and
/// `pendingImage.txt` (unsent only, oldest first; its line count is
/// `pendingImg`).
#[derive(Debug, Clone)]
pub struct SdCard {
    root: PathBuf,
}

impl SdCard {
    pub fn open(root: &Path) -> Result<SdCard, SimError> {
        let images = root.join("images");
        std::fs::create_dir_all(&images).map_err(io_err(&images))?;
        for f in ["metadata.txt", "pendingImage.txt"] {
            let p = root.join(f);
            if !p.exists() {
                std::fs::write(&p, b"").map_err(io_err(&p))?;
            }
        }
        Ok(SdCard {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn read_lines(&self, file: &str) -> Result<Vec<String>, SimError> {
        let p = self.root.join(file);
        let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
        Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect())
    }

    pub(crate) fn write_lines(&self, file: &str, lines: &[String]) -> Result<(), SimError> {
        let p = self.root.join(file);
        let tmp = self.root.join(format!("{file}.tmp"));
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io_err(&p))
    }

    pub(crate) fn append(&self, file: &str, line: &str) -> Result<(), SimError> {
        let p = self.root.join(file);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&p)
            .map_err(io_err(&p))?;
        writeln!(f, "{line}").map_err(io_err(&p))
    }

    /// Stores a capture: the image file, a `metadata.txt` line with
    /// `PendingToSend=true` and a `pendingImage.txt` line.
    pub fn store(&self, entry: &SdEntry, jpeg: &[u8]) -> Result<(), SimError> {
        let p = self.root.join("images").join(&entry.name);
        std::fs::write(&p, jpeg).map_err(io_err(&p))?;
        let e = SdEntry {
            pending: true,
            ..entry.clone()
        };
        self.append("metadata.txt", &e.line())?;
        self.append(
            "pendingImage.txt",
            &format!("{}|{}", entry.name, entry.timestamp),
        )
    }

    /// Unsent image names, oldest first.
    pub fn pending(&self) -> Result<Vec<String>, SimError> {
        Ok(self
            .read_lines("pendingImage.txt")?
            .into_iter()
            .map(|l| l.split('|').next().unwrap_or("").to_string())
            .collect())
    }

    /// `pendingImg`: the line count of `pendingImage.txt`.
    pub fn pending_count(&self) -> Result<u32, SimError> {
        Ok(self.read_lines("pendingImage.txt")?.len() as u32)
    }

    /// ACK_OK: removes `name` from `pendingImage.txt` and flips its flag in
    /// `metadata.txt`. False when it was not pending.
    pub fn mark_sent(&self, name: &str) -> Result<bool, SimError> {
        let lines = self.read_lines("pendingImage.txt")?;
        let before = lines.len();
        let kept: Vec<String> = lines
            .into_iter()
            .filter(|l| l.split('|').next() != Some(name))
            .collect();
        if kept.len() == before {
            return Ok(false);
        }
        self.write_lines("pendingImage.txt", &kept)?;
        let meta: Vec<String> = self
            .read_lines("metadata.txt")?
            .into_iter()
            .map(|l| match SdEntry::parse(&l) {
                Some(e) if e.name == name && e.pending => SdEntry {
                    pending: false,
                    ..e
                }
                .line(),
                _ => l,
            })
            .collect();
        self.write_lines("metadata.txt", &meta)?;
        Ok(true)
    }

    /// Every capture ever made, in capture order.
    pub fn entries(&self) -> Result<Vec<SdEntry>, SimError> {
        Ok(self
            .read_lines("metadata.txt")?
            .iter()
            .filter_map(|l| SdEntry::parse(l))
            .collect())
    }

    pub fn entry(&self, name: &str) -> Result<Option<SdEntry>, SimError> {
        Ok(self.entries()?.into_iter().find(|e| e.name == name))
    }

    pub fn image(&self, name: &str) -> Result<Vec<u8>, SimError> {
        let p = self.root.join("images").join(name);
        std::fs::read(&p).map_err(io_err(&p))
    }

    pub fn has_image(&self, name: &str) -> bool {
        self.root.join("images").join(name).exists()
    }
}
