//! Who a connection is, and the CONNECT policy: the device identity from a
//! client certificate, a password login or (plaintext) the client id; the
//! CONNECT checked against it.

use super::frame::{parse, CONNECT};
use super::topics::check_publish_topic;
use super::violation::{truncate, Violation, CONNACK_BAD_CREDENTIALS, CONNACK_NOT_AUTHORIZED};
use super::Front;
use crate::devpass;
use crate::protocol::normalize_device_id;
use bytes::BytesMut;
use rumqttd::protocol::{LastWill, Login, Packet};

/// A device's CONNECT, checked.
pub(super) struct Connect {
    /// The device id (normalised MAC).
    pub(super) device: String,
    /// The device's keep-alive, seconds.
    pub(super) keep_alive: u16,
    /// The CONNECT for the broker: the device's, without its login (the
    /// front has checked it). The front enforces the keep-alive.
    pub(super) packet: Packet,
}

/// Who a connection is, once authenticated.
#[derive(Debug, Clone)]
pub(super) struct Identity {
    pub(super) mac: String,
    /// The certificate serial the credentials belong to (revocation).
    pub(super) serial: String,
    /// "certificate" or "password".
    pub(super) via: &'static str,
}

/// How a connection authenticates.
pub(super) enum Auth {
    /// A verified client certificate.
    Certificate(Identity),
    /// User name (the MAC) and password in the CONNECT.
    Password,
    /// Plaintext loopback listener: the client id is trusted.
    Trusted,
}

/// A password login refused: metric reason, CONNACK return code, log text.
pub(super) struct Refusal {
    pub(super) reason: &'static str,
    pub(super) code: Option<u8>,
    pub(super) device: String,
    pub(super) detail: String,
}

impl Front {
    /// Checks the user name (the MAC) and password of a CONNECT against the
    /// stored hash, and the certificate serial the password is bound to
    /// against the live revocation set.
    pub(super) async fn password_identity(&self, frame: &BytesMut) -> Result<Identity, Refusal> {
        let refusal = |reason, code, device: &str, detail: String| Refusal {
            reason,
            code,
            device: device.to_string(),
            detail,
        };
        let parsed = check_protocol_level(frame)
            .and_then(|()| parse(frame.clone(), self.inner.cfg.max_packet_size));
        let login = match parsed {
            Ok(Packet::Connect(_, _, _, _, login)) => login,
            Ok(_) => {
                return Err(refusal(
                    "mqtt_protocol_violation",
                    None,
                    "-",
                    Violation::NotConnect.to_string(),
                ))
            }
            Err(v) => return Err(refusal(v.reason(), v.connack_code(), "-", v.to_string())),
        };
        let Some(Login { username, password }) = login else {
            return Err(refusal(
                "password_missing",
                Some(CONNACK_BAD_CREDENTIALS),
                "-",
                "CONNECT without user name and password".into(),
            ));
        };
        let Ok(mac) = crate::pki::normalize_mac(&username) else {
            return Err(refusal(
                "password_bad_username",
                Some(CONNACK_BAD_CREDENTIALS),
                "-",
                format!("user name {:?} is not a device MAC", truncate(&username)),
            ));
        };
        let Ok(_slot) = self.inner.verifications.clone().acquire_owned().await else {
            return Err(refusal(
                "password_check_failed",
                None,
                &mac,
                "closed".into(),
            ));
        };
        let store = self.inner.cfg.passwords.clone();
        let m = mac.clone();
        let checked = tokio::task::spawn_blocking(move || match store.get(&m) {
            Ok(Some(rec)) => {
                let ok = devpass::verify(&rec.hash, &password);
                Ok(Some((rec.serial, ok)))
            }
            Ok(None) => {
                devpass::verify_nothing(&password);
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match checked {
            Err(e) => Err(refusal(
                "password_check_failed",
                Some(CONNACK_NOT_AUTHORIZED),
                &mac,
                e,
            )),
            Ok(None) => Err(refusal(
                "password_unknown_device",
                Some(CONNACK_BAD_CREDENTIALS),
                &mac,
                "no password issued for this device".into(),
            )),
            Ok(Some((_, false))) => Err(refusal(
                "password_wrong",
                Some(CONNACK_BAD_CREDENTIALS),
                &mac,
                "wrong password".into(),
            )),
            Ok(Some((serial, true))) if self.is_revoked(&serial) => Err(refusal(
                "password_revoked",
                Some(CONNACK_NOT_AUTHORIZED),
                &mac,
                format!("the password's certificate {serial} is revoked"),
            )),
            Ok(Some((serial, true))) => Ok(Identity {
                mac,
                serial,
                via: "password",
            }),
        }
    }

    /// Validates the CONNECT; returns the device and the CONNECT for the
    /// broker.
    pub(super) fn check_connect(
        &self,
        frame: BytesMut,
        cert_mac: Option<&str>,
    ) -> Result<Connect, Violation> {
        check_protocol_level(&frame)?;
        let packet = parse(frame, self.inner.cfg.max_packet_size)?;
        let Packet::Connect(connect, _, will, _, _) = packet else {
            return Err(Violation::NotConnect);
        };
        let claimed =
            normalize_device_id(&connect.client_id).map_err(|_| Violation::BadClientId {
                client_id: truncate(&connect.client_id),
            })?;
        let device = match cert_mac {
            Some(mac) if claimed != mac => {
                return Err(Violation::ClientIdMismatch {
                    client_id: truncate(&connect.client_id),
                })
            }
            _ => claimed,
        };
        if let Some(LastWill { topic, .. }) = &will {
            check_publish_topic(topic, &device).map_err(|_| Violation::Will {
                topic: truncate(&String::from_utf8_lossy(topic)),
            })?;
        }
        Ok(Connect {
            device,
            keep_alive: connect.keep_alive,
            packet: Packet::Connect(connect, None, will, None, None),
        })
    }
}

/// Refuses a CONNECT of another MQTT version before it is parsed as 3.1.1:
/// protocol name `MQTT` (3.1.1, 5) or `MQIsdp` (3.1) with a level other
/// than 4. Anything else (not a CONNECT, another name, too short) is left
/// to the parser.
fn check_protocol_level(frame: &[u8]) -> Result<(), Violation> {
    if frame.first().map(|b| b >> 4) != Some(CONNECT) {
        return Ok(());
    }
    // The fixed header: one byte, then a remaining length of 1-4 bytes.
    let Some(len_end) = frame[1..].iter().take(4).position(|b| b & 0x80 == 0) else {
        return Ok(());
    };
    let v = &frame[2 + len_end..];
    let Some(name_len) = v
        .get(..2)
        .map(|n| u16::from_be_bytes([n[0], n[1]]) as usize)
    else {
        return Ok(());
    };
    let (Some(name), Some(&level)) = (v.get(2..2 + name_len), v.get(2 + name_len)) else {
        return Ok(());
    };
    if (name == b"MQTT" || name == b"MQIsdp") && level != 4 {
        return Err(Violation::UnsupportedProtocol { level });
    }
    Ok(())
}
