//! MQTT 3.1.1 frames: reading whole ones from a device, parsing them, and
//! the packets the front writes itself (a PUBACK, a refusing CONNACK).

use super::violation::Violation;
use bytes::BytesMut;
use rumqttd::protocol::v4::{check, V4};
use rumqttd::protocol::{Error as MqttError, Packet, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt};

pub(super) const CONNECT: u8 = 1;
pub(super) const PUBLISH: u8 = 3;
pub(super) const PUBACK: u8 = 4;
pub(super) const CONNACK: u8 = 2;

/// Reads the next whole MQTT frame (raw bytes). `Ok(None)` on a clean EOF.
pub(super) async fn next_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<BytesMut>, Violation> {
    loop {
        if let Some(frame) = ready_frame(buf, max)? {
            return Ok(Some(frame));
        }
        // An idle device's buffer stays small (1,000 connections); it grows
        // to 4 KiB reads once packets flow.
        buf.reserve(if buf.is_empty() { 512 } else { 4096 });
        match r.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(Violation::Io("connection closed inside a packet".into())),
            Ok(_) => {}
            Err(e) => return Err(Violation::Io(format!("read: {e}"))),
        }
    }
}

/// One read that does not wait: true if it added bytes to `buf`. EOF and
/// errors are left to the next waiting read, which reports them.
pub(super) fn read_now<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> bool {
    use std::future::Future;
    // As `next_frame`: an idle device's buffer stays small.
    buf.reserve(if buf.is_empty() { 512 } else { 4096 });
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let read = std::pin::pin!(r.read_buf(buf));
    matches!(read.poll(&mut cx), std::task::Poll::Ready(Ok(n)) if n > 0)
}

/// The next whole packet already in `buf`, if any (no read).
pub(super) fn ready_frame(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, Violation> {
    if buf.is_empty() {
        return Ok(None);
    }
    match check(buf.iter(), max) {
        Ok(h) => Ok(Some(buf.split_to(h.frame_length()))),
        Err(MqttError::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(Violation::Malformed(e.to_string())),
    }
}

/// Parses one frame. rumqttd's parser is not meant for hostile input, so a
/// panic in it is caught and treated as a malformed packet.
pub(super) fn parse(frame: BytesMut, max: usize) -> Result<Packet, Violation> {
    let r = std::panic::catch_unwind(move || {
        let mut f = frame;
        V4.read_mut(&mut f, max)
    });
    match r {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(Violation::Malformed(e.to_string())),
        Err(_) => Err(Violation::Malformed("unparseable packet".into())),
    }
}

/// A CONNACK refusing a CONNECT with return code `code`.
pub(super) fn connack_refusal(code: u8) -> [u8; 4] {
    [CONNACK << 4, 0x02, 0x00, code]
}

/// An MQTT 3.1.1 PUBACK.
pub(super) fn puback_packet(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [PUBACK << 4, 0x02, hi, lo]
}
