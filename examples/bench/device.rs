//! One device's wake as the firmware does it ([`wake`]), and a wake that
//! drains a backlog of pending images ([`drain`]).

use crate::conn::Conn;
use crate::load::{encode, image_name, Counters, Images, LoadCfg, Prepared, Rng, Wake};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// One wake of device `idx`: returns when ACK_OK arrives (or on failure).
#[allow(clippy::too_many_arguments)]
pub async fn wake(
    conn: &mut Conn,
    id: &str,
    idx: u64,
    pending: u32,
    images: &Images,
    cfg: &LoadCfg,
    counters: &Counters,
    prepared: Prepared,
) -> Wake {
    let name = image_name(idx);
    let img = images.image(idx);
    let Prepared {
        msgs: mut prebuilt,
        sha256: sha,
    } = prepared;
    let first = encode(images.enc, &img[..images.chunk.min(img.len())]);
    let mut w = Wake {
        id: id.to_string(),
        name: name.clone(),
        sha256: sha,
        latency: None,
        acks: Vec::new(),
        error: None,
    };
    let total = images.total();
    let mut rng = Rng(cfg.seed ^ (idx.wrapping_mul(0x9E3779B97F4A7C15)) | 1);
    let pubd = |ch: &str| format!("ESP32CAM/{id}/{ch}");
    let hello = json!({"device_id": id, "status": "alive", "pendingImg": pending}).to_string();
    let meta = json!({
        "device_id": id, "capture_timestamp": "2025-06-01T08:00:00Z", "image_name": name,
        "image_size": img.len(), "max_chunk_size": images.chunk, "total_chunks_count": total,
        "location": "bench", "error": 0, "temperature": 21.5, "humidity": 50.0,
        "pressure": 1013.0, "gas_resistance": 100.0
    })
    .to_string();
    let data = pubd("data");
    let t0 = Instant::now();
    if let Err(e) = conn.publish(&pubd("status"), hello.as_bytes()).await {
        w.error = Some(format!("publish HELLO: {e}"));
        return w;
    }
    let deadline = t0 + cfg.timeout;
    let mut first_pass = true;
    let chunks = Chunks {
        id,
        name: &name,
        first: &first,
        data: &data,
    };
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), conn.recv()).await;
        let (topic, v) = match msg {
            Ok(Some(m)) => m,
            Ok(None) => {
                w.error = Some("connection lost".into());
                return w;
            }
            Err(_) => {
                w.error = Some("timeout".into());
                return w;
            }
        };
        let r = if v.get("capture_image").is_some()
            || (topic.ends_with("/ack") && v["image_name"] == "" && v.get("ACK_OK").is_some())
        {
            conn.publish(&data, meta.as_bytes()).await
        } else if v.get("send_image").is_some() {
            let loss = if first_pass { cfg.loss } else { 0.0 };
            let r = chunks
                .send_all(conn, images, loss, &mut rng, counters, &mut prebuilt)
                .await;
            first_pass = false;
            prebuilt = Vec::new();
            r
        } else if let Some(ids) = v.get("missing_chunks").and_then(|m| m.as_array()) {
            first_pass = false;
            chunks.resend(conn, images, ids, counters).await
        } else if v.get("ACK_OK").is_some() && v["image_name"] == name.as_str() {
            w.latency = Some(t0.elapsed());
            return w;
        } else if v.get("next_wake").is_some() {
            w.error = Some("told next_wake instead of capture".into());
            return w;
        } else {
            Ok(())
        };
        if let Err(e) = r {
            w.error = Some(format!("publish: {e}"));
            return w;
        }
    }
}

/// The name of device `idx`'s `k`-th pending image (0 = the oldest).
pub fn pending_name(idx: u64, k: u32) -> String {
    format!("img_{idx:05}_{k:03}.jpg")
}

/// One wake of device `idx` that drains `pending` images from its SD card,
/// as the firmware does: HELLO with `pendingImg`; on ACK_OK (the first, with
/// an empty image name, is the cue) the next pending image's METADATA; on
/// `send_image` every chunk (each dropped with probability `cfg.loss`, on
/// the image's first pass only); on `missing_chunks` exactly those ids; on
/// the image's ACK_OK its METADATA → ACK_OK time is noted and the next image
/// follows. Other messages (a `capture_image` once the backlog is drained,
/// a `next_wake`) are not part of the drain and are ignored. Returns when
/// the last image is ACKed (or on failure, or when one image takes longer
/// than `cfg.timeout`).
pub async fn drain(
    conn: &mut Conn,
    id: &str,
    idx: u64,
    pending: u32,
    images: &Images,
    cfg: &LoadCfg,
    counters: &Counters,
) -> Wake {
    let mut w = Wake {
        id: id.to_string(),
        name: pending_name(idx, 0),
        sha256: String::new(),
        latency: None,
        acks: Vec::with_capacity(pending as usize),
        error: None,
    };
    let total = images.total();
    let mut rng = Rng(cfg.seed ^ (idx.wrapping_mul(0x9E3779B97F4A7C15)) | 1);
    let pubd = |ch: &str| format!("ESP32CAM/{id}/{ch}");
    let data = pubd("data");
    let hello = json!({"device_id": id, "status": "alive", "pendingImg": pending}).to_string();
    // The backlog: one image per past wake, 12 h apart, the oldest first.
    let oldest = chrono::Utc::now() - chrono::Duration::hours(12 * (pending as i64 + 1));
    // The image being sent: k, name, first chunk's payload, METADATA sent at.
    let mut k: u32 = 0;
    let mut name = String::new();
    let mut first = String::new();
    let mut sent_at: Option<Instant> = None;
    let mut first_pass = true;
    let t0 = Instant::now();
    if let Err(e) = conn.publish(&pubd("status"), hello.as_bytes()).await {
        w.error = Some(format!("publish HELLO: {e}"));
        return w;
    }
    let mut deadline = t0 + cfg.timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), conn.recv()).await;
        let (topic, v) = match msg {
            Ok(Some(m)) => m,
            Ok(None) => {
                w.error = Some(format!("connection lost at image {k}"));
                return w;
            }
            Err(_) => {
                w.error = Some(format!("timeout at image {k}"));
                return w;
            }
        };
        let is_ack = topic.ends_with("/ack") && v.get("ACK_OK").is_some();
        let cue = is_ack && sent_at.is_none() && v["image_name"] == "";
        let acked = is_ack && sent_at.is_some() && v["image_name"] == name.as_str();
        if acked {
            w.acks.push(sent_at.take().unwrap_or(t0).elapsed());
            k += 1;
            if k == pending {
                w.latency = Some(t0.elapsed());
                return w;
            }
        }
        // The image being sent (the cue and an ACK_OK start the next one).
        let chunks = Chunks {
            id,
            name: &name,
            first: &first,
            data: &data,
        };
        let r = if cue || acked {
            name = pending_name(idx, k);
            let img = images.image(idx | (k as u64) << 32);
            first = encode(images.enc, &img[..images.chunk.min(img.len())]);
            let ts = oldest + chrono::Duration::hours(12 * k as i64);
            let meta = json!({
                "device_id": id,
                "capture_timestamp": ts.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                "image_name": name, "image_size": img.len(), "max_chunk_size": images.chunk,
                "total_chunks_count": total, "location": "bench", "error": 0,
                "temperature": 21.5, "humidity": 50.0, "pressure": 1013.0, "gas_resistance": 100.0
            })
            .to_string();
            first_pass = true;
            deadline = Instant::now() + cfg.timeout;
            sent_at = Some(Instant::now());
            conn.publish(&data, meta.as_bytes()).await
        } else if sent_at.is_some() && v.get("send_image").is_some() && first_pass {
            first_pass = false;
            chunks
                .send_all(conn, images, cfg.loss, &mut rng, counters, &mut Vec::new())
                .await
        } else if let Some(ids) = v.get("missing_chunks").and_then(|m| m.as_array()) {
            first_pass = false;
            chunks.resend(conn, images, ids, counters).await
        } else {
            Ok(())
        };
        if let Err(e) = r {
            w.error = Some(format!("publish: {e}"));
            return w;
        }
    }
}

/// The chunks of the image a device is sending.
struct Chunks<'a> {
    id: &'a str,
    name: &'a str,
    /// The first chunk's payload, encoded (the image's chunks are built
    /// from it).
    first: &'a str,
    /// The device's data topic.
    data: &'a str,
}

impl Chunks<'_> {
    /// Every chunk, each dropped with probability `loss`; a chunk message
    /// already built in `prebuilt` is sent as it is.
    async fn send_all(
        &self,
        conn: &mut Conn,
        images: &Images,
        loss: f64,
        rng: &mut Rng,
        counters: &Counters,
        prebuilt: &mut [Vec<u8>],
    ) -> Result<(), String> {
        for i in 0..images.total() {
            if loss > 0.0 && rng.next() < loss {
                continue;
            }
            counters.chunk_msgs.fetch_add(1, Ordering::Relaxed);
            let msg = match prebuilt.get_mut(i).map(std::mem::take) {
                Some(m) if !m.is_empty() => m,
                _ => images.chunk_msg(self.id, self.name, self.first, i),
            };
            conn.publish(self.data, &msg).await?;
        }
        Ok(())
    }

    /// The chunks a `missing_chunks` asks for (1-based ids; others ignored).
    async fn resend(
        &self,
        conn: &mut Conn,
        images: &Images,
        ids: &[serde_json::Value],
        counters: &Counters,
    ) -> Result<(), String> {
        counters.missing_rounds.fetch_add(1, Ordering::Relaxed);
        for cid in ids.iter().filter_map(|x| x.as_u64()) {
            let i = (cid as usize).wrapping_sub(1);
            if i >= images.total() {
                continue;
            }
            counters.chunk_msgs.fetch_add(1, Ordering::Relaxed);
            counters.resent.fetch_add(1, Ordering::Relaxed);
            let msg = images.chunk_msg(self.id, self.name, self.first, i);
            conn.publish(self.data, &msg).await?;
        }
        Ok(())
    }
}
