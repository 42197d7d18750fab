//! Integration: an offline queue, then reconnection, then the sequential
//! resend — one image at a time, oldest first — until the queue is empty.

use crate::support::sim::*;
use barngate::sim::{DialectMix, Outage};
use barngate::store::CaptureState;
use chrono::Duration;

#[test]
fn offline_queue_reconnect_sequential_resend_until_empty() {
    for dialect in [DialectMix::Firmware, DialectMix::V1] {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = fleet(dir.path(), 1);
        opts.dialect = dialect;
        opts.chunk_size = 128;
        let mut sim = sim(dir.path(), opts, config());
        sim.faults_mut()
            .outages
            .push(Outage::parse("0.1-1.6", start()).unwrap());
        sim.run_until(start() + Duration::hours(38)).unwrap();
        let id = sim.devices()[0].params.id.clone();
        let queued = sim.devices()[0].sd.pending().unwrap();
        assert!(queued.len() >= 3, "{dialect:?}: {queued:?}");
        let mut last = queued.len();
        let mut acked = Vec::new();
        while sim.now() < start() + Duration::hours(60) {
            // Fine steps while the device is awake; jump while it sleeps.
            let next = if sim.devices()[0].is_awake() {
                sim.now() + Duration::milliseconds(100)
            } else {
                sim.next_event_at().unwrap()
            };
            sim.run_until(next).unwrap();
            let d = &sim.devices()[0];
            let pending = d.sd.pending().unwrap();
            assert_eq!(pending.len() as u32, d.sd.pending_count().unwrap());
            assert!(
                pending.len() <= last + 1,
                "at most one new capture at a time"
            );
            if pending.len() < last {
                assert_eq!(last - pending.len(), 1, "{dialect:?}: one image per ACK_OK");
            }
            last = pending.len();
            let in_flight = sim
                .store()
                .captures(Some(&id))
                .unwrap()
                .into_iter()
                .filter(|c| c.state != CaptureState::Complete)
                .count();
            assert!(in_flight <= 1, "{dialect:?}: one image streams at a time");
            acked = d.delivered_names.clone();
            if pending.is_empty() && acked.len() > queued.len() {
                break;
            }
        }
        let d = &sim.devices()[0];
        assert!(
            d.sd.pending().unwrap().is_empty(),
            "{dialect:?}: queue drained"
        );
        let tail: Vec<_> = acked
            .iter()
            .filter(|n| queued.contains(n))
            .cloned()
            .collect();
        assert_eq!(tail, queued, "{dialect:?}: oldest first");
        assert_consistent(&sim);
    }
}
