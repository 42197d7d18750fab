//! The topic rules: a device publishes (and leaves a will) only on its own
//! `…/status` and `…/data` and subscribes only to its own `…/cmd` and
//! `…/ack`, in either topic dialect.

use super::violation::{truncate, Violation};
use crate::protocol::{normalize_device_id, parse_topic, Channel};

pub(super) fn own_topic(topic: &str, device: &str, allowed: &[Channel]) -> bool {
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
