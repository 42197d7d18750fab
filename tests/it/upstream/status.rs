//! What the operator sees: wrong PostgreSQL credentials (with and without a
//! backlog) raising the credentials alert, `sync status` when upstream is
//! off, and PostgreSQL over TLS with a private CA.

use super::{assert_images_upstream_once, backlog, commit_image, forwarder, t0, LONG};
use crate::support::cloud::*;
use crate::support::*;
use barngate::store::Store;
use barngate::upstream::{self, ALERT_CREDENTIALS};
use chrono::{DateTime, Duration as CDuration, Utc};
use std::sync::Arc;
use tokio::sync::watch;

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
