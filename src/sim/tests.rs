use super::base::*;
use super::device::*;
use super::sd::*;
use super::*;
use crate::protocol::Dialect;
use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

#[test]
fn chunks_split_and_assemble_in_any_order() {
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    let parts = split_chunks(&data, 128);
    assert_eq!(parts.len(), 8);
    assert_eq!(parts[7].len(), 1000 - 7 * 128);
    for base in [0u32, 1] {
        let mut m = HashMap::new();
        for (i, p) in parts.iter().enumerate().rev() {
            m.insert(i as u32 + base, p.to_vec());
        }
        assert_eq!(assemble(&m, base, 8).unwrap(), data);
        m.remove(&(3 + base));
        assert_eq!(assemble(&m, base, 8), None);
    }
    assert_eq!(split_chunks(&data[..1024.min(data.len())], 1000).len(), 1);
}

#[test]
fn missing_indices_are_exactly_the_gaps() {
    let got: BTreeSet<u32> = [1, 2, 4, 6].into_iter().collect();
    assert_eq!(missing_ids(&got, 1, 7), vec![3, 5, 7]);
    let got: BTreeSet<u32> = [0, 1, 2].into_iter().collect();
    assert_eq!(missing_ids(&got, 0, 3), Vec::<u32>::new());
    assert_eq!(missing_ids(&BTreeSet::new(), 0, 2), vec![0, 1]);
}

fn entry(name: &str, ts: &str) -> SdEntry {
    SdEntry {
        name: name.into(),
        timestamp: ts.into(),
        pending: true,
        size: 3,
        temperature: 21.5,
        humidity: 50.0,
        pressure: 1012.0,
        gas_resistance: 120.0,
    }
}

#[test]
fn pending_queue_append_and_remove_on_the_sd_card() {
    let dir = tempfile::tempdir().unwrap();
    let sd = SdCard::open(dir.path()).unwrap();
    assert_eq!(sd.pending_count().unwrap(), 0);
    for (n, ts) in [
        ("a.jpg", "2026-01-01T08:00:00Z"),
        ("b.jpg", "2026-01-01T16:00:00Z"),
        ("c.jpg", "2026-01-02T08:00:00Z"),
    ] {
        sd.store(&entry(n, ts), &[0xFF, 0xD8, 0xD9]).unwrap();
    }
    assert_eq!(sd.pending().unwrap(), vec!["a.jpg", "b.jpg", "c.jpg"]);
    assert_eq!(sd.pending_count().unwrap(), 3);
    let pend = std::fs::read_to_string(dir.path().join("pendingImage.txt")).unwrap();
    assert_eq!(pend.lines().next().unwrap(), "a.jpg|2026-01-01T08:00:00Z");
    assert!(sd.mark_sent("b.jpg").unwrap());
    assert!(!sd.mark_sent("b.jpg").unwrap(), "already sent");
    assert!(!sd.mark_sent("zzz.jpg").unwrap());
    assert_eq!(sd.pending().unwrap(), vec!["a.jpg", "c.jpg"]);
    let meta = std::fs::read_to_string(dir.path().join("metadata.txt")).unwrap();
    let lines: Vec<&str> = meta.lines().collect();
    assert_eq!(lines.len(), 3, "the full log keeps every capture");
    assert!(lines[0].starts_with("a.jpg|2026-01-01T08:00:00Z|PendingToSend=true|temp=21.5"));
    assert!(lines[1].contains("|PendingToSend=false|"), "{}", lines[1]);
    assert!(lines[2].contains("|PendingToSend=true|"));
    assert_eq!(sd.entry("c.jpg").unwrap().unwrap().size, 3);
    assert_eq!(sd.image("a.jpg").unwrap(), vec![0xFF, 0xD8, 0xD9]);
    // Reopening keeps the card's contents.
    let again = SdCard::open(dir.path()).unwrap();
    assert_eq!(again.pending_count().unwrap(), 2);
}

#[test]
fn wifi_three_attempts_of_eight_seconds_then_offline() {
    let assoc = Duration::milliseconds(1500);
    assert_eq!(
        wifi_connect(|_| true, assoc),
        WifiOutcome::Connected {
            attempt: 1,
            after: assoc
        }
    );
    let mut tried = Vec::new();
    let out = wifi_connect(
        |a| {
            tried.push(a);
            a == 3
        },
        assoc,
    );
    assert_eq!(
        out,
        WifiOutcome::Connected {
            attempt: 3,
            after: Duration::seconds(16) + assoc
        }
    );
    assert_eq!(tried, vec![1, 2, 3]);
    let mut n = 0;
    assert_eq!(
        wifi_connect(
            |_| {
                n += 1;
                false
            },
            assoc
        ),
        WifiOutcome::Offline {
            after: Duration::seconds(24)
        }
    );
    assert_eq!(n, 3, "exactly three attempts");
}

#[test]
fn offline_time_is_last_ntp_plus_drifting_elapsed() {
    let sync = t("2026-01-01T08:00:00Z");
    let mut c = DeviceClock::new(sync, 0.005);
    let day_later = sync + Duration::days(1);
    // +0.5 % over 24 h: 7.2 minutes fast.
    assert_eq!(
        c.estimated_now(day_later),
        day_later + Duration::milliseconds(432_000)
    );
    assert_eq!(
        c.true_duration(Duration::seconds(1005)),
        Duration::seconds(1000)
    );
    c.sync(day_later);
    assert_eq!(
        c.estimated_now(day_later),
        day_later,
        "NTP resync clears drift"
    );
    let slow = DeviceClock::new(sync, -0.005);
    assert!(slow.estimated_now(day_later) < day_later);
}

#[test]
fn offline_next_wake_is_last_next_wake_plus_a_day() {
    let w8 = t("2026-01-02T08:00:00Z");
    let w16 = t("2026-01-01T16:00:00Z");
    // One remembered wake: the reference formula, last_next_wake + 24 h.
    assert_eq!(
        offline_next_wake(&[w8], w8, Duration::minutes(30)),
        Some(w8 + Duration::days(1))
    );
    // Two daily slots: the next one after now.
    assert_eq!(
        offline_next_wake(&[w16, w8], w8 + Duration::minutes(1), Duration::minutes(30)),
        Some(t("2026-01-02T16:00:00Z"))
    );
    // Days behind (a long outage): still the next slot after now.
    assert_eq!(
        offline_next_wake(&[w16, w8], t("2026-01-05T09:00:00Z"), Duration::minutes(30)),
        Some(t("2026-01-05T16:00:00Z"))
    );
    assert_eq!(offline_next_wake(&[], w8, Duration::minutes(30)), None);
}

#[test]
fn wake_times_are_read_in_both_dialects() {
    let tz: Tz = "Europe/Berlin".parse().unwrap();
    let now = t("2026-01-10T12:00:00Z"); // 13:00 in Berlin
    assert_eq!(
        parse_wake("5:30PM", tz, now),
        Some(t("2026-01-10T16:30:00Z"))
    );
    assert_eq!(
        parse_wake("8:00AM", tz, now),
        Some(t("2026-01-11T07:00:00Z"))
    );
    assert_eq!(
        parse_wake("12:05AM", tz, now),
        Some(t("2026-01-10T23:05:00Z"))
    );
    assert_eq!(
        parse_wake("2026-01-11T07:00:00Z", tz, now),
        Some(t("2026-01-11T07:00:00Z"))
    );
    assert_eq!(parse_wake("soon", tz, now), None);
}

#[test]
fn outages_parse_as_day_ranges() {
    let s = t("2026-01-01T00:00:00Z");
    let o = Outage::parse("1-5", s).unwrap();
    assert_eq!(
        (o.from, o.to),
        (t("2026-01-02T00:00:00Z"), t("2026-01-06T00:00:00Z"))
    );
    assert!(o.covers(7, t("2026-01-03T00:00:00Z")));
    assert!(!o.covers(7, t("2026-01-06T00:00:00Z")));
    let o = Outage::parse("0.5-1:0,2", s).unwrap();
    assert!(o.covers(2, t("2026-01-01T13:00:00Z")));
    assert!(!o.covers(1, t("2026-01-01T13:00:00Z")));
    for bad in ["5-1", "x-2", "1", "1-2:a"] {
        assert!(Outage::parse(bad, s).is_err(), "{bad}");
    }
}

#[test]
fn petri_dish_is_a_jpeg_whose_colonies_grow() {
    let a = petri_jpeg(42, 0.0, 160, 120).unwrap();
    let b = petri_jpeg(42, 4.0, 160, 120).unwrap();
    assert_eq!(&a[..3], &[0xFF, 0xD8, 0xFF]);
    assert_eq!(&a[a.len() - 2..], &[0xFF, 0xD9]);
    assert_ne!(a, b, "day 4 differs from day 0");
    assert!(b.len() > a.len(), "more colonies, more detail");
    assert_eq!(a, petri_jpeg(42, 0.0, 160, 120).unwrap(), "deterministic");
}

fn device(dir: &Path, dialect: Dialect) -> SimDevice {
    let now = t("2026-01-01T08:00:00Z");
    let params = DeviceParams {
        index: 0,
        id: "B8F862000001".into(),
        dialect,
        chunk_size: 128,
        drift: 0.0,
        tz: Tz::UTC,
        wakes_per_day: 2,
        response_timeout: Duration::seconds(60),
        assoc: Duration::seconds(1),
        capture_time: Duration::seconds(1),
        chunk_interval: Duration::milliseconds(10),
        image_width: 64,
        image_height: 48,
        inoculated_at: now,
        location: "Barn".into(),
    };
    SimDevice::new(params, SdCard::open(dir).unwrap(), now, 7)
}

fn publishes(a: &[Action]) -> Vec<Value> {
    a.iter()
        .filter_map(|a| match a {
            Action::Publish { payload, .. } => serde_json::from_slice(payload).ok(),
            _ => None,
        })
        .collect()
}

#[test]
fn device_resends_only_listed_chunks_and_gives_up_after_three_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(dir.path(), Dialect::Firmware);
    let f = Faults::default();
    let now = t("2026-01-01T08:00:00Z");
    let a = d.wake(now, &f).unwrap();
    assert_eq!(publishes(&a)[0]["pendingImg"], 0);
    let a = d
        .on_message(
            now,
            br#"{"device_id":"B8F862000001","capture_image":true}"#,
            &f,
        )
        .unwrap();
    let meta = &publishes(&a)[0];
    let name = meta["image_name"].as_str().unwrap().to_string();
    let total = meta["total_chunks_count"].as_u64().unwrap();
    assert_eq!(d.pending(), 1, "queued on the SD card before sending");
    let a = d
        .on_message(now, json!({"send_image": name}).to_string().as_bytes(), &f)
        .unwrap();
    let chunks = publishes(&a);
    assert_eq!(chunks.len() as u64, total);
    assert_eq!(chunks[0]["chunk_id"], 1, "firmware: 1-based");
    assert!(chunks[0]["payload"].is_array());
    let miss = json!({"image_name": name, "missing_chunks": [2, 3]}).to_string();
    for round in 1..=3 {
        let a = d.on_message(now, miss.as_bytes(), &f).unwrap();
        let ids: Vec<u64> = publishes(&a)
            .iter()
            .map(|c| c["chunk_id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, vec![2, 3], "round {round}: only the listed chunks");
    }
    let a = d.on_message(now, miss.as_bytes(), &f).unwrap();
    assert!(publishes(&a).is_empty(), "gave up after 3 rounds");
    assert_eq!(d.stats.gave_up, 1);
    assert_eq!(d.pending(), 1, "it stays pending");
    let a = d
        .on_message(
            now,
            br#"{"device_id":"B8F862000001","next_wake":"4:00PM"}"#,
            &f,
        )
        .unwrap();
    assert_eq!(
        a,
        vec![Action::Sleep {
            until: t("2026-01-01T16:00:00Z")
        }]
    );
    // Next wake: HELLO reports it, the cue starts the resend, ACK_OK clears it.
    let later = t("2026-01-01T16:00:00Z");
    let a = d.wake(later, &f).unwrap();
    assert_eq!(publishes(&a)[0]["pendingImg"], 1);
    let a = d
        .on_message(
            later,
            br#"{"image_name":"","ACK_OK":{"next_wake_time":"8:00AM"}}"#,
            &f,
        )
        .unwrap();
    assert_eq!(publishes(&a)[0]["image_name"], name.as_str());
    let a = d
        .on_message(
            later,
            json!({"image_name": name, "missing_chunks": [2, 3]})
                .to_string()
                .as_bytes(),
            &f,
        )
        .unwrap();
    assert_eq!(
        publishes(&a).len(),
        2,
        "resumed with only the missing chunks"
    );
    d.on_message(
        later,
        json!({"image_name": name, "ACK_OK": {"next_wake_time": "8:00AM"}})
            .to_string()
            .as_bytes(),
        &f,
    )
    .unwrap();
    assert_eq!(d.pending(), 0);
    assert!(!d.sd.entry(&name).unwrap().unwrap().pending);
}

#[test]
fn v1_device_sends_zero_based_base64_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = device(dir.path(), Dialect::V1);
    let f = Faults::default();
    let now = t("2026-01-01T08:00:00Z");
    let a = d.wake(now, &f).unwrap();
    match &a[0] {
        Action::Publish { topic, .. } => assert_eq!(topic, "device/B8F862000001/status"),
        other => panic!("{other:?}"),
    }
    let a = d.on_message(now, br#"{"capture_image":true}"#, &f).unwrap();
    let name = publishes(&a)[0]["image_name"].as_str().unwrap().to_string();
    let a = d
        .on_message(now, json!({"send_image": name}).to_string().as_bytes(), &f)
        .unwrap();
    let c = &publishes(&a)[0];
    assert_eq!(c["chunk_id"], 0);
    assert!(c["payload"].is_string());
    d.on_message(
        now,
        json!({"image_name": name, "ACK_OK": true, "next_wake_time": "2026-01-01T16:00:00Z"})
            .to_string()
            .as_bytes(),
        &f,
    )
    .unwrap();
    assert_eq!(d.pending(), 0);
}
