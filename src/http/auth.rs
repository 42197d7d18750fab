//! The dashboard login, required when HTTP is bound to anything but
//! loopback: one admin password, stored as an argon2 hash in
//! `<data_dir>/admin.passwd` (0600), and random session tokens held in
//! memory, sent as an HttpOnly, SameSite=Strict cookie that expires (and
//! `Secure` behind TLS: `http.secure_cookies`).
//!
//! Password checks are bounded ([`LoginLimits`]): at most
//! `http.login_concurrency` argon2 verifications run at once, and a source
//! address with `http.login_max_failures` failures within
//! `http.login_window_s` is refused (429) for `http.login_lockout_s`
//! without a check.

use crate::clock::SharedClock;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chrono::{DateTime, Duration, Utc};
use rand_core::{OsRng, RngCore};
use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub const PASSWORD_FILE: &str = "admin.passwd";
pub const COOKIE: &str = "barngate_session";
/// A login lasts this long.
pub const SESSION_TTL: Duration = Duration::hours(12);
/// Most sessions held at once (oldest dropped first).
const MAX_SESSIONS: usize = 256;
pub const MIN_PASSWORD_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the password must be at least {MIN_PASSWORD_LEN} characters")]
    TooShort,
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

pub fn password_path(data_dir: &Path) -> PathBuf {
    data_dir.join(PASSWORD_FILE)
}

/// Hashes `password` (argon2id, random salt) and writes it atomically, 0600.
pub fn set_password(data_dir: &Path, password: &str) -> Result<(), AuthError> {
    use std::os::unix::fs::OpenOptionsExt;
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(AuthError::TooShort);
    }
    let salt = SaltString::generate(&mut OsRng);
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| AuthError::Hash(e.to_string()))?
        .to_string();
    let path = password_path(data_dir);
    let tmp = data_dir.join(format!("{PASSWORD_FILE}.tmp"));
    let io = |what| {
        let p = path.display().to_string();
        move |source| AuthError::Io {
            what,
            path: p,
            source,
        }
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("cannot write"))?;
    f.write_all(format!("{hash}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io("cannot write"))?;
    std::fs::rename(&tmp, &path).map_err(io("cannot replace"))?;
    Ok(())
}

/// True when a password is set and `password` matches it. Slow (argon2):
/// call from `spawn_blocking`.
pub fn verify_password(data_dir: &Path, password: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(password_path(data_dir)) else {
        return false;
    };
    let Ok(hash) = PasswordHash::new(text.trim()) else {
        tracing::warn!(path = %password_path(data_dir).display(), "admin password file is not an argon2 hash; run `barngate admin set-password`");
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &hash)
        .is_ok()
}

pub fn password_is_set(data_dir: &Path) -> bool {
    password_path(data_dir).exists()
}

/// Logged-in sessions: token → expiry.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, DateTime<Utc>>>,
}

impl Sessions {
    /// A new session token valid until `now + SESSION_TTL`.
    pub fn create(&self, now: DateTime<Utc>) -> String {
        let mut raw = [0u8; 32];
        OsRng.fill_bytes(&mut raw);
        let token = hex::encode(raw);
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, exp| *exp > now);
        if m.len() >= MAX_SESSIONS {
            if let Some(oldest) = m.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone()) {
                m.remove(&oldest);
            }
        }
        m.insert(token.clone(), now + SESSION_TTL);
        token
    }

    pub fn valid(&self, token: &str, now: DateTime<Utc>) -> bool {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.get(token).is_some_and(|exp| *exp > now)
    }

    pub fn remove(&self, token: &str) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(token);
    }
}

/// The session token in a `Cookie` header, if any.
pub fn token_from_cookies(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// The session cookie; `secure` adds `Secure` (sent over HTTPS only).
pub fn set_cookie(token: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        SESSION_TTL.num_seconds(),
        if secure { "; Secure" } else { "" }
    )
}

pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

/// Source addresses whose failed logins are remembered at once; beyond it
/// the address with the oldest failure is forgotten first.
const MAX_TRACKED: usize = 4096;

/// The bounds on `/login`: concurrent password checks, and failures per
/// source address.
/// Failure times come from the gateway's clock.
pub struct LoginLimits {
    checks: Arc<Semaphore>,
    wait: std::time::Duration,
    max_failures: usize,
    window: chrono::Duration,
    lockout: chrono::Duration,
    clock: SharedClock,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Default)]
struct Failures {
    /// Failures within the window, oldest first.
    at: VecDeque<DateTime<Utc>>,
    locked_until: Option<DateTime<Utc>>,
}

impl Failures {
    fn stale(&self, now: DateTime<Utc>, window: chrono::Duration) -> bool {
        self.locked_until.is_none_or(|t| t <= now)
            && self.at.back().is_none_or(|t| now - *t >= window)
    }
}

/// Why a login was not checked.
#[derive(Debug, PartialEq, Eq)]
pub enum NotChecked {
    /// The address is locked out for this long.
    LockedOut(std::time::Duration),
    /// No check became free within `http.login_wait_ms`.
    Busy,
}

impl LoginLimits {
    pub fn new(cfg: &crate::config::HttpConfig, clock: SharedClock) -> LoginLimits {
        let secs = |s: u64| chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000));
        LoginLimits {
            checks: Arc::new(Semaphore::new(cfg.login_concurrency)),
            wait: std::time::Duration::from_millis(cfg.login_wait_ms),
            max_failures: cfg.login_max_failures as usize,
            window: secs(cfg.login_window_s),
            lockout: secs(cfg.login_lockout_s),
            clock,
            failures: Mutex::default(),
        }
    }

    /// A place among the password checks for a login from `ip`: refused
    /// at once if `ip` is locked out, or after `http.login_wait_ms` if
    /// every check stays busy.
    pub async fn admit(&self, ip: IpAddr) -> Result<OwnedSemaphorePermit, NotChecked> {
        self.locked(ip, self.clock.now())
            .map_or(Ok(()), |d| Err(NotChecked::LockedOut(d)))?;
        let permit = tokio::time::timeout(self.wait, self.checks.clone().acquire_owned()).await;
        let permit = match permit {
            Ok(Ok(p)) => p,
            _ => return Err(NotChecked::Busy),
        };
        // Locked out while it waited (by another login from the address).
        self.locked(ip, self.clock.now())
            .map_or(Ok(permit), |d| Err(NotChecked::LockedOut(d)))
    }

    fn locked(&self, ip: IpAddr, now: DateTime<Utc>) -> Option<std::time::Duration> {
        let m = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&ip)
            .and_then(|f| f.locked_until)
            .filter(|t| *t > now)
            .map(|t| (t - now).to_std().unwrap_or_default())
    }

    /// Records a failed login from `ip`; true when it locks `ip` out.
    pub fn failed(&self, ip: IpAddr) -> bool {
        let now = self.clock.now();
        let mut m = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if !m.contains_key(&ip) && m.len() >= MAX_TRACKED {
            m.retain(|_, f| !f.stale(now, self.window));
            if m.len() >= MAX_TRACKED {
                let oldest = m
                    .iter()
                    .filter(|(_, f)| f.locked_until.is_none_or(|t| t <= now))
                    .min_by_key(|(_, f)| f.at.back().copied())
                    .map(|(k, _)| *k);
                match oldest {
                    Some(k) => {
                        m.remove(&k);
                    }
                    // Every tracked address is locked out: this one is
                    // not remembered (it is still bounded by the checks).
                    None => return false,
                }
            }
        }
        let f = m.entry(ip).or_default();
        while f.at.front().is_some_and(|t| now - *t >= self.window) {
            f.at.pop_front();
        }
        f.at.push_back(now);
        if f.at.len() >= self.max_failures {
            f.at.clear();
            f.locked_until = Some(now + self.lockout);
            return true;
        }
        false
    }

    /// A successful login from `ip` forgets its failures.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut m = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn password_is_hashed_private_and_verifies() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(!verify_password(dir.path(), "anything-long"));
        assert!(matches!(
            set_password(dir.path(), "short"),
            Err(AuthError::TooShort)
        ));
        set_password(dir.path(), "correct horse").unwrap();
        let text = std::fs::read_to_string(password_path(dir.path())).unwrap();
        assert!(text.starts_with("$argon2"), "{text}");
        assert!(!text.contains("correct horse"));
        let mode = std::fs::metadata(password_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(verify_password(dir.path(), "correct horse"));
        assert!(!verify_password(dir.path(), "wrong horse!"));
    }

    #[test]
    fn sessions_expire_and_cookies_parse() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let s = Sessions::default();
        let tok = s.create(t);
        assert_eq!(tok.len(), 64);
        assert!(s.valid(&tok, t + Duration::hours(11)));
        assert!(!s.valid(&tok, t + SESSION_TTL));
        assert!(!s.valid("nope", t));
        let h = format!("a=b; {COOKIE}={tok}; c=d");
        assert_eq!(token_from_cookies(&h), Some(tok.as_str()));
        let c = set_cookie(&tok, false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Max-Age="));
        assert!(!c.contains("Secure"));
        assert!(set_cookie(&tok, true).ends_with("; Secure"));
        assert!(clear_cookie(true).ends_with("; Secure"));
    }

    #[tokio::test]
    async fn failures_lock_an_address_out_and_success_forgets_them() {
        let cfg = crate::config::HttpConfig {
            login_max_failures: 3,
            login_lockout_s: 60,
            login_wait_ms: 10,
            ..Default::default()
        };
        let clock = Arc::new(crate::clock::ManualClock::new(
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        ));
        let l = LoginLimits::new(&cfg, clock.clone());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(!l.failed(a) && !l.failed(a));
        l.succeeded(a);
        assert!(!l.failed(a) && !l.failed(a));
        assert!(l.failed(a), "the third failure within the window locks");
        assert!(matches!(l.admit(a).await, Err(NotChecked::LockedOut(_))));
        // The lockout ends `login_lockout_s` later on the gateway's clock.
        clock.advance(chrono::Duration::seconds(59));
        assert!(matches!(l.admit(a).await, Err(NotChecked::LockedOut(d)) if d.as_secs() == 1));
        clock.advance(chrono::Duration::seconds(1));
        drop(l.admit(a).await.expect("the lockout is over"));
        // Another address is not affected; one check at a time.
        let p = l.admit(b).await.unwrap();
        assert_eq!(l.admit(b).await.unwrap_err(), NotChecked::Busy);
        drop(p);
        assert!(l.admit(b).await.is_ok());
    }
}
