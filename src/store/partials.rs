//! The chunks of captures in progress, kept in PARTIALS as a few runs per
//! capture: the run encoding, appending a batch's chunks, and the reads and
//! clean-up of partials.

use super::{db, dec, CaptureRecord, Store, StoreError, CAPTURES, PARTIALS};
use redb::ReadableTable;
use std::collections::BTreeMap;

/// The PARTIALS table, open for writing.
pub(super) type Partials<'t> = redb::Table<'t, (u64, u32), &'static [u8]>;

/// A run of chunks, as stored in a PARTIALS value: repeated
/// `[chunk_id u32 LE][len u32 LE][bytes]`, sorted by chunk id, ids unique.
pub(super) fn encode_run<'a>(chunks: impl IntoIterator<Item = (u32, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, bytes) in chunks {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// The chunks of a run, borrowed from it (see [`encode_run`]).
pub(super) fn parse_run(mut v: &[u8]) -> Result<Vec<(u32, &[u8])>, StoreError> {
    let corrupt = |message: &str| StoreError::Corrupt {
        table: "partials",
        message: message.to_string(),
    };
    let mut out = Vec::new();
    while !v.is_empty() {
        let (Some(id), Some(len)) = (v.get(0..4), v.get(4..8)) else {
            return Err(corrupt("truncated chunk header"));
        };
        let id = u32::from_le_bytes(id.try_into().unwrap_or_default());
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        let end = len.saturating_add(8);
        let Some(bytes) = v.get(8..end) else {
            return Err(corrupt("truncated chunk"));
        };
        out.push((id, bytes));
        v = &v[end..];
    }
    Ok(out)
}

/// Removes every run of a capture's partial.
pub(super) fn remove_partial(t: &mut Partials, cid: u64) -> Result<(), StoreError> {
    t.retain_in((cid, 0)..=(cid, u32::MAX), |_, _| false)
        .map_err(db)
}

/// Adds a batch's new chunks of one capture to its partial. The partial is
/// a binary counter of runs, level 0 the newest: the new run is merged with
/// the occupied levels 0, 1, … up to the first free one and written there.
/// Each chunk is so rewritten O(log batches) times, however the batches
/// interleave devices, and a capture has at most ~log2(batches) values.
pub(super) fn append_partial(
    t: &mut Partials,
    cid: u64,
    new: &BTreeMap<u32, &[u8]>,
) -> Result<(), StoreError> {
    let (merged, level) = {
        let mut guards = Vec::new();
        for r in t.range((cid, 0)..=(cid, u32::MAX)).map_err(db)? {
            let (k, v) = r.map_err(db)?;
            if k.value().1 != guards.len() as u32 {
                break;
            }
            guards.push(v);
        }
        if guards.is_empty() {
            (encode_run(new.iter().map(|(k, v)| (*k, *v))), 0)
        } else {
            let mut map: BTreeMap<u32, &[u8]> = BTreeMap::new();
            for g in guards.iter().rev() {
                map.extend(parse_run(g.value())?);
            }
            map.extend(new.iter().map(|(k, v)| (*k, *v)));
            (encode_run(map), guards.len() as u32)
        }
    };
    for l in 0..level {
        t.remove((cid, l)).map_err(db)?;
    }
    t.insert((cid, level), merged.as_slice()).map_err(db)?;
    Ok(())
}

impl Store {
    /// Chunk ids stored for a capture, with their lengths, by id.
    pub fn chunk_lengths(&self, capture_id: u64) -> Result<Vec<(u32, u32)>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(PARTIALS).map_err(db)?;
        let mut out = BTreeMap::new();
        // Oldest (highest level) first, so newer lengths win.
        for r in t
            .range((capture_id, 0)..=(capture_id, u32::MAX))
            .map_err(db)?
            .rev()
        {
            let (_, v) = r.map_err(db)?;
            for (id, bytes) in parse_run(v.value())? {
                out.insert(id, bytes.len() as u32);
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Deletes partials whose capture was never stored (chunks of an image
    /// that never got its METADATA): they belong to no capture, and no
    /// capture may ever assemble from them. Returns how many were removed.
    pub fn remove_orphan_partials(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(db)?;
        let mut removed = 0;
        {
            let captures = tx.open_table(CAPTURES).map_err(db)?;
            let mut partials = tx.open_table(PARTIALS).map_err(db)?;
            let mut ids: Vec<u64> = Vec::new();
            for r in partials.iter().map_err(db)? {
                let (k, _) = r.map_err(db)?;
                let cid = k.value().0;
                if ids.last() != Some(&cid) {
                    ids.push(cid);
                }
            }
            for cid in ids {
                let orphan = match captures.get(cid).map_err(db)? {
                    None => true,
                    Some(v) => dec::<CaptureRecord>("captures", v.value())?
                        .metadata
                        .is_none(),
                };
                if orphan {
                    remove_partial(&mut partials, cid)?;
                    removed += 1;
                }
            }
        }
        tx.commit().map_err(db)?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{capture, t0};
    use crate::store::{Batch, Finalize};
    use redb::ReadableTableMetadata;

    #[test]
    fn many_small_batches_keep_few_runs_and_assemble() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        // One chunk per batch, as with many interleaved devices.
        for id in 1..=100u32 {
            let mut b = Batch {
                relaxed: true,
                ..Batch::default()
            };
            b.chunk(5, id, vec![id as u8; 3]);
            s.commit(b, t0()).unwrap();
        }
        let lengths = s.chunk_lengths(5).unwrap();
        assert_eq!(lengths, (1..=100).map(|id| (id, 3)).collect::<Vec<_>>());
        assert_eq!(s.counts().unwrap().chunks, 100);
        {
            let tx = s.db.begin_read().unwrap();
            let t = tx.open_table(PARTIALS).unwrap();
            // 100 = 0b1100100: three levels.
            assert_eq!(t.len().unwrap(), 3);
        }
        let mut b = Batch::default();
        b.capture(&capture(5, 300, 3));
        b.finalize.push(Finalize {
            capture_id: 5,
            chunk_ids: (1..=100).collect(),
        });
        assert!(s.commit(b, t0()).unwrap().failed.is_empty());
        let want: Vec<u8> = (1..=100u8).flat_map(|i| [i; 3]).collect();
        assert_eq!(s.image_bytes(5).unwrap().unwrap(), want);
        assert_eq!(s.counts().unwrap().chunks, 0);
    }

    #[test]
    fn drop_chunks_discards_stored_and_batched_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.redb")).unwrap();
        let mut b = Batch::default();
        b.chunk(2, 1, vec![1]);
        b.chunk(4, 1, vec![7]);
        s.commit(b, t0()).unwrap();
        let mut b = Batch::default();
        b.chunk(2, 2, vec![2]);
        b.drop_chunks.push(2);
        s.commit(b, t0()).unwrap();
        assert!(s.chunk_lengths(2).unwrap().is_empty());
        assert_eq!(s.chunk_lengths(4).unwrap(), vec![(1, 1)]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Any batches of chunks, with repeats within and across batches,
        /// then a finalize: the image and the lengths are those of a
        /// last-write-wins map.
        #[test]
        fn partials_match_a_last_write_wins_model(
            batches in proptest::collection::vec(
                proptest::collection::vec(
                    (1u64..4, 0u32..12, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5)),
                    0..10,
                ),
                0..20,
            ),
            relaxed in proptest::prelude::any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open(&dir.path().join("db.redb")).unwrap();
            let mut model: BTreeMap<u64, BTreeMap<u32, Vec<u8>>> = BTreeMap::new();
            for batch in batches {
                let mut b = Batch {
                    relaxed,
                    ..Batch::default()
                };
                for (cid, id, bytes) in batch {
                    model.entry(cid).or_default().insert(id, bytes.clone());
                    b.chunk(cid, id, bytes);
                }
                s.commit(b, t0()).unwrap();
                for cid in 1..4 {
                    let want: Vec<(u32, u32)> = model
                        .get(&cid)
                        .map(|m| m.iter().map(|(id, v)| (*id, v.len() as u32)).collect())
                        .unwrap_or_default();
                    proptest::prop_assert_eq!(s.chunk_lengths(cid).unwrap(), want);
                }
            }
            let mut b = Batch::default();
            for (cid, m) in &model {
                let image: Vec<u8> = m.values().flatten().copied().collect();
                b.capture(&capture(*cid, image.len() as u32, 4));
                b.finalize.push(Finalize {
                    capture_id: *cid,
                    chunk_ids: m.keys().copied().collect(),
                });
            }
            proptest::prop_assert!(s.commit(b, t0()).unwrap().failed.is_empty());
            for (cid, m) in &model {
                let image: Vec<u8> = m.values().flatten().copied().collect();
                proptest::prop_assert_eq!(s.image_bytes(*cid).unwrap().unwrap(), image);
                proptest::prop_assert!(s.chunk_lengths(*cid).unwrap().is_empty());
            }
            proptest::prop_assert_eq!(s.counts().unwrap().chunks, 0);
        }
    }
}
