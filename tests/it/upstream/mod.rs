//! Store-and-forward against real servers on loopback: PostgreSQL (Debian's
//! package, in a temp dir) and s3s-fs, an S3-compatible server that checks
//! SigV4 signatures. Outages, a killed gateway, wrong credentials for either
//! sink, a 10,000-item backlog, cloud schema migrations and two sites
//! syncing into one cloud.

mod migrations;
mod objects;
mod outage;
mod rows;
mod status;

use crate::support::cloud::*;
use barngate::clock::SystemClock;
use barngate::metrics::Metrics;
use barngate::protocol::Metadata;
use barngate::store::{
    Batch, CaptureRecord, CaptureState, Finalize, Origin, Store, TelemetryRecord,
};
use barngate::upstream::Forwarder;
use chrono::{DateTime, TimeZone, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(90);

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 8, 0, 0).unwrap()
}

/// Commits one complete image straight to the store (the ingest's batch shape).
fn commit_image(store: &Store, id: u64, mac: &str, name: &str, bytes: &[u8], at: DateTime<Utc>) {
    let meta = Metadata {
        device_id: mac.into(),
        image_name: name.into(),
        capture_timestamp: at.to_rfc3339(),
        image_size: bytes.len() as u32,
        max_chunk_size: bytes.len() as u32,
        total_chunks_count: 1,
        announced_chunks: None,
        error: 0,
        location: Some("Barn 1".into()),
        temperature: Some(21.0),
        humidity: None,
        pressure: None,
        gas_resistance: None,
        battery: None,
        sha256: None,
    };
    let c = CaptureRecord {
        id,
        mac: mac.into(),
        image_name: name.into(),
        version: 1,
        state: CaptureState::Complete,
        origin: Origin::Current,
        raw_metadata: Some(serde_json::to_string(&meta).unwrap()),
        metadata: Some(meta),
        device_time: Some(at),
        first_seen_at: at,
        metadata_at: Some(at),
        updated_at: at,
        retries: 0,
        failures: 0,
        refusals: 0,
        chunk_base: Some(1),
        chunks_received: 1,
        sha256: None,
        assembled_at: None,
        acked_at: Some(at),
        failed_reason: None,
    };
    let mut b = Batch::default();
    b.capture(&c);
    b.chunk(id, 1, bytes.to_vec());
    b.finalize.push(Finalize {
        capture_id: id,
        chunk_ids: vec![1],
    });
    b.telemetry.push(telemetry(mac, id, at));
    let r = store.commit(b, at).unwrap();
    assert!(r.failed.is_empty());
}

fn telemetry(mac: &str, capture_id: u64, at: DateTime<Utc>) -> TelemetryRecord {
    TelemetryRecord {
        mac: mac.into(),
        captured_at: at,
        received_at: at,
        capture_id,
        temperature: Some(21.5),
        humidity: Some(55.0),
        pressure: Some(1012.0),
        gas_resistance: Some(100.0),
        battery: Some(80.0),
        error: 0,
    }
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

fn backlog(store: &Store) -> u64 {
    store.outbox_stats().unwrap().backlog
}

/// object key, size, SHA-256, created_at of one `device_images` row.
type UpRow = (String, i32, String, DateTime<Utc>);

/// Every image stored locally is upstream exactly once: one row, one object
/// with the same bytes, and rows arrived in capture order per device.
async fn assert_images_upstream_once(store: &Store, pg: &Postgres, objects: &ObjectStore) {
    let c = pg.client().await;
    let local = store.images(None).unwrap();
    let rows = c
        .query(
            "SELECT device_mac, image_name, object_key, image_size, sha256, status, created_at
             FROM device_images",
            &[],
        )
        .await
        .unwrap();
    let names: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let local_names: Vec<(String, String, u32, u64)> = local
        .iter()
        .map(|c| (c.mac.clone(), c.image_name.clone(), c.version, c.id))
        .collect();
    assert_eq!(
        rows.len(),
        local.len(),
        "one row per local image: upstream {names:?} local {local_names:?}"
    );
    let keys = objects.keys("device-observations/").await;
    assert_eq!(
        keys.len(),
        local.len(),
        "one object per local image: {keys:?}"
    );
    let mut by_name: BTreeMap<(String, String), UpRow> = BTreeMap::new();
    for r in &rows {
        assert_eq!(r.get::<_, String>(5), "complete");
        by_name.insert(
            (r.get(0), r.get(1)),
            (r.get(2), r.get(3), r.get(4), r.get(6)),
        );
    }
    let mut last: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    for img in &local {
        let (key, size, sha, created) = by_name
            .get(&(img.mac.clone(), img.image_name.clone()))
            .unwrap_or_else(|| panic!("{} {} upstream", img.mac, img.image_name));
        let bytes = store.image_bytes(img.id).unwrap().unwrap();
        assert_eq!(*size as usize, bytes.len());
        assert_eq!(sha, img.sha256.as_ref().unwrap());
        assert_eq!(objects.get(key).await, bytes, "object bytes of {key}");
        // Outbox order is capture order per device: a later image's row is
        // never written in an earlier transaction.
        if let Some(prev) = last.get(&img.mac) {
            assert!(created >= prev, "rows of {} out of order", img.mac);
        }
        last.insert(img.mac.clone(), *created);
    }
}

fn forwarder(
    store: &Arc<Store>,
    cfg: barngate::config::UpstreamConfig,
    dir: &std::path::Path,
) -> Forwarder {
    Forwarder::new(
        cfg,
        "site-1".into(),
        store.clone(),
        Arc::new(Metrics::default()),
        Arc::new(SystemClock),
        dir.to_path_buf(),
    )
    .unwrap()
}

/// Delivers the whole outbox with one forwarder.
async fn drain(store: &Arc<Store>, cfg: barngate::config::UpstreamConfig, dir: &std::path::Path) {
    let mut fwd = forwarder(store, cfg, dir);
    while backlog(store) > 0 {
        let r = fwd.round().await;
        assert!(r.error.is_none(), "{:?}", r.error);
    }
}

/// A capture that ended failed: announced with `total` chunks, `received`
/// of them in, after `rounds` rounds of missing-chunk requests.
fn failed_capture(
    id: u64,
    mac: &str,
    name: &str,
    total: u32,
    received: u32,
    rounds: u32,
) -> CaptureRecord {
    let size = total * 100;
    let meta = Metadata {
        device_id: mac.into(),
        image_name: name.into(),
        capture_timestamp: t0().to_rfc3339(),
        image_size: size,
        max_chunk_size: 100,
        total_chunks_count: total,
        announced_chunks: None,
        error: 0,
        location: None,
        temperature: Some(20.0),
        humidity: None,
        pressure: None,
        gas_resistance: None,
        battery: Some(64.0),
        sha256: None,
    };
    CaptureRecord {
        id,
        mac: mac.into(),
        image_name: name.into(),
        version: 1,
        state: CaptureState::Failed,
        origin: Origin::Current,
        raw_metadata: Some(serde_json::to_string(&meta).unwrap()),
        metadata: Some(meta),
        device_time: Some(t0()),
        first_seen_at: t0(),
        metadata_at: Some(t0()),
        updated_at: t0(),
        retries: rounds,
        failures: 1,
        refusals: 0,
        chunk_base: Some(1),
        chunks_received: received,
        sha256: None,
        assembled_at: None,
        acked_at: None,
        failed_reason: Some(format!(
            "{} chunks still missing after {rounds} retries",
            total - received
        )),
    }
}
