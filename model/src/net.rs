//! The micro model: input normalisation + an MLP over the flattened window, and its
//! safetensors format.
//!
//! # Architecture
//! `x` (32 frames × 16 features, flattened to 512) → `(x - mean) / std` (per feature,
//! the same for every frame; stored in the weights as `norm.mean`, `norm.std`, shape
//! [16]) → Linear 512→128 → ReLU → Linear 128→64 → ReLU → Linear 64→6 → logits.
//! 74,310 parameters, about 300 kB serialised.
//!
//! # Format (version 1)
//! A safetensors file, all tensors F32 little-endian, weights `[out, in]` as in PyTorch:
//! `norm.mean` [16], `norm.std` [16], `fc1.weight` [128,512], `fc1.bias` [128],
//! `fc2.weight` [64,128], `fc2.bias` [64], `fc3.weight` [6,64], `fc3.bias` [6].
//! `__metadata__`: `format` = `swimlane-micro-model`, `format_version` = `1`,
//! `architecture` = `mlp-512-128-64-6`, `classes` = the wire names in index order,
//! `window` = `32x16`. Loading rejects any other format, version, architecture, class
//! list, missing or misshapen tensor, or non-finite value, with an error, never a panic.
use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, SafeTensors};
use swimlane_core::{StrokeClass, NUM_CLASSES, WINDOW_FEATURES, WINDOW_FRAMES};

use crate::{ModelError, Sample};

/// Input width: one flattened window.
pub const INPUT: usize = WINDOW_FRAMES * WINDOW_FEATURES;
/// Hidden layer widths.
pub const HIDDEN: [usize; 2] = [128, 64];
/// The format version written by [`MicroModel::to_bytes`]; the only one accepted.
pub const FORMAT_VERSION: u32 = 1;
/// The `format` metadata value.
pub const FORMAT_NAME: &str = "swimlane-micro-model";
/// The `architecture` metadata value.
pub const ARCHITECTURE: &str = "mlp-512-128-64-6";
/// Upper bound on a serialised model (the phone budget); [`MicroModel::from_bytes`]
/// refuses anything larger before parsing.
pub const MAX_MODEL_BYTES: usize = 1 << 20;

/// Names and shapes of the stored tensors, in the order of [`MicroModel::params`]
/// (after the two normalisation tensors).
pub(crate) const TENSORS: [(&str, &[usize]); 8] = [
    ("norm.mean", &[WINDOW_FEATURES]),
    ("norm.std", &[WINDOW_FEATURES]),
    ("fc1.weight", &[HIDDEN[0], INPUT]),
    ("fc1.bias", &[HIDDEN[0]]),
    ("fc2.weight", &[HIDDEN[1], HIDDEN[0]]),
    ("fc2.bias", &[HIDDEN[1]]),
    ("fc3.weight", &[NUM_CLASSES, HIDDEN[1]]),
    ("fc3.bias", &[NUM_CLASSES]),
];

/// A micro model. Cheap to clone? No: `clone` deep-copies the weights (a fine-tune
/// never changes its parent).
#[derive(Debug)]
pub struct MicroModel {
    /// Per-feature normalisation, shape [16] each (kept for serialisation).
    mean: Vec<f32>,
    std: Vec<f32>,
    /// Tiled to the flattened window: shape [1, 512].
    mean_row: Tensor,
    inv_std_row: Tensor,
    /// fc1.w, fc1.b, fc2.w, fc2.b, fc3.w, fc3.b.
    params: Vec<Var>,
}

impl Clone for MicroModel {
    fn clone(&self) -> Self {
        let params = self
            .params
            .iter()
            .map(|v| Var::from_tensor(&v.as_tensor().copy().expect("cpu copy")).expect("var"))
            .collect();
        MicroModel {
            mean: self.mean.clone(),
            std: self.std.clone(),
            mean_row: self.mean_row.clone(),
            inv_std_row: self.inv_std_row.clone(),
            params,
        }
    }
}

fn tile(v: &[f32]) -> Vec<f32> {
    (0..WINDOW_FRAMES).flat_map(|_| v.iter().copied()).collect()
}

impl MicroModel {
    /// A freshly initialised model (PyTorch's default `Linear` init, from `seed`), with
    /// the normalisation computed from `samples` (per-feature mean and std over every
    /// frame of every window; std floored at 1e-3).
    pub fn init(samples: &[Sample], seed: u64) -> Result<MicroModel, ModelError> {
        let (mean, std) = feature_stats(samples);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = Vec::new();
        for (_, shape) in &TENSORS[2..] {
            let fan_in = if shape.len() == 2 {
                shape[1]
            } else {
                params_fan_in(params.len())
            };
            let bound = 1.0 / (fan_in as f32).sqrt();
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
            params.push(Var::from_tensor(&Tensor::from_vec(
                data,
                *shape,
                &Device::Cpu,
            )?)?);
        }
        Self::assemble(mean, std, params)
    }

    fn assemble(mean: Vec<f32>, std: Vec<f32>, params: Vec<Var>) -> Result<MicroModel, ModelError> {
        let mean_row = Tensor::from_vec(tile(&mean), (1, INPUT), &Device::Cpu)?;
        let inv: Vec<f32> = std.iter().map(|s| 1.0 / s).collect();
        let inv_std_row = Tensor::from_vec(tile(&inv), (1, INPUT), &Device::Cpu)?;
        Ok(MicroModel {
            mean,
            std,
            mean_row,
            inv_std_row,
            params,
        })
    }

    /// The trainable parameters (fc1.w, fc1.b, fc2.w, fc2.b, fc3.w, fc3.b).
    pub fn params(&self) -> &[Var] {
        &self.params
    }

    /// Logits for a batch `x` of shape [batch, 512].
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = &self.params;
        let x = x
            .broadcast_sub(&self.mean_row)?
            .broadcast_mul(&self.inv_std_row)?;
        let h = x.matmul(&p[0].t()?)?.broadcast_add(&p[1])?.relu()?;
        let h = h.matmul(&p[2].t()?)?.broadcast_add(&p[3])?.relu()?;
        h.matmul(&p[4].t()?)?.broadcast_add(&p[5])
    }

    /// Class probabilities for each window (each a flattened 32×16 window).
    pub fn predict_proba(&self, windows: &[&[f32]]) -> Result<Vec<[f32; NUM_CLASSES]>, ModelError> {
        if windows.is_empty() {
            return Ok(Vec::new());
        }
        let mut flat = Vec::with_capacity(windows.len() * INPUT);
        for (i, w) in windows.iter().enumerate() {
            if w.len() != INPUT {
                return Err(ModelError::BadWindow {
                    index: i,
                    len: w.len(),
                });
            }
            flat.extend_from_slice(w);
        }
        let x = Tensor::from_vec(flat, (windows.len(), INPUT), &Device::Cpu)?;
        let p = candle_nn::ops::softmax(&self.forward(&x)?, D::Minus1)?;
        let rows: Vec<Vec<f32>> = p.to_vec2()?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let mut a = [0f32; NUM_CLASSES];
                a.copy_from_slice(&r);
                a
            })
            .collect())
    }

    /// Class probabilities for samples (their labels are ignored).
    pub fn predict_proba_samples(
        &self,
        samples: &[Sample],
    ) -> Result<Vec<[f32; NUM_CLASSES]>, ModelError> {
        let refs: Vec<&[f32]> = samples.iter().map(|s| s.frames.as_slice()).collect();
        self.predict_proba(&refs)
    }

    /// The most likely class of each sample.
    pub fn predict(&self, samples: &[Sample]) -> Result<Vec<StrokeClass>, ModelError> {
        Ok(self
            .predict_proba_samples(samples)?
            .iter()
            .map(|p| argmax_class(p))
            .collect())
    }

    /// Serialise as safetensors with the version header (see the module doc).
    pub fn to_bytes(&self) -> Vec<u8> {
        let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut data: Vec<Vec<u8>> = vec![le(&self.mean), le(&self.std)];
        for var in &self.params {
            let v: Vec<f32> = var
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .expect("f32 cpu tensor");
            data.push(le(&v));
        }
        let entries: Vec<crate::st::Entry<'_>> = TENSORS
            .iter()
            .zip(&data)
            .map(|((name, shape), d)| crate::st::Entry {
                name,
                dtype: "F32",
                shape: shape.to_vec(),
                data: d,
            })
            .collect();
        crate::st::write(&entries, &metadata())
    }

    /// Load a model written by [`MicroModel::to_bytes`]. Never panics: garbage, a
    /// different version or architecture, or a damaged tensor give a [`ModelError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<MicroModel, ModelError> {
        if bytes.len() > MAX_MODEL_BYTES {
            return Err(ModelError::Format(format!(
                "{} bytes is more than the {} byte limit",
                bytes.len(),
                MAX_MODEL_BYTES
            )));
        }
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| ModelError::Format(format!("not a safetensors file: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| ModelError::Format(format!("bad header: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| meta.get(k).map(String::as_str).unwrap_or("");
        if get("format") != FORMAT_NAME {
            return Err(ModelError::Format(format!(
                "format {:?} is not {FORMAT_NAME:?}",
                get("format")
            )));
        }
        let version = get("format_version");
        if version != FORMAT_VERSION.to_string() {
            return Err(ModelError::UnsupportedVersion(version.to_string()));
        }
        if get("architecture") != ARCHITECTURE {
            return Err(ModelError::Format(format!(
                "architecture {:?} is not {ARCHITECTURE:?}",
                get("architecture")
            )));
        }
        if get("classes") != class_list() {
            return Err(ModelError::Format(format!(
                "class list {:?} is not {:?}",
                get("classes"),
                class_list()
            )));
        }
        if st.len() != TENSORS.len() {
            return Err(ModelError::Format(format!(
                "{} tensors, expected {}",
                st.len(),
                TENSORS.len()
            )));
        }
        let mut values: Vec<Vec<f32>> = Vec::new();
        for (name, shape) in TENSORS {
            let view = st
                .tensor(name)
                .map_err(|_| ModelError::Format(format!("missing tensor {name}")))?;
            if view.dtype() != Dtype::F32 || view.shape() != shape {
                return Err(ModelError::Format(format!(
                    "tensor {name}: {:?} {:?}, expected F32 {:?}",
                    view.dtype(),
                    view.shape(),
                    shape
                )));
            }
            let v: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if v.iter().any(|x| !x.is_finite()) {
                return Err(ModelError::Format(format!(
                    "tensor {name} holds a non-finite value"
                )));
            }
            values.push(v);
        }
        if values[1].iter().any(|s| *s <= 0.0) {
            return Err(ModelError::Format("norm.std must be positive".into()));
        }
        let mut it = values.into_iter();
        let mean = it.next().unwrap_or_default();
        let std = it.next().unwrap_or_default();
        let mut params = Vec::new();
        for ((_, shape), v) in TENSORS[2..].iter().zip(it) {
            params.push(Var::from_tensor(&Tensor::from_vec(
                v,
                *shape,
                &Device::Cpu,
            )?)?);
        }
        Self::assemble(mean, std, params)
    }

    /// Overwrite this model's parameters with `other`'s (used to restore the best epoch).
    pub(crate) fn snapshot(&self) -> Result<Vec<Tensor>, ModelError> {
        Ok(self
            .params
            .iter()
            .map(|v| v.as_tensor().copy().map(|t| t.detach()))
            .collect::<candle_core::Result<_>>()?)
    }

    pub(crate) fn restore(&self, snap: &[Tensor]) -> Result<(), ModelError> {
        for (v, t) in self.params.iter().zip(snap) {
            v.set(t)?;
        }
        Ok(())
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|v| v.elem_count()).sum()
    }

    /// The stored normalisation (per feature mean and std).
    pub fn normalisation(&self) -> (&[f32], &[f32]) {
        (&self.mean, &self.std)
    }
}

fn params_fan_in(index: usize) -> usize {
    // Biases take the fan-in of the weight before them: fc1.b, fc2.b, fc3.b.
    match index {
        1 => INPUT,
        3 => HIDDEN[0],
        _ => HIDDEN[1],
    }
}

fn class_list() -> String {
    StrokeClass::ALL
        .iter()
        .map(|c| c.name())
        .collect::<Vec<_>>()
        .join(",")
}

fn metadata() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".to_string(), FORMAT_NAME.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("architecture".to_string(), ARCHITECTURE.to_string()),
        ("classes".to_string(), class_list()),
        (
            "window".to_string(),
            format!("{WINDOW_FRAMES}x{WINDOW_FEATURES}"),
        ),
    ])
}

/// Per-feature mean and std over every frame of every sample.
pub fn feature_stats(samples: &[Sample]) -> (Vec<f32>, Vec<f32>) {
    let mut sum = [0f64; WINDOW_FEATURES];
    let mut sq = [0f64; WINDOW_FEATURES];
    let mut n = 0f64;
    for s in samples {
        for row in s.frames.chunks_exact(WINDOW_FEATURES) {
            for (j, v) in row.iter().enumerate() {
                sum[j] += *v as f64;
                sq[j] += (*v as f64) * (*v as f64);
            }
            n += 1.0;
        }
    }
    if n == 0.0 {
        return (vec![0.0; WINDOW_FEATURES], vec![1.0; WINDOW_FEATURES]);
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
    let std: Vec<f32> = sq
        .iter()
        .zip(&sum)
        .map(|(q, s)| ((q / n - (s / n) * (s / n)).max(0.0).sqrt() as f32).max(1e-3))
        .collect();
    (mean, std)
}

/// The class with the highest probability (the first on ties).
pub fn argmax_class(p: &[f32; NUM_CLASSES]) -> StrokeClass {
    let mut best = 0;
    for i in 1..NUM_CLASSES {
        if p[i] > p[best] {
            best = i;
        }
    }
    StrokeClass::ALL[best]
}

/// Flatten samples into a [n, 512] tensor and a [n] u32 label tensor.
pub(crate) fn to_tensors(samples: &[Sample]) -> Result<(Tensor, Tensor), ModelError> {
    let mut flat = Vec::with_capacity(samples.len() * INPUT);
    for (i, s) in samples.iter().enumerate() {
        if s.frames.len() != INPUT {
            return Err(ModelError::BadWindow {
                index: i,
                len: s.frames.len(),
            });
        }
        flat.extend_from_slice(&s.frames);
    }
    let labels: Vec<u32> = samples.iter().map(|s| s.label.index() as u32).collect();
    let x = Tensor::from_vec(flat, (samples.len(), INPUT), &Device::Cpu)?;
    let y = Tensor::from_vec(labels, samples.len(), &Device::Cpu)?;
    debug_assert_eq!(y.dtype(), DType::U32);
    Ok((x, y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::Swimmer;

    fn model() -> (MicroModel, Vec<Sample>) {
        let s = Swimmer::new(1).windows(24, &mut ChaCha8Rng::seed_from_u64(1));
        (MicroModel::init(&s, 1).unwrap(), s)
    }

    #[test]
    fn round_trips_bytes_and_fits_the_budget() {
        let (m, s) = model();
        let bytes = m.to_bytes();
        assert!(bytes.len() <= MAX_MODEL_BYTES, "{}", bytes.len());
        let m2 = MicroModel::from_bytes(&bytes).unwrap();
        assert!(m2.to_bytes() == bytes);
        assert_eq!(
            m.predict_proba_samples(&s).unwrap(),
            m2.predict_proba_samples(&s).unwrap()
        );
        assert_eq!(m.num_params(), 74_310);
    }

    #[test]
    fn garbage_and_other_versions_are_errors_not_panics() {
        let (m, _) = model();
        let bytes = m.to_bytes();
        assert!(MicroModel::from_bytes(b"").is_err());
        assert!(MicroModel::from_bytes(b"hello world, not a model").is_err());
        assert!(MicroModel::from_bytes(&[0xff; 64]).is_err());
        for cut in [1, 8, 100, bytes.len() / 2, bytes.len() - 1] {
            assert!(MicroModel::from_bytes(&bytes[..cut]).is_err());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..200 {
            let mut b = bytes.clone();
            let i = rng.random_range(0..b.len().min(600));
            b[i] = rng.random();
            let _ = MicroModel::from_bytes(&b); // may succeed (a weight changed) but never panics
        }
        let needle = b"\"format_version\":\"1\"";
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("version in header");
        let mut b = bytes.clone();
        b[at + needle.len() - 2] = b'2';
        assert!(
            matches!(MicroModel::from_bytes(&b), Err(ModelError::UnsupportedVersion(v)) if v == "2")
        );
    }

    #[test]
    fn rejects_wrong_window_length() {
        let (m, _) = model();
        assert!(matches!(
            m.predict_proba(&[&[0.0; 10]]),
            Err(ModelError::BadWindow { index: 0, len: 10 })
        ));
        let p = m.predict_proba(&[&[0.5; INPUT]]).unwrap();
        assert!((p[0].iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}
