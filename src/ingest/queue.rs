//! The ingest's one inbound queue: device messages from the front (and
//! what the broker forwards on the ingest's local link), bounded, so a
//! full queue stops the front reading devices instead of growing.

use crate::protocol::Chunk;
use bytes::Bytes;

/// A device message for the ingest.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: Bytes,
    pub payload: Payload,
}

/// What an [`Inbound`] carries.
#[derive(Debug, Clone)]
pub enum Payload {
    /// The payload as published; the ingest parses it.
    Raw(Bytes),
    /// A chunk the front has parsed already, on its own threads: byte-array
    /// decoding is most of a chunk's cost, and the ingest is one thread.
    Chunk(Chunk),
    /// The device's connection ended (the topic is its MAC): the ingest
    /// parks its stream and frees its slot at once.
    SessionEnded,
}

/// Messages queued for the ingest: the front waits (and so stops reading the
/// device) while it is full. A few batches' worth keeps the ingest busy
/// while it commits, with bounded memory (≈ 2 KiB per chunk message).
pub const INGEST_QUEUE: usize = 2048;

/// The ingest's queue: the front and the link pump send, the ingest reads.
pub fn ingest_queue() -> (flume::Sender<Inbound>, flume::Receiver<Inbound>) {
    flume::bounded(INGEST_QUEUE)
}
