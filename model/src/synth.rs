//! Synthetic swimmers: seeded, deterministic windows of pose keypoints.
//!
//! # How a window is drawn
//! A 2-D stick figure (shoulders, elbows, wrists, hips; left and right) is posed frame
//! by frame in the swimmer's *body frame* (head towards +x, image y pointing down):
//! each stroke class is a motion program for the upper-arm angle, the elbow bend, the
//! body pitch, the hip bob and the left/right depth separation (body roll):
//!
//! | class | arms | body |
//! |---|---|---|
//! | freestyle | alternate, full forward rotation (left and right half a cycle apart) | roll, small hip bob |
//! | backstroke | alternate, full *backward* rotation, straight elbows | lying lower, roll |
//! | breaststroke | together, a short sweep in front, strong elbow bend | kick bob |
//! | butterfly | together, full forward rotation | strong undulation |
//! | turn | tucked | the whole body pitches through about half a turn |
//! | glide | stretched forward, still | drifts through the frame |
//!
//! The figure is then put through the swimmer's camera (rotation, vertical squash,
//! scale, position) and noise is added.
//!
//! # What makes a swimmer personal
//! Every [`Swimmer`] draws, from its seed: a stroke-rate multiplier, per-joint amplitudes,
//! a left/right asymmetry (amplitude ratio and phase lag), an elbow phase offset, a camera
//! (angle, squash, scale, position), body proportions (torso, upper arm, forearm, shoulder
//! depth), a noise level, and **technique quirks**: for one to three classes the swimmer's
//! movement is a blend of the true class's motion program with another class's
//! (`quirk_strength` of the other). A model trained on a population cannot tell a
//! swimmer's quirky freestyle from another swimmer's butterfly, so a new swimmer starts at
//! about 80% right; the quirk is consistent for that swimmer, so fine-tuning on the
//! swimmer's own corrections learns it.
//!
//! # Invariants
//! Everything is a pure function of the seeds passed in: the same seed gives the same
//! swimmer, and the same swimmer and RNG state give the same windows, on every machine.
//! Feature layout: [`FEATURE_NAMES`] (also `docs/batch-format.md`).
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use swimlane_core::{StrokeClass, NUM_CLASSES, WINDOW_FEATURES, WINDOW_FRAMES};

use crate::{MicroModel, ModelError, Sample};

/// The 16 features of one frame, in order: 8 keypoints, each `x` then `y`, in image
/// coordinates normalised to the frame (0..1, origin top-left, y down).
pub const FEATURE_NAMES: [&str; WINDOW_FEATURES] = [
    "left_wrist_x",
    "left_wrist_y",
    "right_wrist_x",
    "right_wrist_y",
    "left_elbow_x",
    "left_elbow_y",
    "right_elbow_x",
    "right_elbow_y",
    "left_shoulder_x",
    "left_shoulder_y",
    "right_shoulder_x",
    "right_shoulder_y",
    "left_hip_x",
    "left_hip_y",
    "right_hip_x",
    "right_hip_y",
];

/// Mix a seed with a domain tag and an index (splitmix64), so that the population the
/// base model is trained on and the swimmers it is evaluated on never share a seed.
pub fn derive_seed(seed: u64, domain: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_add(domain.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(index.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seed domain of the base model's training population.
pub const DOMAIN_POPULATION: u64 = 1;
/// Seed domain of the unseen swimmers used for evaluation.
pub const DOMAIN_EVALUATION: u64 = 2;

/// A personal technique quirk: the swimmer's `class` moves partly like `like`.
#[derive(Clone, Debug, PartialEq)]
pub struct Quirk {
    pub class: StrokeClass,
    pub like: StrokeClass,
    /// Weight of `like`'s motion program in the blend (0 = none).
    pub strength: f32,
}

/// One synthetic swimmer's personal style. Build with [`Swimmer::new`].
#[derive(Clone, Debug, PartialEq)]
pub struct Swimmer {
    pub seed: u64,
    /// Multiplies every class's stroke rate.
    pub rate: f32,
    /// Amplitudes: arm sweep, elbow bend, body roll, hip bob.
    pub amp_arm: f32,
    pub amp_elbow: f32,
    pub amp_roll: f32,
    pub amp_hip: f32,
    /// Left/right amplitude ratio and phase lag (radians) of the right arm.
    pub asym_ratio: f32,
    pub asym_lag: f32,
    /// Phase of the elbow bend relative to the arm (radians).
    pub elbow_phase: f32,
    /// Camera: rotation (radians), vertical squash, scale, image position of the shoulders.
    pub cam_angle: f32,
    pub cam_squash: f32,
    pub cam_scale: f32,
    pub cam_x: f32,
    pub cam_y: f32,
    /// Body proportions (image units at scale 1).
    pub torso: f32,
    pub upper_arm: f32,
    pub forearm: f32,
    pub depth: f32,
    /// Standard deviation of the per-coordinate noise.
    pub noise: f32,
    pub quirks: Vec<Quirk>,
}

fn u(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

/// A standard normal draw (Box-Muller), so that no distribution crate is needed.
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(1e-7);
    let u2: f32 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

impl Swimmer {
    /// The swimmer for `seed`; always the same swimmer for the same seed.
    pub fn new(seed: u64) -> Swimmer {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r = &mut rng;
        let rate = u(r, 0.75, 1.35);
        let amp_arm = u(r, 0.75, 1.25);
        let amp_elbow = u(r, 0.7, 1.3);
        let amp_roll = u(r, 0.6, 1.4);
        let amp_hip = u(r, 0.6, 1.4);
        let asym_ratio = u(r, 0.8, 1.2);
        let asym_lag = u(r, -0.35, 0.35);
        let elbow_phase = u(r, 0.2, 1.4);
        let cam_angle = u(r, -0.35, 0.35);
        let cam_squash = u(r, 0.7, 1.0);
        let cam_scale = u(r, 0.75, 1.25);
        let cam_x = u(r, 0.4, 0.6);
        let cam_y = u(r, 0.4, 0.6);
        let torso = u(r, 0.22, 0.28);
        let upper_arm = u(r, 0.10, 0.14);
        let forearm = u(r, 0.09, 0.13);
        let depth = u(r, 0.01, 0.04);
        let noise = u(r, 0.006, 0.016);
        // One to three quirky classes, each moving partly like another class.
        let n_quirks = 1 + (r.random::<u32>() % 3) as usize;
        let mut classes = StrokeClass::ALL.to_vec();
        classes.shuffle(r);
        let quirks = classes[..n_quirks]
            .iter()
            .map(|&class| {
                let others: Vec<StrokeClass> = StrokeClass::ALL
                    .iter()
                    .copied()
                    .filter(|c| *c != class)
                    .collect();
                let like = others[(r.random::<u32>() as usize) % others.len()];
                Quirk {
                    class,
                    like,
                    strength: u(r, 0.4, 0.6),
                }
            })
            .collect();
        Swimmer {
            seed,
            rate,
            amp_arm,
            amp_elbow,
            amp_roll,
            amp_hip,
            asym_ratio,
            asym_lag,
            elbow_phase,
            cam_angle,
            cam_squash,
            cam_scale,
            cam_x,
            cam_y,
            torso,
            upper_arm,
            forearm,
            depth,
            noise,
            quirks,
        }
    }

    /// `n` labelled windows, classes in turn (`n / 6` of each, the rest from the first
    /// classes), drawn from `rng`.
    pub fn windows<R: Rng>(&self, n: usize, rng: &mut R) -> Vec<Sample> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let class = StrokeClass::ALL[i % NUM_CLASSES];
            out.push(self.window(class, rng));
        }
        out
    }

    /// One window of `class`.
    pub fn window<R: Rng>(&self, class: StrokeClass, rng: &mut R) -> Sample {
        // Per-window draws: start phase, rate jitter, turn timing, drift.
        let mut wr = ChaCha8Rng::seed_from_u64(rng.random::<u64>());
        let w = WindowDraw {
            phase: u(&mut wr, 0.0, std::f32::consts::TAU),
            rate_jitter: u(&mut wr, 0.9, 1.1),
            turn_start: u(&mut wr, -0.3, 0.4),
            turn_len: u(&mut wr, 0.5, 0.9),
            drift: u(&mut wr, 0.02, 0.08),
            quirk_jitter: u(&mut wr, -0.08, 0.08),
        };
        let quirk = self.quirks.iter().find(|q| q.class == class);
        let mut frames = vec![0f32; WINDOW_FRAMES * WINDOW_FEATURES];
        for f in 0..WINDOW_FRAMES {
            let t = f as f32 / WINDOW_FRAMES as f32;
            let mut kp = self.pose(class, t, &w);
            if let Some(q) = quirk {
                let other = self.pose(q.like, t, &w);
                for (a, b) in kp.iter_mut().zip(other.iter()) {
                    let k = q.strength + w.quirk_jitter;
                    *a = (1.0 - k) * *a + k * *b;
                }
            }
            let row = &mut frames[f * WINDOW_FEATURES..(f + 1) * WINDOW_FEATURES];
            for (dst, v) in row.iter_mut().zip(kp.iter()) {
                *dst = v + self.noise * normal(&mut wr);
            }
        }
        Sample {
            frames,
            label: class.into(),
        }
    }

    /// The 16 image coordinates of one frame at time `t` (0..1 across the window).
    fn pose(&self, class: StrokeClass, t: f32, w: &WindowDraw) -> [f32; WINDOW_FEATURES] {
        use std::f32::consts::{FRAC_PI_2, PI, TAU};
        let base_rate = match class {
            StrokeClass::Freestyle => 1.6,
            StrokeClass::Backstroke => 1.4,
            StrokeClass::Breaststroke => 1.1,
            StrokeClass::Butterfly => 1.25,
            StrokeClass::Turn | StrokeClass::Glide => 0.0,
        };
        let omega = TAU * base_rate * self.rate * w.rate_jitter;
        let ph = omega * t + w.phase;
        let lag = self.asym_lag;
        let ar = self.amp_arm;
        // Per class: (left arm angle, right arm angle, left elbow, right elbow,
        // body pitch, hip bob, roll factor, x drift).
        let (th_l, th_r, be_l, be_r, pitch, hip, roll, drift) = match class {
            StrokeClass::Freestyle => {
                let l = ph;
                let r = ph + PI + lag;
                let bend = |a: f32| {
                    0.25 + 0.5 * self.amp_elbow * (1.0 + (a + self.elbow_phase).sin()) / 2.0
                };
                (
                    l,
                    r,
                    bend(l),
                    bend(r),
                    0.0,
                    0.01 * self.amp_hip * (2.0 * ph).sin(),
                    ph.cos(),
                    0.0,
                )
            }
            StrokeClass::Backstroke => {
                let l = -ph;
                let r = -ph + PI + lag;
                let bend = |a: f32| {
                    0.05 + 0.15 * self.amp_elbow * (1.0 + (a + self.elbow_phase).sin()) / 2.0
                };
                (
                    l,
                    r,
                    bend(l),
                    bend(r),
                    0.0,
                    0.03 + 0.01 * self.amp_hip * ph.sin(),
                    ph.cos(),
                    0.0,
                )
            }
            StrokeClass::Breaststroke => {
                let sweep = |a: f32| 0.15 + 0.7 * ar * a.sin();
                let bend =
                    |a: f32| 0.9 * self.amp_elbow * (1.0 + (a + self.elbow_phase).sin()) / 2.0;
                let r_ph = ph + 0.3 * lag;
                (
                    sweep(ph),
                    sweep(r_ph),
                    bend(ph),
                    bend(r_ph),
                    0.05 * ph.sin(),
                    0.025 * self.amp_hip * (ph + FRAC_PI_2).sin(),
                    0.1,
                    0.0,
                )
            }
            StrokeClass::Butterfly => {
                let l = ph;
                let r = ph + 0.3 * lag;
                let bend = |a: f32| {
                    0.2 + 0.4 * self.amp_elbow * (1.0 + (a + self.elbow_phase).sin()) / 2.0
                };
                (
                    l,
                    r,
                    bend(l),
                    bend(r),
                    0.12 * self.amp_hip * (ph + FRAC_PI_2).sin(),
                    0.045 * self.amp_hip * (ph + FRAC_PI_2).sin(),
                    0.15,
                    0.0,
                )
            }
            StrokeClass::Turn => {
                let s = ((t - w.turn_start) / w.turn_len).clamp(0.0, 1.0);
                let smooth = s * s * (3.0 - 2.0 * s);
                let tuck = 1.3 + 0.2 * (TAU * t + w.phase).sin();
                (
                    tuck,
                    tuck + 0.2 * lag,
                    1.4 * self.amp_elbow,
                    1.4 * self.amp_elbow,
                    PI * smooth,
                    -0.02 * smooth,
                    1.0 - 2.0 * smooth,
                    0.0,
                )
            }
            StrokeClass::Glide => {
                let wob = 0.04 * (TAU * 0.5 * t + w.phase).sin();
                (
                    wob,
                    wob + 0.05 * lag,
                    0.05,
                    0.05,
                    0.02 * w.phase.sin(),
                    0.0,
                    0.3,
                    -w.drift * t,
                )
            }
        };
        let d =
            self.depth * (0.4 + 0.6 * self.amp_roll * roll.abs().min(1.0)) * roll.signum().max(0.3);
        // Body frame, shoulder centre at the origin, head towards +x, y down.
        let sh_l = (0.0, -d / 2.0);
        let sh_r = (0.0, d / 2.0);
        let arm = |sh: (f32, f32), th: f32, be: f32, amp: f32| {
            let ua = self.upper_arm * amp;
            let fa = self.forearm * amp;
            let el = (sh.0 + ua * th.cos(), sh.1 + ua * th.sin());
            let wr = (el.0 + fa * (th + be).cos(), el.1 + fa * (th + be).sin());
            (el, wr)
        };
        let (el_l, wr_l) = arm(sh_l, th_l, be_l, 1.0);
        let (el_r, wr_r) = arm(sh_r, th_r, be_r * self.asym_ratio, self.asym_ratio.sqrt());
        let hip_l = (-self.torso, hip - d / 2.0);
        let hip_r = (-self.torso, hip + d / 2.0);
        let pts = [wr_l, wr_r, el_l, el_r, sh_l, sh_r, hip_l, hip_r];
        // Body pitch about the shoulders, then the camera.
        let (ps, pc) = pitch.sin_cos();
        let (cs, cc) = self.cam_angle.sin_cos();
        let mut out = [0f32; WINDOW_FEATURES];
        for (i, (x, y)) in pts.iter().enumerate() {
            let (x1, y1) = (pc * x - ps * y + drift, ps * x + pc * y);
            let (x2, y2) = (cc * x1 - cs * y1, cs * x1 + cc * y1);
            out[2 * i] = self.cam_x + self.cam_scale * x2;
            out[2 * i + 1] = self.cam_y + self.cam_scale * self.cam_squash * y2;
        }
        out
    }
}

struct WindowDraw {
    phase: f32,
    rate_jitter: f32,
    turn_start: f32,
    turn_len: f32,
    drift: f32,
    /// Per-window wobble of a quirk's strength.
    quirk_jitter: f32,
}

/// A population of swimmers: swimmer `i` is `Swimmer::new(derive_seed(seed, domain, i))`.
#[derive(Clone, Debug)]
pub struct Population {
    pub swimmers: Vec<Swimmer>,
}

impl Population {
    /// The `n` swimmers of the base model's training population for `seed`.
    pub fn training(seed: u64, n: usize) -> Population {
        Self::in_domain(seed, DOMAIN_POPULATION, n)
    }

    /// The `n` unseen evaluation swimmers for `seed` (disjoint from any training population).
    pub fn unseen(seed: u64, n: usize) -> Population {
        Self::in_domain(seed, DOMAIN_EVALUATION, n)
    }

    fn in_domain(seed: u64, domain: u64, n: usize) -> Population {
        Population {
            swimmers: (0..n as u64)
                .map(|i| Swimmer::new(derive_seed(seed, domain, i)))
                .collect(),
        }
    }

    /// `per_swimmer` windows of every swimmer, deterministic from `seed`.
    pub fn samples(&self, per_swimmer: usize, seed: u64) -> Vec<Sample> {
        let mut out = Vec::with_capacity(self.swimmers.len() * per_swimmer);
        for (i, s) in self.swimmers.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, 3, i as u64));
            out.extend(s.windows(per_swimmer, &mut rng));
        }
        out
    }
}

/// What a user would correct: of `observed` (windows the app classified), those `model`
/// gets wrong, labelled with the truth, at most `max_corrections` of them (the first ones).
pub fn corrections_from(
    model: &MicroModel,
    observed: &[Sample],
    max_corrections: usize,
) -> Result<Vec<Sample>, ModelError> {
    let predicted = model.predict(observed)?;
    Ok(observed
        .iter()
        .zip(predicted)
        .filter(|(s, p)| s.label != *p)
        .map(|(s, _)| s.clone())
        .take(max_corrections)
        .collect())
}

/// The app observes `observed_windows` fresh windows of `swimmer`; returns the ones
/// `model` gets wrong, relabelled with the truth (at most `max_corrections`).
pub fn corrections<R: Rng>(
    model: &MicroModel,
    swimmer: &Swimmer,
    observed_windows: usize,
    max_corrections: usize,
    rng: &mut R,
) -> Result<Vec<Sample>, ModelError> {
    let observed = swimmer.windows(observed_windows, rng);
    corrections_from(model, &observed, max_corrections)
}

/// A poisoned round: the same windows with their labels shuffled at random (a random
/// permutation of the labels across the windows).
pub fn poison<R: Rng>(samples: &[Sample], rng: &mut R) -> Vec<Sample> {
    let mut labels: Vec<swimlane_core::ClassId> = samples.iter().map(|s| s.label).collect();
    labels.shuffle(rng);
    samples
        .iter()
        .zip(labels)
        .map(|(s, label)| Sample {
            frames: s.frames.clone(),
            label,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swimmers_are_deterministic_and_different() {
        assert_eq!(Swimmer::new(5), Swimmer::new(5));
        assert_ne!(Swimmer::new(5), Swimmer::new(6));
        let s = Swimmer::new(11);
        let a = s.windows(12, &mut ChaCha8Rng::seed_from_u64(1));
        let b = s.windows(12, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(a, b);
        assert_eq!(a.len(), 12);
        for (i, w) in a.iter().enumerate() {
            assert_eq!(w.frames.len(), WINDOW_FRAMES * WINDOW_FEATURES);
            assert_eq!(w.label, StrokeClass::ALL[i % NUM_CLASSES].into());
            assert!(w
                .frames
                .iter()
                .all(|v| v.is_finite() && *v > -0.5 && *v < 1.5));
        }
    }

    #[test]
    fn populations_do_not_share_swimmers() {
        let a = Population::training(7, 50);
        let b = Population::unseen(7, 50);
        for s in &a.swimmers {
            assert!(b.swimmers.iter().all(|t| t.seed != s.seed));
        }
    }

    #[test]
    fn poison_keeps_frames_and_label_multiset() {
        let s = Swimmer::new(3);
        let w = s.windows(60, &mut ChaCha8Rng::seed_from_u64(2));
        let p = poison(&w, &mut ChaCha8Rng::seed_from_u64(3));
        let mut a: Vec<_> = w.iter().map(|s| s.label).collect();
        let mut b: Vec<_> = p.iter().map(|s| s.label).collect();
        assert_ne!(a, b);
        a.sort();
        b.sort();
        assert_eq!(a, b);
        assert!(w.iter().zip(&p).all(|(x, y)| x.frames == y.frames));
    }
}
