//! Recorded sensor data → labelled windows of a [`ModelSpec`] (`swimlane data import`,
//! and the real-swimmer replay). The accepted format is documented in
//! docs/recordings.md; in short:
//!
//! - One recording per file, CSV (`.csv`) or gzip-compressed CSV (`.csv.gz`), a header
//!   row, one row per frame at the spec's frame rate.
//! - Columns are found by header name: one per spec channel (the channel's name, or the
//!   name a column map gives it, e.g. `acc_x=ACC_0`), and a label column (`label` by
//!   default) holding the class per frame, as the class's index in the spec or its
//!   name. Other columns are ignored. A frame whose label is none of the spec's classes
//!   (e.g. `-1` unlabelled) is not used.
//! - The recording's start time: the digits after the file name's last `_` (Unix
//!   milliseconds, `Freestyle_1527873200322.csv.gz`), or 0 when there are none.
//!
//! Windows are `spec.frames` consecutive frames, cut every `stride` frames. **A window
//! whose frames do not all carry the same usable label is dropped** (it straddles two
//! labels, e.g. stroke → turn, or touches an unlabelled frame): its label would be a
//! guess. A non-finite or missing value in a kept window is an error naming the file,
//! line and column. Every window keeps its recording and its first frame's offset, so a
//! timeline can be split by time, never by random window (windows that overlap would
//! otherwise leak between training and test).
use std::io::Read;
use std::path::{Path, PathBuf};

use swimlane_core::{ClassId, ModelSpec};
use swimlane_model::Sample;

/// One window and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub sample: Sample,
    /// Index of the first frame in its recording.
    pub frame: usize,
    /// Milliseconds since the Unix epoch of the first frame.
    pub time_ms: u64,
}

/// One recording's windows.
#[derive(Clone, Debug)]
pub struct Recording {
    pub path: PathBuf,
    pub start_ms: u64,
    pub frames: usize,
    pub windows: Vec<Window>,
    /// Windows dropped because their frames carry more than one (or no usable) label.
    pub straddling: usize,
}

/// How to read columns.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// `(channel name, header)` pairs overriding a channel's column; channels not
    /// listed are read from the column named like the channel.
    pub columns: Vec<(String, String)>,
    pub label_column: String,
    /// Frames between the starts of two windows.
    pub stride: usize,
}

impl ImportOptions {
    /// The defaults for a spec: every window half-overlapping (`stride = frames / 2`),
    /// label column `label`, and the IMU channel names of the smartwatch spec
    /// (`acc_x`, …, `mag_z`) read from the swim-imu recordings' headers (`ACC_0`, …,
    /// `MAG_2`).
    pub fn for_spec(spec: &ModelSpec) -> ImportOptions {
        let columns = spec
            .channels
            .iter()
            .filter_map(|c| {
                let (sensor, axis) = c.name.split_once('_')?;
                let sensor = match sensor {
                    "acc" => "ACC",
                    "gyro" => "GYRO",
                    "mag" => "MAG",
                    _ => return None,
                };
                let axis = match axis {
                    "x" => 0,
                    "y" => 1,
                    "z" => 2,
                    _ => return None,
                };
                Some((c.name.clone(), format!("{sensor}_{axis}")))
            })
            .collect();
        ImportOptions {
            columns,
            label_column: "label".into(),
            stride: (spec.frames / 2).max(1),
        }
    }

    /// Parse `a=B,c=D` column overrides.
    pub fn parse_columns(s: &str) -> anyhow::Result<Vec<(String, String)>> {
        s.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (a, b) = p.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("column map entry {p:?} is not CHANNEL=HEADER")
                })?;
                Ok((a.trim().to_string(), b.trim().to_string()))
            })
            .collect()
    }
}

/// The start time in a file name: the digits after the last `_` before the extension.
pub fn start_ms_from_name(path: &Path) -> u64 {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let stem = name.split('.').next().unwrap_or("");
    stem.rsplit('_')
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// Read one recording file (gunzipped when it ends in `.gz`).
pub fn read_recording(
    path: &Path,
    spec: &ModelSpec,
    opts: &ImportOptions,
) -> anyhow::Result<Recording> {
    let raw = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let text = if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_string(&mut s)
            .map_err(|e| anyhow::anyhow!("{}: not gzip-compressed text: {e}", path.display()))?;
        s
    } else {
        String::from_utf8(raw).map_err(|_| anyhow::anyhow!("{}: not UTF-8 text", path.display()))?
    };
    parse_recording(&text, path, start_ms_from_name(path), spec, opts)
}

/// Parse one recording's CSV text (see the module doc).
pub fn parse_recording(
    text: &str,
    path: &Path,
    start_ms: u64,
    spec: &ModelSpec,
    opts: &ImportOptions,
) -> anyhow::Result<Recording> {
    anyhow::ensure!(opts.stride > 0, "stride must be at least 1");
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow::anyhow!("{}: empty file", path.display()))?
        .split(',')
        .map(str::trim)
        .collect();
    let find = |name: &str| header.iter().position(|h| *h == name);
    let mut cols = Vec::with_capacity(spec.channels.len());
    for c in &spec.channels {
        let want = opts
            .columns
            .iter()
            .find(|(ch, _)| *ch == c.name)
            .map(|(_, h)| h.as_str())
            .unwrap_or(c.name.as_str());
        cols.push(find(want).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no column {want:?} for channel {:?} (header: {})",
                path.display(),
                c.name,
                header.join(",")
            )
        })?);
    }
    let label_col = find(&opts.label_column).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no label column {:?}",
            path.display(),
            opts.label_column
        )
    })?;
    let channels = spec.channels.len();
    let mut values: Vec<f32> = Vec::new();
    let mut labels: Vec<Option<ClassId>> = Vec::new();
    // (frame, column, line) of each missing or non-finite value.
    let mut bad_values: Vec<(usize, usize, usize)> = Vec::new();
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let field = |i: usize| fields.get(i).copied().unwrap_or("");
        let raw_label = field(label_col);
        // An index (`3`, or `3.0` as some exporters write integers), or a class name.
        let label = raw_label
            .parse::<f64>()
            .ok()
            .filter(|v| v.fract() == 0.0 && *v >= 0.0 && *v < 256.0)
            .and_then(|v| spec.class(v as usize))
            .or_else(|| spec.class_id(raw_label));
        let frame = labels.len();
        for &c in &cols {
            match field(c).parse::<f32>() {
                Ok(v) if v.is_finite() => values.push(v),
                _ => {
                    // Reported only if a kept window contains it.
                    values.push(0.0);
                    bad_values.push((frame, c, n + 2));
                }
            }
        }
        labels.push(label);
    }
    let frames = labels.len();
    let mut windows = Vec::new();
    let mut straddling = 0;
    let ms_per_frame = 1000.0 / spec.frame_rate_hz as f64;
    let mut start = 0;
    while start + spec.frames <= frames {
        let span = &labels[start..start + spec.frames];
        match span[0] {
            Some(l) if span.iter().all(|x| *x == Some(l)) => {
                if let Some((_, c, line)) = bad_values
                    .iter()
                    .find(|(f, _, _)| (start..start + spec.frames).contains(f))
                {
                    anyhow::bail!(
                        "{}: line {line}: column {:?} is not a finite number",
                        path.display(),
                        header[*c]
                    );
                }
                windows.push(Window {
                    sample: Sample {
                        frames: values[start * channels..(start + spec.frames) * channels].to_vec(),
                        label: l,
                    },
                    frame: start,
                    time_ms: start_ms + (start as f64 * ms_per_frame) as u64,
                });
            }
            _ => straddling += 1,
        }
        start += opts.stride;
    }
    Ok(Recording {
        path: path.to_path_buf(),
        start_ms,
        frames,
        windows,
        straddling,
    })
}

/// Every recording file (`*.csv`, `*.csv.gz`) directly in `dir`, in start-time order
/// (then by name).
pub fn recording_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.to_string_lossy();
            n.ends_with(".csv") || n.ends_with(".csv.gz")
        })
        .collect();
    files.sort_by_key(|p| (start_ms_from_name(p), p.clone()));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        let mut s = ModelSpec::smartwatch();
        s.frames = 4;
        s
    }

    fn csv(labels: &[i32]) -> String {
        let mut out = String::from(
            "timestamp,ACC_0,ACC_1,ACC_2,GYRO_0,GYRO_1,GYRO_2,MAG_0,MAG_1,MAG_2,PRESS,label\n",
        );
        for (i, l) in labels.iter().enumerate() {
            let v: Vec<String> = (0..9).map(|c| format!("{}", i * 10 + c)).collect();
            // Labels as the swim-imu files write them: `1.0`.
            out.push_str(&format!("{i},{},1000.0,{l}.0\n", v.join(",")));
        }
        out
    }

    #[test]
    fn windows_of_one_label_are_kept_and_straddling_ones_dropped() {
        let s = spec();
        let opts = ImportOptions {
            stride: 2,
            ..ImportOptions::for_spec(&s)
        };
        // Frames 0-5 freestyle (1), 6-7 turn (5), 8-11 unlabelled (-1), 12-15 null (0).
        let labels = [1, 1, 1, 1, 1, 1, 5, 5, -1, -1, -1, -1, 0, 0, 0, 0];
        let r = parse_recording(&csv(&labels), Path::new("x_1000.csv"), 1000, &s, &opts).unwrap();
        let got: Vec<(usize, u8)> = r
            .windows
            .iter()
            .map(|w| (w.frame, w.sample.label.0))
            .collect();
        assert_eq!(got, vec![(0, 1), (2, 1), (12, 0)]);
        assert_eq!(r.straddling, 4); // starts 4, 6, 8, 10
        assert_eq!(r.windows[1].sample.frames[..3], [20.0, 21.0, 22.0]);
        assert_eq!(r.windows[1].sample.frames.len(), 24);
        assert_eq!(r.windows[2].time_ms, 1000 + 400); // 12 frames at 30 Hz
        assert_eq!(
            start_ms_from_name(Path::new("a/Freestyle_1527873200322.csv.gz")),
            1527873200322
        );
    }

    #[test]
    fn missing_columns_and_bad_values_name_the_problem() {
        let s = spec();
        let opts = ImportOptions::for_spec(&s);
        let text = csv(&[1, 1, 1, 1]).replace("GYRO_1", "GYRO_X");
        let e = parse_recording(&text, Path::new("r.csv"), 0, &s, &opts).unwrap_err();
        assert!(
            e.to_string()
                .contains("no column \"GYRO_1\" for channel \"gyro_y\""),
            "{e}"
        );
        let text = csv(&[1, 1, 1, 1]).replace("\n2,20,", "\n2,nan,");
        let e = parse_recording(&text, Path::new("r.csv"), 0, &s, &opts).unwrap_err();
        assert!(e.to_string().contains("line 4: column \"ACC_0\""), "{e}");
        // A bad value outside every kept window is not an error.
        let text = csv(&[1, 1, 1, 1, -1]).replace("\n4,40,", "\n4,nan,");
        assert_eq!(
            parse_recording(&text, Path::new("r.csv"), 0, &s, &opts)
                .unwrap()
                .windows
                .len(),
            1
        );
        assert!(ImportOptions::parse_columns("acc_x=A,gyro_y").is_err());
    }
}
