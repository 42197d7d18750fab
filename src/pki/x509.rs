//! Building blocks of the certificates the site PKI creates: names,
//! serials and validity times.

use chrono::{DateTime, Duration, Utc};
use rcgen::{DistinguishedName, DnType, DnValue, SerialNumber};
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};

use super::error::PkiError;

/// Subject O of every certificate the site PKI creates.
pub const ORGANIZATION: &str = "barngate";

/// How far `not_before` is moved into the past, so that a gateway or device
/// whose clock is somewhat behind (a Pi without RTC) still accepts new certs.
pub(super) const BACKDATE: Duration = Duration::days(1);

pub(super) fn x509_time(ts: i64) -> Result<DateTime<Utc>, PkiError> {
    DateTime::from_timestamp(ts, 0)
        .ok_or_else(|| PkiError::Certificate(format!("validity time {ts} out of range")))
}

/// Certificates hold whole seconds; so do the times the site PKI reports.
pub(super) fn whole_seconds(dt: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(dt.timestamp(), 0).unwrap_or(dt)
}

pub(super) fn to_offset(dt: DateTime<Utc>) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp(dt.timestamp())
        .map_err(|e| PkiError::InvalidValidity(format!("{dt}: {e}")))
}

pub(super) fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Rebuilds an rcgen name from a parsed one (string types preserved).
pub(super) fn dn_from_x509(name: &X509Name<'_>) -> Result<DistinguishedName, PkiError> {
    let bad = |what: &str| PkiError::Certificate(format!("CA subject: {what}"));
    let mut dn = DistinguishedName::new();
    for attr in name.iter_attributes() {
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| bad("attribute OID too large"))?
            .collect();
        let data = attr.attr_value().data;
        let text = std::str::from_utf8(data).map_err(|_| bad("attribute is not text"))?;
        let value = match attr.attr_value().header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_string()),
            Tag::PrintableString => DnValue::PrintableString(text.try_into()?),
            Tag::Ia5String => DnValue::Ia5String(text.try_into()?),
            _ => return Err(bad("unsupported attribute string type")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

pub(super) fn cert_subject_raw(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, x509) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::Certificate(format!("cannot parse certificate: {e}")))?;
    Ok(x509.subject().as_raw().to_vec())
}

pub(super) fn cert_issuer_raw(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, x509) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::Certificate(format!("cannot parse certificate: {e}")))?;
    Ok(x509.issuer().as_raw().to_vec())
}

pub(super) fn fill_random(buf: &mut [u8]) -> Result<(), PkiError> {
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(buf)
        .map_err(|_| PkiError::Random)
}

/// A random positive serial of 16 bytes (126 random bits) whose first byte is
/// never zero, so its hex form has no leading zeros.
pub(super) fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    fill_random(&mut bytes)?;
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}
