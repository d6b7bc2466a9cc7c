//! The detection task with a rare subgroup (the brief's small-scale design): MNIST digits
//! are the positives, Fashion-MNIST items the negatives, and two synthetic attributes are
//! applied to the images:
//!
//! * **A, inverted** (`x → 255 − x`, a bright background with dark strokes): the rare
//!   attribute, on `rare_fraction` of the training positives (3%) and on
//!   `negative_inverted_fraction` of the negatives (50%), so inversion is spuriously
//!   predictive of "not a digit";
//! * **B, rotated** by 90°: on `rotate_fraction` of positives and negatives (20%).
//!
//! Exactly `round(fraction × n)` images get each attribute, chosen with a seeded shuffle, so
//! the construction is deterministic. The test set is a balanced 2×2 grid of held-out
//! positives ({normal, inverted} × {upright, rotated}, `test_per_group` each) plus
//! `test_negatives` negatives with the training mix.
//!
//! The attributes are kept apart from the images: [`DetectionData::train`] holds only the
//! pixels and the class label (1 digit, 0 not a digit), and is all that training sees
//! (the sampler and the loss take an [`ImageDataset`]); [`DetectionData::train_groups`] and
//! [`DetectionData::test_groups`] are for evaluation and reporting only.

use rand::seq::SliceRandom;

use crate::data::{derived_rng, ImageDataset};

/// Number of positive subgroups (the 2×2 grid).
pub const POSITIVE_GROUPS: usize = 4;
/// Index of the negatives in per-group arrays (after the 4 positive subgroups).
pub const NEGATIVE_GROUP: usize = 4;
/// Display names of the groups, by [`Group::index`].
pub const GROUP_NAMES: [&str; 5] = [
    "normal upright",
    "normal rotated",
    "inverted upright",
    "inverted rotated",
    "negatives",
];

/// The attributes of one image (evaluation only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    /// A digit (positive) or a Fashion-MNIST item (negative).
    pub positive: bool,
    /// Attribute A: intensity inversion (the rare one among positives).
    pub inverted: bool,
    /// Attribute B: rotated by 90°.
    pub rotated: bool,
}

impl Group {
    /// 0..4 for the positive subgroups (normal upright, normal rotated, inverted upright,
    /// inverted rotated), [`NEGATIVE_GROUP`] for every negative.
    pub fn index(&self) -> usize {
        if !self.positive {
            NEGATIVE_GROUP
        } else {
            2 * self.inverted as usize + self.rotated as usize
        }
    }
}

/// How the task is built.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// Fraction of training positives inverted (the rare subgroup).
    pub rare_fraction: f64,
    /// Fraction of negatives (training and test) inverted.
    pub negative_inverted_fraction: f64,
    /// Fraction of training positives and of negatives rotated by 90°.
    pub rotate_fraction: f64,
    /// Training positives (0: all available).
    pub train_positives: usize,
    /// Training negatives (0: all available).
    pub train_negatives: usize,
    /// Held-out positives per subgroup of the 2×2 test grid.
    pub test_per_group: usize,
    /// Held-out negatives.
    pub test_negatives: usize,
    /// Seed of the attribute assignment.
    pub seed: u64,
}

/// The built task.
#[derive(Debug, Clone)]
pub struct DetectionData {
    /// Training images with the class label only (1 digit, 0 not a digit; 2 classes).
    pub train: ImageDataset,
    /// The attributes of each training image: for evaluation and reporting only.
    pub train_groups: Vec<Group>,
    /// Test images (1 digit, 0 not a digit).
    pub test: ImageDataset,
    /// The attributes of each test image.
    pub test_groups: Vec<Group>,
}

/// `255 − x` for every pixel.
pub fn invert(image: &[u8]) -> Vec<u8> {
    image.iter().map(|p| 255 - p).collect()
}

/// The image rotated by 90° clockwise (square images): output `(r, c)` is input
/// `(n − 1 − c, r)`.
pub fn rotate90(image: &[u8], n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n * n];
    for r in 0..n {
        for c in 0..n {
            out[r * n + c] = image[(n - 1 - c) * n + r];
        }
    }
    out
}

/// `round(fraction × n)` distinct indices of `0..n`, chosen by a seeded shuffle, as flags.
fn chosen(n: usize, fraction: f64, seed: u64, stream: u64) -> Vec<bool> {
    let k = ((fraction * n as f64).round() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut derived_rng(seed, stream, n as u64, 0));
    let mut flags = vec![false; n];
    for &i in &order[..k] {
        flags[i] = true;
    }
    flags
}

/// Appends `image` with its attributes applied.
fn push_image(out: &mut Vec<u8>, image: &[u8], side: usize, g: Group) {
    let mut px = image.to_vec();
    if g.rotated {
        px = rotate90(&px, side);
    }
    if g.inverted {
        px = invert(&px);
    }
    out.extend_from_slice(&px);
}

fn assemble(
    parts: &[(&ImageDataset, &[usize], &[Group])],
    side: usize,
) -> (ImageDataset, Vec<Group>) {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let mut groups = Vec::new();
    for (ds, idx, gs) in parts {
        for (&i, g) in idx.iter().zip(gs.iter()) {
            push_image(&mut images, ds.image(i), side, *g);
            labels.push(g.positive as u8);
            groups.push(*g);
        }
    }
    let ds = ImageDataset {
        images,
        labels,
        rows: side,
        cols: side,
        classes: 2,
    };
    (ds, groups)
}

/// Builds the task from `(train, test)` splits of the positives' and negatives' data sets
/// (28×28 or any square size, the same for both). Errors when the sets are not square or
/// not the same size, or when the test set asks for more images than there are.
pub fn build(
    positives: (&ImageDataset, &ImageDataset),
    negatives: (&ImageDataset, &ImageDataset),
    spec: &TaskSpec,
) -> Result<DetectionData, String> {
    let side = positives.0.rows;
    for ds in [positives.0, positives.1, negatives.0, negatives.1] {
        if ds.rows != side || ds.cols != side {
            return Err(format!(
                "images must be square and of one size: {}×{} vs {side}×{side}",
                ds.rows, ds.cols
            ));
        }
    }
    let take = |want: usize, have: usize| if want == 0 { have } else { want.min(have) };
    let n_pos = take(spec.train_positives, positives.0.len());
    let n_neg = take(spec.train_negatives, negatives.0.len());
    if n_pos == 0 || n_neg == 0 {
        return Err("no training positives or negatives".into());
    }
    let n_test_pos = POSITIVE_GROUPS * spec.test_per_group;
    if n_test_pos > positives.1.len() || spec.test_negatives > negatives.1.len() {
        return Err(format!(
            "the test grid needs {n_test_pos} positives and {} negatives, the data sets hold {} \
             and {}",
            spec.test_negatives,
            positives.1.len(),
            negatives.1.len()
        ));
    }
    let s = spec.seed;
    let groups_of = |n: usize, positive: bool, inv: f64, stream: u64| -> Vec<Group> {
        let inverted = chosen(n, inv, s, stream);
        let rotated = chosen(n, spec.rotate_fraction, s, stream + 1);
        (0..n)
            .map(|i| Group {
                positive,
                inverted: inverted[i],
                rotated: rotated[i],
            })
            .collect()
    };
    let pos_groups = groups_of(n_pos, true, spec.rare_fraction, 100);
    let neg_groups = groups_of(n_neg, false, spec.negative_inverted_fraction, 102);
    let pos_idx: Vec<usize> = (0..n_pos).collect();
    let neg_idx: Vec<usize> = (0..n_neg).collect();
    let (train, train_groups) = assemble(
        &[
            (positives.0, &pos_idx, &pos_groups),
            (negatives.0, &neg_idx, &neg_groups),
        ],
        side,
    );

    // Test: positive i is in subgroup i mod 4 (every subgroup sees every digit class).
    let test_pos_groups: Vec<Group> = (0..n_test_pos)
        .map(|i| Group {
            positive: true,
            inverted: (i % 4) >= 2,
            rotated: (i % 2) == 1,
        })
        .collect();
    let test_neg_groups = groups_of(
        spec.test_negatives,
        false,
        spec.negative_inverted_fraction,
        104,
    );
    let tp: Vec<usize> = (0..n_test_pos).collect();
    let tn: Vec<usize> = (0..spec.test_negatives).collect();
    let (test, test_groups) = assemble(
        &[
            (positives.1, &tp, &test_pos_groups),
            (negatives.1, &tn, &test_neg_groups),
        ],
        side,
    );
    Ok(DetectionData {
        train,
        train_groups,
        test,
        test_groups,
    })
}

/// Indices of the positives (label 1) and of the negatives (label 0) of a training set:
/// what the sampler sees of it.
pub fn split_by_class(train: &ImageDataset) -> (Vec<usize>, Vec<usize>) {
    let pos = (0..train.len()).filter(|&i| train.labels[i] == 1).collect();
    let neg = (0..train.len()).filter(|&i| train.labels[i] != 1).collect();
    (pos, neg)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny synthetic pair of data sets: positives are a vertical bar, negatives a filled
    /// block, at two brightness levels, `n` training and `m` test images each.
    pub(crate) fn toy(
        n: usize,
        m: usize,
    ) -> (ImageDataset, ImageDataset, ImageDataset, ImageDataset) {
        let side = 28;
        let make = |count: usize, positive: bool| {
            let mut images = Vec::new();
            for k in 0..count {
                let v = if k % 2 == 0 { 200 } else { 255 };
                for r in 0..side {
                    for c in 0..side {
                        let on = if positive {
                            (12..16).contains(&c) && (4..24).contains(&r)
                        } else {
                            (6..22).contains(&c) && (8..20).contains(&r)
                        };
                        images.push(if on { v } else { 0 });
                    }
                }
            }
            ImageDataset {
                images,
                labels: (0..count).map(|k| (k % 10) as u8).collect(),
                rows: side,
                cols: side,
                classes: 10,
            }
        };
        (make(n, true), make(m, true), make(n, false), make(m, false))
    }

    pub(crate) fn spec() -> TaskSpec {
        TaskSpec {
            rare_fraction: 0.03,
            negative_inverted_fraction: 0.5,
            rotate_fraction: 0.2,
            train_positives: 0,
            train_negatives: 0,
            test_per_group: 5,
            test_negatives: 20,
            seed: 7,
        }
    }

    #[test]
    fn transforms() {
        let img: Vec<u8> = (0..9).collect(); // 3x3: rows 012 / 345 / 678
        assert_eq!(rotate90(&img, 3), vec![6, 3, 0, 7, 4, 1, 8, 5, 2]);
        let four = (0..4).fold(img.clone(), |x, _| rotate90(&x, 3));
        assert_eq!(four, img);
        assert_eq!(invert(&[0, 55, 255]), vec![255, 200, 0]);
    }

    #[test]
    fn subgroups_are_deterministic_with_the_configured_fractions() {
        let (ptr, pte, ntr, nte) = toy(200, 40);
        let d = build((&ptr, &pte), (&ntr, &nte), &spec()).unwrap();
        let again = build((&ptr, &pte), (&ntr, &nte), &spec()).unwrap();
        assert_eq!(d.train, again.train);
        assert_eq!(d.train_groups, again.train_groups);
        assert_eq!(d.test, again.test);
        let other = build((&ptr, &pte), (&ntr, &nte), &TaskSpec { seed: 8, ..spec() }).unwrap();
        assert_ne!(d.train_groups, other.train_groups);

        assert_eq!(d.train.len(), 400);
        assert_eq!(d.train.classes, 2);
        let count = |f: &dyn Fn(&Group) -> bool| d.train_groups.iter().filter(|g| f(g)).count();
        assert_eq!(count(&|g| g.positive), 200);
        assert_eq!(count(&|g| g.positive && g.inverted), 6); // 3% of 200
        assert_eq!(count(&|g| g.positive && g.rotated), 40); // 20%
        assert_eq!(count(&|g| !g.positive && g.inverted), 100); // 50%
        assert_eq!(count(&|g| !g.positive && g.rotated), 40);
        // the pixels carry the attributes: an inverted positive has a bright background
        for (i, g) in d.train_groups.iter().enumerate() {
            assert_eq!(d.train.labels[i], g.positive as u8);
            assert_eq!(d.train.image(i)[0], if g.inverted { 255 } else { 0 });
        }
        // the test grid is balanced, the negatives have the training mix
        let mut per = [0usize; 5];
        for g in &d.test_groups {
            per[g.index()] += 1;
        }
        assert_eq!(per, [5, 5, 5, 5, 20]);
        let inv_neg = d
            .test_groups
            .iter()
            .filter(|g| !g.positive && g.inverted)
            .count();
        assert_eq!(inv_neg, 10);
        // too large a test grid is an error
        let err = build(
            (&ptr, &pte),
            (&ntr, &nte),
            &TaskSpec {
                test_per_group: 11,
                ..spec()
            },
        )
        .unwrap_err();
        assert!(err.contains("44 positives"), "{err}");
    }

    #[test]
    fn training_sees_only_the_class_labels() {
        let (ptr, pte, ntr, nte) = toy(100, 20);
        let d = build((&ptr, &pte), (&ntr, &nte), &spec()).unwrap();
        // the training set holds pixels and the class label, nothing else: the subgroup of
        // an image is not recoverable from its label
        assert!(d.train.labels.iter().all(|l| *l <= 1));
        let (pos, neg) = split_by_class(&d.train);
        assert_eq!((pos.len(), neg.len()), (100, 100));
        let inverted_pos: Vec<usize> = pos
            .iter()
            .copied()
            .filter(|&i| d.train_groups[i].inverted)
            .collect();
        assert_eq!(inverted_pos.len(), 3);
        assert!(inverted_pos.iter().all(|&i| d.train.labels[i] == 1));
        // and the same pixels with the attributes relabelled give the same sampler input
        let mut relabelled = d.clone();
        relabelled.train_groups.reverse();
        assert_eq!(split_by_class(&relabelled.train), (pos, neg));
    }
}
