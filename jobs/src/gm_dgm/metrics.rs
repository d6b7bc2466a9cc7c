//! Cluster-and-label accuracy from a confusion matrix of mixture components against
//! true classes, under two ways of naming the components:
//!
//! * **Hungarian**: a component of a labelled class keeps its class; the other components
//!   (the masked classes' slots and the extra ones) are clusters, matched one-to-one to the
//!   masked classes by maximum agreement ([`max_weight_assignment`]); a cluster left
//!   unmatched (more clusters than masked classes) names no class, so its points count as
//!   errors.
//! * **Majority**: every component takes the most frequent true class among its points
//!   (the paper's code, `find_relabelled_y_pred`); several components may share a class.
//!
//! Both fit the naming on the evaluation set's own labels, as clustering accuracy does.

use serde::{Deserialize, Serialize};

use super::hungarian::max_weight_assignment;
use crate::job::JobError;

/// Accuracies and agreement of one naming of the components.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClusterScores {
    /// Fraction of all points whose component names their true class.
    pub accuracy: f64,
    /// The same over the points of labelled classes.
    pub labelled_accuracy: f64,
    /// The same over the points of masked classes.
    pub masked_accuracy: f64,
    /// Cohen's κ of the named predictions against the truth (an unnamed component is a
    /// class of its own).
    pub kappa: f64,
}

/// The class each component names under the Hungarian rule (see the module docs).
/// `confusion[k][c]` counts points of true class `c` predicted as component `k`; the
/// first `classes` components are the classes' own slots.
pub fn hungarian_naming(
    confusion: &[Vec<f64>],
    masked: &[usize],
) -> Result<Vec<Option<usize>>, JobError> {
    let classes = confusion.first().map_or(0, Vec::len);
    let mut naming: Vec<Option<usize>> = (0..confusion.len())
        .map(|k| (k < classes && !masked.contains(&k)).then_some(k))
        .collect();
    let clusters: Vec<usize> = (0..confusion.len())
        .filter(|k| naming[*k].is_none())
        .collect();
    let weight: Vec<Vec<f64>> = clusters
        .iter()
        .map(|&k| masked.iter().map(|&c| confusion[k][c]).collect())
        .collect();
    for (row, col) in max_weight_assignment(&weight)?.into_iter().enumerate() {
        naming[clusters[row]] = col.map(|j| masked[j]);
    }
    Ok(naming)
}

/// The class each component names under the majority rule (`None` for an empty one).
pub fn majority_naming(confusion: &[Vec<f64>]) -> Vec<Option<usize>> {
    confusion
        .iter()
        .map(|row| {
            let (best, count) =
                row.iter().enumerate().fold(
                    (0, 0.0f64),
                    |acc, (c, &n)| if n > acc.1 { (c, n) } else { acc },
                );
            (count > 0.0).then_some(best)
        })
        .collect()
}

/// Scores a naming of the components against the confusion matrix.
pub fn score(confusion: &[Vec<f64>], naming: &[Option<usize>], masked: &[usize]) -> ClusterScores {
    let classes = confusion.first().map_or(0, Vec::len);
    let mut true_count = vec![0.0f64; classes];
    // predicted-class counts, with one more slot for "no class"
    let mut pred_count = vec![0.0f64; classes + 1];
    let (mut total, mut correct) = (0.0f64, 0.0f64);
    let (mut lab_total, mut lab_correct, mut mask_total, mut mask_correct) = (0.0, 0.0, 0.0, 0.0);
    for (k, row) in confusion.iter().enumerate() {
        let named = naming.get(k).copied().flatten();
        for (c, &n) in row.iter().enumerate() {
            total += n;
            true_count[c] += n;
            pred_count[named.unwrap_or(classes)] += n;
            let hit = if named == Some(c) { n } else { 0.0 };
            correct += hit;
            if masked.contains(&c) {
                mask_total += n;
                mask_correct += hit;
            } else {
                lab_total += n;
                lab_correct += hit;
            }
        }
    }
    let frac = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let accuracy = frac(correct, total);
    let expected: f64 = (0..classes)
        .map(|c| frac(true_count[c], total) * frac(pred_count[c], total))
        .sum();
    let kappa = if expected < 1.0 {
        (accuracy - expected) / (1.0 - expected)
    } else {
        0.0
    };
    ClusterScores {
        accuracy,
        labelled_accuracy: frac(lab_correct, lab_total),
        masked_accuracy: frac(mask_correct, mask_total),
        kappa,
    }
}

/// Components that received at least one point.
pub fn used_components(confusion: &[Vec<f64>]) -> usize {
    confusion
        .iter()
        .filter(|row| row.iter().sum::<f64>() > 0.0)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 classes (class 2 masked), 5 components (2 extra).
    fn confusion() -> Vec<Vec<f64>> {
        vec![
            vec![10.0, 0.0, 0.0], // class 0's slot
            vec![1.0, 8.0, 2.0],  // class 1's slot
            vec![0.0, 0.0, 3.0],  // class 2's slot (masked): a small cluster
            vec![0.0, 2.0, 6.0],  // extra: the masked class's main cluster
            vec![0.0, 0.0, 0.0],  // extra: empty
        ]
    }

    #[test]
    fn hungarian_matches_clusters_to_masked_classes_one_to_one() {
        let c = confusion();
        let naming = hungarian_naming(&c, &[2]).unwrap();
        assert_eq!(naming, vec![Some(0), Some(1), None, Some(2), None]);
        let s = score(&c, &naming, &[2]);
        // correct: 10 + 8 + 6 of 32
        assert!((s.accuracy - 24.0 / 32.0).abs() < 1e-12);
        assert!((s.labelled_accuracy - 18.0 / 21.0).abs() < 1e-12);
        assert!((s.masked_accuracy - 6.0 / 11.0).abs() < 1e-12);
        assert!(s.kappa > 0.0 && s.kappa < s.accuracy);
        assert_eq!(used_components(&c), 4);
    }

    #[test]
    fn majority_lets_components_share_a_class() {
        let c = confusion();
        let naming = majority_naming(&c);
        assert_eq!(naming, vec![Some(0), Some(1), Some(2), Some(2), None]);
        let s = score(&c, &naming, &[2]);
        assert!((s.accuracy - 27.0 / 32.0).abs() < 1e-12);
        assert!((s.masked_accuracy - 9.0 / 11.0).abs() < 1e-12);
        // a perfect diagonal has kappa 1
        let diag = vec![vec![5.0, 0.0], vec![0.0, 5.0]];
        let s = score(&diag, &majority_naming(&diag), &[1]);
        assert!((s.kappa - 1.0).abs() < 1e-12 && (s.accuracy - 1.0).abs() < 1e-12);
    }
}
