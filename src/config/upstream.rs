//! `[upstream]`: store-and-forward to the cloud, its secrets from the
//! environment, and its checks.

use super::{at_least, invalid, within, ConfigError};
use serde::{Deserialize, Serialize};

/// Store-and-forward to the cloud (PostgreSQL + S3-compatible storage).
/// Secrets may come from `BARNGATE_UPSTREAM_*` environment variables instead
/// of the file; `Debug` never prints them.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Forward results upstream.
    pub enabled: bool,
    /// PostgreSQL connection string (`postgres://user:pass@host:5432/db?sslmode=require`).
    pub postgres_url: String,
    /// Object storage bucket for image bytes.
    pub bucket: String,
    /// S3-compatible endpoint URL (path-style addressing).
    pub endpoint: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// First retry delay after a failure; doubles up to `backoff_max_s`.
    pub backoff_initial_ms: u64,
    pub backoff_max_s: u64,
    /// Outbox items delivered per round trip.
    pub batch_size: usize,
    /// Uploaded images stay on local disk this long.
    pub retention_days: u32,
    /// Disk usage (percent) at which an alert is raised and the oldest
    /// uploaded images are deleted locally, whatever their age.
    pub disk_high_water_percent: u8,
    /// TLS to PostgreSQL: `""` (as the URL's `sslmode` says), `disable`,
    /// `require` or `verify-full`. barngate never accepts a certificate it
    /// cannot verify, so `require` verifies like `verify-full`.
    pub pg_sslmode: String,
    /// A PEM file of CA certificates trusted for PostgreSQL besides the
    /// public (webpki) roots; empty = none.
    pub pg_ca: String,
    /// What `device_images.image_url` holds: `path` (endpoint/bucket/key),
    /// `public` (`public_base_url` + key) or `presigned` (a signed GET URL
    /// valid `presign_expiry_s`).
    pub image_url: String,
    pub public_base_url: String,
    pub presign_expiry_s: u32,
    /// With nothing queued, the connection to both sinks (and their
    /// credentials) is checked this often.
    pub check_interval_s: u64,
    /// Failing this long (not a credentials error) raises an
    /// `upstream_unreachable` alert.
    pub unreachable_alert_after_s: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            enabled: false,
            postgres_url: String::new(),
            bucket: String::new(),
            endpoint: String::new(),
            region: "us-east-1".into(),
            access_key: String::new(),
            secret_key: String::new(),
            backoff_initial_ms: 1000,
            backoff_max_s: 300,
            batch_size: 200,
            retention_days: 30,
            disk_high_water_percent: 90,
            pg_sslmode: String::new(),
            pg_ca: String::new(),
            image_url: "path".into(),
            public_base_url: String::new(),
            presign_expiry_s: 604_800,
            check_interval_s: 60,
            unreachable_alert_after_s: 600,
        }
    }
}

fn redact(s: &str) -> &'static str {
    if s.is_empty() {
        "\"\""
    } else {
        "<redacted>"
    }
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("enabled", &self.enabled)
            .field("postgres_url", &redact(&self.postgres_url))
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key", &redact(&self.access_key))
            .field("secret_key", &redact(&self.secret_key))
            .field("backoff_initial_ms", &self.backoff_initial_ms)
            .field("backoff_max_s", &self.backoff_max_s)
            .field("batch_size", &self.batch_size)
            .field("retention_days", &self.retention_days)
            .field("disk_high_water_percent", &self.disk_high_water_percent)
            .field("pg_sslmode", &self.pg_sslmode)
            .field("pg_ca", &self.pg_ca)
            .field("image_url", &self.image_url)
            .field("public_base_url", &self.public_base_url)
            .field("presign_expiry_s", &self.presign_expiry_s)
            .field("check_interval_s", &self.check_interval_s)
            .field("unreachable_alert_after_s", &self.unreachable_alert_after_s)
            .finish()
    }
}

impl UpstreamConfig {
    /// Fills keys from `BARNGATE_UPSTREAM_<KEY>` environment variables (they
    /// win over the file), so secrets need not be written to disk.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let var = |k: &str| get(&format!("BARNGATE_UPSTREAM_{}", k.to_ascii_uppercase()));
        for (k, slot) in [
            ("postgres_url", &mut self.postgres_url),
            ("bucket", &mut self.bucket),
            ("endpoint", &mut self.endpoint),
            ("region", &mut self.region),
            ("access_key", &mut self.access_key),
            ("secret_key", &mut self.secret_key),
            ("pg_sslmode", &mut self.pg_sslmode),
            ("pg_ca", &mut self.pg_ca),
            ("image_url", &mut self.image_url),
            ("public_base_url", &mut self.public_base_url),
        ] {
            if let Some(v) = var(k) {
                *slot = v;
            }
        }
        if let Some(v) = var("enabled") {
            self.enabled = match v.as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" | "" => false,
                _ => {
                    return Err(invalid(
                        "upstream.enabled",
                        "BARNGATE_UPSTREAM_ENABLED must be true or false",
                    ))
                }
            };
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        at_least("upstream.backoff_initial_ms", self.backoff_initial_ms, 1)?;
        if self.backoff_max_s == 0 || self.backoff_max_s * 1000 < self.backoff_initial_ms {
            return Err(invalid(
                "upstream.backoff_max_s",
                "must be at least 1 and not below backoff_initial_ms",
            ));
        }
        within("upstream.batch_size", self.batch_size, 1..=10_000)?;
        within(
            "upstream.disk_high_water_percent",
            self.disk_high_water_percent,
            1..=100,
        )?;
        if !matches!(
            self.pg_sslmode.as_str(),
            "" | "disable" | "require" | "verify-full"
        ) {
            return Err(invalid(
                "upstream.pg_sslmode",
                "must be \"\" (as the URL says), disable, require or verify-full",
            ));
        }
        if !self.pg_ca.is_empty() {
            crate::pki::read_ca_file(std::path::Path::new(&self.pg_ca))
                .map_err(|e| invalid("upstream.pg_ca", e))?;
        }
        match self.image_url.as_str() {
            "path" | "presigned" => {}
            "public" => {
                if !self.public_base_url.starts_with("http://")
                    && !self.public_base_url.starts_with("https://")
                {
                    return Err(invalid(
                        "upstream.public_base_url",
                        "must be an http:// or https:// URL when upstream.image_url = \"public\"",
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    "upstream.image_url",
                    "must be path, public or presigned",
                ))
            }
        }
        if !(1..=604_800).contains(&self.presign_expiry_s) {
            return Err(invalid(
                "upstream.presign_expiry_s",
                "must be 1..=604800 (S3 signatures last at most 7 days)",
            ));
        }
        within(
            "upstream.check_interval_s",
            self.check_interval_s,
            1..=86_400,
        )?;
        at_least(
            "upstream.unreachable_alert_after_s",
            self.unreachable_alert_after_s,
            1,
        )?;
        if self.enabled {
            for (k, v) in [
                ("upstream.postgres_url", &self.postgres_url),
                ("upstream.bucket", &self.bucket),
                ("upstream.endpoint", &self.endpoint),
                ("upstream.access_key", &self.access_key),
                ("upstream.secret_key", &self.secret_key),
            ] {
                if v.trim().is_empty() {
                    return Err(invalid(
                        k,
                        "is required when upstream.enabled = true (file or BARNGATE_UPSTREAM_* variable)",
                    ));
                }
            }
            if !self.endpoint.starts_with("http://") && !self.endpoint.starts_with("https://") {
                return Err(invalid(
                    "upstream.endpoint",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        Ok(())
    }
}
