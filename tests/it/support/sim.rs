//! Shared helpers for the simulator tests: a simulated fleet against an
//! in-process gateway over a temp store, and consistency checks between the
//! devices' SD cards and the gateway's database.
#![allow(dead_code)]

use barngate::config::Config;
use barngate::sim::{FleetOptions, Simulation};
use barngate::store::{CaptureState, Store};
use chrono::{DateTime, TimeZone, Utc};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

/// Monday 2026-03-02 07:00 UTC.
pub fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 7, 0, 0).unwrap()
}

pub fn config() -> Config {
    let mut c = Config::default();
    c.site.timezone = "UTC".into();
    c
}

pub fn fleet(dir: &Path, devices: usize) -> FleetOptions {
    FleetOptions {
        devices,
        sd_root: dir.join("sd"),
        chunk_size: 512,
        image_width: 160,
        image_height: 120,
        ..FleetOptions::default()
    }
}

pub fn sim(dir: &Path, opts: FleetOptions, cfg: Config) -> Simulation {
    let store = Arc::new(Store::open(&dir.join("gw.redb")).unwrap());
    Simulation::new(opts, cfg, store, start()).unwrap()
}

/// Every delivered image is in the store exactly once, byte-identical to the
/// SD card copy; SD files agree with each other.
pub fn assert_consistent(sim: &Simulation) {
    let store = sim.store();
    for d in sim.devices() {
        let id = &d.params.id;
        let entries = d.sd.entries().unwrap();
        let pending = d.sd.pending().unwrap();
        assert_eq!(
            entries
                .iter()
                .filter(|e| e.pending)
                .map(|e| e.name.clone())
                .collect::<Vec<_>>(),
            pending,
            "{id}: pendingImage.txt lists exactly the PendingToSend=true entries, in order"
        );
        let images = store.images(Some(id)).unwrap();
        let mut names = HashSet::new();
        for img in &images {
            assert!(
                names.insert(img.image_name.clone()),
                "{id}: {} stored twice",
                img.image_name
            );
            assert_eq!(img.state, CaptureState::Complete);
        }
        let complete: Vec<_> = store
            .captures(Some(id))
            .unwrap()
            .into_iter()
            .filter(|c| c.state == CaptureState::Complete)
            .collect();
        assert_eq!(
            complete.len(),
            images.len(),
            "{id}: no duplicate complete captures"
        );
        for e in &entries {
            let stored = images.iter().find(|i| i.image_name == e.name);
            if e.pending {
                continue;
            }
            let stored = stored.unwrap_or_else(|| panic!("{id}: {} sent but not stored", e.name));
            let bytes = store.image_bytes(stored.id).unwrap().unwrap();
            assert_eq!(
                bytes,
                d.sd.image(&e.name).unwrap(),
                "{id}: {} bytes",
                e.name
            );
            assert_eq!(&bytes[..2], &[0xFF, 0xD8], "a real JPEG");
            assert_eq!(&bytes[bytes.len() - 2..], &[0xFF, 0xD9]);
        }
        assert_eq!(d.stats.delivered as usize, d.delivered_names.len());
    }
}
