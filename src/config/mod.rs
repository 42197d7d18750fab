//! The gateway's one TOML configuration file: one struct per section, a
//! compiled-in default for every key, validation that names the bad key.
//! `config/barngate.toml` is the commented template (`barngate configfile`).

use crate::protocol::Dialect;
use chrono::NaiveTime;
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

mod upstream;
pub use upstream::UpstreamConfig;

/// The commented template, identical to `config/barngate.toml`.
pub const TEMPLATE: &str = include_str!("../../config/barngate.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// `Err` naming `key` unless `v` is at least `min`.
fn at_least<T: PartialOrd + std::fmt::Display>(key: &str, v: T, min: T) -> Result<(), ConfigError> {
    if v < min {
        return Err(invalid(key, format!("must be at least {min}")));
    }
    Ok(())
}

/// `Err` naming `key` unless `v` is in `range`.
fn within<T: PartialOrd + std::fmt::Display>(
    key: &str,
    v: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<(), ConfigError> {
    if !range.contains(&v) {
        return Err(invalid(
            key,
            format!("must be {}..={}", range.start(), range.end()),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub site: SiteConfig,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub ingest: IngestConfig,
    pub schedule: ScheduleConfig,
    pub upstream: UpstreamConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SiteConfig {
    /// Site identifier, used upstream.
    pub id: String,
    /// IANA time zone for `5:30PM` wake times and schedules; empty = the system's.
    pub timezone: String,
    /// Dialect for devices the registry does not pin.
    pub default_dialect: Dialect,
    /// Register unknown devices on first contact.
    pub auto_register: bool,
}

impl Default for SiteConfig {
    fn default() -> Self {
        SiteConfig {
            id: "site-1".into(),
            timezone: String::new(),
            default_dialect: Dialect::Firmware,
            auto_register: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Where devices connect: MQTT over TLS with a client certificate.
    pub listen: SocketAddr,
    /// Longest time a device may take to complete the TLS handshake.
    pub handshake_timeout_ms: u64,
    /// Most TLS handshakes in progress at once on each TLS listener
    /// (slowloris guard).
    pub max_handshakes: usize,
    /// Of those, most from one source address.
    pub max_handshakes_per_ip: usize,
    /// Plaintext MQTT listener (no certificate; the client id is trusted as
    /// the identity). Off unless set; loopback addresses only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plain_listen: Option<SocketAddr>,
    /// TLS listener for devices that log in with a per-device password
    /// (`device issue --password`) instead of a client certificate. Off
    /// unless set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_listen: Option<SocketAddr>,
    /// Largest MQTT packet accepted from a device, in bytes.
    pub max_payload_size: usize,
    /// Most simultaneous device connections.
    pub max_connections: usize,
    /// Broker in-memory log per topic filter: segment size (bytes) and count.
    pub segment_size: usize,
    pub segment_count: usize,
    /// Deprecated and ignored: every device session is served by the
    /// embedded broker. Accepted so that an existing config file still
    /// loads; the gateway logs a warning naming the key
    /// ([`MqttConfig::deprecated_keys`]).
    #[serde(skip_serializing)]
    pub local_sessions: Option<bool>,
    /// Most topic filters in one SUBSCRIBE; more close the connection.
    pub max_filters_per_subscribe: usize,
    /// Most distinct topic filters one connection subscribes to (an
    /// UNSUBSCRIBE gives none back); more close the connection.
    pub max_filters_per_session: usize,
}

impl MqttConfig {
    /// The keys set in the file that are deprecated and ignored, with why.
    pub fn deprecated_keys(&self) -> Vec<(&'static str, &'static str)> {
        let mut keys = Vec::new();
        if self.local_sessions.is_some() {
            keys.push((
                "mqtt.local_sessions",
                "every device session is served by the embedded broker; remove the key",
            ));
        }
        keys
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: "0.0.0.0:8883".parse().expect("valid default"),
            handshake_timeout_ms: 10_000,
            max_handshakes: 64,
            max_handshakes_per_ip: 8,
            plain_listen: None,
            password_listen: None,
            max_payload_size: 256 * 1024,
            max_connections: 12_000,
            segment_size: 4 * 1024 * 1024,
            segment_count: 4,
            local_sessions: None,
            max_filters_per_subscribe: 8,
            max_filters_per_session: 16,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Dashboard, /metrics and /healthz.
    pub listen: SocketAddr,
    /// `/login` password checks (argon2, ~19 MiB and a core each) running
    /// at once; the others wait.
    pub login_concurrency: usize,
    /// How long a login waits for a check before it is answered 503.
    pub login_wait_ms: u64,
    /// Failed logins from one source address within `login_window_s`
    /// that lock the address out (429) for `login_lockout_s`.
    pub login_max_failures: u32,
    pub login_window_s: u64,
    pub login_lockout_s: u64,
    /// The session cookie's `Secure` attribute: `auto` sets it on a request
    /// a TLS-terminating proxy marks as HTTPS (`X-Forwarded-Proto: https`
    /// or `Forwarded: proto=https`), `always` on every login, `never` not.
    pub secure_cookies: SecureCookies,
    /// `/metrics` needs a dashboard login too (only where pages do: HTTP
    /// not on loopback). Off by default so a Prometheus scraper can read it.
    pub metrics_require_login: bool,
}

/// When the session cookie is marked `Secure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecureCookies {
    Auto,
    Always,
    Never,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".parse().expect("valid default"),
            login_concurrency: 1,
            login_wait_ms: 5_000,
            login_max_failures: 5,
            login_window_s: 60,
            login_lockout_s: 300,
            secure_cookies: SecureCookies::Auto,
            metrics_require_login: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Quiet time on a stream after which missing chunks are requested.
    pub quiet_gap_ms: u64,
    /// Longest wait for a round of chunks before requesting what is missing.
    pub hard_timeout_s: u64,
    /// Rounds of `missing_chunks` before a capture is `failed`.
    pub retry_limit: u32,
    /// Devices allowed to stream an image at once (back-pressure).
    pub max_streaming: usize,
    /// Largest image accepted, in bytes.
    pub max_image_size: u32,
    /// Longest time received chunks wait in memory before a commit.
    pub commit_interval_ms: u64,
    /// Chunk bytes of unfinished images kept in memory until their image
    /// completes, across all devices; beyond it chunks are written as they
    /// come. Memory stays bounded by this, not by the bytes in flight.
    pub held_chunk_bytes: usize,
    /// Most chunks one image may have (`ceil(image_size / max_chunk_size)`):
    /// bounds a capture's chunk map and so sets a minimum chunk size.
    pub max_chunks_per_image: u32,
    /// Most chunk ids in one `missing_chunks` message; longer lists are
    /// requested a page at a time (an ESP32 MQTT client's buffer is a few KiB).
    pub max_missing_ids: usize,
    /// Images a device may stream chunks for without their METADATA at once;
    /// chunks for a further image are refused.
    pub max_unannounced_per_device: usize,
    /// Unfinished (announced, neither complete nor failed) captures a device
    /// may have stored; announcing one more fails its oldest, whose chunks
    /// are dropped (the device still holds the image and may send it again).
    pub max_open_captures_per_device: usize,
    /// Wakes on which a METADATA that cannot be accepted is refused (the
    /// device keeps the image and sleeps) before it is released with ACK_OK,
    /// so one bad image cannot stop a device's backlog forever.
    pub release_after_refusals: u32,
    /// Commands sent to devices kept in the database (the oldest go first).
    pub max_stored_commands: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            quiet_gap_ms: 2000,
            hard_timeout_s: 60,
            retry_limit: 3,
            max_streaming: 48,
            max_image_size: 8 * 1024 * 1024,
            commit_interval_ms: 200,
            held_chunk_bytes: 8 * 1024 * 1024,
            max_chunks_per_image: 16_384,
            max_missing_ids: 256,
            max_unannounced_per_device: 2,
            max_open_captures_per_device: 16,
            release_after_refusals: 3,
            max_stored_commands: 100_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Capture times of day, site time, `HH:MM`.
    pub times: Vec<String>,
    /// Devices' wakes are spread over this many minutes after each time.
    pub window_minutes: u32,
    /// Distinct wake slots inside the window.
    pub slots: u32,
    /// A device waking this early for its slot (clock drift) still counts for it.
    pub early_tolerance_minutes: u32,
    /// Per-device capture times, by MAC.
    pub devices: BTreeMap<String, Vec<String>>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            times: vec!["08:00".into(), "16:00".into()],
            window_minutes: 60,
            slots: 3600,
            early_tolerance_minutes: 20,
            devices: BTreeMap::new(),
        }
    }
}

pub fn parse_time_of_day(s: &str) -> Option<NaiveTime> {
    NaiveTime::parse_from_str(s, "%H:%M").ok()
}

impl Config {
    /// Parses TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the file, then applies `BARNGATE_UPSTREAM_*` environment variables.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        cfg.upstream.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.timezone()?;
        if self.site.id.trim().is_empty() {
            return Err(invalid("site.id", "must not be empty"));
        }
        let times = |key: &str, v: &[String]| -> Result<(), ConfigError> {
            if v.is_empty() {
                return Err(invalid(key, "needs at least one HH:MM time"));
            }
            for t in v {
                if parse_time_of_day(t).is_none() {
                    return Err(invalid(key, format!("{t:?} is not a HH:MM time")));
                }
            }
            Ok(())
        };
        times("schedule.times", &self.schedule.times)?;
        for (mac, v) in &self.schedule.devices {
            crate::protocol::normalize_device_id(mac)
                .map_err(|e| invalid(format!("schedule.devices.{mac}"), e.to_string()))?;
            times(&format!("schedule.devices.{mac}"), v)?;
        }
        within(
            "schedule.window_minutes",
            self.schedule.window_minutes,
            1..=12 * 60,
        )?;
        at_least("schedule.slots", self.schedule.slots, 1)?;
        at_least("ingest.retry_limit", self.ingest.retry_limit, 1)?;
        at_least("ingest.max_streaming", self.ingest.max_streaming, 1)?;
        at_least("ingest.quiet_gap_ms", self.ingest.quiet_gap_ms, 1)?;
        at_least("ingest.hard_timeout_s", self.ingest.hard_timeout_s, 1)?;
        at_least("ingest.max_image_size", self.ingest.max_image_size, 1)?;
        at_least(
            "ingest.max_chunks_per_image",
            self.ingest.max_chunks_per_image,
            1,
        )?;
        within(
            "ingest.max_missing_ids",
            self.ingest.max_missing_ids,
            1..=4096,
        )?;
        at_least(
            "ingest.max_unannounced_per_device",
            self.ingest.max_unannounced_per_device,
            1,
        )?;
        at_least(
            "ingest.max_open_captures_per_device",
            self.ingest.max_open_captures_per_device,
            1,
        )?;
        at_least(
            "ingest.release_after_refusals",
            self.ingest.release_after_refusals,
            1,
        )?;
        at_least(
            "ingest.max_stored_commands",
            self.ingest.max_stored_commands,
            100,
        )?;
        at_least("mqtt.segment_size", self.mqtt.segment_size, 1024)?;
        at_least("mqtt.segment_count", self.mqtt.segment_count, 1)?;
        at_least("mqtt.max_connections", self.mqtt.max_connections, 1)?;
        at_least(
            "mqtt.handshake_timeout_ms",
            self.mqtt.handshake_timeout_ms,
            1,
        )?;
        at_least("mqtt.max_handshakes", self.mqtt.max_handshakes, 1)?;
        at_least(
            "mqtt.max_handshakes_per_ip",
            self.mqtt.max_handshakes_per_ip,
            1,
        )?;
        if let Some(a) = self.mqtt.plain_listen {
            if !a.ip().is_loopback() {
                return Err(invalid(
                    "mqtt.plain_listen",
                    format!("{a} is not a loopback address (plaintext MQTT carries no identity)"),
                ));
            }
        }
        if let Some(a) = self.mqtt.password_listen {
            if a.port() != 0 && a.port() == self.mqtt.listen.port() {
                return Err(invalid(
                    "mqtt.password_listen",
                    format!("{a} uses the port of mqtt.listen"),
                ));
            }
        }
        at_least(
            "mqtt.max_filters_per_subscribe",
            self.mqtt.max_filters_per_subscribe,
            1,
        )?;
        if self.mqtt.max_filters_per_session < 2 {
            return Err(invalid(
                "mqtt.max_filters_per_session",
                "must be at least 2 (a device subscribes to its cmd and ack topics)",
            ));
        }
        at_least("mqtt.max_payload_size", self.mqtt.max_payload_size, 1024)?;
        within("http.login_concurrency", self.http.login_concurrency, 1..=4)?;
        if self.http.login_wait_ms > 60_000 {
            return Err(invalid("http.login_wait_ms", "must be at most 60000"));
        }
        at_least("http.login_max_failures", self.http.login_max_failures, 1)?;
        at_least("http.login_window_s", self.http.login_window_s, 1)?;
        at_least("http.login_lockout_s", self.http.login_lockout_s, 1)?;
        self.upstream.validate()?;
        Ok(())
    }

    /// The site's time zone: the configured one, else the system's, else UTC.
    pub fn timezone(&self) -> Result<Tz, ConfigError> {
        if self.site.timezone.is_empty() {
            return Ok(iana_time_zone::get_timezone()
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(Tz::UTC));
        }
        self.site.timezone.parse().map_err(|_| {
            invalid(
                "site.timezone",
                format!("{:?} is not an IANA time zone", self.site.timezone),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses_to_the_defaults() {
        let t = Config::from_toml(TEMPLATE, "template").unwrap();
        let d = Config::default();
        assert_eq!(
            toml::to_string(&t).unwrap(),
            toml::to_string(&d).unwrap(),
            "config/barngate.toml must document exactly the compiled-in defaults"
        );
    }

    /// A file from before every session went through the broker still loads;
    /// the key is reported as deprecated, and not written back.
    #[test]
    fn local_sessions_is_accepted_as_deprecated() {
        let c = Config::from_toml("[mqtt]\nlocal_sessions = false\n", "old").unwrap();
        assert_eq!(c.mqtt.deprecated_keys()[0].0, "mqtt.local_sessions");
        assert!(!toml::to_string(&c).unwrap().contains("local_sessions"));
        assert!(Config::default().mqtt.deprecated_keys().is_empty());
    }

    #[test]
    fn template_names_every_key() {
        fn keys(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    let path = format!("{prefix}{k}");
                    keys(v, &format!("{path}."), out);
                    out.push(path);
                }
            }
        }
        let (mut want, mut have) = (Vec::new(), Vec::new());
        keys(
            &toml::Value::try_from(Config::default()).unwrap(),
            "",
            &mut want,
        );
        keys(&TEMPLATE.parse::<toml::Value>().unwrap(), "", &mut have);
        let missing: Vec<&String> = want.iter().filter(|k| !have.contains(k)).collect();
        assert!(missing.is_empty(), "config/barngate.toml lacks {missing:?}");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let c = Config::from_toml("", "empty").unwrap();
        assert_eq!(c.ingest.retry_limit, 3);
        assert_eq!(c.schedule.times, vec!["08:00", "16:00"]);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[ingest]\nretry_limit = 0\n", "x").unwrap_err();
        assert!(e.to_string().contains("ingest.retry_limit"), "{e}");
        let e = Config::from_toml("[schedule]\ntimes = [\"25:00\"]\n", "x").unwrap_err();
        assert!(e.to_string().contains("schedule.times"), "{e}");
        let e = Config::from_toml("[site]\ntimezone = \"Mars/Base\"\n", "x").unwrap_err();
        assert!(e.to_string().contains("site.timezone"), "{e}");
        let e = Config::from_toml("[mqtt]\nplain_listen = \"0.0.0.0:1883\"\n", "x").unwrap_err();
        assert!(e.to_string().contains("mqtt.plain_listen"), "{e}");
        let c = Config::from_toml("[mqtt]\nplain_listen = \"127.0.0.1:1883\"\n", "x").unwrap();
        assert_eq!(c.mqtt.plain_listen, Some("127.0.0.1:1883".parse().unwrap()));
        let e = Config::from_toml("[mqtt]\nmax_handshakes_per_ip = 0\n", "x").unwrap_err();
        assert!(e.to_string().contains("mqtt.max_handshakes_per_ip"), "{e}");
        let e = Config::from_toml("[mqtt]\nmax_filters_per_session = 1\n", "x").unwrap_err();
        assert!(
            e.to_string().contains("mqtt.max_filters_per_session"),
            "{e}"
        );
        let e = Config::from_toml("[mqtt]\nmax_filters_per_subscribe = 0\n", "x").unwrap_err();
        assert!(
            e.to_string().contains("mqtt.max_filters_per_subscribe"),
            "{e}"
        );
        for key in [
            "login_concurrency = 0",
            "login_concurrency = 5",
            "login_max_failures = 0",
            "login_window_s = 0",
            "login_lockout_s = 0",
            "login_wait_ms = 600000",
        ] {
            let e = Config::from_toml(&format!("[http]\n{key}\n"), "x").unwrap_err();
            let name = key.split(' ').next().unwrap();
            assert!(e.to_string().contains(&format!("http.{name}")), "{e}");
        }
        let e = Config::from_toml("[http]\nsecure_cookies = \"sometimes\"\n", "x").unwrap_err();
        assert!(e.to_string().contains("secure_cookies"), "{e}");
        let e = Config::from_toml("[ingest]\nbogus = 1\n", "x").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::from_toml("[ingest]\nretry_limit = \"three\"\n", "x").unwrap_err();
        assert!(e.to_string().contains("retry_limit"), "{e}");
        let e = Config::from_toml("[upstream]\nenabled = true\n", "x").unwrap_err();
        assert!(e.to_string().contains("upstream.postgres_url"), "{e}");
    }

    #[test]
    fn upstream_secrets_come_from_env_and_are_never_printed() {
        let mut u = UpstreamConfig::default();
        u.apply_env(|k| match k {
            "BARNGATE_UPSTREAM_SECRET_KEY" => Some("s3cr3t".into()),
            "BARNGATE_UPSTREAM_POSTGRES_URL" => Some("postgres://u:pw@h/db".into()),
            "BARNGATE_UPSTREAM_ENABLED" => Some("true".into()),
            _ => None,
        })
        .unwrap();
        assert!(u.enabled);
        assert_eq!(u.secret_key, "s3cr3t");
        let dbg = format!("{u:?}");
        assert!(!dbg.contains("s3cr3t") && !dbg.contains("pw@"), "{dbg}");
    }
}
