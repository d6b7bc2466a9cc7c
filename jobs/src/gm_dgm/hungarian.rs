//! The Hungarian (Kuhn–Munkres) algorithm for rectangular assignment problems, with
//! row and column potentials, in `O(n² m)` for `n ≤ m`.

use crate::job::JobError;

/// The assignment of rows to columns that minimises the total cost: one column per row
/// and one row per column at most. With more rows than columns, `min(rows, cols)` rows get
/// a column and the others `None`. Errors on a ragged or non-finite matrix.
pub fn min_cost_assignment(cost: &[Vec<f64>]) -> Result<Vec<Option<usize>>, JobError> {
    let n = cost.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let m = cost[0].len();
    if cost.iter().any(|row| row.len() != m) {
        return Err(JobError::Other("assignment: ragged cost matrix".into()));
    }
    if cost.iter().flatten().any(|c| !c.is_finite()) {
        return Err(JobError::Other("assignment: non-finite cost".into()));
    }
    if m == 0 {
        return Ok(vec![None; n]);
    }
    if n <= m {
        Ok(solve(cost).into_iter().map(Some).collect())
    } else {
        // More rows than columns: assign the columns to rows in the transpose.
        let t: Vec<Vec<f64>> = (0..m)
            .map(|j| (0..n).map(|i| cost[i][j]).collect())
            .collect();
        let mut out = vec![None; n];
        for (j, i) in solve(&t).into_iter().enumerate() {
            out[i] = Some(j);
        }
        Ok(out)
    }
}

/// The assignment that maximises the total weight (see [`min_cost_assignment`]).
pub fn max_weight_assignment(weight: &[Vec<f64>]) -> Result<Vec<Option<usize>>, JobError> {
    let neg: Vec<Vec<f64>> = weight
        .iter()
        .map(|row| row.iter().map(|w| -w).collect())
        .collect();
    min_cost_assignment(&neg)
}

/// The core for `n ≤ m` rows: the column of every row. Shortest augmenting paths with
/// potentials `u` (rows) and `v` (columns), 1-based with a virtual column 0.
fn solve(a: &[Vec<f64>]) -> Vec<usize> {
    let n = a.len();
    let m = a[0].len();
    let mut u = vec![0.0f64; n + 1];
    let mut v = vec![0.0f64; m + 1];
    // p[j]: the row matched to column j (0: none); way[j]: previous column on the path.
    let mut p = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0usize;
        let mut minv = vec![f64::INFINITY; m + 1];
        let mut used = vec![false; m + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0usize;
            for j in 1..=m {
                if used[j] {
                    continue;
                }
                let cur = a[i0 - 1][j - 1] - u[i0] - v[j];
                if cur < minv[j] {
                    minv[j] = cur;
                    way[j] = j0;
                }
                if minv[j] < delta {
                    delta = minv[j];
                    j1 = j;
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut out = vec![0usize; n];
    for j in 1..=m {
        if p[j] != 0 {
            out[p[j] - 1] = j - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn total(cost: &[Vec<f64>], a: &[Option<usize>]) -> f64 {
        a.iter()
            .enumerate()
            .filter_map(|(i, j)| j.map(|j| cost[i][j]))
            .sum()
    }

    /// The best total over every injective assignment of min(n, m) pairs.
    fn brute_force(cost: &[Vec<f64>]) -> f64 {
        fn go(cost: &[Vec<f64>], i: usize, used: &mut Vec<bool>, left: usize) -> f64 {
            if left == 0 {
                return 0.0;
            }
            if cost.len() - i < left {
                return f64::INFINITY;
            }
            // row i unassigned (only possible with spare rows) ...
            let mut best = go(cost, i + 1, used, left);
            // ... or assigned to a free column
            for j in 0..used.len() {
                if !used[j] {
                    used[j] = true;
                    best = best.min(cost[i][j] + go(cost, i + 1, used, left - 1));
                    used[j] = false;
                }
            }
            best
        }
        let m = cost[0].len();
        go(cost, 0, &mut vec![false; m], cost.len().min(m))
    }

    fn check_valid(a: &[Option<usize>], n: usize, m: usize) {
        assert_eq!(a.len(), n);
        let cols: Vec<usize> = a.iter().flatten().copied().collect();
        assert_eq!(cols.len(), n.min(m), "{a:?}");
        let mut sorted = cols.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), cols.len(), "a column used twice: {a:?}");
        assert!(cols.iter().all(|&j| j < m));
    }

    #[test]
    fn a_known_square_case() {
        let cost = vec![
            vec![4.0, 1.0, 3.0],
            vec![2.0, 0.0, 5.0],
            vec![3.0, 2.0, 2.0],
        ];
        let a = min_cost_assignment(&cost).unwrap();
        assert_eq!(a, vec![Some(1), Some(0), Some(2)]);
        assert_eq!(total(&cost, &a), 5.0);
        let w = max_weight_assignment(&cost).unwrap();
        assert_eq!(total(&cost, &w), 11.0);
    }

    #[test]
    fn matches_brute_force_on_random_square_and_rectangular_matrices() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (n, m) in [
            (1, 1),
            (2, 2),
            (3, 3),
            (4, 4),
            (5, 5),
            (6, 6),
            (2, 5),
            (3, 6),
            (6, 3),
            (7, 4),
            (5, 1),
            (1, 4),
        ] {
            for trial in 0..20 {
                let cost: Vec<Vec<f64>> = (0..n)
                    .map(|_| {
                        (0..m)
                            .map(|_| {
                                // integer costs with ties half of the time
                                if trial % 2 == 0 {
                                    rng.random_range(0..5) as f64
                                } else {
                                    rng.random_range(-10.0..10.0)
                                }
                            })
                            .collect()
                    })
                    .collect();
                let a = min_cost_assignment(&cost).unwrap();
                check_valid(&a, n, m);
                let best = brute_force(&cost);
                assert!(
                    (total(&cost, &a) - best).abs() < 1e-9,
                    "{n}x{m}: {} vs brute force {best} for {cost:?}",
                    total(&cost, &a)
                );
                // the maximum is the minimum of the negation
                let w = max_weight_assignment(&cost).unwrap();
                check_valid(&w, n, m);
                let neg: Vec<Vec<f64>> = cost
                    .iter()
                    .map(|r| r.iter().map(|c| -c).collect())
                    .collect();
                assert!((total(&cost, &w) + brute_force(&neg)).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn more_clusters_than_classes_leaves_the_weakest_clusters_out() {
        // 4 clusters (rows) x 2 classes (columns) of counts: clusters 1 and 3 win
        let counts = vec![
            vec![5.0, 1.0],
            vec![40.0, 2.0],
            vec![3.0, 3.0],
            vec![0.0, 30.0],
        ];
        let a = max_weight_assignment(&counts).unwrap();
        assert_eq!(a, vec![None, Some(0), None, Some(1)]);
    }

    #[test]
    fn degenerate_and_bad_inputs() {
        assert!(min_cost_assignment(&[]).unwrap().is_empty());
        assert_eq!(
            min_cost_assignment(&[vec![], vec![]]).unwrap(),
            vec![None, None]
        );
        assert!(min_cost_assignment(&[vec![1.0, 2.0], vec![1.0]]).is_err());
        assert!(min_cost_assignment(&[vec![f64::NAN]]).is_err());
    }
}
