//! The embedded redb database (GATEWAY.md §4): one table per concept, a
//! versioned schema, and [`Store::commit`], which applies a [`Batch`] of the
//! ingest's changes — chunks, captures, finalised images with their SHA-256,
//! and the upstream outbox entries for them — in one durable transaction.
//!
//! Records are stored as JSON values (self-describing, so a later release can
//! migrate them); chunk and image bytes are stored raw. The chunks of a
//! capture still in progress live in a few PARTIALS values per capture (not
//! one row per chunk), so a chunk costs one small share of a write per batch.

use crate::protocol::{Dialect, Metadata};
use chrono::{DateTime, Utc};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

mod totals;
pub use totals::CaptureTotals;

/// Bump when a table or record changes incompatibly; `open` migrates or refuses.
/// 2: chunks in PARTIALS runs instead of CHUNKS rows (1 migrates on open).
/// 3: per-device capture totals and their indexes (built on open from 2).
/// 4: telemetry keyed by (MAC, capture id) instead of (MAC, device time), so
///    two captures stamped with the same time keep one row each (3 re-keys
///    its rows and its queued outbox items on open).
pub const SCHEMA_VERSION: u64 = 4;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// META key: the next capture id to hand out (ids are never reused).
const NEXT_CAPTURE_ID: &str = "next_capture_id";
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const SESSIONS: TableDefinition<(&str, i64), &[u8]> = TableDefinition::new("wake_sessions");
const CAPTURES: TableDefinition<u64, &[u8]> = TableDefinition::new("captures");
const CAPTURE_NAMES: TableDefinition<(&str, &str), u64> = TableDefinition::new("capture_names");
const DEVICE_CAPTURES: TableDefinition<(&str, u64), ()> = TableDefinition::new("device_captures");
/// Schema 1's chunk rows, `(capture id, chunk id)` → bytes; only read to migrate.
const CHUNKS_V1: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("chunks");
/// Received chunks of captures in progress: `(capture id, level)` → a run of
/// chunks ([`encode_run`]); see [`append_partial`] for the levels.
const PARTIALS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("partials");
const IMAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("images");
/// A capture's readings: `(MAC, capture id)` → [`TelemetryRecord`].
const TELEMETRY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("telemetry_by_capture");
/// Schema 3's telemetry, `(MAC, device time ms)` → record; only read to migrate.
const TELEMETRY_V3: TableDefinition<(&str, i64), &[u8]> = TableDefinition::new("telemetry");
const COMMANDS: TableDefinition<u64, &[u8]> = TableDefinition::new("commands");
const ALERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("alerts");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Forwarder state (`state` → [`SyncState`]).
const SYNC: TableDefinition<&str, &[u8]> = TableDefinition::new("sync_state");
/// Images confirmed upstream: capture id → [`UploadRecord`].
const UPLOADS: TableDefinition<u64, &[u8]> = TableDefinition::new("uploads");

/// Alerts about the gateway itself (upstream, disk) use ids from here up, so
/// they never collide with the ingest's own counter.
pub const GATEWAY_ALERT_BASE: u64 = 1 << 62;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path} is in use by another barngate process")]
    Locked { path: String },
    #[error("cannot open database {path}: {message} (a truncated or corrupt file? restore it from a backup or move it aside)")]
    Open { path: String, message: String },
    #[error("database schema version {found} is newer than this barngate supports ({supported}); upgrade barngate")]
    SchemaTooNew { found: u64, supported: u64 },
    #[error("database error: {0}")]
    Db(String),
    #[error("corrupt record in table {table}: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
}

fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into().to_string())
}

/// The device registry entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceRecord {
    pub mac: String,
    /// The id as the device spells it in its topics (replies use it).
    pub wire_id: String,
    pub dialect: Dialect,
    /// Set by an admin: the dialect is not re-learned from topics.
    #[serde(default)]
    pub dialect_pinned: bool,
    /// Chunk-id base, once revealed by a chunk (0 or 1).
    #[serde(default)]
    pub chunk_base: Option<u32>,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub firmware_version: Option<String>,
    #[serde(default)]
    pub hardware_version: Option<String>,
    pub registered_at: DateTime<Utc>,
    #[serde(default)]
    pub last_seen: Option<DateTime<Utc>>,
    #[serde(default)]
    pub next_wake: Option<DateTime<Utc>>,
    /// Battery charge in percent, as the device reports it (`battery`).
    #[serde(default)]
    pub battery: Option<f64>,
    /// Battery voltage, only when the device sent one (`battery_voltage`).
    #[serde(default)]
    pub battery_voltage: Option<f64>,
    /// `active` or `revoked`.
    pub status: String,
    #[serde(default)]
    pub cert_serial: Option<String>,
    pub registration_index: u64,
    pub stagger_slot: u32,
    /// Per-device capture times (`HH:MM`), overriding the site's.
    #[serde(default)]
    pub schedule: Option<Vec<String>>,
    #[serde(default)]
    pub last_current_capture_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub pending_reported: u32,
    #[serde(default)]
    pub last_error: Option<i64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CaptureState {
    Announced,
    Receiving,
    MissingRequested,
    Complete,
    Failed,
}

impl CaptureState {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureState::Announced => "announced",
            CaptureState::Receiving => "receiving",
            CaptureState::MissingRequested => "missing_requested",
            CaptureState::Complete => "complete",
            CaptureState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Current,
    Recovery,
}

/// One image a device announced (or started sending), in any state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptureRecord {
    pub id: u64,
    pub mac: String,
    pub image_name: String,
    /// 1 for the first capture of this name; a different image under the
    /// same name becomes version 2, …
    pub version: u32,
    pub state: CaptureState,
    pub origin: Origin,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    /// The METADATA payload exactly as received, extra fields included.
    #[serde(default)]
    pub raw_metadata: Option<String>,
    /// Device-reported capture time.
    #[serde(default)]
    pub device_time: Option<DateTime<Utc>>,
    /// Gateway time of the first message about this capture.
    pub first_seen_at: DateTime<Utc>,
    #[serde(default)]
    pub metadata_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// `missing_chunks` rounds so far (over every attempt: a resumed
    /// capture keeps its count).
    pub retries: u32,
    /// Times this capture ended `failed` (it may complete later).
    #[serde(default)]
    pub failures: u32,
    /// Wakes on which its METADATA was refused (see
    /// `ingest.release_after_refusals`).
    #[serde(default)]
    pub refusals: u32,
    #[serde(default)]
    pub chunk_base: Option<u32>,
    #[serde(default)]
    pub chunks_received: u32,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub assembled_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub acked_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub failed_reason: Option<String>,
}

impl CaptureRecord {
    pub fn total_chunks(&self) -> Option<u32> {
        self.metadata.as_ref().map(|m| m.total_chunks_count)
    }
    pub fn image_size(&self) -> Option<u32> {
        self.metadata.as_ref().map(|m| m.image_size)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionRecord {
    pub mac: String,
    pub woke_at: DateTime<Utc>,
    pub pending_reported: u32,
    #[serde(default)]
    pub next_wake_assigned: Option<DateTime<Utc>>,
    #[serde(default)]
    pub capture_requested: bool,
    #[serde(default)]
    pub images_completed: u32,
    #[serde(default)]
    pub images_failed: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TelemetryRecord {
    pub mac: String,
    pub captured_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub capture_id: u64,
    pub temperature: Option<f64>,
    pub humidity: Option<f64>,
    pub pressure: Option<f64>,
    pub gas_resistance: Option<f64>,
    /// Battery charge in percent (METADATA `battery`).
    pub battery: Option<f64>,
    pub error: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandRecord {
    pub mac: String,
    pub at: DateTime<Utc>,
    pub kind: String,
    pub topic: String,
    pub payload: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AlertRecord {
    pub id: u64,
    pub mac: String,
    /// `image_failed`, `device_error`, `missed_wake`, `low_battery`, `offline`.
    pub kind: String,
    /// `warning`, `error`, `critical`.
    pub severity: String,
    pub message: String,
    pub triggered_at: DateTime<Utc>,
    #[serde(default)]
    pub resolved_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub capture_id: Option<u64>,
}

/// One item for the upstream forwarder, written in the same transaction as
/// the data it points at.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutboxItem {
    pub seq: u64,
    pub kind: String,
    pub mac: String,
    pub key: String,
    pub queued_at: DateTime<Utc>,
}

/// What the forwarder last did, kept across restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SyncState {
    #[serde(default)]
    pub last_success_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_error_at: Option<DateTime<Utc>>,
    /// Failed attempts since the last success.
    #[serde(default)]
    pub consecutive_failures: u64,
    #[serde(default)]
    pub delivered_total: u64,
    /// `upstream.enabled` as the gateway last started with (None: not
    /// started since this was recorded).
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// An image whose bytes are confirmed in object storage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UploadRecord {
    pub capture_id: u64,
    pub object_key: String,
    pub size: u64,
    pub uploaded_at: DateTime<Utc>,
    /// When the local bytes were deleted (retention or disk pressure).
    #[serde(default)]
    pub purged_at: Option<DateTime<Utc>>,
}

/// The outbox backlog in two numbers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OutboxStats {
    pub backlog: u64,
    pub oldest_queued_at: Option<DateTime<Utc>>,
}

/// A complete image: its capture and how to assemble it.
#[derive(Debug, Clone)]
pub struct Finalize {
    pub capture_id: u64,
    /// Chunk ids as sent, in image order.
    pub chunk_ids: Vec<u32>,
}

/// Changes from the ingest, applied atomically by [`Store::commit`].
#[derive(Debug, Default)]
pub struct Batch {
    pub devices: HashMap<String, DeviceRecord>,
    pub sessions: HashMap<(String, i64), SessionRecord>,
    pub captures: HashMap<u64, CaptureRecord>,
    /// (MAC, image name) → the newest capture id of that name in `captures`.
    names: HashMap<(String, String), u64>,
    pub chunks: Vec<(u64, u32, Vec<u8>)>,
    pub finalize: Vec<Finalize>,
    pub telemetry: Vec<TelemetryRecord>,
    pub commands: Vec<CommandRecord>,
    pub alerts: HashMap<u64, AlertRecord>,
    /// Captures whose stored chunks are discarded (inconsistent content).
    pub drop_chunks: Vec<u64>,
    /// When the oldest change in this batch was made.
    pub since: Option<std::time::Instant>,
    /// Nothing waits on this batch (no ACK_OK, no command): commit it without
    /// an fsync. A crash may lose it (the chunks are requested again), never
    /// corrupt the database; the next durable commit persists it.
    pub relaxed: bool,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
            && self.sessions.is_empty()
            && self.captures.is_empty()
            && self.chunks.is_empty()
            && self.finalize.is_empty()
            && self.telemetry.is_empty()
            && self.commands.is_empty()
            && self.alerts.is_empty()
            && self.drop_chunks.is_empty()
    }
    fn touch(&mut self) {
        if self.since.is_none() {
            self.since = Some(std::time::Instant::now());
        }
    }
    pub fn device(&mut self, d: &DeviceRecord) {
        self.touch();
        self.devices.insert(d.mac.clone(), d.clone());
    }
    pub fn session(&mut self, s: &SessionRecord) {
        self.touch();
        self.sessions
            .insert((s.mac.clone(), s.woke_at.timestamp_millis()), s.clone());
    }
    pub fn capture(&mut self, c: &CaptureRecord) {
        self.touch();
        if self.captures.insert(c.id, c.clone()).is_none() {
            let newest = self
                .names
                .entry((c.mac.clone(), c.image_name.clone()))
                .or_insert(c.id);
            *newest = (*newest).max(c.id);
        }
    }
    /// The newest capture of this name in the batch.
    pub fn capture_named(&self, mac: &str, name: &str) -> Option<&CaptureRecord> {
        let id = self.names.get(&(mac.to_string(), name.to_string()))?;
        self.captures.get(id)
    }
    pub fn chunk(&mut self, capture_id: u64, chunk_id: u32, bytes: Vec<u8>) {
        self.touch();
        self.chunks.push((capture_id, chunk_id, bytes));
    }
    pub fn alert(&mut self, a: &AlertRecord) {
        self.touch();
        self.alerts.insert(a.id, a.clone());
    }
}

/// What a commit did that the caller must know about.
#[derive(Debug, Default)]
pub struct CommitReport {
    /// Captures whose assembly failed verification: (capture id, reason).
    /// They were stored as `failed`, with no image.
    pub failed: Vec<(u64, String)>,
}

/// Summary counts, for status output and metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoreCounts {
    pub devices: u64,
    pub captures: u64,
    pub images: u64,
    pub chunks: u64,
    pub outbox: u64,
    pub alerts: u64,
}

/// redb's page cache. Its default (1 GiB) lets every written chunk page stay
/// resident, so the gateway's RSS grew with the bytes ingested (262 MiB after
/// a 1,000-device burst); images are written once and read rarely, so a small
/// cache costs little: `ingest_profile --devices 1000` ran at the same rate
/// with 4 and 8 MiB (32–35k msgs/s), and the OS page cache is behind it.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

pub struct Store {
    db: Database,
    /// Commands kept in COMMANDS; older ones are dropped at commit.
    max_commands: std::sync::atomic::AtomicU64,
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn dec<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table,
        message: e.to_string(),
    })
}

/// A run of chunks, as stored in a PARTIALS value: repeated
/// `[chunk_id u32 LE][len u32 LE][bytes]`, sorted by chunk id, ids unique.
fn encode_run<'a>(chunks: impl IntoIterator<Item = (u32, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, bytes) in chunks {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// The chunks of a run, borrowed from it (see [`encode_run`]).
fn parse_run(mut v: &[u8]) -> Result<Vec<(u32, &[u8])>, StoreError> {
    let corrupt = |message: &str| StoreError::Corrupt {
        table: "partials",
        message: message.to_string(),
    };
    let mut out = Vec::new();
    while !v.is_empty() {
        let (Some(id), Some(len)) = (v.get(0..4), v.get(4..8)) else {
            return Err(corrupt("truncated chunk header"));
        };
        let id = u32::from_le_bytes(id.try_into().unwrap_or_default());
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        let end = len.saturating_add(8);
        let Some(bytes) = v.get(8..end) else {
            return Err(corrupt("truncated chunk"));
        };
        out.push((id, bytes));
        v = &v[end..];
    }
    Ok(out)
}

/// Removes every run of a capture's partial.
fn remove_partial(t: &mut Partials, cid: u64) -> Result<(), StoreError> {
    t.retain_in((cid, 0)..=(cid, u32::MAX), |_, _| false)
        .map_err(db)
}

/// Schema 1 → 2: folds the CHUNKS rows into one PARTIALS run per capture
/// and deletes the CHUNKS table, inside the opening transaction.
fn migrate_chunks_to_partials(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    {
        let chunks = tx.open_table(CHUNKS_V1).map_err(db)?;
        let mut partials = tx.open_table(PARTIALS).map_err(db)?;
        let mut current: Option<(u64, Vec<u8>)> = None;
        // Rows come sorted by (capture, chunk id), which is a run's order.
        for r in chunks.iter().map_err(db)? {
            let (k, v) = r.map_err(db)?;
            let (cid, id) = k.value();
            if current.as_ref().is_some_and(|(c, _)| *c != cid) {
                if let Some((c, run)) = current.take() {
                    partials.insert((c, 0), run.as_slice()).map_err(db)?;
                }
            }
            let run = &mut current.get_or_insert_with(|| (cid, Vec::new())).1;
            run.extend(encode_run([(id, v.value())]));
        }
        if let Some((c, run)) = current {
            partials.insert((c, 0), run.as_slice()).map_err(db)?;
        }
    }
    tx.delete_table(CHUNKS_V1).map_err(db)?;
    Ok(())
}

/// Schema 3 → 4: moves every telemetry row from its `(MAC, device time)`
/// key to `(MAC, capture id)` and re-keys the queued `telemetry` outbox
/// items the same way, inside the opening transaction. Rows that shared a
/// key in 3 had already overwritten each other; nothing more is lost.
fn migrate_telemetry_to_capture_keys(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut by_old_key: HashMap<(String, i64), u64> = HashMap::new();
    {
        let old = tx.open_table(TELEMETRY_V3).map_err(db)?;
        let mut new = tx.open_table(TELEMETRY).map_err(db)?;
        for r in old.iter().map_err(db)? {
            let (k, v) = r.map_err(db)?;
            let (mac, ms) = k.value();
            let rec: TelemetryRecord = dec("telemetry", v.value())?;
            new.insert((mac, rec.capture_id), v.value()).map_err(db)?;
            by_old_key.insert((mac.to_string(), ms), rec.capture_id);
        }
    }
    tx.delete_table(TELEMETRY_V3).map_err(db)?;
    let mut outbox = tx.open_table(OUTBOX).map_err(db)?;
    let mut rekeyed = Vec::new();
    for r in outbox.iter().map_err(db)? {
        let (k, v) = r.map_err(db)?;
        let mut item: OutboxItem = dec("outbox", v.value())?;
        if item.kind != "telemetry" {
            continue;
        }
        let id = item
            .key
            .parse::<i64>()
            .ok()
            .and_then(|ms| by_old_key.get(&(item.mac.clone(), ms)));
        // An item whose row is gone is dropped by the forwarder either way.
        item.key = id.map(|id| id.to_string()).unwrap_or_default();
        rekeyed.push((k.value(), item));
    }
    for (seq, item) in rekeyed {
        outbox.insert(seq, enc(&item).as_slice()).map_err(db)?;
    }
    Ok(())
}

type Partials<'t> = redb::Table<'t, (u64, u32), &'static [u8]>;

/// Adds a batch's new chunks of one capture to its partial. The partial is
/// a binary counter of runs, level 0 the newest: the new run is merged with
/// the occupied levels 0, 1, … up to the first free one and written there.
/// Each chunk is so rewritten O(log batches) times, however the batches
/// interleave devices, and a capture has at most ~log2(batches) values.
fn append_partial(
    t: &mut Partials,
    cid: u64,
    new: &BTreeMap<u32, &[u8]>,
) -> Result<(), StoreError> {
    let (merged, level) = {
        let mut guards = Vec::new();
        for r in t.range((cid, 0)..=(cid, u32::MAX)).map_err(db)? {
            let (k, v) = r.map_err(db)?;
            if k.value().1 != guards.len() as u32 {
                break;
            }
            guards.push(v);
        }
        if guards.is_empty() {
            (encode_run(new.iter().map(|(k, v)| (*k, *v))), 0)
        } else {
            let mut map: BTreeMap<u32, &[u8]> = BTreeMap::new();
            for g in guards.iter().rev() {
                map.extend(parse_run(g.value())?);
            }
            map.extend(new.iter().map(|(k, v)| (*k, *v)));
            (encode_run(map), guards.len() as u32)
        }
    };
    for l in 0..level {
        t.remove((cid, l)).map_err(db)?;
    }
    t.insert((cid, level), merged.as_slice()).map_err(db)?;
    Ok(())
}

impl Store {
    /// Opens (creating if absent) the database at `path` and checks its schema.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let p = path.display().to_string();
        // redb 2 asserts (panics) on some truncated files instead of
        // returning an error; turn that into the same clear error.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Database::builder().set_cache_size(CACHE_BYTES).create(path)
        }))
        .map_err(|panic| StoreError::Open {
            path: p.clone(),
            message: panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "storage engine rejected the file".into()),
        })?;
        let db = opened.map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path: p.clone() },
            other => StoreError::Open {
                path: p.clone(),
                message: other.to_string(),
            },
        })?;
        let store = Store {
            db,
            max_commands: std::sync::atomic::AtomicU64::new(u64::MAX),
        };
        store.init_schema()?;
        Ok(store)
    }

    /// A store in memory (redb's `InMemoryBackend`): same tables, same
    /// transactions, nothing on disk. For fuzzing and tests that need many
    /// fresh stores; the gateway itself always uses [`Store::open`].
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| StoreError::Open {
                path: "(memory)".into(),
                message: e.to_string(),
            })?;
        let store = Store {
            db,
            max_commands: std::sync::atomic::AtomicU64::new(u64::MAX),
        };
        store.init_schema()?;
        Ok(store)
    }

    fn init_schema(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut meta = tx.open_table(META).map_err(db)?;
            let found = meta.get("schema_version").map_err(db)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION).map_err(db)?;
                }
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::SchemaTooNew {
                        found: v,
                        supported: SCHEMA_VERSION,
                    })
                }
                // Older versions migrate here, one step at a time.
                Some(mut v) => {
                    if v == 1 {
                        migrate_chunks_to_partials(&tx)?;
                        v = 2;
                    }
                    if v == 2 {
                        totals::rebuild(&tx)?;
                        v = 3;
                    }
                    if v == 3 {
                        migrate_telemetry_to_capture_keys(&tx)?;
                        v = 4;
                    }
                    meta.insert("schema_version", v).map_err(db)?;
                }
            }
            tx.open_table(DEVICES).map_err(db)?;
            tx.open_table(SESSIONS).map_err(db)?;
            tx.open_table(CAPTURES).map_err(db)?;
            tx.open_table(CAPTURE_NAMES).map_err(db)?;
            tx.open_table(DEVICE_CAPTURES).map_err(db)?;
            tx.open_table(PARTIALS).map_err(db)?;
            tx.open_table(IMAGES).map_err(db)?;
            tx.open_table(TELEMETRY).map_err(db)?;
            tx.open_table(COMMANDS).map_err(db)?;
            tx.open_table(ALERTS).map_err(db)?;
            tx.open_table(OUTBOX).map_err(db)?;
            tx.open_table(SYNC).map_err(db)?;
            tx.open_table(UPLOADS).map_err(db)?;
            tx.open_table(totals::DEVICE_TOTALS).map_err(db)?;
            tx.open_table(totals::OPEN_CAPTURES).map_err(db)?;
            tx.open_table(totals::COMPLETED_BY_HOUR).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(())
    }

    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let meta = tx.open_table(META).map_err(db)?;
        Ok(meta
            .get("schema_version")
            .map_err(db)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Applies a batch in one durable transaction.
    pub fn commit(&self, batch: Batch, now: DateTime<Utc>) -> Result<CommitReport, StoreError> {
        let mut report = CommitReport::default();
        let mut captures = batch.captures;
        // Every capture id the batch used, stored or not, is never handed out again.
        let max_id = captures
            .keys()
            .copied()
            .chain(batch.chunks.iter().map(|c| c.0))
            .chain(batch.drop_chunks.iter().copied())
            .max();
        let mut tx = self.db.begin_write().map_err(db)?;
        if let Some(id) = max_id {
            let mut meta = tx.open_table(META).map_err(db)?;
            let next = meta.get(NEXT_CAPTURE_ID).map_err(db)?.map(|v| v.value());
            if next.is_none_or(|n| n <= id) {
                meta.insert(NEXT_CAPTURE_ID, id + 1).map_err(db)?;
            }
        }
        if batch.relaxed {
            tx.set_durability(redb::Durability::None);
        }
        {
            let mut outbox = tx.open_table(OUTBOX).map_err(db)?;
            let mut next_seq = outbox
                .last()
                .map_err(db)?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(1);
            let mut queue = |kind: &str, mac: &str, key: String| -> Result<(), StoreError> {
                let item = OutboxItem {
                    seq: next_seq,
                    kind: kind.to_string(),
                    mac: mac.to_string(),
                    key,
                    queued_at: now,
                };
                outbox.insert(next_seq, enc(&item).as_slice()).map_err(db)?;
                next_seq += 1;
                Ok(())
            };

            {
                let mut partials = tx.open_table(PARTIALS).map_err(db)?;
                // This batch's chunks per capture; a repeated id: the later wins.
                let mut runs: BTreeMap<u64, BTreeMap<u32, &[u8]>> = BTreeMap::new();
                for (cid, chunk_id, bytes) in &batch.chunks {
                    runs.entry(*cid)
                        .or_default()
                        .insert(*chunk_id, bytes.as_slice());
                }
                for cid in &batch.drop_chunks {
                    runs.remove(cid);
                    remove_partial(&mut partials, *cid)?;
                }
                let mut images = tx.open_table(IMAGES).map_err(db)?;
                for f in &batch.finalize {
                    let Some(cap) = captures.get_mut(&f.capture_id) else {
                        continue;
                    };
                    let new = runs.remove(&f.capture_id).unwrap_or_default();
                    let mut levels = Vec::new();
                    let mut guards = Vec::new();
                    for r in partials
                        .range((cap.id, 0)..=(cap.id, u32::MAX))
                        .map_err(db)?
                    {
                        let (k, v) = r.map_err(db)?;
                        levels.push(k.value().1);
                        guards.push(v);
                    }
                    // Oldest (highest level) first, so newer chunks win. An
                    // image that streamed through in one go has no partial:
                    // its chunks are this batch's alone.
                    let merged;
                    let all = if guards.is_empty() {
                        &new
                    } else {
                        let mut m: BTreeMap<u32, &[u8]> = BTreeMap::new();
                        for g in guards.iter().rev() {
                            m.extend(parse_run(g.value())?);
                        }
                        m.extend(new.iter().map(|(k, v)| (*k, *v)));
                        merged = m;
                        &merged
                    };
                    // Hashed as it is assembled, while each chunk is in cache.
                    let mut bytes = Vec::with_capacity(cap.image_size().unwrap_or(0) as usize);
                    let mut hasher = Sha256::new();
                    let mut missing = None;
                    for id in &f.chunk_ids {
                        match all.get(id) {
                            Some(v) => {
                                bytes.extend_from_slice(v);
                                hasher.update(v);
                            }
                            None => {
                                missing = Some(*id);
                                break;
                            }
                        }
                    }
                    drop(guards);
                    for l in levels {
                        partials.remove((cap.id, l)).map_err(db)?;
                    }
                    let sha = hex::encode(hasher.finalize());
                    let problem = if let Some(id) = missing {
                        Some(format!("chunk {id} missing at assembly"))
                    } else if Some(bytes.len() as u32) != cap.image_size() {
                        Some(format!(
                            "assembled {} bytes, METADATA announced {}",
                            bytes.len(),
                            cap.image_size().unwrap_or(0)
                        ))
                    } else {
                        match cap.metadata.as_ref().and_then(|m| m.sha256.as_deref()) {
                            Some(want) if !want.eq_ignore_ascii_case(&sha) => {
                                Some(format!("SHA-256 {sha} does not match the announced {want}"))
                            }
                            _ => None,
                        }
                    };
                    if let Some(reason) = problem {
                        cap.state = CaptureState::Failed;
                        cap.failures += 1;
                        cap.failed_reason = Some(reason.clone());
                        cap.acked_at = None;
                        report.failed.push((cap.id, reason));
                        continue;
                    }
                    images.insert(cap.id, bytes.as_slice()).map_err(db)?;
                    cap.sha256 = Some(sha);
                    cap.assembled_at.get_or_insert(now);
                    queue("image", &cap.mac, cap.id.to_string())?;
                }
                for (cid, new) in &runs {
                    append_partial(&mut partials, *cid, new)?;
                }
            }

            let mut t = tx.open_table(CAPTURES).map_err(db)?;
            let mut names = tx.open_table(CAPTURE_NAMES).map_err(db)?;
            let mut by_dev = tx.open_table(DEVICE_CAPTURES).map_err(db)?;
            for c in captures.values() {
                let old = match t.get(c.id).map_err(db)? {
                    Some(v) => Some(dec::<CaptureRecord>("captures", v.value())?),
                    None => None,
                };
                totals::capture_changed(&tx, old.as_ref(), c)?;
                // A capture that ended failed (again) goes upstream as a row
                // with its rounds and reason; a complete one goes as "image".
                let newly_failed = c.state == CaptureState::Failed
                    && old.as_ref().is_none_or(|o| {
                        o.state != CaptureState::Failed || o.failures != c.failures
                    });
                if newly_failed {
                    queue("capture", &c.mac, c.id.to_string())?;
                }
                t.insert(c.id, enc(c).as_slice()).map_err(db)?;
                let latest = names
                    .get((c.mac.as_str(), c.image_name.as_str()))
                    .map_err(db)?
                    .map(|v| v.value());
                if latest.is_none_or(|l| l <= c.id) {
                    names
                        .insert((c.mac.as_str(), c.image_name.as_str()), c.id)
                        .map_err(db)?;
                }
                by_dev.insert((c.mac.as_str(), c.id), ()).map_err(db)?;
            }

            let mut t = tx.open_table(DEVICES).map_err(db)?;
            for d in batch.devices.values() {
                t.insert(d.mac.as_str(), enc(d).as_slice()).map_err(db)?;
                queue("device", &d.mac, d.mac.clone())?;
            }
            let mut t = tx.open_table(SESSIONS).map_err(db)?;
            for ((mac, ms), s) in &batch.sessions {
                t.insert((mac.as_str(), *ms), enc(s).as_slice())
                    .map_err(db)?;
                queue("session", mac, ms.to_string())?;
            }
            let mut t = tx.open_table(TELEMETRY).map_err(db)?;
            for r in &batch.telemetry {
                t.insert((r.mac.as_str(), r.capture_id), enc(r).as_slice())
                    .map_err(db)?;
                queue("telemetry", &r.mac, r.capture_id.to_string())?;
            }
            let mut t = tx.open_table(COMMANDS).map_err(db)?;
            let first = t
                .last()
                .map_err(db)?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(1);
            for (seq, c) in (first..).zip(&batch.commands) {
                t.insert(seq, enc(c).as_slice()).map_err(db)?;
                totals::command_sent(&tx, &c.mac, &c.kind, &c.payload)?;
            }
            let keep = self.max_commands.load(std::sync::atomic::Ordering::Relaxed);
            let over = t.len().map_err(db)?.saturating_sub(keep);
            // Oldest first; usually as many as this batch added.
            for _ in 0..over {
                if t.pop_first().map_err(db)?.is_none() {
                    break;
                }
            }
            let mut t = tx.open_table(ALERTS).map_err(db)?;
            for a in batch.alerts.values() {
                t.insert(a.id, enc(a).as_slice()).map_err(db)?;
                queue("alert", &a.mac, a.id.to_string())?;
            }
        }
        tx.commit().map_err(db)?;
        Ok(report)
    }

    fn get_json<K: redb::Key + 'static, T: DeserializeOwned>(
        &self,
        def: TableDefinition<K, &[u8]>,
        name: &'static str,
        key: impl std::borrow::Borrow<K::SelfType<'static>>,
    ) -> Result<Option<T>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(def).map_err(db)?;
        let v = t.get(key).map_err(db)?;
        v.map(|g| dec(name, g.value())).transpose()
    }

    pub fn device(&self, mac: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(DEVICES).map_err(db)?;
        let v = t.get(mac).map_err(db)?;
        v.map(|g| dec("devices", g.value())).transpose()
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut out = Vec::new();
        self.for_each_device(|d| out.push(d))?;
        Ok(out)
    }

    /// Visits every registered device without holding the whole registry
    /// in memory (10,000 records would be ~10 MiB at once).
    pub fn for_each_device(&self, mut f: impl FnMut(DeviceRecord)) -> Result<(), StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(DEVICES).map_err(db)?;
        for r in t.iter().map_err(db)? {
            let (_, v) = r.map_err(db)?;
            f(dec("devices", v.value())?);
        }
        Ok(())
    }

    pub fn device_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        tx.open_table(DEVICES).map_err(db)?.len().map_err(db)
    }

    pub fn capture(&self, id: u64) -> Result<Option<CaptureRecord>, StoreError> {
        self.get_json(CAPTURES, "captures", id)
    }

    /// The newest version of a device's capture with this name.
    pub fn latest_capture(
        &self,
        mac: &str,
        name: &str,
    ) -> Result<Option<CaptureRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let names = tx.open_table(CAPTURE_NAMES).map_err(db)?;
        let Some(id) = names.get((mac, name)).map_err(db)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let t = tx.open_table(CAPTURES).map_err(db)?;
        let v = t.get(id).map_err(db)?;
        v.map(|g| dec("captures", g.value())).transpose()
    }

    /// Keeps at most `n` commands in the command log (the oldest go first).
    pub fn set_command_retention(&self, n: u64) {
        self.max_commands
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The next capture id to hand out: past every id ever committed, a
    /// capture's or only its chunks'.
    pub fn next_capture_id(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let meta = tx.open_table(META).map_err(db)?;
        let counted = meta.get(NEXT_CAPTURE_ID).map_err(db)?.map(|v| v.value());
        let partials = tx.open_table(PARTIALS).map_err(db)?;
        let partial = partials.last().map_err(db)?.map(|(k, _)| k.value().0);
        let stored = self.max_capture_id()?;
        Ok(counted
            .unwrap_or(1)
            .max(stored + 1)
            .max(partial.map_or(1, |p| p + 1)))
    }

    /// Deletes partials whose capture was never stored (chunks of an image
    /// that never got its METADATA): they belong to no capture, and no
    /// capture may ever assemble from them. Returns how many were removed.
    pub fn remove_orphan_partials(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let mut removed = 0;
        {
            let captures = tx.open_table(CAPTURES).map_err(db)?;
            let mut partials = tx.open_table(PARTIALS).map_err(db)?;
            let mut ids: Vec<u64> = Vec::new();
            for r in partials.iter().map_err(db)? {
                let (k, _) = r.map_err(db)?;
                let cid = k.value().0;
                if ids.last() != Some(&cid) {
                    ids.push(cid);
                }
            }
            for cid in ids {
                let orphan = match captures.get(cid).map_err(db)? {
                    None => true,
                    Some(v) => dec::<CaptureRecord>("captures", v.value())?
                        .metadata
                        .is_none(),
                };
                if orphan {
                    remove_partial(&mut partials, cid)?;
                    removed += 1;
                }
            }
        }
        tx.commit().map_err(db)?;
        Ok(removed)
    }

    pub fn max_capture_id(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(CAPTURES).map_err(db)?;
        let last = t.last().map_err(db)?.map(|(k, _)| k.value()).unwrap_or(0);
        Ok(last)
    }

    /// The largest device-alert id (gateway alerts live above [`GATEWAY_ALERT_BASE`]).
    pub fn max_alert_id(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(ALERTS).map_err(db)?;
        let last = t
            .range(..GATEWAY_ALERT_BASE)
            .map_err(db)?
            .next_back()
            .transpose()
            .map_err(db)?
            .map(|(k, _)| k.value())
            .unwrap_or(0);
        Ok(last)
    }

    /// Chunk ids stored for a capture, with their lengths, by id.
    pub fn chunk_lengths(&self, capture_id: u64) -> Result<Vec<(u32, u32)>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(PARTIALS).map_err(db)?;
        let mut out = BTreeMap::new();
        // Oldest (highest level) first, so newer lengths win.
        for r in t
            .range((capture_id, 0)..=(capture_id, u32::MAX))
            .map_err(db)?
            .rev()
        {
            let (_, v) = r.map_err(db)?;
            for (id, bytes) in parse_run(v.value())? {
                out.insert(id, bytes.len() as u32);
            }
        }
        Ok(out.into_iter().collect())
    }

    /// All captures of one device (or every device), oldest first.
    pub fn captures(&self, mac: Option<&str>) -> Result<Vec<CaptureRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(CAPTURES).map_err(db)?;
        let mut out = Vec::new();
        match mac {
            Some(mac) => {
                let idx = tx.open_table(DEVICE_CAPTURES).map_err(db)?;
                for r in idx.range((mac, 0)..=(mac, u64::MAX)).map_err(db)? {
                    let (k, _) = r.map_err(db)?;
                    if let Some(v) = t.get(k.value().1).map_err(db)? {
                        out.push(dec("captures", v.value())?);
                    }
                }
            }
            None => {
                for r in t.iter().map_err(db)? {
                    let (_, v) = r.map_err(db)?;
                    out.push(dec("captures", v.value())?);
                }
            }
        }
        Ok(out)
    }

    /// Complete images of one device (or all), oldest first.
    pub fn images(&self, mac: Option<&str>) -> Result<Vec<CaptureRecord>, StoreError> {
        Ok(self
            .captures(mac)?
            .into_iter()
            .filter(|c| c.state == CaptureState::Complete)
            .collect())
    }

    pub fn image_bytes(&self, capture_id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(IMAGES).map_err(db)?;
        Ok(t.get(capture_id).map_err(db)?.map(|v| v.value().to_vec()))
    }

    pub fn sessions(&self, mac: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(SESSIONS).map_err(db)?;
        let mut out = Vec::new();
        for r in t.range((mac, i64::MIN)..=(mac, i64::MAX)).map_err(db)? {
            let (_, v) = r.map_err(db)?;
            out.push(dec("wake_sessions", v.value())?);
        }
        Ok(out)
    }

    /// When the device's current backlog began: the first of its latest run
    /// of wakes that reported pending images (newest first, stopping at the
    /// first wake without any), or `None`.
    pub fn backlog_started(&self, mac: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(SESSIONS).map_err(db)?;
        let mut start = None;
        for r in t
            .range((mac, i64::MIN)..=(mac, i64::MAX))
            .map_err(db)?
            .rev()
        {
            let (_, v) = r.map_err(db)?;
            let s: SessionRecord = dec("wake_sessions", v.value())?;
            if s.pending_reported == 0 {
                break;
            }
            start = Some(s.woke_at);
        }
        Ok(start)
    }

    pub fn telemetry(&self, mac: &str) -> Result<Vec<TelemetryRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(TELEMETRY).map_err(db)?;
        let mut out = Vec::new();
        for r in t.range((mac, 0)..=(mac, u64::MAX)).map_err(db)? {
            let (_, v) = r.map_err(db)?;
            out.push(dec("telemetry", v.value())?);
        }
        Ok(out)
    }

    pub fn commands(&self, mac: Option<&str>) -> Result<Vec<CommandRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(COMMANDS).map_err(db)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(db)? {
            let (_, v) = r.map_err(db)?;
            let c: CommandRecord = dec("commands", v.value())?;
            if mac.is_none_or(|m| m == c.mac) {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Commands with a sequence number above `after`, with their numbers
    /// (lets readers fold the append-only log incrementally).
    pub fn commands_after(&self, after: u64) -> Result<Vec<(u64, CommandRecord)>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(COMMANDS).map_err(db)?;
        let mut out = Vec::new();
        for r in t.range(after.saturating_add(1)..).map_err(db)? {
            let (k, v) = r.map_err(db)?;
            out.push((k.value(), dec("commands", v.value())?));
        }
        Ok(out)
    }

    /// The oldest item waiting for the upstream, if any.
    pub fn outbox_oldest(&self) -> Result<Option<OutboxItem>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(OUTBOX).map_err(db)?;
        let first = t.first().map_err(db)?;
        first.map(|(_, v)| dec("outbox", v.value())).transpose()
    }

    pub fn alerts(&self) -> Result<Vec<AlertRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(ALERTS).map_err(db)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(db)? {
            let (_, v) = r.map_err(db)?;
            out.push(dec("alerts", v.value())?);
        }
        Ok(out)
    }

    pub fn outbox(&self, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(OUTBOX).map_err(db)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(db)?.take(limit) {
            let (_, v) = r.map_err(db)?;
            out.push(dec("outbox", v.value())?);
        }
        Ok(out)
    }

    pub fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(OUTBOX).map_err(db)?;
        let oldest = match t.first().map_err(db)? {
            Some((_, v)) => Some(dec::<OutboxItem>("outbox", v.value())?.queued_at),
            None => None,
        };
        Ok(OutboxStats {
            backlog: t.len().map_err(db)?,
            oldest_queued_at: oldest,
        })
    }

    /// Removes delivered outbox items, records the images now safe in object
    /// storage and the success, in one short write transaction (the ingest's
    /// commits wait for it, so it does nothing else).
    pub fn outbox_ack(
        &self,
        seqs: &[u64],
        uploads: &[UploadRecord],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut t = tx.open_table(OUTBOX).map_err(db)?;
            for s in seqs {
                t.remove(*s).map_err(db)?;
            }
            let mut u = tx.open_table(UPLOADS).map_err(db)?;
            for r in uploads {
                u.insert(r.capture_id, enc(r).as_slice()).map_err(db)?;
            }
            let mut sync = tx.open_table(SYNC).map_err(db)?;
            let mut st: SyncState = match sync.get("state").map_err(db)? {
                Some(v) => dec("sync_state", v.value())?,
                None => SyncState::default(),
            };
            st.last_success_at = Some(now);
            st.consecutive_failures = 0;
            st.delivered_total += seqs.len() as u64;
            sync.insert("state", enc(&st).as_slice()).map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// Records a failed delivery attempt; returns the failures since the last success.
    pub fn record_sync_error(&self, message: &str, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let n;
        {
            let mut sync = tx.open_table(SYNC).map_err(db)?;
            let mut st: SyncState = match sync.get("state").map_err(db)? {
                Some(v) => dec("sync_state", v.value())?,
                None => SyncState::default(),
            };
            st.last_error = Some(message.to_string());
            st.last_error_at = Some(now);
            st.consecutive_failures += 1;
            n = st.consecutive_failures;
            sync.insert("state", enc(&st).as_slice()).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(n)
    }

    /// Changes the forwarder state in one transaction; returns it.
    pub fn update_sync_state(
        &self,
        f: impl FnOnce(&mut SyncState),
    ) -> Result<SyncState, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let st;
        {
            let mut sync = tx.open_table(SYNC).map_err(db)?;
            let mut s: SyncState = match sync.get("state").map_err(db)? {
                Some(v) => dec("sync_state", v.value())?,
                None => SyncState::default(),
            };
            f(&mut s);
            sync.insert("state", enc(&s).as_slice()).map_err(db)?;
            st = s;
        }
        tx.commit().map_err(db)?;
        Ok(st)
    }

    pub fn sync_state(&self) -> Result<SyncState, StoreError> {
        Ok(self
            .get_json(SYNC, "sync_state", "state")?
            .unwrap_or_default())
    }

    pub fn upload(&self, capture_id: u64) -> Result<Option<UploadRecord>, StoreError> {
        self.get_json(UPLOADS, "uploads", capture_id)
    }

    pub fn session_at(&self, mac: &str, ms: i64) -> Result<Option<SessionRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(SESSIONS).map_err(db)?;
        let v = t.get((mac, ms)).map_err(db)?;
        v.map(|g| dec("wake_sessions", g.value())).transpose()
    }

    /// The readings of one capture.
    pub fn telemetry_of(
        &self,
        mac: &str,
        capture_id: u64,
    ) -> Result<Option<TelemetryRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(TELEMETRY).map_err(db)?;
        let v = t.get((mac, capture_id)).map_err(db)?;
        v.map(|g| dec("telemetry", g.value())).transpose()
    }

    pub fn alert(&self, id: u64) -> Result<Option<AlertRecord>, StoreError> {
        self.get_json(ALERTS, "alerts", id)
    }

    /// Raises a gateway-level alert (`mac` empty) unless one of this kind is
    /// open; queued upstream like any other. Returns it when newly raised.
    pub fn raise_gateway_alert(
        &self,
        kind: &str,
        severity: &str,
        message: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<AlertRecord>, StoreError> {
        if self.open_gateway_alert(kind)?.is_some() {
            return Ok(None);
        }
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(ALERTS).map_err(db)?;
        let id = t
            .range(GATEWAY_ALERT_BASE..)
            .map_err(db)?
            .next_back()
            .transpose()
            .map_err(db)?
            .map(|(k, _)| k.value() + 1)
            .unwrap_or(GATEWAY_ALERT_BASE);
        drop(t);
        drop(tx);
        let a = AlertRecord {
            id,
            mac: String::new(),
            kind: kind.to_string(),
            severity: severity.to_string(),
            message: message.to_string(),
            triggered_at: now,
            resolved_at: None,
            capture_id: None,
        };
        let mut b = Batch::default();
        b.alert(&a);
        self.commit(b, now)?;
        Ok(Some(a))
    }

    /// Resolves the open gateway alert of this kind, if any.
    pub fn resolve_gateway_alert(
        &self,
        kind: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let Some(mut a) = self.open_gateway_alert(kind)? else {
            return Ok(false);
        };
        a.resolved_at = Some(now);
        let mut b = Batch::default();
        b.alert(&a);
        self.commit(b, now)?;
        Ok(true)
    }

    pub fn open_gateway_alert(&self, kind: &str) -> Result<Option<AlertRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(ALERTS).map_err(db)?;
        for r in t.range(GATEWAY_ALERT_BASE..).map_err(db)?.rev() {
            let (_, v) = r.map_err(db)?;
            let a: AlertRecord = dec("alerts", v.value())?;
            if a.kind == kind && a.resolved_at.is_none() {
                return Ok(Some(a));
            }
        }
        Ok(None)
    }

    /// Deletes the local bytes of uploaded images, oldest upload first: every
    /// one uploaded before `uploaded_before`, then more until `free_bytes`
    /// are freed. Records stay; an image not yet confirmed upstream is never
    /// touched. Returns (images purged, bytes freed).
    pub fn purge_uploaded_images(
        &self,
        uploaded_before: DateTime<Utc>,
        free_bytes: u64,
        now: DateTime<Utc>,
    ) -> Result<(u64, u64), StoreError> {
        let mut candidates: Vec<UploadRecord> = Vec::new();
        {
            let tx = self.db.begin_read().map_err(db)?;
            let t = tx.open_table(UPLOADS).map_err(db)?;
            for r in t.iter().map_err(db)? {
                let (_, v) = r.map_err(db)?;
                let u: UploadRecord = dec("uploads", v.value())?;
                if u.purged_at.is_none() {
                    candidates.push(u);
                }
            }
        }
        candidates.sort_by_key(|u| (u.uploaded_at, u.capture_id));
        let mut freed = 0u64;
        let mut chosen = Vec::new();
        for u in candidates {
            if u.uploaded_at >= uploaded_before && freed >= free_bytes {
                break;
            }
            freed += u.size;
            chosen.push(u);
        }
        if chosen.is_empty() {
            return Ok((0, 0));
        }
        // Short transactions: the ingest waits for each one.
        for part in chosen.chunks(256) {
            let tx = self.db.begin_write().map_err(db)?;
            {
                let mut images = tx.open_table(IMAGES).map_err(db)?;
                let mut uploads = tx.open_table(UPLOADS).map_err(db)?;
                for u in part {
                    images.remove(u.capture_id).map_err(db)?;
                    let mut u = u.clone();
                    u.purged_at = Some(now);
                    uploads
                        .insert(u.capture_id, enc(&u).as_slice())
                        .map_err(db)?;
                }
            }
            tx.commit().map_err(db)?;
        }
        Ok((chosen.len() as u64, freed))
    }

    pub fn counts(&self) -> Result<StoreCounts, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        Ok(StoreCounts {
            devices: tx.open_table(DEVICES).map_err(db)?.len().map_err(db)?,
            captures: tx.open_table(CAPTURES).map_err(db)?.len().map_err(db)?,
            images: tx.open_table(IMAGES).map_err(db)?.len().map_err(db)?,
            chunks: {
                let t = tx.open_table(PARTIALS).map_err(db)?;
                let mut ids = HashSet::new();
                for r in t.iter().map_err(db)? {
                    let (k, v) = r.map_err(db)?;
                    for (id, _) in parse_run(v.value())? {
                        ids.insert((k.value().0, id));
                    }
                }
                ids.len() as u64
            },
            outbox: tx.open_table(OUTBOX).map_err(db)?.len().map_err(db)?,
            alerts: tx.open_table(ALERTS).map_err(db)?.len().map_err(db)?,
        })
    }

    /// Registers or updates a device record directly (admin commands).
    pub fn put_device(&self, d: &DeviceRecord, now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.device(d);
        self.commit(b, now).map(|_| ())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 8, 0, 0).unwrap()
    }

    /// A complete capture of `size` bytes in `chunk`-byte chunks, for tests.
    pub(crate) fn capture(id: u64, size: u32, chunk: u32) -> CaptureRecord {
        CaptureRecord {
            id,
            mac: "AABBCCDDEEFF".into(),
            image_name: "a.jpg".into(),
            version: 1,
            state: CaptureState::Complete,
            origin: Origin::Current,
            metadata: Some(Metadata {
                device_id: "AABBCCDDEEFF".into(),
                image_name: "a.jpg".into(),
                capture_timestamp: "2026-01-01T08:00:00Z".into(),
                image_size: size,
                max_chunk_size: chunk,
                total_chunks_count: size.div_ceil(chunk),
                announced_chunks: None,
                error: 0,
                location: None,
                temperature: None,
                humidity: None,
                pressure: None,
                gas_resistance: None,
                battery: None,
                sha256: None,
            }),
            raw_metadata: None,
            device_time: None,
            first_seen_at: t0(),
            metadata_at: None,
            updated_at: t0(),
            retries: 0,
            failures: 0,
            refusals: 0,
            chunk_base: Some(1),
            chunks_received: 0,
            sha256: None,
            assembled_at: None,
            acked_at: None,
            failed_reason: None,
        }
    }

    /// An image whose chunks are all in one batch (no partial), one that
    /// matches its announced SHA-256, one that does not, one short of its
    /// announced size: only the good ones are stored, the others reported.
    #[test]
    fn finalize_verifies_size_and_announced_sha_before_storing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        let img = [9u8, 8, 7, 6, 5];
        let good = hex::encode(Sha256::digest(img));
        let mut b = Batch::default();
        for (id, sha, size) in [
            (1, None, 5),
            (2, Some(good.clone()), 5),
            (3, Some("00".repeat(32)), 5),
            (4, None, 6),
        ] {
            let mut c = capture(id, size, 2);
            c.metadata.as_mut().unwrap().sha256 = sha;
            b.capture(&c);
            // Reordered and repeated: the later copy of an id wins.
            b.chunk(id, 3, vec![0]);
            b.chunk(id, 2, img[2..4].to_vec());
            b.chunk(id, 1, img[..2].to_vec());
            b.chunk(id, 3, img[4..].to_vec());
            b.finalize.push(Finalize {
                capture_id: id,
                chunk_ids: vec![1, 2, 3],
            });
        }
        let r = s.commit(b, t0()).unwrap();
        let failed: Vec<u64> = r.failed.iter().map(|(id, _)| *id).collect();
        assert_eq!(failed, vec![3, 4], "{:?}", r.failed);
        assert!(r.failed[0].1.contains("does not match the announced"));
        assert!(r.failed[1]
            .1
            .contains("assembled 5 bytes, METADATA announced 6"));
        for id in [1, 2] {
            assert_eq!(s.image_bytes(id).unwrap().unwrap(), img.to_vec());
            assert_eq!(s.capture(id).unwrap().unwrap().sha256.unwrap(), good);
        }
        for id in [3, 4] {
            assert!(s.image_bytes(id).unwrap().is_none(), "capture {id} stored");
            let c = s.capture(id).unwrap().unwrap();
            assert_eq!(c.state, CaptureState::Failed);
            assert!(c.sha256.is_none());
        }
    }

    #[test]
    fn finalize_assembles_in_order_hashes_and_drops_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        let mut b = Batch::default();
        let mut c = capture(1, 5, 2);
        c.state = CaptureState::Receiving;
        b.capture(&c);
        b.chunk(1, 3, vec![5]);
        b.chunk(1, 1, vec![1, 2]);
        s.commit(b, t0()).unwrap();
        let mut b = Batch::default();
        b.chunk(1, 2, vec![3, 4]);
        c.state = CaptureState::Complete;
        b.capture(&c);
        b.finalize.push(Finalize {
            capture_id: 1,
            chunk_ids: vec![1, 2, 3],
        });
        let r = s.commit(b, t0()).unwrap();
        assert!(r.failed.is_empty());
        assert_eq!(s.image_bytes(1).unwrap().unwrap(), vec![1, 2, 3, 4, 5]);
        let c = s.latest_capture("AABBCCDDEEFF", "a.jpg").unwrap().unwrap();
        assert_eq!(
            c.sha256.unwrap(),
            hex::encode(Sha256::digest([1u8, 2, 3, 4, 5]))
        );
        assert!(s.chunk_lengths(1).unwrap().is_empty());
        assert_eq!(
            s.outbox(10)
                .unwrap()
                .iter()
                .filter(|o| o.kind == "image")
                .count(),
            1
        );
    }

    #[test]
    fn relaxed_commits_are_persisted_by_the_next_durable_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let s = Store::open(&path).unwrap();
            let mut b = Batch::default();
            b.chunk(3, 1, vec![9, 9]);
            b.relaxed = true;
            s.commit(b, t0()).unwrap();
            assert_eq!(s.chunk_lengths(3).unwrap(), vec![(1, 2)], "visible at once");
            // What `Engine::flush` does on shutdown: an empty durable commit.
            s.commit(Batch::default(), t0()).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(
            s.chunk_lengths(3).unwrap(),
            vec![(1, 2)],
            "survives reopening"
        );
    }

    #[test]
    fn size_mismatch_fails_the_capture_without_storing_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        let mut b = Batch::default();
        b.capture(&capture(7, 5, 2));
        b.chunk(7, 1, vec![1, 2]);
        b.chunk(7, 2, vec![3]);
        b.chunk(7, 3, vec![5]);
        b.finalize.push(Finalize {
            capture_id: 7,
            chunk_ids: vec![1, 2, 3],
        });
        let r = s.commit(b, t0()).unwrap();
        assert_eq!(r.failed.len(), 1);
        assert!(s.image_bytes(7).unwrap().is_none());
        assert_eq!(s.capture(7).unwrap().unwrap().state, CaptureState::Failed);
    }

    #[test]
    fn many_small_batches_keep_few_runs_and_assemble() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        // One chunk per batch, as with many interleaved devices.
        for id in 1..=100u32 {
            let mut b = Batch {
                relaxed: true,
                ..Batch::default()
            };
            b.chunk(5, id, vec![id as u8; 3]);
            s.commit(b, t0()).unwrap();
        }
        let lengths = s.chunk_lengths(5).unwrap();
        assert_eq!(lengths, (1..=100).map(|id| (id, 3)).collect::<Vec<_>>());
        assert_eq!(s.counts().unwrap().chunks, 100);
        {
            let tx = s.db.begin_read().unwrap();
            let t = tx.open_table(PARTIALS).unwrap();
            // 100 = 0b1100100: three levels.
            assert_eq!(t.len().unwrap(), 3);
        }
        let mut b = Batch::default();
        b.capture(&capture(5, 300, 3));
        b.finalize.push(Finalize {
            capture_id: 5,
            chunk_ids: (1..=100).collect(),
        });
        assert!(s.commit(b, t0()).unwrap().failed.is_empty());
        let want: Vec<u8> = (1..=100u8).flat_map(|i| [i; 3]).collect();
        assert_eq!(s.image_bytes(5).unwrap().unwrap(), want);
        assert_eq!(s.counts().unwrap().chunks, 0);
    }

    #[test]
    fn drop_chunks_discards_stored_and_batched_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        let mut b = Batch::default();
        b.chunk(2, 1, vec![1]);
        b.chunk(4, 1, vec![7]);
        s.commit(b, t0()).unwrap();
        let mut b = Batch::default();
        b.chunk(2, 2, vec![2]);
        b.drop_chunks.push(2);
        s.commit(b, t0()).unwrap();
        assert!(s.chunk_lengths(2).unwrap().is_empty());
        assert_eq!(s.chunk_lengths(4).unwrap(), vec![(1, 1)]);
    }

    #[test]
    fn version_1_chunk_rows_migrate_to_partials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            // A schema-1 file as barngate 1 wrote it: one CHUNKS row per chunk.
            let d = Database::create(&path).unwrap();
            let tx = d.begin_write().unwrap();
            {
                let mut meta = tx.open_table(META).unwrap();
                meta.insert("schema_version", 1).unwrap();
                let mut chunks = tx.open_table(CHUNKS_V1).unwrap();
                chunks.insert((1, 2), [3u8, 4].as_slice()).unwrap();
                chunks.insert((1, 1), [1u8, 2].as_slice()).unwrap();
                chunks.insert((9, 0), [9u8].as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.chunk_lengths(1).unwrap(), vec![(1, 2), (2, 2)]);
        assert_eq!(s.chunk_lengths(9).unwrap(), vec![(0, 1)]);
        {
            let tx = s.db.begin_read().unwrap();
            assert!(tx.open_table(CHUNKS_V1).is_err(), "CHUNKS deleted");
        }
        let mut b = Batch::default();
        b.capture(&capture(1, 5, 2));
        b.chunk(1, 3, vec![5]);
        b.finalize.push(Finalize {
            capture_id: 1,
            chunk_ids: vec![1, 2, 3],
        });
        assert!(s.commit(b, t0()).unwrap().failed.is_empty());
        assert_eq!(s.image_bytes(1).unwrap().unwrap(), vec![1, 2, 3, 4, 5]);
        drop(s);
        // Reopening a migrated file is a no-op.
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.chunk_lengths(9).unwrap(), vec![(0, 1)]);
    }

    #[test]
    fn version_3_telemetry_is_rekeyed_by_capture_with_its_outbox_items() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let mac = "AABBCCDDEEFF";
        let rec = |capture_id: u64, ms: i64| TelemetryRecord {
            mac: mac.into(),
            captured_at: DateTime::from_timestamp_millis(ms).unwrap(),
            received_at: t0(),
            capture_id,
            temperature: Some(capture_id as f64),
            humidity: None,
            pressure: None,
            gas_resistance: None,
            battery: Some(50.0),
            error: 0,
        };
        let ms = t0().timestamp_millis();
        {
            // A schema-3 file: telemetry keyed by (MAC, device time ms), with
            // its outbox items keyed the same way.
            let d = Database::create(&path).unwrap();
            let tx = d.begin_write().unwrap();
            {
                let mut meta = tx.open_table(META).unwrap();
                meta.insert("schema_version", 3).unwrap();
                let mut t = tx.open_table(TELEMETRY_V3).unwrap();
                t.insert((mac, ms), enc(&rec(5, ms)).as_slice()).unwrap();
                t.insert((mac, ms + 1000), enc(&rec(6, ms + 1000)).as_slice())
                    .unwrap();
                let mut o = tx.open_table(OUTBOX).unwrap();
                for (seq, key) in [(1u64, ms.to_string()), (2, (ms + 1000).to_string())] {
                    let item = OutboxItem {
                        seq,
                        kind: "telemetry".into(),
                        mac: mac.into(),
                        key,
                        queued_at: t0(),
                    };
                    o.insert(seq, enc(&item).as_slice()).unwrap();
                }
            }
            tx.commit().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), 4);
        assert_eq!(
            s.telemetry(mac).unwrap(),
            vec![rec(5, ms), rec(6, ms + 1000)]
        );
        let keys: Vec<String> = s.outbox(10).unwrap().into_iter().map(|i| i.key).collect();
        assert_eq!(keys, vec!["5", "6"]);
        assert_eq!(s.telemetry_of(mac, 6).unwrap(), Some(rec(6, ms + 1000)));
        // Now two captures with the same device time keep a row each.
        let mut b = Batch::default();
        b.telemetry.push(rec(7, ms));
        s.commit(b, t0()).unwrap();
        assert_eq!(s.telemetry(mac).unwrap().len(), 3);
        {
            let tx = s.db.begin_read().unwrap();
            assert!(tx.open_table(TELEMETRY_V3).is_err(), "old table deleted");
        }
    }

    #[test]
    fn a_capture_that_ends_failed_is_queued_once_per_failure() {
        let s = Store::open_in_memory().unwrap();
        let mut c = capture(3, 10, 5);
        c.state = CaptureState::Receiving;
        let mut b = Batch::default();
        b.capture(&c);
        s.commit(b, t0()).unwrap();
        assert_eq!(s.outbox(10).unwrap().len(), 0);
        c.state = CaptureState::Failed;
        c.failures = 1;
        for _ in 0..2 {
            let mut b = Batch::default();
            b.capture(&c);
            s.commit(b, t0()).unwrap();
        }
        let items = s.outbox(10).unwrap();
        assert_eq!(items.len(), 1, "{items:?}");
        assert_eq!(
            (items[0].kind.as_str(), items[0].key.as_str()),
            ("capture", "3")
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Any batches of chunks, with repeats within and across batches,
        /// then a finalize: the image and the lengths are those of a
        /// last-write-wins map.
        #[test]
        fn partials_match_a_last_write_wins_model(
            batches in proptest::collection::vec(
                proptest::collection::vec(
                    (1u64..4, 0u32..12, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5)),
                    0..10,
                ),
                0..20,
            ),
            relaxed in proptest::prelude::any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open(&dir.path().join("db.redb")).unwrap();
            let mut model: BTreeMap<u64, BTreeMap<u32, Vec<u8>>> = BTreeMap::new();
            for batch in batches {
                let mut b = Batch {
                    relaxed,
                    ..Batch::default()
                };
                for (cid, id, bytes) in batch {
                    model.entry(cid).or_default().insert(id, bytes.clone());
                    b.chunk(cid, id, bytes);
                }
                s.commit(b, t0()).unwrap();
                for cid in 1..4 {
                    let want: Vec<(u32, u32)> = model
                        .get(&cid)
                        .map(|m| m.iter().map(|(id, v)| (*id, v.len() as u32)).collect())
                        .unwrap_or_default();
                    proptest::prop_assert_eq!(s.chunk_lengths(cid).unwrap(), want);
                }
            }
            let mut b = Batch::default();
            for (cid, m) in &model {
                let image: Vec<u8> = m.values().flatten().copied().collect();
                b.capture(&capture(*cid, image.len() as u32, 4));
                b.finalize.push(Finalize {
                    capture_id: *cid,
                    chunk_ids: m.keys().copied().collect(),
                });
            }
            proptest::prop_assert!(s.commit(b, t0()).unwrap().failed.is_empty());
            for (cid, m) in &model {
                let image: Vec<u8> = m.values().flatten().copied().collect();
                proptest::prop_assert_eq!(s.image_bytes(*cid).unwrap().unwrap(), image);
                proptest::prop_assert!(s.chunk_lengths(*cid).unwrap().is_empty());
            }
            proptest::prop_assert_eq!(s.counts().unwrap().chunks, 0);
        }
    }

    #[test]
    fn in_memory_store_commits_and_finalizes_like_a_file() {
        let s = Store::open_in_memory().unwrap();
        let mut c = capture(9, 3, 2);
        c.state = CaptureState::Receiving;
        let mut b = Batch::default();
        b.capture(&c);
        b.chunk(9, 1, vec![1, 2]);
        b.chunk(9, 2, vec![3]);
        s.commit(b, t0()).unwrap();
        assert_eq!(s.chunk_lengths(9).unwrap(), vec![(1, 2), (2, 1)]);
    }

    #[test]
    fn truncated_database_gives_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let s = Store::open(&path).unwrap();
            s.put_device(
                &DeviceRecord {
                    mac: "AABBCCDDEEFF".into(),
                    wire_id: "AABBCCDDEEFF".into(),
                    dialect: Dialect::Firmware,
                    dialect_pinned: false,
                    chunk_base: None,
                    site: None,
                    location: None,
                    firmware_version: None,
                    hardware_version: None,
                    registered_at: t0(),
                    last_seen: None,
                    next_wake: None,
                    battery: None,
                    battery_voltage: None,
                    status: "active".into(),
                    cert_serial: None,
                    registration_index: 0,
                    stagger_slot: 0,
                    schedule: None,
                    last_current_capture_at: None,
                    pending_reported: 0,
                    last_error: None,
                },
                t0(),
            )
            .unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 3).unwrap();
        drop(f);
        match Store::open(&path) {
            Err(e) => assert!(e.to_string().contains("cannot open database"), "{e}"),
            // redb may repair a torn tail; then the data must still read.
            Ok(s) => {
                let _ = s.devices();
            }
        }
    }
}
