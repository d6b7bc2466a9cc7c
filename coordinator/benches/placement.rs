//! Placement at scale, two scenarios, each timed as one scheduling pass of
//! `placement::place` (median of several runs):
//!
//! 1. 1,000 workers x 8 GPU slots (about a third already busy) and 10,000 pending jobs with
//!    gang sizes 1, 2, 4, 8 and 16, against a naive first-fit baseline on the same input
//!    (placements per second and the ratio).
//! 2. Multi-worker gangs: 2,000 workers x 8 GPU slots (about half busy) and 3,000 pending
//!    jobs, most of 8 to 64 ranks (a third of those with `ranks_per_worker` 4 or 8), so
//!    that most gangs span workers and many blocked jobs get reservations.
//!
//! Run: `cargo bench -p trainyard-coordinator --bench placement`.

use std::time::{Duration, Instant};

// The placement function is pure and depends only on std and trainyard_proto: compile it
// here directly (`fits_ever` is not benchmarked).
#[allow(dead_code)]
#[path = "../src/scheduler/placement.rs"]
mod placement;

use placement::{place, ClusterView, PlacementResult, QueuedJob, SlotView, WorkerView};

const WORKERS: usize = 1_000;
const SLOTS: u32 = 8;
const JOBS: usize = 10_000;
const RUNS: usize = 11;

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

/// `workers` workers named `<prefix>-<n>` of 8 GPU slots, each with `0..max_busy` of them
/// busy (drawn from `rng`).
fn random_cluster(rng: &mut Lcg, workers: usize, prefix: &str, max_busy: u32) -> ClusterView {
    ClusterView {
        workers: (0..workers)
            .map(|w| {
                let busy = rng.next() % max_busy;
                WorkerView {
                    id: format!("{prefix}-{w:04}"),
                    slots: (0..SLOTS)
                        .map(|i| SlotView {
                            index: i,
                            kind: "gpu".to_string(),
                            busy: i < busy,
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

fn cluster(rng: &mut Lcg) -> ClusterView {
    // 0..=5 of 8 slots busy: about 31% of the cluster is occupied.
    random_cluster(rng, WORKERS, "w", 6)
}

fn queue(rng: &mut Lcg) -> Vec<QueuedJob> {
    (0..JOBS)
        .map(|i| {
            let r = rng.next() % 100;
            let ranks = match r {
                0..=39 => 1,
                40..=64 => 2,
                65..=79 => 4,
                80..=91 => 8,
                _ => 16,
            };
            QueuedJob {
                id: format!("job-{i:06}"),
                priority: (rng.next() % 4) as i32,
                submitted_unix_ms: i as i64,
                ranks,
                ranks_per_worker: 0,
                device_kind: if rng.next().is_multiple_of(4) {
                    String::new()
                } else {
                    "gpu".to_string()
                },
            }
        })
        .collect()
}

/// The anchor: priority order, gang all-or-nothing, but no index — scan the workers in
/// order for every job and take free slots first-fit.
fn naive_first_fit(queue: &[QueuedJob], cluster: &ClusterView) -> usize {
    let mut order: Vec<&QueuedJob> = queue.iter().collect();
    order.sort_by(|a, b| {
        (std::cmp::Reverse(a.priority), a.submitted_unix_ms, &a.id).cmp(&(
            std::cmp::Reverse(b.priority),
            b.submitted_unix_ms,
            &b.id,
        ))
    });
    let mut busy: Vec<Vec<bool>> = cluster
        .workers
        .iter()
        .map(|w| w.slots.iter().map(|s| s.busy).collect())
        .collect();
    let mut placed = 0;
    for job in order {
        let mut picked: Vec<(usize, usize)> = Vec::new();
        'scan: for (wi, w) in cluster.workers.iter().enumerate() {
            for (si, s) in w.slots.iter().enumerate() {
                if !busy[wi][si] && (job.device_kind.is_empty() || s.kind == job.device_kind) {
                    picked.push((wi, si));
                    if picked.len() == job.ranks as usize {
                        break 'scan;
                    }
                }
            }
        }
        if picked.len() == job.ranks as usize {
            for (wi, si) in picked {
                busy[wi][si] = true;
            }
            placed += 1;
        }
    }
    placed
}

const GANG_WORKERS: usize = 2_000;
const GANG_JOBS: usize = 3_000;

/// Scenario 2's cluster: 8 GPU slots per worker, 0..=8 busy (about half).
fn gang_cluster(rng: &mut Lcg) -> ClusterView {
    random_cluster(rng, GANG_WORKERS, "g", 9)
}

/// Scenario 2's queue: 30% small (1-4 ranks), 40% 8 or 16 ranks, 30% 32 or 64 ranks; a
/// third of the gangs of 8 or more ask for 4 or 8 ranks per worker.
fn gang_queue(rng: &mut Lcg) -> Vec<QueuedJob> {
    (0..GANG_JOBS)
        .map(|i| {
            let ranks = match rng.next() % 100 {
                0..=9 => 1,
                10..=19 => 2,
                20..=29 => 4,
                30..=49 => 8,
                50..=69 => 16,
                70..=84 => 32,
                _ => 64,
            };
            let ranks_per_worker = if ranks >= 8 {
                [0, 0, 0, 0, 4, 8][(rng.next() % 6) as usize]
            } else {
                0
            };
            QueuedJob {
                id: format!("gang-{i:05}"),
                priority: (rng.next() % 3) as i32,
                submitted_unix_ms: i as i64,
                ranks,
                ranks_per_worker,
                device_kind: "gpu".to_string(),
            }
        })
        .collect()
}

fn time_passes(queue: &[QueuedJob], cluster: &ClusterView) -> (Duration, PlacementResult) {
    let mut times = Vec::new();
    let mut result = PlacementResult::default();
    for _ in 0..RUNS {
        let t = Instant::now();
        result = std::hint::black_box(place(queue, cluster));
        times.push(t.elapsed());
    }
    (median(times), result)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn workers_per_gang(r: &PlacementResult, min_ranks: usize) -> f64 {
    let gangs: Vec<usize> = r
        .assignments
        .iter()
        .filter(|a| a.ranks.len() >= min_ranks)
        .map(|a| {
            let mut ws: Vec<&str> = a.ranks.iter().map(|s| s.worker_id.as_str()).collect();
            ws.sort_unstable();
            ws.dedup();
            ws.len()
        })
        .collect();
    if gangs.is_empty() {
        0.0
    } else {
        gangs.iter().sum::<usize>() as f64 / gangs.len() as f64
    }
}

fn main() {
    let mut rng = Lcg(0x7261_696e_7961_7264);
    let cluster = cluster(&mut rng);
    let queue = queue(&mut rng);
    let free: usize = cluster
        .workers
        .iter()
        .map(|w| w.slots.iter().filter(|s| !s.busy).count())
        .sum();
    println!(
        "placement bench: {WORKERS} workers x {SLOTS} gpu slots ({free} free), {JOBS} pending jobs (gangs 1/2/4/8/16)"
    );

    let (ours, result) = time_passes(&queue, &cluster);
    let placed = result.assignments.len();
    let ranks: usize = result.assignments.iter().map(|a| a.ranks.len()).sum();

    let mut naive = Vec::new();
    let mut naive_placed = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        naive_placed = std::hint::black_box(naive_first_fit(&queue, &cluster));
        naive.push(t.elapsed());
    }
    let naive = median(naive);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "place():          median {:8.2} ms per pass over {RUNS} runs; {placed} jobs placed ({ranks} ranks), {} waiting, {} reservations; {:.0} placements/s, {:.0} jobs considered/s",
        ms(ours),
        result.waiting.len(),
        result.reservations.len(),
        placed as f64 / ours.as_secs_f64(),
        JOBS as f64 / ours.as_secs_f64(),
    );
    println!(
        "naive first-fit:  median {:8.2} ms per pass; {naive_placed} jobs placed",
        ms(naive)
    );
    println!(
        "ratio naive/place: {:.1}x; place() workers per gang of >= 8 ranks: {:.2}",
        naive.as_secs_f64() / ours.as_secs_f64(),
        workers_per_gang(&result, 8)
    );
    let target = Duration::from_millis(50);
    println!(
        "target < {} ms per pass: {}",
        target.as_millis(),
        if ours < target { "met" } else { "MISSED" }
    );

    // Scenario 2: multi-worker gangs and reservations.
    let cluster = gang_cluster(&mut rng);
    let queue = gang_queue(&mut rng);
    let free: usize = cluster
        .workers
        .iter()
        .map(|w| w.slots.iter().filter(|s| !s.busy).count())
        .sum();
    println!(
        "\nmulti-worker gangs: {GANG_WORKERS} workers x {SLOTS} gpu slots ({free} free), {GANG_JOBS} pending jobs (30% 1-4 ranks, 40% 8/16, 30% 32/64; a third of gangs >= 8 with 4 or 8 ranks per worker)"
    );
    let (gangs, result) = time_passes(&queue, &cluster);
    let placed = result.assignments.len();
    let ranks: usize = result.assignments.iter().map(|a| a.ranks.len()).sum();
    let multi = result
        .assignments
        .iter()
        .filter(|a| {
            let first = &a.ranks[0].worker_id;
            a.ranks.iter().any(|r| &r.worker_id != first)
        })
        .count();
    let held: usize = result.reservations.iter().map(|v| v.held_slots.len()).sum();
    let reserved_workers: usize = result.reservations.iter().map(|v| v.worker_ids.len()).sum();
    println!(
        "place():          median {:8.2} ms per pass over {RUNS} runs; {placed} jobs placed ({ranks} ranks, {multi} spanning workers), {} waiting",
        ms(gangs),
        result.waiting.len(),
    );
    println!(
        "reservations: {} ({reserved_workers} workers reserved, {held} free slots held); workers per gang of >= 8 ranks: {:.2}, of >= 32: {:.2}",
        result.reservations.len(),
        workers_per_gang(&result, 8),
        workers_per_gang(&result, 32),
    );
    println!(
        "target < {} ms per pass: {}",
        target.as_millis(),
        if gangs < target { "met" } else { "MISSED" }
    );
}
