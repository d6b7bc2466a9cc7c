//! Evaluation loop: accuracy and mean cross-entropy of a classifier over a data set.

use candle_core::{Device, Tensor};

use crate::data::{batches, make_batch, ImageDataset};

/// Result of [`evaluate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Fraction of correct predictions, in `[0, 1]`.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Number of examples.
    pub examples: usize,
    /// Number of batches.
    pub batches: usize,
}

/// Runs `logits_fn` (images `[B,1,H,W]` → logits `[B,classes]`) over `ds` in order, in
/// batches of `batch_size`, and returns accuracy and loss. `on_batch(done, total)` is
/// called after each batch (for progress).
pub fn evaluate(
    ds: &ImageDataset,
    batch_size: usize,
    device: &Device,
    mut logits_fn: impl FnMut(&Tensor) -> candle_core::Result<Tensor>,
    mut on_batch: impl FnMut(usize, usize),
) -> candle_core::Result<EvalResult> {
    let order: Vec<usize> = (0..ds.len()).collect();
    let all = batches(&order, batch_size, false);
    let (mut correct, mut loss_sum) = (0usize, 0.0f64);
    for (i, idx) in all.iter().enumerate() {
        let (x, y) = make_batch(ds, idx, None, device)?;
        let logits = logits_fn(&x)?.detach();
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64;
        loss_sum += loss * idx.len() as f64;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        let truth = y.to_vec1::<u32>()?;
        correct += pred.iter().zip(&truth).filter(|(p, t)| p == t).count();
        on_batch(i + 1, all.len());
    }
    let n = ds.len().max(1) as f64;
    Ok(EvalResult {
        accuracy: correct as f64 / n,
        loss: loss_sum / n,
        examples: ds.len(),
        batches: all.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_of_a_fixed_rule() {
        // 4 one-pixel "images"; the rule predicts class = pixel > 0.5
        let ds = ImageDataset {
            images: vec![0, 255, 255, 0],
            labels: vec![0, 1, 0, 0],
            rows: 1,
            cols: 1,
            classes: 2,
        };
        let mut calls = 0;
        let r = evaluate(
            &ds,
            3,
            &Device::Cpu,
            |x| {
                let p = x.flatten_from(1)?;
                Tensor::cat(&[(p.ones_like()? - &p)?, p], 1)
            },
            |_, total| {
                calls += 1;
                assert_eq!(total, 2);
            },
        )
        .unwrap();
        assert_eq!(calls, 2);
        assert_eq!((r.examples, r.batches), (4, 2));
        assert!((r.accuracy - 0.75).abs() < 1e-12);
        assert!(r.loss > 0.0);
    }
}
