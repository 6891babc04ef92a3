//! The evaluator of [`super::OnnxModel::predict_proba`]: runs the graph of a decoded ONNX
//! file on one input, with the file's initializers, node by node in the file's order.
//!
//! It knows exactly the operators the exporter writes (ONNX's default domain, opset 13
//! to [`super::OPSET`], where they mean the same):
//! - `Sub`, `Mul`, `Add`: float32, the second operand's shape a suffix of the first's
//!   (or the other way round): `[batch, 32, 16] - [16]`; no other broadcasting;
//! - `Sqrt`, `Sign`;
//! - `ReduceMax` of a rank-2 value over its last axis (`axes` [1], `keepdims` 1);
//! - `Concat` of rank-2 values along the last axis (`axis` 1 or -1);
//! - `Flatten` (`axis`);
//! - `Gemm`: `A [M, K]`, `B [N, K]` with `transB=1` (or `[K, N]`), optional `C` of
//!   shape `[N]`, `[1, N]` or `[M, N]`; `alpha` and `beta` absent (1), `transA` 0;
//! - `Relu`;
//! - `Softmax` over the last axis (`axis` -1 or rank - 1).
//!
//! Anything else (another operator or domain, an attribute it does not know or of
//! another type, a shape that does not fit, an initializer that is not float32 in
//! `raw_data`, a name no earlier node defines) is a [`ModelError::Format`], never a
//! panic. Float32 throughout, computed here (not with candle), so the parity tests
//! compare the file's arithmetic with the candle model's.
use std::collections::HashMap;

use super::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    type_proto, ModelProto, NodeProto, TensorProto,
};
use crate::ModelError;

/// The oldest default-domain opset whose operators mean what this evaluator computes
/// (Softmax's `axis` took its current meaning in opset 13).
pub const MIN_OPSET: i64 = 13;

/// A dense float32 tensor, row-major; `data.len()` is the product of `shape`.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn refuse(msg: impl std::fmt::Display) -> ModelError {
    ModelError::Format(format!("the ONNX graph cannot be evaluated: {msg}"))
}

fn is_default_domain(d: &str) -> bool {
    d.is_empty() || d == "ai.onnx"
}

/// [`run_with`] with nothing known.
#[cfg(test)]
pub fn run(model: &ModelProto, input: Value) -> Result<Value, ModelError> {
    run_with(model, input, &[], None).map(|(out, _)| out)
}

/// Run `model`'s graph with `input` as its (only) input; the value of its (only) output.
/// Given values `known` already has for this input (by name), the nodes that compute
/// them, and any node whose value only such skipped nodes read, are not evaluated, and
/// initializers no evaluated node reads are checked but not converted; with nothing
/// known every node is evaluated. What is checked does not depend on what is known: one
/// value a node, none defined twice, every initializer's type and size. Also returns
/// the value named `keep` (`None` when the graph has no such value). What is known must
/// be what those nodes would compute for this input: the caller's to guarantee (the
/// export check knows the base model's part of a file by its bytes,
/// `super::BaseAnswers`).
pub fn run_with(
    model: &ModelProto,
    input: Value,
    known: &[(&str, &Value)],
    keep: Option<&str>,
) -> Result<(Value, Option<Value>), ModelError> {
    let opsets: Vec<i64> = model
        .opset_import
        .iter()
        .filter(|o| is_default_domain(&o.domain))
        .map(|o| o.version)
        .collect();
    match opsets.as_slice() {
        [v] if (MIN_OPSET..=super::OPSET).contains(v) => {}
        _ => {
            return Err(refuse(format!(
                "default-domain opset {opsets:?}, supported {MIN_OPSET} to {}",
                super::OPSET
            )))
        }
    }
    let graph = model.graph.as_ref().ok_or_else(|| refuse("no graph"))?;
    let (input_info, output_info) = match (graph.input.as_slice(), graph.output.as_slice()) {
        ([i], [o]) => (i, o),
        _ => {
            return Err(refuse(format!(
                "{} inputs and {} outputs, expected one of each",
                graph.input.len(),
                graph.output.len()
            )))
        }
    };
    check_input_type(input_info, &input.shape)?;

    // Every node defines one value, and no value twice (also where nodes are skipped).
    let mut defined = std::collections::HashSet::new();
    for node in &graph.node {
        match node.output.as_slice() {
            [name] if !name.is_empty() => {
                if !defined.insert(name.as_str()) {
                    return Err(refuse(format!("value {name:?} is defined twice")));
                }
            }
            _ => {
                return Err(refuse(format!(
                    "node {:?} has outputs {:?}, expected one",
                    node.name, node.output
                )))
            }
        }
    }
    // The nodes to evaluate: all but those that compute a known value and those whose
    // value only skipped nodes read (a node nothing reads is still evaluated). The graph
    // is in topological order, so a node's readers come after it.
    let mut evaluate = vec![true; graph.node.len()];
    if !known.is_empty() {
        for i in (0..graph.node.len()).rev() {
            let out = graph.node[i].output[0].as_str();
            let readers = || {
                graph.node[i + 1..]
                    .iter()
                    .zip(&evaluate[i + 1..])
                    .filter(|(n, _)| n.input.iter().any(|x| x == out))
            };
            let skip = known.iter().any(|(k, _)| *k == out)
                || (out != output_info.name
                    && keep != Some(out)
                    && readers().next().is_some()
                    && readers().all(|(_, e)| !*e));
            evaluate[i] = !skip;
        }
    }
    let read: std::collections::HashSet<&str> = graph
        .node
        .iter()
        .zip(&evaluate)
        .filter(|(_, e)| **e)
        .flat_map(|(n, _)| n.input.iter().map(String::as_str))
        .collect();

    let mut env: HashMap<&str, Value> = HashMap::new();
    let mut names = std::collections::HashSet::new();
    for t in &graph.initializer {
        if t.name.is_empty() || !names.insert(t.name.as_str()) {
            return Err(refuse(format!(
                "initializer name {:?} empty or repeated",
                t.name
            )));
        }
        // Checked whether or not it is read; converted only if it is.
        let shape = initializer_shape(t)?;
        if known.is_empty() || read.contains(t.name.as_str()) {
            let data = swimlane_core::batch::f32s_from_le(&t.raw_data);
            env.insert(t.name.as_str(), Value { shape, data });
        }
    }
    if let Some(n) = graph
        .node
        .iter()
        .find(|n| names.contains(n.output[0].as_str()) || n.output[0] == input_info.name)
    {
        return Err(refuse(format!("value {:?} is defined twice", n.output[0])));
    }
    // An input named like an initializer overrides it (the initializer is its default).
    env.insert(input_info.name.as_str(), input);
    for (name, v) in known {
        env.insert(name, (*v).clone());
    }

    for (node, _) in graph.node.iter().zip(&evaluate).filter(|(_, e)| **e) {
        let out = eval_node(node, &env)
            .map_err(|e| refuse(format!("node {:?} ({}): {e}", node.name, node.op_type)))?;
        // One output, defined nowhere else (checked above, against the other nodes, the
        // initializers and the input); a known value's node is not evaluated.
        env.insert(node.output[0].as_str(), out);
    }
    let kept = keep.and_then(|k| env.get(k).cloned());
    let out = env.remove(output_info.name.as_str()).ok_or_else(|| {
        refuse(format!(
            "no node computes the output {:?}",
            output_info.name
        ))
    })?;
    Ok((out, kept))
}

/// The graph input must be a float32 tensor of `shape`'s rank whose fixed dimensions
/// are `shape`'s (symbolic or unknown dimensions take any size).
fn check_input_type(
    info: &super::proto::ValueInfoProto,
    shape: &[usize],
) -> Result<(), ModelError> {
    let tensor = match info.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => t,
        None => return Err(refuse(format!("input {:?} is not a tensor", info.name))),
    };
    if tensor.elem_type != DataType::Float as i32 {
        return Err(refuse(format!(
            "input {:?} has element type {}, expected float32",
            info.name, tensor.elem_type
        )));
    }
    let dims = tensor
        .shape
        .as_ref()
        .map(|s| s.dim.as_slice())
        .unwrap_or(&[]);
    let fits = dims.len() == shape.len()
        && dims.iter().zip(shape).all(|(d, n)| match d.value {
            Some(dimension::Value::DimValue(v)) => v == *n as i64,
            Some(dimension::Value::DimParam(_)) | None => true,
        });
    if !fits {
        return Err(refuse(format!(
            "input {:?} does not take a tensor of shape {shape:?}",
            info.name
        )));
    }
    Ok(())
}

/// A float32 initializer from its little-endian `raw_data`.
/// An initializer's shape, once it is checked to be float32 `raw_data` of that shape.
fn initializer_shape(t: &TensorProto) -> Result<Vec<usize>, ModelError> {
    let bad = |what: &str| refuse(format!("initializer {:?}: {what}", t.name));
    if t.data_type != DataType::Float as i32 {
        return Err(bad(&format!(
            "element type {}, expected float32",
            t.data_type
        )));
    }
    let shape = t
        .dims
        .iter()
        .map(|d| usize::try_from(*d).map_err(|_| bad("negative dimension")))
        .collect::<Result<Vec<usize>, _>>()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d))
        .ok_or_else(|| bad("too large"))?;
    if n.checked_mul(4) != Some(t.raw_data.len()) {
        return Err(bad(&format!(
            "{} bytes of raw_data for {n} float32 values (only raw_data is read)",
            t.raw_data.len()
        )));
    }
    Ok(shape)
}

/// `node`'s integer attributes, each of them one of `allowed`.
fn int_attrs<'a>(node: &'a NodeProto, allowed: &[&str]) -> Result<HashMap<&'a str, i64>, String> {
    let mut out = HashMap::new();
    for a in &node.attribute {
        if !allowed.contains(&a.name.as_str()) {
            return Err(format!("attribute {:?} is not supported", a.name));
        }
        if a.r#type != AttributeType::Int as i32 {
            return Err(format!("attribute {:?} is not an INT", a.name));
        }
        if out.insert(a.name.as_str(), a.i).is_some() {
            return Err(format!("attribute {:?} is repeated", a.name));
        }
    }
    Ok(out)
}

/// The values of `node`'s inputs; `arity` says how many it may have.
fn inputs<'e>(
    node: &NodeProto,
    env: &'e HashMap<&str, Value>,
    arity: std::ops::RangeInclusive<usize>,
) -> Result<Vec<&'e Value>, String> {
    if !arity.contains(&node.input.len()) {
        return Err(format!("{} inputs, expected {arity:?}", node.input.len()));
    }
    node.input
        .iter()
        .map(|name| {
            env.get(name.as_str())
                .ok_or_else(|| format!("input {name:?} is not defined before the node"))
        })
        .collect()
}

fn eval_node(node: &NodeProto, env: &HashMap<&str, Value>) -> Result<Value, String> {
    if !is_default_domain(&node.domain) {
        return Err(format!("domain {:?} is not supported", node.domain));
    }
    match node.op_type.as_str() {
        "Sub" | "Mul" | "Add" => {
            int_attrs(node, &[])?;
            let x = inputs(node, env, 2..=2)?;
            match node.op_type.as_str() {
                "Sub" => elementwise(x[0], x[1], |a, b| a - b),
                "Mul" => elementwise(x[0], x[1], |a, b| a * b),
                _ => elementwise(x[0], x[1], |a, b| a + b),
            }
        }
        "Sqrt" | "Sign" => {
            int_attrs(node, &[])?;
            let x = inputs(node, env, 1..=1)?[0];
            let f: fn(f32) -> f32 = if node.op_type == "Sqrt" {
                // NaN for a negative input, as in ONNX.
                f32::sqrt
            } else {
                // -1, 0 or 1 (0 for both zeros), NaN stays NaN, as in ONNX.
                |v| {
                    if v > 0.0 {
                        1.0
                    } else if v < 0.0 {
                        -1.0
                    } else {
                        v * 0.0
                    }
                }
            };
            Ok(Value {
                shape: x.shape.clone(),
                data: x.data.iter().map(|v| f(*v)).collect(),
            })
        }
        "ReduceMax" => reduce_max_columns(inputs(node, env, 1..=1)?[0], node),
        "Concat" => {
            let axis = int_attrs(node, &["axis"])?
                .get("axis")
                .copied()
                .ok_or("Concat needs an axis")?;
            concat_columns(&inputs(node, env, 1..=usize::MAX)?, axis)
        }
        "Flatten" => {
            let axis = int_attrs(node, &["axis"])?
                .get("axis")
                .copied()
                .unwrap_or(1);
            flatten(inputs(node, env, 1..=1)?[0], axis)
        }
        "Gemm" => {
            let attrs = int_attrs(node, &["transA", "transB"])?;
            if attrs.get("transA").copied().unwrap_or(0) != 0 {
                return Err("transA other than 0 is not supported".into());
            }
            let trans_b = match attrs.get("transB").copied().unwrap_or(0) {
                0 => false,
                1 => true,
                t => return Err(format!("transB {t} is not 0 or 1")),
            };
            let x = inputs(node, env, 2..=3)?;
            gemm(x[0], x[1], x.get(2).copied(), trans_b)
        }
        "Relu" => {
            int_attrs(node, &[])?;
            let x = inputs(node, env, 1..=1)?[0];
            Ok(Value {
                shape: x.shape.clone(),
                // NaN stays NaN, as in ONNX.
                data: x
                    .data
                    .iter()
                    .map(|v| if *v < 0.0 { 0.0 } else { *v })
                    .collect(),
            })
        }
        "Softmax" => {
            let axis = int_attrs(node, &["axis"])?
                .get("axis")
                .copied()
                .unwrap_or(-1);
            softmax(inputs(node, env, 1..=1)?[0], axis)
        }
        op => Err(format!("operator {op:?} is not supported")),
    }
}

/// `f(a, b)` element by element, where one shape is a suffix of the other (so the
/// shorter operand repeats along the leading dimensions of the longer).
fn elementwise(a: &Value, b: &Value, f: impl Fn(f32, f32) -> f32 + Copy) -> Result<Value, String> {
    // The value whose shape ends with the other's; the other repeats along it. A loop
    // over whole repeats (not an iterator cycling through the smaller value) lets the
    // compiler vectorise it.
    let (big, small, swapped) = if a.shape.ends_with(&b.shape) {
        (a, b, false)
    } else if b.shape.ends_with(&a.shape) {
        (b, a, true)
    } else {
        return Err(format!(
            "shapes {:?} and {:?}: only a shape that is a suffix of the other broadcasts",
            a.shape, b.shape
        ));
    };
    let n = small.data.len();
    if big.data.is_empty() {
        return Ok(Value {
            shape: big.shape.clone(),
            data: Vec::new(),
        });
    }
    if n == 0 || big.data.len() % n != 0 {
        return Err(format!(
            "values of shapes {:?} and {:?} hold {} and {} values",
            big.shape,
            small.shape,
            big.data.len(),
            n
        ));
    }
    let mut data = Vec::with_capacity(big.data.len());
    for row in big.data.chunks_exact(n) {
        if swapped {
            data.extend(small.data.iter().zip(row).map(|(x, y)| f(*x, *y)));
        } else {
            data.extend(row.iter().zip(&small.data).map(|(x, y)| f(*x, *y)));
        }
    }
    Ok(Value {
        shape: big.shape.clone(),
        data,
    })
}

/// `ReduceMax` of a rank-2 value over its last axis, keeping it (`axes` [1] or [-1],
/// `keepdims` 1): the only reduction the exporter writes. An empty row is refused.
fn reduce_max_columns(x: &Value, node: &NodeProto) -> Result<Value, String> {
    let (mut axes, mut keepdims) = (None, None);
    for a in &node.attribute {
        match (a.name.as_str(), a.r#type) {
            ("axes", t) if t == AttributeType::Ints as i32 && axes.is_none() => {
                axes = Some(a.ints.clone())
            }
            ("keepdims", t) if t == AttributeType::Int as i32 && keepdims.is_none() => {
                keepdims = Some(a.i)
            }
            (name, _) => return Err(format!("attribute {name:?} is not supported here")),
        }
    }
    if !matches!(axes.as_deref(), Some([1]) | Some([-1])) || keepdims != Some(1) {
        return Err(format!(
            "axes {axes:?}, keepdims {keepdims:?}: only axes [1] with keepdims 1"
        ));
    }
    let (m, n) = match x.shape.as_slice() {
        [m, n] if *n > 0 => (*m, *n),
        s => return Err(format!("input of shape {s:?}, expected [M, N] with N > 0")),
    };
    Ok(Value {
        shape: vec![m, 1],
        data: (0..m)
            .map(|i| {
                x.data[i * n..(i + 1) * n]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max)
            })
            .collect(),
    })
}

/// `Concat` of rank-2 values along their last axis (`axis` 1 or -1): the only
/// concatenation the exporter writes.
fn concat_columns(xs: &[&Value], axis: i64) -> Result<Value, String> {
    if axis != 1 && axis != -1 {
        return Err(format!("axis {axis}: only the last axis of rank-2 values"));
    }
    let rows = match xs.first().map(|x| x.shape.as_slice()) {
        Some([m, _]) => *m,
        _ => return Err("inputs must be rank 2".into()),
    };
    let mut widths = Vec::with_capacity(xs.len());
    for x in xs {
        match x.shape.as_slice() {
            [m, n] if *m == rows => widths.push(*n),
            s => return Err(format!("input of shape {s:?} next to {rows} rows")),
        }
    }
    let total: usize = widths.iter().sum();
    let mut data = Vec::with_capacity(rows * total);
    for i in 0..rows {
        for (x, n) in xs.iter().zip(&widths) {
            data.extend_from_slice(&x.data[i * n..(i + 1) * n]);
        }
    }
    Ok(Value {
        shape: vec![rows, total],
        data,
    })
}

fn flatten(x: &Value, axis: i64) -> Result<Value, String> {
    let rank = x.shape.len() as i64;
    if !(-rank..=rank).contains(&axis) {
        return Err(format!("axis {axis} out of range for rank {rank}"));
    }
    let axis = if axis < 0 { axis + rank } else { axis } as usize;
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis..].iter().product();
    Ok(Value {
        shape: vec![outer, inner],
        data: x.data.clone(),
    })
}

/// `A B + C` (`A B^T + C` with `trans_b`).
fn gemm(a: &Value, b: &Value, c: Option<&Value>, trans_b: bool) -> Result<Value, String> {
    let (m, k) = match a.shape.as_slice() {
        [m, k] => (*m, *k),
        s => return Err(format!("A has shape {s:?}, expected [M, K]")),
    };
    let (n, kb) = match (b.shape.as_slice(), trans_b) {
        ([n, k], true) => (*n, *k),
        ([k, n], false) => (*n, *k),
        (s, _) => return Err(format!("B has shape {s:?}, expected rank 2")),
    };
    if kb != k {
        return Err(format!(
            "A {:?} and B {:?} (transB={}) do not multiply",
            a.shape, b.shape, trans_b as u8
        ));
    }
    // B as [N, K]: each output is the dot product of two contiguous rows.
    let bt: Vec<f32>;
    let b_rows: &[f32] = if trans_b {
        &b.data
    } else {
        // Row by row of B, without a division per element (that gather was 4% of the
        // publisher's samples, for the familiarity's matrices).
        let mut t = vec![0f32; n * k];
        if n > 0 {
            for (kk, row) in b.data.chunks_exact(n).take(k).enumerate() {
                for (j, v) in row.iter().enumerate() {
                    t[j * k + kk] = *v;
                }
            }
        }
        bt = t;
        &bt
    };
    // The bias as one row of N repeated, or the whole [M, N].
    let (bias, bias_rows) = match c.map(|c| c.shape.as_slice()) {
        None => (None, false),
        Some([nc]) | Some([1, nc]) if *nc == n => (c, false),
        Some([mc, nc]) if *mc == m && *nc == n => (c, true),
        Some(s) => {
            return Err(format!(
                "C has shape {s:?}, expected [{n}], [1, {n}] or [{m}, {n}]"
            ))
        }
    };
    let mut data = vec![0f32; m * n];
    if fma_available() {
        // SAFETY: `fma_available` checked that this CPU has AVX2 and FMA.
        unsafe { products_fma(&a.data, b_rows, m, n, k, &mut data) };
    } else {
        products(&a.data, b_rows, m, n, k, &mut data);
    }
    if let Some(c) = bias {
        for (i, out) in data.chunks_exact_mut(n).enumerate() {
            let b = if bias_rows {
                &c.data[i * n..(i + 1) * n]
            } else {
                &c.data[..n]
            };
            for (o, b) in out.iter_mut().zip(b) {
                *o += b;
            }
        }
    }
    Ok(Value {
        shape: vec![m, n],
        data,
    })
}

/// Whether [`dot_fma`] can run here (x86-64 with AVX2 and FMA, detected at run time:
/// the binaries are built for baseline x86-64, where [`dot`] gets 128-bit SSE2 and no
/// fused multiply-add).
fn fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[i * n + j]` = row `i` of `a` ([m, k]) · row `j` of `b` ([n, k]), two rows of `a`
/// by four rows of `b` at a time: each 8-value step loads six vectors for eight fused
/// multiply-adds, where one [`dot_fma`] at a time loads two for one (the publisher's
/// export check spent most of its evaluator's time in those loads). A leftover row or
/// column goes through [`dot_fma`].
///
/// # Safety
/// Only on a CPU with AVX2 and FMA ([`fma_available`]); `a` holds `m * k` values, `b`
/// `n * k` and `out` `m * n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn products_fma(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(a.len() >= m * k && b.len() >= n * k && out.len() >= m * n);
    let steps = k / 8;
    let sum8 = |v: __m256| -> f32 {
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), v);
        ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
    };
    let tail = |x: &[f32], y: &[f32]| -> f32 {
        x[steps * 8..k]
            .iter()
            .zip(&y[steps * 8..k])
            .map(|(p, q)| p * q)
            .sum()
    };
    let mut i = 0;
    while i + 2 <= m {
        let (r0, r1) = (&a[i * k..(i + 1) * k], &a[(i + 1) * k..(i + 2) * k]);
        let mut j = 0;
        while j + 4 <= n {
            let c: [&[f32]; 4] = std::array::from_fn(|q| &b[(j + q) * k..(j + q + 1) * k]);
            let mut acc = [[_mm256_setzero_ps(); 4]; 2];
            for s in 0..steps {
                // SAFETY (every load): `8 * s + 8 <= k`, within each row.
                let x0 = _mm256_loadu_ps(r0.as_ptr().add(8 * s));
                let x1 = _mm256_loadu_ps(r1.as_ptr().add(8 * s));
                for q in 0..4 {
                    let y = _mm256_loadu_ps(c[q].as_ptr().add(8 * s));
                    acc[0][q] = _mm256_fmadd_ps(x0, y, acc[0][q]);
                    acc[1][q] = _mm256_fmadd_ps(x1, y, acc[1][q]);
                }
            }
            for q in 0..4 {
                out[i * n + j + q] = sum8(acc[0][q]) + tail(r0, c[q]);
                out[(i + 1) * n + j + q] = sum8(acc[1][q]) + tail(r1, c[q]);
            }
            j += 4;
        }
        for j in j..n {
            let c = &b[j * k..(j + 1) * k];
            out[i * n + j] = dot_fma(r0, c);
            out[(i + 1) * n + j] = dot_fma(r1, c);
        }
        i += 2;
    }
    for i in i..m {
        let r = &a[i * k..(i + 1) * k];
        for j in 0..n {
            out[i * n + j] = dot_fma(r, &b[j * k..(j + 1) * k]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn products_fma(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    products(a, b, m, n, k, out)
}

/// [`products_fma`] one [`dot`] at a time, on any CPU.
fn products(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    for i in 0..m {
        let row = &a[i * k..(i + 1) * k];
        for j in 0..n {
            out[i * n + j] = dot(row, &b[j * k..(j + 1) * k]);
        }
    }
}

/// [`dot`] with AVX2 fused multiply-adds into four 256-bit accumulators (32 running
/// sums), which keep the FMA units busy. The publisher checks every export on
/// 64 probe windows; with [`dot`] its evaluator's gemm was a fifth of the publisher's
/// CPU. Sums in another order than [`dot`], so results may differ in the last bits.
///
/// # Safety
/// Only on a CPU with AVX2 and FMA ([`fma_available`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_fma(x: &[f32], y: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let (px, py) = (x.as_ptr(), y.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (every load): `i + 8 * (a + 1) <= n`, within both slices.
    while i + 32 <= n {
        for (a, sum) in acc.iter_mut().enumerate() {
            let (xa, ya) = (px.add(i + 8 * a), py.add(i + 8 * a));
            *sum = _mm256_fmadd_ps(_mm256_loadu_ps(xa), _mm256_loadu_ps(ya), *sum);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(px.add(i)),
            _mm256_loadu_ps(py.add(i)),
            acc[0],
        );
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut l = [0f32; 8];
    _mm256_storeu_ps(l.as_mut_ptr(), sum);
    let tail: f32 = x[i..n].iter().zip(&y[i..n]).map(|(a, b)| a * b).sum();
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])) + tail
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_fma(x: &[f32], y: &[f32]) -> f32 {
    dot(x, y)
}

/// Dot product of two slices of the same length, in eight running sums.
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    let tail: f32 = xr.iter().zip(yr).map(|(a, b)| a * b).sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Softmax over the last axis (`exp(x - max) / sum`), as candle computes it.
fn softmax(x: &Value, axis: i64) -> Result<Value, String> {
    let rank = x.shape.len() as i64;
    if rank == 0 || (axis != -1 && axis != rank - 1) {
        return Err(format!(
            "axis {axis} for rank {rank}: only the last axis is supported"
        ));
    }
    let n = x.shape[x.shape.len() - 1];
    if n == 0 {
        return Err("the last axis is empty".into());
    }
    let mut data = Vec::with_capacity(x.data.len());
    for row in x.data.chunks_exact(n) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let start = data.len();
        data.extend(row.iter().map(|v| (v - max).exp()));
        let sum: f32 = data[start..].iter().sum();
        for v in &mut data[start..] {
            *v /= sum;
        }
    }
    Ok(Value {
        shape: x.shape.clone(),
        data,
    })
}

#[cfg(test)]
mod tests {
    /// The fused dot product agrees with the portable one (to rounding), for lengths
    /// with and without a tail.
    #[test]
    fn the_fused_dot_product_agrees_with_the_portable_one() {
        if !super::fma_available() {
            return eprintln!("skipped: this CPU has no AVX2 and FMA");
        }
        for n in [0usize, 1, 7, 31, 32, 33, 64, 100, 512] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let y: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 11.0)
                .collect();
            let exact: f64 = x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
            // SAFETY: checked above.
            let fused = unsafe { super::dot_fma(&x, &y) };
            let plain = super::dot(&x, &y);
            let scale = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a * b).abs() as f64)
                .sum::<f64>()
                + 1.0;
            assert!(
                (fused as f64 - exact).abs() / scale < 1e-6,
                "n={n}: {fused} vs {exact}"
            );
            assert!(
                (plain as f64 - exact).abs() / scale < 1e-6,
                "n={n}: {plain} vs {exact}"
            );
        }
    }

    /// The blocked products agree with one dot product at a time (to rounding), for
    /// shapes with leftover rows, columns and values (m, n, k not multiples of 2, 4, 8).
    #[test]
    fn the_blocked_products_agree_with_one_dot_product_at_a_time() {
        if !super::fma_available() {
            return eprintln!("skipped: this CPU has no AVX2 and FMA");
        }
        for (m, n, k) in [
            (1, 1, 1),
            (2, 4, 8),
            (3, 5, 13),
            (64, 128, 512),
            (5, 6, 64),
            (4, 7, 0),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 11.0)
                .collect();
            let mut out = vec![f32::NAN; m * n];
            // SAFETY: checked above; the lengths are m * k, n * k and m * n.
            unsafe { super::products_fma(&a, &b, m, n, k, &mut out) };
            for i in 0..m {
                for j in 0..n {
                    let (x, y) = (&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]);
                    let exact: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
                    let scale: f64 = x
                        .iter()
                        .zip(y)
                        .map(|(p, q)| (p * q).abs() as f64)
                        .sum::<f64>()
                        + 1.0;
                    let got = out[i * n + j];
                    assert!(
                        (got as f64 - exact).abs() / scale < 1e-6,
                        "{m}x{n}x{k} at ({i}, {j}): {got} vs {exact}"
                    );
                }
            }
        }
    }

    use super::*;

    fn v(shape: &[usize], data: &[f32]) -> Value {
        Value {
            shape: shape.to_vec(),
            data: data.to_vec(),
        }
    }

    #[test]
    fn ops_compute_what_onnx_says() {
        let a = v(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let r = elementwise(&a, &v(&[3], &[1.0, 0.0, -1.0]), |x, y| x - y).unwrap();
        assert_eq!(r, v(&[2, 3], &[0.0, 2.0, 4.0, 3.0, 5.0, 7.0]));
        let r = elementwise(&v(&[3], &[1.0, 2.0, 3.0]), &a, |x, y| x * y).unwrap();
        assert_eq!(r.data, [1.0, 4.0, 9.0, 4.0, 10.0, 18.0]);
        // The smaller value first keeps the order of the operands.
        let r = elementwise(&v(&[3], &[1.0, 2.0, 3.0]), &a, |x, y| x - y).unwrap();
        assert_eq!(r.data, [0.0, 0.0, 0.0, -3.0, -3.0, -3.0]);
        // Values that do not hold what their shapes say: an error, not a panic.
        let hollow = Value {
            shape: vec![3],
            data: Vec::new(),
        };
        assert!(elementwise(&a, &hollow, |x, y| x - y).is_err());
        assert!(elementwise(&a, &v(&[2], &[1.0, 2.0]), |x, y| x - y).is_err());
        assert!(elementwise(&a, &v(&[1, 3], &[1.0, 2.0, 3.0]), |x, y| x - y).is_err());

        let f = flatten(&v(&[2, 3, 1], &a.data), 1).unwrap();
        assert_eq!(f.shape, [2, 3]);
        assert_eq!(flatten(&a, 0).unwrap().shape, [1, 6]);
        assert_eq!(flatten(&a, -1).unwrap().shape, [2, 3]);
        assert!(flatten(&a, 3).is_err());

        // [2, 3] x [2, 3]^T + [2]
        let w = v(&[2, 3], &[1.0, 0.0, 0.0, 0.0, 1.0, 1.0]);
        let bias = v(&[2], &[0.5, -0.5]);
        let g = gemm(&a, &w, Some(&bias), true).unwrap();
        assert_eq!(g, v(&[2, 2], &[1.5, 4.5, 4.5, 10.5]));
        // The same B untransposed.
        let wt = v(&[3, 2], &[1.0, 0.0, 0.0, 1.0, 0.0, 1.0]);
        assert_eq!(gemm(&a, &wt, Some(&bias), false).unwrap(), g);
        assert_eq!(
            gemm(&a, &wt, None, false).unwrap().data,
            [1.0, 5.0, 4.0, 11.0]
        );
        assert!(gemm(&a, &wt, Some(&bias), true).is_err());
        assert!(gemm(&a, &w, Some(&v(&[3], &[0.0; 3])), true).is_err());
        assert!(gemm(&v(&[6], &a.data), &w, None, true).is_err());

        let long: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let d = dot(&long, &long);
        assert_eq!(d, (0..19).map(|i| (i * i) as f32).sum::<f32>());

        let s = softmax(&v(&[2, 2], &[0.0, 0.0, 1000.0, 0.0]), -1).unwrap();
        assert_eq!(s.data, [0.5, 0.5, 1.0, 0.0]);
        assert!(softmax(&a, 0).is_err());
        assert!(softmax(&v(&[2, 0], &[]), -1).is_err());
    }
}
