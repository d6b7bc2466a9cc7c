//! The DB-VAE's adaptive resampling: sampling weights of the training positives from
//! per-dimension histograms of their latent means (the lab's
//! `get_training_sample_probabilities`, with the paper's product as the default).
//!
//! For each latent dimension `i`: a `bins`-bin histogram of `μ[:, i]` as a density (count /
//! (n × bin width)), outer bin edges moved to ±∞, each sample's bin found by its value,
//! then smoothed with the debiasing parameter α: `Q̃_i = (Q_i + α) / Σ(Q_i + α)`.
//!
//! * [`Combine::Product`] (paper): `W(x) ∝ Π_i 1 / Q̃_i(z_i(x))`, computed in log space
//!   (`log W = −Σ_i log(Q_i + α)`, then a softmax over the samples) since a product of 16 to
//!   100 factors underflows.
//! * [`Combine::Max`] (lab): `p_i(x) = 1 / Q̃_i(bin)` normalised over the samples, then
//!   `p(x) = max_i p_i(x)`, renormalised.
//!
//! α → 0 is maximal debiasing; a large α flattens the weights towards uniform sampling.
//! Uniform sampling itself (the baselines) is [`uniform`].

/// How the per-dimension weights are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// The paper's product over dimensions.
    Product,
    /// The lab's maximum over dimensions.
    Max,
}

/// Equal weights `1/n`.
pub fn uniform(n: usize) -> Vec<f64> {
    vec![1.0 / n.max(1) as f64; n]
}

/// The bin of each of `values` in a `bins`-bin histogram over their range, outer edges at
/// ±∞ (`None` when the values are all equal: the dimension says nothing).
fn bin_of(values: &[f64], bins: usize) -> Option<Vec<usize>> {
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
    Some(
        values
            .iter()
            .map(|v| edges.partition_point(|e| e <= v))
            .collect(),
    )
}

/// Sampling weights (summing to 1) of `n` samples from their latent means `mu`
/// (row-major `n × k`), with `bins` histogram bins, debiasing parameter `alpha` and the
/// per-dimension weights combined by `combine`.
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
    let mut log_w = vec![0.0f64; n];
    let mut max_p = vec![0.0f64; n];
    let mut any = false;
    for i in 0..k {
        let values: Vec<f64> = (0..n).map(|s| mu[s * k + i] as f64).collect();
        let Some(bin) = bin_of(&values, bins) else {
            continue;
        };
        any = true;
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let width = (hi - lo) / bins as f64;
        let mut counts = vec![0usize; bins];
        for &b in &bin {
            counts[b] += 1;
        }
        let density: Vec<f64> = counts
            .iter()
            .map(|c| *c as f64 / (n as f64 * width) + alpha)
            .collect();
        match combine {
            Combine::Product => {
                for (s, &b) in bin.iter().enumerate() {
                    log_w[s] -= density[b].ln();
                }
            }
            Combine::Max => {
                let total: f64 = density.iter().sum();
                let p: Vec<f64> = bin.iter().map(|&b| total / density[b]).collect();
                let sum: f64 = p.iter().sum();
                for (m, v) in max_p.iter_mut().zip(&p) {
                    *m = m.max(v / sum);
                }
            }
        }
    }
    if !any {
        return uniform(n);
    }
    let w: Vec<f64> = match combine {
        Combine::Product => {
            let top = log_w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            log_w.iter().map(|l| (l - top).exp()).collect()
        }
        Combine::Max => max_p,
    };
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
}
