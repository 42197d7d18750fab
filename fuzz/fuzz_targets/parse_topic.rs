#![no_main]
use barngate::protocol::{normalize_device_id, parse_topic, topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    if let Ok(t) = parse_topic(s) {
        // A parsed topic renders back to itself.
        assert_eq!(topic(t.dialect, t.wire_id, t.channel), s);
        if let Ok(id) = normalize_device_id(t.wire_id) {
            assert!(!id.contains('/') && !id.contains('+') && !id.contains('#'));
        }
    }
});
