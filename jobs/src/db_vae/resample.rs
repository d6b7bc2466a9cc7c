//! The DB-VAE's adaptive resampling: sampling weights of the training positives from
//! per-dimension histograms of their latent means, following the brief's recipe (the lab's
//! `get_training_sample_probabilities`), recomputed every epoch.
//!
//! For each latent dimension `i`:
//!
//! 1. a `bins`-bin histogram of `μ[:, i]` as a density `Q_i` (count / (n × bin width)),
//!    outer bin edges moved to ±∞, each sample's bin found by its value;
//! 2. smoothed with the debiasing parameter α and normalised over the bins:
//!    `Q̃_i = (Q_i + α) / Σ_bins(Q_i + α)`;
//! 3. `p_i(x) = 1 / Q̃_i(bin_i(x))`, normalised over the samples.
//!
//! The per-dimension probabilities are then combined and the result renormalised over the
//! data set:
//!
//! * [`Combine::Max`] (the brief's recipe step 3 and the lab's code, the default):
//!   `p(x) = max_i p_i(x)`. Each `p_i` is bounded (a sample in a nearly empty bin gets at
//!   most about `1 / (α × n × populated bins × bin width)` of the mass), so the maximum is
//!   too: at quick scale (8k positives, k = 16, α = 0.01) no image gets more than a few
//!   tens of times the uniform weight.
//! * [`Combine::Product`] (the paper's `W(x) ∝ Π_i 1 / (Q̂_i(z_i(x)) + α)`, from memory in
//!   the brief): `p(x) ∝ Π_i p_i(x)`, computed in log space (`Σ_i log p_i`, then a softmax
//!   over the samples) since a product of 16 to 100 factors underflows. It is exact and
//!   untempered (the brief allows no tempering), and therefore concentrates exponentially
//!   in `k`: each factor can reach `(max Q + α) / α` ≈ 30 at α = 0.01, so with k = 16 a
//!   handful of images take nearly all the mass (an effective sample size of a few images;
//!   see [`effective_sample_size`], which the job logs every epoch).
//!
//! α → 0 is maximal debiasing; a large α flattens the weights towards uniform sampling.
//! Uniform sampling itself (the baselines) is [`uniform`].

/// How the per-dimension weights are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// The paper's product over dimensions (exponentially concentrated in `k`).
    Product,
    /// The lab's maximum over dimensions (the brief's recipe; the default).
    Max,
}

/// Equal weights `1/n`.
pub fn uniform(n: usize) -> Vec<f64> {
    vec![1.0 / n.max(1) as f64; n]
}

/// The effective sample size `1 / Σ w²` of weights summing to 1: `n` for uniform weights,
/// 1 when one sample has all the mass.
pub fn effective_sample_size(weights: &[f64]) -> f64 {
    let s2: f64 = weights.iter().map(|w| w * w).sum();
    if s2 > 0.0 {
        1.0 / s2
    } else {
        0.0
    }
}

/// The bin of each of `values` in a `bins`-bin histogram over their range, outer edges at
/// ±∞, and the bin width (`None` when the values are all equal: the dimension says
/// nothing).
fn bin_of(values: &[f64], bins: usize) -> Option<(Vec<usize>, f64)> {
    let (lo, hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return None;
    }
    let width = (hi - lo) / bins as f64;
    // interior edges lo + j·width, j = 1..bins−1; a value on an edge goes to the upper bin
    let edges: Vec<f64> = (1..bins).map(|j| lo + j as f64 * width).collect();
    Some((
        values
            .iter()
            .map(|v| edges.partition_point(|e| e <= v))
            .collect(),
        width,
    ))
}

/// `log p_i(x)` of every sample for one dimension's `values` (steps 1 to 3 of the module
/// doc), or `None` for a constant dimension.
fn log_dimension_probabilities(values: &[f64], bins: usize, alpha: f64) -> Option<Vec<f64>> {
    let n = values.len();
    let (bin, width) = bin_of(values, bins)?;
    let mut counts = vec![0usize; bins];
    for &b in &bin {
        counts[b] += 1;
    }
    // smoothed density, normalised over the bins
    let smoothed: Vec<f64> = counts
        .iter()
        .map(|c| *c as f64 / (n as f64 * width) + alpha)
        .collect();
    let total: f64 = smoothed.iter().sum();
    let q: Vec<f64> = smoothed.iter().map(|v| v / total).collect();
    // p_i(x) = 1 / q[bin], normalised over the samples: Σ_x 1 / q[bin(x)] = Σ_b count_b / q_b
    let norm: f64 = counts
        .iter()
        .zip(&q)
        .filter(|(c, _)| **c > 0)
        .map(|(c, q)| *c as f64 / q)
        .sum();
    let log_norm = norm.ln();
    Some(bin.iter().map(|&b| -q[b].ln() - log_norm).collect())
}

/// Sampling weights (summing to 1) of `n` samples from their latent means `mu`
/// (row-major `n × k`), with `bins` histogram bins, debiasing parameter `alpha` and the
/// per-dimension probabilities combined by `combine`. Always finite; uniform when every
/// dimension is constant.
pub fn sampling_weights(
    mu: &[f32],
    k: usize,
    bins: usize,
    alpha: f64,
    combine: Combine,
) -> Vec<f64> {
    let n = mu.len().checked_div(k).unwrap_or(0);
    if n == 0 {
        return Vec::new();
    }
    let bins = bins.max(1);
    // Product: Σ_i log p_i(x); Max: max_i log p_i(x) (log is monotone)
    let mut acc = vec![
        match combine {
            Combine::Product => 0.0,
            Combine::Max => f64::NEG_INFINITY,
        };
        n
    ];
    let mut any = false;
    for i in 0..k {
        let values: Vec<f64> = (0..n).map(|s| mu[s * k + i] as f64).collect();
        if values.iter().any(|v| !v.is_finite()) {
            continue;
        }
        let Some(log_p) = log_dimension_probabilities(&values, bins, alpha) else {
            continue;
        };
        any = true;
        for (a, l) in acc.iter_mut().zip(&log_p) {
            *a = match combine {
                Combine::Product => *a + l,
                Combine::Max => a.max(*l),
            };
        }
    }
    if !any {
        return uniform(n);
    }
    // renormalise over the data set (a softmax of the logs: no underflow of the largest)
    let top = acc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = acc.iter().map(|l| (l - top).exp()).collect();
    let sum: f64 = w.iter().sum();
    w.iter().map(|v| v / sum).collect()
}
/// Draws `count` indices of `0..weights.len()` with replacement, with probabilities
/// proportional to `weights` (inverse CDF by binary search).
pub fn draw(weights: &[f64], count: usize, rng: &mut impl rand::Rng) -> Vec<usize> {
    let mut cdf = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in weights {
        acc += w.max(0.0);
        cdf.push(acc);
    }
    if weights.is_empty() || acc <= 0.0 {
        return Vec::new();
    }
    (0..count)
        .map(|_| {
            let u = rng.random::<f64>() * acc;
            cdf.partition_point(|c| *c <= u).min(weights.len() - 1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::derived_rng;

    /// `n` samples in `k` dimensions, sample `s` at `(s + 0.5) / n` in every dimension
    /// (evenly spread: every bin gets the same count), permuted per dimension (`n` coprime
    /// to 7, 11, ..., 23).
    fn spread(n: usize, k: usize) -> Vec<f32> {
        let mut mu = vec![0.0f32; n * k];
        for i in 0..k {
            let m = [7, 11, 13, 17, 19, 23][i % 6];
            for s in 0..n {
                mu[s * k + i] = (((s * m) % n) as f32 + 0.5) / n as f32;
            }
        }
        mu
    }

    fn ratio(w: &[f64]) -> f64 {
        let max = w.iter().copied().fold(0.0, f64::max);
        let min = w.iter().copied().fold(f64::INFINITY, f64::min);
        max / min
    }

    #[test]
    fn uniform_latents_give_uniform_weights() {
        let mu = spread(100, 3);
        for combine in [Combine::Product, Combine::Max] {
            let w = sampling_weights(&mu, 3, 10, 0.001, combine);
            assert_eq!(w.len(), 100);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            assert!(ratio(&w) < 1.0 + 1e-9, "{combine:?}: {}", ratio(&w));
        }
        // a constant dimension says nothing
        assert_eq!(
            sampling_weights(&[0.3; 20], 2, 10, 0.01, Combine::Product),
            uniform(10)
        );
        assert_eq!(uniform(4), vec![0.25; 4]);
    }

    #[test]
    fn a_rare_latent_region_gets_larger_weight() {
        // 95 samples clustered near 0, 5 far out in dimension 0; dimension 1 is spread
        let n = 100;
        let mut mu = spread(n, 2);
        for s in 0..n {
            mu[s * 2] = if s < 5 {
                3.0 + s as f32 * 0.01
            } else {
                (s % 7) as f32 * 0.01
            };
        }
        for combine in [Combine::Product, Combine::Max] {
            let w = sampling_weights(&mu, 2, 10, 0.01, combine);
            let rare = w[..5].iter().sum::<f64>() / 5.0;
            let common = w[5..].iter().sum::<f64>() / 95.0;
            assert!(rare > 5.0 * common, "{combine:?}: {rare} vs {common}");
        }
        // and a draw follows the weights
        let w = sampling_weights(&mu, 2, 10, 0.01, Combine::Product);
        let picks = draw(&w, 10_000, &mut derived_rng(1, 2, 3, 4));
        let rare = picks.iter().filter(|&&i| i < 5).count() as f64 / 10_000.0;
        let expected: f64 = w[..5].iter().sum();
        assert!((rare - expected).abs() < 0.03, "{rare} vs {expected}");
        assert!(picks.iter().all(|&i| i < n));
    }

    #[test]
    fn smoothing_flattens_the_weights_and_a_large_alpha_is_uniform() {
        let n = 200;
        let mut mu = spread(n, 4);
        for s in 0..10 {
            mu[s * 4] = 5.0; // a rare cluster in dimension 0
        }
        let mut last = f64::INFINITY;
        for alpha in [0.0, 0.001, 0.01, 0.1, 1.0, 10.0] {
            let r = ratio(&sampling_weights(&mu, 4, 10, alpha, Combine::Product));
            assert!(r < last, "alpha {alpha}: ratio {r} not below {last}");
            last = r;
        }
        let r = ratio(&sampling_weights(&mu, 4, 10, 1e9, Combine::Product));
        assert!(r < 1.0 + 1e-6, "{r}");
        let r = ratio(&sampling_weights(&mu, 4, 10, 1e9, Combine::Max));
        assert!(r < 1.0 + 1e-6, "{r}");
    }

    /// Quick-scale latents: `n × k` standard normals, the first `rare` samples shifted by
    /// `shift` in dimensions 0 and 1 (a rare cluster, like the inverted digits).
    fn quick_scale(n: usize, k: usize, rare: usize, shift: f32) -> Vec<f32> {
        use rand_distr::{Distribution, StandardNormal};
        let mut rng = derived_rng(7, 8, 9, 10);
        let mut mu: Vec<f32> = (0..n * k)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        for s in 0..rare {
            mu[s * k] += shift;
            mu[s * k + 1] += shift;
        }
        mu
    }

    #[test]
    fn weights_are_normalised_finite_and_bounded_at_quick_scale() {
        // the quick preset: 8000 positives, 3% rare, latent 16, 10 bins, alpha 0.01
        let (n, k, rare) = (8000, 16, 240);
        let mu = quick_scale(n, k, rare, 4.0);
        let max_w = sampling_weights(&mu, k, 10, 0.01, Combine::Max);
        let product = sampling_weights(&mu, k, 10, 0.01, Combine::Product);
        for (w, name) in [(&max_w, "max"), (&product, "product")] {
            assert_eq!(w.len(), n);
            assert!(w.iter().all(|v| v.is_finite() && *v >= 0.0), "{name}");
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{name}");
        }
        // the default (max): no image takes more than 50x its uniform share, and the
        // effective sample size stays in the thousands
        let top = max_w.iter().copied().fold(0.0, f64::max) * n as f64;
        assert!(top < 50.0, "max: top weight {top}x uniform");
        let ess = effective_sample_size(&max_w);
        assert!(ess > 0.2 * n as f64, "max: ESS {ess}");
        // ... while still up-weighting the rare cluster (about 2x here: with the max over 16
        // isotropic dimensions every common sample is in the tail of some dimension)
        let rare_mean = max_w[..rare].iter().sum::<f64>() / rare as f64;
        let common_mean = max_w[rare..].iter().sum::<f64>() / (n - rare) as f64;
        assert!(
            rare_mean > 1.5 * common_mean,
            "max: {rare_mean} vs {common_mean}"
        );
        // the paper's untempered product is far more concentrated (documented, not a bug:
        // an ESS of about 11 images here)
        let ess_product = effective_sample_size(&product);
        assert!(
            ess_product < ess / 10.0,
            "product ESS {ess_product} vs max {ess}"
        );
        assert!((effective_sample_size(&uniform(n)) - n as f64).abs() < 1e-6);
        // a product over 100 dimensions with alpha 0 neither underflows nor overflows
        let mu = quick_scale(2000, 100, 60, 4.0);
        let w = sampling_weights(&mu, 100, 10, 0.0, Combine::Product);
        assert!(w.iter().all(|v| v.is_finite()));
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
}
