//! Wake scheduling (GATEWAY.md §3): capture times of day per site or device,
//! deterministic staggered slots inside a window so that thousands of
//! devices never wake together, and which schedule slot a wake belongs to.
//!
//! Pure: callers pass the time in.

use crate::config::{parse_time_of_day, ScheduleConfig};
use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct Schedule {
    tz: Tz,
    times: Vec<NaiveTime>,
    per_device: HashMap<String, Vec<NaiveTime>>,
    window: Duration,
    slots: u32,
    stride: u32,
    early_tolerance: Duration,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn parse_times(v: &[String]) -> Vec<NaiveTime> {
    let mut t: Vec<NaiveTime> = v.iter().filter_map(|s| parse_time_of_day(s)).collect();
    t.sort();
    t.dedup();
    if t.is_empty() {
        t.push(NaiveTime::from_hms_opt(8, 0, 0).expect("valid"));
    }
    t
}

impl Schedule {
    pub fn new(cfg: &ScheduleConfig, tz: Tz) -> Schedule {
        let slots = cfg.slots.max(1);
        // A stride near slots/φ, coprime with slots: the first `slots`
        // registrations get distinct slots spread evenly over the window.
        let mut stride = ((slots as f64) * 0.618_033_988_7).round().max(1.0) as u32;
        while slots > 1 && gcd(stride as u64, slots as u64) != 1 {
            stride += 1;
        }
        Schedule {
            tz,
            times: parse_times(&cfg.times),
            per_device: cfg
                .devices
                .iter()
                .filter_map(|(k, v)| {
                    crate::protocol::normalize_device_id(k)
                        .ok()
                        .map(|k| (k, parse_times(v)))
                })
                .collect(),
            window: Duration::minutes(cfg.window_minutes as i64),
            slots,
            stride: stride % slots.max(1),
            early_tolerance: Duration::minutes(cfg.early_tolerance_minutes as i64),
        }
    }

    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The stagger slot of the `index`-th registered device.
    pub fn slot_for_index(&self, index: u64) -> u32 {
        ((index % self.slots as u64) * self.stride as u64 % self.slots as u64) as u32
    }

    /// How long after each capture time a device in `slot` wakes.
    pub fn offset(&self, slot: u32) -> Duration {
        let slot = (slot % self.slots) as i64;
        Duration::milliseconds(self.window.num_milliseconds() * slot / self.slots as i64)
    }

    fn times_for(&self, device: &str, override_times: Option<&[String]>) -> Vec<NaiveTime> {
        if let Some(t) = override_times.filter(|t| !t.is_empty()) {
            return parse_times(t);
        }
        self.per_device
            .get(device)
            .cloned()
            .unwrap_or_else(|| self.times.clone())
    }

    fn local(&self, date: NaiveDate, t: NaiveTime) -> DateTime<Utc> {
        let naive = date.and_time(t);
        match self.tz.from_local_datetime(&naive).earliest() {
            Some(dt) => dt.with_timezone(&Utc),
            // In a DST gap: the same wall time an hour later exists.
            None => self
                .tz
                .from_local_datetime(&(naive + Duration::hours(1)))
                .earliest()
                .map(|d| d.with_timezone(&Utc))
                .unwrap_or_else(|| naive.and_utc()),
        }
    }

    /// The device's wake instants on days around `t`, ascending.
    fn wakes_around(&self, times: &[NaiveTime], slot: u32, t: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let today = t.with_timezone(&self.tz).date_naive();
        let off = self.offset(slot);
        let mut out = Vec::with_capacity(times.len() * 4);
        for d in -2..=2 {
            let date = today + Duration::days(d);
            for tm in times {
                out.push(self.local(date, *tm) + off);
            }
        }
        out.sort();
        out
    }

    /// The device's wake instants around `now` (ascending), and the latest
    /// instant a wake at `now` may still serve (`now + early_tolerance`).
    fn wakes_near(
        &self,
        device: &str,
        override_times: Option<&[String]>,
        slot: u32,
        now: DateTime<Utc>,
    ) -> (Vec<DateTime<Utc>>, DateTime<Utc>) {
        let times = self.times_for(device, override_times);
        (
            self.wakes_around(&times, slot, now),
            now + self.early_tolerance,
        )
    }

    /// The schedule slot a wake at `now` serves: the latest wake instant at
    /// or before `now + early_tolerance` (a drifting clock may wake early).
    pub fn slot_start(
        &self,
        device: &str,
        override_times: Option<&[String]>,
        slot: u32,
        now: DateTime<Utc>,
    ) -> DateTime<Utc> {
        let (wakes, limit) = self.wakes_near(device, override_times, slot, now);
        wakes.into_iter().rev().find(|w| *w <= limit).unwrap_or(now)
    }

    /// The next wake to assign a device waking at `now`: the first wake
    /// instant after the slot this wake serves.
    pub fn next_wake(
        &self,
        device: &str,
        override_times: Option<&[String]>,
        slot: u32,
        now: DateTime<Utc>,
    ) -> DateTime<Utc> {
        let (wakes, limit) = self.wakes_near(device, override_times, slot, now);
        wakes
            .into_iter()
            .find(|w| *w > limit)
            .unwrap_or(now + Duration::hours(12))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn sched(tz: &str) -> Schedule {
        Schedule::new(&ScheduleConfig::default(), tz.parse().unwrap())
    }

    #[test]
    fn thousand_devices_get_distinct_slots_inside_the_window() {
        let s = sched("UTC");
        let slots: Vec<u32> = (0..1000).map(|i| s.slot_for_index(i)).collect();
        let distinct: HashSet<_> = slots.iter().collect();
        assert_eq!(distinct.len(), 1000, "no two devices share a slot");
        let now = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
        let eight = Utc.with_ymd_and_hms(2026, 3, 1, 16, 0, 0).unwrap();
        let mut wakes = HashSet::new();
        for (i, slot) in slots.iter().enumerate() {
            let w = s.next_wake(&format!("D{i}"), None, *slot, now);
            assert!(w >= eight && w < eight + Duration::minutes(60), "{w}");
            assert!(wakes.insert(w), "two devices wake at {w}");
        }
        // Spread evenly: the first 100 registrations cover the whole window.
        let first: Vec<i64> = (0..100)
            .map(|i| s.offset(s.slot_for_index(i)).num_seconds())
            .collect();
        assert!(first.iter().any(|o| *o < 600) && first.iter().any(|o| *o > 3000));
    }

    #[test]
    fn twice_daily_next_wake_in_site_time() {
        let s = sched("Europe/Berlin");
        // 07:00 UTC = 08:00 Berlin (winter): the 08:00 slot was just served.
        let now = Utc.with_ymd_and_hms(2026, 1, 10, 7, 0, 5).unwrap();
        let next = s.next_wake("D", None, 0, now);
        assert_eq!(next, Utc.with_ymd_and_hms(2026, 1, 10, 15, 0, 0).unwrap());
        assert_eq!(
            s.slot_start("D", None, 0, now),
            Utc.with_ymd_and_hms(2026, 1, 10, 7, 0, 0).unwrap()
        );
        // Woke 5 minutes early by drift: still the 08:00 slot, next is 16:00.
        let early = Utc.with_ymd_and_hms(2026, 1, 10, 6, 55, 0).unwrap();
        assert_eq!(
            s.slot_start("D", None, 0, early),
            Utc.with_ymd_and_hms(2026, 1, 10, 7, 0, 0).unwrap()
        );
        assert_eq!(s.next_wake("D", None, 0, early), next);
        // After 16:00 local the next is tomorrow 08:00.
        let late = Utc.with_ymd_and_hms(2026, 1, 10, 20, 0, 0).unwrap();
        assert_eq!(
            s.next_wake("D", None, 0, late),
            Utc.with_ymd_and_hms(2026, 1, 11, 7, 0, 0).unwrap()
        );
    }

    #[test]
    fn per_device_times_override_the_site() {
        let mut cfg = ScheduleConfig::default();
        cfg.devices
            .insert("b8:f8:62:f9:cf:b8".into(), vec!["06:30".into()]);
        let s = Schedule::new(&cfg, Tz::UTC);
        let now = Utc.with_ymd_and_hms(2026, 1, 10, 7, 0, 0).unwrap();
        assert_eq!(
            s.next_wake("B8F862F9CFB8", None, 0, now),
            Utc.with_ymd_and_hms(2026, 1, 11, 6, 30, 0).unwrap()
        );
        let own = vec!["12:00".to_string()];
        assert_eq!(
            s.next_wake("B8F862F9CFB8", Some(&own), 0, now),
            Utc.with_ymd_and_hms(2026, 1, 10, 12, 0, 0).unwrap()
        );
    }
}
