//! Store-and-forward against real servers on loopback: PostgreSQL (Debian's
//! package, in a temp dir) and s3s-fs, an S3-compatible server that checks
//! SigV4 signatures. Outages, a killed gateway, wrong credentials for either
//! sink, a 10,000-item backlog, cloud schema migrations and two sites
//! syncing into one cloud.

use crate::support::cloud::*;
use crate::support::*;
use barngate::clock::SystemClock;
use barngate::metrics::Metrics;
use barngate::protocol::Metadata;
use barngate::store::{
    Batch, CaptureRecord, CaptureState, Finalize, Origin, Store, TelemetryRecord,
};
use barngate::upstream::{self, Forwarder, ALERT_CREDENTIALS};
use chrono::{DateTime, Duration as CDuration, TimeZone, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_of_postgres_and_object_store_lose_and_duplicate_nothing() {
    let pg = Postgres::start();
    let mut objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config();
    cfg.upstream = upstream_config(&pg, &objects);
    let gw = start_gateway(dir.path(), cfg).await;
    let store = gw.store.clone();

    let mut devs = Vec::new();
    for id in ["B8F862F9CF01", "B8F862F9CF02"] {
        devs.push(Device::connect(gw.plain_addr.unwrap(), id, false).await);
    }
    let mut n = 0u32;
    // Online: delivered as they come.
    n += 1;
    deliver_round(&mut devs, n).await;
    eventually(LONG, "first images upstream", || backlog(&store) == 0).await;

    // PostgreSQL down: the ingest goes on, the backlog grows and is kept.
    pg.down();
    n += 1;
    deliver_round(&mut devs, n).await;
    n += 1;
    deliver_round(&mut devs, n).await;
    eventually(LONG, "a failed attempt while PostgreSQL is down", || {
        store.sync_state().unwrap().consecutive_failures > 0
    })
    .await;
    assert!(backlog(&store) > 0);
    let st = upstream::status(&store, Utc::now()).unwrap();
    assert!(
        st.last_error.as_deref().unwrap().contains("PostgreSQL"),
        "{st:?}"
    );
    pg.up();
    eventually(LONG, "backlog drained after PostgreSQL returns", || {
        backlog(&store) == 0
    })
    .await;

    // Object store down.
    objects.relay.cut();
    n += 1;
    deliver_round(&mut devs, n).await;
    n += 1;
    deliver_round(&mut devs, n).await;
    eventually(
        LONG,
        "a failed attempt while the object store is down",
        || {
            store
                .sync_state()
                .unwrap()
                .last_error
                .is_some_and(|e| e.contains("object storage"))
                && store.sync_state().unwrap().consecutive_failures > 0
        },
    )
    .await;
    assert!(backlog(&store) > 0);
    objects.relay.restore().await;
    eventually(
        LONG,
        "backlog drained after the object store returns",
        || backlog(&store) == 0,
    )
    .await;

    assert!(store.images(None).unwrap().len() >= 10);
    assert_images_upstream_once(&store, &pg, &objects).await;
    let c = pg.client().await;
    let local_telemetry: usize = ["B8F862F9CF01", "B8F862F9CF02"]
        .iter()
        .map(|m| store.telemetry(m).unwrap().len())
        .sum();
    assert_eq!(
        count(&c, "SELECT count(*) FROM device_telemetry").await as usize,
        local_telemetry
    );
    assert_eq!(count(&c, "SELECT count(*) FROM devices").await, 2);
    // The device metadata JSON is kept whole.
    let meta: serde_json::Value = c
        .query_one(
            "SELECT metadata FROM device_images WHERE device_mac = 'B8F862F9CF01' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(meta["firmware_extra"], "kept", "{meta}");
    assert!(count(&c, "SELECT count(*) FROM device_wake_sessions").await >= 2);
    // Same figures on /metrics as in `sync status`.
    let body = String::from_utf8(http(gw.http_addr, "GET", "/metrics", "", "").await.2).unwrap();
    assert!(body.contains("barngate_upstream_backlog 0"), "{body}");
    assert!(body.contains("barngate_upstream_oldest_age_seconds 0"));
    gw.shutdown().await.unwrap();
}

/// One wake per device: the first asks for a capture; later ones (same
/// schedule slot) send a stored image, then maybe a capture, then sleep.
async fn deliver_round(devs: &mut [Device], k: u32) {
    for (i, d) in devs.iter_mut().enumerate() {
        let img = image_bytes(k * 10 + i as u32, 3000 + 100 * k as usize);
        let ts = format!("2026-03-01T08:{k:02}:00Z");
        if k == 1 {
            d.hello(0).await;
            d.expect("capture_image").await;
        } else {
            d.hello(1).await;
            d.expect("ACK_OK").await;
        }
        d.deliver(&format!("img_{k:03}.jpg"), &img, 512, &ts).await;
        let (_, v) = d.recv().await;
        if v.get("capture_image").is_some() {
            let img = image_bytes(k * 10 + 5 + i as u32, 2000);
            d.deliver(&format!("img_{k:03}_c.jpg"), &img, 512, &ts)
                .await;
            d.expect("next_wake").await;
        } else {
            assert!(v.get("next_wake").is_some(), "{v}");
        }
    }
}

/// A plain HTTP/1.0 GET over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_mid_upload_resumes_without_duplicates() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    const IMAGES: u64 = 120;
    {
        let store = Store::open(&dir.path().join("barngate.redb")).unwrap();
        for i in 0..IMAGES {
            let mac = if i % 2 == 0 {
                "AABBCCDDEE01"
            } else {
                "AABBCCDDEE02"
            };
            let at = t0() + CDuration::seconds(i as i64);
            commit_image(
                &store,
                i + 1,
                mac,
                &format!("img_{i:04}.jpg"),
                &image_bytes(i as u32, 20_000),
                at,
            );
        }
    }
    let mut u = upstream_config(&pg, &objects);
    u.batch_size = 5;
    let toml_cfg = format!(
        "[site]\ntimezone = \"UTC\"\n[upstream]\nenabled = true\nbucket = \"{}\"\nendpoint = \"{}\"\nbackoff_initial_ms = 50\nbackoff_max_s = 1\nbatch_size = 5\n",
        u.bucket, u.endpoint
    );
    let cfg_path = dir.path().join("barngate.toml");
    std::fs::write(&cfg_path, toml_cfg).unwrap();
    let spawn = || {
        barngate()
            .arg("--data-dir")
            .arg(dir.path())
            .args([
                "serve",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            // Secrets from the environment, not the file.
            .env("BARNGATE_UPSTREAM_POSTGRES_URL", pg.url())
            .env("BARNGATE_UPSTREAM_ACCESS_KEY", S3_KEY)
            .env("BARNGATE_UPSTREAM_SECRET_KEY", S3_SECRET)
            .env("BARNGATE_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let c = pg.client().await;
    upstream::migrate(&u).await.unwrap();
    let mut child = spawn();
    // Kill it (SIGKILL) while the upload is under way.
    let t = Instant::now();
    loop {
        let n = count(&c, "SELECT count(*) FROM device_images").await;
        if n >= 10 {
            assert!((n as u64) < IMAGES, "killed too late: {n} rows already");
            break;
        }
        assert!(t.elapsed() < LONG, "upload never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = count(&c, "SELECT count(*) FROM device_images").await;

    let mut child = spawn();
    let t = Instant::now();
    while count(&c, "SELECT count(*) FROM device_images").await < IMAGES as i64 {
        assert!(t.elapsed() < LONG, "resume did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let it acknowledge the last page, then stop it (SIGTERM) to open the store.
    let out = barngate()
        .arg("--data-dir")
        .arg(dir.path())
        .args(["sync", "status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(st.get("backlog").is_some(), "{st}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let store = Store::open(&dir.path().join("barngate.redb")).unwrap();
    if backlog(&store) > 0 {
        // The last acknowledgement may have been cut by the stop: a third
        // run replays it, which must change nothing upstream.
        let mut child = spawn();
        drop(store);
        let t = Instant::now();
        loop {
            let out = barngate()
                .arg("--data-dir")
                .arg(dir.path())
                .args(["sync", "status", "--json"])
                .output()
                .unwrap();
            let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if st["backlog"] == 0 {
                break;
            }
            assert!(t.elapsed() < LONG);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap();
    } else {
        drop(store);
    }
    let store = Store::open(&dir.path().join("barngate.redb")).unwrap();
    assert_eq!(backlog(&store), 0);
    eprintln!("killed with {before}/{IMAGES} image rows upstream; resumed to {IMAGES}");
    assert_images_upstream_once(&store, &pg, &objects).await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM device_telemetry").await,
        IMAGES as i64
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_keep_the_backlog_and_raise_an_alert() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    for i in 0..20 {
        commit_image(
            &store,
            i + 1,
            "AABBCCDDEE09",
            &format!("i{i}.jpg"),
            &image_bytes(i as u32, 500),
            t0() + CDuration::minutes(i as i64),
        );
    }
    let queued = backlog(&store);
    let mut bad = upstream_config(&pg, &objects);
    bad.postgres_url = pg.url_with("wrong-password");
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(forwarder(&store, bad, dir.path()).run(stop_rx));
    eventually(LONG, "the credentials alert", || {
        store
            .open_gateway_alert(ALERT_CREDENTIALS)
            .unwrap()
            .is_some()
    })
    .await;
    let st = upstream::status(&store, Utc::now()).unwrap();
    let err = st.last_error.unwrap();
    assert!(
        err.contains("rejected the credentials") && err.contains("password authentication failed"),
        "{err}"
    );
    assert!(
        !err.contains("wrong-password"),
        "secret in the error: {err}"
    );
    // Backlog kept; the alert itself is queued for upstream too.
    assert_eq!(backlog(&store), queued + 1, "backlog kept");
    let _ = stop_tx.send(true);
    task.await.unwrap();
    assert_eq!(backlog(&store), queued + 1);

    // Fixed credentials: everything drains and the alert resolves.
    let (stop_tx, stop_rx) = watch::channel(false);
    let task =
        tokio::spawn(forwarder(&store, upstream_config(&pg, &objects), dir.path()).run(stop_rx));
    eventually(LONG, "drain with good credentials", || {
        backlog(&store) == 0
            && store
                .open_gateway_alert(ALERT_CREDENTIALS)
                .unwrap()
                .is_none()
    })
    .await;
    eventually(LONG, "resolution delivered", || backlog(&store) == 0).await;
    let _ = stop_tx.send(true);
    task.await.unwrap();
    let c = pg.client().await;
    let resolved: Option<DateTime<Utc>> = c
        .query_one(
            "SELECT resolved_at FROM device_alerts WHERE alert_type = 'upstream_credentials'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(resolved.is_some());
    assert_images_upstream_once(&store, &pg, &objects).await;
    // A success clears the last error.
    let st = upstream::status(&store, Utc::now()).unwrap();
    assert_eq!(st.last_error, None, "{st:?}");
    assert_eq!(st.consecutive_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_10000_items_drains() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    const N: usize = 10_000;
    for part in 0..10 {
        let mut b = Batch::default();
        for i in 0..N / 10 {
            let k = part * (N / 10) + i;
            let mac = format!("AABBCCDD{:04X}", k % 50);
            b.telemetry.push(telemetry(
                &mac,
                k as u64 + 1,
                t0() + CDuration::seconds(k as i64),
            ));
        }
        store.commit(b, t0()).unwrap();
    }
    assert_eq!(backlog(&store), N as u64);
    let mut fwd = forwarder(&store, upstream_config(&pg, &objects), dir.path());
    let t = Instant::now();
    let mut delivered = 0;
    while delivered < N {
        let r = fwd.round().await;
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(r.delivered > 0);
        delivered += r.delivered;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "upstream drain: {N} telemetry items in {secs:.2} s = {:.0} items/s (batch_size {})",
        N as f64 / secs,
        barngate::config::UpstreamConfig::default().batch_size
    );
    assert_eq!(backlog(&store), 0);
    let c = pg.client().await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM device_telemetry").await,
        N as i64
    );
    assert_eq!(count(&c, "SELECT count(*) FROM devices").await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_unuploaded_images_and_deletes_oldest_uploaded_first() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    for i in 0..6u64 {
        commit_image(
            &store,
            i + 1,
            "AABBCCDDEE07",
            &format!("r{i}.jpg"),
            &image_bytes(i as u32, 1000),
            t0(),
        );
    }
    let cfg = upstream_config(&pg, &objects);
    // Nothing uploaded yet: even a full disk deletes nothing.
    let (n, _) =
        upstream::retention_pass(&store, &cfg, Some((99, 100)), t0() + CDuration::days(400))
            .unwrap();
    assert_eq!(n, 0);
    assert!(store
        .open_gateway_alert(upstream::ALERT_DISK)
        .unwrap()
        .is_some());
    let mut fwd = forwarder(&store, cfg.clone(), dir.path());
    while backlog(&store) > 0 {
        let r = fwd.round().await;
        assert!(r.error.is_none(), "{:?}", r.error);
    }
    // 4 more not uploaded.
    for i in 6..10u64 {
        commit_image(
            &store,
            i + 1,
            "AABBCCDDEE07",
            &format!("r{i}.jpg"),
            &image_bytes(i as u32, 1000),
            t0(),
        );
    }
    let now = Utc::now();
    // Within retention, disk fine: nothing goes.
    let (n, _) = upstream::retention_pass(&store, &cfg, Some((10, 100)), now).unwrap();
    assert_eq!(n, 0);
    assert!(
        store
            .open_gateway_alert(upstream::ALERT_DISK)
            .unwrap()
            .is_none(),
        "resolved"
    );
    // Disk at the 90 % mark: the oldest uploaded go first, just enough of
    // them to get 5 points below (5000 of 100000 bytes = 5 images of 1000).
    let (n, bytes) = upstream::retention_pass(&store, &cfg, Some((90_000, 100_000)), now).unwrap();
    assert_eq!((n, bytes), (5, 5000));
    assert!(store
        .open_gateway_alert(upstream::ALERT_DISK)
        .unwrap()
        .is_some());
    for i in 0..5u64 {
        assert!(
            store.image_bytes(i + 1).unwrap().is_none(),
            "oldest uploaded first"
        );
    }
    assert!(store.image_bytes(6).unwrap().is_some());
    for i in 6..10u64 {
        assert!(
            store.image_bytes(i + 1).unwrap().is_some(),
            "not uploaded: kept"
        );
    }
    // Past retention: every uploaded image's bytes go, records stay.
    let (_, _) =
        upstream::retention_pass(&store, &cfg, Some((10, 100)), now + CDuration::days(31)).unwrap();
    for i in 0..6u64 {
        assert!(store.image_bytes(i + 1).unwrap().is_none());
        assert!(store.capture(i + 1).unwrap().is_some());
    }
    for i in 6..10u64 {
        assert!(store.image_bytes(i + 1).unwrap().is_some());
    }
}

/// `upstream migrate` creates a missing bucket (without the
/// LocationConstraint that S3 rejects for us-east-1; with it for
/// other regions), leaves an existing one alone, and uploads then go in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_a_missing_bucket() {
    use barngate::upstream::objects::ObjectSink;
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let mut fresh = upstream_config(&pg, &objects);
    fresh.bucket = "fresh-images".into();
    let created = true;
    let there = false;
    let migrate = |cfg| async move { upstream::migrate(&cfg).await.map(|r| r.bucket_created) };
    assert_eq!(migrate(fresh.clone()).await.unwrap(), created);
    assert_eq!(migrate(fresh.clone()).await.unwrap(), there);
    let existing = upstream_config(&pg, &objects);
    assert_eq!(migrate(existing.clone()).await.unwrap(), there);
    let mut eu = upstream_config(&pg, &objects);
    eu.bucket = "fresh-images-eu".into();
    eu.region = "eu-west-1".into();
    assert_eq!(migrate(eu.clone()).await.unwrap(), created);
    for cfg in [&fresh, &eu] {
        let sink = ObjectSink::new(cfg).unwrap();
        sink.put_verified("site/dev/x.jpg", b"\xff\xd8 an image")
            .await
            .unwrap();
    }
    let mut none = upstream_config(&pg, &objects);
    none.bucket = String::new();
    let e = upstream::migrate(&none).await.unwrap_err().to_string();
    assert!(e.contains("upstream.bucket"), "{e}");
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

/// Two captures stamped with the same device time used to share one
/// telemetry row (keyed by device and time): the second overwrote the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_captures_with_the_same_device_time_keep_two_telemetry_rows() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    let mac = "AABBCCDDEE21";
    commit_image(&store, 1, mac, "a.jpg", &image_bytes(1, 700), t0());
    // Same device time, other readings.
    let mut b = Batch::default();
    let mut t = telemetry(mac, 2, t0());
    t.temperature = Some(30.5);
    b.telemetry.push(t);
    store.commit(b, t0()).unwrap();
    assert_eq!(store.telemetry(mac).unwrap().len(), 2, "two rows locally");
    drain(&store, upstream_config(&pg, &objects), dir.path()).await;
    let c = pg.client().await;
    let rows = c
        .query(
            "SELECT gateway_capture_id, temperature, captured_at FROM device_telemetry
             WHERE device_mac = $1 ORDER BY gateway_capture_id",
            &[&mac],
        )
        .await
        .unwrap();
    let got: Vec<(i64, f64, DateTime<Utc>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(got, vec![(1, 21.5, t0()), (2, 30.5, t0())]);
}

/// A capture that failed after 3 rounds of missing-chunk requests used to
/// leave no row upstream; it arrives with its status, rounds, failures,
/// missing count and reason, and its row turns complete when it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_failed_after_3_rounds_has_a_row_with_status_failed() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    let mac = "AABBCCDDEE22";
    let mut b = Batch::default();
    b.capture(&failed_capture(7, mac, "lost.jpg", 5, 2, 3));
    store.commit(b, t0()).unwrap();
    assert_eq!(backlog(&store), 1, "the failed capture is queued");
    let cfg = upstream_config(&pg, &objects);
    drain(&store, cfg.clone(), dir.path()).await;
    let c = pg.client().await;
    let q = "SELECT status, retry_count, failures, missing_chunks, received_chunks, total_chunks,
                    failed_reason, object_key, gateway_capture_id
             FROM device_images WHERE device_mac = $1";
    let r = c.query_one(q, &[&mac]).await.unwrap();
    assert_eq!(r.get::<_, String>(0), "failed");
    assert_eq!(r.get::<_, i32>(1), 3, "rounds");
    assert_eq!(r.get::<_, i32>(2), 1, "failures");
    assert_eq!(r.get::<_, i32>(3), 3, "missing");
    assert_eq!(r.get::<_, i32>(4), 2);
    assert_eq!(r.get::<_, i32>(5), 5);
    assert!(r.get::<_, String>(6).contains("after 3 retries"));
    assert_eq!(r.get::<_, Option<String>>(7), None, "no object");
    assert_eq!(r.get::<_, i64>(8), 7);
    assert!(objects.keys("device-observations/").await.is_empty());

    // The device sends it again on a later wake and it completes.
    let bytes = image_bytes(7, 500);
    let mut cap = failed_capture(7, mac, "lost.jpg", 5, 5, 4);
    cap.state = CaptureState::Complete;
    cap.failed_reason = None;
    let mut b = Batch::default();
    b.capture(&cap);
    for i in 0..5u32 {
        b.chunk(
            7,
            i + 1,
            bytes[(i * 100) as usize..((i + 1) * 100) as usize].to_vec(),
        );
    }
    b.finalize.push(Finalize {
        capture_id: 7,
        chunk_ids: (1..=5).collect(),
    });
    assert!(store.commit(b, t0()).unwrap().failed.is_empty());
    drain(&store, cfg, dir.path()).await;
    let r = c.query_one(q, &[&mac]).await.unwrap();
    assert_eq!(r.get::<_, String>(0), "complete");
    assert_eq!(r.get::<_, i32>(1), 4);
    assert_eq!(r.get::<_, i32>(2), 1, "it failed once");
    assert_eq!(r.get::<_, i32>(3), 0);
    assert!(r.get::<_, Option<String>>(7).is_some());
    assert_eq!(count(&c, "SELECT count(*) FROM device_images").await, 1);
}

/// A device clock never set (1970) or far ahead used to pass through as
/// `captured_at`; now the device's time is kept in `captured_at_device`,
/// flagged, and `captured_at` is the gateway's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_clock_of_1970_is_flagged_and_captured_at_is_the_gateways() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    let mac = "AABBCCDDEE23";
    let epoch = Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 12).unwrap();
    let ahead = t0() + CDuration::days(3);
    for (id, at) in [(1u64, epoch), (2, ahead), (3, t0() - CDuration::days(4))] {
        commit_image(
            &store,
            id,
            mac,
            &format!("c{id}.jpg"),
            &image_bytes(id as u32, 300),
            at,
        );
        // The gateway first saw each at t0.
        let mut c = store.capture(id).unwrap().unwrap();
        c.first_seen_at = t0();
        let mut b = Batch::default();
        b.capture(&c);
        let mut t = telemetry(mac, id, at);
        t.received_at = t0();
        b.telemetry.push(t);
        store.commit(b, t0()).unwrap();
    }
    drain(&store, upstream_config(&pg, &objects), dir.path()).await;
    let c = pg.client().await;
    for table in ["device_images", "device_telemetry"] {
        let rows = c
            .query(
                &format!(
                    "SELECT captured_at, captured_at_device, device_time_valid FROM {table}
                     WHERE device_mac = $1 ORDER BY gateway_capture_id"
                ),
                &[&mac],
            )
            .await
            .unwrap();
        let got: Vec<(DateTime<Utc>, Option<DateTime<Utc>>, bool)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            got,
            vec![
                (t0(), Some(epoch), false),
                (t0(), Some(ahead), false),
                // Days old (an offline backlog) is believable.
                (
                    t0() - CDuration::days(4),
                    Some(t0() - CDuration::days(4)),
                    true
                ),
            ],
            "{table}"
        );
    }
}

/// What a device reports arrives in the column of its meaning: the HELLO's
/// and METADATA's `battery` is a percent, a voltage only when one was sent;
/// the hardware version, the Wi-Fi signal, the wake time and session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn battery_percent_lands_in_the_percent_column_and_wakes_are_recorded() {
    use serde_json::json;
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config();
    cfg.upstream = upstream_config(&pg, &objects);
    let gw = start_gateway(dir.path(), cfg).await;
    let store = gw.store.clone();
    let mac = "B8F862F9CF31";
    let mut d = Device::connect(gw.plain_addr.unwrap(), mac, false).await;
    let hello = json!({"device_id": mac, "status": "alive", "pendingImg": 0,
        "battery": 76.0, "battery_voltage": 3.91, "hardware_version": "ESP32-CAM rev2"});
    d.publish("status", hello.to_string().into_bytes()).await;
    d.expect("capture_image").await;
    let img = image_bytes(31, 1500);
    let mut m = d.metadata("a.jpg", &img, 500, "2026-03-01T08:00:00Z");
    m["battery"] = json!(75.0);
    m["wifi_rssi"] = json!(-61);
    d.publish("data", m.to_string().into_bytes()).await;
    d.expect("send_image").await;
    d.send_chunks("a.jpg", &img, 500, &[0, 1, 2]).await;
    d.expect("ACK_OK").await;
    eventually(LONG, "delivered", || {
        backlog(&store) == 0 && !store.images(Some(mac)).unwrap().is_empty()
    })
    .await;
    let c = pg.client().await;
    let r = c
        .query_one(
            "SELECT battery_percent, battery_voltage, hardware_version, last_wake_at
             FROM devices WHERE device_mac = $1",
            &[&mac],
        )
        .await
        .unwrap();
    let woke = store.sessions(mac).unwrap()[0].woke_at;
    assert_eq!(r.get::<_, Option<f64>>(0), Some(75.0), "latest percent");
    assert_eq!(
        r.get::<_, Option<f64>>(1),
        Some(3.91),
        "the HELLO's voltage"
    );
    assert_eq!(
        r.get::<_, Option<String>>(2).as_deref(),
        Some("ESP32-CAM rev2")
    );
    let last_wake: Option<DateTime<Utc>> = r.get(3);
    assert_eq!(
        last_wake.map(|t| t.timestamp_millis()),
        Some(woke.timestamp_millis())
    );
    let r = c
        .query_one(
            "SELECT battery_percent, battery_voltage, wifi_rssi, image_name, image_version
             FROM device_telemetry WHERE device_mac = $1",
            &[&mac],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, Option<f64>>(0), Some(75.0));
    assert_eq!(
        r.get::<_, Option<f64>>(1),
        None,
        "no voltage in this METADATA"
    );
    assert_eq!(r.get::<_, Option<i32>>(2), Some(-61));
    assert_eq!(r.get::<_, Option<String>>(3).as_deref(), Some("a.jpg"));
    assert_eq!(r.get::<_, Option<i32>>(4), Some(1));
    let r = c
        .query_one(
            "SELECT gateway_session_id, wifi_ok, mqtt_ok FROM device_wake_sessions
             WHERE device_mac = $1",
            &[&mac],
        )
        .await
        .unwrap();
    assert_eq!(
        r.get::<_, String>(0),
        format!("{mac}-{}", woke.timestamp_millis())
    );
    assert!(r.get::<_, bool>(1) && r.get::<_, bool>(2));
    gw.shutdown().await.unwrap();
}

/// A connection to the test database that records the server's NOTICEs.
async fn client_recording_notices(
    pg: &Postgres,
) -> (tokio_postgres::Client, Arc<std::sync::Mutex<Vec<String>>>) {
    use futures_util::StreamExt;
    let (client, mut conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let notices = Arc::new(std::sync::Mutex::new(Vec::new()));
    let n = notices.clone();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notice(e) = m {
                n.lock().unwrap().push(e.message().to_string());
            }
        }
    });
    (client, notices)
}

/// A cloud created by the old `init-schema` (no version table), holding an
/// old gateway's rows, is migrated in place: its rows are kept, the battery
/// percent the old gateway wrote into `battery_voltage` moves to
/// `battery_percent`, wake sessions get their ids, and new rows then go in
/// beside the old ones. Re-running is a no-op; neither run prints NOTICEs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_cloud_schema_with_data_is_migrated_and_keeps_its_data() {
    use barngate::upstream::pg;
    let pg_server = Postgres::start();
    let objects = ObjectStore::start().await;
    let mac = "AABBCCDDEE41";
    let c = pg_server.client().await;
    // Exactly what the old `init-schema` ran, then an old gateway's rows.
    c.batch_execute(pg::MIGRATIONS[0].sql).await.unwrap();
    c.batch_execute(&format!(
        "INSERT INTO devices (device_mac, site_id, battery_voltage, firmware_version)
           VALUES ('{mac}', 'site-1', 80, '1.0.0');
         INSERT INTO device_telemetry (device_mac, site_id, captured_at, received_at,
           temperature, battery_voltage)
           VALUES ('{mac}', 'site-1', '2026-02-01T08:00:00Z', '2026-02-01T08:00:02Z', 19.5, 81);
         INSERT INTO device_images (device_mac, site_id, image_name, image_version, object_key,
           captured_at, status, sha256)
           VALUES ('{mac}', 'site-1', 'old.jpg', 1, 'device-observations/site-1/{mac}/x_old.jpg',
           '2026-02-01T08:00:00Z', 'complete', 'abc');
         INSERT INTO device_wake_sessions (device_mac, site_id, woke_at, pending_reported)
           VALUES ('{mac}', 'site-1', '2026-02-01T07:59:58.123Z', 0);
         INSERT INTO device_alerts (device_mac, site_id, gateway_alert_id, alert_type, message)
           VALUES ('{mac}', 'site-1', 1, 'low_battery', 'Battery 15 %');"
    ))
    .await
    .unwrap();

    let (mut client, notices) = client_recording_notices(&pg_server).await;
    let r = pg::migrate(&mut client).await.unwrap();
    assert_eq!(r.from, 0);
    assert_eq!(r.to, pg::schema_version());
    assert_eq!(
        r.applied,
        pg::MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>()
    );
    let again = pg::migrate(&mut client).await.unwrap();
    assert!(again.applied.is_empty(), "{again:?}");
    assert_eq!(again.from, pg::schema_version());
    let cfg = upstream_config(&pg_server, &objects);
    let r = upstream::migrate(&cfg).await.unwrap();
    assert!(r.schema.applied.is_empty());
    assert!(
        notices.lock().unwrap().is_empty(),
        "NOTICEs: {:?}",
        notices.lock().unwrap()
    );

    // The old rows, with their meaning fixed.
    let r = c
        .query_one(
            "SELECT battery_percent, battery_voltage, firmware_version, last_wake_at
             FROM devices WHERE device_mac = $1",
            &[&mac],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, Option<f64>>(0), Some(80.0));
    assert_eq!(r.get::<_, Option<f64>>(1), None);
    assert_eq!(r.get::<_, Option<String>>(2).as_deref(), Some("1.0.0"));
    let woke = Utc.with_ymd_and_hms(2026, 2, 1, 7, 59, 58).unwrap() + CDuration::milliseconds(123);
    assert_eq!(r.get::<_, Option<DateTime<Utc>>>(3), Some(woke));
    let r = c
        .query_one(
            "SELECT battery_percent, battery_voltage, temperature FROM device_telemetry",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            r.get::<_, Option<f64>>(0),
            r.get::<_, Option<f64>>(1),
            r.get::<_, f64>(2)
        ),
        (Some(81.0), None, 19.5)
    );
    let id: String = c
        .query_one("SELECT gateway_session_id FROM device_wake_sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, format!("{mac}-{}", woke.timestamp_millis()));
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM device_images WHERE image_name = 'old.jpg' AND sha256 = 'abc'"
        )
        .await,
        1
    );
    assert_eq!(count(&c, "SELECT count(*) FROM device_alerts").await, 1);

    // A gateway of this version syncs into it beside the old rows.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    commit_image(&store, 1, mac, "new.jpg", &image_bytes(41, 400), t0());
    drain(&store, cfg, dir.path()).await;
    assert_eq!(count(&c, "SELECT count(*) FROM device_images").await, 2);
    assert_eq!(count(&c, "SELECT count(*) FROM device_telemetry").await, 2);
    assert_eq!(count(&c, "SELECT count(*) FROM devices").await, 1);
}

/// A cloud migrated by a newer barngate is refused, with an error that says
/// so in `sync status`, an alert, and the backlog kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_schema_newer_than_this_gateway_is_refused_with_a_clear_error() {
    use barngate::upstream::{pg, ALERT_SCHEMA};
    let pg_server = Postgres::start();
    let objects = ObjectStore::start().await;
    let cfg = upstream_config(&pg_server, &objects);
    upstream::migrate(&cfg).await.unwrap();
    let c = pg_server.client().await;
    let future = pg::schema_version() + 1;
    c.execute(
        "INSERT INTO barngate_schema_migrations (version, name) VALUES ($1, 'future')",
        &[&future],
    )
    .await
    .unwrap();
    let e = upstream::migrate(&cfg).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("version {future}, newer than this barngate knows")),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    commit_image(
        &store,
        1,
        "AABBCCDDEE42",
        "a.jpg",
        &image_bytes(42, 400),
        t0(),
    );
    let queued = backlog(&store);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(forwarder(&store, cfg, dir.path()).run(stop_rx));
    eventually(LONG, "the schema alert", || {
        store.open_gateway_alert(ALERT_SCHEMA).unwrap().is_some()
    })
    .await;
    let _ = stop_tx.send(true);
    task.await.unwrap();
    let st = upstream::status(&store, Utc::now()).unwrap();
    let err = st.last_error.unwrap();
    assert!(err.contains("upgrade barngate"), "{err}");
    assert_eq!(
        backlog(&store),
        queued + 1,
        "backlog kept (and the alert queued)"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM device_images").await, 0);
}

/// Two gateways, two data directories, two site ids, one database and one
/// bucket, syncing at once (both migrating a fresh database on connect).
/// Their capture ids, alert ids and wake sessions are per-gateway counters
/// and keys that coincide, and one device moved between them with the same
/// image names: nothing collides, nothing is overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_sync_concurrently_into_one_cloud_without_collisions() {
    use barngate::store::{AlertRecord, SessionRecord};
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    const N: u64 = 15;
    let moved = "AABBCCDDEE50";
    let mut sites = Vec::new();
    for (s, other) in [("site-a", "AABBCCDDEE51"), ("site-b", "AABBCCDDEE52")] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
        for i in 1..=N {
            let mac = if i % 2 == 0 { moved } else { other };
            let seed = if s == "site-a" {
                i as u32
            } else {
                1000 + i as u32
            };
            commit_image(
                &store,
                i,
                mac,
                &format!("img_{i:03}.jpg"),
                &image_bytes(seed, 300 + i as usize),
                t0(),
            );
        }
        let mut b = Batch::default();
        b.capture(&failed_capture(N + 1, other, "lost.jpg", 4, 1, 3));
        // The same wake (device and time) and the same alert id at both.
        b.session(&SessionRecord {
            mac: moved.into(),
            woke_at: t0(),
            pending_reported: 0,
            next_wake_assigned: None,
            capture_requested: true,
            images_completed: 1,
            images_failed: 0,
        });
        b.alert(&AlertRecord {
            id: 1,
            mac: moved.into(),
            kind: "low_battery".into(),
            severity: "warning".into(),
            message: format!("Battery 15 % at {s}"),
            triggered_at: t0(),
            resolved_at: None,
            capture_id: None,
        });
        store.commit(b, t0()).unwrap();
        store
            .raise_gateway_alert(upstream::ALERT_DISK, "critical", s, t0())
            .unwrap();
        sites.push((s, dir, store));
    }
    let mut tasks = Vec::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    for (s, dir, store) in &sites {
        let f = Forwarder::new(
            upstream_config(&pg, &objects),
            s.to_string(),
            store.clone(),
            Arc::new(Metrics::default()),
            Arc::new(SystemClock),
            dir.path().to_path_buf(),
        )
        .unwrap();
        tasks.push(tokio::spawn(f.run(stop_rx.clone())));
    }
    eventually(LONG, "both sites drained", || {
        sites.iter().all(|(_, _, st)| backlog(st) == 0)
    })
    .await;
    let _ = stop_tx.send(true);
    for t in tasks {
        t.await.unwrap();
    }
    for (_, _, st) in &sites {
        let s = st.sync_state().unwrap();
        assert!(
            s.last_error.is_none() || s.consecutive_failures == 0,
            "{s:?}"
        );
    }
    let c = pg.client().await;
    for site in ["site-a", "site-b"] {
        let n = |table: &str| {
            let c = &c;
            let q = format!("SELECT count(*) FROM {table} WHERE site_id = '{site}'");
            async move { count(c, &q).await }
        };
        assert_eq!(n("device_images").await, N as i64 + 1, "{site}");
        assert_eq!(n("device_telemetry").await, N as i64, "{site}");
        assert_eq!(n("device_wake_sessions").await, 1, "{site}");
        assert_eq!(n("device_alerts").await, 2, "{site}");
    }
    assert_eq!(count(&c, "SELECT count(*) FROM devices").await, 3);
    // Each site's image rows point at its own object, holding its bytes.
    let keys = objects.keys("device-observations/").await;
    assert_eq!(keys.len(), 2 * N as usize, "{keys:?}");
    for (s, _, st) in &sites {
        for img in st.images(None).unwrap() {
            let key: String = c
                .query_one(
                    "SELECT object_key FROM device_images
                     WHERE site_id = $1 AND gateway_capture_id = $2",
                    &[s, &(img.id as i64)],
                )
                .await
                .unwrap()
                .get(0);
            assert!(
                key.starts_with(&format!("device-observations/{s}/")),
                "{key}"
            );
            assert_eq!(
                objects.get(&key).await,
                st.image_bytes(img.id).unwrap().unwrap()
            );
        }
    }
    let alert: String = c
        .query_one(
            "SELECT message FROM device_alerts WHERE site_id = 'site-b' AND gateway_alert_id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(alert, "Battery 15 % at site-b");
    // The documented per-site query.
    let rows = c
        .query(
            "SELECT site_id, complete, failed, success_rate_percent::float8
             FROM site_success_rate ORDER BY site_id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64, i64, f64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let rate = (100.0 * N as f64 / (N + 1) as f64 * 100.0).round() / 100.0;
    assert_eq!(
        got,
        vec![
            ("site-a".to_string(), N as i64, 1, rate),
            ("site-b".to_string(), N as i64, 1, rate)
        ]
    );
}

/// Wrong credentials show even while nothing is queued: the forwarder
/// checks the connection now and then, raises the credentials alert, and a
/// later success resolves it and clears `last error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_postgres_credentials_are_detected_with_nothing_queued() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    assert_eq!(backlog(&store), 0);
    let mut bad = upstream_config(&pg, &objects);
    bad.postgres_url = pg.url_with("wrong-password");
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(forwarder(&store, bad, dir.path()).run(stop_rx));
    eventually(LONG, "the credentials alert with nothing queued", || {
        store
            .open_gateway_alert(ALERT_CREDENTIALS)
            .unwrap()
            .is_some()
    })
    .await;
    let _ = stop_tx.send(true);
    task.await.unwrap();
    let err = upstream::status(&store, Utc::now())
        .unwrap()
        .last_error
        .unwrap();
    assert!(err.contains("rejected the credentials"), "{err}");

    let mut good = upstream_config(&pg, &objects);
    good.check_interval_s = 1;
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(forwarder(&store, good, dir.path()).run(stop_rx));
    eventually(LONG, "resolved and cleared", || {
        store
            .open_gateway_alert(ALERT_CREDENTIALS)
            .unwrap()
            .is_none()
            && store.sync_state().unwrap().last_error.is_none()
            && backlog(&store) == 0
    })
    .await;
    let _ = stop_tx.send(true);
    task.await.unwrap();
}

/// `upstream.enabled = false` is said at start and by `sync status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_status_says_disabled_when_upstream_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(dir.path(), test_config()).await;
    let out = cli(dir.path(), &["sync", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("upstream:         disabled (upstream.enabled = false)"),
        "{text}"
    );
    let out = cli(dir.path(), &["sync", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["enabled"], false, "{v}");
    gw.shutdown().await.unwrap();
}

/// PostgreSQL over TLS with a certificate from a private CA: trusted with
/// `upstream.pg_ca`, refused without it (`pg_sslmode = verify-full`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_with_a_private_ca_needs_pg_ca() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "barngate test database CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut srv = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    srv.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let srv_key = KeyPair::generate().unwrap();
    let srv_cert = srv.signed_by(&srv_key, &ca, &ca_key).unwrap();

    let pg = Postgres::start();
    pg.enable_tls(&srv_cert.pem(), &srv_key.serialize_pem());
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("db-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut cfg = upstream_config(&pg, &objects);
    // The URL says disable; the key wins.
    cfg.pg_sslmode = "verify-full".into();
    let e = upstream::migrate(&cfg).await.unwrap_err().to_string();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    cfg.pg_ca = ca_file.display().to_string();
    cfg.validate().unwrap();
    let r = upstream::migrate(&cfg).await.unwrap();
    assert_eq!(r.schema.to, upstream::pg::schema_version());
    // barngate's own connection is encrypted.
    let c = upstream::pg::connect(&cfg).await.unwrap();
    let tls: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(tls, "the connection uses TLS");
    // A bad pg_ca is a start-up error naming the key.
    cfg.pg_ca = dir.path().join("missing.pem").display().to_string();
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("upstream.pg_ca"), "{e}");
}

/// `upstream.image_url`: `public` stores `public_base_url/key`, `presigned`
/// a signed GET URL that fetches the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_url_public_and_presigned() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let mac = "AABBCCDDEE61";
    for (mode, id) in [("public", 1u64), ("presigned", 2)] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
        let bytes = image_bytes(60 + id as u32, 900);
        commit_image(&store, id, mac, &format!("{mode}.jpg"), &bytes, t0());
        let mut cfg = upstream_config(&pg, &objects);
        cfg.image_url = mode.into();
        cfg.public_base_url = "https://cdn.example/observations/".into();
        cfg.validate().unwrap();
        drain(&store, cfg, dir.path()).await;
        let c = pg.client().await;
        let r = c
            .query_one(
                "SELECT image_url, object_key FROM device_images WHERE gateway_capture_id = $1",
                &[&(id as i64)],
            )
            .await
            .unwrap();
        let (url, key): (String, String) = (r.get(0), r.get(1));
        if mode == "public" {
            assert_eq!(url, format!("https://cdn.example/observations/{key}"));
        } else {
            assert!(
                url.contains("X-Amz-Signature=") && url.contains("X-Amz-Expires=604800"),
                "{url}"
            );
            let path = url.split_once(&objects.endpoint()).unwrap().1;
            let resp = http(objects.relay.addr, "GET", path, "", "").await;
            assert!(resp.0 == 200, "{}", resp.0);
            assert_eq!(resp.2, bytes);
        }
    }
}

/// Against an S3 server that verifies SigV4 signatures (s3s-fs): a wrong
/// secret or access key gives a clear error naming the object store's
/// refusal, raises the credentials alert (also with nothing queued), writes
/// nothing anywhere, and keeps the backlog; fixed, everything drains once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_object_store_credentials_give_a_clear_error_an_alert_and_keep_the_backlog() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    // Nothing queued: the connection check finds it.
    for (what, key, secret) in [
        ("secret", S3_KEY, "wrong-secret"),
        ("access key", "NOT-THE-KEY", S3_SECRET),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
        let mut bad = upstream_config(&pg, &objects);
        bad.access_key = key.into();
        bad.secret_key = secret.into();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(forwarder(&store, bad, dir.path()).run(stop_rx));
        eventually(
            LONG,
            &format!("alert for a wrong {what}, nothing queued"),
            || {
                store
                    .open_gateway_alert(ALERT_CREDENTIALS)
                    .unwrap()
                    .is_some()
            },
        )
        .await;
        let _ = stop_tx.send(true);
        task.await.unwrap();
        let err = store.sync_state().unwrap().last_error.unwrap();
        assert!(
            err.contains("object storage rejected the credentials") && err.contains("HTTP 403"),
            "{what}: {err}"
        );
        assert!(!err.contains("wrong-secret"), "secret in the error: {err}");
    }

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    for i in 0..8u64 {
        commit_image(
            &store,
            i + 1,
            "AABBCCDDEE71",
            &format!("s{i}.jpg"),
            &image_bytes(70 + i as u32, 800),
            t0() + CDuration::minutes(i as i64),
        );
    }
    let queued = backlog(&store);
    let mut bad = upstream_config(&pg, &objects);
    bad.secret_key = "wrong-secret".into();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(forwarder(&store, bad, dir.path()).run(stop_rx));
    eventually(LONG, "the credentials alert", || {
        store
            .open_gateway_alert(ALERT_CREDENTIALS)
            .unwrap()
            .is_some()
    })
    .await;
    let _ = stop_tx.send(true);
    task.await.unwrap();
    let st = upstream::status(&store, Utc::now()).unwrap();
    let err = st.last_error.clone().unwrap();
    assert!(
        err.contains("object storage rejected the credentials: HTTP 403: SignatureDoesNotMatch"),
        "{err}"
    );
    assert_eq!(
        backlog(&store),
        queued + 1,
        "backlog kept, the alert queued"
    );
    assert!(
        objects.keys("device-observations/").await.is_empty(),
        "nothing stored"
    );
    let c = pg.client().await;
    assert_eq!(count(&c, "SELECT count(*) FROM device_images").await, 0);

    let (stop_tx, stop_rx) = watch::channel(false);
    let task =
        tokio::spawn(forwarder(&store, upstream_config(&pg, &objects), dir.path()).run(stop_rx));
    eventually(LONG, "drained and resolved", || {
        backlog(&store) == 0
            && store
                .open_gateway_alert(ALERT_CREDENTIALS)
                .unwrap()
                .is_none()
            && store.sync_state().unwrap().last_error.is_none()
    })
    .await;
    eventually(LONG, "resolution delivered", || backlog(&store) == 0).await;
    let _ = stop_tx.send(true);
    task.await.unwrap();
    assert_images_upstream_once(&store, &pg, &objects).await;
}

/// A presigned `image_url` is accepted by a server that checks signatures,
/// and the same URL altered is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_image_url_is_honoured_by_a_signature_checking_server() {
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    let bytes = image_bytes(81, 1200);
    commit_image(&store, 1, "AABBCCDDEE81", "p.jpg", &bytes, t0());
    let mut cfg = upstream_config(&pg, &objects);
    cfg.image_url = "presigned".into();
    cfg.presign_expiry_s = 3600;
    drain(&store, cfg, dir.path()).await;
    let c = pg.client().await;
    let url: String = c
        .query_one("SELECT image_url FROM device_images", &[])
        .await
        .unwrap()
        .get(0);
    let path = url.split_once(&objects.endpoint()).unwrap().1.to_string();
    let (status, _, body) = http(objects.relay.addr, "GET", &path, "", "").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, bytes);
    let tampered = path.replace("X-Amz-Expires=3600", "X-Amz-Expires=3601");
    let (status, _, _) = http(objects.relay.addr, "GET", &tampered, "", "").await;
    assert_eq!(status, 403, "an altered URL is refused");
    let unsigned = path.split('?').next().unwrap();
    let (status, _, _) = http(objects.relay.addr, "GET", unsigned, "", "").await;
    assert_eq!(status, 403, "no signature, no object");
}

/// An upstream that stays unreachable (not a credentials problem) raises
/// `upstream_unreachable` after `unreachable_alert_after_s`, resolved by the
/// next success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_unreachable_for_long_raises_an_alert() {
    use barngate::upstream::ALERT_UNREACHABLE;
    let pg = Postgres::start();
    let objects = ObjectStore::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db.redb")).unwrap());
    let mut cfg = upstream_config(&pg, &objects);
    cfg.unreachable_alert_after_s = 1;
    cfg.check_interval_s = 1;
    pg.down();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(forwarder(&store, cfg, dir.path()).run(stop_rx));
    eventually(LONG, "the unreachable alert", || {
        store
            .open_gateway_alert(ALERT_UNREACHABLE)
            .unwrap()
            .is_some()
    })
    .await;
    assert!(store
        .open_gateway_alert(ALERT_CREDENTIALS)
        .unwrap()
        .is_none());
    let a = store
        .open_gateway_alert(ALERT_UNREACHABLE)
        .unwrap()
        .unwrap();
    assert!(a.message.contains("PostgreSQL"), "{}", a.message);
    pg.up();
    eventually(LONG, "resolved and delivered", || {
        store
            .open_gateway_alert(ALERT_UNREACHABLE)
            .unwrap()
            .is_none()
            && backlog(&store) == 0
    })
    .await;
    let _ = stop_tx.send(true);
    task.await.unwrap();
    let c = pg.client().await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM device_alerts WHERE alert_type = 'upstream_unreachable' AND resolved_at IS NOT NULL").await,
        1
    );
}
