//! Device identities and certificate serials: the forms they are written in
//! and what a peer certificate proves.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::error::PkiError;
use super::x509::x509_time;

/// Normalises a MAC address to the device id form (12 upper-case hex
/// digits): [`crate::ident::normalize`], with its error as a [`PkiError`].
pub fn normalize_mac(s: &str) -> Result<String, PkiError> {
    crate::ident::normalize(s).map_err(|e| PkiError::InvalidMac {
        input: e.input,
        reason: e.reason,
    })
}

/// Normalises a certificate serial number to lower-case hex without leading
/// zeros (an even number of digits, so it is the hex of the minimal big-endian
/// bytes). Accepts upper case, a `0x` prefix and `:` separators.
pub fn normalize_serial(s: &str) -> Result<String, PkiError> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let digits: String = t.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PkiError::InvalidSerial(s.to_string()));
    }
    let trimmed = digits.trim_start_matches('0').to_ascii_lowercase();
    Ok(match trimmed.len() {
        0 => "00".to_string(),
        n if n % 2 == 1 => format!("0{trimmed}"),
        _ => trimmed,
    })
}

pub(super) fn serial_hex_from_bytes(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    if start == bytes.len() {
        return "00".to_string();
    }
    hex::encode(&bytes[start..])
}

/// The identity a TLS peer proved with its client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Device id (normalised MAC) from the subject CN.
    pub mac: String,
    /// Serial number, as [`normalize_serial`] writes it.
    pub serial_hex: String,
    pub not_after: DateTime<Utc>,
}

/// Extracts the device identity from a (DER) device certificate. Does not
/// verify anything: use it on a certificate rustls already verified.
pub fn peer_identity(cert_der: &[u8]) -> Result<PeerIdentity, PkiError> {
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| PkiError::Certificate(format!("cannot parse certificate: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| PkiError::Certificate("certificate has no subject CN".into()))?
        .as_str()
        .map_err(|e| PkiError::Certificate(format!("subject CN is not a string: {e}")))?;
    let mac = normalize_mac(cn)?;
    Ok(PeerIdentity {
        mac,
        serial_hex: serial_hex_from_bytes(cert.raw_serial()),
        not_after: x509_time(cert.validity().not_after.timestamp())?,
    })
}

/// SHA-256 fingerprint of a DER certificate, as `AB:CD:…`.
pub fn sha256_fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_mac_accepts_common_forms() {
        for s in [
            "B8F862F9CFB8",
            "b8f862f9cfb8",
            "b8:f8:62:f9:cf:b8",
            "B8-F8-62-F9-CF-B8",
        ] {
            assert_eq!(normalize_mac(s).unwrap(), "B8F862F9CFB8", "{s:?}");
        }
    }

    #[test]
    fn normalize_mac_rejects_everything_else() {
        for s in [
            "",
            "B8F862F9CFB",
            "B8F862F9CFB8A",
            "B8F862F9CFBG",
            "B8:F8-62:F9:CF:B8",
            "B8.F8.62.F9.CF.B8",
            "B8:F8:62:F9:CFB8:",
            "B8F8:62F9:CFB8",
            "B8 F8 62 F9 CF B8",
            "ESP32CAM/B8F862F9CFB8",
            "B8F862F9CFé",
            " B8:F8:62:F9:CF:B8\n",
        ] {
            let err = normalize_mac(s).unwrap_err();
            assert!(matches!(err, PkiError::InvalidMac { .. }), "{s:?}");
            assert!(err.to_string().contains("invalid MAC address"), "{err}");
        }
    }

    #[test]
    fn normalize_serial_forms() {
        assert_eq!(normalize_serial("4A:0B:FF").unwrap(), "4a0bff");
        assert_eq!(normalize_serial("0x004a0bff").unwrap(), "4a0bff");
        assert_eq!(normalize_serial("a0bff").unwrap(), "0a0bff");
        assert_eq!(normalize_serial("0").unwrap(), "00");
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("").is_err());
        assert_eq!(serial_hex_from_bytes(&[0, 0x0a, 0x0b]), "0a0b");
    }
}
