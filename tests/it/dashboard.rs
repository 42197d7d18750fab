//! The dashboard in a real headless browser (Debian `chromium`), fed by real
//! devices (rumqttc) through the real ingest; `/metrics` parsed by a
//! Prometheus text-format parser; the login when HTTP is not on loopback.
//! Screenshots are saved under `target/test-artifacts/`.

use crate::support::*;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const DISH: &[u8] = include_bytes!("../fixtures/dish.jpg");

fn artifacts() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn chromium_bin() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

async fn chromium(args: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(chromium_bin());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium finishes within 90 s")
        .expect("chromium runs (apt-get install chromium)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The DOM after load, as the browser built it.
async fn dump_dom(url: &str) -> String {
    chromium(&["--dump-dom".into(), url.into()]).await
}

async fn screenshot(url: &str, name: &str) {
    let path = artifacts().join(name);
    let _ = std::fs::remove_file(&path);
    chromium(&[
        format!("--screenshot={}", path.display()),
        "--window-size=1200,1800".into(),
        url.into(),
    ])
    .await;
    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert!(len > 10_000, "screenshot {name} written ({len} bytes)");
}

/// Delivers one image with the given temperature (and error code).
async fn deliver(
    d: &mut Device,
    name: &str,
    img: &[u8],
    ts: &str,
    temp: f64,
    error: i64,
    lose: Option<usize>,
) {
    let chunk = 1024;
    let mut m = d.metadata(name, img, chunk, ts);
    m["temperature"] = json!(temp);
    m["humidity"] = json!(40.0 + temp);
    m["pressure"] = json!(1000.0 + temp);
    m["gas_resistance"] = json!(100.0 + 2.0 * temp);
    m["battery"] = json!(87);
    m["error"] = json!(error);
    d.publish("data", m.to_string().into_bytes()).await;
    d.expect("send_image").await;
    let n = img.len().div_ceil(chunk);
    let first: Vec<usize> = (0..n).filter(|i| Some(*i) != lose).collect();
    d.send_chunks(name, img, chunk, &first).await;
    if let Some(i) = lose {
        let (_, v) = d.expect("missing_chunks").await;
        assert_eq!(v["missing_chunks"], json!([i as u32 + d.base]));
        d.send_chunks(name, img, chunk, &[i]).await;
    }
    let (_, ack) = d.expect("ACK_OK").await;
    assert_eq!(ack["image_name"], name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_pages_and_metrics_with_real_devices() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(dir.path(), test_config()).await;
    let base = format!("http://127.0.0.1:{}", gw.http_addr.port());
    let mac = "B8F862F9CFB8";
    let mut d = Device::connect(gw.plain_addr.unwrap(), mac, false).await;
    // Back from an outage with three pending images, then a quiet second device.
    d.hello(3).await;
    d.expect("ACK_OK").await;
    deliver(
        &mut d,
        "img_20250101_080000.jpg",
        DISH,
        "2025-01-01T08:00:00Z",
        18.0,
        0,
        None,
    )
    .await;
    deliver(
        &mut d,
        "img_20250101_160000.jpg",
        DISH,
        "2025-01-01T16:00:00Z",
        23.5,
        0,
        Some(2),
    )
    .await;
    deliver(
        &mut d,
        "img_20250102_080000.jpg",
        DISH,
        "2025-01-02T08:00:00Z",
        20.0,
        7,
        None,
    )
    .await;
    let mut other = Device::connect(gw.plain_addr.unwrap(), "AABBCCDDEE10", false).await;
    other.hello(0).await;
    other.expect("capture_image").await;

    // Overview.
    let dom = dump_dom(&format!("{base}/")).await;
    assert!(dom.contains("<title>Overview · barngate</title>"), "{dom}");
    assert!(
        dom.contains(r#"id="registered">Devices registered<b>2</b>"#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"id="online">Online (seen &lt; 2 h)<b>2</b>"#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"id="with-alerts">With active alerts<b>1</b>"#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"id="images-today">Images today<b>3</b>"#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"id="last-sync">Last sync<b>never</b>"#),
        "{dom}"
    );
    assert!(dom.contains(&format!(r#"<a href="/devices/{mac}">{mac}</a>"#)));
    screenshot(&format!("{base}/"), "overview.png").await;

    // Device page: facts, figures, charts, thumbnails.
    let url = format!("{base}/devices/{mac}");
    let dom = dump_dom(&url).await;
    assert!(dom.contains(&format!("Device {mac}")), "{dom}");
    assert!(
        dom.contains(r#"<td id="success-rate">100.0 %</td>"#),
        "{dom}"
    );
    assert!(dom.contains("<th>Dialect</th><td>firmware</td>"), "{dom}");
    assert!(dom.contains("<th>Battery</th><td>87.0 %</td>"), "{dom}");
    for c in ["temperature", "humidity", "pressure", "gas"] {
        let at = dom
            .find(&format!("id=\"chart-{c}\""))
            .unwrap_or_else(|| panic!("chart {c}: {dom}"));
        let svg = &dom[at..at + dom[at..].find("</svg>").unwrap()];
        assert!(svg.contains("<polyline"), "chart {c} has a line: {svg}");
    }
    assert!(
        dom.contains(">23.5</text>"),
        "temperature max labelled: {dom}"
    );
    let images = gw.store.images(Some(mac)).unwrap();
    assert_eq!(images.len(), 3);
    for i in &images {
        assert!(
            dom.contains(&format!(r#"<img src="/images/{}/raw""#, i.id)),
            "thumbnail {}",
            i.id
        );
    }
    assert!(
        dom.contains("reported error code 7"),
        "active alert shown: {dom}"
    );
    screenshot(&url, "device.png").await;

    // Images: browse by device and day; full view; raw bytes and download.
    let dom = dump_dom(&format!(
        "{base}/images?device={mac}&day={}",
        chrono::Utc::now().format("%Y-%m-%d")
    ))
    .await;
    assert_eq!(dom.matches("/download\">download</a>").count(), 3, "{dom}");
    let dom = dump_dom(&format!("{base}/images?device=AABBCCDDEE10")).await;
    assert!(dom.contains("No images."), "{dom}");
    let id = images[0].id;
    let dom = dump_dom(&format!("{base}/images/{id}")).await;
    assert!(dom.contains(&sha256_hex(DISH)), "{dom}");
    screenshot(&format!("{base}/images/{id}"), "image.png").await;
    let (st, head, body) = http(gw.http_addr, "GET", &format!("/images/{id}/raw"), "", "").await;
    assert_eq!(st, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: image/jpeg"),
        "{head}"
    );
    // Finding: device-sent bytes were served without nosniff or a CSP.
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("x-content-type-options: nosniff"), "{head}");
    assert!(
        lower.contains("content-security-policy: default-src 'none'; img-src 'self'; sandbox"),
        "{head}"
    );
    assert_eq!(body, DISH);
    let (_, head, body) = http(
        gw.http_addr,
        "GET",
        &format!("/images/{id}/download"),
        "",
        "",
    )
    .await;
    assert!(
        head.contains("attachment; filename=\"B8F862F9CFB8_img_20250101_080000.jpg\""),
        "{head}"
    );
    assert_eq!(body, DISH);
    assert_eq!(
        http(gw.http_addr, "GET", "/images/999999", "", "").await.0,
        404
    );

    // Alerts: the device error is active.
    let dom = dump_dom(&format!("{base}/alerts")).await;
    assert!(dom.contains("<h2>Active (1)</h2>"), "{dom}");
    assert!(dom.contains("device_error"), "{dom}");
    screenshot(&format!("{base}/alerts"), "alerts.png").await;

    // Metrics, parsed as Prometheus text.
    let (st, head, body) = http(gw.http_addr, "GET", "/metrics", "", "").await;
    assert_eq!(st, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let text = String::from_utf8(body).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid exposition");
    let value = |name: &str, device: Option<&str>| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && device.is_none_or(|d| s.labels.get("device") == Some(d)))
            .unwrap_or_else(|| panic!("{name} {device:?} in:\n{text}"));
        match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name}: unexpected type"),
        }
    };
    assert_eq!(value("barngate_device_success_ratio", Some(mac)), 1.0);
    assert_eq!(value("barngate_images_complete_total", None), 3.0);
    assert_eq!(value("barngate_images_failed_total", None), 0.0);
    assert_eq!(value("barngate_device_images_complete", Some(mac)), 3.0);
    // One round for one image of three: 1 / 3 retries.
    assert!((value("barngate_device_average_retries", Some(mac)) - 1.0 / 3.0).abs() < 1e-9);
    // One chunk lost of 8 + 8 + 8 announced, sent 25 times in all.
    let chunks = DISH.len().div_ceil(1024) as f64;
    let loss = value("barngate_device_chunk_loss_percent", Some(mac));
    assert!((loss - 100.0 / (3.0 * chunks + 1.0)).abs() < 1e-9, "{loss}");
    assert_eq!(value("barngate_device_pending_images", Some(mac)), 3.0);
    assert!(value("barngate_device_pending_queue_age_seconds", Some(mac)) >= 0.0);
    assert!(value("barngate_connections", None) >= 2.0);
    assert!(value("barngate_messages_received_total", None) > 20.0);
    assert!(value("barngate_upstream_backlog", None) > 0.0);
    assert!(value("barngate_upstream_oldest_age_seconds", None) >= 0.0);
    assert_eq!(value("barngate_alerts_active_total", None), 1.0);
    assert_eq!(value("barngate_devices_registered", None), 2.0);
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == "barngate_alerts_active")
        .expect("alerts by kind");
    assert_eq!(s.labels.get("kind"), Some("device_error"));
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_is_required_when_not_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let gw = barngate::server::Gateway::start(
        barngate::server::GatewayOptions {
            data_dir: dir.path().to_path_buf(),
            config: test_config(),
            mqtt_listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("0.0.0.0:0".parse().unwrap()),
        },
        std::sync::Arc::new(barngate::clock::SystemClock),
    )
    .await
    .unwrap();
    let base = format!("http://127.0.0.1:{}", gw.http_addr.port());
    // No password yet: the browser lands on the login page, which says so.
    let dom = dump_dom(&format!("{base}/devices/B8F862F9CFB8")).await;
    assert!(dom.contains("<title>Log in · barngate</title>"), "{dom}");
    assert!(dom.contains("barngate admin set-password"), "{dom}");
    for p in ["/", "/alerts", "/images", "/images/1/raw"] {
        let (st, head, _) = http(gw.http_addr, "GET", p, "", "").await;
        assert_eq!(st, 303, "{p}");
        assert!(head.contains("location: /login"), "{p}: {head}");
    }
    // Health and metrics stay open for systemd and Prometheus.
    assert_eq!(http(gw.http_addr, "GET", "/healthz", "", "").await.0, 200);
    assert_eq!(http(gw.http_addr, "GET", "/metrics", "", "").await.0, 200);

    // The CLI sets the password (hashed, 0600), read by the running gateway.
    let mut cli = tokio::process::Command::from(barngate())
        .arg("--data-dir")
        .arg(dir.path())
        .args(["admin", "set-password", "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cli.stdin
        .take()
        .unwrap()
        .write_all(b"barn door 42\n")
        .await
        .unwrap();
    let out = cli.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = std::fs::read_to_string(dir.path().join("admin.passwd")).unwrap();
    assert!(stored.starts_with("$argon2id$") && !stored.contains("barn door"));

    let form = "Content-Type: application/x-www-form-urlencoded\r\n";
    let (st, _, _) = http(
        gw.http_addr,
        "POST",
        "/login",
        form,
        "password=wrong+password",
    )
    .await;
    assert_eq!(st, 401);
    let (st, head, _) = http(
        gw.http_addr,
        "POST",
        "/login",
        form,
        "password=barn+door+42",
    )
    .await;
    assert_eq!(st, 303, "{head}");
    let cookie_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("session cookie");
    assert!(
        cookie_line.contains("HttpOnly")
            && cookie_line.contains("SameSite=Strict")
            && cookie_line.contains("Max-Age=")
    );
    let token = cookie_line
        .split_once('=')
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap();
    let cookie = format!("Cookie: barngate_session={token}\r\n");
    let (st, _, body) = http(gw.http_addr, "GET", "/", &cookie, "").await;
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&body).contains("Devices registered"));
    let (st, _, _) = http(
        gw.http_addr,
        "GET",
        "/",
        "Cookie: barngate_session=forged\r\n",
        "",
    )
    .await;
    assert_eq!(st, 303);
    // Logging out ends the session.
    assert_eq!(
        http(gw.http_addr, "POST", "/logout", &cookie, "").await.0,
        303
    );
    assert_eq!(http(gw.http_addr, "GET", "/", &cookie, "").await.0, 303);
    screenshot(&format!("{base}/"), "login.png").await;
    gw.shutdown().await.unwrap();
}

fn set_cookie_line(head: &str) -> String {
    head.lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no session cookie: {head}"))
        .to_string()
}

/// Finding: `/login` ran an argon2 check (19 MiB, a core) for every
/// request with no bound on how many at once, with no limit on failures
/// from one address; the cookie was never `Secure`, even behind a TLS
/// proxy; and `/metrics` (device MACs, counters) could not be put behind
/// the login. Checks now run at most `http.login_concurrency` at once,
/// `http.login_max_failures` failures lock an address out (429), the
/// cookie is `Secure` behind TLS, and `http.metrics_require_login` closes
/// `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_checks_are_bounded_rate_limited_and_the_cookie_secure_behind_tls() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config();
    cfg.http.login_lockout_s = 2;
    cfg.http.metrics_require_login = true;
    // The gateway's clock, moved on by the test (the lockout below).
    let clock = std::sync::Arc::new(barngate::clock::ManualClock::new(chrono::Utc::now()));
    let gw = barngate::server::Gateway::start(
        barngate::server::GatewayOptions {
            data_dir: dir.path().to_path_buf(),
            config: cfg,
            mqtt_listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("0.0.0.0:0".parse().unwrap()),
        },
        clock.clone(),
    )
    .await
    .unwrap();
    barngate::http::auth::set_password(dir.path(), "barn door 42").unwrap();
    let addr = gw.http_addr;
    let form = "Content-Type: application/x-www-form-urlencoded\r\n";
    let right = "password=barn+door+42";
    let wrong = "password=wrong+password";

    // /metrics needs a login here; /healthz does not.
    assert_eq!(http(addr, "GET", "/metrics", "", "").await.0, 401);
    assert_eq!(http(addr, "GET", "/healthz", "", "").await.0, 200);

    // A burst of 8 logins from 8 addresses: all served (each waits for the
    // one check), never two checks at once.
    let burst: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(async move {
                http_from(
                    &format!("127.0.0.{}", 10 + i),
                    addr,
                    "POST",
                    "/login",
                    form,
                    right,
                )
                .await
            })
        })
        .collect();
    for b in burst {
        let (st, head, _) = b.await.unwrap();
        assert_eq!(st, 303, "{head}");
    }
    let peak = gw
        .metrics
        .login_checks_peak
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(peak, 1, "password checks at once");

    // The cookie: HttpOnly and SameSite=Strict always; Secure when a TLS
    // proxy marks the request as HTTPS, not on plain HTTP.
    let (_, head, _) = http(addr, "POST", "/login", form, right).await;
    let plain = set_cookie_line(&head);
    assert!(
        plain.contains("HttpOnly") && plain.contains("SameSite=Strict"),
        "{plain}"
    );
    assert!(!plain.contains("Secure"), "{plain}");
    let proxied = format!("{form}X-Forwarded-Proto: https\r\n");
    let (_, head, _) = http(addr, "POST", "/login", &proxied, right).await;
    let secure = set_cookie_line(&head);
    assert!(
        secure.contains("; Secure") && secure.contains("HttpOnly"),
        "{secure}"
    );

    // With the session, /metrics is served and shows the peak.
    let token = plain.split_once('=').unwrap().1.split(';').next().unwrap();
    let cookie = format!("Cookie: barngate_session={token}\r\n");
    let (st, _, body) = http(addr, "GET", "/metrics", &cookie, "").await;
    assert_eq!(st, 200);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("barngate_login_checks_peak 1"), "{body}");

    // Five wrong passwords from one address: 401 each, then 429 (even for
    // the right one), with Retry-After; other addresses still log in.
    for _ in 0..5 {
        let (st, _, _) = http_from("127.0.0.2", addr, "POST", "/login", form, wrong).await;
        assert_eq!(st, 401);
    }
    let (st, head, _) = http_from("127.0.0.2", addr, "POST", "/login", form, right).await;
    assert_eq!(st, 429, "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    assert_eq!(gw.metrics.rejected("login_locked_out"), 1);
    assert_eq!(gw.metrics.rejected("login_failed"), 5);
    let (st, _, _) = http_from("127.0.0.3", addr, "POST", "/login", form, right).await;
    assert_eq!(st, 303);
    // The lockout ends http.login_lockout_s later on the gateway's clock.
    clock.advance(chrono::Duration::milliseconds(2100));
    let (st, _, _) = http_from("127.0.0.2", addr, "POST", "/login", form, right).await;
    assert_eq!(st, 303);
    gw.shutdown().await.unwrap();
}
