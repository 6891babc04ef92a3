//! A labelled sample set as bytes (for benchmarks and for exchanging data sets with
//! other tools): a safetensors file with `x` F32 [n, 32, 16] and `y` U8 [n] (the class
//! index), `__metadata__` `format` = `swimlane-samples`, `format_version` = `1`.
//! Any safetensors reader (e.g. Python's) can read it.
use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensors};

use crate::st::{write, Entry};
use swimlane_core::{ClassId, WINDOW_FEATURES, WINDOW_FRAMES};

use crate::{ModelError, Sample};

const FORMAT: &str = "swimlane-samples";

/// Serialise samples.
pub fn to_bytes(samples: &[Sample]) -> Result<Vec<u8>, ModelError> {
    let mut x = Vec::with_capacity(samples.len() * WINDOW_FRAMES * WINDOW_FEATURES * 4);
    for (i, s) in samples.iter().enumerate() {
        if s.frames.len() != WINDOW_FRAMES * WINDOW_FEATURES {
            return Err(ModelError::BadWindow {
                index: i,
                len: s.frames.len(),
                expected: WINDOW_FRAMES * WINDOW_FEATURES,
            });
        }
        x.extend(s.frames.iter().flat_map(|v| v.to_le_bytes()));
    }
    let y: Vec<u8> = samples.iter().map(|s| s.label.index() as u8).collect();
    let shape_x = vec![samples.len(), WINDOW_FRAMES, WINDOW_FEATURES];
    let entries = [
        Entry {
            name: "x",
            dtype: "F32",
            shape: shape_x,
            data: &x,
        },
        Entry {
            name: "y",
            dtype: "U8",
            shape: vec![samples.len()],
            data: &y,
        },
    ];
    let meta = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("format_version".to_string(), "1".to_string()),
    ]);
    Ok(write(&entries, &meta))
}

/// Read samples written by [`to_bytes`]; errors (never panics) on anything else.
pub fn from_bytes(bytes: &[u8]) -> Result<Vec<Sample>, ModelError> {
    let bad = |m: String| ModelError::Format(m);
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad("not a swimlane-samples file".into()));
    }
    if meta.get("format_version").map(String::as_str) != Some("1") {
        return Err(ModelError::UnsupportedVersion(
            meta.get("format_version").cloned().unwrap_or_default(),
        ));
    }
    let x = st.tensor("x").map_err(|e| bad(e.to_string()))?;
    let y = st.tensor("y").map_err(|e| bad(e.to_string()))?;
    let n = y.shape().first().copied().unwrap_or(0);
    if x.dtype() != Dtype::F32
        || y.dtype() != Dtype::U8
        || x.shape() != [n, WINDOW_FRAMES, WINDOW_FEATURES]
        || y.shape() != [n]
    {
        return Err(bad(format!(
            "unexpected shapes x {:?} y {:?}",
            x.shape(),
            y.shape()
        )));
    }
    let w = WINDOW_FRAMES * WINDOW_FEATURES * 4;
    x.data()
        .chunks_exact(w)
        .zip(y.data())
        .map(|(c, &l)| {
            if l as usize >= swimlane_core::NUM_CLASSES {
                return Err(bad(format!("label {l} out of range")));
            }
            let label = ClassId(l);
            let frames = swimlane_core::batch::f32s_from_le(c);
            Ok(Sample { frames, label })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::Swimmer;
    use rand::SeedableRng;

    #[test]
    fn round_trip() {
        let s = Swimmer::new(4).windows(13, &mut rand_chacha::ChaCha8Rng::seed_from_u64(4));
        let b = to_bytes(&s).unwrap();
        assert_eq!(from_bytes(&b).unwrap(), s);
        assert!(from_bytes(&b[..b.len() - 3]).is_err());
        assert!(from_bytes(b"nope").is_err());
    }
}
