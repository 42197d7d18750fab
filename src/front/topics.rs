//! The topic rules: a device publishes (and leaves a will) only on its own
//! `…/status` and `…/data` and subscribes only to its own `…/cmd` and
//! `…/ack`, in either topic dialect; and the caps on its topic filters.

use super::violation::{truncate, Violation};
use crate::protocol::{normalize_device_id, parse_topic, Channel};
use rumqttd::protocol::QoS;
use std::collections::HashSet;

fn own_topic(topic: &str, device: &str, allowed: &[Channel]) -> bool {
    let Ok(t) = parse_topic(topic) else {
        return false;
    };
    // `device` is normalised, so the firmware's own spelling of it (the
    // usual case) matches without normalising the topic's.
    allowed.contains(&t.channel)
        && (t.wire_id == device || normalize_device_id(t.wire_id).is_ok_and(|id| id == device))
}

pub(super) fn check_publish_topic(topic: &[u8], device: &str) -> Result<(), Violation> {
    let text = std::str::from_utf8(topic).unwrap_or("");
    if own_topic(text, device, &[Channel::Status, Channel::Data]) {
        Ok(())
    } else {
        Err(Violation::Publish {
            topic: truncate(&String::from_utf8_lossy(topic)),
        })
    }
}

/// Checks one SUBSCRIBE topic filter: only the device's own `…/cmd` or
/// `…/ack`, exactly (no wildcards).
pub(super) fn check_subscribe_filter(filter: &str, device: &str) -> Result<(), Violation> {
    if own_topic(filter, device, &[Channel::Cmd, Channel::Ack]) {
        Ok(())
    } else {
        Err(Violation::Subscribe {
            filter: truncate(filter),
        })
    }
}

/// Counts a SUBSCRIBE's filters against the limits: at most
/// `per_subscribe` in one SUBSCRIBE and `per_session` distinct ones in a
/// connection. `seen` is every distinct filter the connection has
/// subscribed to: an UNSUBSCRIBE gives none back (the broker never frees a
/// filter's memory, and a device needs two).
pub(super) fn count_filters(
    seen: &mut HashSet<String>,
    filters: &[(String, QoS)],
    per_subscribe: usize,
    per_session: usize,
) -> Result<(), Violation> {
    if filters.len() > per_subscribe {
        return Err(Violation::TooManyFilters {
            count: filters.len(),
            max: per_subscribe,
            per: "SUBSCRIBE",
        });
    }
    for (f, _) in filters {
        if !seen.contains(f) {
            if seen.len() == per_session {
                return Err(Violation::TooManyFilters {
                    count: seen.len() + 1,
                    max: per_session,
                    per: "session",
                });
            }
            seen.insert(f.clone());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_rules() {
        let d = "AABBCCDDEEFF";
        assert!(own_topic(
            "ESP32CAM/AABBCCDDEEFF/status",
            d,
            &[Channel::Status]
        ));
        assert!(own_topic(
            "device/aa:bb:cc:dd:ee:ff/data",
            d,
            &[Channel::Data]
        ));
        assert!(!own_topic(
            "ESP32CAM/AABBCCDDEE00/status",
            d,
            &[Channel::Status]
        ));
        assert!(!own_topic(
            "ESP32CAM/AABBCCDDEEFF/cmd",
            d,
            &[Channel::Status]
        ));
        assert!(!own_topic("ESP32CAM/+/cmd", d, &[Channel::Cmd]));
        assert!(!own_topic("ESP32CAM/#", d, &[Channel::Cmd]));
        assert!(!own_topic("#", d, &[Channel::Cmd]));
    }
}
