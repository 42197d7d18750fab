//! The cloud schema: an old cloud migrated in place keeping its data, a
//! newer one refused with a clear error, and two sites migrating and
//! syncing into one cloud at once.

use super::{backlog, commit_image, count, drain, failed_capture, forwarder, t0, LONG};
use crate::support::cloud::*;
use crate::support::*;
use barngate::clock::SystemClock;
use barngate::metrics::Metrics;
use barngate::store::{Batch, Store};
use barngate::upstream::{self, Forwarder};
use chrono::{DateTime, Duration as CDuration, TimeZone, Utc};
use std::sync::Arc;
use tokio::sync::watch;

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
