//! The simulator in real time over mutual TLS against a running gateway:
//! issued device certificates, real MQTT, chunk loss recovered.

use crate::support::*;
use barngate::sim::{self, Connection, DialectMix, FleetOptions};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_fleet_delivers_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gw");
    let gw = start_gateway(&data, test_config()).await;
    // The gateway created its CA on start; issue the fleet's certificates.
    let pki = barngate::server::pki(&data);
    let certs = dir.path().join("certs");
    let macs = ["B8F862000001", "B8F862000002", "B8F862000003"];
    for mac in macs {
        pki.issue_device(mac, 30, &certs).unwrap();
    }
    let conn = Connection::parse(&gw.mqtt_addr.to_string())
        .unwrap()
        .with_tls(&certs.join("ca.crt.pem"), &certs)
        .unwrap();
    let mut opts = FleetOptions {
        devices: macs.len(),
        dialect: DialectMix::Mixed,
        chunk_size: 512,
        sd_root: dir.path().join("sd"),
        first_wake_spread: chrono::Duration::milliseconds(300),
        chunk_interval: chrono::Duration::milliseconds(0),
        response_timeout: chrono::Duration::seconds(10),
        image_width: 160,
        image_height: 120,
        ..FleetOptions::default()
    };
    opts.faults.loss_pct = 5.0;
    let store = gw.store.clone();
    let n = macs.len();
    let stop = async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        while store.images(None).map(|v| v.len()).unwrap_or(0) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Let the devices read their final ACK_OK.
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let summary = sim::run_mqtt(opts, conn, None, stop).await.unwrap();
    assert_eq!(summary.totals.delivered, n as u64, "{summary}");
    let images = gw.store.images(None).unwrap();
    assert_eq!(images.len(), n);
    for img in images {
        assert!(macs.contains(&img.mac.as_str()));
        let bytes = gw.store.image_bytes(img.id).unwrap().unwrap();
        assert_eq!(&bytes[..2], &[0xFF, 0xD8], "a real JPEG");
        assert_eq!(img.sha256.unwrap(), sha256_hex(&bytes));
    }
    gw.shutdown().await.unwrap();
}
