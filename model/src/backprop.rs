//! One training step's loss and gradients for the micro model, derived by hand.
//!
//! # Contract
//! - [`loss_and_grads`] returns the mean cross-entropy of `logits + adjust` against the
//!   labels, and its gradient with respect to each of the model's six parameters (in
//!   `MicroModel::params` order), for a batch of windows that is already normalised
//!   (`MicroModel::normalise`). These are the loss and the gradients candle's autograd
//!   gives for `cross_entropy(forward(x) + adjust, y)`, up to rounding: the tests
//!   compare them.
//! - One exception, of measure zero: ReLU's gradient at exactly 0 is taken as 0 here
//!   (candle's autograd takes it as 1).
//! - [`loss`] is the same loss with no gradients (the early-stopping check), and
//!   [`logits`] the network's logits alone (`MicroModel::predict_proba`, with
//!   [`softmax_rows`]).
//! - The parameters are read, never written; nothing is recorded for autograd.
//!
//! Why: a fine-tune takes steps of 32 windows on a 74k-parameter network, where each
//! tensor operation's fixed cost counts. Candle's autograd runs about thirty operations
//! per step beyond the eight matrix products (a zeroed tensor and an add to accumulate
//! every gradient, copies of transposed views, the normalisation of every batch, the
//! loss's half-dozen small operations), and they took more time than the products
//! (bench/README.md, "The training step, derived by hand"). Here the eight products are
//! candle's; the bias, the ReLU and its mask, the softmax and the bias gradients are
//! single loops over the products' outputs.
use candle_core::{CpuStorage, Storage, Tensor};

/// `t`'s values (contiguous `f32` on the CPU), lent to `f`.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(values)), Some((from, to))) =
        (&*storage, layout.contiguous_offsets())
    else {
        candle_core::bail!("expected a contiguous f32 CPU tensor");
    };
    Ok(f(&values[from..to]))
}

/// `x · wᵀ + b`, then ReLU when `relu`: `x` is [n, k], `w` [m, k], `b` [m].
fn linear(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
    let z = x.matmul(&w.t()?)?;
    let (n, m) = z.dims2()?;
    let mut out = with_f32(&z, |z| z.to_vec())?;
    with_f32(b, |b| {
        for row in out.chunks_exact_mut(m) {
            for (v, &b) in row.iter_mut().zip(b) {
                let s = *v + b;
                *v = if relu { s.max(0.0) } else { s };
            }
        }
    })?;
    Tensor::from_vec(out, (n, m), x.device())
}

/// The network's activations for a batch: both hidden layers and the logits.
struct Forward {
    h1: Tensor,
    h2: Tensor,
    logits: Vec<f32>,
}

fn forward(params: &[Tensor], xn: &Tensor) -> candle_core::Result<Forward> {
    let h1 = linear(xn, &params[0], &params[1], true)?;
    let h2 = linear(&h1, &params[2], &params[3], true)?;
    let z3 = linear(&h2, &params[4], &params[5], false)?;
    let logits = with_f32(&z3, |z| z.to_vec())?;
    Ok(Forward { h1, h2, logits })
}

/// `row` replaced by `exp(row - max(row))`; returns that max and the new row's sum (the
/// softmax is the row over the sum).
fn exp_shifted(row: &mut [f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for r in row.iter_mut() {
        *r = (*r - max).exp();
        sum += *r;
    }
    (max, sum)
}

/// The softmax of each row of `logits` ([n, k] row-major).
pub(crate) fn softmax_rows(logits: &[f32], k: usize) -> Vec<Vec<f32>> {
    logits
        .chunks_exact(k)
        .map(|z| {
            let mut row = z.to_vec();
            let (_, sum) = exp_shifted(&mut row);
            row.iter_mut().for_each(|r| *r /= sum);
            row
        })
        .collect()
}

/// The mean cross-entropy of `logits + adjust` ([n, k] row-major) against `y`, and,
/// when `grad` is given, its gradient with respect to the logits written into it.
fn cross_entropy(
    logits: &[f32],
    k: usize,
    adjust: Option<&[f32]>,
    y: &[u32],
    mut grad: Option<&mut [f32]>,
) -> candle_core::Result<f32> {
    let n = y.len();
    if logits.len() != n * k {
        candle_core::bail!("{} logits for {n} labels of {k} classes", logits.len());
    }
    let mut total = 0f32;
    let mut row = vec![0f32; k];
    for (i, (z, &label)) in logits.chunks_exact(k).zip(y).enumerate() {
        let label = label as usize;
        if label >= k {
            candle_core::bail!("label {label} is not one of {k} classes");
        }
        for (j, r) in row.iter_mut().enumerate() {
            *r = z[j] + adjust.map_or(0.0, |a| a[j]);
        }
        let (max, sum) = exp_shifted(&mut row);
        // -log softmax at the label.
        total += sum.ln() - (z[label] + adjust.map_or(0.0, |a| a[label]) - max);
        if let Some(g) = grad.as_deref_mut() {
            let g = &mut g[i * k..(i + 1) * k];
            for (j, (g, r)) in g.iter_mut().zip(&row).enumerate() {
                let onehot = if j == label { 1.0 } else { 0.0 };
                *g = (r / sum - onehot) / n as f32;
            }
        }
    }
    Ok(total / n as f32)
}

/// `g` ([n, m]) times the ReLU mask of `h` (the layer's output: 1 where `h > 0`), in
/// place, and the column sums of the result (the layer's bias gradient).
fn relu_back(g: Tensor, h: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let (n, m) = g.dims2()?;
    let mut out = with_f32(&g, |g| g.to_vec())?;
    let mut bias = vec![0f32; m];
    with_f32(h, |h| {
        for (row, hrow) in out.chunks_exact_mut(m).zip(h.chunks_exact(m)) {
            for ((v, &h), b) in row.iter_mut().zip(hrow).zip(bias.iter_mut()) {
                if h <= 0.0 {
                    *v = 0.0;
                }
                *b += *v;
            }
        }
    })?;
    let dev = g.device().clone();
    Ok((
        Tensor::from_vec(out, (n, m), &dev)?,
        Tensor::from_vec(bias, m, &dev)?,
    ))
}

/// The logits of a normalised batch `xn` ([n, input]), row-major [n, classes]: the
/// same network as `MicroModel::forward`, with the bias and ReLU in single loops.
pub(crate) fn logits(params: &[Tensor], xn: &Tensor) -> candle_core::Result<Vec<f32>> {
    Ok(forward(params, xn)?.logits)
}

/// The loss of a normalised batch `xn` ([n, input]) with labels `y`; see the contract.
pub(crate) fn loss(
    params: &[Tensor],
    xn: &Tensor,
    y: &[u32],
    adjust: Option<&[f32]>,
) -> candle_core::Result<f32> {
    let k = params[5].dims1()?;
    let f = forward(params, xn)?;
    cross_entropy(&f.logits, k, adjust, y, None)
}

/// The loss and the six parameters' gradients for a normalised batch; see the contract.
pub(crate) fn loss_and_grads(
    params: &[Tensor],
    xn: &Tensor,
    y: &[u32],
    adjust: Option<&[f32]>,
) -> candle_core::Result<(f32, [Tensor; 6])> {
    if params.len() != 6 {
        candle_core::bail!("the micro model has 6 parameters, not {}", params.len());
    }
    let k = params[5].dims1()?;
    let n = y.len();
    let f = forward(params, xn)?;
    let mut d3 = vec![0f32; n * k];
    let loss = cross_entropy(&f.logits, k, adjust, y, Some(&mut d3))?;
    let mut db3 = vec![0f32; k];
    for row in d3.chunks_exact(k) {
        for (b, g) in db3.iter_mut().zip(row) {
            *b += g;
        }
    }
    let dev = xn.device();
    let d3 = Tensor::from_vec(d3, (n, k), dev)?;
    let dw3 = d3.t()?.matmul(&f.h2)?;
    let (d2, db2) = relu_back(d3.matmul(&params[4])?, &f.h2)?;
    let dw2 = d2.t()?.matmul(&f.h1)?;
    let (d1, db1) = relu_back(d2.matmul(&params[2])?, &f.h1)?;
    let dw1 = d1.t()?.matmul(xn)?;
    let db3 = Tensor::from_vec(db3, k, dev)?;
    Ok((loss, [dw1, db1, dw2, db2, dw3, db3]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::Swimmer;
    use crate::MicroModel;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use swimlane_core::ModelSpec;

    fn windows(n: usize) -> (MicroModel, Vec<crate::Sample>) {
        let s = Swimmer::new(3).windows(n, &mut ChaCha8Rng::seed_from_u64(5));
        let model = MicroModel::init(&ModelSpec::synthetic_pose(), &s, 9).unwrap();
        (model, s)
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / scale)
            .fold(0f32, f32::max)
    }

    /// The hand-derived loss and gradients equal candle's autograd of the same loss,
    /// with and without the prior adjustment.
    #[test]
    fn loss_and_grads_match_candles_autograd() {
        let (model, samples) = windows(48);
        let (x, y) = crate::net::to_tensors(model.spec(), &samples).unwrap();
        let labels: Vec<u32> = y.to_vec1().unwrap();
        let k = model.spec().num_classes();
        let adjust: Vec<f32> = (0..k).map(|j| -0.3 * j as f32).collect();
        let xn = model.normalise(&x).unwrap();
        let params = model.detached_params();
        for adj in [None, Some(adjust.as_slice())] {
            let (loss, grads) = loss_and_grads(&params, &xn, &labels, adj).unwrap();
            let mut logits = model.forward(&x).unwrap();
            if let Some(a) = adj {
                let a = Tensor::from_slice(a, (1, k), x.device()).unwrap();
                logits = logits.broadcast_add(&a).unwrap();
            }
            let reference = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            let store = reference.backward().unwrap();
            let ref_loss = reference.to_scalar::<f32>().unwrap();
            assert!((loss - ref_loss).abs() < 1e-5, "{loss} vs {ref_loss}");
            assert_eq!(
                loss,
                super::loss(&params, &xn, &labels, adj).unwrap(),
                "the loss alone is the same loss"
            );
            for (i, (g, var)) in grads.iter().zip(model.params()).enumerate() {
                let r = store.get(var.as_tensor()).expect("candle's gradient");
                assert_eq!(g.dims(), r.dims(), "parameter {i}");
                let d = max_rel_diff(g, r);
                assert!(d < 1e-4, "parameter {i}: relative difference {d}");
            }
        }
    }

    #[test]
    fn a_label_outside_the_classes_is_an_error_not_a_panic() {
        let (model, samples) = windows(4);
        let (x, _) = crate::net::to_tensors(model.spec(), &samples).unwrap();
        let xn = model.normalise(&x).unwrap();
        let params = model.detached_params();
        assert!(loss_and_grads(&params, &xn, &[0, 1, 2, 99], None).is_err());
        assert!(loss_and_grads(&params, &xn, &[0, 1], None).is_err());
    }
}
