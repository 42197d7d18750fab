//! The object store: `upstream migrate` creating the bucket, `image_url`
//! (public and presigned), and SigV4 signatures checked by s3s-fs, wrong
//! credentials included.

use super::{
    assert_images_upstream_once, backlog, commit_image, count, drain, forwarder, t0, LONG,
};
use crate::support::cloud::*;
use crate::support::*;
use barngate::store::Store;
use barngate::upstream::{self, ALERT_CREDENTIALS};
use chrono::{Duration as CDuration, Utc};
use std::sync::Arc;
use tokio::sync::watch;

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
