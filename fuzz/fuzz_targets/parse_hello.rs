#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = barngate::protocol::Hello::parse(data) {
        let _ = h.pending();
    }
});
