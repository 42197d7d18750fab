//! `bench burst`: a wake burst against the gateway with pre-registered
//! devices, every image checked in the store.

use crate::cli::Common;
use crate::load::{mac, run_load, LoadCfg, BURST_BASE};
use crate::report::{print_table, row, verify_images};
use crate::stack::{cpu_secs, mem_of, peak_rss_mib, start_gateway, tmpdir, Mem};
use crate::tls::gateway_tls;
use barngate::store::Store;
use std::time::Duration;

pub async fn scenario_burst(c: Common, devices: usize, registered: usize, connect_only: bool) {
    let dir = tmpdir("burst");
    {
        let store = Store::open(&dir.join("barngate.redb")).unwrap();
        let now = chrono::Utc::now();
        for i in 0..registered {
            let id = mac(BURST_BASE, i);
            let rec = barngate::store::DeviceRecord::new(
                &id,
                barngate::protocol::Dialect::Firmware,
                "site-1",
                i as u64,
                (i % 3600) as u32,
                now,
            );
            store.put_device(&rec, now).unwrap();
        }
    }
    let ids: Vec<String> = (0..devices).map(|d| mac(BURST_BASE, d)).collect();
    let cfg = LoadCfg {
        tls: gateway_tls(&c, &dir, &ids),
        connect_only,
        ..LoadCfg::from(&c)
    };
    let (mut p, addr) = start_gateway(&c, &dir);
    let idle_rss = peak_rss_mib(p.pid());
    let cpu0 = cpu_secs(p.pid());
    let r = run_load(
        addr,
        BURST_BASE,
        devices,
        0,
        &cfg,
        Some(p.pid()),
        Some(p.pid()),
    )
    .await;
    let cpu = cpu_secs(p.pid()) - cpu0;
    let rss = peak_rss_mib(p.pid());
    // What stays resident once the wake is over and the devices are gone.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = mem_of(p.pid());
    p.term();
    let conn = r.connected.unwrap_or(Mem {
        rss: 0.0,
        peak: 0.0,
        file: 0.0,
    });
    if connect_only {
        // No wake: nothing to verify.
        println!(
            "burst --connect-only: gateway RSS {idle_rss:.1} MiB after start ({registered} registered), {:.1} MiB with {devices} connected and idle (of which {:.1} MiB file-backed; peak so far {:.1}), {:.1} MiB 7 s after they left",
            conn.rss, conn.file, conn.peak, after.rss
        );
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let rw = row("gateway", &c, &r, cpu, rss);
    print_table(std::slice::from_ref(&rw));
    let errors: Vec<_> = r.wakes.iter().filter_map(|w| w.error.clone()).collect();
    let (ok, bad) = verify_images(&dir, &r.wakes);
    println!(
        "burst: {devices} devices ({registered} registered), loss {:.0} %: {} ACK_OK, {} errors {:?}, {ok} images byte-exact in the store, {} bad {:?}",
        c.loss * 100.0,
        r.images(),
        errors.len(),
        errors.iter().take(5).collect::<Vec<_>>(),
        bad.len(),
        bad.iter().take(5).collect::<Vec<_>>()
    );
    println!(
        "burst: resent {} chunks; gateway RSS {idle_rss:.1} MiB after start ({registered} registered), {:.1} MiB with {devices} connected and idle (of which {:.1} MiB file-backed; peak so far {:.1}), peak {rss:.1} MiB during the burst, {:.1} MiB 7 s after it, CPU {cpu:.1} s",
        r.resent, conn.rss, conn.file, conn.peak, after.rss
    );
    if !errors.is_empty() || !bad.is_empty() || ok != devices {
        eprintln!(
            "burst FAILED: {ok} of {devices} images byte-exact; data dir kept: {}",
            dir.display()
        );
        std::process::exit(1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
