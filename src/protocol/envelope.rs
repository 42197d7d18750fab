//! A chunk message read without serde: its payload split off (a byte
//! array or base64) and its other fields read in the same walk.

use super::error::ProtocolError;
use super::scan::{decode_base64, is_ws, scan_byte_array};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;

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
pub(crate) fn decode_payload(raw: &serde_json::value::RawValue) -> Result<Vec<u8>, ProtocolError> {
    serde_json::from_str::<Payload>(raw.get())
        .map(|p| p.0)
        .map_err(|e| ProtocolError::Json(format!("payload: {e}")))
}

pub(crate) fn skip_ws(s: &[u8], mut i: usize) -> usize {
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
pub(crate) fn split_payload(s: &[u8]) -> Option<Split<'_>> {
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
pub(crate) struct Split<'a> {
    /// The decoded payload array.
    pub(crate) bytes: Vec<u8>,
    pub(crate) text: &'a [u8],
    /// Where the array is in `text`.
    pub(crate) array: (usize, usize),
    /// The other fields, when they are a plain chunk's (see [`Envelope`]).
    pub(crate) envelope: Option<ChunkEnvelope<'a>>,
}

impl Split<'_> {
    /// The message with the payload replaced by `[]`, for serde.
    pub(crate) fn rest(&self) -> Vec<u8> {
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
pub(crate) struct ChunkEnvelope<'a> {
    pub(crate) image_name: &'a str,
    pub(crate) chunk_id: i64,
    pub(crate) max_chunk_size: Option<i64>,
}

/// The fields of a top-level object as [`split_payload`] walks it. Only
/// what serde would read the same way is taken: each of `device_id`,
/// `image_name` (strings without escapes or control characters),
/// `chunk_id`, `max_chunk_size` (plain non-negative integers) at most once,
/// and no other key. Anything else — another key, `null`, a repeated key, a
/// number serde might read otherwise — leaves the message to serde (the
/// envelope of a ~2 KB chunk took serde about a quarter of the parse).
#[derive(Default)]
pub(crate) struct Envelope<'a> {
    pub(crate) device_id: Option<&'a str>,
    pub(crate) image_name: Option<&'a str>,
    pub(crate) chunk_id: Option<i64>,
    pub(crate) max_chunk_size: Option<i64>,
    pub(crate) other: bool,
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
pub(crate) fn skip_string(s: &[u8], mut i: usize) -> Option<usize> {
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
