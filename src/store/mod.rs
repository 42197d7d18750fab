//! The embedded redb database (GATEWAY.md §4): one table per concept, a
//! versioned schema, and [`Store::commit`], which applies a [`Batch`] of the
//! ingest's changes — chunks, captures, finalised images with their SHA-256,
//! and the upstream outbox entries for them — in one durable transaction.
//!
//! Records are stored as JSON values (self-describing, so a later release can
//! migrate them); chunk and image bytes are stored raw. The chunks of a
//! capture still in progress live in a few PARTIALS values per capture (not
//! one row per chunk), so a chunk costs one small share of a write per batch.
//!
//! The tables are defined here (the totals' own in `totals`, those only read
//! to migrate in `schema`). `records` holds the record types; `schema` the
//! schema version and its migrations; `batch` the [`Batch`] and its commit;
//! `partials` the chunks of captures in progress; `queries` the reads;
//! `outbox` the upstream outbox, sync state and uploads; `alerts` the alert
//! id ranges and the gateway's own alerts; `totals` the per-device totals.

use redb::{Database, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

mod alerts;
mod batch;
mod outbox;
mod partials;
mod queries;
mod records;
mod schema;
mod totals;

pub use alerts::GATEWAY_ALERT_BASE;
pub use batch::{Batch, CommitReport, Finalize};
pub use outbox::OutboxStats;
pub use queries::StoreCounts;
pub use records::{
    AlertRecord, CaptureRecord, CaptureState, CommandRecord, DeviceRecord, Origin, OutboxItem,
    SessionRecord, SyncState, TelemetryRecord, UploadRecord,
};
pub use schema::SCHEMA_VERSION;
pub use totals::CaptureTotals;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// META key: the next capture id to hand out (ids are never reused).
const NEXT_CAPTURE_ID: &str = "next_capture_id";
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const SESSIONS: TableDefinition<(&str, i64), &[u8]> = TableDefinition::new("wake_sessions");
const CAPTURES: TableDefinition<u64, &[u8]> = TableDefinition::new("captures");
const CAPTURE_NAMES: TableDefinition<(&str, &str), u64> = TableDefinition::new("capture_names");
const DEVICE_CAPTURES: TableDefinition<(&str, u64), ()> = TableDefinition::new("device_captures");
/// Received chunks of captures in progress: `(capture id, level)` → a run of
/// chunks ([`partials::encode_run`]); see [`partials::append_partial`] for
/// the levels.
const PARTIALS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("partials");
const IMAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("images");
/// A capture's readings: `(MAC, capture id)` → [`TelemetryRecord`].
const TELEMETRY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("telemetry_by_capture");
const COMMANDS: TableDefinition<u64, &[u8]> = TableDefinition::new("commands");
const ALERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("alerts");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Forwarder state (`state` → [`SyncState`]).
const SYNC: TableDefinition<&str, &[u8]> = TableDefinition::new("sync_state");
/// Images confirmed upstream: capture id → [`UploadRecord`].
const UPLOADS: TableDefinition<u64, &[u8]> = TableDefinition::new("uploads");

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
        Store::with_db(db)
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
        Store::with_db(db)
    }

    /// A store over an opened database, its tables created or migrated.
    fn with_db(db: Database) -> Result<Store, StoreError> {
        let store = Store {
            db,
            max_commands: std::sync::atomic::AtomicU64::new(u64::MAX),
        };
        store.init_schema()?;
        Ok(store)
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

    /// Keeps at most `n` commands in the command log (the oldest go first).
    pub fn set_command_retention(&self, n: u64) {
        self.max_commands
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The tests of opening a store, and the helpers the store's other tests
/// (and the ingest's) build their captures with.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::{Dialect, Metadata};
    use chrono::{DateTime, TimeZone, Utc};

    /// The time every test record is stamped with.
    pub(crate) fn t0() -> DateTime<Utc> {
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
                &DeviceRecord::new("AABBCCDDEEFF", Dialect::Firmware, "s", 0, 0, t0()),
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
