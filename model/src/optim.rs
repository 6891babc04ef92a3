//! AdamW for the micro model, fused: one pass over each parameter's values per step.
//!
//! # Contract
//! - The same update as `candle_nn::AdamW` (decoupled weight decay, bias-corrected
//!   moments): for each parameter value `w` with gradient `g`,
//!   `m = β1·m + (1-β1)·g`, `v = β2·v + (1-β2)·g²`,
//!   `w = w·(1 - lr·λ) - lr · (m/(1-β1ᵗ)) / (sqrt(v/(1-β2ᵗ)) + ε)`.
//!   The results differ from candle's only by rounding (the scalars are applied in `f32`).
//! - With an anchor `a > 0`, the gradient first gets `2·a·(w - w0)` added, `w0` being the
//!   parameters when the optimiser was made: exactly the gradient of adding
//!   `a · sum((w - w0)²)` to the loss (the L2-SP pull of `TrainConfig::anchor`), without
//!   differentiating it.
//! - [`AdamW::step`] takes one gradient per parameter, in the order the optimiser was
//!   made with (`backprop::loss_and_grads` gives them in that order); any other count,
//!   or a gradient of another size, is an error and nothing is updated by it.
//!
//! Why: candle's optimiser runs a dozen tensor operations per parameter per step, each
//! allocating and writing a tensor the size of the parameter; on a 74k-parameter model
//! trained on batches of 32 they took more time than the forward and backward passes
//! (bench/README.md, "The training step, derived by hand"). This does the same arithmetic in
//! one loop, in place (candle's public in-place op interface).
use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor, Var};

/// AdamW's constants (candle's defaults for the betas and epsilon).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Params {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Strength of the pull towards the starting weights; 0 for none.
    pub anchor: f64,
}

impl Params {
    pub fn new(lr: f64, weight_decay: f64, anchor: f64) -> Params {
        Params {
            lr,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            anchor,
        }
    }
}

struct Slot {
    var: Var,
    m: Vec<f32>,
    v: Vec<f32>,
    /// The starting values (with an anchor).
    start: Option<Vec<f32>>,
}

/// The optimiser's state for a set of `f32` CPU parameters.
pub(crate) struct AdamW {
    slots: Vec<Slot>,
    params: Params,
    step: i32,
}

impl AdamW {
    pub fn new(vars: &[Var], params: Params) -> candle_core::Result<AdamW> {
        let slots = vars
            .iter()
            .map(|var| {
                let n = var.elem_count();
                let start = if params.anchor > 0.0 {
                    Some(var.flatten_all()?.to_vec1::<f32>()?)
                } else {
                    None
                };
                Ok(Slot {
                    var: var.clone(),
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    start,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            slots,
            params,
            step: 0,
        })
    }

    /// One update from `grads`: one per parameter, in order (see the contract).
    pub fn step(&mut self, grads: &[Tensor]) -> candle_core::Result<()> {
        if grads.len() != self.slots.len() {
            candle_core::bail!(
                "the fused AdamW: {} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            );
        }
        self.step += 1;
        let p = self.params;
        let consts = Consts {
            lr: p.lr as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            scale_m: (1.0 / (1.0 - p.beta1.powi(self.step))) as f32,
            scale_v: (1.0 / (1.0 - p.beta2.powi(self.step))) as f32,
            eps: p.eps as f32,
            pull: (2.0 * p.anchor) as f32,
        };
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            crate::backprop::with_f32(&g.contiguous()?, |g| {
                let update = Update {
                    g,
                    m: RefCell::new(&mut slot.m),
                    v: RefCell::new(&mut slot.v),
                    start: slot.start.as_deref(),
                    c: consts,
                };
                slot.var.as_tensor().inplace_op1(&update)
            })??;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Consts {
    lr: f32,
    decay: f32,
    beta1: f32,
    beta2: f32,
    scale_m: f32,
    scale_v: f32,
    eps: f32,
    pull: f32,
}

/// One parameter's update, applied in place to its storage.
struct Update<'a> {
    g: &'a [f32],
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    start: Option<&'a [f32]>,
    c: Consts,
}

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "swimlane-adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(values), Some((from, to))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("the fused AdamW updates contiguous f32 CPU parameters");
        };
        let w = &mut values[from..to];
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        if w.len() != self.g.len() || w.len() != m.len() || w.len() != v.len() {
            candle_core::bail!("the fused AdamW: parameter and gradient sizes differ");
        }
        let (m, v, g, start, c) = (&mut m[..], &mut v[..], self.g, self.start, self.c);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: this CPU has AVX2 (checked on the line above).
            unsafe { update_avx2(w, m, v, g, start, c) };
            return Ok(());
        }
        update_all(w, m, v, g, start, c);
        Ok(())
    }
}

/// The update of every value (see the contract). Always inlined, so that
/// [`update_avx2`] compiles it for AVX2.
#[inline(always)]
fn update_all(
    w: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    start: Option<&[f32]>,
    c: Consts,
) {
    // Zipped slices (no bounds checks), so that the loop vectorises.
    let update = |w: &mut f32, m: &mut f32, v: &mut f32, g: f32| {
        *m = c.beta1 * *m + (1.0 - c.beta1) * g;
        *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
        let step = (*m * c.scale_m) / ((*v * c.scale_v).sqrt() + c.eps);
        *w = *w * c.decay - c.lr * step;
    };
    let moments = m.iter_mut().zip(v.iter_mut());
    match start {
        Some(w0) => {
            for ((w, (m, v)), (&g, &w0)) in w.iter_mut().zip(moments).zip(g.iter().zip(w0)) {
                let g = g + c.pull * (*w - w0);
                update(w, m, v, g);
            }
        }
        None => {
            for ((w, (m, v)), &g) in w.iter_mut().zip(moments).zip(g) {
                update(w, m, v, g);
            }
        }
    }
}

/// [`update_all`] compiled for AVX2 (256-bit vectors): the binaries are built for
/// baseline x86-64, where the loop gets 128-bit SSE2, and after the training step was
/// derived by hand this loop was a fifth of a trainer's CPU (bench/README.md, "The
/// training step, derived by hand"). Each value goes through the same operations in
/// the same order (no fused multiply-add), so the results are the same to the bit.
///
/// # Safety
/// Only on a CPU with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn update_avx2(
    w: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    start: Option<&[f32]>,
    c: Consts,
) {
    update_all(w, m, v, g, start, c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use candle_nn::Optimizer;

    /// The AVX2 build of the loop gives the portable one's results to the bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_update_equals_the_portable_one_to_the_bit() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let n = 1003; // not a multiple of any vector width
        let val = |i: usize, k: f32| (i as f32 * k).sin() * 0.7;
        let c = Consts {
            lr: 2e-3,
            decay: 1.0 - 2e-7,
            beta1: 0.9,
            beta2: 0.999,
            scale_m: 1.0 / (1.0 - 0.9f32.powi(3)),
            scale_v: 1.0 / (1.0 - 0.999f32.powi(3)),
            eps: 1e-8,
            pull: 6.0,
        };
        let g: Vec<f32> = (0..n).map(|i| val(i, 1.3)).collect();
        let w0: Vec<f32> = (0..n).map(|i| val(i, 0.4)).collect();
        for start in [None, Some(w0.as_slice())] {
            let fresh = || {
                (
                    (0..n).map(|i| val(i, 0.5)).collect::<Vec<f32>>(),
                    (0..n).map(|i| val(i, 2.1) * 0.1).collect::<Vec<f32>>(),
                    (0..n)
                        .map(|i| val(i, 3.7).abs() * 0.01)
                        .collect::<Vec<f32>>(),
                )
            };
            let (mut w1, mut m1, mut v1) = fresh();
            let (mut w2, mut m2, mut v2) = fresh();
            update_all(&mut w1, &mut m1, &mut v1, &g, start, c);
            // SAFETY: checked above that this CPU has AVX2.
            unsafe { update_avx2(&mut w2, &mut m2, &mut v2, &g, start, c) };
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&w1), bits(&w2));
            assert_eq!(bits(&m1), bits(&m2));
            assert_eq!(bits(&v1), bits(&v2));
            assert_ne!(w1, fresh().0, "it moved");
        }
    }

    /// Several steps of this and of candle's AdamW (with the pull added to candle's
    /// loss) from the same start on the same loss agree within rounding.
    #[test]
    fn matches_candle_adamw_with_the_pull_in_the_loss() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.3f32, -1.2, 0.7], [1.5, 0.2, -0.4]], &dev).unwrap();
        let init = Tensor::new(&[[0.1f32, -0.2], [0.4, 0.05], [-0.3, 0.25]], &dev).unwrap();
        for anchor in [0.0, 3.0] {
            let (a, b) = (
                Var::from_tensor(&init).unwrap(),
                Var::from_tensor(&init).unwrap(),
            );
            let w0 = init.copy().unwrap();
            let loss_of = |w: &Var| {
                x.matmul(w.as_tensor())
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let mut ours = AdamW::new(&[a.clone()], Params::new(0.01, 0.1, anchor)).unwrap();
            let mut theirs = candle_nn::AdamW::new(
                vec![b.clone()],
                candle_nn::ParamsAdamW {
                    lr: 0.01,
                    weight_decay: 0.1,
                    ..Default::default()
                },
            )
            .unwrap();
            for _ in 0..20 {
                let store = loss_of(&a).backward().unwrap();
                ours.step(&[store.get(a.as_tensor()).unwrap().clone()])
                    .unwrap();
                let pull = (b.as_tensor() - &w0)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let total = (loss_of(&b) + pull.affine(anchor, 0.0).unwrap()).unwrap();
                theirs.backward_step(&total).unwrap();
            }
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(
                a != init.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "it moved"
            );
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-5, "anchor {anchor}: {a:?} vs {b:?}");
            }
        }
    }
}
