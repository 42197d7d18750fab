#![no_main]
use barngate::protocol::{DataMessage, MAX_CHUNK_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match DataMessage::parse(data, 1 << 20) {
        Ok(DataMessage::Chunk(c)) => assert!(c.payload.len() <= MAX_CHUNK_SIZE as usize),
        Ok(DataMessage::Metadata(m)) => {
            assert!(m.image_size > 0 && m.image_size <= 1 << 20);
            assert_eq!(m.total_chunks_count, m.image_size.div_ceil(m.max_chunk_size));
            let _ = m.captured_at();
        }
        Err(e) => {
            let _ = (e.kind(), e.to_string());
        }
    }
});
