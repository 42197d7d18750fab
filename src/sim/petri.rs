//! Synthetic petri-dish JPEGs: colonies that grow by the day.

use super::base::{Rng, SimError};

// --------------------------------------------------------------- petri dish

/// A JPEG of a petri dish whose colonies (placed by `seed`) grow with `day`.
pub fn petri_jpeg(seed: u64, day: f64, width: u16, height: u16) -> Result<Vec<u8>, SimError> {
    let (w, h) = (width as usize, height as usize);
    let mut rng = Rng::new(seed);
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let dish_r = (w.min(h) as f64) * 0.46;
    struct Colony {
        x: f64,
        y: f64,
        r: f64,
        rgb: [f64; 3],
    }
    let palette = [
        [236.0, 228.0, 200.0],
        [250.0, 250.0, 240.0],
        [226.0, 196.0, 90.0],
        [120.0, 150.0, 90.0],
        [200.0, 120.0, 110.0],
    ];
    let n = 6 + (rng.next_u64() % 18) as usize;
    let mut colonies = Vec::with_capacity(n);
    for _ in 0..n {
        let a = rng.range(0.0, std::f64::consts::TAU);
        let d = dish_r * 0.85 * rng.f64().sqrt();
        let appears = rng.range(0.0, 3.0);
        let rate = rng.range(1.5, 5.0) * dish_r / 100.0;
        let max_r = rng.range(6.0, 22.0) * dish_r / 100.0;
        let r = ((day - appears).max(0.0) * rate).min(max_r);
        let rgb = palette[(rng.next_u64() % palette.len() as u64) as usize];
        if r > 0.3 {
            colonies.push(Colony {
                x: cx + d * a.cos(),
                y: cy + d * a.sin(),
                r,
                rgb,
            });
        }
    }
    let mut px = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
            let dd = ((fx - cx).powi(2) + (fy - cy).powi(2)).sqrt();
            let mut c = if dd > dish_r + 3.0 {
                [40.0, 42.0, 48.0]
            } else if dd > dish_r {
                [190.0, 196.0, 205.0] // the rim
            } else {
                let shade = 1.0 - 0.15 * (dd / dish_r);
                [205.0 * shade, 160.0 * shade, 95.0 * shade] // agar
            };
            for col in &colonies {
                let cd = ((fx - col.x).powi(2) + (fy - col.y).powi(2)).sqrt();
                if cd < col.r && dd < dish_r {
                    let edge = ((col.r - cd) / 1.5).min(1.0);
                    let center = 1.0 - 0.25 * (cd / col.r);
                    for (ck, rk) in c.iter_mut().zip(col.rgb) {
                        *ck = *ck * (1.0 - edge) + rk * center * edge;
                    }
                }
            }
            let i = (y * w + x) * 3;
            for (p, ck) in px[i..i + 3].iter_mut().zip(c) {
                *p = ck.clamp(0.0, 255.0) as u8;
            }
        }
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 75)
        .encode(&px, width, height, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| SimError::Jpeg(e.to_string()))?;
    Ok(out)
}
