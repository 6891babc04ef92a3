//! The micro model as ONNX, for phones: export, loading, evaluation and the parity
//! check against candle.
//!
//! # The graph (opset 17, IR version 8)
//! Shown for the synthetic pose spec (32 frames × 16 channels, 6 classes); every shape
//! comes from the model's spec.
//! ```text
//! window  float32 [batch, 32, 16]            (frames × features, as uploaded)
//!   Sub   norm.mean     [16]                 per-feature mean
//!   Mul   norm.inv_std  [16]                 1 / per-feature std
//!   Flatten axis=1   → [batch, 512]
//!   Gemm  fc1.weight [128, 512] (transB=1) + fc1.bias → Relu
//!   Gemm  fc2.weight [64, 128]  (transB=1) + fc2.bias → Relu
//!   Gemm  fc3.weight [6, 64]    (transB=1) + fc3.bias
//!   Softmax axis=-1
//! probabilities  float32 [batch, 6]          in the order of `labels`
//! ```
//! The batch dimension is symbolic (`batch`): any number of windows per call. The
//! normalisation is inside the graph, so the device feeds raw keypoints. Every op is in
//! ONNX's default domain and supported by ONNX Runtime (including Mobile's default
//! build), candle-onnx and the usual Core ML / TFLite converters. Weights are float32
//! initializers (`raw_data`, little-endian); the file is about 298 kB.
//!
//! # The device's file: the base-model fallback
//! A personal version's file ([`export_device_checked`] with a [`Fallback`]) holds the
//! graph above twice, the personal model's (output `personal.probabilities`) and the
//! deployment's base model's (every name prefixed `base.`, output
//! `base.probabilities`), and the choice between them
//! (`swimlane_core::familiar`), all from the personal model's normalised window `flat`:
//! ```text
//! fam.mean    = Gemm(flat, fam.avg)          per-channel mean over frames   [batch, C]
//! fam.e2      = Gemm(flat * flat, fam.avg)   per-channel mean of squares    [batch, C]
//! fam.spread  = Sqrt(Relu(fam.e2 - fam.mean * fam.mean))
//! fam.features = Concat(fam.mean, fam.spread, axis=1)                       [batch, 2C]
//! for each group (own, foreign):  fam.G.inside = 1 - |f - c|² / r²  per centroid, as
//!   Gemm(f * f, -w) + Gemm(f, 2 w c) + (1 - w |c|²) with w = 1 / r²         [batch, n]
//!   fam.G.nearest = ReduceMax(fam.G.inside, axes=[1], keepdims=1)           [batch, 1]
//! fam.familiar = Sign(Relu(own - foreign) + Relu(own))   1 or 0             [batch, 1]
//! probabilities = base + Gemm(fam.familiar, w[1, K]) * (personal - base)
//! ```
//! with every entry of `w` the familiarity's `personal_weight` (the personal model's
//! share, `swimlane_core::familiar`): a familiar window gets the weighted
//! average of the two models' probabilities, any other the base model's. Its metadata
//! adds `fallback` (`base`), `base_weights_sha256`, `familiar_centroids` and
//! `personal_weight`. A version whose familiarity has no foreign centroid (it trained
//! on every class) knows every window: its file answers each with the weighted average
//! (`probabilities = base + w[K] * (personal - base)`, no `fam.*` features), or, with the
//! personal weight 1, is the plain file.
//!
//! The device's file is written in two parts ([`DeviceFile`],
//! [`export_device_parts_checked`]): first a `ModelProto` holding only the base model's
//! nodes and initializers (the same bytes for every file made with the same base model
//! and spec), then the rest. Protobuf decodes two encodings one after the other as one
//! message with their repeated fields appended, so the file is one model whose graph
//! lists the base model's nodes first (they read only the input, so the order stays
//! topological); ONNX Runtime, `onnx.checker` and candle-onnx load it
//! (`bench/onnx_check.sh`, the tests). A store can then keep the base model's part once.
//!
//! The normalisation multiplies by `1 / std` (computed in f32), exactly as
//! [`MicroModel::forward`] does, so both compute the same numbers up to summation
//! order inside the matrix products.
//!
//! # `metadata_props`
//! | key | value |
//! |---|---|
//! | `format` | `swimlane-micro-model` |
//! | `format_version` | `1` |
//! | `architecture` | `mlp-512-128-64-6` (`mlp-{F·C}-128-64-{K}`) |
//! | `spec` | the model's spec as JSON (`swimlane_core::ModelSpec`) |
//! | `labels` | the class names in output order, comma-separated (`freestyle,backstroke,...`) |
//! | `window` | `32x16` (frames x channels) |
//! | `features` | the channel names of a frame, comma-separated |
//! | `input` / `output` | the input and output names (`window`, `probabilities`) |
//! | `model_version` | the published version (`1`, `2`, ...) or `base` |
//! | `parent_version` | the version it was fine-tuned from, `base`, or empty for a base model |
//! | `training_run` | the training run that made it (empty for a base model) |
//! | `weights_sha256` | SHA-256 of the safetensors weights it was exported from |
//!
//! `ModelProto.model_version` is the published version (0 for a base model).
//!
//! # No protoc
//! The ONNX messages are [`proto`]: the subset of onnx.proto this project writes and
//! reads, hand-written prost structs with onnx.proto's field numbers, so building needs
//! no `protoc`. [`OnnxModel::predict_proba`] runs the decoded file's graph with a small
//! evaluator of its own (the private `eval` module): exactly the operators above, the
//! file's initializers, the nodes in the file's order; any other operator, attribute or
//! shape is a [`ModelError`]. The tests check both against candle-onnx (a
//! dev-dependency only): its generated types decode the exported bytes and re-encode
//! them byte for byte, and its evaluator computes what this one does.
use std::collections::BTreeMap;
use std::fmt;

use prost::Message;
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use swimlane_core::familiar::Familiarity;
use swimlane_core::{ClassId, ModelSpec};

use crate::net::{architecture, argmax_class, tensors, FORMAT_NAME};
use crate::{MicroModel, ModelError, FORMAT_VERSION, MAX_MODEL_BYTES};
use proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

mod eval;
pub mod proto;

/// The ONNX operator set the graph is written for (ONNX's default domain).
pub const OPSET: i64 = 17;
/// The ONNX IR version written (IR 8 goes with opset 17).
pub const IR_VERSION: i64 = 8;
/// Name of the graph's input.
pub const INPUT_NAME: &str = "window";
/// Name of the graph's output.
pub const OUTPUT_NAME: &str = "probabilities";
/// The symbolic batch dimension of the input and the output.
pub const BATCH_DIM: &str = "batch";
/// The parity criterion (issue 9) the parity tests assert on their fixed models: at
/// most this far from candle's probabilities.
pub const PARITY_TOLERANCE: f32 = 1e-5;

/// How far from candle's probabilities [`export_checked`] lets an export be before it
/// refuses it. Looser than [`PARITY_TOLERANCE`]: two float32 evaluations of the same
/// graph in another order differ by a few 1e-6 and, for some weights, by just over
/// 1e-5 (1.12e-5 seen in a chaos soak, every predicted class the same), and such a
/// model must still be published; a wrong graph differs by orders of magnitude more,
/// and every predicted class must agree as well.
pub const EXPORT_TOLERANCE: f32 = 1e-4;

/// A model a version refers to: the base model, or a user's published version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelRef {
    Base,
    Version(u64),
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRef::Base => f.write_str("base"),
            ModelRef::Version(v) => write!(f, "{v}"),
        }
    }
}

/// What the exported file says about where the model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lineage {
    /// This model: `Base` for the base model, else the user's published version.
    pub model_version: ModelRef,
    /// The model it was fine-tuned from (`None` for a base model).
    pub parent_version: Option<ModelRef>,
    /// The training run that made it (`None` for a base model).
    pub training_run: Option<String>,
}

impl Lineage {
    /// The lineage of a base model.
    pub fn base() -> Lineage {
        Lineage {
            model_version: ModelRef::Base,
            parent_version: None,
            training_run: None,
        }
    }
}

fn entry(key: &str, value: impl Into<String>) -> StringStringEntryProto {
    StringStringEntryProto {
        key: key.to_string(),
        value: value.into(),
    }
}

fn dims(shape: &[Option<usize>]) -> TensorShapeProto {
    TensorShapeProto {
        dim: shape
            .iter()
            .map(|d| tensor_shape_proto::Dimension {
                denotation: String::new(),
                value: Some(match d {
                    Some(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                    None => tensor_shape_proto::dimension::Value::DimParam(BATCH_DIM.into()),
                }),
            })
            .collect(),
    }
}

fn float_value(name: &str, shape: &[Option<usize>], doc: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(dims(shape)),
            })),
        }),
        doc_string: doc.to_string(),
    }
}

fn initializer(name: &str, shape: &[usize], values: &[f32]) -> TensorProto {
    debug_assert_eq!(shape.iter().product::<usize>(), values.len());
    TensorProto {
        dims: shape.iter().map(|d| *d as i64).collect(),
        data_type: DataType::Float as i32,
        name: name.to_string(),
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: output.to_string(),
        op_type: op.to_string(),
        attribute: attrs,
        ..Default::default()
    }
}

/// The ONNX protobuf of `model` with `lineage` in its metadata (see the module doc).
pub fn to_proto(model: &MicroModel, lineage: &Lineage) -> Result<ModelProto, ModelError> {
    to_proto_named(model, lineage, &weights_sha256(model), None).map(|(_, m)| m)
}

/// Lowercase hex SHA-256 of `model`'s safetensors weights (`MicroModel::to_bytes`): the
/// metadata's `weights_sha256`.
pub fn weights_sha256(model: &MicroModel) -> String {
    hex::encode(Sha256::digest(model.to_bytes()))
}

/// The nodes and initializers of one network, every name after `prefix`, reading the
/// graph input and writing `output`.
fn net_graph(
    model: &MicroModel,
    prefix: &str,
    output: &str,
) -> Result<(Vec<TensorProto>, Vec<NodeProto>), ModelError> {
    let (mean, std) = model.normalisation();
    let inv_std: Vec<f32> = std.iter().map(|s| 1.0 / s).collect();
    let spec = model.spec();
    let channels = spec.channels.len();
    let n = |name: &str| format!("{prefix}{name}");
    let mut initializers = vec![
        initializer(&n("norm.mean"), &[channels], mean),
        initializer(&n("norm.inv_std"), &[channels], &inv_std),
    ];
    for ((name, shape), var) in tensors(spec)[2..].iter().zip(model.params()) {
        let v: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        initializers.push(initializer(&n(name), shape, &v));
    }
    let gemm = |x: &str, layer: &str, out: &str| {
        let (w, b) = (n(&format!("{layer}.weight")), n(&format!("{layer}.bias")));
        node(
            "Gemm",
            &[&n(x), &w, &b],
            &n(out),
            vec![int_attr("transB", 1)],
        )
    };
    let nodes = vec![
        node("Sub", &[INPUT_NAME, &n("norm.mean")], &n("centred"), vec![]),
        node(
            "Mul",
            &[&n("centred"), &n("norm.inv_std")],
            &n("normalised"),
            vec![],
        ),
        node(
            "Flatten",
            &[&n("normalised")],
            &n("flat"),
            vec![int_attr("axis", 1)],
        ),
        gemm("flat", "fc1", "fc1.out"),
        node("Relu", &[&n("fc1.out")], &n("h1"), vec![]),
        gemm("h1", "fc2", "fc2.out"),
        node("Relu", &[&n("fc2.out")], &n("h2"), vec![]),
        gemm("h2", "fc3", "logits"),
        node(
            "Softmax",
            &[&n("logits")],
            output,
            vec![int_attr("axis", -1)],
        ),
    ];
    Ok((initializers, nodes))
}

/// The base-model fallback of a device's file: the base model, and the familiarity of
/// the windows the personal model trained on
/// ([`swimlane_core::familiar`]). The file answers a familiar window with the weighted
/// average of the personal model's and the base model's probabilities and any other
/// with the base model's (module doc, "The device's file").
#[derive(Clone, Copy, Debug)]
pub struct Fallback<'a> {
    pub base: &'a MicroModel,
    /// Lowercase hex SHA-256 of the base's safetensors weights (metadata
    /// `base_weights_sha256`; [`weights_sha256`] when the caller does not hold it).
    pub base_weights_sha256: &'a str,
    pub familiarity: &'a Familiarity,
}

impl Fallback<'_> {
    /// Usable with `model`: the base is of the same spec and the familiarity fits it.
    fn check(&self, model: &MicroModel) -> Result<(), ModelError> {
        if self.base.spec() != model.spec() {
            return Err(ModelError::Format(
                "the fallback base model is of another spec".into(),
            ));
        }
        self.familiarity
            .check(model.spec().channels.len())
            .map_err(|e| ModelError::Format(format!("familiarity: {e}")))
    }
}

/// The familiarity nodes (names `fam.*`): from the personal network's normalised
/// window `flat` [batch, F·C] to `probabilities`, choosing per window between
/// `personal.probabilities` and `base.probabilities` (module doc).
fn fallback_graph(
    model: &MicroModel,
    familiarity: &Familiarity,
) -> (Vec<TensorProto>, Vec<NodeProto>) {
    let spec = model.spec();
    let (c, frames, k) = (spec.channels.len(), spec.frames, spec.num_classes());
    let weighted = |gate: &str| {
        [
            node(
                "Sub",
                &["personal.probabilities", "base.probabilities"],
                "fam.delta",
                vec![],
            ),
            node("Mul", &[gate, "fam.delta"], "fam.chosen", vec![]),
            node(
                "Add",
                &["base.probabilities", "fam.chosen"],
                OUTPUT_NAME,
                vec![],
            ),
        ]
    };
    if familiarity.foreign_centroids.is_empty() {
        // Every window is familiar: the weighted average everywhere.
        let weight = initializer("fam.weight", &[k], &vec![familiarity.personal_weight; k]);
        return (vec![weight], weighted("fam.weight").to_vec());
    }
    // The per-channel average over frames, as a [F·C, C] matrix.
    let mut avg = vec![0f32; frames * c * c];
    for t in 0..frames {
        for ch in 0..c {
            avg[(t * c + ch) * c + ch] = 1.0 / frames as f32;
        }
    }
    let mut initializers = vec![
        initializer("fam.avg", &[frames * c, c], &avg),
        // Every Gemm has a bias: some runtimes (candle-onnx) require one.
        initializer("fam.zero_c", &[c], &vec![0.0; c]),
        initializer("fam.zero_k", &[k], &vec![0.0; k]),
        initializer("fam.weight", &[1, k], &vec![familiarity.personal_weight; k]),
    ];
    let mut nodes = vec![
        node(
            "Gemm",
            &["flat", "fam.avg", "fam.zero_c"],
            "fam.mean",
            vec![],
        ),
        node("Mul", &["flat", "flat"], "fam.xx", vec![]),
        node(
            "Gemm",
            &["fam.xx", "fam.avg", "fam.zero_c"],
            "fam.e2",
            vec![],
        ),
        node("Mul", &["fam.mean", "fam.mean"], "fam.mean2", vec![]),
        node("Sub", &["fam.e2", "fam.mean2"], "fam.var", vec![]),
        node("Relu", &["fam.var"], "fam.var0", vec![]),
        node("Sqrt", &["fam.var0"], "fam.spread", vec![]),
        node(
            "Concat",
            &["fam.mean", "fam.spread"],
            "fam.features",
            vec![int_attr("axis", 1)],
        ),
        node(
            "Mul",
            &["fam.features", "fam.features"],
            "fam.features2",
            vec![],
        ),
    ];
    // For each group of centroids, the largest 1 - |f - mu|^2 / r^2 over them:
    // (1 - w |mu|^2) + f . (2 w mu) + (f*f) . (-w), w = 1 / r^2, then ReduceMax.
    for (group, cs, rs) in [
        ("own", &familiarity.centroids, &familiarity.radius),
        (
            "foreign",
            &familiarity.foreign_centroids,
            &familiarity.foreign_radius,
        ),
    ] {
        let n = cs.len();
        let (mut twice_wmu, mut neg_w, mut one_minus) =
            (vec![0f32; 2 * c * n], vec![0f32; 2 * c * n], vec![0f32; n]);
        for (j, (mu, r)) in cs.iter().zip(rs.iter()).enumerate() {
            let w = 1.0 / (r * r);
            for (i, m) in mu.iter().enumerate() {
                twice_wmu[i * n + j] = 2.0 * w * m;
                neg_w[i * n + j] = -w;
            }
            one_minus[j] = 1.0 - w * mu.iter().map(|m| m * m).sum::<f32>();
        }
        let name = |x: &str| format!("fam.{group}.{x}");
        initializers.push(initializer(&name("twice_wmu"), &[2 * c, n], &twice_wmu));
        initializers.push(initializer(&name("neg_w"), &[2 * c, n], &neg_w));
        initializers.push(initializer(&name("one_minus_wmu2"), &[n], &one_minus));
        nodes.push(node(
            "Gemm",
            &["fam.features", &name("twice_wmu"), &name("one_minus_wmu2")],
            &name("lin"),
            vec![],
        ));
        nodes.push(node(
            "Gemm",
            &["fam.features2", &name("neg_w"), &name("lin")],
            &name("inside"),
            vec![],
        ));
        nodes.push(node(
            "ReduceMax",
            &[&name("inside")],
            &name("nearest"),
            vec![ints_attr("axes", &[1]), int_attr("keepdims", 1)],
        ));
    }
    nodes.extend([
        // 1 where the nearest own centroid is nearer (in radii) than every foreign one.
        node(
            "Sub",
            &["fam.own.nearest", "fam.foreign.nearest"],
            "fam.margin",
            vec![],
        ),
        node("Relu", &["fam.margin"], "fam.margin0", vec![]),
        // Or inside an own centroid's radius.
        node("Relu", &["fam.own.nearest"], "fam.inside0", vec![]),
        node("Add", &["fam.margin0", "fam.inside0"], "fam.either", vec![]),
        node("Sign", &["fam.either"], "fam.familiar", vec![]),
        node(
            "Gemm",
            &["fam.familiar", "fam.weight", "fam.zero_k"],
            "fam.gate",
            vec![],
        ),
    ]);
    nodes.extend(weighted("fam.gate"));
    (initializers, nodes)
}

/// [`to_proto`] with the weights' digest given (see [`export_checked_with_digest`]),
/// and the base-model fallback when given: then in two parts, the base model's nodes
/// and initializers first ([`DeviceFile`]).
fn to_proto_named(
    model: &MicroModel,
    lineage: &Lineage,
    weights_sha256: &str,
    fallback: Option<&Fallback<'_>>,
) -> Result<(Option<ModelProto>, ModelProto), ModelError> {
    let spec = model.spec();
    let channels = spec.channels.len();
    if let Some(fb) = fallback {
        fb.check(model)?;
    }
    // A model that trained on every class knows every window: with the personal weight
    // 1, no base model in the file.
    let fallback = fallback.filter(|fb| fb.familiarity.falls_back());
    let (prefix, (initializers, nodes)) = match fallback {
        None => (None, net_graph(model, "", OUTPUT_NAME)?),
        Some(fb) => {
            let (mut inits, mut nodes) = net_graph(model, "", "personal.probabilities")?;
            let (bi, bn) = net_graph(fb.base, "base.", BASE_OUTPUT)?;
            let (fi, fnodes) = fallback_graph(model, fb.familiarity);
            inits.extend(fi);
            nodes.extend(fnodes);
            // Only the base model's part of the graph: the same for every file made
            // with this base model.
            let prefix = ModelProto {
                graph: Some(GraphProto {
                    node: bn,
                    initializer: bi,
                    ..Default::default()
                }),
                ..Default::default()
            };
            (Some(prefix), (inits, nodes))
        }
    };
    let graph = GraphProto {
        node: nodes,
        name: "swimlane_micro_model".to_string(),
        initializer: initializers,
        doc_string: "Stroke class probabilities for windows of pose keypoints".to_string(),
        input: vec![float_value(
            INPUT_NAME,
            &[None, Some(spec.frames), Some(channels)],
            "raw keypoints, frame-major: [batch, frame, feature]; normalised inside the graph",
        )],
        output: vec![float_value(
            OUTPUT_NAME,
            &[None, Some(spec.num_classes())],
            "class probabilities in the order of metadata `labels`",
        )],
        ..Default::default()
    };
    let opt = |r: Option<String>| r.unwrap_or_default();
    let mut metadata = vec![
        entry("format", FORMAT_NAME),
        entry("format_version", FORMAT_VERSION.to_string()),
        entry("architecture", architecture(spec)),
        entry("spec", spec.to_json()),
        entry("labels", spec.classes.join(",")),
        entry("window", format!("{}x{channels}", spec.frames)),
        entry("features", spec.channel_list()),
        entry("input", INPUT_NAME),
        entry("output", OUTPUT_NAME),
        entry("model_version", lineage.model_version.to_string()),
        entry(
            "parent_version",
            opt(lineage.parent_version.map(|p| p.to_string())),
        ),
        entry("training_run", opt(lineage.training_run.clone())),
        entry("weights_sha256", weights_sha256.to_string()),
    ];
    if let Some(fb) = fallback {
        metadata.push(entry("fallback", "base"));
        metadata.push(entry("base_weights_sha256", fb.base_weights_sha256));
        metadata.push(entry(
            "familiar_centroids",
            fb.familiarity.centroids.len().to_string(),
        ));
        metadata.push(entry(
            "personal_weight",
            fb.familiarity.personal_weight.to_string(),
        ));
    }
    let rest = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "swimlane".to_string(),
        producer_version: env!("CARGO_PKG_VERSION").to_string(),
        domain: "swimlane".to_string(),
        model_version: match lineage.model_version {
            ModelRef::Base => 0,
            ModelRef::Version(v) => v as i64,
        },
        doc_string: "swimlane micro model: stroke class of a window of pose keypoints".to_string(),
        graph: Some(graph),
        metadata_props: metadata,
        ..Default::default()
    };
    Ok((prefix, rest))
}

/// `model` as an ONNX file (see the module doc). The same model and lineage always
/// give the same bytes. Errors if the file would exceed [`MAX_MODEL_BYTES`].
pub fn export(model: &MicroModel, lineage: &Lineage) -> Result<Vec<u8>, ModelError> {
    export_named(model, lineage, &weights_sha256(model), None)
}

/// [`export`] with the base-model fallback: the device's file (module doc).
pub fn export_with_fallback(
    model: &MicroModel,
    lineage: &Lineage,
    fallback: &Fallback<'_>,
) -> Result<Vec<u8>, ModelError> {
    export_named(model, lineage, &weights_sha256(model), Some(fallback))
}

fn export_named(
    model: &MicroModel,
    lineage: &Lineage,
    weights_sha256: &str,
    fallback: Option<&Fallback<'_>>,
) -> Result<Vec<u8>, ModelError> {
    export_parts(model, lineage, weights_sha256, fallback).map(|f| f.bytes())
}

fn export_parts(
    model: &MicroModel,
    lineage: &Lineage,
    weights_sha256: &str,
    fallback: Option<&Fallback<'_>>,
) -> Result<DeviceFile, ModelError> {
    let (prefix, rest) = to_proto_named(model, lineage, weights_sha256, fallback)?;
    let file = DeviceFile {
        prefix: prefix.map(|p| p.encode_to_vec()),
        rest: rest.encode_to_vec(),
    };
    if file.len() > MAX_MODEL_BYTES {
        return Err(ModelError::Format(format!(
            "the ONNX file is {} bytes, more than the {MAX_MODEL_BYTES} byte limit",
            file.len()
        )));
    }
    Ok(file)
}

/// An ONNX file in two parts, `prefix` then `rest`: a protobuf message whose fields are
/// split between two encodings that follow each other decodes as one message, and
/// repeated fields (a graph's nodes and initializers) are appended in order. A device's
/// file with the base-model fallback has as `prefix` the base model's nodes and
/// initializers alone, the same bytes for every file made with the same base model and
/// spec, so a store can keep it once; the base model's nodes come first in the file, so
/// they are still in topological order (they read only the input). Any other file has
/// no prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFile {
    pub prefix: Option<Vec<u8>>,
    pub rest: Vec<u8>,
}

impl DeviceFile {
    /// The whole file: `prefix` then `rest`.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(self.prefix.as_deref().unwrap_or_default());
        out.extend_from_slice(&self.rest);
        out
    }

    /// The whole file's size in bytes.
    pub fn len(&self) -> usize {
        self.prefix.as_ref().map_or(0, Vec::len) + self.rest.len()
    }

    /// Never: a file always has its graph.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where `rest` holds, byte for byte, a tensor of `weights` (the safetensors file the
    /// personal model was loaded from) of at least `min_bytes`: the weight matrices'
    /// initializers are their little-endian `f32`s, as the safetensors file has them. In
    /// increasing [`Shared::at`], none overlapping; empty when `weights` is not a
    /// safetensors file. A store can keep those bytes once (`StoredFile::splices`).
    pub fn rest_shared_with(&self, weights: &[u8], min_bytes: usize) -> Vec<Shared> {
        let Ok(st) = safetensors::SafeTensors::deserialize(weights) else {
            return Vec::new();
        };
        let mut found: Vec<Shared> = st
            .tensors()
            .into_iter()
            .map(|(_, view)| view.data())
            .filter(|data| data.len() >= min_bytes.max(1))
            .filter_map(|data| {
                // Found by its first bytes, then compared whole: a finder for the whole
                // tensor (256 kB) costs more to build than the search.
                let head = &data[..data.len().min(64)];
                let at = memchr::memmem::find_iter(&self.rest, head)
                    .find(|&at| self.rest.get(at..at + data.len()) == Some(data))?;
                Some(Shared {
                    at,
                    // `data` is a slice of `weights`.
                    offset: data.as_ptr() as usize - weights.as_ptr() as usize,
                    len: data.len(),
                })
            })
            .collect();
        found.sort_by_key(|s| s.at);
        let mut end = 0;
        found.retain(|s| {
            let keep = s.at >= end;
            if keep {
                end = s.at + s.len;
            }
            keep
        });
        found
    }

    /// `rest` without the bytes of `shared` (as [`DeviceFile::rest_shared_with`] gives
    /// them: in order, none overlapping, inside `rest`).
    pub fn rest_without(&self, shared: &[Shared]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.rest.len());
        let mut from = 0;
        for s in shared {
            out.extend_from_slice(&self.rest[from..s.at]);
            from = s.at + s.len;
        }
        out.extend_from_slice(&self.rest[from..]);
        out
    }
}

/// `len` bytes at `at` in a [`DeviceFile`]'s `rest` that are bytes `offset ..
/// offset + len` of another file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shared {
    pub at: usize,
    pub offset: usize,
    pub len: usize,
}

/// [`export`], then load the file back and check it against `model` on
/// [`probe_windows`]: at most [`EXPORT_TOLERANCE`] from candle's probabilities and the
/// same predicted class for every window. What the publisher stores.
pub fn export_checked(model: &MicroModel, lineage: &Lineage) -> Result<Vec<u8>, ModelError> {
    export_checked_with_digest(model, lineage, &weights_sha256(model))
}

/// [`export_checked`] for a model loaded from safetensors bytes whose SHA-256 the caller
/// already holds (`weights_sha256`, lowercase hex): the metadata names those bytes. The
/// publisher loads a candidate from a blob the store checked against its SHA-256 on
/// reading it, so hashing the weights again would be its largest cost after the check
/// itself.
pub fn export_checked_with_digest(
    model: &MicroModel,
    lineage: &Lineage,
    weights_sha256: &str,
) -> Result<Vec<u8>, ModelError> {
    export_device_checked(model, lineage, weights_sha256, None)
}

/// [`export_checked_with_digest`], with the base-model fallback when given: the file
/// is checked against [`predict_proba_with_fallback`] on [`probe_windows`] and on a
/// window at each familiar centroid (so both branches are exercised). What the
/// publisher stores.
pub fn export_device_checked(
    model: &MicroModel,
    lineage: &Lineage,
    weights_sha256: &str,
    fallback: Option<&Fallback<'_>>,
) -> Result<Vec<u8>, ModelError> {
    export_device_parts_checked(model, lineage, weights_sha256, fallback).map(|f| f.bytes())
}

/// [`export_device_checked`] in its two parts ([`DeviceFile`]; the check is of the
/// whole file). What the publisher stores.
pub fn export_device_parts_checked(
    model: &MicroModel,
    lineage: &Lineage,
    weights_sha256: &str,
    fallback: Option<&Fallback<'_>>,
) -> Result<DeviceFile, ModelError> {
    let file = export_parts(model, lineage, weights_sha256, fallback)?;
    // Decoded from its two parts as they are: no copy of the whole file.
    let onnx = OnnxModel::from_parts(file.prefix.as_deref().unwrap_or_default(), &file.rest)?;
    let probes = probes(model);
    let centroids = fallback.map_or_else(Vec::new, |fb| centroid_windows(model, fb.familiarity));
    let (expected, got) = match (fallback, &file.prefix, &probes) {
        // The base model's answers on the spec's fixed windows, remembered for this base
        // part's bytes: the personal part checked on them, the rest as below.
        (Some(fb), Some(prefix), std::borrow::Cow::Borrowed(fixed)) => {
            let refs: Vec<&[f32]> = fixed.iter().map(Vec::as_slice).collect();
            let base = BaseAnswers::of(prefix, fb.base, &onnx, &refs)?;
            let personal = model.predict_proba(&refs)?;
            let mut expected = blend(model, fb, &refs, personal, base.candle.clone());
            let known = [(BASE_OUTPUT, &base.onnx)];
            let (mut got, _) = onnx.predict_proba_with(&refs, &known, None)?;
            let refs: Vec<&[f32]> = centroids.iter().map(Vec::as_slice).collect();
            expected.extend(predict_proba_with_fallback(model, fallback, &refs)?);
            got.extend(onnx.predict_proba(&refs)?);
            (expected, got)
        }
        _ => {
            let refs: Vec<&[f32]> = probes.iter().chain(&centroids).map(Vec::as_slice).collect();
            (
                predict_proba_with_fallback(model, fallback, &refs)?,
                onnx.predict_proba(&refs)?,
            )
        }
    };
    let p = compare(&expected, &got);
    if !p.holds_within(EXPORT_TOLERANCE) {
        return Err(ModelError::Format(format!(
            "the ONNX export does not compute what the model computes: {p}"
        )));
    }
    Ok(file)
}

/// 64 fixed windows for [`export_checked`]: for the synthetic pose spec, synthetic
/// swimmers of every class; for any other spec, seeded windows around the model's own
/// normalisation (mean ± 3 std per channel); plus a window of zeros and one of ones.
pub fn probe_windows(model: &MicroModel) -> Vec<Vec<f32>> {
    probes(model).into_owned()
}

/// [`probe_windows`], borrowed where they are the same for every model of the spec.
fn probes(model: &MicroModel) -> std::borrow::Cow<'static, [Vec<f32>]> {
    use rand::Rng;
    let spec = model.spec();
    let input = spec.window_values();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x0_4e4e_0001);
    let with_edges = |mut out: Vec<Vec<f32>>| {
        out.push(vec![0.0; input]);
        out.push(vec![1.0; input]);
        out
    };
    if *spec == ModelSpec::synthetic_pose() {
        // The same for every model of the spec: synthesised once per process and lent
        // (the publisher checks every version it exports against them).
        static POSE: std::sync::OnceLock<Vec<Vec<f32>>> = std::sync::OnceLock::new();
        return std::borrow::Cow::Borrowed(POSE.get_or_init(|| {
            with_edges(
                crate::synth::Swimmer::new(0x0_4e4e_0002)
                    .windows(62, &mut rng)
                    .into_iter()
                    .map(|s| s.frames)
                    .collect(),
            )
        }));
    }
    std::borrow::Cow::Owned(with_edges({
        let (mean, std) = model.normalisation();
        (0..62)
            .map(|_| {
                (0..input)
                    .map(|i| {
                        let c = i % mean.len();
                        mean[c] + std[c] * rng.random_range(-3.0f32..3.0)
                    })
                    .collect()
            })
            .collect()
    }))
}

/// What the device's file computes, computed with candle: for a window familiar to the
/// personal model, the weighted average of its probabilities and the base model's, the
/// base model's for any other (`Familiarity::answer`); the personal model's
/// alone without a fallback.
pub fn predict_proba_with_fallback(
    model: &MicroModel,
    fallback: Option<&Fallback<'_>>,
    windows: &[&[f32]],
) -> Result<Vec<Vec<f32>>, ModelError> {
    let personal = model.predict_proba(windows)?;
    let Some(fb) = fallback else {
        return Ok(personal);
    };
    fb.check(model)?;
    let base = fb.base.predict_proba(windows)?;
    Ok(blend(model, fb, windows, personal, base))
}

/// Each window's answer from the personal model's probabilities and the base model's
/// (`Familiarity::answer`).
fn blend(
    model: &MicroModel,
    fb: &Fallback<'_>,
    windows: &[&[f32]],
    personal: Vec<Vec<f32>>,
    base: Vec<Vec<f32>>,
) -> Vec<Vec<f32>> {
    let (mean, std) = model.normalisation();
    windows
        .iter()
        .zip(personal.into_iter().zip(base))
        .map(|(w, (p, b))| fb.familiarity.answer(w, (mean, std), &p, &b))
        .collect()
}

/// The base model's probabilities in a device's file ([`net_graph`]'s output for the
/// `base.` part).
const BASE_OUTPUT: &str = "base.probabilities";

/// What the base model's part of a device's file answers on the spec's fixed probe
/// windows ([`probes`]), by candle and by this module's evaluator, remembered for that
/// part's bytes (one entry a process: the publisher exports with one base model at a
/// time). Both are functions of those bytes and those windows alone: the part holds the
/// base model's nodes and every initializer they read, its nodes read only the graph's
/// input, and it is made from the same [`MicroModel`] candle runs. So a file whose part
/// is byte for byte the remembered one is checked on those windows with them, exactly as
/// if they were computed again; the personal part, the blend, and every window made
/// for this file (its familiar centroids) are computed in full. The first file of a
/// base model computes them from the whole file, so they are the file's own numbers.
struct BaseAnswers {
    prefix: Vec<u8>,
    candle: Vec<Vec<f32>>,
    onnx: eval::Value,
}

impl BaseAnswers {
    fn of(
        prefix: &[u8],
        base: &MicroModel,
        onnx: &OnnxModel,
        fixed: &[&[f32]],
    ) -> Result<std::sync::Arc<BaseAnswers>, ModelError> {
        use std::sync::{Arc, Mutex};
        static LAST: Mutex<Option<Arc<BaseAnswers>>> = Mutex::new(None);
        let last = LAST.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(a) = last.filter(|a| a.prefix == prefix) {
            return Ok(a);
        }
        let (_, kept) = onnx.predict_proba_with(fixed, &[], Some(BASE_OUTPUT))?;
        let onnx = kept.ok_or_else(|| {
            ModelError::Format(format!("the ONNX file computes no {BASE_OUTPUT}"))
        })?;
        let a = Arc::new(BaseAnswers {
            prefix: prefix.to_vec(),
            candle: base.predict_proba(fixed)?,
            onnx,
        });
        *LAST.lock().unwrap_or_else(|e| e.into_inner()) = Some(a.clone());
        Ok(a)
    }
}

/// A window at each familiar centroid: each channel alternates between its centroid's
/// mean plus and minus its spread (in the model's normalised units), so the window's
/// features are the centroid's.
pub fn centroid_windows(model: &MicroModel, familiarity: &Familiarity) -> Vec<Vec<f32>> {
    let (mean, std) = model.normalisation();
    let (c, frames) = (mean.len(), model.spec().frames);
    familiarity
        .centroids
        .iter()
        .filter(|mu| mu.len() == 2 * c)
        .map(|mu| {
            (0..frames * c)
                .map(|i| {
                    let (t, ch) = (i / c, i % c);
                    let sign = if t % 2 == 0 { 1.0 } else { -1.0 };
                    mean[ch] + std[ch] * (mu[ch] + sign * mu[c + ch])
                })
                .collect()
        })
        .collect()
}

/// How closely an ONNX file follows its model on some windows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Parity {
    pub windows: usize,
    /// Largest absolute difference between the two probability vectors of a window.
    pub max_abs_diff: f32,
    /// Windows whose predicted class differs.
    pub class_mismatches: usize,
}

impl Parity {
    /// Within [`PARITY_TOLERANCE`] and no predicted class differs.
    pub fn holds(&self) -> bool {
        self.holds_within(PARITY_TOLERANCE)
    }

    /// Within `tolerance` and no predicted class differs.
    pub fn holds_within(&self, tolerance: f32) -> bool {
        self.max_abs_diff <= tolerance && self.class_mismatches == 0
    }
}

impl fmt::Display for Parity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} windows, max abs diff {:.3e}, {} predicted classes differ",
            self.windows, self.max_abs_diff, self.class_mismatches
        )
    }
}

/// Compare two sets of probabilities, window by window.
pub fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> Parity {
    assert_eq!(
        a.len(),
        b.len(),
        "one probability row per window on each side"
    );
    let mut max_abs_diff = 0f32;
    let mut class_mismatches = 0;
    for (x, y) in a.iter().zip(b) {
        for (u, v) in x.iter().zip(y) {
            let d = (u - v).abs();
            // A NaN anywhere is a failure, never a pass.
            max_abs_diff = if d.is_nan() {
                f32::INFINITY
            } else {
                max_abs_diff.max(d)
            };
        }
        if argmax_class(x) != argmax_class(y) {
            class_mismatches += 1;
        }
    }
    Parity {
        windows: a.len(),
        max_abs_diff,
        class_mismatches,
    }
}

/// Evaluate `onnx` and `model` on the same `windows` and compare.
pub fn parity(
    model: &MicroModel,
    onnx: &OnnxModel,
    windows: &[&[f32]],
) -> Result<Parity, ModelError> {
    Ok(compare(
        &model.predict_proba(windows)?,
        &onnx.predict_proba(windows)?,
    ))
}

/// An exported ONNX micro model, evaluated by this module's own evaluator.
#[derive(Clone, Debug)]
pub struct OnnxModel {
    proto: ModelProto,
    metadata: BTreeMap<String, String>,
    spec: ModelSpec,
}

impl OnnxModel {
    /// Load a file written by [`export`]. Checks the size, that it decodes, and that it
    /// is a swimlane micro model: its format, input and output, and class list. Never
    /// panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<OnnxModel, ModelError> {
        Self::from_parts(&[], bytes)
    }

    /// [`OnnxModel::from_bytes`] of the file `prefix` then `rest` (a [`DeviceFile`]'s
    /// parts), decoded from the two parts without joining them.
    pub fn from_parts(prefix: &[u8], rest: &[u8]) -> Result<OnnxModel, ModelError> {
        use prost::bytes::Buf;
        let len = prefix.len() + rest.len();
        if len > MAX_MODEL_BYTES {
            return Err(ModelError::Format(format!(
                "{len} bytes is more than the {MAX_MODEL_BYTES} byte limit"
            )));
        }
        let proto = ModelProto::decode(prefix.chain(rest))
            .map_err(|e| ModelError::Format(format!("not an ONNX model: {e}")))?;
        let metadata: BTreeMap<String, String> = proto
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        let get = |k: &str| metadata.get(k).map(String::as_str).unwrap_or("");
        if get("format") != FORMAT_NAME {
            return Err(ModelError::Format(format!(
                "ONNX model is not a swimlane micro model (format {:?})",
                get("format"),
            )));
        }
        let spec = match get("format_version") {
            "2" => ModelSpec::from_json(get("spec").as_bytes())
                .map_err(|e| ModelError::Format(format!("spec: {e}")))?,
            "1" => ModelSpec::synthetic_pose(),
            other => return Err(ModelError::UnsupportedVersion(other.to_string())),
        };
        crate::net::check_stored_spec(&spec, get("architecture"), get("labels"))?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| ModelError::Format("ONNX model has no graph".into()))?;
        let names = |v: &[ValueInfoProto]| v.iter().map(|i| i.name.clone()).collect::<Vec<_>>();
        if names(&graph.input) != [INPUT_NAME] || names(&graph.output) != [OUTPUT_NAME] {
            return Err(ModelError::Format(format!(
                "ONNX graph inputs {:?} / outputs {:?}, expected [{INPUT_NAME}] / [{OUTPUT_NAME}]",
                names(&graph.input),
                names(&graph.output)
            )));
        }
        Ok(OnnxModel {
            proto,
            metadata,
            spec,
        })
    }

    /// The spec the file was exported for.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The file's `metadata_props`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The protobuf.
    pub fn proto(&self) -> &ModelProto {
        &self.proto
    }

    /// Score the file on `samples` (as [`crate::evaluate`] scores a model).
    pub fn evaluate(&self, samples: &[crate::Sample]) -> Result<crate::Evaluation, ModelError> {
        Ok(crate::eval::evaluate_predictions(
            self.spec.num_classes(),
            samples,
            &self.predict(samples)?,
        ))
    }

    /// The predicted class of each sample's window.
    pub fn predict(&self, samples: &[crate::Sample]) -> Result<Vec<ClassId>, ModelError> {
        let refs: Vec<&[f32]> = samples.iter().map(|s| s.frames.as_slice()).collect();
        Ok(self
            .predict_proba(&refs)?
            .iter()
            .map(|p| argmax_class(p))
            .collect())
    }

    /// Class probabilities for each window (each a flattened frames × channels window):
    /// the file's graph run on the windows in one batch by this module's own evaluator
    /// (the operators the exporter writes, with the file's initializers; anything else
    /// in the graph is an error).
    pub fn predict_proba(&self, windows: &[&[f32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.predict_proba_with(windows, &[], None).map(|(p, _)| p)
    }

    /// [`OnnxModel::predict_proba`] with some values of the graph `known` for these
    /// windows ([`eval::run_with`]), and the value named `keep`.
    fn predict_proba_with(
        &self,
        windows: &[&[f32]],
        known: &[(&str, &eval::Value)],
        keep: Option<&str>,
    ) -> Result<(Vec<Vec<f32>>, Option<eval::Value>), ModelError> {
        if windows.is_empty() {
            return Ok((Vec::new(), None));
        }
        let flat = crate::net::flatten_windows(windows, self.spec.window_values())?;
        let x = eval::Value {
            shape: vec![windows.len(), self.spec.frames, self.spec.channels.len()],
            data: flat,
        };
        let (p, kept) = eval::run_with(&self.proto, x, known, keep)?;
        let k = self.spec.num_classes();
        if p.shape != [windows.len(), k] {
            return Err(ModelError::Format(format!(
                "{OUTPUT_NAME} has shape {:?}, expected [{}, {k}]",
                p.shape,
                windows.len()
            )));
        }
        Ok((p.data.chunks_exact(k).map(<[f32]>::to_vec).collect(), kept))
    }
}

/// Is `bytes` (probably) an ONNX file rather than safetensors? A safetensors file
/// starts with an 8-byte header length and then `{`; an ONNX file with a protobuf
/// field tag.
pub fn looks_like_onnx(bytes: &[u8]) -> bool {
    !(bytes.len() > 8 && bytes[8] == b'{')
}

/// The models and windows of the parity check: what the Rust parity test evaluates with
/// [`OnnxModel`] (and candle-onnx) and `bench/onnx_check.sh` with ONNX Runtime.
pub struct ParitySet {
    /// Name (`base`, `swimmer0-v1`, ...), model and its lineage.
    pub models: Vec<(String, MicroModel, Lineage)>,
    /// Windows of unseen swimmers (labelled with the truth).
    pub windows: Vec<crate::Sample>,
}

/// The parity set for `seed`: the default base model for `seed`
/// ([`crate::experiment::train_default_base`]), and for each of `swimmers` unseen
/// swimmers a chain of two personal versions (v1 fine-tuned from the base on the
/// user's corrections, v2 from v1 on the next round's), the way the trainer makes
/// them (a swimmer the model already gets right has no correction, so no version);
/// windows: `windows_per_swimmer` fresh windows of each of those swimmers and of as many
/// other unseen swimmers. Deterministic.
pub fn parity_set(
    seed: u64,
    swimmers: usize,
    windows_per_swimmer: usize,
) -> Result<ParitySet, ModelError> {
    use crate::synth::{corrections, derive_seed, Population};
    let (base, _) = crate::experiment::train_default_base(seed)?;
    let pop = Population::unseen(seed, 2 * swimmers);
    let mut models = vec![("base".to_string(), base.clone(), Lineage::base())];
    let mut windows = Vec::new();
    for (i, swimmer) in pop.swimmers.iter().enumerate() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(derive_seed(seed, 90, i as u64));
        windows.extend(swimmer.windows(windows_per_swimmer, &mut rng));
        if i >= swimmers {
            continue;
        }
        let mut current = base.clone();
        let mut parent = ModelRef::Base;
        let mut seen = Vec::new();
        for version in 1..=2u64 {
            let c = corrections(&current, swimmer, 300, 200, &mut rng)?;
            if c.is_empty() {
                break;
            }
            seen.extend(c);
            let cfg = crate::TrainConfig::fine_tune().with_seed(derive_seed(seed, 91, version));
            current = crate::fine_tune(&current, &seen, &cfg)?.0;
            let lineage = Lineage {
                model_version: ModelRef::Version(version),
                parent_version: Some(parent),
                training_run: Some(format!("parity-{seed}-{i}-{version}")),
            };
            models.push((format!("swimmer{i}-v{version}"), current.clone(), lineage));
            parent = ModelRef::Version(version);
        }
    }
    Ok(ParitySet { models, windows })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::Swimmer;
    use crate::Sample;
    use swimlane_core::{WINDOW_FEATURES, WINDOW_FRAMES};

    fn model() -> (MicroModel, Vec<Sample>) {
        let s = Swimmer::new(3).windows(64, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3));
        (
            MicroModel::init(&ModelSpec::synthetic_pose(), &s, 3).unwrap(),
            s,
        )
    }

    mod candle_onnx_support {
        include!("../tests/support/candle_onnx.rs");
    }
    use candle_onnx_support::candle_onnx_proba;

    /// A device's file is two encodings one after the other ([`DeviceFile`]): candle-onnx
    /// must decode it to the message it decodes from the one encoding of it, which is
    /// what `candle_onnx_proba` then checks byte for byte.
    fn canonical(bytes: &[u8]) -> Vec<u8> {
        let one = ModelProto::decode(bytes).unwrap().encode_to_vec();
        assert_eq!(
            candle_onnx::onnx::ModelProto::decode(bytes).unwrap(),
            candle_onnx::onnx::ModelProto::decode(one.as_slice()).unwrap()
        );
        one
    }

    #[test]
    fn a_files_weight_matrices_are_found_in_the_safetensors_file_and_cut_out() {
        let (m, _) = model();
        let lineage = Lineage {
            model_version: ModelRef::Version(1),
            parent_version: Some(ModelRef::Base),
            training_run: None,
        };
        let weights = m.to_bytes();
        let file = export_device_parts_checked(&m, &lineage, &weights_sha256(&m), None).unwrap();
        let shared = file.rest_shared_with(&weights, 4096);
        // fc1.weight and fc2.weight, in the file's order; each the same bytes in both.
        let lens: Vec<usize> = shared.iter().map(|s| s.len).collect();
        assert_eq!(lens, [4 * 128 * 512, 4 * 64 * 128]);
        for s in &shared {
            assert_eq!(
                file.rest[s.at..s.at + s.len],
                weights[s.offset..s.offset + s.len]
            );
        }
        // Cut out and put back, the file is whole again.
        let mut own = file.rest_without(&shared);
        assert_eq!(own.len(), file.rest.len() - lens.iter().sum::<usize>());
        for s in &shared {
            own.splice(
                s.at..s.at,
                weights[s.offset..s.offset + s.len].iter().copied(),
            );
        }
        assert_eq!(own, file.rest);
        // Below the size asked for, or from another model or no safetensors file at all:
        // nothing is shared.
        assert_eq!(file.rest_shared_with(&weights, 1 << 20), []);
        let other = model_seeded(9).to_bytes();
        assert_eq!(file.rest_shared_with(&other, 4096), []);
        assert_eq!(file.rest_shared_with(b"not safetensors", 1), []);
    }

    /// The export check's remembered base answers (`BaseAnswers`): evaluating a file
    /// with its base model's probabilities known gives, bit for bit, what evaluating it
    /// whole gives; the known values are what is used (other ones change the answers);
    /// and files of two personal models made with one base model are both checked
    /// through them and still answer as the whole graph does.
    #[test]
    fn a_file_checked_with_its_base_models_answers_known_is_checked_on_its_own_numbers() {
        let (base, samples) = model();
        let base_sha = weights_sha256(&base);
        let lineage = Lineage::base();
        for seed in [5, 6] {
            let other = Swimmer::new(seed + 10)
                .windows(64, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
            let personal = MicroModel::init(&ModelSpec::synthetic_pose(), &other, seed).unwrap();
            let familiarity = familiarity_below(&personal, &samples, 3);
            let fb = Fallback {
                base: &base,
                base_weights_sha256: &base_sha,
                familiarity: &familiarity,
            };
            let sha = weights_sha256(&personal);
            let file = export_device_parts_checked(&personal, &lineage, &sha, Some(&fb)).unwrap();
            let onnx = OnnxModel::from_bytes(&file.bytes()).unwrap();
            let fixed = probes(&personal);
            assert!(matches!(fixed, std::borrow::Cow::Borrowed(_)));
            let refs: Vec<&[f32]> = fixed.iter().map(Vec::as_slice).collect();
            let (whole, kept) = onnx
                .predict_proba_with(&refs, &[], Some(BASE_OUTPUT))
                .unwrap();
            let kept = kept.unwrap();
            assert_eq!(kept.shape, [refs.len(), 6]);
            let known = [(BASE_OUTPUT, &kept)];
            let (with, _) = onnx.predict_proba_with(&refs, &known, None).unwrap();
            assert_eq!(with, whole);
            assert_eq!(with, onnx.predict_proba(&refs).unwrap());
            let uniform = eval::Value {
                shape: kept.shape.clone(),
                data: vec![1.0 / 6.0; kept.data.len()],
            };
            let (changed, _) = onnx
                .predict_proba_with(&refs, &[(BASE_OUTPUT, &uniform)], None)
                .unwrap();
            assert_ne!(changed, whole);
            // What the check compared against: candle's answers, within the tolerance.
            let expected = predict_proba_with_fallback(&personal, Some(&fb), &refs).unwrap();
            assert!(compare(&expected, &whole).holds_within(EXPORT_TOLERANCE));
            // What is checked does not depend on what is known: a node nothing reads
            // is still evaluated (an operator the evaluator lacks is refused), and a
            // value defined twice is refused though its node would be skipped.
            let x = || eval::Value {
                shape: vec![refs.len(), WINDOW_FRAMES, WINDOW_FEATURES],
                data: crate::net::flatten_windows(&refs, WINDOW_FRAMES * WINDOW_FEATURES).unwrap(),
            };
            assert!(eval::run_with(onnx.proto(), x(), &known, None).is_ok());
            for extra in [
                NodeProto {
                    op_type: "NotAnOperator".into(),
                    input: vec![INPUT_NAME.into()],
                    output: vec!["unread".into()],
                    ..Default::default()
                },
                NodeProto {
                    op_type: "Relu".into(),
                    input: vec![INPUT_NAME.into()],
                    output: vec![BASE_OUTPUT.into()],
                    ..Default::default()
                },
            ] {
                let mut p = onnx.proto().clone();
                p.graph.as_mut().unwrap().node.push(extra);
                assert!(eval::run_with(&p, x(), &known, None).is_err());
            }
        }
    }

    /// `personal`'s familiarity had it trained on `samples` of the classes below
    /// `classes` only, with all of `samples` as the population.
    fn familiarity_below(personal: &MicroModel, samples: &[Sample], classes: u8) -> Familiarity {
        let (mean, std) = personal.normalisation();
        let seen: Vec<&Sample> = samples.iter().filter(|s| s.label.0 < classes).collect();
        Familiarity::of(
            seen.iter().map(|s| (s.frames.as_slice(), s.label)),
            samples.iter().map(|s| (s.frames.as_slice(), s.label)),
            mean,
            std,
            swimlane_core::familiar::DEFAULT_SCALE,
        )
        .unwrap()
    }

    fn model_seeded(seed: u64) -> MicroModel {
        let s = Swimmer::new(seed).windows(64, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        MicroModel::init(&ModelSpec::synthetic_pose(), &s, seed).unwrap()
    }

    #[test]
    fn the_devices_file_answers_familiar_windows_with_the_weighted_average_and_others_with_the_base(
    ) {
        let (base, samples) = model();
        let other = Swimmer::new(11).windows(64, &mut rand_chacha::ChaCha8Rng::seed_from_u64(11));
        let personal = MicroModel::init(&ModelSpec::synthetic_pose(), &other, 5).unwrap();
        let (mean, std) = personal.normalisation();
        // Trained on two classes only; the population has them all.
        let familiarity = familiarity_below(&personal, &samples, 2);
        assert!(!familiarity.foreign_centroids.is_empty());
        let base_sha = weights_sha256(&base);
        let fb = Fallback {
            base: &base,
            base_weights_sha256: &base_sha,
            familiarity: &familiarity,
        };
        let lineage = Lineage {
            model_version: ModelRef::Version(2),
            parent_version: Some(ModelRef::Version(1)),
            training_run: Some("run-f".into()),
        };
        let bytes =
            export_device_checked(&personal, &lineage, &weights_sha256(&personal), Some(&fb))
                .unwrap();
        assert_eq!(
            bytes,
            export_with_fallback(&personal, &lineage, &fb).unwrap()
        );
        assert!(bytes.len() <= MAX_MODEL_BYTES, "{}", bytes.len());
        let o = OnnxModel::from_bytes(&bytes).unwrap();
        assert_eq!(o.metadata()["fallback"], "base");
        assert_eq!(o.metadata()["base_weights_sha256"], base_sha);
        assert_eq!(o.metadata()["personal_weight"], "0.6");
        let mut windows: Vec<Vec<f32>> = samples.iter().map(|s| s.frames.clone()).collect();
        windows.extend(other.iter().map(|s| s.frames.clone()));
        windows.extend(centroid_windows(&personal, &familiarity));
        let refs: Vec<&[f32]> = windows.iter().map(Vec::as_slice).collect();
        let got = o.predict_proba(&refs).unwrap();
        let (p, b) = (
            personal.predict_proba(&refs).unwrap(),
            base.predict_proba(&refs).unwrap(),
        );
        let (mut familiar, mut unfamiliar) = (0, 0);
        let w = familiarity.personal_weight;
        for (i, window) in refs.iter().enumerate() {
            let want: Vec<f32> = if familiarity.knows(window, mean, std) {
                familiar += 1;
                p[i].iter()
                    .zip(&b[i])
                    .map(|(p, b)| w * p + (1.0 - w) * b)
                    .collect()
            } else {
                unfamiliar += 1;
                b[i].clone()
            };
            let d = compare(std::slice::from_ref(&want), std::slice::from_ref(&got[i]));
            assert!(d.holds(), "window {i}: {d}");
        }
        assert!(
            familiar >= 5 && unfamiliar >= 5,
            "{familiar} / {unfamiliar}"
        );
        // The same numbers from the reference and from candle-onnx.
        let reference = predict_proba_with_fallback(&personal, Some(&fb), &refs).unwrap();
        assert!(compare(&reference, &got).holds());
        assert!(compare(&candle_onnx_proba(&canonical(&bytes), &refs), &got).holds());
        // The file is the base model's part, the same for any personal model, then the
        // rest.
        let parts =
            export_device_parts_checked(&personal, &lineage, &weights_sha256(&personal), Some(&fb))
                .unwrap();
        assert_eq!(parts.bytes(), bytes);
        // Decoded from its parts, it is the file decoded whole.
        let joined = OnnxModel::from_bytes(&bytes).unwrap();
        let split = OnnxModel::from_parts(parts.prefix.as_deref().unwrap(), &parts.rest).unwrap();
        assert_eq!(split.proto(), joined.proto());
        assert_eq!(split.predict_proba(&refs).unwrap(), got);
        let other = export_device_parts_checked(&base, &lineage, &weights_sha256(&base), Some(&fb))
            .unwrap();
        assert!(parts.prefix.is_some() && parts.prefix == other.prefix);
        assert_ne!(parts.rest, other.rest);
        let plain = export_device_parts_checked(&personal, &lineage, "x", None).unwrap();
        assert!(plain.prefix.is_none());
        // A familiarity that does not fit the model is refused, not exported.
        let bad = Familiarity {
            centroids: vec![vec![0.0; 3]],
            radius: vec![1.0],
            ..familiarity.clone()
        };
        let fb_bad = Fallback {
            familiarity: &bad,
            ..fb
        };
        assert!(export_with_fallback(&personal, &lineage, &fb_bad).is_err());
        // A model that trained on every class knows every window: the weighted average
        // for each, checked by the export against candle and by candle-onnx.
        let everything = Familiarity {
            foreign_centroids: vec![],
            foreign_radius: vec![],
            ..familiarity.clone()
        };
        let fb_all = Fallback {
            familiarity: &everything,
            ..fb
        };
        let all = export_device_checked(
            &personal,
            &lineage,
            &weights_sha256(&personal),
            Some(&fb_all),
        )
        .unwrap();
        let got = OnnxModel::from_bytes(&all)
            .unwrap()
            .predict_proba(&refs)
            .unwrap();
        for (i, g) in got.iter().enumerate() {
            let want: Vec<f32> = p[i]
                .iter()
                .zip(&b[i])
                .map(|(p, b)| w * p + (1.0 - w) * b)
                .collect();
            let d = compare(std::slice::from_ref(&want), std::slice::from_ref(g));
            assert!(d.holds(), "window {i}: {d}");
        }
        assert!(compare(&candle_onnx_proba(&canonical(&all), &refs), &got).holds());
        // With the personal weight 1 as well: the plain file.
        let alone = everything.clone().with_personal_weight(1.0);
        let fb_alone = Fallback {
            familiarity: &alone,
            ..fb
        };
        assert_eq!(
            export_with_fallback(&personal, &lineage, &fb_alone).unwrap(),
            export(&personal, &lineage).unwrap()
        );
    }

    #[test]
    fn exports_deterministically_with_metadata_and_loads_back() {
        let (m, _) = model();
        let lineage = Lineage {
            model_version: ModelRef::Version(4),
            parent_version: Some(ModelRef::Version(3)),
            training_run: Some("run-abc".into()),
        };
        let a = export(&m, &lineage).unwrap();
        assert_eq!(a, export(&m, &lineage).unwrap());
        assert!(a.len() <= MAX_MODEL_BYTES, "{}", a.len());
        assert!(looks_like_onnx(&a) && !looks_like_onnx(&m.to_bytes()));
        let o = OnnxModel::from_bytes(&a).unwrap();
        let md = o.metadata();
        assert_eq!(md["model_version"], "4");
        assert_eq!(md["parent_version"], "3");
        assert_eq!(md["training_run"], "run-abc");
        assert_eq!(
            md["labels"],
            "freestyle,backstroke,breaststroke,butterfly,turn,glide"
        );
        assert_eq!(md["window"], "32x16");
        assert_eq!(
            md["weights_sha256"],
            hex::encode(Sha256::digest(m.to_bytes()))
        );
        assert_eq!(o.proto().model_version, 4);
        assert_eq!(o.proto().opset_import[0].version, OPSET);
        let base = OnnxModel::from_bytes(&export(&m, &Lineage::base()).unwrap()).unwrap();
        assert_eq!(base.metadata()["model_version"], "base");
        assert_eq!(base.metadata()["parent_version"], "");
        // The digest a caller already holds names the weights; the file is otherwise
        // the same.
        let checked = export_checked(&m, &lineage).unwrap();
        assert_eq!(checked, a);
        let named = export_checked_with_digest(&m, &lineage, &weights_sha256(&m)).unwrap();
        assert_eq!(named, a);
        let other = export_checked_with_digest(&m, &lineage, "abc").unwrap();
        assert_eq!(
            OnnxModel::from_bytes(&other).unwrap().metadata()["weights_sha256"],
            "abc"
        );
    }

    #[test]
    fn computes_what_candle_computes_at_any_batch_size() {
        let (m, s) = model();
        let bytes = export_checked(&m, &Lineage::base()).unwrap();
        let o = OnnxModel::from_bytes(&bytes).unwrap();
        let refs: Vec<&[f32]> = s.iter().map(|x| x.frames.as_slice()).collect();
        for n in [1, 2, 64] {
            let p = parity(&m, &o, &refs[..n]).unwrap();
            assert!(p.holds(), "batch {n}: {p}");
            let reference = candle_onnx_proba(&bytes, &refs[..n]);
            let ours = compare(&o.predict_proba(&refs[..n]).unwrap(), &reference);
            assert!(
                ours.holds(),
                "batch {n}, this evaluator vs candle-onnx: {ours}"
            );
            let theirs = compare(&m.predict_proba(&refs[..n]).unwrap(), &reference);
            assert!(theirs.holds(), "batch {n}, candle vs candle-onnx: {theirs}");
        }
        assert!(o.predict_proba(&[]).unwrap().is_empty());
        assert!(matches!(
            o.predict_proba(&[&[0.0; 5]]),
            Err(ModelError::BadWindow {
                index: 0,
                len: 5,
                ..
            })
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let (m, _) = model();
        let bytes = export(&m, &Lineage::base()).unwrap();
        assert!(OnnxModel::from_bytes(b"").is_err());
        assert!(OnnxModel::from_bytes(b"not onnx at all").is_err());
        assert!(OnnxModel::from_bytes(&m.to_bytes()).is_err());
        for cut in [1, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(OnnxModel::from_bytes(&bytes[..cut]).is_err(), "cut {cut}");
        }
        assert!(OnnxModel::from_bytes(&vec![0u8; MAX_MODEL_BYTES + 1]).is_err());
    }

    #[test]
    fn a_wrong_export_fails_the_parity_check() {
        let (m, s) = model();
        let (other, _) = {
            let s2 = Swimmer::new(9).windows(64, &mut rand_chacha::ChaCha8Rng::seed_from_u64(9));
            (
                MicroModel::init(&ModelSpec::synthetic_pose(), &s2, 9).unwrap(),
                s2,
            )
        };
        let o = OnnxModel::from_bytes(&export(&other, &Lineage::base()).unwrap()).unwrap();
        let refs: Vec<&[f32]> = s.iter().map(|x| x.frames.as_slice()).collect();
        assert!(!parity(&m, &o, &refs).unwrap().holds());
        let nan = [vec![f32::NAN; 6]];
        assert!(!compare(&nan, &nan).holds());
    }

    #[test]
    fn candle_onnx_decodes_the_same_model() {
        let (m, _) = model();
        let lineage = Lineage {
            model_version: ModelRef::Version(2),
            parent_version: Some(ModelRef::Base),
            training_run: Some("run-x".into()),
        };
        let ours = to_proto(&m, &lineage).unwrap();
        let bytes = ours.encode_to_vec();
        let theirs = candle_onnx::onnx::ModelProto::decode(bytes.as_slice()).unwrap();
        assert!(theirs.encode_to_vec() == bytes);
        // Field by field: a field number of ours that fell on another field of onnx.proto
        // with the same wire type would still re-encode the same bytes.
        assert_eq!(theirs.ir_version, IR_VERSION);
        assert_eq!(theirs.model_version, 2);
        assert_eq!(
            (theirs.producer_name.as_str(), theirs.domain.as_str()),
            ("swimlane", "swimlane")
        );
        assert_eq!(theirs.producer_version, ours.producer_version);
        assert_eq!(theirs.doc_string, ours.doc_string);
        let opsets: Vec<_> = theirs
            .opset_import
            .iter()
            .map(|o| (o.domain.as_str(), o.version))
            .collect();
        assert_eq!(opsets, [("", OPSET)]);
        let md = |k: &str, v: &str| (k.to_string(), v.to_string());
        let theirs_md: Vec<_> = theirs
            .metadata_props
            .iter()
            .map(|e| md(&e.key, &e.value))
            .collect();
        let ours_md: Vec<_> = ours
            .metadata_props
            .iter()
            .map(|e| md(&e.key, &e.value))
            .collect();
        assert_eq!(theirs_md, ours_md);
        assert!(theirs_md.contains(&md("training_run", "run-x")));
        let (g, h) = (theirs.graph.unwrap(), ours.graph.unwrap());
        assert_eq!((&g.name, &g.doc_string), (&h.name, &h.doc_string));
        assert_eq!(g.node.len(), h.node.len());
        for (a, b) in g.node.iter().zip(&h.node) {
            assert_eq!(
                (&a.op_type, &a.name, &a.domain),
                (&b.op_type, &b.name, &b.domain)
            );
            assert_eq!((&a.input, &a.output), (&b.input, &b.output));
            let attrs_a: Vec<_> = a
                .attribute
                .iter()
                .map(|x| (&x.name, x.r#type, x.i))
                .collect();
            let attrs_b: Vec<_> = b
                .attribute
                .iter()
                .map(|x| (&x.name, x.r#type, x.i))
                .collect();
            assert_eq!(attrs_a, attrs_b);
            for x in &a.attribute {
                assert_eq!(
                    x.r#type,
                    candle_onnx::onnx::attribute_proto::AttributeType::Int as i32
                );
            }
        }
        assert_eq!(g.initializer.len(), h.initializer.len());
        for (a, b) in g.initializer.iter().zip(&h.initializer) {
            assert_eq!(
                (&a.name, &a.dims, a.data_type),
                (&b.name, &b.dims, b.data_type)
            );
            assert_eq!(
                a.data_type,
                candle_onnx::onnx::tensor_proto::DataType::Float as i32
            );
            assert!(a.raw_data == b.raw_data && a.float_data.is_empty());
        }
        let io = |v: &[candle_onnx::onnx::ValueInfoProto]| {
            v.iter()
                .map(|i| {
                    use candle_onnx::onnx::{
                        tensor_shape_proto::dimension::Value as D, type_proto::Value as T,
                    };
                    let Some(T::TensorType(t)) = i.r#type.as_ref().unwrap().value.as_ref() else {
                        panic!("{} is not a tensor", i.name)
                    };
                    let dims: Vec<String> = t
                        .shape
                        .as_ref()
                        .unwrap()
                        .dim
                        .iter()
                        .map(|d| match d.value.as_ref().unwrap() {
                            D::DimValue(n) => n.to_string(),
                            D::DimParam(p) => p.clone(),
                        })
                        .collect();
                    (i.name.clone(), t.elem_type, dims, i.doc_string.clone())
                })
                .collect::<Vec<_>>()
        };
        let f = DataType::Float as i32;
        let (input, output) = (io(&g.input), io(&g.output));
        assert_eq!(input.len(), 1);
        assert_eq!(output.len(), 1);
        assert_eq!(
            (&*input[0].0, input[0].1, input[0].2.join("x")),
            (INPUT_NAME, f, "batchx32x16".to_string())
        );
        assert_eq!(
            (&*output[0].0, output[0].1, output[0].2.join("x")),
            (OUTPUT_NAME, f, "batchx6".to_string())
        );
        assert_eq!(input[0].3, h.input[0].doc_string);
        assert_eq!(output[0].3, h.output[0].doc_string);
    }

    #[test]
    fn the_evaluator_refuses_what_it_does_not_know() {
        let (m, s) = model();
        let window = [s[0].frames.as_slice()];
        let good = to_proto(&m, &Lineage::base()).unwrap();
        let run = |p: &ModelProto| {
            let o = OnnxModel::from_bytes(&p.encode_to_vec()).expect("loads");
            o.predict_proba(&window)
        };
        assert!(run(&good).is_ok());
        type Edit = fn(&mut ModelProto);
        // Nodes: 0 Sub, 1 Mul, 2 Flatten, 3 Gemm, 4 Relu, 5 Gemm, 6 Relu, 7 Gemm, 8 Softmax.
        // Initializers: 0 norm.mean, 1 norm.inv_std, 2 fc1.weight, 3 fc1.bias, ...
        let edits: Vec<(&str, Edit)> = vec![
            ("another operator", |p| {
                p.graph.as_mut().unwrap().node[4].op_type = "Sigmoid".into()
            }),
            ("another domain", |p| {
                p.graph.as_mut().unwrap().node[0].domain = "com.example".into()
            }),
            ("an unknown attribute", |p| {
                p.graph.as_mut().unwrap().node[3]
                    .attribute
                    .push(int_attr("alpha", 2))
            }),
            ("transA", |p| {
                p.graph.as_mut().unwrap().node[3]
                    .attribute
                    .push(int_attr("transA", 1))
            }),
            ("a float attribute", |p| {
                p.graph.as_mut().unwrap().node[3].attribute[0].r#type = AttributeType::Float as i32
            }),
            ("softmax over another axis", |p| {
                p.graph.as_mut().unwrap().node[8].attribute[0].i = 0
            }),
            ("flatten at another axis", |p| {
                p.graph.as_mut().unwrap().node[2].attribute[0].i = 2
            }),
            ("shapes that do not multiply", |p| {
                p.graph.as_mut().unwrap().node[3].input[1] = "fc2.weight".into()
            }),
            ("a broadcast it does not do", |p| {
                p.graph.as_mut().unwrap().node[0].input[1] = "fc3.bias".into()
            }),
            ("an undefined input", |p| {
                p.graph.as_mut().unwrap().node[5].input[0] = "nowhere".into()
            }),
            ("a value defined twice", |p| {
                p.graph.as_mut().unwrap().node[4].output[0] = "centred".into()
            }),
            ("a missing node", |p| {
                p.graph.as_mut().unwrap().node.remove(8);
            }),
            ("a double initializer", |p| {
                // 11 is DOUBLE in onnx.proto's DataType.
                p.graph.as_mut().unwrap().initializer[2].data_type = 11
            }),
            ("short raw_data", |p| {
                p.graph.as_mut().unwrap().initializer[2].raw_data.pop();
            }),
            ("a negative dimension", |p| {
                p.graph.as_mut().unwrap().initializer[0].dims[0] = -16
            }),
            ("an old opset", |p| p.opset_import[0].version = 11),
            ("no opset", |p| p.opset_import.clear()),
            ("another input shape", |p| {
                let g = p.graph.as_mut().unwrap();
                let Some(type_proto::Value::TensorType(t)) =
                    g.input[0].r#type.as_mut().unwrap().value.as_mut()
                else {
                    unreachable!()
                };
                t.shape.as_mut().unwrap().dim[1].value =
                    Some(tensor_shape_proto::dimension::Value::DimValue(31));
            }),
            ("no graph", |p| p.graph = None),
        ];
        for (what, edit) in edits {
            let mut p = good.clone();
            edit(&mut p);
            let r = if p.graph.is_none() {
                eval::run(
                    &p,
                    eval::Value {
                        shape: vec![1, WINDOW_FRAMES, WINDOW_FEATURES],
                        data: window[0].to_vec(),
                    },
                )
                .map(|_| ())
            } else {
                run(&p).map(|_| ())
            };
            match r {
                Err(ModelError::Format(e)) => eprintln!("{what}: {e}"),
                other => panic!("{what}: {other:?}"),
            }
        }
    }
}
