//! Placement: a pure function from (queue, cluster) to assignments.
//!
//! Rules, in order:
//! 1. **Priority**: higher `priority` first; first-in first-out (by submit time, then id)
//!    within a priority. One pass walks the queue once in that order.
//! 2. **Gang**: every rank of a job is placed in the same pass, or none is. No job ever
//!    holds part of its gang, so two large jobs cannot deadlock each other half-placed.
//! 3. **Device kind**: a rank only gets a slot of the job's `device_kind` (`""` = any kind).
//! 4. **Best fit onto the fewest workers** (`ranks_per_worker = 0`): if one worker can take
//!    the whole gang, the one whose free slots of that kind fit it most tightly wins (fewest
//!    leftover slots, ties to the earlier worker). Otherwise the gang is spread over the
//!    fewest workers: take the worker with the most free slots, repeat, and best-fit the
//!    remainder.
//! 5. **Ranks per worker** (`ranks_per_worker = k > 0`): the gang uses `ranks / k` distinct
//!    workers with exactly `k` slots each, the workers whose free slots (at least `k`) fit
//!    `k` most tightly. `k` must divide `ranks` (checked at submit; a job that breaks it
//!    waits with that reason).
//! 6. **Consecutive ranks per worker**: the ranks on one worker get consecutive numbers and
//!    rank order follows the order the workers were picked in, so ring neighbours are
//!    mostly on the same host.
//! 7. **Reservation** (what Slurm reports as `Reason=Resources`): a job that does not fit
//!    now gets a reservation — the workers it will use once they drain: the fewest whose
//!    slots of its kind, free or busy, cover the gang (for `ranks_per_worker = k`, `ranks /
//!    k` workers with at least `k` slots), preferring the ones with the most free slots now,
//!    then the earlier worker. Their free slots of that kind are *held*: no job later in the
//!    pass may take them. Blocked jobs get reservations in queue order, from capacity no
//!    earlier reservation took, at most [`MAX_RESERVATIONS_PER_KIND`] per device kind (and
//!    as many for `""`) per pass; a blocked job that gets none just waits. From pass to
//!    pass the free slots on a job's reserved workers only grow as their jobs end (only
//!    jobs ahead of it in the queue may take them), so the first blocked job starts at the
//!    latest when its reserved workers have drained, however many small jobs keep
//!    arriving.
//! 8. **Backfill**: jobs behind a blocked job are still placed in the same pass, but only
//!    on free slots no reservation holds. A job that would fit if it were not for the held
//!    slots waits behind that reservation (what Slurm reports as `Reason=Priority`) and
//!    says whose. A job that can never fit the cluster is rejected at submit
//!    ([`fits_ever`]).
//!
//! There are no run-time estimates, so a reservation is not a start time: it only keeps a
//! job's future workers from being refilled. Reservations are recomputed on every pass from
//! (queue, cluster) alone; nothing is remembered between passes.
//!
//! Cost: free capacity is indexed per device kind in ordered sets keyed by
//! `(free slots, worker)`, so a best-fit lookup is `O(log workers)`; a reservation scans the
//! workers once (`O(workers)`, at most [`MAX_RESERVATIONS_PER_KIND`] per kind per pass), and
//! a blocked job that gets none costs `O(1)`. A pass is about
//! `O(jobs log jobs + jobs · log workers + slots + reservations · workers)`.
//!
//! This file depends only on `std` and `trainyard_proto` (the placement benchmark compiles
//! it directly).

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use trainyard_proto::JobSpec;

/// Most reservations one pass makes per device kind (and as many for jobs of any kind).
/// Blocked jobs further down the queue wait without one until a reservation ahead of them
/// is gone, so reservations never hold most of a cluster for jobs far down the queue.
pub const MAX_RESERVATIONS_PER_KIND: usize = 16;

/// The end of the waiting reason of a blocked job that got no reservation because the
/// workers that could take it are all reserved.
const NO_RESERVATION_CAPACITY: &str =
    "; no reservation yet (the workers it could use are reserved for jobs ahead of it)";

/// Worker ids a waiting reason names before it says "and N more".
const NAMED_WORKERS: usize = 4;

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
    /// Ranks on each worker the gang uses; 0 = any split (fewest workers).
    pub ranks_per_worker: u32,
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

/// Capacity a blocked job holds in this pass: the workers it will use once they drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The blocked job.
    pub job_id: String,
    /// The reserved workers, in the order they were picked.
    pub worker_ids: Vec<String>,
    /// Free slots of the job's kind on those workers that no later job may take.
    pub held_slots: Vec<(String, u32)>,
}

/// Outcome of one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementResult {
    /// Jobs placed, in placement order.
    pub assignments: Vec<Assignment>,
    /// Every queued job not placed, with its reason, in queue order.
    pub waiting: Vec<Waiting>,
    /// The reservations of blocked jobs, in queue order.
    pub reservations: Vec<Reservation>,
}

fn slots_label(kind: &str) -> String {
    if kind.is_empty() {
        "slots".to_string()
    } else {
        format!("{kind} slots")
    }
}

/// `"w-a, w-b"`, or `"w-a, w-b, w-c, w-d and 3 more"`.
fn name_workers(ids: &[String]) -> String {
    let mut out = ids
        .iter()
        .take(NAMED_WORKERS)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > NAMED_WORKERS {
        let _ = write!(out, " and {} more", ids.len() - NAMED_WORKERS);
    }
    out
}

/// Why a job's `ranks_per_worker` can never work, if it cannot.
fn bad_split(ranks: u32, per_worker: u32) -> Option<String> {
    if per_worker == 0 {
        None
    } else if per_worker > ranks {
        Some(format!(
            "ranks_per_worker {per_worker} is more than the job's {ranks} rank(s)"
        ))
    } else if !ranks.is_multiple_of(per_worker) {
        Some(format!(
            "ranks_per_worker {per_worker} does not divide the job's {ranks} ranks"
        ))
    } else {
        None
    }
}

/// Checks that a gang could fit the cluster if it were idle: enough slots of the kind in
/// total and, with `ranks_per_worker = k`, enough workers with at least `k` slots of the
/// kind. `Err` carries the reason (for a FailedPrecondition at submit).
pub fn fits_ever(spec: &JobSpec, cluster: &ClusterView) -> Result<(), String> {
    let ranks = spec.ranks.max(1);
    let kind = spec.device_kind.as_str();
    let per_worker = spec.ranks_per_worker;
    if let Some(why) = bad_split(ranks, per_worker) {
        return Err(why);
    }
    let of_kind = |w: &WorkerView| {
        w.slots
            .iter()
            .filter(|s| kind.is_empty() || s.kind == kind)
            .count()
    };
    let total: usize = cluster.workers.iter().map(of_kind).sum();
    if (ranks as usize) > total {
        return Err(format!(
            "the job needs {ranks} {} but the cluster has {total} in total across {} alive worker(s)",
            slots_label(kind),
            cluster.workers.len()
        ));
    }
    if let Some(needed) = ranks.checked_div(per_worker) {
        let needed = needed as usize;
        let big_enough = cluster
            .workers
            .iter()
            .filter(|w| of_kind(w) >= per_worker as usize)
            .count();
        if big_enough < needed {
            return Err(format!(
                "the job needs {needed} worker(s) with {per_worker} {} each (ranks_per_worker \
                 {per_worker}) but {big_enough} of the {} alive worker(s) have that many",
                slots_label(kind),
                cluster.workers.len()
            ));
        }
    }
    Ok(())
}

/// A slot taken or held in a pass: (worker, device index, kind).
type Slot = (usize, u32, usize);

/// Which reservations hold slots of one key, for waiting reasons.
#[derive(Debug, Clone, Copy, Default)]
struct Holders {
    /// The first reservation (index in the result) that holds slots of the key.
    first: Option<usize>,
    /// The last one counted (a reservation is counted once per key).
    last: Option<usize>,
    /// How many reservations hold slots of the key.
    count: u32,
}

/// Why a blocked job got no reservation.
enum NoReservation {
    /// [`MAX_RESERVATIONS_PER_KIND`] reservations of its kind already exist.
    Limit,
    /// The unreserved workers cannot cover it.
    Capacity,
}

/// Free capacity and reservations, indexed. Key `k < kinds.len()` is one device kind; key
/// `kinds.len()` is "any kind".
struct Index {
    kinds: Vec<String>,
    /// `free[w][k]`: visible (not held) free device indexes of kind `k` on worker `w`,
    /// highest first (pop = lowest).
    free: Vec<Vec<Vec<u32>>>,
    /// Per key: workers with visible free capacity, ordered by (free count, worker).
    sets: Vec<BTreeSet<(u32, u32)>>,
    /// Per key: visible free slots in total.
    total_free: Vec<u64>,
    /// Per key: slots in total (busy or not).
    total: Vec<u64>,
    /// `slots[w * kinds + k]`: slots of kind `k` on worker `w`, busy or not.
    slots: Vec<u32>,
    /// Per key: how many workers have how many slots of the key (busy or not).
    by_size: Vec<BTreeMap<u32, u32>>,
    /// `reserved[w * kinds + k]`: kind `k` of worker `w` is reserved for a blocked job.
    reserved: Vec<bool>,
    /// Per key: slots of workers not reserved for that key, busy or not.
    unreserved: Vec<u64>,
    /// Per key: how many workers have how many unreserved slots of the key (> 0).
    unreserved_by_size: Vec<BTreeMap<u32, u32>>,
    /// Per key: free slots held by reservations.
    held: Vec<u64>,
    /// Per key: the reservations that hold its slots.
    holders: Vec<Holders>,
    /// Per key: reservations made for jobs of that key.
    reservations_made: Vec<usize>,
}

fn count_up(map: &mut BTreeMap<u32, u32>, size: u32) {
    *map.entry(size).or_insert(0) += 1;
}

fn count_down(map: &mut BTreeMap<u32, u32>, size: u32) {
    if let Some(n) = map.get_mut(&size) {
        *n -= 1;
        if *n == 0 {
            map.remove(&size);
        }
    }
}

/// Workers with at least `size` slots in a [`Index::by_size`]-style map.
fn at_least(map: &BTreeMap<u32, u32>, size: u32) -> usize {
    map.range(size..).map(|(_, n)| *n as usize).sum()
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
        let nw = cluster.workers.len();
        let mut free = Vec::with_capacity(nw);
        let mut sets = vec![BTreeSet::new(); nk + 1];
        let mut total_free = vec![0u64; nk + 1];
        let mut total = vec![0u64; nk + 1];
        let mut slots = vec![0u32; nw * nk];
        let mut by_size = vec![BTreeMap::new(); nk + 1];
        for (wi, w) in cluster.workers.iter().enumerate() {
            let mut per_kind: Vec<Vec<u32>> = vec![Vec::new(); nk];
            for s in &w.slots {
                let k = kinds.iter().position(|k| *k == s.kind).unwrap_or(0);
                slots[wi * nk + k] += 1;
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
                let size = slots[wi * nk + k];
                if size > 0 {
                    total[k] += u64::from(size);
                    count_up(&mut by_size[k], size);
                }
            }
            if any > 0 {
                sets[nk].insert((any, wi as u32));
                total_free[nk] += u64::from(any);
            }
            let size: u32 = slots[wi * nk..(wi + 1) * nk].iter().sum();
            if size > 0 {
                total[nk] += u64::from(size);
                count_up(&mut by_size[nk], size);
            }
            free.push(per_kind);
        }
        Self {
            kinds,
            free,
            sets,
            total_free,
            unreserved: total.clone(),
            total,
            slots,
            unreserved_by_size: by_size.clone(),
            by_size,
            reserved: vec![false; nw * nk],
            held: vec![0; nk + 1],
            holders: vec![Holders::default(); nk + 1],
            reservations_made: vec![0; nk + 1],
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

    /// The kinds a key stands for.
    fn kinds_of(&self, key: usize) -> std::ops::Range<usize> {
        if key == self.kinds.len() {
            0..self.kinds.len()
        } else {
            key..key + 1
        }
    }

    fn free_of(&self, w: usize, key: usize) -> u32 {
        if key == self.kinds.len() {
            self.free[w].iter().map(|l| l.len() as u32).sum()
        } else {
            self.free[w][key].len() as u32
        }
    }

    /// Slots (busy or not) and visible free slots of `key` on worker `w` that no
    /// reservation has claimed.
    fn unreserved_of(&self, w: usize, key: usize) -> (u32, u32) {
        let nk = self.kinds.len();
        let mut size = 0;
        let mut free = 0;
        for k in self.kinds_of(key) {
            if !self.reserved[w * nk + k] {
                size += self.slots[w * nk + k];
                free += self.free[w][k].len() as u32;
            }
        }
        (size, free)
    }

    /// Takes `n` free slots of `key` on worker `w` (the caller checked they exist).
    fn take(&mut self, w: usize, key: usize, n: u32, out: &mut Vec<Slot>) {
        let nk = self.kinds.len();
        let any_before = self.free_of(w, nk);
        let mut left = n;
        for k in self.kinds_of(key) {
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
        if taken > 0 {
            self.sets[nk].remove(&(any_before, w as u32));
            if any_before - taken > 0 {
                self.sets[nk].insert((any_before - taken, w as u32));
            }
            self.total_free[nk] -= u64::from(taken);
        }
    }

    /// Places a gang of `n` on key `key`; the caller checked `total_free[key] >= n`.
    fn place_gang(&mut self, key: usize, n: u32) -> Vec<Slot> {
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

    /// Places `workers` × `per_worker` ranks on key `key`, `per_worker` on each of the
    /// workers whose free slots fit it most tightly; `None` (nothing taken) if fewer than
    /// `workers` workers have `per_worker` free.
    fn place_per_worker(
        &mut self,
        key: usize,
        workers: usize,
        per_worker: u32,
    ) -> Option<Vec<Slot>> {
        let picked: Vec<u32> = self.sets[key]
            .range((per_worker, 0)..)
            .take(workers)
            .map(|&(_, w)| w)
            .collect();
        if picked.len() < workers {
            return None;
        }
        let mut out = Vec::with_capacity(workers * per_worker as usize);
        for w in picked {
            self.take(w as usize, key, per_worker, &mut out);
        }
        Some(out)
    }

    /// Workers with at least `per_worker` visible free slots of `key`, counting up to `cap`.
    fn workers_with_free(&self, key: usize, per_worker: u32, cap: usize) -> usize {
        self.sets[key].range((per_worker, 0)..).take(cap).count()
    }

    /// Marks a reservation as holding slots of `key`.
    fn note_holder(&mut self, key: usize, reservation: usize) {
        let h = &mut self.holders[key];
        if h.last != Some(reservation) {
            h.last = Some(reservation);
            h.count += 1;
            h.first.get_or_insert(reservation);
        }
    }

    /// Reserves worker `w` for a job of `key` (reservation number `reservation`): holds up
    /// to `limit` of its visible free slots of the key and takes its unreserved slots of
    /// the key out of the reservable capacity. Returns the held slots.
    fn reserve_worker(
        &mut self,
        w: usize,
        key: usize,
        limit: u32,
        reservation: usize,
    ) -> Vec<Slot> {
        let nk = self.kinds.len();
        let (any_before, _) = self.unreserved_of(w, nk);
        let mut held = Vec::new();
        let mut left = limit;
        for k in self.kinds_of(key) {
            let i = w * nk + k;
            if self.reserved[i] || self.slots[i] == 0 {
                continue;
            }
            let n = (self.free[w][k].len() as u32).min(left);
            if n > 0 {
                let from = held.len();
                self.take(w, k, n, &mut held);
                left -= n;
                let got = (held.len() - from) as u64;
                self.held[k] += got;
                self.held[nk] += got;
                self.note_holder(k, reservation);
                self.note_holder(nk, reservation);
            }
            self.reserved[i] = true;
            self.unreserved[k] -= u64::from(self.slots[i]);
            count_down(&mut self.unreserved_by_size[k], self.slots[i]);
        }
        let (any_after, _) = self.unreserved_of(w, nk);
        if any_after != any_before {
            self.unreserved[nk] -= u64::from(any_before - any_after);
            count_down(&mut self.unreserved_by_size[nk], any_before);
            if any_after > 0 {
                count_up(&mut self.unreserved_by_size[nk], any_after);
            }
        }
        held
    }

    /// Reserves workers for a blocked gang of `n` ranks of `key` (`per_worker` ranks on
    /// each, or any split if 0): with any split, the fewest workers whose unreserved slots
    /// cover `n`, preferring the most free slots now; with `per_worker`, `n / per_worker`
    /// workers with at least `per_worker` unreserved slots, preferring the most free (up to
    /// `per_worker`), then the smallest. Ties go to the earlier worker. Returns the workers
    /// and the held slots.
    fn reserve(
        &mut self,
        key: usize,
        n: u32,
        per_worker: u32,
        reservation: usize,
    ) -> Result<(Vec<usize>, Vec<Slot>), NoReservation> {
        if self.reservations_made[key] >= MAX_RESERVATIONS_PER_KIND {
            return Err(NoReservation::Limit);
        }
        let workers = match n.checked_div(per_worker) {
            None => {
                if self.unreserved[key] < u64::from(n) {
                    return Err(NoReservation::Capacity);
                }
                self.pick_fewest(key, n).ok_or(NoReservation::Capacity)?
            }
            Some(needed) => {
                let needed = needed as usize;
                if at_least(&self.unreserved_by_size[key], per_worker) < needed {
                    return Err(NoReservation::Capacity);
                }
                self.pick_per_worker(key, needed, per_worker)
                    .ok_or(NoReservation::Capacity)?
            }
        };
        self.reservations_made[key] += 1;
        let mut held = Vec::new();
        let mut left = n;
        for &w in &workers {
            let limit = if per_worker == 0 { left } else { per_worker };
            let got = self.reserve_worker(w, key, limit, reservation);
            left -= (got.len() as u32).min(left);
            held.extend(got);
        }
        Ok((workers, held))
    }

    /// The fewest unreserved workers whose slots of `key` cover `n` (largest first), the
    /// most free first among equals, then the earlier one. The caller checked that all the
    /// unreserved workers together cover `n`.
    fn pick_fewest(&self, key: usize, n: u32) -> Option<Vec<usize>> {
        let mut cands: Vec<(u32, u32, u32)> = (0..self.free.len())
            .filter_map(|w| {
                let (size, free) = self.unreserved_of(w, key);
                (size > 0).then_some((size, free, w as u32))
            })
            .collect();
        let better = |a: &(u32, u32, u32), b: &(u32, u32, u32)| -> Ordering {
            b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2))
        };
        let largest = cands.iter().map(|c| c.0).max()?;
        // The fewest workers are the largest ones: find how many by selecting the best
        // `take` candidates, doubling `take` until they cover `n` (O(workers) per round).
        let mut take = (n.div_ceil(largest) as usize).clamp(1, cands.len());
        loop {
            if take < cands.len() {
                cands.select_nth_unstable_by(take - 1, better);
            }
            let best = &mut cands[..take];
            best.sort_unstable_by(better);
            let mut covered = 0u64;
            for (i, c) in best.iter().enumerate() {
                covered += u64::from(c.0);
                if covered >= u64::from(n) {
                    return Some(best[..=i].iter().map(|c| c.2 as usize).collect());
                }
            }
            if take == cands.len() {
                return None;
            }
            take = (take * 2).min(cands.len());
        }
    }

    /// `needed` unreserved workers with at least `per_worker` slots of `key`: the most free
    /// (up to `per_worker`) first, then the smallest, then the earlier one.
    fn pick_per_worker(&self, key: usize, needed: usize, per_worker: u32) -> Option<Vec<usize>> {
        let mut cands: Vec<(u32, u32, u32)> = (0..self.free.len())
            .filter_map(|w| {
                let (size, free) = self.unreserved_of(w, key);
                (size >= per_worker).then_some((free.min(per_worker), size, w as u32))
            })
            .collect();
        if cands.len() < needed || needed == 0 {
            return None;
        }
        let better = |a: &(u32, u32, u32), b: &(u32, u32, u32)| -> Ordering {
            b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
        };
        if needed < cands.len() {
            cands.select_nth_unstable_by(needed - 1, better);
        }
        let best = &mut cands[..needed];
        best.sort_unstable_by(better);
        Some(best.iter().map(|c| c.2 as usize).collect())
    }
}

/// One scheduling pass: which queued jobs to start now, which blocked jobs hold which
/// workers, and why the others wait.
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
    let mut result = PlacementResult::default();
    let no_reservation_limit =
        format!("; no reservation yet ({MAX_RESERVATIONS_PER_KIND} jobs ahead of it hold one)");
    // Per key: who holds its slots, as the waiting reasons say it (until the next
    // reservation).
    let mut holder_text: Vec<Option<(String, &'static str)>> = vec![None; index.kinds.len() + 1];
    for job in order {
        let n = job.ranks.max(1);
        let per_worker = job.ranks_per_worker;
        let label = slots_label(&job.device_kind);
        let mut wait = |reason: String| {
            result.waiting.push(Waiting {
                job_id: job.id.clone(),
                reason,
            })
        };
        if let Some(why) = bad_split(n, per_worker) {
            wait(format!("cannot be placed: {why}"));
            continue;
        }
        let key = index.key(&job.device_kind);
        let total = key.map_or(0, |k| index.total[k]);
        if u64::from(n) > total {
            wait(format!(
                "cannot fit the current cluster: needs {n} {label}, the alive workers have {total} in total"
            ));
            continue;
        }
        let Some(key) = key else { continue };
        // Workers a gang with ranks_per_worker needs (1 with any split: unused).
        let needed = n.checked_div(per_worker).unwrap_or(1) as usize;
        if per_worker > 0 {
            let big_enough = at_least(&index.by_size[key], per_worker);
            if big_enough < needed {
                wait(format!(
                    "cannot fit the current cluster: needs {needed} workers with {per_worker} \
                     {label} each, the alive workers have {big_enough} such worker(s)"
                ));
                continue;
            }
        }
        let placed = if per_worker == 0 {
            (index.total_free[key] >= u64::from(n)).then(|| index.place_gang(key, n))
        } else {
            index.place_per_worker(key, needed, per_worker)
        };
        if let Some(taken) = placed {
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
            continue;
        }

        // Blocked: say why (before this job's own reservation changes the counts), then
        // reserve for it.
        let free = index.total_free[key];
        let held = index.held[key];
        let mut reason = if per_worker > 0 {
            let now = index.workers_with_free(key, per_worker, needed);
            let mut r = format!(
                "waiting for {needed} workers with {per_worker} free {label} each; {now} such worker(s)"
            );
            if held > 0 {
                let (holders, _) = holder_text[key].get_or_insert_with(|| {
                    describe_holders(&index.holders[key], &result.reservations)
                });
                let _ = write!(r, " ({held} free {label} held for {holders})");
            }
            r
        } else if held == 0 {
            format!("waiting for {n} free {label}; {free} free")
        } else {
            let (holders, them) = holder_text[key]
                .get_or_insert_with(|| describe_holders(&index.holders[key], &result.reservations));
            if free + held >= u64::from(n) {
                format!("waiting for {n} free {label} behind {holders}: {free} free, {held} more held for {them}")
            } else {
                format!(
                    "waiting for {n} free {label}; {free} free ({held} more held for {holders})"
                )
            }
        };
        let number = result.reservations.len();
        match index.reserve(key, n, per_worker, number) {
            Ok((workers, held_slots)) => {
                holder_text.iter_mut().for_each(|t| *t = None);
                let worker_ids: Vec<String> = workers
                    .iter()
                    .map(|&w| cluster.workers[w].id.clone())
                    .collect();
                // A reservation that holds nothing now changes nothing for the jobs behind
                // it in this pass; the reason only mentions one that does.
                if !held_slots.is_empty() {
                    let _ = write!(
                        reason,
                        "; reserving {} for it ({} free {label} held)",
                        name_workers(&worker_ids),
                        held_slots.len()
                    );
                }
                result.reservations.push(Reservation {
                    job_id: job.id.clone(),
                    worker_ids,
                    held_slots: held_slots
                        .into_iter()
                        .map(|(w, idx, _)| (cluster.workers[w].id.clone(), idx))
                        .collect(),
                });
            }
            Err(NoReservation::Limit) => reason.push_str(&no_reservation_limit),
            Err(NoReservation::Capacity) => reason.push_str(NO_RESERVATION_CAPACITY),
        }
        result.waiting.push(Waiting {
            job_id: job.id.clone(),
            reason,
        });
    }
    result
}

/// The reservations that hold slots of a key, and the pronoun for them: ("job-x's
/// reservation", "it") or ("the reservations of job-x and 2 more job(s)", "them").
fn describe_holders(h: &Holders, reservations: &[Reservation]) -> (String, &'static str) {
    let Some(first) = h.first.and_then(|i| reservations.get(i)) else {
        return ("reservations".to_string(), "them");
    };
    if h.count <= 1 {
        (format!("{}'s reservation", first.job_id), "it")
    } else {
        (
            format!(
                "the reservations of {} and {} more job(s)",
                first.job_id,
                h.count - 1
            ),
            "them",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

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
            ranks_per_worker: 0,
            device_kind: kind.to_string(),
        }
    }

    fn split(mut j: QueuedJob, per_worker: u32) -> QueuedJob {
        j.ranks_per_worker = per_worker;
        j
    }

    fn placed_ids(r: &PlacementResult) -> Vec<&str> {
        r.assignments.iter().map(|a| a.job_id.as_str()).collect()
    }

    fn workers_of(a: &Assignment) -> HashSet<&str> {
        a.ranks.iter().map(|r| r.worker_id.as_str()).collect()
    }

    /// Ranks per worker, by worker id.
    fn ranks_by_worker(a: &Assignment) -> HashMap<&str, Vec<u32>> {
        let mut by: HashMap<&str, Vec<u32>> = HashMap::new();
        for r in &a.ranks {
            by.entry(r.worker_id.as_str()).or_default().push(r.rank);
        }
        by
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

    fn reservation<'a>(r: &'a PlacementResult, id: &str) -> &'a Reservation {
        r.reservations
            .iter()
            .find(|v| v.job_id == id)
            .expect("reserved")
    }

    /// Every rank on its own free slot of the right kind, the gang complete, ranks 0..n in
    /// order, consecutive on each worker, and no held slot given away.
    fn check_valid(r: &PlacementResult, queue: &[QueuedJob], cluster: &ClusterView) {
        let busy: HashSet<(&str, u32)> = cluster
            .workers
            .iter()
            .flat_map(|w| {
                w.slots
                    .iter()
                    .filter(|s| s.busy)
                    .map(move |s| (w.id.as_str(), s.index))
            })
            .collect();
        let by_id: HashMap<&str, &QueuedJob> = queue.iter().map(|j| (j.id.as_str(), j)).collect();
        let mut used = HashSet::new();
        for v in &r.reservations {
            for (w, i) in &v.held_slots {
                assert!(!busy.contains(&(w.as_str(), *i)), "busy slot held");
                assert!(used.insert((w.as_str(), *i)), "slot held twice");
            }
        }
        for a in &r.assignments {
            let j = by_id[a.job_id.as_str()];
            assert_eq!(a.ranks.len() as u32, j.ranks, "{}: whole gang", a.job_id);
            let ranks: Vec<u32> = a.ranks.iter().map(|s| s.rank).collect();
            assert_eq!(ranks, (0..j.ranks).collect::<Vec<_>>());
            let mut seen_workers: Vec<&str> = Vec::new();
            for s in &a.ranks {
                assert!(
                    used.insert((s.worker_id.as_str(), s.device_index)),
                    "{}: slot {}/{} given twice or held",
                    a.job_id,
                    s.worker_id,
                    s.device_index
                );
                assert!(!busy.contains(&(s.worker_id.as_str(), s.device_index)));
                assert!(j.device_kind.is_empty() || j.device_kind == s.device_kind);
                if seen_workers.last() != Some(&s.worker_id.as_str()) {
                    assert!(
                        !seen_workers.contains(&s.worker_id.as_str()),
                        "{}: ranks on {} are not consecutive",
                        a.job_id,
                        s.worker_id
                    );
                    seen_workers.push(&s.worker_id);
                }
            }
            if j.ranks_per_worker > 0 {
                for (w, ranks) in ranks_by_worker(a) {
                    assert_eq!(ranks.len() as u32, j.ranks_per_worker, "{}: {w}", a.job_id);
                }
            }
        }
        assert_eq!(r.assignments.len() + r.waiting.len(), queue.len());
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
        // 6 free in total: an 8-gang must not be partially placed; it holds the six.
        let r = place(&[job("big", 9, 1, 8, "gpu")], &cluster);
        assert!(r.assignments.is_empty());
        assert_eq!(
            reason(&r, "big"),
            "waiting for 8 free gpu slots; 6 free; reserving w1, w2 for it (6 free gpu slots held)"
        );
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
    fn a_multi_worker_gang_fills_whole_workers_with_consecutive_ranks() {
        // 8 ranks over 4 workers x 2 free slots: all four, two consecutive ranks on each.
        let cluster = ClusterView {
            workers: (0..4)
                .map(|i| worker(&format!("w{i}"), "gpu", 4, 2))
                .collect(),
        };
        let q = [job("eight", 0, 1, 8, "gpu")];
        let r = place(&q, &cluster);
        check_valid(&r, &q, &cluster);
        let by = ranks_by_worker(assignment(&r, "eight"));
        assert_eq!(by.len(), 4);
        for ranks in by.values() {
            assert_eq!(ranks.len(), 2);
            assert_eq!(ranks[1], ranks[0] + 1, "consecutive: {ranks:?}");
        }
        // 16 ranks on 8-slot workers with 3, 5, 8 and 8 free: two whole workers, ranks
        // 0..8 on one and 8..16 on the other, in device order.
        let cluster = ClusterView {
            workers: vec![
                worker("a", "gpu", 8, 5),
                worker("b", "gpu", 8, 3),
                worker("c", "gpu", 8, 0),
                worker("d", "gpu", 8, 0),
            ],
        };
        let q = [job("sixteen", 0, 1, 16, "gpu")];
        let r = place(&q, &cluster);
        check_valid(&r, &q, &cluster);
        let a = assignment(&r, "sixteen");
        assert_eq!(workers_of(a), HashSet::from(["c", "d"]));
        let by = ranks_by_worker(a);
        let mut blocks: Vec<Vec<u32>> = by.into_values().collect();
        blocks.sort();
        assert_eq!(blocks[0], (0..8).collect::<Vec<_>>());
        assert_eq!(blocks[1], (8..16).collect::<Vec<_>>());
        let devices: Vec<u32> = a.ranks[..8].iter().map(|s| s.device_index).collect();
        assert_eq!(devices, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn ranks_per_worker_uses_that_many_workers_with_exactly_k_each() {
        let cluster = ClusterView {
            workers: vec![
                worker("big", "gpu", 4, 0),
                worker("w3", "gpu", 4, 1),
                worker("w2", "gpu", 4, 2),
            ],
        };
        // Any split: one worker with 4 free takes all four.
        let r = place(&[job("any", 0, 1, 4, "gpu")], &cluster);
        assert_eq!(workers_of(assignment(&r, "any")), HashSet::from(["big"]));
        // Two per worker: two workers, the tightest ones (2 and 3 free), not the one with 4.
        let q = [split(job("two", 0, 1, 4, "gpu"), 2)];
        let r = place(&q, &cluster);
        check_valid(&r, &q, &cluster);
        let a = assignment(&r, "two");
        assert_eq!(workers_of(a), HashSet::from(["w2", "w3"]));
        let by = ranks_by_worker(a);
        assert_eq!(by["w2"], [0, 1], "tightest worker first, consecutive ranks");
        assert_eq!(by["w3"], [2, 3]);
        // Four per worker: exactly the one with 4 free.
        let r = place(&[split(job("four", 0, 1, 4, "gpu"), 4)], &cluster);
        assert_eq!(workers_of(assignment(&r, "four")), HashSet::from(["big"]));
        // One per worker: 3 ranks on three distinct workers.
        let q = [split(job("ones", 0, 1, 3, "gpu"), 1)];
        let r = place(&q, &cluster);
        check_valid(&r, &q, &cluster);
        assert_eq!(workers_of(assignment(&r, "ones")).len(), 3);
    }

    #[test]
    fn ranks_per_worker_waits_for_whole_workers_even_with_enough_free_slots() {
        // 5 free slots, but only one worker with 2 free: a 4-rank job with 2 per worker
        // waits (and reserves), while the same job with any split is placed.
        let cluster = ClusterView {
            workers: vec![
                worker("w1", "gpu", 2, 0),
                worker("w2", "gpu", 2, 1),
                worker("w3", "gpu", 2, 1),
                worker("w4", "gpu", 2, 1),
            ],
        };
        let r = place(&[split(job("pairs", 0, 1, 4, "gpu"), 2)], &cluster);
        assert!(r.assignments.is_empty());
        assert_eq!(
            reason(&r, "pairs"),
            "waiting for 2 workers with 2 free gpu slots each; 1 such worker(s); reserving w1, \
             w2 for it (3 free gpu slots held)"
        );
        let v = reservation(&r, "pairs");
        assert_eq!(v.worker_ids, ["w1", "w2"]);
        assert_eq!(v.held_slots.len(), 3);
        let r = place(&[job("loose", 0, 1, 4, "gpu")], &cluster);
        assert_eq!(assignment(&r, "loose").ranks.len(), 4);
        // Never enough workers that big: the reason says the cluster cannot take it.
        let r = place(&[split(job("quads", 0, 1, 8, "gpu"), 4)], &cluster);
        assert_eq!(
            reason(&r, "quads"),
            "cannot fit the current cluster: needs 2 workers with 4 gpu slots each, the alive \
             workers have 0 such worker(s)"
        );
        // A split that does not divide the gang waits with that reason (validation rejects
        // it at submit; placement must not panic on one that got through).
        let r = place(&[split(job("odd", 0, 1, 3, "gpu"), 2)], &cluster);
        assert_eq!(
            reason(&r, "odd"),
            "cannot be placed: ranks_per_worker 2 does not divide the job's 3 ranks"
        );
        let r = place(&[split(job("wide", 0, 1, 2, "gpu"), 4)], &cluster);
        assert!(reason(&r, "wide").contains("more than the job's 2 rank(s)"));
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
        // g2's reservation of gpu1 holds no cpu slot: "any" still gets the last cpu.
        assert_eq!(assignment(&r, "any").ranks[0].worker_id, "cpu1");
        // A kind no worker has waits with a reason.
        let r = place(&[job("tpu", 0, 1, 1, "tpu")], &cluster);
        assert!(reason(&r, "tpu").contains("cannot fit the current cluster"));
    }

    #[test]
    fn small_jobs_backfill_around_a_reservation_but_not_into_it() {
        // big (4) cannot fit: it reserves w1 (the most free, 2) and holds its two free
        // slots. tiny (1) fits the unreserved w2: it is backfilled. small (2) would fit w1
        // only: it waits behind big's reservation.
        let cluster = ClusterView {
            workers: vec![worker("w1", "gpu", 4, 2), worker("w2", "gpu", 4, 3)],
        };
        let q = [
            job("big", 10, 1, 4, "gpu"),
            job("tiny", 0, 2, 1, "gpu"),
            job("small", 0, 3, 2, "gpu"),
        ];
        let r = place(&q, &cluster);
        check_valid(&r, &q, &cluster);
        assert_eq!(placed_ids(&r), ["tiny"]);
        assert_eq!(workers_of(assignment(&r, "tiny")), HashSet::from(["w2"]));
        assert_eq!(
            reason(&r, "big"),
            "waiting for 4 free gpu slots; 3 free; reserving w1 for it (2 free gpu slots held)"
        );
        assert_eq!(
            reservation(&r, "big").held_slots,
            [("w1".to_string(), 2), ("w1".to_string(), 3)]
        );
        assert_eq!(
            reason(&r, "small"),
            "waiting for 2 free gpu slots behind big's reservation: 0 free, 2 more held for it"
        );
        // Without the big job, small is placed on w1 at once.
        let r = place(&q[2..], &cluster);
        assert_eq!(workers_of(assignment(&r, "small")), HashSet::from(["w1"]));
    }

    #[test]
    fn two_big_jobs_never_half_place_and_the_first_gets_its_reservation() {
        // 7 free slots; two 8-rank jobs. Neither gets any slot; the first reserves the two
        // workers with the most free slots, the second the other two; a 1-rank job behind
        // both waits behind their reservations.
        let mut cluster = ClusterView {
            workers: vec![
                worker("w1", "gpu", 4, 1),
                worker("w2", "gpu", 4, 1),
                worker("w3", "gpu", 4, 3),
                worker("w4", "gpu", 4, 4),
            ],
        };
        let q = [
            job("a", 0, 1, 8, "gpu"),
            job("b", 0, 2, 8, "gpu"),
            job("c", 0, 3, 1, "gpu"),
        ];
        let r = place(&q, &cluster);
        check_valid(&r, &q, &cluster);
        assert!(r.assignments.is_empty(), "no partial gang: {r:?}");
        assert_eq!(reservation(&r, "a").worker_ids, ["w1", "w2"]);
        assert_eq!(reservation(&r, "a").held_slots.len(), 6);
        assert_eq!(reservation(&r, "b").worker_ids, ["w3", "w4"]);
        assert_eq!(
            reason(&r, "b"),
            "waiting for 8 free gpu slots; 1 free (6 more held for a's reservation); \
             reserving w3, w4 for it (1 free gpu slots held)"
        );
        assert_eq!(
            reason(&r, "c"),
            "waiting for 1 free gpu slots behind the reservations of a and 1 more job(s): 0 \
             free, 7 more held for them; no reservation yet (the workers it could use are \
             reserved for jobs ahead of it)"
        );
        // The busy slots of w1 and w2 free: a starts on them, whole; b keeps waiting (it got
        // nothing in the meantime) and holds w3's free slot; c still waits behind it.
        cluster.workers[0].slots[0].busy = false;
        cluster.workers[1].slots[0].busy = false;
        let r = place(&q, &cluster);
        check_valid(&r, &q, &cluster);
        assert_eq!(placed_ids(&r), ["a"]);
        assert_eq!(workers_of(assignment(&r, "a")), HashSet::from(["w1", "w2"]));
        // w3 has the only free slot; the rest are all busy, ties go to the earlier worker.
        assert_eq!(reservation(&r, "b").worker_ids, ["w3", "w1"]);
        assert_eq!(
            reason(&r, "c"),
            "waiting for 1 free gpu slots behind b's reservation: 0 free, 1 more held for it"
        );
        // c reserved w2 (the earliest left), where nothing is free to hold.
        assert_eq!(reservation(&r, "c").worker_ids, ["w2"]);
        assert!(reservation(&r, "c").held_slots.is_empty());
    }

    #[test]
    fn priority_decides_who_reserves_first() {
        // A high-priority job submitted later reserves before an older low-priority one.
        let cluster = ClusterView {
            workers: vec![
                worker("w1", "gpu", 8, 4),
                worker("w2", "gpu", 8, 6),
                worker("w3", "gpu", 8, 8),
            ],
        };
        let q = [
            job("old-low", 0, 1, 16, "gpu"),
            job("new-high", 5, 2, 16, "gpu"),
        ];
        let r = place(&q, &cluster);
        check_valid(&r, &q, &cluster);
        assert_eq!(r.reservations[0].job_id, "new-high");
        assert_eq!(r.reservations[0].worker_ids, ["w1", "w2"]);
        assert!(reason(&r, "old-low").contains("6 more held for new-high's reservation"));
        assert!(
            reason(&r, "old-low").contains("no reservation yet"),
            "only w3 is left: {}",
            reason(&r, "old-low")
        );
    }

    #[test]
    fn reservations_are_limited_per_kind() {
        let n = MAX_RESERVATIONS_PER_KIND + 2;
        let cluster = ClusterView {
            workers: (0..n)
                .map(|i| worker(&format!("w{i:02}"), "gpu", 2, 2))
                .chain([worker("c0", "cpu", 1, 1)])
                .collect(),
        };
        let mut q: Vec<QueuedJob> = (0..n)
            .map(|i| job(&format!("j{i:02}"), 0, i as i64, 1, "gpu"))
            .collect();
        q.push(job("cpu-job", 0, 100, 1, "cpu"));
        let r = place(&q, &cluster);
        assert_eq!(r.reservations.len(), MAX_RESERVATIONS_PER_KIND + 1);
        let last = format!("j{:02}", MAX_RESERVATIONS_PER_KIND);
        assert!(
            reason(&r, &last).ends_with(&format!(
                "no reservation yet ({MAX_RESERVATIONS_PER_KIND} jobs ahead of it hold one)"
            )),
            "{}",
            reason(&r, &last)
        );
        // Another kind has its own limit.
        assert_eq!(r.reservations.last().unwrap().job_id, "cpu-job");
    }

    /// A running job of a [`Sim`]: its id, its slots (worker, slot) and the pass it ends at.
    type Running = (String, Vec<(usize, usize)>, u32);

    /// A small cluster run pass by pass: jobs hold their slots for a number of passes.
    struct Sim {
        cluster: ClusterView,
        running: Vec<Running>,
    }

    impl Sim {
        fn release(&mut self, pass: u32) {
            let cluster = &mut self.cluster;
            self.running.retain(|(_, slots, end)| {
                if *end > pass {
                    return true;
                }
                for &(w, s) in slots {
                    cluster.workers[w].slots[s].busy = false;
                }
                false
            });
        }

        fn start(&mut self, a: &Assignment, ends: u32) {
            let mut slots = Vec::new();
            for r in &a.ranks {
                let w = self
                    .cluster
                    .workers
                    .iter()
                    .position(|w| w.id == r.worker_id)
                    .unwrap();
                let s = self.cluster.workers[w]
                    .slots
                    .iter()
                    .position(|s| s.index == r.device_index)
                    .unwrap();
                assert!(!self.cluster.workers[w].slots[s].busy);
                self.cluster.workers[w].slots[s].busy = true;
                slots.push((w, s));
            }
            self.running.push((a.job_id.clone(), slots, ends));
        }
    }

    #[test]
    fn a_large_job_is_not_starved_by_a_stream_of_small_jobs() {
        // 4 workers x 4 gpu slots, all busy with jobs that end one slot per worker per
        // pass. An 8-rank job waits at the head of the queue; 6 one-rank jobs of 4 passes
        // arrive every pass, more than the cluster drains, so without a reservation every
        // freed slot would go to a small job and the large one would never see 8 free.
        let mut sim = Sim {
            cluster: ClusterView {
                workers: (0..4)
                    .map(|i| worker(&format!("w{i}"), "gpu", 4, 4))
                    .collect(),
            },
            running: Vec::new(),
        };
        for w in 0..4 {
            for s in 0..4 {
                sim.running
                    .push((format!("old-{w}-{s}"), vec![(w, s)], s as u32 + 1));
            }
        }
        let mut queue = vec![job("large", 0, 0, 8, "gpu")];
        let mut large_started = None;
        let mut backfilled_while_waiting = 0;
        for pass in 1..=40u32 {
            sim.release(pass);
            for i in 0..6 {
                let id = format!("small-{pass}-{i}");
                queue.push(job(&id, 0, i64::from(pass) * 10 + i, 1, "gpu"));
            }
            let r = place(&queue, &sim.cluster);
            check_valid(&r, &queue, &sim.cluster);
            let large_placed = placed_ids(&r).contains(&"large");
            if large_started.is_none() && !large_placed {
                let v = reservation(&r, "large");
                assert_eq!(v.worker_ids.len(), 2, "fewest workers: 2 x 4 slots");
                for a in &r.assignments {
                    if a.job_id != "large" {
                        backfilled_while_waiting += 1;
                        for s in &a.ranks {
                            assert!(
                                !v.held_slots
                                    .contains(&(s.worker_id.clone(), s.device_index)),
                                "{} took a held slot",
                                a.job_id
                            );
                        }
                    }
                }
            }
            for a in &r.assignments {
                if a.job_id == "large" {
                    large_started = Some(pass);
                }
                sim.start(a, pass + 4);
            }
            let placed: HashSet<&str> = placed_ids(&r).into_iter().collect();
            queue.retain(|j| !placed.contains(j.id.as_str()));
        }
        // Its reserved workers drain in 4 passes at most; it may start sooner, on free
        // slots elsewhere too.
        let started = large_started.expect("the large job never started");
        assert!(started <= 4, "the large job waited until pass {started}");
        assert!(
            backfilled_while_waiting >= 4,
            "small jobs still ran on the unreserved workers ({backfilled_while_waiting})"
        );
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
    fn fits_ever_counts_workers_big_enough_for_ranks_per_worker() {
        let cluster = ClusterView {
            workers: vec![
                worker("w1", "gpu", 4, 4),
                worker("w2", "gpu", 4, 0),
                worker("w3", "gpu", 2, 0),
                worker("w4", "cpu", 4, 0),
            ],
        };
        let spec = |ranks, per_worker, kind: &str| JobSpec {
            ranks,
            ranks_per_worker: per_worker,
            device_kind: kind.to_string(),
            ..Default::default()
        };
        // 8 gpu ranks, 4 per worker: w1 and w2 (busy slots count).
        assert_eq!(fits_ever(&spec(8, 4, "gpu"), &cluster), Ok(()));
        // 6 gpu ranks, 2 per worker: three workers with >= 2.
        assert_eq!(fits_ever(&spec(6, 2, "gpu"), &cluster), Ok(()));
        // 10 slots of gpu exist, but only two workers with 4 of them.
        assert_eq!(
            fits_ever(&spec(12, 4, "gpu"), &cluster),
            Err(
                "the job needs 12 gpu slots but the cluster has 10 in total across 4 alive \
                 worker(s)"
                    .to_string()
            )
        );
        assert_eq!(
            fits_ever(&spec(9, 3, "gpu"), &cluster),
            Err(
                "the job needs 3 worker(s) with 3 gpu slots each (ranks_per_worker 3) but 2 \
                 of the 4 alive worker(s) have that many"
                    .to_string()
            )
        );
        // Any kind: w4's cpu slots count.
        assert_eq!(fits_ever(&spec(12, 4, ""), &cluster), Ok(()));
        assert!(fits_ever(&spec(16, 4, ""), &cluster).is_err());
        assert!(fits_ever(&spec(6, 4, "gpu"), &cluster)
            .unwrap_err()
            .contains("does not divide"));
    }

    #[test]
    fn no_slot_is_given_twice_and_busy_slots_are_never_used() {
        // A deterministic pseudo-random mix, with and without ranks_per_worker.
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
                let ranks = [1, 2, 4, 8, 16][(next() % 5) as usize];
                let per_worker = [0, 0, 1, 2, 4, 8][(next() % 6) as usize];
                let j = job(&format!("j{i}"), (next() % 3) as i32, i, ranks, kind);
                split(j, if per_worker <= ranks { per_worker } else { 0 })
            })
            .collect();
        let r = place(&queue, &cluster);
        check_valid(&r, &queue, &cluster);
        assert!(!r.assignments.is_empty() && !r.waiting.is_empty());
        assert!(r.assignments.iter().any(|a| queue
            .iter()
            .any(|j| j.id == a.job_id && j.ranks_per_worker > 1)));
        assert!(!r.reservations.is_empty());
        // Deterministic: the same input gives the same output.
        assert_eq!(place(&queue, &cluster), r);
    }
}
