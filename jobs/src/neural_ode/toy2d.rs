//! The 2-D target densities of the CNF experiment, sampled in code: two circles
//! (scikit-learn's `make_circles(noise=0.06, factor=0.5)`), two moons (`make_moons` with
//! the same noise, centred), and a mixture of 8 Gaussians on a circle of radius 2.
//!
//! scikit-learn spaces the angles of a fixed-size sample evenly; here every point draws
//! its angle uniformly, which samples the same density (fresh samples every step).

use candle_core::{Device, Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// Coordinate noise of the circles and moons (σ of each coordinate).
pub const NOISE: f64 = 0.06;
/// Radius of the inner circle relative to the outer one (`make_circles(factor=0.5)`).
pub const CIRCLES_FACTOR: f64 = 0.5;
/// Radius of the circle the 8 Gaussians sit on.
pub const GAUSSIANS_RADIUS: f64 = 2.0;
/// Standard deviation of each of the 8 Gaussians.
pub const GAUSSIANS_STD: f64 = 0.1;

/// One of the 2-D target densities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Density {
    /// Two concentric noisy circles of radius 1 and 0.5, half the points on each.
    Circles,
    /// Two interleaved noisy half circles, centred on the origin.
    Moons,
    /// An equal mixture of 8 Gaussians (σ 0.1) evenly spaced on a circle of radius 2.
    Gaussians,
}

impl Density {
    /// All densities, in the order the experiment trains them.
    pub const ALL: [Density; 3] = [Density::Circles, Density::Moons, Density::Gaussians];

    /// The name used in config values, metric names and artifact names.
    pub fn name(self) -> &'static str {
        match self {
            Density::Circles => "circles",
            Density::Moons => "moons",
            Density::Gaussians => "gaussians",
        }
    }

    /// The density named `name`, if any.
    pub fn from_name(name: &str) -> Option<Density> {
        Density::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Index in [`Density::ALL`].
    pub fn index(self) -> usize {
        Density::ALL.iter().position(|d| *d == self).unwrap_or(0)
    }

    /// `n` samples as `[x, y]` pairs.
    pub fn sample(self, n: usize, rng: &mut impl Rng) -> Vec<[f32; 2]> {
        let tau = std::f64::consts::TAU;
        let pi = std::f64::consts::PI;
        (0..n)
            .map(|i| {
                let e: [f64; 2] = [
                    StandardNormal.sample(&mut *rng),
                    StandardNormal.sample(&mut *rng),
                ];
                let (x, y) = match self {
                    Density::Circles => {
                        // alternate rings: exactly half the points on each
                        let r = if i % 2 == 0 { 1.0 } else { CIRCLES_FACTOR };
                        let a = rng.random_range(0.0..tau);
                        (r * a.cos() + NOISE * e[0], r * a.sin() + NOISE * e[1])
                    }
                    Density::Moons => {
                        let a = rng.random_range(0.0..pi);
                        let (x, y) = if i % 2 == 0 {
                            (a.cos(), a.sin())
                        } else {
                            (1.0 - a.cos(), 0.5 - a.sin())
                        };
                        (x - 0.5 + NOISE * e[0], y - 0.25 + NOISE * e[1])
                    }
                    Density::Gaussians => {
                        let k = rng.random_range(0..8) as f64;
                        let a = k * tau / 8.0;
                        (
                            GAUSSIANS_RADIUS * a.cos() + GAUSSIANS_STD * e[0],
                            GAUSSIANS_RADIUS * a.sin() + GAUSSIANS_STD * e[1],
                        )
                    }
                };
                [x as f32, y as f32]
            })
            .collect()
    }

    /// The square `[-r, r]²` the density plots cover.
    pub fn plot_half_width(self) -> f64 {
        match self {
            Density::Circles => 1.5,
            Density::Moons => 2.0,
            Density::Gaussians => 3.0,
        }
    }

    /// Approximate differential entropy in nats (the best achievable NLL), from the
    /// noise-band approximation: a noisy curve of length `L` has entropy about
    /// `log L + ½ log(2πe σ²)`; disjoint equal mixtures add `log k`. The brief gives
    /// 0.79 nats for two circles.
    pub fn approx_entropy(self) -> f64 {
        let tau = std::f64::consts::TAU;
        let band = 0.5 * (tau * std::f64::consts::E * NOISE * NOISE).ln();
        match self {
            // 0.5·(log 2π + band) + 0.5·(log π + band) + log 2
            Density::Circles => 0.5 * (tau.ln() + (tau * CIRCLES_FACTOR).ln()) + band + 2f64.ln(),
            // two arcs of length π each: one curve of length 2π
            Density::Moons => tau.ln() + band,
            Density::Gaussians => {
                8f64.ln() + (tau * std::f64::consts::E * GAUSSIANS_STD * GAUSSIANS_STD).ln()
            }
        }
    }
}

/// Points as a `[n, 2]` f32 tensor on `device`.
pub fn to_tensor(points: &[[f32; 2]], device: &Device) -> Result<Tensor> {
    let flat: Vec<f32> = points.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (points.len(), 2), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::derived_rng;

    #[test]
    fn samples_are_deterministic_and_shaped_like_their_density() {
        for d in Density::ALL {
            assert_eq!(Density::from_name(d.name()), Some(d));
            let a = d.sample(2000, &mut derived_rng(7, 1, 0, 0));
            let b = d.sample(2000, &mut derived_rng(7, 1, 0, 0));
            assert_eq!(a, b);
            let c = d.sample(2000, &mut derived_rng(8, 1, 0, 0));
            assert_ne!(a, c);
            let r: Vec<f64> = a
                .iter()
                .map(|p| ((p[0] as f64).powi(2) + (p[1] as f64).powi(2)).sqrt())
                .collect();
            let mean_r = r.iter().sum::<f64>() / r.len() as f64;
            match d {
                Density::Circles => assert!((mean_r - 0.75).abs() < 0.02, "{mean_r}"),
                Density::Gaussians => assert!((mean_r - 2.0).abs() < 0.02, "{mean_r}"),
                Density::Moons => {
                    let mx = a.iter().map(|p| p[0] as f64).sum::<f64>() / 2000.0;
                    assert!(mx.abs() < 0.05, "{mx}");
                }
            }
            let h = d.approx_entropy();
            assert!(h > 0.0 && h < 1.0, "{h}");
        }
        assert!((Density::Circles.approx_entropy() - 0.79).abs() < 0.01);
    }
}
