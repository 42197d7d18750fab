//! The stacks under test as processes (the gateway, the ceiling, the seed
//! stack): their data directories, start and stop, and what /proc says about
//! their CPU and memory.

use crate::cli::Common;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The fields of /proc/PID/stat after the command name (index 0 is field 3,
/// the state); empty if the process is gone.
pub fn stat_fields(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, after)| after.split_whitespace().map(String::from).collect())
        })
        .unwrap_or_default()
}

/// utime + stime of a process, in seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let f = stat_fields(pid);
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // fields 14 and 15 of stat.
    (t(11) + t(12)) / clk_tck()
}

/// Minor page faults of a process so far (field 10 of stat).
pub fn minor_faults(pid: u32) -> u64 {
    stat_fields(pid)
        .get(7)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

/// VmHWM (peak RSS) in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Resident memory of a process, MiB.
#[derive(Clone, Copy, Debug)]
pub struct Mem {
    pub rss: f64,
    pub peak: f64,
    /// Of `rss`: pages of the binary and other mapped files.
    pub file: f64,
}

pub fn mem_of(pid: u32) -> Mem {
    let field = |name: &str| -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|k| k.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    Mem {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
        file: field("RssFile:"),
    }
}

/// Busy and total jiffies of all CPUs (`/proc/stat`).
pub fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// Before a wake: the previous run's dirty pages written back (`sync`) and
/// the CPUs quiet (under 10 % busy over 200 ms; at most 5 s), so that no
/// stack pays for the one measured before it (a seed run leaves ~100 MB of
/// files to write back, a gateway run its database).
pub async fn settle() {
    let _ = tokio::task::spawn_blocking(|| Command::new("sync").status()).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let Some((b0, t0)) = cpu_jiffies() else {
            return;
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some((b1, t1)) = cpu_jiffies() else {
            return;
        };
        if (b1 - b0) * 10 < (t1 - t0).max(1) {
            return;
        }
    }
}

pub struct Proc {
    pub child: Child,
}
impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn term(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }
}
impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Waits for a line on the child's stdout that starts with `prefix`.
pub fn wait_line(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.take().expect("stdout piped");
    let mut r = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("process exited before printing {prefix:?}");
        }
        if line.starts_with(prefix) {
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || {
                let mut s = String::new();
                while r.read_line(&mut s).unwrap_or(0) > 0 {
                    s.clear();
                }
            });
            return line.trim().to_string();
        }
    }
}

pub fn gateway_config(c: &Common) -> String {
    let mut s = format!(
        "[site]\ntimezone = \"UTC\"\n[ingest]\nquiet_gap_ms = {}\ncommit_interval_ms = {}\nmax_streaming = {}\n",
        c.quiet_gap_ms, c.commit_interval_ms, c.max_streaming
    );
    // Every simulated device connects from this one address: its share of
    // the handshakes is the whole budget, as for devices spread over many.
    s += "[mqtt]\nmax_handshakes_per_ip = 64\n";
    if c.gateway_plain {
        s += &format!("plain_listen = \"127.0.0.1:{}\"\n", free_port());
    }
    s
}

/// Starts `barngate serve` on `dir`; returns the address devices connect to
/// (the mutual-TLS listener, or the plaintext one with `--gateway-plain`).
pub fn start_gateway(c: &Common, dir: &Path) -> (Proc, SocketAddr) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("bench.toml");
    if !cfg.exists() {
        std::fs::write(&cfg, gateway_config(c)).unwrap();
    }
    let plain: Option<SocketAddr> = std::fs::read_to_string(&cfg)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("plain_listen = "))
        .map(|a| a.trim_matches('"').parse().unwrap());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("gateway.log"))
        .unwrap();
    let mut child = stack_command(&c.gateway_bin)
        .arg("--data-dir")
        .arg(dir)
        .arg("--config")
        .arg(&cfg)
        .args([
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); run `cargo build --release` first",
                c.gateway_bin.display()
            )
        });
    let line = wait_line(&mut child, "barngate ready");
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mqtt="))
        .and_then(|a| a.parse().ok())
        .expect("mqtt address in the ready line");
    (Proc { child }, plain.unwrap_or(addr))
}

/// With `--pin`: stacks run on CPU 0 (`taskset` execs, so the pid stays the
/// process measured); the load generator was moved to CPU 1 in `main`.
pub static PIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn stack_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if PIN.load(Ordering::Relaxed) {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Starts the `ceiling` example; it asks for the missing ids of a round
/// whose last chunk never came after `c.quiet_gap_ms`, as the gateway does.
/// With `nodelay`, it sets TCP_NODELAY on the connections rumqttd accepted
/// (as the gateway's front does on its own).
pub fn start_ceiling(c: &Common, nodelay: bool) -> (Proc, SocketAddr) {
    // A sibling example, so it keeps the system allocator the gateway has.
    let exe = std::env::current_exe().unwrap().with_file_name("ceiling");
    let mut child = stack_command(&exe)
        .args(["--quiet-gap-ms", &c.quiet_gap_ms.to_string()])
        .args(nodelay.then_some("--nodelay"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); run `cargo build --release --example ceiling` first",
                exe.display()
            )
        });
    let line = wait_line(&mut child, "ceiling ready");
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mqtt="))
        .and_then(|a| a.parse().ok())
        .unwrap();
    (Proc { child }, addr)
}

pub fn free_port() -> u16 {
    barngate::broker::free_loopback_port()
        .expect("a free loopback port")
        .port()
}

pub fn start_seed(c: &Common, dir: &Path) -> (Proc, Proc, SocketAddr) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 100\nmax_queued_messages 100000\n"),
    )
    .unwrap();
    let mosq = stack_command("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto (apt-get install mosquitto)");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let worker = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/baseline/worker.py");
    let mut w = stack_command("python3")
        .arg(worker)
        .args(["--port", &port.to_string(), "--out"])
        .arg(dir.join("images"))
        .args(["--quiet-gap-ms", &c.quiet_gap_ms.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with paho-mqtt (pip install paho-mqtt)");
    wait_line(&mut w, "worker ready");
    (Proc { child: mosq }, Proc { child: w }, addr)
}

/// The seed stack's files go to memory (`/dev/shm`) where there is one: on
/// this VM's disk (ext4, online discard) the ~1,000 files a seed run writes
/// and deletes left the disk slower for the next run that writes, which in
/// the sweep's order was always the gateway (its first wake after a seed run
/// took 20–30 % more CPU; on tmpfs, none). The seed loses nothing by it: it
/// does not fsync, and its files are faster to write in memory.
pub fn seed_dir(n: usize) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let d = shm.join(format!("barngate-bench-{}-seed{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        if std::fs::create_dir_all(&d).is_ok() {
            return d;
        }
    }
    tmpdir(&format!("seed{n}"))
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("barngate-bench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
