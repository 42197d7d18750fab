//! Outage and resume: PostgreSQL and the object store going away, a gateway
//! killed mid-upload, a 10,000-item backlog, retention while the backlog
//! waits, and the alert for an upstream unreachable for long.

use super::{
    assert_images_upstream_once, backlog, commit_image, count, forwarder, t0, telemetry, LONG,
};
use crate::support::cloud::*;
use crate::support::*;
use barngate::store::{Batch, Store};
use barngate::upstream::{self, ALERT_CREDENTIALS};
use chrono::{Duration as CDuration, Utc};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

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
