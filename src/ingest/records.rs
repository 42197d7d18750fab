//! The narrow interface the conversation drives the database through:
//! what it reads (a device, a capture, a capture's chunk lengths, the open
//! alerts, the id counters) and the one write, an atomic [`Batch`] commit.
//! [`Store`] implements it (on disk, or on redb's in-memory backend).

use crate::store::{
    AlertRecord, Batch, CaptureRecord, CommitReport, DeviceRecord, Store, StoreError,
};
use chrono::{DateTime, Utc};

pub trait Records {
    /// Prepares for a new engine: removes chunks that belong to no
    /// announced capture and bounds the command log. Returns how many
    /// captures' chunks were removed.
    fn start(&self, max_stored_commands: u64) -> Result<u64, StoreError>;
    fn device(&self, mac: &str) -> Result<Option<DeviceRecord>, StoreError>;
    /// Every registered device, one at a time.
    fn for_each_device(&self, f: &mut dyn FnMut(DeviceRecord)) -> Result<(), StoreError>;
    fn device_count(&self) -> Result<u64, StoreError>;
    fn capture(&self, id: u64) -> Result<Option<CaptureRecord>, StoreError>;
    /// The newest capture of this name.
    fn latest_capture(&self, mac: &str, name: &str) -> Result<Option<CaptureRecord>, StoreError>;
    /// The device's captures neither complete nor failed.
    fn open_captures(&self, mac: &str) -> Result<Vec<CaptureRecord>, StoreError>;
    /// (chunk id, length) of a capture's stored chunks.
    fn chunk_lengths(&self, capture_id: u64) -> Result<Vec<(u32, u32)>, StoreError>;
    fn open_alerts(&self) -> Result<Vec<AlertRecord>, StoreError>;
    /// The next capture id never used; the next alert id.
    fn next_ids(&self) -> Result<(u64, u64), StoreError>;
    /// Applies the batch in one transaction (durable unless `batch.relaxed`).
    fn commit(&self, batch: Batch, now: DateTime<Utc>) -> Result<CommitReport, StoreError>;
}

impl Records for Store {
    fn start(&self, max_stored_commands: u64) -> Result<u64, StoreError> {
        self.set_command_retention(max_stored_commands);
        self.remove_orphan_partials()
    }
    fn device(&self, mac: &str) -> Result<Option<DeviceRecord>, StoreError> {
        Store::device(self, mac)
    }
    fn for_each_device(&self, f: &mut dyn FnMut(DeviceRecord)) -> Result<(), StoreError> {
        Store::for_each_device(self, f)
    }
    fn device_count(&self) -> Result<u64, StoreError> {
        Store::device_count(self)
    }
    fn capture(&self, id: u64) -> Result<Option<CaptureRecord>, StoreError> {
        Store::capture(self, id)
    }
    fn latest_capture(&self, mac: &str, name: &str) -> Result<Option<CaptureRecord>, StoreError> {
        Store::latest_capture(self, mac, name)
    }
    fn open_captures(&self, mac: &str) -> Result<Vec<CaptureRecord>, StoreError> {
        Store::open_captures(self, mac)
    }
    fn chunk_lengths(&self, capture_id: u64) -> Result<Vec<(u32, u32)>, StoreError> {
        Store::chunk_lengths(self, capture_id)
    }
    fn open_alerts(&self) -> Result<Vec<AlertRecord>, StoreError> {
        Ok(self
            .alerts()?
            .into_iter()
            .filter(|a| a.resolved_at.is_none())
            .collect())
    }
    fn next_ids(&self) -> Result<(u64, u64), StoreError> {
        Ok((self.next_capture_id()?, self.max_alert_id()? + 1))
    }
    fn commit(&self, batch: Batch, now: DateTime<Utc>) -> Result<CommitReport, StoreError> {
        Store::commit(self, batch, now)
    }
}
