//! The firmware wire protocol (GATEWAY.md §1): topics, the two dialects,
//! inbound HELLO / METADATA / CHUNK parsing and outbound message rendering.
//!
//! Pure: no IO, no clock, no state. Field names are exact and case-sensitive.

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;

/// Largest `max_chunk_size` a device may announce.
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024;
/// Longest accepted image name, in bytes.
pub const MAX_IMAGE_NAME: usize = 200;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    #[error("invalid field `{field}`: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("message is neither METADATA nor CHUNK (no `total_chunks_count` or `chunk_id`)")]
    UnknownDataMessage,
}

impl ProtocolError {
    /// A short stable label, used as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolError::UnknownTopic(_) => "unknown_topic",
            ProtocolError::Json(_) => "malformed_json",
            ProtocolError::MissingField(_) => "missing_field",
            ProtocolError::InvalidField { .. } => "invalid_field",
            ProtocolError::UnknownDataMessage => "unknown_message",
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidField {
        field,
        reason: reason.into(),
    }
}

/// The two protocol dialects found in the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// firmware-protocol.md: `ESP32CAM/…`, 1-based chunk ids, byte arrays, `5:30PM` times.
    #[default]
    Firmware,
    /// architecture-v1.md: `device/…`, 0-based chunk ids, base64, ISO-8601 UTC times.
    V1,
}

impl Dialect {
    pub fn prefix(self) -> &'static str {
        match self {
            Dialect::Firmware => "ESP32CAM",
            Dialect::V1 => "device",
        }
    }

    /// The chunk-id base this dialect uses unless a device reveals otherwise.
    pub fn chunk_base(self) -> u32 {
        match self {
            Dialect::Firmware => 1,
            Dialect::V1 => 0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Firmware => "firmware",
            Dialect::V1 => "v1",
        }
    }
}

impl std::str::FromStr for Dialect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "firmware" => Ok(Dialect::Firmware),
            "v1" => Ok(Dialect::V1),
            other => Err(format!(
                "unknown dialect {other:?} (expected firmware or v1)"
            )),
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last topic level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Status,
    Data,
    Cmd,
    Ack,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Status => "status",
            Channel::Data => "data",
            Channel::Cmd => "cmd",
            Channel::Ack => "ack",
        }
    }
}

/// A parsed device topic, borrowing the device id as it appeared on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    pub dialect: Dialect,
    pub wire_id: &'a str,
    pub channel: Channel,
}

pub fn parse_topic(topic: &str) -> Result<Topic<'_>, ProtocolError> {
    let unknown = || ProtocolError::UnknownTopic(truncate(topic, 120));
    let mut parts = topic.split('/');
    let (Some(prefix), Some(id), Some(last), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unknown());
    };
    let dialect = match prefix {
        "ESP32CAM" => Dialect::Firmware,
        "device" => Dialect::V1,
        _ => return Err(unknown()),
    };
    let channel = match last {
        "status" => Channel::Status,
        "data" => Channel::Data,
        "cmd" => Channel::Cmd,
        "ack" => Channel::Ack,
        _ => return Err(unknown()),
    };
    if id.is_empty() {
        return Err(unknown());
    }
    Ok(Topic {
        dialect,
        wire_id: id,
        channel,
    })
}

pub fn topic(dialect: Dialect, wire_id: &str, channel: Channel) -> String {
    format!("{}/{}/{}", dialect.prefix(), wire_id, channel.as_str())
}

/// The device id in a topic or client id: [`crate::ident::normalize`]
/// (a MAC, normalised), with its error as a [`ProtocolError`].
pub fn normalize_device_id(s: &str) -> Result<String, ProtocolError> {
    crate::ident::normalize(s).map_err(|e| invalid("device_id", e.to_string()))
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

/// HELLO: `{"device_id","status":"alive","pendingImg":N}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Hello {
    pub device_id: Option<String>,
    pub status: Option<String>,
    #[serde(rename = "pendingImg")]
    pub pending_img: Option<i64>,
    /// Optional extras some firmware sends.
    #[serde(default)]
    pub battery: Option<f64>,
    #[serde(default)]
    pub battery_voltage: Option<f64>,
    #[serde(default)]
    pub firmware_version: Option<String>,
    #[serde(default)]
    pub hardware_version: Option<String>,
    #[serde(default)]
    pub error: Option<i64>,
}

impl Hello {
    pub fn parse(payload: &[u8]) -> Result<Hello, ProtocolError> {
        let h: Hello =
            serde_json::from_slice(payload).map_err(|e| ProtocolError::Json(e.to_string()))?;
        match h.pending_img {
            None => Err(ProtocolError::MissingField("pendingImg")),
            Some(n) if n < 0 => Err(invalid("pendingImg", format!("negative count {n}"))),
            Some(_) => Ok(h),
        }
    }

    pub fn pending(&self) -> u32 {
        self.pending_img.unwrap_or(0).clamp(0, u32::MAX as i64) as u32
    }
}

/// Chunk bytes: either a JSON array of byte values or a base64 string.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Payload(pub Vec<u8>);

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Payload, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Payload;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of byte values (0-255) or a base64 string")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Payload, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(256).min(65536));
                while let Some(v) = seq.next_element::<i64>()? {
                    if !(0..=255).contains(&v) {
                        return Err(de::Error::custom(format_args!(
                            "byte value {v} at index {} is out of range 0-255",
                            out.len()
                        )));
                    }
                    out.push(v as u8);
                }
                Ok(Payload(out))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Payload, E> {
                decode_base64(s).map(Payload).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The chunk payload when [`split_payload`] did not take the fast path
/// (base64 strings, bad values, floats, …): serde, as before.
fn decode_payload(raw: &serde_json::value::RawValue) -> Result<Vec<u8>, ProtocolError> {
    serde_json::from_str::<Payload>(raw.get())
        .map(|p| p.0)
        .map_err(|e| ProtocolError::Json(format!("payload: {e}")))
}

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_ws(s[i]) {
        i += 1;
    }
    i
}

/// The fast path for chunk messages. Decoding a ~1.9 KB JSON byte array
/// through serde (generic `i64` visitor per element, or even just skipping
/// it as a `RawValue`) took ~100 instructions per byte, most of a chunk's
/// ingest cost. This walks the top-level object once (strings skipped, no
/// nesting), decodes a canonical `"payload":[n,…]` directly, and returns
/// the decoded bytes with the other fields of a plain chunk ([`Envelope`]);
/// for any other fields, serde reads the message with the payload replaced
/// by `[]` ([`Split::rest`]). `None` (serde reads the whole message, with
/// its usual errors) for anything unusual: nested values, escaped or
/// repeated keys, non-canonical numbers, no payload.
fn split_payload(s: &[u8]) -> Option<Split<'_>> {
    let mut env = Envelope::default();
    let mut i = skip_ws(s, 0);
    if s.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut span = None;
    let mut first = true;
    loop {
        i = skip_ws(s, i);
        if first && s.get(i) == Some(&b'}') {
            i += 1;
            break;
        }
        first = false;
        if s.get(i) != Some(&b'"') {
            return None;
        }
        let key_start = i + 1;
        i = skip_string(s, i)?;
        let key = &s[key_start..i - 1];
        if key.contains(&b'\\') {
            return None;
        }
        i = skip_ws(s, i);
        if s.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(s, i + 1);
        let value = i;
        match *s.get(i)? {
            b'[' if key == b"payload" && span.is_none() => {
                let (bytes, end) = scan_byte_array(s, i)?;
                span = Some((i, end, bytes));
                i = end;
            }
            b'[' | b'{' => return None,
            b'"' => i = skip_string(s, i)?,
            _ => {
                while i < s.len() && !matches!(s[i], b',' | b'}') && !is_ws(s[i]) {
                    i += 1;
                }
            }
        }
        if key != b"payload" {
            env.take(key, &s[value..i]);
        }
        if key == b"payload" && span.as_ref().is_none_or(|x| x.1 != i) {
            // A second or non-array payload: serde decides.
            return None;
        }
        i = skip_ws(s, i);
        match s.get(i)? {
            b',' => i += 1,
            b'}' => {
                i += 1;
                break;
            }
            _ => return None,
        }
    }
    if skip_ws(s, i) != s.len() {
        return None;
    }
    let (start, end, bytes) = span?;
    Some(Split {
        bytes,
        text: s,
        array: (start, end),
        envelope: env.chunk(),
    })
}

/// What [`split_payload`] found.
struct Split<'a> {
    /// The decoded payload array.
    bytes: Vec<u8>,
    text: &'a [u8],
    /// Where the array is in `text`.
    array: (usize, usize),
    /// The other fields, when they are a plain chunk's (see [`Envelope`]).
    envelope: Option<ChunkEnvelope<'a>>,
}

impl Split<'_> {
    /// The message with the payload replaced by `[]`, for serde.
    fn rest(&self) -> Vec<u8> {
        let (start, end) = self.array;
        let s = self.text;
        let mut rest = Vec::with_capacity(s.len() - (end - start) + 2);
        rest.extend_from_slice(&s[..start]);
        rest.extend_from_slice(b"[]");
        rest.extend_from_slice(&s[end..]);
        rest
    }
}

/// A chunk's fields besides the payload, read without serde (`device_id`
/// is checked and not kept, as in [`Chunk`]).
struct ChunkEnvelope<'a> {
    image_name: &'a str,
    chunk_id: i64,
    max_chunk_size: Option<i64>,
}

/// The fields of a top-level object as [`split_payload`] walks it. Only
/// what serde would read the same way is taken: each of `device_id`,
/// `image_name` (strings without escapes or control characters),
/// `chunk_id`, `max_chunk_size` (plain non-negative integers) at most once,
/// and no other key. Anything else — another key, `null`, a repeated key, a
/// number serde might read otherwise — leaves the message to serde (the
/// envelope of a ~2 KB chunk took serde about a quarter of the parse).
#[derive(Default)]
struct Envelope<'a> {
    device_id: Option<&'a str>,
    image_name: Option<&'a str>,
    chunk_id: Option<i64>,
    max_chunk_size: Option<i64>,
    other: bool,
}

impl<'a> Envelope<'a> {
    fn take(&mut self, key: &[u8], value: &'a [u8]) {
        fn text(v: &[u8]) -> Option<&str> {
            let inner = v.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
            if inner.iter().any(|&b| b < 0x20 || b == b'\\' || b == b'"') {
                return None;
            }
            std::str::from_utf8(inner).ok()
        }
        fn int(v: &[u8]) -> Option<i64> {
            let plain = !v.is_empty()
                && v.len() <= 18
                && v.iter().all(u8::is_ascii_digit)
                && (v[0] != b'0' || v.len() == 1);
            // 18 digits fit an i64.
            plain.then(|| v.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
        }
        let ok = match key {
            b"device_id" if self.device_id.is_none() => {
                text(value).map(|t| self.device_id = Some(t))
            }
            b"image_name" if self.image_name.is_none() => {
                text(value).map(|t| self.image_name = Some(t))
            }
            b"chunk_id" if self.chunk_id.is_none() => int(value).map(|n| self.chunk_id = Some(n)),
            b"max_chunk_size" if self.max_chunk_size.is_none() => {
                int(value).map(|n| self.max_chunk_size = Some(n))
            }
            _ => None,
        };
        self.other |= ok.is_none();
    }

    fn chunk(self) -> Option<ChunkEnvelope<'a>> {
        if self.other {
            return None;
        }
        Some(ChunkEnvelope {
            image_name: self.image_name?,
            chunk_id: self.chunk_id?,
            max_chunk_size: self.max_chunk_size,
        })
    }
}

/// `s[i]` is `"`: the index after the closing quote.
fn skip_string(s: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    while i < s.len() {
        match s[i] {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

/// `s[i]` is `[`: a byte array whose every element is a JSON integer in
/// 0..=255 without sign, fraction or exponent, and the index after its `]`;
/// `None` for anything else.
fn scan_byte_array(s: &[u8], mut i: usize) -> Option<(Vec<u8>, usize)> {
    let ws = is_ws;
    let n = s.len();
    if s.get(i) != Some(&b'[') {
        return None;
    }
    i += 1;
    // Room for the usual case: an element of random bytes (a JPEG) takes
    // 3.6 characters on average, and the block decoder appends 72 at a
    // time. Small values (two characters each at least) make it grow. It
    // was sized for the worst case, half the text: a 1 KiB allocation for
    // a 512 B chunk, and 2,048 of them wait in the ingest queue at a
    // burst's peak.
    let mut out = Vec::with_capacity((n - i) * 2 / 7 + 80);
    // Compact firmware output (`[255,216,…]`) is taken in blocks (see
    // `scan_compact`); the last element, whitespace or anything unusual is
    // left to the loop below, at the same element, so the result is the same
    // either way.
    i = scan_compact(s, i, &mut out);
    loop {
        while i < n && ws(s[i]) {
            i += 1;
        }
        let c = *s.get(i)?;
        if c == b']' && out.is_empty() {
            i += 1;
            break;
        }
        if !c.is_ascii_digit() {
            return None;
        }
        let mut v = u32::from(c - b'0');
        i += 1;
        if c != b'0' {
            // At most two more digits.
            for _ in 0..2 {
                match s.get(i) {
                    Some(d) if d.is_ascii_digit() => {
                        v = v * 10 + u32::from(d - b'0');
                        i += 1;
                    }
                    _ => break,
                }
            }
        }
        // A further digit (or a leading zero followed by one), a fraction or
        // an exponent: not canonical, let serde decide.
        if v > 255 || matches!(s.get(i), Some(b'0'..=b'9' | b'.' | b'e' | b'E')) {
            return None;
        }
        out.push(v as u8);
        while i < n && ws(s[i]) {
            i += 1;
        }
        match s.get(i)? {
            b',' => i += 1,
            b']' => {
                i += 1;
                break;
            }
            _ => return None,
        }
    }
    // Sized for two characters per element; random image bytes take about
    // 3.6, and the bytes then wait in the ingest queue and the commit
    // batch: the unused half goes back (an in-place shrink).
    if out.capacity() - out.len() > out.len() / 4 + 16 {
        out.shrink_to_fit();
    }
    Some((out, i))
}

const LO7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
const HI: u64 = 0x8080_8080_8080_8080;
const ONES: u64 = 0x0101_0101_0101_0101;

/// One bit per byte of `hi` (bit k = the high bit of byte k).
#[inline]
fn movemask(hi: u64) -> u64 {
    (((hi >> 7) & ONES).wrapping_mul(0x0102_0408_1020_4080)) >> 56
}

/// Which of the 8 bytes of `w` are commas and which are digits, one bit each.
#[inline]
fn commas_and_digits(w: u64) -> (u64, u64) {
    let x = w ^ (ONES * u64::from(b','));
    // High bit set exactly where a byte of `x` is zero (no carries).
    let comma = !(((x & LO7) + LO7) | x | LO7);
    let t = w ^ (ONES * 0x30);
    // High bit set where a byte of `t` is not 0..=9.
    let non_digit = (((t & LO7) + ONES * 0x76) | t) & HI;
    (movemask(comma), movemask(!non_digit & HI))
}

/// Which of the 64 bytes of `b` are commas and which are digits, one bit
/// each (bit k = byte k).
#[inline]
fn block_masks(b: &[u8; 64]) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    {
        block_masks_sse2(b)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        block_masks_swar(b)
    }
}

/// [`block_masks`] eight bytes at a time in `u64`s (any target).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
#[inline]
fn block_masks_swar(b: &[u8; 64]) -> (u64, u64) {
    let (mut commas, mut digits) = (0u64, 0u64);
    for k in 0..8 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[8 * k..8 * k + 8]);
        let (c, d) = commas_and_digits(u64::from_le_bytes(w));
        commas |= c << (8 * k);
        digits |= d << (8 * k);
    }
    (commas, digits)
}

/// [`block_masks`] sixteen bytes at a time with SSE2, which every x86_64
/// CPU has: a compare and a movemask per mask instead of the SWAR words'
/// dozen operations (the mask computation was about a third of the scan).
#[cfg(target_arch = "x86_64")]
#[inline]
fn block_masks_sse2(b: &[u8; 64]) -> (u64, u64) {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi8, _mm_cmpeq_epi8, _mm_cmplt_epi8, _mm_loadu_si128, _mm_movemask_epi8,
        _mm_set1_epi8,
    };
    let (mut commas, mut digits) = (0u64, 0u64);
    // SAFETY: SSE2 is part of the x86_64 baseline; each load reads 16 bytes
    // inside `b` (unaligned loads are allowed).
    unsafe {
        let comma = _mm_set1_epi8(b',' as i8);
        // Digits '0'..='9' (0x30..=0x39) moved to -128..=-119, so one signed
        // compare finds them.
        let shift = _mm_set1_epi8((0x80u8.wrapping_sub(b'0')) as i8);
        let limit = _mm_set1_epi8((-128i8).wrapping_add(10));
        for k in 0..4 {
            let v = _mm_loadu_si128(b.as_ptr().add(16 * k) as *const __m128i);
            let c = _mm_movemask_epi8(_mm_cmpeq_epi8(v, comma)) as u16;
            let d = _mm_movemask_epi8(_mm_cmplt_epi8(_mm_add_epi8(v, shift), limit)) as u16;
            commas |= u64::from(c) << (16 * k);
            digits |= u64::from(d) << (16 * k);
        }
    }
    (commas, digits)
}

/// The elements of a compact byte array (`255,216,0,…`, from `start`), 64
/// bytes at a time: the block's commas and digits become bit masks, and each
/// element's value is read from the four bytes before its comma, so no
/// element waits for the previous one's length (a byte-at-a-time scan
/// mispredicts on the random digit counts and a word-at-a-time one is one
/// long dependency chain). Returns where the first element it did not take
/// starts: the array's last element, whitespace or anything else unusual is
/// left to the caller. If any element it took is not canonical JSON for
/// 0..=255 (empty, leading zero, over 255), it takes nothing.
///
/// A block's elements are decoded all at once with AVX2 where the CPU has
/// it (checked once, then cached by `std`) and with NEON on aarch64 (every
/// 64-bit Raspberry Pi), one at a time otherwise.
fn scan_compact(s: &[u8], start: usize, out: &mut Vec<u8>) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { scan_compact_avx2(s, start, out) };
    }
    #[cfg(target_arch = "aarch64")]
    {
        scan_blocks(s, start, out, decode_elements_neon)
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        scan_blocks(s, start, out, decode_elements)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_compact_avx2(s: &[u8], start: usize, out: &mut Vec<u8>) -> usize {
    // SAFETY (of the closure): the caller checked AVX2 (the decoder checks
    // its bounds itself).
    scan_blocks(s, start, out, |s, block, elem, commas, vals| unsafe {
        decode_elements_avx2(s, block, elem, commas, vals)
    })
}

/// The block walk shared by the element decoders (see [`scan_compact`]).
/// `decode(s, block, elem, commas, vals)` decodes the elements whose commas
/// are the bits of `commas` (never 0; bit k = the byte at `block + k`; the
/// element before the first comma starts at `elem`) into `vals`, and
/// returns how many and whether any was not canonical.
#[inline(always)]
fn scan_blocks(
    s: &[u8],
    start: usize,
    out: &mut Vec<u8>,
    decode: impl Fn(&[u8], usize, usize, u64, &mut [u8; 72]) -> (usize, bool),
) -> usize {
    // Each element is read from the four bytes before its comma; an array
    // that close to the start of the message (never a real chunk's) is
    // left to the caller.
    if start < 4 {
        return start;
    }
    let taken_before = out.len();
    let mut elem = start;
    let mut block = start;
    let mut bad = false;
    // At most one element per comma, 64 per block: collected here and
    // appended once per block (8 spare bytes for the eight-wide stores).
    let mut vals = [0u8; 72];
    while block + 64 <= s.len() {
        let mut b = [0u8; 64];
        b.copy_from_slice(&s[block..block + 64]);
        let (commas, digits) = block_masks(&b);
        // Only up to the first byte that is neither (usually the `]`).
        let clean = (!(commas | digits)).trailing_zeros();
        let m = if clean == 64 {
            commas
        } else {
            commas & ((1u64 << clean) - 1)
        };
        if m != 0 {
            let (k, b) = decode(s, block, elem, m, &mut vals);
            bad |= b;
            // All 72 bytes, then cut back to k: a fixed-size copy the
            // compiler inlines, where `&vals[..k]` was a memcpy call per
            // block (1 % of the machine in the 1,000-device wake).
            let len = out.len();
            out.extend_from_slice(&vals);
            out.truncate(len + k);
            // The next element starts after the block's last comma.
            elem = block + 64 - m.leading_zeros() as usize;
        }
        if clean < 64 {
            break;
        }
        block += 64;
    }
    if bad {
        out.truncate(taken_before);
        return start;
    }
    elem
}

/// One element at a time (any target).
#[cfg_attr(target_arch = "aarch64", allow(dead_code))]
fn decode_elements(
    s: &[u8],
    block: usize,
    mut elem: usize,
    mut m: u64,
    vals: &mut [u8; 72],
) -> (usize, bool) {
    let mut bad = false;
    let mut k = 0;
    while m != 0 {
        let comma = block + m.trailing_zeros() as usize;
        m &= m - 1;
        let len = comma - elem;
        let mut w = [0u8; 4];
        w.copy_from_slice(&s[comma - 4..comma]);
        let d = u32::from_le_bytes(w) ^ 0x3030_3030;
        // The element's digits are the top `len` bytes; the rest go.
        // (A length outside 1..=3 is flagged below, whatever `sh` is.)
        let sh = 8 * (4usize.wrapping_sub(len) & 3) as u32;
        let m = d & (u32::MAX << sh);
        let v = (m >> 24) + ((m >> 16) & 0xFF) * 10 + ((m >> 8) & 0xFF) * 100;
        // Its first digit is the lowest kept byte: 0 with more after it
        // is a leading zero.
        let lead_zero = (len > 1) & ((d >> sh) & 0xFF == 0);
        bad |= (len.wrapping_sub(1) > 2) | lead_zero | (v > 255);
        vals[k & 63] = v as u8;
        k += 1;
        elem = comma + 1;
    }
    (k, bad)
}

/// For [`decode_elements_avx2`]: byte `i` of entry `m` is the index of
/// the `i`-th set bit of `m` (0x80, which `pshufb` turns into 0, past the
/// last one), so one shuffle gathers the bytes an 8-bit mask selects.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
static COMPRESS: [[u8; 8]; 256] = {
    let mut t = [[0x80u8; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let (mut bit, mut n) = (0, 0);
        while bit < 8 {
            if m & (1 << bit) != 0 {
                t[m][n] = bit as u8;
                n += 1;
            }
            bit += 1;
        }
        m += 1;
    }
    t
};

/// All the elements of a block at once with AVX2, no loop over elements:
/// for every byte position q of the block, the vectors hold the four bytes
/// before it, so the value of the element a comma at q ends (its digits
/// are the byte before q and the up-to-two before that one) and whether it
/// is canonical are computed for all 64 positions with byte arithmetic;
/// then the values at the commas are packed together eight positions at a
/// time with one shuffle from [`COMPRESS`]. Same results as
/// [`decode_elements`] (proptest `vector_elements_match_scalar`).
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_elements_avx2(
    s: &[u8],
    block: usize,
    _elem: usize,
    m: u64,
    vals: &mut [u8; 72],
) -> (usize, bool) {
    use std::arch::x86_64::*;
    // The loads below read s[block - 4 .. block + 64] (`scan_blocks` never
    // asks for more; one compare per block keeps that out of the caller's
    // hands).
    assert!(block >= 4 && block + 64 <= s.len());
    let zero = _mm256_set1_epi8(b'0' as i8);
    let nine = _mm256_set1_epi8(9);
    let (two, k3, five, six) = (
        _mm256_set1_epi8(2),
        _mm256_set1_epi8(3),
        _mm256_set1_epi8(5),
        _mm256_set1_epi8(6),
    );
    let nul = _mm256_setzero_si256();
    // Byte minus '0', and where that is a digit (0..=9, unsigned).
    let digit = |p: *const u8| {
        let d = _mm256_sub_epi8(_mm256_loadu_si256(p as *const __m256i), zero);
        (d, _mm256_cmpeq_epi8(_mm256_min_epu8(d, nine), d))
    };
    // x >= k, unsigned bytes.
    let at_least = |x, k| _mm256_cmpeq_epi8(_mm256_max_epu8(x, k), x);
    let mut value = [0u8; 64];
    let mut bad_at = 0u64;
    for half in 0..2 {
        let q = s.as_ptr().add(block + 32 * half);
        // d1: the element's last digit (the byte before the comma), d2 the
        // one before, d3 the one before that; the fourth byte back must
        // not be a digit.
        let (d1, is1) = digit(q.sub(1));
        let (d2, is2) = digit(q.sub(2));
        let (d3, is3) = digit(q.sub(3));
        let (_, is4) = digit(q.sub(4));
        let two_plus = _mm256_and_si256(is1, is2);
        let three_plus = _mm256_and_si256(two_plus, is3);
        let three = _mm256_andnot_si256(is4, three_plus); // exactly three
        let two_only = _mm256_andnot_si256(is3, two_plus);
        // Wrapping byte arithmetic (AVX2 has no byte multiply: 10·x = 8x +
        // 2x, 100·y = 64y + 32y + 4y by doublings): right whenever the
        // value is ≤ 255, and a value over 255 is flagged below anyway.
        let x2 = _mm256_add_epi8(d2, d2);
        let x8 = _mm256_add_epi8(_mm256_add_epi8(x2, x2), _mm256_add_epi8(x2, x2));
        let tens = _mm256_and_si256(two_plus, _mm256_add_epi8(x8, x2));
        let y4 = _mm256_add_epi8(_mm256_add_epi8(d3, d3), _mm256_add_epi8(d3, d3));
        let y32 = _mm256_add_epi8(
            _mm256_add_epi8(_mm256_add_epi8(y4, y4), _mm256_add_epi8(y4, y4)),
            _mm256_add_epi8(_mm256_add_epi8(y4, y4), _mm256_add_epi8(y4, y4)),
        );
        let hundreds = _mm256_and_si256(
            three_plus,
            _mm256_add_epi8(_mm256_add_epi8(y32, y32), _mm256_add_epi8(y32, y4)),
        );
        let v = _mm256_add_epi8(d1, _mm256_add_epi8(tens, hundreds));
        _mm256_storeu_si256(value.as_mut_ptr().add(32 * half) as *mut __m256i, v);
        // Not canonical: no digit, four or more, a leading zero, over 255
        // (three digits: 3xx.., 26x, 256..259).
        let over = _mm256_and_si256(
            three,
            _mm256_or_si256(
                at_least(d3, k3),
                _mm256_and_si256(
                    _mm256_cmpeq_epi8(d3, two),
                    _mm256_or_si256(
                        at_least(d2, six),
                        _mm256_and_si256(_mm256_cmpeq_epi8(d2, five), at_least(d1, six)),
                    ),
                ),
            ),
        );
        let lead_zero = _mm256_or_si256(
            _mm256_and_si256(two_only, _mm256_cmpeq_epi8(d2, nul)),
            _mm256_and_si256(three, _mm256_cmpeq_epi8(d3, nul)),
        );
        let bad = _mm256_or_si256(
            _mm256_or_si256(_mm256_andnot_si256(is1, _mm256_set1_epi8(-1)), over),
            _mm256_or_si256(lead_zero, _mm256_and_si256(three_plus, is4)),
        );
        bad_at |= u64::from(_mm256_movemask_epi8(bad) as u32) << (32 * half);
    }
    // The values at the commas, in order.
    let mut k = 0;
    for g in 0..8 {
        let sel = (m >> (8 * g)) as u8;
        let mut eight = [0u8; 8];
        eight.copy_from_slice(&value[8 * g..8 * g + 8]);
        let packed = _mm_shuffle_epi8(
            _mm_cvtsi64_si128(i64::from_le_bytes(eight)),
            _mm_cvtsi64_si128(i64::from_le_bytes(COMPRESS[usize::from(sel)])),
        );
        vals.as_mut_ptr()
            .add(k)
            .cast::<[u8; 8]>()
            .write_unaligned((_mm_cvtsi128_si64(packed) as u64).to_le_bytes());
        k += sel.count_ones() as usize;
    }
    (k, bad_at & m != 0)
}

/// [`decode_elements_avx2`] with NEON, sixteen positions at a time (NEON
/// has byte multiplies and an 8-byte table lookup, `vtbl1_u8`, for the
/// packing). Same results as [`decode_elements`] (proptest
/// `vector_elements_match_scalar`, run under qemu by `.ci/aarch64`).
#[cfg(target_arch = "aarch64")]
fn decode_elements_neon(
    s: &[u8],
    block: usize,
    _elem: usize,
    m: u64,
    vals: &mut [u8; 72],
) -> (usize, bool) {
    use std::arch::aarch64::*;
    // The loads below read s[block - 4 .. block + 64].
    assert!(block >= 4 && block + 64 <= s.len());
    let mut value = [0u8; 64];
    let mut bad_at = 0u64;
    let mut k = 0;
    // SAFETY: NEON is part of the aarch64 baseline; every load is inside
    // `s` (asserted above) and every store inside `value` or `vals`
    // (`k` + 8 ≤ 72).
    unsafe {
        let zero = vdupq_n_u8(b'0');
        let nine = vdupq_n_u8(9);
        let bit = vld1q_u8([1u8, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128].as_ptr());
        let digit = |p: *const u8| {
            let d = vsubq_u8(vld1q_u8(p), zero);
            (d, vcleq_u8(d, nine))
        };
        for quarter in 0..4 {
            let q = s.as_ptr().add(block + 16 * quarter);
            let (d1, is1) = digit(q.sub(1));
            let (d2, is2) = digit(q.sub(2));
            let (d3, is3) = digit(q.sub(3));
            let (_, is4) = digit(q.sub(4));
            let two_plus = vandq_u8(is1, is2);
            let three_plus = vandq_u8(two_plus, is3);
            let three = vbicq_u8(three_plus, is4); // exactly three
            let two_only = vbicq_u8(two_plus, is3);
            let tens = vandq_u8(two_plus, vmulq_u8(d2, vdupq_n_u8(10)));
            let hundreds = vandq_u8(three_plus, vmulq_u8(d3, vdupq_n_u8(100)));
            let v = vaddq_u8(d1, vaddq_u8(tens, hundreds));
            vst1q_u8(value.as_mut_ptr().add(16 * quarter), v);
            let over = vandq_u8(
                three,
                vorrq_u8(
                    vcgeq_u8(d3, vdupq_n_u8(3)),
                    vandq_u8(
                        vceqq_u8(d3, vdupq_n_u8(2)),
                        vorrq_u8(
                            vcgeq_u8(d2, vdupq_n_u8(6)),
                            vandq_u8(vceqq_u8(d2, vdupq_n_u8(5)), vcgeq_u8(d1, vdupq_n_u8(6))),
                        ),
                    ),
                ),
            );
            let lead_zero = vorrq_u8(
                vandq_u8(two_only, vceqzq_u8(d2)),
                vandq_u8(three, vceqzq_u8(d3)),
            );
            let bad = vorrq_u8(
                vorrq_u8(vmvnq_u8(is1), over),
                vorrq_u8(lead_zero, vandq_u8(three_plus, is4)),
            );
            // One bit per byte (NEON has no movemask).
            let bits = vandq_u8(bad, bit);
            let mask = u64::from(vaddv_u8(vget_low_u8(bits)))
                | u64::from(vaddv_u8(vget_high_u8(bits))) << 8;
            bad_at |= mask << (16 * quarter);
        }
        for g in 0..8 {
            let sel = (m >> (8 * g)) as u8;
            let packed = vtbl1_u8(
                vld1_u8(value.as_ptr().add(8 * g)),
                vld1_u8(COMPRESS[usize::from(sel)].as_ptr()),
            );
            vst1_u8(vals.as_mut_ptr().add(k), packed);
            k += sel.count_ones() as usize;
        }
    }
    (k, bad_at & m != 0)
}

fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = s.trim();
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        if let Ok(v) = engine.decode(s) {
            return Ok(v);
        }
    }
    Err(format!(
        "invalid base64 payload ({} characters)",
        s.chars().count()
    ))
}

/// Every field that may appear on the data topic; METADATA and CHUNK share it.
/// Strings are borrowed from the message when they have no escapes, and the
/// payload is kept raw for [`decode_payload`]: a chunk costs no allocation
/// but its decoded bytes.
#[derive(Debug, Deserialize)]
struct RawData<'a> {
    #[serde(borrow)]
    device_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    image_name: Option<Cow<'a, str>>,
    capture_timestamp: Option<String>,
    image_size: Option<i64>,
    max_chunk_size: Option<i64>,
    total_chunks_count: Option<i64>,
    location: Option<String>,
    error: Option<i64>,
    temperature: Option<f64>,
    humidity: Option<f64>,
    pressure: Option<f64>,
    gas_resistance: Option<f64>,
    chunk_id: Option<i64>,
    #[serde(borrow)]
    payload: Option<&'a serde_json::value::RawValue>,
    battery: Option<f64>,
    sha256: Option<String>,
}

/// METADATA: announces an image and carries the sensor readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub device_id: String,
    pub image_name: String,
    /// As sent (kept verbatim); see [`Metadata::captured_at`].
    pub capture_timestamp: String,
    pub image_size: u32,
    pub max_chunk_size: u32,
    /// Chunks in the image: `ceil(image_size / max_chunk_size)`.
    pub total_chunks_count: u32,
    /// The device's `total_chunks_count` when it disagreed with the above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced_chunks: Option<u32>,
    pub error: i64,
    pub location: Option<String>,
    pub temperature: Option<f64>,
    pub humidity: Option<f64>,
    pub pressure: Option<f64>,
    pub gas_resistance: Option<f64>,
    pub battery: Option<f64>,
    /// Optional hex SHA-256 of the whole image, verified after assembly.
    pub sha256: Option<String>,
}

impl Metadata {
    /// The device-reported capture time, when it parses as ISO 8601.
    pub fn captured_at(&self) -> Option<DateTime<Utc>> {
        parse_timestamp(&self.capture_timestamp)
    }
}

pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    // Firmware without a zone designator: treat as UTC.
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S")
        .ok()
        .map(|n| n.and_utc())
}

/// CHUNK: one slice of an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    // The firmware's `device_id` field is checked (a string, when present)
    // and not kept: the topic names the device, and an owned copy was an
    // allocation per chunk on the front's threads for nothing.
    pub image_name: String,
    /// As sent: 1-based (firmware) or 0-based (v1).
    pub chunk_id: u32,
    pub max_chunk_size: Option<u32>,
    pub payload: Vec<u8>,
}

impl Chunk {
    /// A chunk from its fields, validated (the same checks whichever way
    /// the fields were read).
    fn checked(
        image_name: &str,
        chunk_id: i64,
        max_chunk_size: Option<i64>,
        payload: Vec<u8>,
    ) -> Result<DataMessage, ProtocolError> {
        check_image_name(image_name)?;
        let chunk_id = to_u32(chunk_id, "chunk_id")?;
        let max_chunk_size = match max_chunk_size {
            Some(v) => Some(to_u32(v, "max_chunk_size")?),
            None => None,
        };
        if payload.len() > MAX_CHUNK_SIZE as usize {
            return Err(invalid(
                "payload",
                format!("{} bytes exceeds {MAX_CHUNK_SIZE}", payload.len()),
            ));
        }
        Ok(DataMessage::Chunk(Chunk {
            image_name: image_name.to_string(),
            chunk_id,
            max_chunk_size,
            payload,
        }))
    }
}

/// A message on the `…/data` topic.
#[derive(Debug, Clone, PartialEq)]
pub enum DataMessage {
    Metadata(Box<Metadata>),
    Chunk(Chunk),
}

fn req<T>(v: Option<T>, field: &'static str) -> Result<T, ProtocolError> {
    v.ok_or(ProtocolError::MissingField(field))
}

fn to_u32(v: i64, field: &'static str) -> Result<u32, ProtocolError> {
    u32::try_from(v).map_err(|_| invalid(field, format!("{v} is out of range")))
}

fn check_image_name(name: &str) -> Result<(), ProtocolError> {
    if name.is_empty() {
        return Err(invalid("image_name", "empty"));
    }
    if name.len() > MAX_IMAGE_NAME {
        return Err(invalid(
            "image_name",
            format!("longer than {MAX_IMAGE_NAME} bytes"),
        ));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(invalid(
            "image_name",
            format!(
                "{:?} contains a path separator or control character",
                truncate(name, 40)
            ),
        ));
    }
    Ok(())
}

/// For a data payload that did not parse: `Some(..)` when it is recognisably
/// a METADATA (a JSON object with METADATA fields and no chunk fields), with
/// its image name when that is usable; `None` for anything else (a chunk, or
/// bytes no device would send as METADATA), which is not answered.
pub fn metadata_image_name(payload: &[u8]) -> Option<Option<String>> {
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(payload).ok()?;
    if v.contains_key("chunk_id") || v.contains_key("payload") {
        return None;
    }
    let metadata_like = [
        "image_size",
        "total_chunks_count",
        "max_chunk_size",
        "capture_timestamp",
    ]
    .iter()
    .any(|k| v.contains_key(*k));
    if !metadata_like {
        return None;
    }
    Some(
        v.get("image_name")
            .and_then(|n| n.as_str())
            .filter(|n| check_image_name(n).is_ok())
            .map(str::to_string),
    )
}

impl DataMessage {
    /// Parses and validates a data-topic payload. `max_image_size` bounds
    /// `image_size`.
    pub fn parse(payload: &[u8], max_image_size: u32) -> Result<DataMessage, ProtocolError> {
        Self::parse_with(payload, max_image_size, true)
    }

    /// `envelope`: false only in tests, to compare with serde alone.
    fn parse_with(
        payload: &[u8],
        max_image_size: u32,
        envelope: bool,
    ) -> Result<DataMessage, ProtocolError> {
        let (rest, decoded) = match split_payload(payload) {
            Some(Split {
                bytes,
                envelope: Some(e),
                ..
            }) if envelope => {
                return Chunk::checked(e.image_name, e.chunk_id, e.max_chunk_size, bytes);
            }
            Some(sp) => (Some(sp.rest()), Some(sp.bytes)),
            None => (None, None),
        };
        let raw: RawData = serde_json::from_slice(rest.as_deref().unwrap_or(payload))
            .map_err(|e| ProtocolError::Json(e.to_string()))?;
        if raw.chunk_id.is_some() || raw.payload.is_some() {
            // Checked in this order (as ever) before the payload is decoded.
            let image_name = req(raw.image_name, "image_name")?;
            check_image_name(&image_name)?;
            let chunk_id = req(raw.chunk_id, "chunk_id")?;
            to_u32(chunk_id, "chunk_id")?;
            let raw_payload = req(raw.payload, "payload")?;
            let payload = match decoded {
                Some(bytes) => bytes,
                None => decode_payload(raw_payload)?,
            };
            return Chunk::checked(&image_name, chunk_id, raw.max_chunk_size, payload);
        }
        if raw.total_chunks_count.is_none() && raw.image_size.is_none() {
            return Err(ProtocolError::UnknownDataMessage);
        }
        let device_id = req(raw.device_id, "device_id")?.into_owned();
        let image_name = req(raw.image_name, "image_name")?.into_owned();
        check_image_name(&image_name)?;
        let capture_timestamp = req(raw.capture_timestamp, "capture_timestamp")?;
        let image_size = to_u32(req(raw.image_size, "image_size")?, "image_size")?;
        let max_chunk_size = to_u32(req(raw.max_chunk_size, "max_chunk_size")?, "max_chunk_size")?;
        let total = to_u32(
            req(raw.total_chunks_count, "total_chunks_count")?,
            "total_chunks_count",
        )?;
        let error = req(raw.error, "error")?;
        if image_size > max_image_size {
            return Err(invalid(
                "image_size",
                format!("{image_size} bytes exceeds the limit of {max_image_size}"),
            ));
        }
        if max_chunk_size == 0 || max_chunk_size > MAX_CHUNK_SIZE {
            return Err(invalid(
                "max_chunk_size",
                format!("{max_chunk_size} is outside 1..={MAX_CHUNK_SIZE}"),
            ));
        }
        // The chunk count is the one under which both the announced size and
        // the announced chunk size hold; a `total_chunks_count` that says
        // otherwise is kept as `announced_chunks` and the engine reports it.
        // `image_size` 0 (a camera failure) means no chunks.
        let expected = image_size.div_ceil(max_chunk_size);
        let announced_chunks = (total != expected).then_some(total);
        Ok(DataMessage::Metadata(Box::new(Metadata {
            device_id,
            image_name,
            capture_timestamp,
            image_size,
            max_chunk_size,
            total_chunks_count: expected,
            announced_chunks,
            error,
            location: raw.location,
            temperature: raw.temperature,
            humidity: raw.humidity,
            pressure: raw.pressure,
            gas_resistance: raw.gas_resistance,
            battery: raw.battery,
            sha256: raw.sha256,
        })))
    }
}

/// A message the gateway sends to a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    CaptureImage,
    SendImage {
        image_name: String,
    },
    NextWake {
        at: DateTime<Utc>,
    },
    MissingChunks {
        image_name: String,
        chunk_ids: Vec<u32>,
    },
    AckOk {
        image_name: String,
        next_wake: DateTime<Utc>,
    },
}

#[derive(Serialize)]
struct AckOkFirmware<'a> {
    device_id: &'a str,
    image_name: &'a str,
    #[serde(rename = "ACK_OK")]
    ack_ok: NextWakeTime,
}

#[derive(Serialize)]
struct NextWakeTime {
    next_wake_time: String,
}

#[derive(Serialize)]
struct AckOkV1<'a> {
    device_id: &'a str,
    image_name: &'a str,
    #[serde(rename = "ACK_OK")]
    ack_ok: bool,
    next_wake_time: String,
}

#[derive(Serialize)]
struct CaptureImageMsg<'a> {
    device_id: &'a str,
    capture_image: bool,
}

#[derive(Serialize)]
struct SendImageMsg<'a> {
    device_id: &'a str,
    send_image: &'a str,
}

#[derive(Serialize)]
struct NextWakeMsg<'a> {
    device_id: &'a str,
    next_wake: String,
}

#[derive(Serialize)]
struct MissingChunksMsg<'a> {
    device_id: &'a str,
    image_name: &'a str,
    missing_chunks: &'a [u32],
}

/// Formats a wake time for the dialect: `5:30PM` in the site's zone, or
/// ISO-8601 UTC.
pub fn format_wake(dialect: Dialect, at: DateTime<Utc>, tz: Tz) -> String {
    match dialect {
        Dialect::Firmware => at.with_timezone(&tz).format("%-I:%M%p").to_string(),
        Dialect::V1 => at.to_rfc3339_opts(SecondsFormat::Secs, true),
    }
}

impl Outbound {
    pub fn kind(&self) -> &'static str {
        match self {
            Outbound::CaptureImage => "capture_image",
            Outbound::SendImage { .. } => "send_image",
            Outbound::NextWake { .. } => "next_wake",
            Outbound::MissingChunks { .. } => "missing_chunks",
            Outbound::AckOk { .. } => "ack_ok",
        }
    }

    pub fn channel(&self, dialect: Dialect) -> Channel {
        match (self, dialect) {
            (Outbound::AckOk { .. }, _) => Channel::Ack,
            (Outbound::MissingChunks { .. }, Dialect::V1) => Channel::Ack,
            _ => Channel::Cmd,
        }
    }

    /// Renders `(topic, payload)` for a device that uses `wire_id` in its topics.
    pub fn render(&self, dialect: Dialect, wire_id: &str, tz: Tz) -> (String, Vec<u8>) {
        let device_id = wire_id;
        let json = match self {
            Outbound::CaptureImage => serde_json::to_vec(&CaptureImageMsg {
                device_id,
                capture_image: true,
            }),
            Outbound::SendImage { image_name } => serde_json::to_vec(&SendImageMsg {
                device_id,
                send_image: image_name,
            }),
            Outbound::NextWake { at } => serde_json::to_vec(&NextWakeMsg {
                device_id,
                next_wake: format_wake(dialect, *at, tz),
            }),
            Outbound::MissingChunks {
                image_name,
                chunk_ids,
            } => serde_json::to_vec(&MissingChunksMsg {
                device_id,
                image_name,
                missing_chunks: chunk_ids,
            }),
            Outbound::AckOk {
                image_name,
                next_wake,
            } => match dialect {
                Dialect::Firmware => serde_json::to_vec(&AckOkFirmware {
                    device_id,
                    image_name,
                    ack_ok: NextWakeTime {
                        next_wake_time: format_wake(dialect, *next_wake, tz),
                    },
                }),
                Dialect::V1 => serde_json::to_vec(&AckOkV1 {
                    device_id,
                    image_name,
                    ack_ok: true,
                    next_wake_time: format_wake(dialect, *next_wake, tz),
                }),
            },
        }
        .unwrap_or_default();
        (topic(dialect, wire_id, self.channel(dialect)), json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
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
}
