//! `bench crash`: kill -9 of the gateway at random moments during wakes.

use crate::cli::Common;
use crate::conn::{connect, Conn, Loader};
use crate::device::wake;
use crate::load::{mac, Counters, Images, LoadCfg, Rng, Wake, CRASH_BASE};
use crate::report::verify_images;
use crate::stack::{start_gateway, tmpdir};
use crate::tls::gateway_tls;
use std::sync::Arc;
use std::time::Duration;

pub async fn scenario_crash(c: Common, devices: usize, trials: usize, seed: u64) {
    let dir = tmpdir("crash");
    let ids: Vec<String> = (0..devices).map(|d| mac(CRASH_BASE, d)).collect();
    let cfg = LoadCfg {
        tls: gateway_tls(&c, &dir, &ids),
        ..LoadCfg::from(&c)
    };
    let images = Arc::new(Images::new(c.image_size, c.chunk, c.enc()));
    let counters = Arc::new(Counters::default());
    let mut rng = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    // Every device delivers a new image each trial; one whose wake was cut
    // by the kill retries the same image (pendingImg=1) in the next trial.
    let mut current: Vec<u64> = (0..devices as u64).collect();
    let mut next_image = devices as u64;
    let mut acked: Vec<Wake> = Vec::new();
    let mut outstanding: Vec<Option<u64>> = vec![None; devices];
    let mut failures = Vec::new();
    let (mut cut_trials, mut mid_trials) = (0, 0);
    for trial in 0..=trials {
        let (mut p, addr) = start_gateway(&c, &dir);
        let last = trial == trials;
        let mut tasks = Vec::new();
        for d in 0..devices {
            if last && outstanding[d].is_none() {
                continue;
            }
            let (images, counters, cfg) = (images.clone(), counters.clone(), cfg.clone());
            let img = current[d];
            tasks.push(tokio::spawn(async move {
                let id = mac(CRASH_BASE, d);
                let mut conn = match connect(addr, &id, &cfg).await {
                    Ok(c) => c,
                    Err(_) => return (d, img, None),
                };
                let prepared = images.prepare(&id, img);
                let w = wake(&mut conn, &id, img, 1, &images, &cfg, &counters, prepared).await;
                if let Conn::Mqttc(c) = conn {
                    c.task.abort();
                }
                (d, img, Some(w))
            }));
        }
        if !last {
            // Within the wake: 50 devices connect and deliver in ~60–150 ms
            // here (the lean client; ~100–200 ms with rumqttc), so a later
            // kill would mostly land after the last ACK_OK.
            let span = if cfg.loader == Loader::Raw {
                130.0
            } else {
                250.0
            };
            let delay = Duration::from_millis(5 + (rng.next() * span) as u64);
            tokio::time::sleep(delay).await;
            p.kill9();
        }
        let mut cut = 0;
        for t in tasks {
            if let Ok((d, img, w)) = t.await {
                match w {
                    Some(w) if w.latency.is_some() => {
                        acked.push(w);
                        outstanding[d] = None;
                        current[d] = next_image;
                        next_image += 1;
                    }
                    _ => {
                        cut += 1;
                        outstanding[d] = Some(img);
                    }
                }
            }
        }
        if last {
            p.term();
        } else if cut > 0 {
            cut_trials += 1;
            if cut < devices {
                mid_trials += 1;
            }
        }
        // After the kill (or the final clean stop): every ACKed image intact.
        let (ok, bad) = verify_images(&dir, &acked);
        println!(
            "trial {trial:>2}{}: {} images ACKed so far, {ok} intact, {} bad; {cut} wakes cut by the kill",
            if last { " (no kill)" } else { "" },
            acked.len(),
            bad.len()
        );
        failures.extend(bad);
    }
    let left = outstanding.iter().filter(|o| o.is_some()).count();
    println!(
        "crash: {trials} kill -9 trials, {devices} devices: {cut_trials} kills cut wakes ({mid_trials} after some devices of that trial had their ACK_OK); {} images ACKed and intact, {left} never completed, {} integrity failures {:?}",
        acked.len(),
        failures.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    if left > 0 || !failures.is_empty() {
        std::process::exit(1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
