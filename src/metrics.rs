//! Process-wide counters, rendered in the Prometheus text format by `/metrics`.
//! Hot-path counters are plain atomics; rejections are labelled by reason.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Metrics {
    pub messages_in: AtomicU64,
    pub hellos: AtomicU64,
    pub metadata: AtomicU64,
    pub chunks: AtomicU64,
    pub chunk_duplicates: AtomicU64,
    pub chunk_bytes: AtomicU64,
    pub missing_rounds: AtomicU64,
    pub missing_chunks_requested: AtomicU64,
    pub images_complete: AtomicU64,
    pub images_failed: AtomicU64,
    pub images_reacked: AtomicU64,
    /// Images released with ACK_OK without being stored (camera failure, or
    /// refused on `ingest.release_after_refusals` wakes).
    pub images_released: AtomicU64,
    /// METADATA reporting no image (`image_size` 0): a failed camera.
    pub camera_failures: AtomicU64,
    /// Device connections that ended (their streams parked, slots freed).
    pub sessions_ended: AtomicU64,
    pub commands_sent: AtomicU64,
    pub commits: AtomicU64,
    pub streaming: AtomicU64,
    pub waiting: AtomicU64,
    pub held_chunk_bytes: AtomicU64,
    pub connections: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Connections closed for claiming another identity: a client id that
    /// is not the authenticated device's (or no device id), or a publish,
    /// subscribe or will on a topic the device may not use. Keep-alive
    /// expiries and malformed packets are not counted here.
    pub identity_violations: AtomicU64,
    /// Dashboard password checks (argon2) running now, and the most that
    /// ever ran at once (`http.login_concurrency` bounds both).
    pub login_checks_running: AtomicU64,
    pub login_checks_peak: AtomicU64,
    pub ingest_queue: AtomicU64,
    pub upstream_delivered: AtomicU64,
    pub upstream_failures: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one dropped message or refused action, by reason.
    pub fn reject(&self, reason: &'static str) {
        if let Ok(mut m) = self.rejected.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected
            .lock()
            .map(|m| m.get(reason).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.lock().map(|m| m.values().sum()).unwrap_or(0)
    }

    /// Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut c = |name: &str, help: &str, kind: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP barngate_{name} {help}");
            let _ = writeln!(out, "# TYPE barngate_{name} {kind}");
            let _ = writeln!(out, "barngate_{name} {}", v.load(Ordering::Relaxed));
        };
        c(
            "messages_received_total",
            "MQTT messages received from devices.",
            "counter",
            &self.messages_in,
        );
        c(
            "hellos_total",
            "HELLO messages received.",
            "counter",
            &self.hellos,
        );
        c(
            "metadata_total",
            "METADATA messages received.",
            "counter",
            &self.metadata,
        );
        c(
            "chunks_total",
            "CHUNK messages received.",
            "counter",
            &self.chunks,
        );
        c(
            "chunk_duplicates_total",
            "Chunks received more than once.",
            "counter",
            &self.chunk_duplicates,
        );
        c(
            "chunk_bytes_total",
            "Image bytes received in chunks.",
            "counter",
            &self.chunk_bytes,
        );
        c(
            "missing_rounds_total",
            "missing_chunks requests sent.",
            "counter",
            &self.missing_rounds,
        );
        c(
            "missing_chunks_requested_total",
            "Chunk ids listed in missing_chunks requests.",
            "counter",
            &self.missing_chunks_requested,
        );
        c(
            "images_complete_total",
            "Images durably stored and acknowledged.",
            "counter",
            &self.images_complete,
        );
        c(
            "images_failed_total",
            "Captures failed after the retry limit or verification.",
            "counter",
            &self.images_failed,
        );
        c(
            "images_reacked_total",
            "Repeated METADATA for a complete image, re-acknowledged.",
            "counter",
            &self.images_reacked,
        );
        c(
            "images_released_total",
            "Images released with ACK_OK without an image stored (camera failure, refused METADATA).",
            "counter",
            &self.images_released,
        );
        c(
            "camera_failures_total",
            "METADATA that reported no image (image_size 0).",
            "counter",
            &self.camera_failures,
        );
        c(
            "device_sessions_ended_total",
            "Device connections that ended; their streams were parked and slots freed.",
            "counter",
            &self.sessions_ended,
        );
        c(
            "commands_sent_total",
            "Messages sent to devices.",
            "counter",
            &self.commands_sent,
        );
        c(
            "commits_total",
            "Database commits by the ingest.",
            "counter",
            &self.commits,
        );
        c(
            "streaming_devices",
            "Devices streaming an image now.",
            "gauge",
            &self.streaming,
        );
        c(
            "waiting_devices",
            "Devices waiting for a streaming slot.",
            "gauge",
            &self.waiting,
        );
        c(
            "held_chunk_bytes",
            "Chunk bytes of unfinished images held in memory (ingest.held_chunk_bytes).",
            "gauge",
            &self.held_chunk_bytes,
        );
        c(
            "connections",
            "Open device connections.",
            "gauge",
            &self.connections,
        );
        c(
            "ingest_queue",
            "Device messages waiting for the ingest (the front stops reading a device while the queue is full).",
            "gauge",
            &self.ingest_queue,
        );
        c(
            "connections_refused_total",
            "Device connections refused.",
            "counter",
            &self.connections_refused,
        );
        c(
            "identity_violations_total",
            "Connections closed for a client id, publish, subscribe or will outside the device's identity.",
            "counter",
            &self.identity_violations,
        );
        c(
            "login_checks_running",
            "Dashboard password checks running now.",
            "gauge",
            &self.login_checks_running,
        );
        c(
            "login_checks_peak",
            "Most dashboard password checks that ran at once since start.",
            "gauge",
            &self.login_checks_peak,
        );
        c(
            "upstream_delivered_total",
            "Outbox items delivered upstream by this process.",
            "counter",
            &self.upstream_delivered,
        );
        c(
            "upstream_failures_total",
            "Failed upstream delivery attempts by this process.",
            "counter",
            &self.upstream_failures,
        );
        let _ = writeln!(
            out,
            "# HELP barngate_rejected_total Messages dropped or actions refused, by reason."
        );
        let _ = writeln!(out, "# TYPE barngate_rejected_total counter");
        if let Ok(m) = self.rejected.lock() {
            for (reason, n) in m.iter() {
                let _ = writeln!(out, "barngate_rejected_total{{reason=\"{reason}\"}} {n}");
            }
        }
        out
    }
}
