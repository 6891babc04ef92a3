//! The micro model: input normalisation + an MLP over the flattened window, and its
//! safetensors format.
//!
//! # Architecture
//! The shapes come from the model's [`ModelSpec`] (F frames × C channels, K classes):
//! `x` (F × C, flattened to F·C) → `(x - mean) / std` (per channel, the same for every
//! frame; stored in the weights as `norm.mean`, `norm.std`, shape [C]) → Linear F·C→128
//! → ReLU → Linear 128→64 → ReLU → Linear 64→K → logits. For the synthetic pose spec
//! (32 × 16, 6 classes): 74,310 parameters, about 300 kB serialised.
//!
//! # Format (version 2)
//! A safetensors file, all tensors F32 little-endian, weights `[out, in]` as in PyTorch:
//! `norm.mean` [C], `norm.std` [C], `fc1.weight` [128,F·C], `fc1.bias` [128],
//! `fc2.weight` [64,128], `fc2.bias` [64], `fc3.weight` [K,64], `fc3.bias` [K].
//! `__metadata__`: `format` = `swimlane-micro-model`, `format_version` = `2`,
//! `architecture` = `mlp-{F·C}-128-64-{K}`, `spec` = the [`ModelSpec`] as JSON,
//! `classes` = the class names in index order, `window` = `FxC`. Version 1 files (no
//! `spec`) are read as the synthetic pose spec. Loading rejects any other format,
//! version, architecture, spec, class list, missing or misshapen tensor, or non-finite
//! value, with an error, never a panic. Whether the spec is the deployment's is the
//! caller's check ([`MicroModel::spec`], `ModelSpec::ensure_same`).
use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, SafeTensors};
use swimlane_core::{ClassId, ModelSpec};

use crate::{ModelError, Sample};

/// Hidden layer widths.
pub const HIDDEN: [usize; 2] = [128, 64];
/// The format version written by [`MicroModel::to_bytes`].
pub const FORMAT_VERSION: u32 = 2;
/// The format version before specs existed (read as the synthetic pose spec).
const FORMAT_VERSION_1: u32 = 1;
/// The `format` metadata value.
pub const FORMAT_NAME: &str = "swimlane-micro-model";
/// Upper bound on a serialised model (the phone budget); [`MicroModel::from_bytes`]
/// refuses anything larger before parsing.
pub const MAX_MODEL_BYTES: usize = 1 << 20;

/// The `architecture` metadata value for a spec.
pub fn architecture(spec: &ModelSpec) -> String {
    format!(
        "mlp-{}-{}-{}-{}",
        spec.window_values(),
        HIDDEN[0],
        HIDDEN[1],
        spec.num_classes()
    )
}

/// A stored model (safetensors or ONNX) must say the architecture and the class list of
/// the spec it records: a file whose metadata disagree is refused, naming both.
pub(crate) fn check_stored_spec(
    spec: &ModelSpec,
    stored_architecture: &str,
    stored_classes: &str,
) -> Result<(), ModelError> {
    let want = architecture(spec);
    if stored_architecture != want {
        return Err(ModelError::Format(format!(
            "architecture {stored_architecture:?} is not {want:?}"
        )));
    }
    let classes = spec.classes.join(",");
    if stored_classes != classes {
        return Err(ModelError::Format(format!(
            "class list {stored_classes:?} is not {classes:?}"
        )));
    }
    Ok(())
}

/// Names and shapes of the stored tensors for a spec, in the order of
/// [`MicroModel::params`] (after the two normalisation tensors).
pub(crate) fn tensors(spec: &ModelSpec) -> [(&'static str, Vec<usize>); 8] {
    let (c, input, k) = (
        spec.channels.len(),
        spec.window_values(),
        spec.num_classes(),
    );
    [
        ("norm.mean", vec![c]),
        ("norm.std", vec![c]),
        ("fc1.weight", vec![HIDDEN[0], input]),
        ("fc1.bias", vec![HIDDEN[0]]),
        ("fc2.weight", vec![HIDDEN[1], HIDDEN[0]]),
        ("fc2.bias", vec![HIDDEN[1]]),
        ("fc3.weight", vec![k, HIDDEN[1]]),
        ("fc3.bias", vec![k]),
    ]
}

/// A micro model. Cheap to clone? No: `clone` deep-copies the weights (a fine-tune
/// never changes its parent).
#[derive(Debug)]
pub struct MicroModel {
    /// What a window is and the classes, in output order.
    spec: Arc<ModelSpec>,
    /// Per-channel normalisation, shape [C] each (kept for serialisation).
    mean: Vec<f32>,
    std: Vec<f32>,
    /// Tiled to the flattened window: shape [1, F·C].
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
            spec: self.spec.clone(),
            mean: self.mean.clone(),
            std: self.std.clone(),
            mean_row: self.mean_row.clone(),
            inv_std_row: self.inv_std_row.clone(),
            params,
        }
    }
}

fn tile(v: &[f32], frames: usize) -> Vec<f32> {
    (0..frames).flat_map(|_| v.iter().copied()).collect()
}

impl MicroModel {
    /// A freshly initialised model for `spec` (PyTorch's default `Linear` init, from
    /// `seed`), with the normalisation computed from `samples` (per-channel mean and std
    /// over every frame of every window; std floored at 1e-3).
    pub fn init(spec: &ModelSpec, samples: &[Sample], seed: u64) -> Result<MicroModel, ModelError> {
        check_windows(spec, samples)?;
        let (mean, std) = feature_stats(spec.channels.len(), samples);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = Vec::new();
        let shapes = tensors(spec);
        for (i, (_, shape)) in shapes[2..].iter().enumerate() {
            // A bias takes the fan-in of the weight before it.
            let fan_in = if shape.len() == 2 {
                shape[1]
            } else {
                shapes[2 + i - 1].1[1]
            };
            let bound = 1.0 / (fan_in as f32).sqrt();
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
            params.push(Var::from_tensor(&Tensor::from_vec(
                data,
                shape.as_slice(),
                &Device::Cpu,
            )?)?);
        }
        Self::assemble(Arc::new(spec.clone()), mean, std, params)
    }

    fn assemble(
        spec: Arc<ModelSpec>,
        mean: Vec<f32>,
        std: Vec<f32>,
        params: Vec<Var>,
    ) -> Result<MicroModel, ModelError> {
        let input = spec.window_values();
        let mean_row = Tensor::from_vec(tile(&mean, spec.frames), (1, input), &Device::Cpu)?;
        let inv: Vec<f32> = std.iter().map(|s| 1.0 / s).collect();
        let inv_std_row = Tensor::from_vec(tile(&inv, spec.frames), (1, input), &Device::Cpu)?;
        Ok(MicroModel {
            spec,
            mean,
            std,
            mean_row,
            inv_std_row,
            params,
        })
    }

    /// The spec this model was made for.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Values in one input window (frames × channels).
    pub fn input_len(&self) -> usize {
        self.spec.window_values()
    }

    /// The trainable parameters (fc1.w, fc1.b, fc2.w, fc2.b, fc3.w, fc3.b).
    pub fn params(&self) -> &[Var] {
        &self.params
    }

    /// `x` ([batch, 512]) normalised with the model's per-channel statistics: the first
    /// step of [`MicroModel::forward`].
    /// One pass over `x` for a contiguous CPU `x` (two candle ops were two passes and a
    /// fresh buffer between them: 7.5% of the validator's CPU).
    pub(crate) fn normalise(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, cols) = x.dims2()?;
        let fused = crate::backprop::with_f32(x, |x| {
            crate::backprop::with_f32(&self.mean_row, |mean| {
                crate::backprop::with_f32(&self.inv_std_row, |inv| {
                    if mean.len() != cols || inv.len() != cols {
                        return None;
                    }
                    let mut out = Vec::with_capacity(x.len());
                    for row in x.chunks_exact(cols) {
                        out.extend(row.iter().zip(mean).zip(inv).map(|((v, m), s)| (v - m) * s));
                    }
                    Some(out)
                })
            })
        });
        match fused {
            Ok(Ok(Ok(Some(out)))) => Tensor::from_vec(out, (rows, cols), x.device()),
            // Not contiguous f32 on the CPU, or the wrong width: candle's own ops say why.
            _ => x
                .broadcast_sub(&self.mean_row)?
                .broadcast_mul(&self.inv_std_row),
        }
    }

    /// The parameters' tensors, untracked by autograd: they share the parameters'
    /// storage, so they see every update made in place.
    pub(crate) fn detached_params(&self) -> Vec<Tensor> {
        self.params.iter().map(|v| v.as_tensor().detach()).collect()
    }

    /// Logits for a batch `x` of shape [batch, 512].
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = &self.params;
        let x = self.normalise(x)?;
        let h = x.matmul(&p[0].t()?)?.broadcast_add(&p[1])?.relu()?;
        let h = h.matmul(&p[2].t()?)?.broadcast_add(&p[3])?.relu()?;
        h.matmul(&p[4].t()?)?.broadcast_add(&p[5])
    }

    /// Class probabilities for each window (each a flattened frames × channels window),
    /// one row of `spec.classes.len()` per window.
    pub fn predict_proba(&self, windows: &[&[f32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        if windows.is_empty() {
            return Ok(Vec::new());
        }
        let input = self.input_len();
        let flat = flatten_windows(windows, input)?;
        let x = Tensor::from_vec(flat, (windows.len(), input), &Device::Cpu)?;
        // The network through `backprop::logits` (the bias and ReLU in single loops, no
        // autograd record), then each row's softmax.
        let logits = crate::backprop::logits(&self.detached_params(), &self.normalise(&x)?)?;
        Ok(crate::backprop::softmax_rows(
            &logits,
            self.spec.num_classes(),
        ))
    }

    /// Class probabilities for samples (their labels are ignored).
    pub fn predict_proba_samples(&self, samples: &[Sample]) -> Result<Vec<Vec<f32>>, ModelError> {
        let refs: Vec<&[f32]> = samples.iter().map(|s| s.frames.as_slice()).collect();
        self.predict_proba(&refs)
    }

    /// The most likely class of each sample.
    pub fn predict(&self, samples: &[Sample]) -> Result<Vec<ClassId>, ModelError> {
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
        let entries: Vec<crate::st::Entry<'_>> = tensors(&self.spec)
            .into_iter()
            .zip(&data)
            .map(|((name, shape), d)| crate::st::Entry {
                name,
                dtype: "F32",
                shape,
                data: d,
            })
            .collect();
        crate::st::write(&entries, &metadata(&self.spec))
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
        let spec = if version == FORMAT_VERSION.to_string() {
            ModelSpec::from_json(get("spec").as_bytes())
                .map_err(|e| ModelError::Format(format!("spec: {e}")))?
        } else if version == FORMAT_VERSION_1.to_string() {
            ModelSpec::synthetic_pose()
        } else {
            return Err(ModelError::UnsupportedVersion(version.to_string()));
        };
        check_stored_spec(&spec, get("architecture"), get("classes"))?;
        let shapes = tensors(&spec);
        if st.len() != shapes.len() {
            return Err(ModelError::Format(format!(
                "{} tensors, expected {}",
                st.len(),
                shapes.len()
            )));
        }
        let mut values: Vec<Vec<f32>> = Vec::new();
        for (name, shape) in &shapes {
            let view = st
                .tensor(name)
                .map_err(|_| ModelError::Format(format!("missing tensor {name}")))?;
            if view.dtype() != Dtype::F32 || view.shape() != shape.as_slice() {
                return Err(ModelError::Format(format!(
                    "tensor {name}: {:?} {:?}, expected F32 {:?}",
                    view.dtype(),
                    view.shape(),
                    shape
                )));
            }
            let v = swimlane_core::batch::f32s_from_le(view.data());
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
        for ((_, shape), v) in shapes[2..].iter().zip(it) {
            params.push(Var::from_tensor(&Tensor::from_vec(
                v,
                shape.as_slice(),
                &Device::Cpu,
            )?)?);
        }
        Self::assemble(Arc::new(spec), mean, std, params)
    }

    /// Load a model and check that it was made for `spec` (the deployment's): what the
    /// trainer, the validator and the publisher call, so that a model of another spec is
    /// never trained on, scored or served.
    pub fn load_for(bytes: &[u8], spec: &ModelSpec) -> Result<MicroModel, ModelError> {
        let m = MicroModel::from_bytes(bytes)?;
        spec.ensure_same(m.spec())?;
        Ok(m)
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

/// Every sample's window has the spec's length and every label is one of its classes.
pub(crate) fn check_windows(spec: &ModelSpec, samples: &[Sample]) -> Result<(), ModelError> {
    for (index, s) in samples.iter().enumerate() {
        if s.frames.len() != spec.window_values() {
            return Err(ModelError::BadWindow {
                index,
                len: s.frames.len(),
                expected: spec.window_values(),
            });
        }
        if s.label.index() >= spec.num_classes() {
            return Err(ModelError::BadLabel {
                index,
                label: s.label.index(),
                classes: spec.num_classes(),
            });
        }
    }
    Ok(())
}

fn metadata(spec: &ModelSpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".to_string(), FORMAT_NAME.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("architecture".to_string(), architecture(spec)),
        ("spec".to_string(), spec.to_json()),
        ("classes".to_string(), spec.classes.join(",")),
        (
            "window".to_string(),
            format!("{}x{}", spec.frames, spec.channels.len()),
        ),
    ])
}

/// Per-channel mean and std over every frame of every sample.
pub fn feature_stats(channels: usize, samples: &[Sample]) -> (Vec<f32>, Vec<f32>) {
    let mut sum = vec![0f64; channels];
    let mut sq = vec![0f64; channels];
    let mut n = 0f64;
    for s in samples {
        for row in s.frames.chunks_exact(channels) {
            for (j, v) in row.iter().enumerate() {
                sum[j] += *v as f64;
                sq[j] += (*v as f64) * (*v as f64);
            }
            n += 1.0;
        }
    }
    if n == 0.0 {
        return (vec![0.0; channels], vec![1.0; channels]);
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
pub fn argmax_class(p: &[f32]) -> ClassId {
    let mut best = 0;
    for i in 1..p.len() {
        if p[i] > p[best] {
            best = i;
        }
    }
    ClassId(best as u8)
}

/// Flatten samples into a [n, F·C] tensor and a [n] u32 label tensor (checked
/// against the spec).
pub(crate) fn to_tensors(
    spec: &ModelSpec,
    samples: &[Sample],
) -> Result<(Tensor, Tensor), ModelError> {
    check_windows(spec, samples)?;
    let input = spec.window_values();
    let mut flat = Vec::with_capacity(samples.len() * input);
    for s in samples {
        flat.extend_from_slice(&s.frames);
    }
    let labels: Vec<u32> = samples.iter().map(|s| s.label.index() as u32).collect();
    let x = Tensor::from_vec(flat, (samples.len(), input), &Device::Cpu)?;
    let y = Tensor::from_vec(labels, samples.len(), &Device::Cpu)?;
    debug_assert_eq!(y.dtype(), DType::U32);
    Ok((x, y))
}

/// `windows` one after the other, each checked to hold `input` values.
pub(crate) fn flatten_windows(windows: &[&[f32]], input: usize) -> Result<Vec<f32>, ModelError> {
    let mut flat = Vec::with_capacity(windows.len() * input);
    for (i, w) in windows.iter().enumerate() {
        if w.len() != input {
            return Err(ModelError::BadWindow {
                index: i,
                len: w.len(),
                expected: input,
            });
        }
        flat.extend_from_slice(w);
    }
    Ok(flat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::Swimmer;

    fn model() -> (MicroModel, Vec<Sample>) {
        let s = Swimmer::new(1).windows(24, &mut ChaCha8Rng::seed_from_u64(1));
        (
            MicroModel::init(&ModelSpec::synthetic_pose(), &s, 1).unwrap(),
            s,
        )
    }

    /// The probabilities (computed through `backprop::logits`) are candle's softmax of
    /// [`MicroModel::forward`].
    #[test]
    fn probabilities_are_the_softmax_of_the_forward_pass() {
        let (m, s) = model();
        let ours = m.predict_proba_samples(&s).unwrap();
        let (x, _) = to_tensors(m.spec(), &s).unwrap();
        let theirs: Vec<Vec<f32>> =
            candle_nn::ops::softmax(&m.forward(&x).unwrap(), candle_core::D::Minus1)
                .unwrap()
                .to_vec2()
                .unwrap();
        assert_eq!(ours.len(), s.len());
        for (p, q) in ours.iter().zip(&theirs) {
            assert_eq!(p.len(), q.len());
            for (a, b) in p.iter().zip(q) {
                assert!((a - b).abs() < 1e-6, "{p:?} vs {q:?}");
            }
        }
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
        let needle = b"\"format_version\":\"2\"";
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("version in header");
        let mut b = bytes.clone();
        b[at + needle.len() - 2] = b'3';
        assert!(
            matches!(MicroModel::from_bytes(&b), Err(ModelError::UnsupportedVersion(v)) if v == "3")
        );
    }

    #[test]
    fn a_model_records_its_spec_and_another_spec_is_another_shape() {
        let watch = ModelSpec::smartwatch();
        let s: Vec<Sample> = (0..20)
            .map(|i| Sample {
                frames: vec![i as f32 * 0.1; 384],
                label: ClassId((i % 6) as u8),
            })
            .collect();
        let m = MicroModel::init(&watch, &s, 2).unwrap();
        let back = MicroModel::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(back.spec(), &watch);
        assert_eq!(back.predict_proba_samples(&s).unwrap()[0].len(), 6);
        assert!(ModelSpec::synthetic_pose()
            .ensure_same(back.spec())
            .is_err());
        // What the trainer, validator and publisher call: the other spec is refused.
        let e = MicroModel::load_for(&m.to_bytes(), &ModelSpec::synthetic_pose()).unwrap_err();
        assert!(
            e.to_string().contains("made for spec \"smartwatch\""),
            "{e}"
        );
        assert!(MicroModel::load_for(&m.to_bytes(), &watch).is_ok());
        // Pose windows do not fit a smartwatch model.
        let (pose, pose_samples) = model();
        assert!(matches!(
            back.predict(&pose_samples),
            Err(ModelError::BadWindow { expected: 384, .. })
        ));
        assert!(MicroModel::init(&watch, &pose_samples, 1).is_err());
        assert_eq!(pose.spec(), &ModelSpec::synthetic_pose());
    }

    #[test]
    fn rejects_wrong_window_length() {
        let (m, _) = model();
        assert!(matches!(
            m.predict_proba(&[&[0.0; 10]]),
            Err(ModelError::BadWindow {
                index: 0,
                len: 10,
                expected: 512
            })
        ));
        let p = m.predict_proba(&[&[0.5; 512]]).unwrap();
        assert!((p[0].iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    /// The one-pass normalisation computes exactly what candle's two broadcast ops do.
    #[test]
    fn normalise_is_candles_broadcast_sub_then_mul() {
        let (m, s) = model();
        let rows: Vec<f32> = s.iter().flat_map(|w| w.frames.iter().copied()).collect();
        let x = Tensor::from_vec(rows, (s.len(), 512), &Device::Cpu).unwrap();
        let ours: Vec<f32> = m
            .normalise(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let candle: Vec<f32> = x
            .broadcast_sub(&m.mean_row)
            .unwrap()
            .broadcast_mul(&m.inv_std_row)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ours.len(), candle.len());
        assert!(ours
            .iter()
            .zip(&candle)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        // A window of the wrong width is an error, as candle's ops make it.
        let bad = Tensor::zeros((2, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(m.normalise(&bad).is_err());
    }
}
