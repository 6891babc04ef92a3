//! Which windows a personal model knows, so that the device answers the others with the
//! base model.
//!
//! # Why
//! A personal model is fine-tuned on the styles a swimmer has uploaded so far. On the
//! real swimmers (README, "Real swimmers") the session a swimmer's device did worst on
//! was a style its model had never trained on (breaststroke after freestyle uploads):
//! there the fine-tune was worse than the base model, which had seen every style in the
//! population. A gate on held-out windows cannot catch it (those windows are of the
//! styles already uploaded), and probation catches it only after the session.
//!
//! # The rule
//! - A window's **features** are, for each channel, the mean and the standard deviation
//!   over its frames of the *normalised* window (`(x - mean_c) * (1 / std_c)`, the
//!   model's own per-channel normalisation, as its first layer computes it): `2·C`
//!   numbers that say where the wrist points and how hard it moves, whatever the phase
//!   of the stroke in the window. The variance is `E[x²] - E[x]²`, floored at 0.
//! - A model's [`Familiarity`] holds, for each class with at least [`MIN_WINDOWS`] of
//!   the windows it trained on, the centroid of their features and a radius, a scale
//!   ([`DEFAULT_SCALE`]) times the [`QUANTILE`] of their distances to that centroid (a model with no such
//!   class has one centroid of all its windows); and, made the same way from the
//!   population's windows (the deployment's guard set), the **foreign** centroids: those
//!   of the classes the model has no centroid of.
//! - A window is **familiar** when it lies inside one of the model's own radii, or
//!   nearer, in radii, to one of the model's own centroids than to every foreign one:
//!   with `own = min |f - c|² / r²` over the model's centroids and `foreign` the same
//!   over the foreign ones, familiar when `own < 1` or `own < foreign` (a model that
//!   trained on every class knows every window). A window of a style the swimmer
//!   uploaded stays the personal model's even in the style's tail; a window far from
//!   every style the swimmer uploaded and nearer a style the swimmer never uploaded
//!   goes to the base model.
//! - The device's model (the ONNX file the publisher makes, `swimlane_model::onnx`)
//!   answers a familiar window with a weighted average of the two models'
//!   probabilities, the familiarity's `personal_weight` (by default
//!   [`DEFAULT_PERSONAL_WEIGHT`], the deployment's `trainer.personal_weight`) of the
//!   personal model's and the rest of the base model's, and any other window with the
//!   base model's alone ([`Familiarity::answer`]). The
//!   average keeps the personal model's answer wherever it is sure and the base model
//!   is not, and lets a base model that is sure overrule a personal model that is
//!   unsure: on the real swimmers the sessions where a device did worse than the base
//!   model after the familiar rule alone were windows of a known style that the
//!   personal model got wrong without being sure of it.
//!
//! # Guarantees
//! - Deterministic: the same windows in the same order give the same familiarity.
//! - The population's windows only place the foreign centroids: no user's window is
//!   among them (the guard set is installed with the base model and holds none).
//! - The foreign centroids of a class depend only on the population, the normalisation
//!   and the scale ([`Foreign`]): computed once, they serve every model with that
//!   normalisation (a fine-tune keeps its parent's), and give exactly what computing
//!   them for each model gives.
//! - [`Familiarity::check`] refuses a stored familiarity that is not finite, whose
//!   centroids are not `2·C` long, or that has no centroid of its own, so a bad record
//!   cannot make an export that answers every window one way by accident.
//! - The rule and its figures were chosen on the real swimmers' replay and the
//!   synthetic swimmers (bench/README.md, "Familiar windows").
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ClassId;

/// The quantile of a class's distances to its centroid that sets its radius.
pub const QUANTILE: f32 = 0.95;
/// The radius is this times the [`QUANTILE`] distance, by default (the deployment's
/// `trainer.familiar_scale`; 0 turns the fallback off).
pub const DEFAULT_SCALE: f32 = 1.0;
/// The personal model's share of the device's answer on a familiar window, by default
/// (the deployment's `trainer.personal_weight`; [`Familiarity::answer`]).
pub const DEFAULT_PERSONAL_WEIGHT: f32 = 0.6;
/// A class needs at least this many windows to have a centroid of its own.
pub const MIN_WINDOWS: usize = 5;
/// The smallest radius (in normalised units), so that identical windows still leave
/// room around their centroid.
pub const MIN_RADIUS: f32 = 1e-3;

/// The population's side of a familiarity: under one normalisation (`mean`, `std`) and
/// `scale`, the centroid and radius of each class with at least [`MIN_WINDOWS`] of the
/// population's windows (module doc, "Guarantees").
#[derive(Clone, Debug, PartialEq)]
pub struct Foreign {
    mean: Vec<f32>,
    std: Vec<f32>,
    scale: f32,
    by_class: BTreeMap<ClassId, (Vec<f32>, f32)>,
}

impl Foreign {
    /// The centroids of `population` (labelled frame-major windows) under the
    /// normalisation `mean`, `std` and the radii `scale` times the [`QUANTILE`]
    /// distance.
    pub fn of<'b>(
        population: impl IntoIterator<Item = (&'b [f32], ClassId)>,
        mean: &[f32],
        std: &[f32],
        scale: f32,
    ) -> Foreign {
        let groups: Vec<(ClassId, Vec<Vec<f32>>)> = by_class(population, mean, std)
            .into_iter()
            .filter(|(_, fs)| fs.len() >= MIN_WINDOWS)
            .collect();
        let classes: Vec<ClassId> = groups.iter().map(|(c, _)| *c).collect();
        let (cs, rs) = centroids(groups.into_iter().map(|(_, fs)| fs).collect(), scale);
        Foreign {
            mean: mean.to_vec(),
            std: std.to_vec(),
            scale,
            by_class: classes.into_iter().zip(cs.into_iter().zip(rs)).collect(),
        }
    }

    /// Whether these are the centroids under the normalisation `mean`, `std` and
    /// `scale` (bit for bit).
    pub fn fits(&self, mean: &[f32], std: &[f32], scale: f32) -> bool {
        let same = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        };
        same(&self.mean, mean) && same(&self.std, std) && self.scale.to_bits() == scale.to_bits()
    }
}

/// Centroids and radii of the features of the windows a model trained on, and of the
/// population's windows of the classes it did not (module doc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Familiarity {
    /// One per class with enough windows (or one for all windows): `2·C` values, the
    /// channels' means and then their standard deviations.
    pub centroids: Vec<Vec<f32>>,
    /// The radius of each centroid, in the same units.
    pub radius: Vec<f32>,
    /// The population's centroids of the classes the model has no centroid of, and
    /// their radii (none: the model knows every window).
    #[serde(default)]
    pub foreign_centroids: Vec<Vec<f32>>,
    #[serde(default)]
    pub foreign_radius: Vec<f32>,
    /// The personal model's share of the answer on a familiar window (module doc).
    /// Records written before the weight existed were published with the personal
    /// model's answer alone: 1.
    #[serde(default = "personal_model_alone")]
    pub personal_weight: f32,
}

fn personal_model_alone() -> f32 {
    1.0
}

/// The `2·C` features of one frame-major window (`frames × channels` values), under the
/// per-channel normalisation `mean`, `std` (module doc).
///
/// Each channel's `1 / std` is computed once a window, not once a value (the same `f32`,
/// so the same features; a division a value was most of the trainer's familiarity, which
/// computes the features of a run's windows and of the population's).
pub fn features(window: &[f32], mean: &[f32], std: &[f32]) -> Vec<f32> {
    let c = mean.len();
    let frames = window.len() / c.max(1);
    let inv: Vec<f32> = std[..c].iter().map(|s| 1.0 / s).collect();
    let (mut sum, mut sq) = (vec![0f32; c], vec![0f32; c]);
    for frame in window.chunks_exact(c) {
        let acc = sum.iter_mut().zip(sq.iter_mut());
        for (((v, m), i), (s, q)) in frame.iter().zip(mean).zip(&inv).zip(acc) {
            let x = (v - m) * i;
            *s += x;
            *q += x * x;
        }
    }
    let n = frames.max(1) as f32;
    let mut out = vec![0f32; 2 * c];
    for k in 0..c {
        let m = sum[k] / n;
        out[k] = m;
        out[c + k] = (sq[k] / n - m * m).max(0.0).sqrt();
    }
    out
}

fn distance2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Features of `windows`, by class.
fn by_class<'a>(
    windows: impl IntoIterator<Item = (&'a [f32], ClassId)>,
    mean: &[f32],
    std: &[f32],
) -> BTreeMap<ClassId, Vec<Vec<f32>>> {
    let mut out: BTreeMap<ClassId, Vec<Vec<f32>>> = BTreeMap::new();
    for (w, label) in windows {
        out.entry(label).or_default().push(features(w, mean, std));
    }
    out
}

/// Centroid and radius (`scale` times the [`QUANTILE`] distance) of each (non-empty)
/// group of feature vectors.
fn centroids(groups: Vec<Vec<Vec<f32>>>, scale: f32) -> (Vec<Vec<f32>>, Vec<f32>) {
    let (mut cs, mut rs) = (Vec::new(), Vec::new());
    for fs in groups.into_iter().filter(|g| !g.is_empty()) {
        let dims = fs[0].len();
        let centroid: Vec<f32> = (0..dims)
            .map(|j| fs.iter().map(|f| f[j] as f64).sum::<f64>() / fs.len() as f64)
            .map(|v| v as f32)
            .collect();
        let mut d: Vec<f32> = fs.iter().map(|f| distance2(f, &centroid).sqrt()).collect();
        d.sort_by(f32::total_cmp);
        let q = d[((d.len() - 1) as f32 * QUANTILE) as usize];
        cs.push(centroid);
        rs.push((scale * q).max(MIN_RADIUS));
    }
    (cs, rs)
}

/// The smallest `|f - c|² / r²` over centroids `cs` with radii `rs` (infinite for none).
fn nearest(f: &[f32], cs: &[Vec<f32>], rs: &[f32]) -> f32 {
    cs.iter()
        .zip(rs)
        .map(|(c, r)| distance2(f, c) / (r * r))
        .fold(f32::INFINITY, f32::min)
}

impl Familiarity {
    /// The familiarity of a model that trained on `windows` (each a frame-major window
    /// and its label), with the population's `population` windows (labelled) for the
    /// foreign centroids, under the model's normalisation `mean`, `std`, the radii
    /// `scale` times the [`QUANTILE`] distance. `None` when there is no window or
    /// `scale` is not positive (no fallback). [`Familiarity::with_foreign`] with
    /// [`Foreign::of`] the population.
    pub fn of<'a, 'b>(
        windows: impl IntoIterator<Item = (&'a [f32], ClassId)>,
        population: impl IntoIterator<Item = (&'b [f32], ClassId)>,
        mean: &[f32],
        std: &[f32],
        scale: f32,
    ) -> Option<Familiarity> {
        if !(scale > 0.0 && scale.is_finite()) {
            return None;
        }
        Familiarity::with_foreign(windows, &Foreign::of(population, mean, std, scale))
    }

    /// The familiarity of a model that trained on `windows`, under the normalisation
    /// and scale `foreign` was computed with, its foreign centroids those of `foreign`'s
    /// classes the model has no centroid of. `None` when there is no window or the scale
    /// is not positive.
    pub fn with_foreign<'a>(
        windows: impl IntoIterator<Item = (&'a [f32], ClassId)>,
        foreign: &Foreign,
    ) -> Option<Familiarity> {
        let scale = foreign.scale;
        if !(scale > 0.0 && scale.is_finite()) {
            return None;
        }
        let (mut own, mut groups, mut few) = (BTreeSet::new(), Vec::new(), Vec::new());
        for (class, fs) in by_class(windows, &foreign.mean, &foreign.std) {
            if fs.len() >= MIN_WINDOWS {
                own.insert(class);
                groups.push(fs);
            } else {
                few.extend(fs);
            }
        }
        if groups.is_empty() {
            if few.is_empty() {
                return None;
            }
            groups.push(few);
        }
        let (centroids, radius) = self::centroids(groups, scale);
        let (foreign_centroids, foreign_radius) = foreign
            .by_class
            .iter()
            .filter(|(class, _)| !own.contains(class))
            .map(|(_, (c, r))| (c.clone(), *r))
            .unzip();
        Some(Familiarity {
            centroids,
            radius,
            foreign_centroids,
            foreign_radius,
            personal_weight: DEFAULT_PERSONAL_WEIGHT,
        })
    }

    /// The same familiarity with the personal model's share of the answer `weight`.
    pub fn with_personal_weight(self, weight: f32) -> Familiarity {
        Familiarity {
            personal_weight: weight,
            ..self
        }
    }

    /// The device's probabilities for `window` from the personal model's and the base
    /// model's (module doc): `base + personal_weight · (personal - base)` when the window
    /// is familiar, the base model's otherwise. Computed in this order in f32, as the
    /// ONNX graph does.
    pub fn answer(
        &self,
        window: &[f32],
        (mean, std): (&[f32], &[f32]),
        personal: &[f32],
        base: &[f32],
    ) -> Vec<f32> {
        if !self.knows(window, mean, std) {
            return base.to_vec();
        }
        let w = self.personal_weight;
        personal
            .iter()
            .zip(base)
            .map(|(p, b)| b + w * (p - b))
            .collect()
    }

    /// Whether a device's file made with this familiarity holds the base model: some
    /// window's answer involves it (a foreign centroid, or a personal weight below 1; a
    /// model that trained on every class knows every window, and with the weight 1
    /// answers them all alone).
    pub fn falls_back(&self) -> bool {
        !self.foreign_centroids.is_empty() || self.personal_weight < 1.0
    }

    /// Is the window with these features familiar: nearer, in radii, to one of the
    /// model's own centroids than to every foreign one?
    pub fn knows_features(&self, features: &[f32]) -> bool {
        let own = nearest(features, &self.centroids, &self.radius);
        self.foreign_centroids.is_empty()
            || own < 1.0
            || own < nearest(features, &self.foreign_centroids, &self.foreign_radius)
    }

    /// Is this frame-major window familiar under the normalisation `mean`, `std`?
    pub fn knows(&self, window: &[f32], mean: &[f32], std: &[f32]) -> bool {
        self.knows_features(&features(window, mean, std))
    }

    /// Usable with a model of `channels` channels (module doc, Guarantees).
    pub fn check(&self, channels: usize) -> Result<(), String> {
        if self.centroids.is_empty() || self.centroids.len() != self.radius.len() {
            return Err(format!(
                "{} centroids and {} radii: at least one of each, as many radii as centroids",
                self.centroids.len(),
                self.radius.len()
            ));
        }
        if self.foreign_centroids.len() != self.foreign_radius.len() {
            return Err(format!(
                "{} foreign centroids and {} radii",
                self.foreign_centroids.len(),
                self.foreign_radius.len()
            ));
        }
        let all = || self.centroids.iter().chain(&self.foreign_centroids);
        if let Some(c) = all().find(|c| c.len() != 2 * channels) {
            return Err(format!(
                "a centroid of {} values, expected {} (2 x {channels} channels)",
                c.len(),
                2 * channels
            ));
        }
        let finite = all().flatten().all(|v| v.is_finite())
            && self
                .radius
                .iter()
                .chain(&self.foreign_radius)
                .all(|r| r.is_finite() && *r > 0.0);
        if !finite {
            return Err("a centroid or radius is not finite, or a radius is not positive".into());
        }
        if !(self.personal_weight > 0.0 && self.personal_weight <= 1.0) {
            return Err(format!(
                "personal weight {}: must be above 0 and at most 1",
                self.personal_weight
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window of `frames` frames whose channels oscillate around `level` with
    /// amplitude `amp` (channel k at `level[k]`), shifted by `phase` frames.
    fn window(level: &[f32], amp: &[f32], frames: usize, phase: usize) -> Vec<f32> {
        let mut w = Vec::new();
        for t in 0..frames {
            for (k, l) in level.iter().enumerate() {
                let s = if (t + phase) % 2 == 0 { 1.0 } else { -1.0 };
                w.push(l + amp[k] * s * (1.0 + 0.01 * ((t * 7 + k) % 5) as f32));
            }
        }
        w
    }

    fn style(level0: f32, amp2: f32, i: usize) -> Vec<f32> {
        window(
            &[level0 + 0.02 * i as f32, 0.0, 0.0],
            &[0.3, 0.3, amp2 + 0.01 * i as f32],
            16,
            i,
        )
    }

    #[test]
    fn the_answer_averages_the_two_models_on_familiar_windows_only() {
        let (mean, std) = ([0.0; 3], [1.0; 3]);
        let norm = (mean.as_slice(), std.as_slice());
        let known: Vec<Vec<f32>> = (0..8).map(|i| style(0.0, 0.3, i)).collect();
        let population: Vec<(Vec<f32>, ClassId)> =
            (0..8).map(|i| (style(5.0, 2.0, i), ClassId(1))).collect();
        let fam = Familiarity::of(
            known.iter().map(|w| (w.as_slice(), ClassId(0))),
            population.iter().map(|(w, c)| (w.as_slice(), *c)),
            norm.0,
            norm.1,
            DEFAULT_SCALE,
        )
        .unwrap();
        assert_eq!(fam.personal_weight, DEFAULT_PERSONAL_WEIGHT);
        let (personal, base) = ([0.9, 0.1, 0.0], [0.05, 0.9, 0.05]);
        // An unfamiliar window: the base model's answer.
        assert_eq!(
            fam.answer(&population[0].0, norm, &personal, &base),
            base.to_vec()
        );
        let a = fam.answer(&known[0], norm, &personal, &base);
        let w = DEFAULT_PERSONAL_WEIGHT;
        for k in 0..3 {
            let want = w * personal[k] + (1.0 - w) * base[k];
            assert!((a[k] - want).abs() < 1e-6, "{k}: {} {want}", a[k]);
        }
        assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        // A sure personal model keeps its answer against a base model that disagrees;
        // an unsure one is overruled by a sure base model, unless its weight is 1.
        assert_eq!(argmax(&a), 0);
        let (unsure, sure) = ([0.5, 0.45, 0.05], [0.02, 0.97, 0.01]);
        assert_eq!(argmax(&fam.answer(&known[0], norm, &unsure, &sure)), 1);
        let alone = fam.clone().with_personal_weight(1.0);
        let a = alone.answer(&known[0], norm, &unsure, &sure);
        assert!(
            a.iter().zip(unsure).all(|(a, u)| (a - u).abs() < 1e-6),
            "{a:?}"
        );
        // A weight outside (0, 1] is refused.
        for bad in [0.0, -0.5, 1.5, f32::NAN] {
            assert!(
                fam.clone().with_personal_weight(bad).check(3).is_err(),
                "{bad}"
            );
        }
        assert!(fam.check(3).is_ok());
    }

    /// A class's foreign centroid is the same whichever other classes the population
    /// has and whichever the model knows, so one [`Foreign`] serves every model.
    #[test]
    fn one_foreign_serves_every_model_with_its_normalisation() {
        let (mean, std) = ([0.1, 0.0, -0.2], [1.0, 0.5, 2.0]);
        let pop: Vec<(Vec<f32>, ClassId)> = (0..3)
            .flat_map(|c| {
                (0..9).map(move |i| (style(2.0 * c as f32, 0.3 + c as f32, i), ClassId(c)))
            })
            .collect();
        let all = Foreign::of(
            pop.iter().map(|(w, c)| (w.as_slice(), *c)),
            &mean,
            &std,
            1.5,
        );
        assert_eq!(all.by_class.len(), 3);
        assert!(all.fits(&mean, &std, 1.5));
        assert!(!all.fits(&mean, &[1.0, 0.5, 2.000_001], 1.5));
        assert!(!all.fits(&mean, &std, 1.0));
        for known in [0u8, 1, 2] {
            let own: Vec<Vec<f32>> = (0..7).map(|i| style(2.0 * known as f32, 0.3, i)).collect();
            let own = || own.iter().map(|w| (w.as_slice(), ClassId(known)));
            let shared = Familiarity::with_foreign(own(), &all).unwrap();
            // The population of the other classes alone, computed for this model.
            let others = pop.iter().filter(|(_, c)| *c != ClassId(known));
            let alone = Foreign::of(others.map(|(w, c)| (w.as_slice(), *c)), &mean, &std, 1.5);
            let want: (Vec<Vec<f32>>, Vec<f32>) = alone
                .by_class
                .values()
                .map(|(c, r)| (c.clone(), *r))
                .unzip();
            assert_eq!(
                (
                    shared.foreign_centroids.clone(),
                    shared.foreign_radius.clone()
                ),
                want
            );
            assert_eq!(shared.foreign_centroids.len(), 2);
            let fresh = Familiarity::of(
                own(),
                pop.iter().map(|(w, c)| (w.as_slice(), *c)),
                &mean,
                &std,
                1.5,
            );
            assert_eq!(Some(shared), fresh);
        }
        // A scale that turns the fallback off: no familiarity, as from `of`.
        let off = Foreign::of(
            pop.iter().map(|(w, c)| (w.as_slice(), *c)),
            &mean,
            &std,
            0.0,
        );
        assert_eq!(
            Familiarity::with_foreign([(pop[0].0.as_slice(), ClassId(0))], &off),
            None
        );
    }

    fn argmax(p: &[f32]) -> usize {
        (0..p.len()).fold(0, |b, k| if p[k] > p[b] { k } else { b })
    }

    #[test]
    fn features_are_each_channels_mean_and_spread_after_normalisation() {
        let w = window(&[3.0, -1.0], &[2.0, 0.5], 8, 0);
        let f = features(&w, &[1.0, -1.0], &[2.0, 1.0]);
        assert_eq!(f.len(), 4);
        assert!((f[0] - 1.0).abs() < 0.02, "{f:?}");
        assert!(f[1].abs() < 0.02, "{f:?}");
        assert!((f[2] - 1.0).abs() < 0.05, "{f:?}");
        assert!((f[3] - 0.5).abs() < 0.05, "{f:?}");
    }

    /// The features are, to the bit, what dividing by the spread at every value gives
    /// (the ONNX graph computes the same numbers on the device).
    #[test]
    fn features_are_bitwise_those_of_a_division_per_value() {
        let c = 8;
        let mean: Vec<f32> = (0..c).map(|k| k as f32 * 0.37 - 1.1).collect();
        let std: Vec<f32> = (0..c).map(|k| 0.3 + k as f32 * 0.71).collect();
        let w: Vec<f32> = (0..64 * c)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
            .collect();
        let (mut sum, mut sq) = (vec![0f32; c], vec![0f32; c]);
        for frame in w.chunks_exact(c) {
            for (k, v) in frame.iter().enumerate() {
                let x = (v - mean[k]) * (1.0 / std[k]);
                sum[k] += x;
                sq[k] += x * x;
            }
        }
        let f = features(&w, &mean, &std);
        for k in 0..c {
            let m = sum[k] / 64.0;
            assert_eq!(f[k].to_bits(), m.to_bits(), "mean of channel {k}");
            let spread = (sq[k] / 64.0 - m * m).max(0.0).sqrt();
            assert_eq!(
                f[c + k].to_bits(),
                spread.to_bits(),
                "spread of channel {k}"
            );
        }
    }

    #[test]
    fn a_style_the_model_never_trained_on_is_foreign_and_its_own_tails_are_not() {
        let (mean, std) = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]);
        // Two styles: wrist level differs in channel 0, movement in channel 2.
        let free: Vec<Vec<f32>> = (0..20).map(|i| style(1.0, 1.0, i)).collect();
        let back: Vec<Vec<f32>> = (0..20).map(|i| style(-1.0, 0.2, i)).collect();
        let population: Vec<(&[f32], ClassId)> = free
            .iter()
            .map(|w| (w.as_slice(), ClassId(0)))
            .chain(back.iter().map(|w| (w.as_slice(), ClassId(1))))
            .collect();
        let fam = Familiarity::of(
            free.iter().map(|w| (w.as_slice(), ClassId(0))),
            population.iter().copied(),
            &mean,
            &std,
            DEFAULT_SCALE,
        )
        .unwrap();
        fam.check(3).unwrap();
        assert_eq!((fam.centroids.len(), fam.foreign_centroids.len()), (1, 1));
        assert!(free.iter().all(|w| fam.knows(w, &mean, &std)));
        assert!(back.iter().all(|w| !fam.knows(w, &mean, &std)));
        // Far out in the trained style's own direction: still the personal model's.
        assert!(fam.knows(&style(2.0, 1.5, 0), &mean, &std));
        // A model that trained on both styles knows every window.
        let both = Familiarity::of(
            population.iter().copied(),
            population.iter().copied(),
            &mean,
            &std,
            DEFAULT_SCALE,
        )
        .unwrap();
        assert!(both.foreign_centroids.is_empty());
        assert!(back.iter().all(|w| both.knows(w, &mean, &std)));
    }

    #[test]
    fn classes_with_few_windows_share_one_centroid_only_when_no_class_has_enough() {
        let (mean, std) = ([0.0], [1.0]);
        let ws: Vec<Vec<f32>> = (0..9).map(|i| window(&[i as f32], &[1.0], 4, 0)).collect();
        let labels = [0, 0, 0, 0, 0, 1, 1, 2, 2];
        let pop: Vec<(&[f32], ClassId)> = ws
            .iter()
            .map(|w| (w.as_slice(), ClassId(1)))
            .chain(ws.iter().map(|w| (w.as_slice(), ClassId(0))))
            .collect();
        let fam = Familiarity::of(
            ws.iter()
                .zip(labels)
                .map(|(w, l)| (w.as_slice(), ClassId(l))),
            pop.iter().copied(),
            &mean,
            &std,
            DEFAULT_SCALE,
        )
        .unwrap();
        assert_eq!(fam.centroids.len(), 1, "class 0 alone has 5 windows");
        assert_eq!(
            fam.foreign_centroids.len(),
            1,
            "class 1 (2 windows of the user's) is foreign, class 0 is not"
        );
        let few = Familiarity::of(
            ws.iter()
                .zip(labels)
                .skip(5)
                .map(|(w, l)| (w.as_slice(), ClassId(l))),
            std::iter::empty(),
            &mean,
            &std,
            DEFAULT_SCALE,
        )
        .unwrap();
        assert_eq!(
            few.centroids.len(),
            1,
            "4 windows of two classes: one pooled centroid"
        );
        assert!(Familiarity::of(
            std::iter::empty(),
            pop.iter().copied(),
            &mean,
            &std,
            DEFAULT_SCALE
        )
        .is_none());
    }

    #[test]
    fn a_stored_familiarity_that_cannot_be_used_is_refused() {
        let good = Familiarity {
            centroids: vec![vec![0.0; 4]],
            radius: vec![1.0],
            foreign_centroids: vec![vec![1.0; 4]],
            foreign_radius: vec![2.0],
            personal_weight: DEFAULT_PERSONAL_WEIGHT,
        };
        good.check(2).unwrap();
        // A record from before the weight existed: its files answered familiar windows
        // with the personal model alone, and a re-export must make the same bytes.
        let old: Familiarity = serde_json::from_str(
            r#"{"centroids":[[0,0,0,0]],"radius":[1],"foreign_centroids":[[1,1,1,1]],"foreign_radius":[2]}"#,
        )
        .unwrap();
        assert_eq!(old.personal_weight, 1.0);
        old.check(2).unwrap();
        assert!(good.check(3).is_err());
        let mut bad = good.clone();
        bad.radius[0] = f32::NAN;
        assert!(bad.check(2).is_err());
        let mut bad = good.clone();
        bad.foreign_radius[0] = 0.0;
        assert!(bad.check(2).is_err());
        let mut bad = good.clone();
        bad.foreign_centroids[0][1] = f32::INFINITY;
        assert!(bad.check(2).is_err());
        let mut bad = good.clone();
        bad.foreign_radius.clear();
        assert!(bad.check(2).is_err());
        let mut bad = good.clone();
        bad.centroids.clear();
        bad.radius.clear();
        assert!(bad.check(2).is_err());
        let json = serde_json::to_string(&good).unwrap();
        assert_eq!(serde_json::from_str::<Familiarity>(&json).unwrap(), good);
    }
}
