//! Device ids: the one normaliser for MACs written by devices, admins and
//! certificates (GATEWAY.md §8, "Well-formed device ids").
//!
//! Accepted: 12 hex digits (`B8F862F9CFB8`), or six hex pairs joined by a
//! single `:` or a single `-`, the same separator throughout
//! (`b8:f8:62:f9:cf:b8`, `B8-F8-62-F9-CF-B8`), in any case. The device id is
//! the 12 digits in upper case. Nothing else is a device id: no whitespace,
//! no mixed separators, no other names.

/// Longest part of a rejected input an error repeats.
const SHOWN: usize = 40;

/// An input that is not a device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a device id: {reason}")]
pub struct InvalidDeviceId {
    /// The input as given (its first 40 bytes when longer, then `…`).
    pub input: String,
    pub reason: &'static str,
}

/// Normalises a device id to 12 upper-case hex digits; see the module docs
/// for what it accepts.
pub fn normalize(s: &str) -> Result<String, InvalidDeviceId> {
    let b = s.as_bytes();
    let err = |reason| InvalidDeviceId {
        input: shown(s),
        reason,
    };
    // Collected on the stack: every device message's topic is normalised.
    let mut out = [0u8; 12];
    match b.len() {
        12 => out.copy_from_slice(b),
        17 => {
            let sep = b[2];
            if sep != b':' && sep != b'-' {
                return Err(err("the pairs must be joined by ':' or '-'"));
            }
            for i in 0..6 {
                if i < 5 && b[3 * i + 2] != sep {
                    return Err(err("the pairs must be joined by one kind of separator"));
                }
                out[2 * i] = b[3 * i];
                out[2 * i + 1] = b[3 * i + 1];
            }
        }
        _ => {
            return Err(err(
                "expected 12 hex digits, or six hex pairs joined by ':' or '-'",
            ))
        }
    }
    if !out.iter().all(u8::is_ascii_hexdigit) {
        return Err(err("contains a character that is not a hex digit"));
    }
    out.make_ascii_uppercase();
    // All ASCII hex digits.
    Ok(out.iter().map(|&c| c as char).collect())
}

fn shown(s: &str) -> String {
    if s.len() <= SHOWN {
        return s.to_string();
    }
    let mut end = SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_three_spellings_in_any_case() {
        for s in [
            "B8F862F9CFB8",
            "b8f862f9cfb8",
            "b8F862f9CfB8",
            "B8:F8:62:F9:CF:B8",
            "b8:f8:62:f9:cf:b8",
            "B8-F8-62-F9-CF-B8",
            "b8-f8-62-f9-cf-b8",
        ] {
            assert_eq!(normalize(s).unwrap(), "B8F862F9CFB8", "{s:?}");
        }
    }

    #[test]
    fn ill_formed_device_ids_are_rejected_and_named() {
        for bad in [
            "",
            "B8F862F9CF",
            "B8F862F9CFB",
            "B8F862F9CFB8A",
            "ZZF862F9CFB8",
            " B8F862F9CFB8",
            "B8F862F9CFB8\n",
            "B8:F8:62:F9:CF-B8",
            "b8:f8-62f9cfb8",
            "B8:F8:62F9CFB8",
            "B8F8:62F9:CFB8",
            "B8.F8.62.F9.CF.B8",
            "B8::F8:62:F9:CFB8",
            "B8 F8 62 F9 CF B8",
            ":::::::::::::::::",
            "B8F862F9CFBé",
            "esp32-cam-01",
            "+",
            "#",
            "a/b",
        ] {
            let e = normalize(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        let long = "A".repeat(1000);
        assert!(normalize(&long).unwrap_err().to_string().len() < 200);
    }

    /// The rule written the other way round: one whole-string shape per
    /// accepted spelling.
    fn oracle(s: &str) -> Option<String> {
        let hex = |p: &str| p.bytes().all(|c| c.is_ascii_hexdigit());
        if s.len() == 12 && hex(s) {
            return Some(s.to_ascii_uppercase());
        }
        for sep in [':', '-'] {
            let parts: Vec<&str> = s.split(sep).collect();
            if parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && hex(p)) {
                return Some(parts.concat().to_ascii_uppercase());
            }
        }
        None
    }

    /// A MAC spelt one of the accepted ways, each digit in a random case.
    fn spelling() -> impl Strategy<Value = ([u8; 6], String)> {
        (
            any::<[u8; 6]>(),
            prop_oneof![Just(""), Just(":"), Just("-")],
            any::<[bool; 12]>(),
        )
            .prop_map(|(mac, sep, lower)| {
                let pairs: Vec<String> = mac
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        format!("{b:02X}")
                            .chars()
                            .zip(&lower[2 * i..2 * i + 2])
                            .map(|(c, l)| if *l { c.to_ascii_lowercase() } else { c })
                            .collect()
                    })
                    .collect();
                (mac, pairs.join(sep))
            })
    }

    proptest! {
        #[test]
        fn every_accepted_spelling_gives_the_same_id((mac, s) in spelling()) {
            prop_assert_eq!(normalize(&s).unwrap(), hex::encode_upper(mac));
        }

        /// Near misses: an accepted spelling with one byte changed, added
        /// or removed.
        #[test]
        fn a_spelling_changed_by_one_byte_follows_the_rule(
            (_, s) in spelling(),
            at in any::<prop::sample::Index>(),
            with in prop::sample::select(vec![b':', b'-', b' ', b'.', b'g', b'0', b'a', b'F', b'/', b'\n']),
            edit in 0..3u8,
        ) {
            let mut b = s.into_bytes();
            let i = at.index(b.len());
            match edit {
                0 => b[i] = with,
                1 => b.insert(i, with),
                _ => { b.remove(i); }
            }
            let t = String::from_utf8(b).unwrap();
            prop_assert_eq!(normalize(&t).ok(), oracle(&t), "{:?}", t);
        }

        #[test]
        fn any_string_follows_the_rule(s in "[0-9a-fA-FgG:\\- ]{0,20}") {
            prop_assert_eq!(normalize(&s).ok(), oracle(&s));
        }
    }
}
