//! Real upstream servers for the tests, on loopback: PostgreSQL from the
//! Debian packages (initdb + pg_ctl in a temp dir, as the `postgres` user when
//! running as root) and `s3s-fs` from crates.io, an S3-compatible server
//! that verifies every request's SigV4 signature against one access key /
//! secret key pair (objects in a temp dir), behind a TCP relay the test can
//! cut to simulate an object-store outage.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub const PG_USER: &str = "barn";
pub const PG_PASSWORD: &str = "barn-pw";
pub const S3_KEY: &str = "testing";
pub const S3_SECRET: &str = "testing-secret";
pub const BUCKET: &str = "observations";

/// A free port for a server that is told its port and keeps it across
/// restarts (PostgreSQL, s3s-fs, the relay). The tests share one process and
/// run in parallel, so it is taken below the kernel's ephemeral range (where
/// no other test's `bind(..:0)` or outgoing connection can be handed it while
/// its server is down) and never twice in this process.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let low = 10_000;
    let span = ephemeral_low.saturating_sub(low).max(1_000);
    // Another test process on this machine starts elsewhere in the range.
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {ephemeral_low}");
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (apt-get install postgresql; .ci/run does it)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL with initdb")
}

/// Runs a PostgreSQL tool, as `postgres` when we are root (initdb refuses root).
fn pg_cmd(tool: &str) -> Command {
    let bin = pg_bin().join(tool);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

pub struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    pub port: u16,
}

impl Postgres {
    pub fn start() -> Postgres {
        let dir = tempfile::Builder::new().prefix("bg-pg").tempdir().unwrap();
        let data = dir.path().join("data");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, PG_PASSWORD).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown to postgres");
        }
        let out = pg_cmd("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", PG_USER, "--auth=scram-sha-256", "--no-sync"])
            .arg(format!("--pwfile={}", pw.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Postgres {
            data,
            port: free_port(),
            _dir: dir,
        };
        pg.up();
        pg
    }

    pub fn url(&self) -> String {
        self.url_with(PG_PASSWORD)
    }

    pub fn url_with(&self, password: &str) -> String {
        format!(
            "postgres://{PG_USER}:{password}@127.0.0.1:{}/postgres?sslmode=disable&connect_timeout=5",
            self.port
        )
    }

    /// Serves TLS with this certificate and key (PEM) from now on; restarts.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) {
        use std::os::unix::fs::PermissionsExt;
        let cert = self.data.join("server.crt");
        let key = self.data.join("server.key");
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if is_root() {
            for f in [&cert, &key] {
                let ok = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(f)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown to postgres");
            }
        }
        let conf = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).unwrap();
        self.down();
        self.up();
    }

    /// Starts (again) on the same port.
    pub fn up(&self) {
        let out = pg_cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.data.display()
            ))
            .args(["-w", "-t", "60", "-l"])
            .arg(self.data.join("log"))
            .arg("start")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops it hard (connections are cut).
    pub fn down(&self) {
        let _ = pg_cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("test connects to PostgreSQL");
        tokio::spawn(conn);
        c
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.down();
    }
}

/// s3s-fs on a free port, plus a relay in front of it that can be cut.
pub struct ObjectStore {
    child: Child,
    /// The server's own address (behind the relay).
    pub addr: SocketAddr,
    pub relay: Relay,
    _dir: tempfile::TempDir,
}

/// The `s3s-fs` binary: `$BARNGATE_S3S_FS`, else on PATH, else in
/// `$CARGO_HOME/bin` (`cargo install s3s-fs --features binary`; .ci/run does it).
fn s3s_fs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BARNGATE_S3S_FS") {
        return PathBuf::from(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    dirs.extend(cargo_home.map(|h| h.join("bin")));
    dirs.into_iter()
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
        .expect("s3s-fs is installed (cargo install s3s-fs@0.14.1 --locked --features binary; .ci/run does it)")
}

impl ObjectStore {
    /// s3s-fs: an S3 server that checks every request's SigV4 signature
    /// against `S3_KEY` / `S3_SECRET`, with the bucket already there.
    pub async fn start() -> ObjectStore {
        let dir = tempfile::Builder::new().prefix("bg-s3").tempdir().unwrap();
        std::fs::create_dir(dir.path().join(BUCKET)).unwrap();
        let port = free_port();
        let child = Command::new(s3s_fs_bin())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_KEY, "--secret-key", S3_SECRET])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let t0 = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(t0.elapsed() < Duration::from_secs(30), "s3s-fs starts");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let relay = Relay::start(addr).await;
        ObjectStore {
            child,
            addr,
            relay,
            _dir: dir,
        }
    }

    /// The endpoint the gateway uses (through the relay).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.relay.addr)
    }

    fn bucket(&self) -> Box<s3::Bucket> {
        let region = s3::Region::Custom {
            region: "us-east-1".into(),
            endpoint: format!("http://{}", self.addr),
        };
        let creds =
            s3::creds::Credentials::new(Some(S3_KEY), Some(S3_SECRET), None, None, None).unwrap();
        s3::Bucket::new(BUCKET, region, creds)
            .unwrap()
            .with_path_style()
    }

    /// Every object key under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        for page in self.bucket().list(prefix.to_string(), None).await.unwrap() {
            for o in page.contents {
                out.push(o.key);
            }
        }
        out.sort();
        out
    }

    pub async fn get(&self, key: &str) -> Vec<u8> {
        self.bucket().get_object(key).await.unwrap().to_vec()
    }
}

impl Drop for ObjectStore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay on a fixed port: `cut()` closes the listener and every open
/// connection (clients get "connection refused"); `restore()` listens again.
pub struct Relay {
    pub addr: SocketAddr,
    target: SocketAddr,
    stop: Option<watch::Sender<bool>>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        // Rebound by `restore`: a port no `bind(..:0)` can take meanwhile.
        let l = TcpListener::bind(("127.0.0.1", free_port())).await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut r = Relay {
            addr,
            target,
            stop: None,
        };
        r.serve(l);
        r
    }

    fn serve(&mut self, l: TcpListener) {
        let (tx, rx) = watch::channel(false);
        self.stop = Some(tx);
        let target = self.target;
        tokio::spawn(async move {
            let rx = Arc::new(rx);
            loop {
                let mut stop = (*rx).clone();
                let (mut a, _) = tokio::select! {
                    r = l.accept() => match r { Ok(x) => x, Err(_) => return },
                    _ = stop.changed() => return,
                };
                let mut stop = (*rx).clone();
                tokio::spawn(async move {
                    let Ok(mut b) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = stop.changed() => {}
                    }
                });
            }
        });
    }

    pub fn cut(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
    }

    pub async fn restore(&mut self) {
        let t0 = Instant::now();
        let l = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("relay rebind {}: {e}", self.addr),
            }
        };
        self.serve(l);
    }
}

/// An `[upstream]` config for these servers.
pub fn upstream_config(pg: &Postgres, objects: &ObjectStore) -> barngate::config::UpstreamConfig {
    barngate::config::UpstreamConfig {
        enabled: true,
        postgres_url: pg.url(),
        bucket: BUCKET.into(),
        endpoint: objects.endpoint(),
        region: "us-east-1".into(),
        access_key: S3_KEY.into(),
        secret_key: S3_SECRET.into(),
        backoff_initial_ms: 50,
        backoff_max_s: 1,
        ..Default::default()
    }
}
