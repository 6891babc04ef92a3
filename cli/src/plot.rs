//! A small PNG line plot of the replay: the device's accuracy on each session before
//! its upload, one thin grey line per swimmer, the median over swimmers in blue (drawn
//! while at least [`MIN_FOR_MEDIAN`] swimmers have that many sessions), the median
//! base accuracy on the final test as a dashed red line. x: session 1 … N;
//! y: accuracy from 0 (bottom) to 1 (top), grid lines every 0.1. No plotting library:
//! RGB pixels, encoded as PNG (zlib from flate2, CRC-32 from crc32fast).
use std::io::Write;
use std::path::Path;

use crate::replay::ReplayReport;

const W: usize = 900;
const H: usize = 500;
const MARGIN: usize = 40;
/// Fewest swimmers a session's median is drawn for.
pub const MIN_FOR_MEDIAN: usize = 5;

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            px: vec![[255, 255, 255]; W * H],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            self.px[y as usize * W + x as usize] = c;
        }
    }

    /// A line (Bresenham), `thick` pixels wide, every `dash`-th run of 6 pixels skipped.
    fn line(&mut self, a: (f64, f64), b: (f64, f64), c: [u8; 3], thick: i64, dashed: bool) {
        let (mut x0, mut y0) = (a.0.round() as i64, a.1.round() as i64);
        let (x1, y1) = (b.0.round() as i64, b.1.round() as i64);
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let mut err = dx + dy;
        let mut n = 0;
        loop {
            if !dashed || (n / 6) % 2 == 0 {
                for t in 0..thick {
                    self.set(x0, y0 + t - thick / 2, c);
                    self.set(x0 + t - thick / 2, y0, c);
                }
            }
            n += 1;
            if x0 == x1 && y0 == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(H * (W * 3 + 1));
        for row in self.px.chunks(W) {
            raw.push(0); // filter: none
            for p in row {
                raw.extend_from_slice(p);
            }
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&raw).expect("in-memory write");
        let idat = z.finish().expect("in-memory write");
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(W as u32).to_be_bytes());
        ihdr.extend_from_slice(&(H as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        for (kind, data) in [(&b"IHDR"[..], ihdr), (b"IDAT", idat), (b"IEND", Vec::new())] {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut crc = crc32fast::Hasher::new();
            crc.update(kind);
            crc.update(&data);
            out.extend_from_slice(kind);
            out.extend_from_slice(&data);
            out.extend_from_slice(&crc.finalize().to_be_bytes());
        }
        out
    }
}

/// Write the session-accuracy plot of `r` to `path` (see the module doc).
pub fn session_accuracy_png(r: &ReplayReport, path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, session_accuracy_png_bytes(r))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The plot's PNG bytes.
pub fn session_accuracy_png_bytes(r: &ReplayReport) -> Vec<u8> {
    let mut c = Canvas::new();
    let sessions = r
        .swimmers
        .iter()
        .map(|s| s.session_accuracy.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let x = |i: usize| MARGIN as f64 + i as f64 * (W - 2 * MARGIN) as f64 / (sessions - 1) as f64;
    let y = |a: f64| (H - MARGIN) as f64 - a.clamp(0.0, 1.0) * (H - 2 * MARGIN) as f64;
    for k in 0..=10 {
        let a = k as f64 / 10.0;
        let shade = if k % 5 == 0 { 150 } else { 225 };
        c.line((x(0), y(a)), (x(sessions - 1), y(a)), [shade; 3], 1, false);
    }
    for i in 0..sessions {
        c.line((x(i), y(0.0)), (x(i), y(0.0) + 5.0), [100; 3], 1, false);
    }
    for s in &r.swimmers {
        for (i, w) in s.session_accuracy.windows(2).enumerate() {
            c.line((x(i), y(w[0])), (x(i + 1), y(w[1])), [190; 3], 1, false);
        }
    }
    c.line(
        (x(0), y(r.base.median_accuracy)),
        (x(sessions - 1), y(r.base.median_accuracy)),
        [200, 40, 40],
        2,
        true,
    );
    let med: Vec<f64> = (0..sessions)
        .map(|i| {
            let v: Vec<f64> = r
                .swimmers
                .iter()
                .filter_map(|s| s.session_accuracy.get(i).copied())
                .collect();
            if v.len() < MIN_FOR_MEDIAN {
                f64::NAN
            } else {
                crate::demo::median(v)
            }
        })
        .collect();
    for i in 1..sessions {
        if med[i - 1].is_finite() && med[i].is_finite() {
            c.line(
                (x(i - 1), y(med[i - 1])),
                (x(i), y(med[i])),
                [30, 80, 200],
                3,
                false,
            );
        }
    }
    c.png()
}
