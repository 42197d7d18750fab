//! The ALERTS table: device alerts, whose ids the ingest hands out, and the
//! gateway's own alerts (upstream, disk) in an id range above them.

use super::{db, dec, AlertRecord, Batch, Store, StoreError, ALERTS};
use chrono::{DateTime, Utc};
use redb::ReadableTable;

/// Alerts about the gateway itself (upstream, disk) use ids from here up, so
/// they never collide with the ingest's own counter.
pub const GATEWAY_ALERT_BASE: u64 = 1 << 62;

impl Store {
    pub fn alerts(&self) -> Result<Vec<AlertRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(ALERTS).map_err(db)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(db)? {
            let (_, v) = r.map_err(db)?;
            out.push(dec("alerts", v.value())?);
        }
        Ok(out)
    }

    pub fn alert(&self, id: u64) -> Result<Option<AlertRecord>, StoreError> {
        self.get_json(ALERTS, "alerts", id)
    }

    /// The largest device-alert id (gateway alerts live above [`GATEWAY_ALERT_BASE`]).
    pub fn max_alert_id(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(ALERTS).map_err(db)?;
        let last = t
            .range(..GATEWAY_ALERT_BASE)
            .map_err(db)?
            .next_back()
            .transpose()
            .map_err(db)?
            .map(|(k, _)| k.value())
            .unwrap_or(0);
        Ok(last)
    }

    /// Raises a gateway-level alert (`mac` empty) unless one of this kind is
    /// open; queued upstream like any other. Returns it when newly raised.
    pub fn raise_gateway_alert(
        &self,
        kind: &str,
        severity: &str,
        message: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<AlertRecord>, StoreError> {
        if self.open_gateway_alert(kind)?.is_some() {
            return Ok(None);
        }
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(ALERTS).map_err(db)?;
        let id = t
            .range(GATEWAY_ALERT_BASE..)
            .map_err(db)?
            .next_back()
            .transpose()
            .map_err(db)?
            .map(|(k, _)| k.value() + 1)
            .unwrap_or(GATEWAY_ALERT_BASE);
        drop(t);
        drop(tx);
        let a = AlertRecord {
            id,
            mac: String::new(),
            kind: kind.to_string(),
            severity: severity.to_string(),
            message: message.to_string(),
            triggered_at: now,
            resolved_at: None,
            capture_id: None,
        };
        let mut b = Batch::default();
        b.alert(&a);
        self.commit(b, now)?;
        Ok(Some(a))
    }

    /// Resolves the open gateway alert of this kind, if any.
    pub fn resolve_gateway_alert(
        &self,
        kind: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let Some(mut a) = self.open_gateway_alert(kind)? else {
            return Ok(false);
        };
        a.resolved_at = Some(now);
        let mut b = Batch::default();
        b.alert(&a);
        self.commit(b, now)?;
        Ok(true)
    }

    pub fn open_gateway_alert(&self, kind: &str) -> Result<Option<AlertRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(ALERTS).map_err(db)?;
        for r in t.range(GATEWAY_ALERT_BASE..).map_err(db)?.rev() {
            let (_, v) = r.map_err(db)?;
            let a: AlertRecord = dec("alerts", v.value())?;
            if a.kind == kind && a.resolved_at.is_none() {
                return Ok(Some(a));
            }
        }
        Ok(None)
    }
}
