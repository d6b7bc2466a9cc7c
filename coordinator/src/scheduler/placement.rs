//! Placement: a pure function from (queue, cluster) to assignments.
//!
//! Rules, in order:
//! 1. **Priority**: higher `priority` first; first-in first-out (by submit time, then id)
//!    within a priority.
//! 2. **Gang**: every rank of a job is placed in the same pass, or none is.
//! 3. **Device kind**: a rank only gets a slot of the job's `device_kind` (`""` = any kind).
//! 4. **Best fit onto the fewest workers**: if one worker can take the whole gang, the one
//!    whose free slots of that kind fit it most tightly wins (fewest leftover slots, ties
//!    to the earlier worker). Otherwise the gang is spread over the fewest workers: take
//!    the worker with the most free slots, repeat, and best-fit the remainder.
//! 5. **No head-of-line blocking**: a job that does not fit now waits with a visible reason
//!    and the pass goes on with the jobs behind it, so smaller jobs are placed around it.
//!    A job that can never fit the cluster is rejected at submit ([`fits_ever`]).
//!    (A large job can therefore be overtaken for as long as small jobs keep coming;
//!    reservations/backfill that bound its wait come in a later issue.)
//!
//! Cost: free capacity is indexed per device kind in ordered sets keyed by
//! `(free slots, worker)`, so a best-fit lookup is `O(log workers)` and a pass is about
//! `O(jobs log jobs + jobs · log workers + slots)`.
//!
//! This file depends only on `std` and `trainyard_proto` (the placement benchmark compiles
//! it directly).

use std::cmp::Reverse;
use std::collections::BTreeSet;

use trainyard_proto::JobSpec;

/// A job waiting to be placed.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedJob {
    /// Job id.
    pub id: String,
    /// Higher first.
    pub priority: i32,
    /// Submit time; earlier first within a priority.
    pub submitted_unix_ms: i64,
    /// Gang size (>= 1).
    pub ranks: u32,
    /// Device kind every rank needs; `""` = any.
    pub device_kind: String,
}

/// One device slot of a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotView {
    /// Device index on the worker.
    pub index: u32,
    /// Device kind ("cpu", "gpu").
    pub kind: String,
    /// True if a rank holds it.
    pub busy: bool,
}

/// One alive worker as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    /// Worker id.
    pub id: String,
    /// Its device slots.
    pub slots: Vec<SlotView>,
}

/// The alive workers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    /// Alive workers, in a stable order (ties in best fit go to the earlier one).
    pub workers: Vec<WorkerView>,
}

/// Where one rank of an assignment goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankSlot {
    /// Rank, from 0.
    pub rank: u32,
    /// Worker id.
    pub worker_id: String,
    /// Device index on that worker.
    pub device_index: u32,
    /// Kind of that device.
    pub device_kind: String,
}

/// A job placed in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Job id.
    pub job_id: String,
    /// One slot per rank, by rank.
    pub ranks: Vec<RankSlot>,
}

/// A job left waiting, and why (human-readable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// Job id.
    pub job_id: String,
    /// For example "waiting for 4 free gpu slots; 2 free".
    pub reason: String,
}

/// Outcome of one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementResult {
    /// Jobs placed, in placement order.
    pub assignments: Vec<Assignment>,
    /// Every queued job not placed, with its reason, in queue order.
    pub waiting: Vec<Waiting>,
}

fn slots_label(kind: &str) -> String {
    if kind.is_empty() {
        "slots".to_string()
    } else {
        format!("{kind} slots")
    }
}

/// Checks that a gang could fit the cluster if it were idle: enough slots of the kind in
/// total. `Err` carries the reason (for a FailedPrecondition at submit).
pub fn fits_ever(spec: &JobSpec, cluster: &ClusterView) -> Result<(), String> {
    let ranks = spec.ranks.max(1);
    let kind = spec.device_kind.as_str();
    let total: usize = cluster
        .workers
        .iter()
        .map(|w| {
            w.slots
                .iter()
                .filter(|s| kind.is_empty() || s.kind == kind)
                .count()
        })
        .sum();
    if (ranks as usize) <= total {
        Ok(())
    } else {
        Err(format!(
            "the job needs {ranks} {} but the cluster has {total} in total across {} alive worker(s)",
            slots_label(kind),
            cluster.workers.len()
        ))
    }
}

/// Free capacity, indexed. Key `k < kinds.len()` is one device kind; key `kinds.len()`
/// is "any kind".
struct Index {
    kinds: Vec<String>,
    /// `free[w][k]`: free device indexes of kind `k` on worker `w`, highest first (pop = lowest).
    free: Vec<Vec<Vec<u32>>>,
    /// Per key: workers with free capacity, ordered by (free count, worker).
    sets: Vec<BTreeSet<(u32, u32)>>,
    /// Per key: free slots in total.
    total_free: Vec<u64>,
    /// Per key: slots in total (busy or not).
    total: Vec<u64>,
}

impl Index {
    fn build(cluster: &ClusterView) -> Self {
        let mut kinds: Vec<String> = Vec::new();
        for w in &cluster.workers {
            for s in &w.slots {
                if !kinds.contains(&s.kind) {
                    kinds.push(s.kind.clone());
                }
            }
        }
        let nk = kinds.len();
        let mut free = Vec::with_capacity(cluster.workers.len());
        let mut sets = vec![BTreeSet::new(); nk + 1];
        let mut total_free = vec![0u64; nk + 1];
        let mut total = vec![0u64; nk + 1];
        for (wi, w) in cluster.workers.iter().enumerate() {
            let mut per_kind: Vec<Vec<u32>> = vec![Vec::new(); nk];
            for s in &w.slots {
                let k = kinds.iter().position(|k| *k == s.kind).unwrap_or(0);
                total[k] += 1;
                total[nk] += 1;
                if !s.busy {
                    per_kind[k].push(s.index);
                }
            }
            let mut any = 0u32;
            for (k, list) in per_kind.iter_mut().enumerate() {
                list.sort_unstable_by(|a, b| b.cmp(a));
                let n = list.len() as u32;
                if n > 0 {
                    sets[k].insert((n, wi as u32));
                    total_free[k] += u64::from(n);
                    any += n;
                }
            }
            if any > 0 {
                sets[nk].insert((any, wi as u32));
                total_free[nk] += u64::from(any);
            }
            free.push(per_kind);
        }
        Self {
            kinds,
            free,
            sets,
            total_free,
            total,
        }
    }

    /// Key of a device kind; `None` if no worker has that kind.
    fn key(&self, kind: &str) -> Option<usize> {
        if kind.is_empty() {
            Some(self.kinds.len())
        } else {
            self.kinds.iter().position(|k| k == kind)
        }
    }

    fn free_of(&self, w: usize, key: usize) -> u32 {
        if key == self.kinds.len() {
            self.free[w].iter().map(|l| l.len() as u32).sum()
        } else {
            self.free[w][key].len() as u32
        }
    }

    /// Takes `n` free slots of `key` on worker `w` (the caller checked they exist).
    fn take(&mut self, w: usize, key: usize, n: u32, out: &mut Vec<(usize, u32, usize)>) {
        let nk = self.kinds.len();
        let any_before = self.free_of(w, nk);
        let kinds: Vec<usize> = if key == nk {
            (0..nk).collect()
        } else {
            vec![key]
        };
        let mut left = n;
        for k in kinds {
            if left == 0 {
                break;
            }
            let before = self.free[w][k].len() as u32;
            let mut took = 0;
            while left > 0 {
                match self.free[w][k].pop() {
                    Some(idx) => {
                        out.push((w, idx, k));
                        left -= 1;
                        took += 1;
                    }
                    None => break,
                }
            }
            if took > 0 {
                self.sets[k].remove(&(before, w as u32));
                if before - took > 0 {
                    self.sets[k].insert((before - took, w as u32));
                }
                self.total_free[k] -= u64::from(took);
            }
        }
        let taken = n - left;
        self.sets[nk].remove(&(any_before, w as u32));
        if any_before - taken > 0 {
            self.sets[nk].insert((any_before - taken, w as u32));
        }
        self.total_free[nk] -= u64::from(taken);
    }

    /// Places a gang of `n` on key `key`; the caller checked `total_free[key] >= n`.
    fn place_gang(&mut self, key: usize, n: u32) -> Vec<(usize, u32, usize)> {
        let mut out = Vec::with_capacity(n as usize);
        let mut left = n;
        while left > 0 {
            // Tightest worker that takes everything that is left.
            let fit = self.sets[key].range((left, 0)..).next().copied();
            let (free, w) = match fit {
                Some(entry) => entry,
                // Otherwise the worker with the most free slots.
                None => match self.sets[key].last().copied() {
                    Some(entry) => entry,
                    None => break,
                },
            };
            let n_take = free.min(left);
            self.take(w as usize, key, n_take, &mut out);
            left -= n_take;
        }
        out
    }
}

/// One scheduling pass: which queued jobs to start now, and why the others wait.
pub fn place(queue: &[QueuedJob], cluster: &ClusterView) -> PlacementResult {
    let mut index = Index::build(cluster);
    let mut order: Vec<&QueuedJob> = queue.iter().collect();
    order.sort_by(|a, b| {
        (Reverse(a.priority), a.submitted_unix_ms, &a.id).cmp(&(
            Reverse(b.priority),
            b.submitted_unix_ms,
            &b.id,
        ))
    });
    let mut result = PlacementResult {
        assignments: Vec::new(),
        waiting: Vec::new(),
    };
    for job in order {
        let n = job.ranks.max(1);
        let key = index.key(&job.device_kind);
        let (total, free) = match key {
            Some(k) => (index.total[k], index.total_free[k]),
            None => (0, 0),
        };
        let label = slots_label(&job.device_kind);
        if u64::from(n) > total {
            result.waiting.push(Waiting {
                job_id: job.id.clone(),
                reason: format!(
                    "cannot fit the current cluster: needs {n} {label}, the alive workers have {total} in total"
                ),
            });
            continue;
        }
        let Some(key) = key else { continue };
        if u64::from(n) > free {
            result.waiting.push(Waiting {
                job_id: job.id.clone(),
                reason: format!("waiting for {n} free {label}; {free} free"),
            });
            continue;
        }
        let taken = index.place_gang(key, n);
        let ranks = taken
            .into_iter()
            .enumerate()
            .map(|(rank, (w, device_index, k))| RankSlot {
                rank: rank as u32,
                worker_id: cluster.workers[w].id.clone(),
                device_index,
                device_kind: index.kinds[k].clone(),
            })
            .collect();
        result.assignments.push(Assignment {
            job_id: job.id.clone(),
            ranks,
        });
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn worker(id: &str, kind: &str, slots: u32, busy: u32) -> WorkerView {
        WorkerView {
            id: id.to_string(),
            slots: (0..slots)
                .map(|i| SlotView {
                    index: i,
                    kind: kind.to_string(),
                    busy: i < busy,
                })
                .collect(),
        }
    }

    fn job(id: &str, priority: i32, t: i64, ranks: u32, kind: &str) -> QueuedJob {
        QueuedJob {
            id: id.to_string(),
            priority,
            submitted_unix_ms: t,
            ranks,
            device_kind: kind.to_string(),
        }
    }

    fn placed_ids(r: &PlacementResult) -> Vec<&str> {
        r.assignments.iter().map(|a| a.job_id.as_str()).collect()
    }

    fn workers_of(a: &Assignment) -> HashSet<&str> {
        a.ranks.iter().map(|r| r.worker_id.as_str()).collect()
    }

    fn assignment<'a>(r: &'a PlacementResult, id: &str) -> &'a Assignment {
        r.assignments
            .iter()
            .find(|a| a.job_id == id)
            .expect("placed")
    }

    fn reason<'a>(r: &'a PlacementResult, id: &str) -> &'a str {
        &r.waiting
            .iter()
            .find(|w| w.job_id == id)
            .expect("waiting")
            .reason
    }

    #[test]
    fn higher_priority_goes_first() {
        let cluster = ClusterView {
            workers: vec![worker("w1", "gpu", 2, 0)],
        };
        let q = [job("low", 0, 1, 2, "gpu"), job("high", 5, 2, 2, "gpu")];
        let r = place(&q, &cluster);
        assert_eq!(placed_ids(&r), ["high"]);
        assert_eq!(reason(&r, "low"), "waiting for 2 free gpu slots; 0 free");
    }

    #[test]
    fn fifo_within_a_priority() {
        let cluster = ClusterView {
            workers: vec![worker("w1", "cpu", 1, 0)],
        };
        let q = [
            job("b", 1, 20, 1, ""),
            job("a", 1, 10, 1, ""),
            job("c", 1, 30, 1, ""),
        ];
        let r = place(&q, &cluster);
        assert_eq!(placed_ids(&r), ["a"]);
        let waiting: Vec<&str> = r.waiting.iter().map(|w| w.job_id.as_str()).collect();
        assert_eq!(waiting, ["b", "c"]);
    }

    #[test]
    fn gangs_are_all_or_nothing() {
        let cluster = ClusterView {
            workers: vec![worker("w1", "gpu", 4, 1), worker("w2", "gpu", 4, 1)],
        };
        // 6 free in total: an 8-gang must not be partially placed.
        let r = place(&[job("big", 9, 1, 8, "gpu")], &cluster);
        assert!(r.assignments.is_empty());
        assert_eq!(reason(&r, "big"), "waiting for 8 free gpu slots; 6 free");
        // A 6-gang takes all six, ranks 0..6 each on a distinct free slot.
        let r = place(&[job("six", 9, 1, 6, "gpu")], &cluster);
        let a = assignment(&r, "six");
        assert_eq!(a.ranks.len(), 6);
        let ranks: Vec<u32> = a.ranks.iter().map(|r| r.rank).collect();
        assert_eq!(ranks, [0, 1, 2, 3, 4, 5]);
        let slots: HashSet<(&str, u32)> = a
            .ranks
            .iter()
            .map(|r| (r.worker_id.as_str(), r.device_index))
            .collect();
        assert_eq!(slots.len(), 6);
        assert!(
            !slots.contains(&("w1", 0)) && !slots.contains(&("w2", 0)),
            "busy slot used"
        );
    }

    #[test]
    fn best_fit_prefers_the_tightest_worker() {
        let cluster = ClusterView {
            workers: vec![
                worker("w8", "gpu", 8, 0),
                worker("w3", "gpu", 8, 5),
                worker("w4", "gpu", 8, 4),
            ],
        };
        let r = place(&[job("three", 0, 1, 3, "gpu")], &cluster);
        assert_eq!(workers_of(assignment(&r, "three")), HashSet::from(["w3"]));
        let r = place(&[job("four", 0, 1, 4, "gpu")], &cluster);
        assert_eq!(workers_of(assignment(&r, "four")), HashSet::from(["w4"]));
        let r = place(&[job("five", 0, 1, 5, "gpu")], &cluster);
        assert_eq!(workers_of(assignment(&r, "five")), HashSet::from(["w8"]));
        // Packing within one pass: 3 then 4 then 2 fill the tight workers first.
        let q = [
            job("a", 0, 1, 3, "gpu"),
            job("b", 0, 2, 4, "gpu"),
            job("c", 0, 3, 2, "gpu"),
        ];
        let r = place(&q, &cluster);
        assert_eq!(workers_of(assignment(&r, "a")), HashSet::from(["w3"]));
        assert_eq!(workers_of(assignment(&r, "b")), HashSet::from(["w4"]));
        assert_eq!(workers_of(assignment(&r, "c")), HashSet::from(["w8"]));
    }

    #[test]
    fn a_gang_too_big_for_one_worker_uses_the_fewest_workers() {
        let cluster = ClusterView {
            workers: vec![
                worker("w2", "gpu", 8, 6),
                worker("w5", "gpu", 8, 3),
                worker("w3", "gpu", 8, 5),
                worker("w6", "gpu", 8, 2),
            ],
        };
        // 9 = 6 (largest) + 3 (tightest fit of the remainder): two workers.
        let r = place(&[job("nine", 0, 1, 9, "gpu")], &cluster);
        assert_eq!(
            workers_of(assignment(&r, "nine")),
            HashSet::from(["w6", "w3"])
        );
        // 12 = 6 + 5 + 1 (tightest for 1 is w2 with 2 free): three workers.
        let r = place(&[job("twelve", 0, 1, 12, "gpu")], &cluster);
        assert_eq!(workers_of(assignment(&r, "twelve")).len(), 3);
    }

    #[test]
    fn device_kinds_are_matched() {
        let cluster = ClusterView {
            workers: vec![worker("cpu1", "cpu", 4, 0), worker("gpu1", "gpu", 2, 0)],
        };
        let q = [
            job("g", 0, 1, 2, "gpu"),
            job("c", 0, 2, 3, "cpu"),
            job("g2", 0, 3, 1, "gpu"),
            job("any", 0, 4, 1, ""),
        ];
        let r = place(&q, &cluster);
        assert!(assignment(&r, "g")
            .ranks
            .iter()
            .all(|s| s.worker_id == "gpu1" && s.device_kind == "gpu"));
        assert!(assignment(&r, "c")
            .ranks
            .iter()
            .all(|s| s.worker_id == "cpu1" && s.device_kind == "cpu"));
        assert_eq!(reason(&r, "g2"), "waiting for 1 free gpu slots; 0 free");
        assert_eq!(assignment(&r, "any").ranks[0].worker_id, "cpu1");
        // A kind no worker has waits with a reason.
        let r = place(&[job("tpu", 0, 1, 1, "tpu")], &cluster);
        assert!(reason(&r, "tpu").contains("cannot fit the current cluster"));
    }

    #[test]
    fn a_big_job_does_not_block_smaller_ones_behind_it() {
        let cluster = ClusterView {
            workers: vec![worker("w1", "gpu", 4, 2)],
        };
        let q = [job("big", 10, 1, 4, "gpu"), job("small", 0, 2, 2, "gpu")];
        let r = place(&q, &cluster);
        assert_eq!(placed_ids(&r), ["small"]);
        assert_eq!(reason(&r, "big"), "waiting for 4 free gpu slots; 2 free");
    }

    #[test]
    fn fits_ever_rejects_gangs_bigger_than_the_cluster() {
        let cluster = ClusterView {
            workers: vec![worker("w1", "gpu", 8, 8), worker("w2", "cpu", 4, 0)],
        };
        let spec = |ranks, kind: &str| JobSpec {
            ranks,
            device_kind: kind.to_string(),
            ..Default::default()
        };
        // Busy slots count: the job could fit later.
        assert_eq!(fits_ever(&spec(8, "gpu"), &cluster), Ok(()));
        assert_eq!(fits_ever(&spec(12, ""), &cluster), Ok(()));
        assert_eq!(fits_ever(&spec(0, "cpu"), &cluster), Ok(()));
        let err = fits_ever(&spec(16, "gpu"), &cluster).unwrap_err();
        assert_eq!(
            err,
            "the job needs 16 gpu slots but the cluster has 8 in total across 2 alive worker(s)"
        );
        assert!(fits_ever(&spec(1, "tpu"), &cluster).is_err());
        assert!(fits_ever(&spec(13, ""), &cluster).is_err());
    }

    #[test]
    fn no_slot_is_given_twice_and_busy_slots_are_never_used() {
        // A deterministic pseudo-random mix.
        let mut seed = 42u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        let workers: Vec<WorkerView> = (0..40)
            .map(|i| {
                let kind = if i % 3 == 0 { "cpu" } else { "gpu" };
                worker(&format!("w{i:02}"), kind, 8, next() % 9)
            })
            .collect();
        let cluster = ClusterView { workers };
        let queue: Vec<QueuedJob> = (0..300)
            .map(|i| {
                let kind = ["", "cpu", "gpu"][(next() % 3) as usize];
                job(
                    &format!("j{i}"),
                    (next() % 3) as i32,
                    i,
                    [1, 2, 4, 8, 16][(next() % 5) as usize],
                    kind,
                )
            })
            .collect();
        let r = place(&queue, &cluster);
        assert_eq!(r.assignments.len() + r.waiting.len(), queue.len());
        let busy: HashSet<(String, u32)> = cluster
            .workers
            .iter()
            .flat_map(|w| {
                w.slots
                    .iter()
                    .filter(|s| s.busy)
                    .map(|s| (w.id.clone(), s.index))
            })
            .collect();
        let by_id: std::collections::HashMap<&str, &QueuedJob> =
            queue.iter().map(|j| (j.id.as_str(), j)).collect();
        let mut used = HashSet::new();
        for a in &r.assignments {
            let j = by_id[a.job_id.as_str()];
            assert_eq!(a.ranks.len() as u32, j.ranks);
            for s in &a.ranks {
                assert!(
                    used.insert((s.worker_id.clone(), s.device_index)),
                    "slot given twice"
                );
                assert!(!busy.contains(&(s.worker_id.clone(), s.device_index)));
                assert!(j.device_kind.is_empty() || j.device_kind == s.device_kind);
            }
        }
        assert!(!r.assignments.is_empty() && !r.waiting.is_empty());
    }
}
