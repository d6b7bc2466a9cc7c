//! Seeded shuffling, batching and the random-crop augmentation, turning an
//! [`ImageDataset`] into `[B, 1, H, W]` f32 tensors in `[0, 1]`.
//!
//! Every random choice is derived from `(seed, stream, epoch, step)`, so a job that
//! resumes at a given epoch and step sees exactly the batches it would have seen.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::mnist::ImageDataset;

/// A deterministic RNG for one `(seed, stream, a, b)` tuple (SplitMix64 mixing).
pub fn derived_rng(seed: u64, stream: u64, a: u64, b: u64) -> StdRng {
    let mut x = seed;
    for v in [stream, a, b] {
        x = splitmix64(x ^ splitmix64(v.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    }
    StdRng::seed_from_u64(x)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The shuffled order of `n` examples in `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut derived_rng(seed, 1, epoch, 0));
    order
}

/// Splits `order` into batches of `batch_size`; the last partial batch is kept unless
/// `drop_last` (training drops it, as the paper's loader does, unless it is the only one).
pub fn batches(order: &[usize], batch_size: usize, drop_last: bool) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut out: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    if drop_last && out.len() > 1 && out.last().is_some_and(|b| b.len() < batch_size) {
        out.pop();
    }
    out
}

/// Random crop: pads the image with `pad` zero pixels on every side, then crops a
/// `rows × cols` window at a uniformly random offset (torchvision `RandomCrop(28, 4)`).
pub fn random_crop(
    image: &[u8],
    rows: usize,
    cols: usize,
    pad: usize,
    rng: &mut impl Rng,
) -> Vec<u8> {
    let dy = rng.random_range(0..=2 * pad) as isize - pad as isize;
    let dx = rng.random_range(0..=2 * pad) as isize - pad as isize;
    shift(image, rows, cols, dy, dx)
}

/// The image moved so that output pixel `(r, c)` is input pixel `(r + dy, c + dx)`,
/// zero outside.
pub fn shift(image: &[u8], rows: usize, cols: usize, dy: isize, dx: isize) -> Vec<u8> {
    let mut out = vec![0u8; rows * cols];
    for r in 0..rows {
        let sr = r as isize + dy;
        if sr < 0 || sr >= rows as isize {
            continue;
        }
        for c in 0..cols {
            let sc = c as isize + dx;
            if sc >= 0 && sc < cols as isize {
                out[r * cols + c] = image[sr as usize * cols + sc as usize];
            }
        }
    }
    out
}

/// Builds `(images [B,1,H,W] f32 in [0,1], labels [B] u32)` for the examples `indices`.
/// With `augment = Some((pad, rng))` each image is random-cropped.
pub fn make_batch(
    ds: &ImageDataset,
    indices: &[usize],
    augment: Option<(usize, &mut StdRng)>,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (rows, cols) = (ds.rows, ds.cols);
    let mut pixels = Vec::with_capacity(indices.len() * rows * cols);
    let mut labels = Vec::with_capacity(indices.len());
    let mut augment = augment;
    for &i in indices {
        let img = ds.image(i);
        match augment.as_mut() {
            Some((pad, rng)) => {
                let cropped = random_crop(img, rows, cols, *pad, *rng);
                pixels.extend(cropped.iter().map(|p| *p as f32 / 255.0));
            }
            None => pixels.extend(img.iter().map(|p| *p as f32 / 255.0)),
        }
        labels.push(ds.labels[i] as u32);
    }
    let x = Tensor::from_vec(pixels, (indices.len(), 1, rows, cols), device)?;
    let y = Tensor::from_vec(labels, indices.len(), device)?;
    Ok((x, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffling_is_seeded_and_a_permutation() {
        let a = epoch_order(100, 7, 0);
        assert_eq!(a, epoch_order(100, 7, 0));
        assert_ne!(a, epoch_order(100, 7, 1));
        assert_ne!(a, epoch_order(100, 8, 0));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn batching() {
        let order: Vec<usize> = (0..10).collect();
        let b = batches(&order, 4, false);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4, 2]);
        assert_eq!(batches(&order, 4, true).len(), 2);
        assert_eq!(batches(&order[..3], 4, true).len(), 1);
    }

    #[test]
    fn crop_shifts_with_zero_fill() {
        let img: Vec<u8> = (1..=9).collect(); // 3x3
        assert_eq!(shift(&img, 3, 3, 0, 0), img);
        assert_eq!(shift(&img, 3, 3, 1, 0), vec![4, 5, 6, 7, 8, 9, 0, 0, 0]);
        assert_eq!(shift(&img, 3, 3, 0, -1), vec![0, 1, 2, 0, 4, 5, 0, 7, 8]);
        let mut rng = derived_rng(0, 0, 0, 0);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let out = random_crop(&img, 3, 3, 1, &mut rng);
            // the total mass never grows and the centre pixel always survives somewhere
            assert!(out.iter().map(|p| *p as u32).sum::<u32>() <= 45);
            assert!(out.contains(&5));
            seen.insert(out);
        }
        assert_eq!(seen.len(), 9, "all 3x3 offsets should occur");
    }

    #[test]
    fn batch_tensors() {
        let ds = ImageDataset {
            images: vec![0, 255, 0, 0, 51, 0, 0, 0],
            labels: vec![3, 7],
            rows: 2,
            cols: 2,
            classes: 10,
        };
        let (x, y) = make_batch(&ds, &[1, 0], None, &Device::Cpu).unwrap();
        assert_eq!(x.dims(), &[2, 1, 2, 2]);
        assert_eq!(y.to_vec1::<u32>().unwrap(), vec![7, 3]);
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.2).abs() < 1e-6 && (v[5] - 1.0).abs() < 1e-6);
        let mut rng = derived_rng(1, 2, 3, 4);
        let (xa, _) = make_batch(&ds, &[0, 1], Some((1, &mut rng)), &Device::Cpu).unwrap();
        assert_eq!(xa.dims(), &[2, 1, 2, 2]);
    }
}
