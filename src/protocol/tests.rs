use super::data::*;
use super::dialect::*;
use super::envelope::*;
use super::error::*;
use super::hello::*;
use super::outbound::*;
use super::scan::*;
use super::topic::*;
use base64::Engine as _;
use chrono::TimeZone;
use chrono::Utc;
use chrono_tz::Tz;
use proptest::prelude::*;

const META: &str = r#"{"device_id":"esp32-cam-01","capture_timestamp":"2025-08-29T14:30:00Z","image_name":"image_001.jpg","image_size":4153,"max_chunk_size":128,"total_chunks_count":33,"location":"Room 101","error":0,"temperature":25.5,"humidity":45.2,"pressure":1010.5,"gas_resistance":15.3,"extra":"kept"}"#;

#[test]
fn topics_parse_for_both_dialects() {
    let t = parse_topic("ESP32CAM/B8F862F9CFB8/data").unwrap();
    assert_eq!(
        (t.dialect, t.wire_id, t.channel),
        (Dialect::Firmware, "B8F862F9CFB8", Channel::Data)
    );
    let t = parse_topic("device/esp32-cam-01/status").unwrap();
    assert_eq!((t.dialect, t.channel), (Dialect::V1, Channel::Status));
    for bad in [
        "ESP32CAM/x",
        "ESP32CAM//data",
        "foo/x/data",
        "ESP32CAM/x/data/y",
        "ESP32CAM/x/other",
    ] {
        assert!(
            matches!(parse_topic(bad), Err(ProtocolError::UnknownTopic(_))),
            "{bad}"
        );
    }
}

#[test]
fn device_ids_are_macs_only() {
    for s in ["B8F862F9CFB8", "b8:f8:62:f9:cf:b8", "b8-F8-62-f9-CF-b8"] {
        assert_eq!(normalize_device_id(s).unwrap(), "B8F862F9CFB8");
    }
    for bad in [" b8:f8-62f9cfb8\n", "esp32-cam-01", "a/b", "+", ""] {
        let e = normalize_device_id(bad).unwrap_err();
        assert_eq!(e.kind(), "invalid_field", "{bad:?}");
    }
}

#[test]
fn hello_parses_exact_field_names() {
    let h = Hello::parse(br#"{"device_id":"X","status":"alive","pendingImg":3}"#).unwrap();
    assert_eq!(h.pending(), 3);
    assert_eq!(
        Hello::parse(br#"{"device_id":"X","status":"alive","pendingimg":3}"#),
        Err(ProtocolError::MissingField("pendingImg"))
    );
    assert!(matches!(
        Hello::parse(br#"{"device_id":"X","pendingImg":"3"}"#),
        Err(ProtocolError::Json(_))
    ));
    assert!(Hello::parse(br#"{"pendingImg":-1}"#).is_err());
    assert!(Hello::parse(b"not json").is_err());
}

#[test]
fn metadata_parses_and_validates() {
    let m = match DataMessage::parse(META.as_bytes(), 1 << 20).unwrap() {
        DataMessage::Metadata(m) => m,
        other => panic!("{other:?}"),
    };
    assert_eq!(m.total_chunks_count, 33);
    assert_eq!(m.temperature, Some(25.5));
    assert_eq!(
        m.captured_at(),
        Some(Utc.with_ymd_and_hms(2025, 8, 29, 14, 30, 0).unwrap())
    );
    // total contradicts size / chunk size (firmware-protocol.md's own
    // example): the count that fits both is used, the announced one kept.
    let odd = META.replace("\"total_chunks_count\":33", "\"total_chunks_count\":15");
    match DataMessage::parse(odd.as_bytes(), 1 << 20).unwrap() {
        DataMessage::Metadata(m) => {
            assert_eq!((m.total_chunks_count, m.announced_chunks), (33, Some(15)))
        }
        other => panic!("{other:?}"),
    }
    // A camera failure: no image, no chunks.
    let failed = META.replace("\"image_size\":4153", "\"image_size\":0");
    match DataMessage::parse(failed.as_bytes(), 1 << 20).unwrap() {
        DataMessage::Metadata(m) => assert_eq!((m.image_size, m.total_chunks_count), (0, 0)),
        other => panic!("{other:?}"),
    }
    let bad = META.replace("\"image_size\":4153", "\"image_size\":-5");
    assert!(DataMessage::parse(bad.as_bytes(), 1 << 20).is_err());
    let bad = META.replace("\"error\":0,", "");
    assert_eq!(
        DataMessage::parse(bad.as_bytes(), 1 << 20),
        Err(ProtocolError::MissingField("error"))
    );
    assert!(
        DataMessage::parse(META.as_bytes(), 1000).is_err(),
        "oversize image"
    );
    let bad = META.replace("image_001.jpg", "../etc/passwd");
    assert!(DataMessage::parse(bad.as_bytes(), 1 << 20).is_err());
}

#[test]
fn chunk_payloads_as_byte_arrays_or_base64() {
    let c = DataMessage::parse(
        br#"{"device_id":"X","image_name":"a.jpg","chunk_id":1,"max_chunk_size":128,"payload":[255,216,0]}"#,
        1 << 20,
    )
    .unwrap();
    assert!(
        matches!(c, DataMessage::Chunk(Chunk { chunk_id: 1, ref payload, .. }) if payload == &[255, 216, 0])
    );
    let c = DataMessage::parse(
        br#"{"device_id":"X","image_name":"a.jpg","chunk_id":0,"max_chunk_size":128,"payload":"/9gA"}"#,
        1 << 20,
    )
    .unwrap();
    assert!(
        matches!(c, DataMessage::Chunk(Chunk { chunk_id: 0, ref payload, .. }) if payload == &[255, 216, 0])
    );
    for bad in [
        r#"{"image_name":"a.jpg","chunk_id":1,"payload":[256]}"#,
        r#"{"image_name":"a.jpg","chunk_id":1,"payload":[-1]}"#,
        r#"{"image_name":"a.jpg","chunk_id":1,"payload":"!!!"}"#,
        r#"{"image_name":"a.jpg","chunk_id":-1,"payload":[1]}"#,
        r#"{"image_name":"a.jpg","chunk_id":99999999999,"payload":[1]}"#,
        r#"{"image_name":"a.jpg","chunk_id":"1","payload":[1]}"#,
        r#"{"chunk_id":1,"payload":[1]}"#,
        r#"{"image_name":"a.jpg","chunk_id":1}"#,
        r#"{"foo":1}"#,
        r#"[1,2,3]"#,
    ] {
        assert!(
            DataMessage::parse(bad.as_bytes(), 1 << 20).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn outbound_messages_are_byte_exact() {
    let tz: Tz = "Europe/Berlin".parse().unwrap();
    let at = Utc.with_ymd_and_hms(2025, 1, 3, 16, 30, 0).unwrap(); // 17:30 in Berlin
    let ack = Outbound::AckOk {
        image_name: "img.jpg".into(),
        next_wake: at,
    };
    let (t, p) = ack.render(Dialect::Firmware, "B8F862F9CFB8", tz);
    assert_eq!(t, "ESP32CAM/B8F862F9CFB8/ack");
    assert_eq!(
        String::from_utf8(p).unwrap(),
        r#"{"device_id":"B8F862F9CFB8","image_name":"img.jpg","ACK_OK":{"next_wake_time":"5:30PM"}}"#
    );
    let (t, p) = ack.render(Dialect::V1, "B8F862F9CFB8", tz);
    assert_eq!(t, "device/B8F862F9CFB8/ack");
    assert_eq!(
        String::from_utf8(p).unwrap(),
        r#"{"device_id":"B8F862F9CFB8","image_name":"img.jpg","ACK_OK":true,"next_wake_time":"2025-01-03T16:30:00Z"}"#
    );
    let miss = Outbound::MissingChunks {
        image_name: "img.jpg".into(),
        chunk_ids: vec![5, 10, 23],
    };
    let (t, p) = miss.render(Dialect::Firmware, "X1", tz);
    assert_eq!(t, "ESP32CAM/X1/cmd");
    assert_eq!(
        String::from_utf8(p).unwrap(),
        r#"{"device_id":"X1","image_name":"img.jpg","missing_chunks":[5,10,23]}"#
    );
    assert_eq!(miss.render(Dialect::V1, "X1", tz).0, "device/X1/ack");
    let (t, p) = Outbound::CaptureImage.render(Dialect::Firmware, "X1", tz);
    assert_eq!(t, "ESP32CAM/X1/cmd");
    assert_eq!(p, br#"{"device_id":"X1","capture_image":true}"#);
    let (_, p) = Outbound::SendImage {
        image_name: "a.jpg".into(),
    }
    .render(Dialect::V1, "X1", tz);
    assert_eq!(p, br#"{"device_id":"X1","send_image":"a.jpg"}"#);
    let am = Utc.with_ymd_and_hms(2025, 1, 3, 10, 0, 0).unwrap();
    let (_, p) = Outbound::NextWake { at: am }.render(Dialect::Firmware, "X1", tz);
    assert_eq!(p, br#"{"device_id":"X1","next_wake":"11:00AM"}"#);
}

#[test]
fn payload_fast_path_keeps_serde_semantics() {
    let chunk = |m: &str| match DataMessage::parse(m.as_bytes(), 1 << 20) {
        Ok(DataMessage::Chunk(c)) => Ok((c.image_name, c.payload)),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e.kind()),
    };
    let ok = |n: &str, p: &[u8]| Ok((n.to_string(), p.to_vec()));
    assert_eq!(
        chunk(r#"{"image_name":"a.jpg","chunk_id":1,"payload":[1, 2 ,255]}"#),
        ok("a.jpg", &[1, 2, 255])
    );
    // The key text inside a string value is not the key.
    assert_eq!(
        chunk(r#"{"image_name":"\"payload\":[9]","chunk_id":1,"payload":[7]}"#),
        ok("\"payload\":[9]", &[7])
    );
    // Escaped key: serde sees "payload".
    assert_eq!(
        chunk(r#"{"image_name":"a.jpg","chunk_id":1,"pay\u006coad":[3]}"#),
        ok("a.jpg", &[3])
    );
    // A repeated payload is an error, as with serde alone.
    assert_eq!(
        chunk(r#"{"image_name":"a.jpg","chunk_id":1,"payload":[1],"payload":[2]}"#),
        Err("malformed_json")
    );
    for bad in [
        r#"{"image_name":"a.jpg","chunk_id":1,"payload":[256]}"#,
        r#"{"image_name":"a.jpg","chunk_id":1,"payload":[-1]}"#,
        r#"{"image_name":"a.jpg","chunk_id":1,"payload":[01]}"#,
        r#"{"image_name":"a.jpg","chunk_id":1,"payload":[1,]}"#,
        r#"{"image_name":"a.jpg","chunk_id":1,"payload":[1.5]}"#,
        r#"{"image_name":"a.jpg","chunk_id":1,"payload":[1]} x"#,
        r#"{"image_name":"a.jpg","chunk_id":1,"payload":[1],}"#,
    ] {
        assert_eq!(chunk(bad), Err("malformed_json"), "{bad}");
    }
}

#[test]
fn firmware_chunk_fields_are_read_without_serde() {
    let msg = br#"{"device_id":"B8F800000001","image_name":"img_00001.jpg","chunk_id":17,"max_chunk_size":512,"payload":[1,2,255]}"#;
    let e = split_payload(msg)
        .and_then(|s| s.envelope)
        .expect("plain chunk");
    assert_eq!(
        (e.image_name, e.chunk_id, e.max_chunk_size),
        ("img_00001.jpg", 17, Some(512))
    );
    // Another key, a repeated one, an escape or null: serde reads it.
    for other in [
        r#"{"image_name":"a.jpg","chunk_id":1,"location":"x","payload":[1]}"#,
        r#"{"image_name":"a.jpg","chunk_id":1,"chunk_id":2,"payload":[1]}"#,
        r#"{"image_name":"a\u002ejpg","chunk_id":1,"payload":[1]}"#,
        r#"{"image_name":"a.jpg","chunk_id":1,"max_chunk_size":null,"payload":[1]}"#,
        r#"{"device_id":7,"image_name":"a.jpg","chunk_id":1,"payload":[1]}"#,
    ] {
        let sp = split_payload(other.as_bytes()).expect("payload scanned");
        assert!(sp.envelope.is_none(), "{other}");
    }
}

#[test]
fn compact_scan_takes_whole_blocks_and_refuses_non_canonical() {
    let data: Vec<u8> = (0..600u32).map(|i| (i * 37 % 256) as u8).collect();
    let array = serde_json::to_string(&data).unwrap();
    let text = format!("{{\"payload\":{array}}}");
    let start = text.find('[').unwrap() + 1;
    let mut out = Vec::new();
    let end = scan_compact(text.as_bytes(), start, &mut out);
    // All but the elements of the last, partial block.
    assert!(out.len() > 580, "took {}", out.len());
    assert_eq!(&data[..out.len()], &out[..]);
    assert_eq!(text.as_bytes()[end - 1], b',');
    // An array at the very start of the text is left to the caller's
    // loop, with the same result.
    assert_eq!(scan_compact(array.as_bytes(), 1, &mut Vec::new()), 1);
    assert_eq!(
        scan_byte_array(array.as_bytes(), 0),
        Some((data.clone(), array.len()))
    );
    for bad in [",07,", ",256,", ",,", ",1000,"] {
        let t = text.replacen(",", bad, 1);
        let mut out = Vec::new();
        assert_eq!(scan_compact(t.as_bytes(), start, &mut out), start, "{bad}");
        assert!(out.is_empty());
        assert_eq!(scan_byte_array(t.as_bytes(), start - 1), None, "{bad}");
    }
}

proptest! {
    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = DataMessage::parse(&bytes, 1 << 20);
        let _ = Hello::parse(&bytes);
    }

    /// The SSE2 block masks are the SWAR ones, for any 64 bytes (drawn
    /// mostly from the characters of a byte array, so both masks are
    /// dense).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn block_masks_sse2_match_swar(
        block in proptest::collection::vec(
            prop_oneof![
                4 => proptest::sample::select(b"0123456789,,]".to_vec()),
                1 => any::<u8>(),
            ],
            64),
    ) {
        let mut b = [0u8; 64];
        b.copy_from_slice(&block);
        prop_assert_eq!(block_masks_sse2(&b), block_masks_swar(&b));
    }

    /// The vector element decoder (AVX2 on x86_64, NEON on aarch64)
    /// takes the same elements as the scalar one, with the same values
    /// and the same verdict, for compact arrays with a stray empty,
    /// long, zero-led or too-large element anywhere.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn vector_elements_match_scalar(
        items in proptest::collection::vec(0u32..256, 0..300),
        odd in proptest::option::of((any::<prop::sample::Index>(), prop_oneof![
            (256u32..1000).prop_map(|v| v.to_string()),
            (0u32..100).prop_map(|v| format!("0{v}")),
            Just(String::new()),
            (1000u32..100_000).prop_map(|v| v.to_string()),
            proptest::sample::select(vec!["x", "]", " 1", "-1", "2555"]).prop_map(String::from),
        ])),
        lead in 4usize..40,
    ) {
        #[cfg(target_arch = "x86_64")]
        prop_assume!(std::arch::is_x86_feature_detected!("avx2"));
        let mut items: Vec<String> = items.iter().map(u32::to_string).collect();
        if let Some((at, v)) = odd {
            let at = at.index(items.len() + 1);
            items.insert(at, v);
        }
        let text = format!("{}[{}]", "{".repeat(lead), items.join(","));
        let start = lead + 1;
        let (mut scalar, mut simd) = (vec![7u8], vec![7u8]);
        let a = scan_blocks(text.as_bytes(), start, &mut scalar, decode_elements);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 is present (assumed above).
        let b = unsafe { scan_compact_avx2(text.as_bytes(), start, &mut simd) };
        #[cfg(target_arch = "aarch64")]
        let b = scan_blocks(text.as_bytes(), start, &mut simd, decode_elements_neon);
        prop_assert_eq!(a, b);
        prop_assert_eq!(scalar, simd);
    }

    /// The direct byte-array scan accepts exactly what serde accepts,
    /// with the same bytes, for arrays written with odd spacing and
    /// stray values.
    #[test]
    fn byte_array_scan_matches_serde(
        items in proptest::collection::vec(
            (0i64..300, 0usize..4, prop_oneof![Just(""), Just(" "), Just("\n\t"), Just(".0"), Just("e1")]),
            0..40),
        lead in prop_oneof![Just(""), Just("0"), Just("-")],
    ) {
        let mut s = String::from(" [");
        for (i, (v, sp, tail)) in items.iter().enumerate() {
            if i > 0 { s.push(','); }
            s.push_str(&" ".repeat(*sp));
            if i == 0 { s.push_str(lead); }
            s.push_str(&v.to_string());
            if *v % 7 == 0 { s.push_str(tail); }
        }
        s.push_str(" ] ");
        let serde: Option<Vec<u8>> = serde_json::from_str::<Payload>(&s).ok().map(|p| p.0);
        let scan = scan_byte_array(s.trim().as_bytes(), 0).filter(|(_, end)| *end == s.trim().len()).map(|x| x.0);
        if let Some(v) = &scan {
            prop_assert_eq!(Some(v.clone()), serde.clone());
        }
        let msg = format!(r#"{{"image_name":"x.jpg","chunk_id":1,"payload":{s}}}"#);
        match (DataMessage::parse(msg.as_bytes(), 1 << 20), serde) {
            (Ok(DataMessage::Chunk(c)), Some(v)) => prop_assert_eq!(c.payload, v),
            (Err(_), None) => {}
            (r, v) => prop_assert!(false, "{s}: parse {r:?} vs serde {v:?}"),
        }
    }

    #[test]
    fn compact_byte_arrays_match_serde(
        items in proptest::collection::vec(
            (0u32..1100, prop_oneof![4 => Just(""), 1 => Just("0"), 1 => Just(".5"), 1 => Just("e2"), 1 => Just(" "), 1 => Just("x")]),
            0..700),
        zero_every in 1usize..40,
    ) {
        // No whitespace: the four-bytes-at-a-time path decides most of it.
        let mut s = String::from("[");
        for (i, (v, tail)) in items.iter().enumerate() {
            if i > 0 { s.push(','); }
            if i % zero_every == zero_every - 1 { s.push('0'); }
            s.push_str(&v.to_string());
            if *v % 5 == 0 { s.push_str(tail); }
        }
        s.push(']');
        let serde: Option<Vec<u8>> = serde_json::from_str::<Payload>(&s).ok().map(|p| p.0);
        let scan = scan_byte_array(s.as_bytes(), 0).filter(|(_, end)| *end == s.len()).map(|x| x.0);
        if let Some(v) = &scan {
            prop_assert_eq!(Some(v.clone()), serde.clone(), "{}", s);
        }
        if items.iter().all(|(v, _)| *v <= 255 && *v % 5 != 0) && zero_every > items.len() {
            prop_assert!(scan.is_some(), "canonical array not scanned: {}", s);
        }
    }

    /// Chunk fields read without serde give exactly what serde gives
    /// (or the same error), whatever the keys, values, order, repeats.
    #[test]
    fn chunk_envelope_matches_serde(
        vals in proptest::collection::vec(0usize..19, 4),
        present in proptest::collection::vec(any::<bool>(), 4),
        extras in proptest::collection::vec((0usize..8, 0usize..19), 0..3),
        order in Just((0..8).collect::<Vec<usize>>()).prop_shuffle(),
        ws in prop_oneof![Just(""), Just(" "), Just("\n ")],
    ) {
        const VALUES: [&str; 19] = [
            r#""B8F800000001""#, r#""img_00001.jpg""#, r#""a\"b""#, "\"tab\tx\"",
            r#""ü.jpg""#, "0", "7", "007", "-3", "1.0", "1e2", "4294967296",
            "99999999999999999999", "null", "true", r#""""#, r#""a/b""#,
            "123456789012345678", r#""\u00fc""#,
        ];
        const KEYS: [&str; 8] = [
            "device_id", "image_name", "chunk_id", "max_chunk_size",
            "location", "image_size", "pay\\u006coad", "sha256",
        ];
        let mut fields: Vec<String> = (0..4)
            .filter(|&k| present[k])
            .map(|k| format!("\"{}\":{ws}{}", KEYS[k], VALUES[vals[k]]))
            .collect();
        fields.push(format!("\"payload\":{ws}[1,2,255]"));
        for (k, v) in &extras {
            fields.push(format!("\"{}\":{}", KEYS[*k], VALUES[*v]));
        }
        let mut shuffled: Vec<String> = order.iter().filter_map(|&i| fields.get(i).cloned()).collect();
        shuffled.extend(fields.iter().skip(8).cloned());
        let msg = format!("{{{ws}{}{ws}}}", shuffled.join(","));
        let fast = DataMessage::parse_with(msg.as_bytes(), 1 << 20, true);
        let serde = DataMessage::parse_with(msg.as_bytes(), 1 << 20, false);
        prop_assert_eq!(format!("{fast:?}"), format!("{serde:?}"), "{}", msg);
    }

    #[test]
    fn byte_array_and_base64_payloads_agree(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        use base64::engine::general_purpose::STANDARD;
        let arr = serde_json::to_string(&data).unwrap();
        let b64 = STANDARD.encode(&data);
        let a = format!(r#"{{"image_name":"x.jpg","chunk_id":1,"payload":{arr}}}"#);
        let b = format!(r#"{{"image_name":"x.jpg","chunk_id":1,"payload":"{b64}"}}"#);
        let pa = DataMessage::parse(a.as_bytes(), 1 << 20).unwrap();
        let pb = DataMessage::parse(b.as_bytes(), 1 << 20).unwrap();
        prop_assert_eq!(pa, pb);
    }
}
