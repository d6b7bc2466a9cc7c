//! Placement at scale: 1,000 workers x 8 GPU slots (about a third already busy) and 10,000
//! pending jobs with gang sizes 1, 2, 4, 8 and 16. Times one scheduling pass of
//! `placement::place` (median of several) and a naive first-fit baseline on the same input,
//! and prints placements per second and the ratio.
//!
//! Run: `cargo bench -p trainyard-coordinator --bench placement`.

use std::time::{Duration, Instant};

use trainyard_coordinator::scheduler::placement::{
    place, ClusterView, PlacementResult, QueuedJob, SlotView, WorkerView,
};

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

fn cluster(rng: &mut Lcg) -> ClusterView {
    ClusterView {
        workers: (0..WORKERS)
            .map(|w| {
                // 0..=5 of 8 slots busy: about 31% of the cluster is occupied.
                let busy = rng.next() % 6;
                WorkerView {
                    id: format!("w-{w:04}"),
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

    let mut ours = Vec::new();
    let mut result = PlacementResult::default();
    for _ in 0..RUNS {
        let t = Instant::now();
        result = std::hint::black_box(place(&queue, &cluster));
        ours.push(t.elapsed());
    }
    let ours = median(ours);
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
        "place():          median {:8.2} ms per pass over {RUNS} runs; {placed} jobs placed ({ranks} ranks), {} waiting; {:.0} placements/s, {:.0} jobs considered/s",
        ms(ours),
        result.waiting.len(),
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
}
