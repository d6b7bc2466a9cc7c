//! The coordinator's Prometheus metrics and its `/metrics` endpoint (text exposition format
//! 0.0.4, on a listener of its own: `trainyard coordinator --metrics-listen ADDR`).
//!
//! Two kinds of series:
//!
//! * **Counted where things happen**: placements and the scheduling pass duration (in
//!   [`crate::scheduler`]), job restarts by cause and workers lost (where a job is requeued
//!   or a worker expires), jobs finished by state (noticed once per job by
//!   [`count_finished`], which the scheduler's housekeeping and every scrape run).
//! * **Read at scrape time** from the leader's memory ([`Snapshot::of`], under the state
//!   lock, no store round trip): jobs by state, queue depth and oldest wait, workers and
//!   devices by state, training steps per second of each running job.
//!
//! A follower holds no in-memory state: its gauges read 0 and `trainyard_coordinator_leader`
//! says which coordinator's series to use. Every series and its labels are listed in
//! `docs/metrics.md`. Label sets are bounded: states and causes are fixed lists, device
//! kinds are `cpu`, `gpu` or `other`, and the `job_id` label exists only for jobs that
//! are RUNNING now (a series disappears when its job stops running).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State as AxumState;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::sync::watch;
use trainyard_proto::JobState;

use crate::coordinator::Coordinator;
use crate::state::{now_unix_ms, State};

/// The port the docs recommend for a coordinator's metrics (`--metrics-listen 0.0.0.0:9460`).
pub const RECOMMENDED_PORT: u16 = 9460;

/// Causes of `trainyard_job_restarts_total`.
pub const RESTART_CAUSES: [&str; 3] = ["rank_failed", "worker_lost", "coordinator_restart"];
/// Terminal states of `trainyard_jobs_finished_total`.
pub const FINISHED_STATES: [&str; 3] = ["succeeded", "failed", "cancelled"];
/// States of the `trainyard_jobs` gauge (the ones a job is in while it is live).
pub const LIVE_STATES: [&str; 3] = ["pending", "scheduled", "running"];

/// Buckets of `trainyard_scheduling_pass_duration_seconds`: 100 µs to about 13 s (a pass
/// places in microseconds to milliseconds; store round trips add milliseconds, an
/// unreachable etcd seconds).
pub const PASS_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// How far back [`StepRate`] looks, from a job's newest metric point.
pub const STEP_WINDOW_MS: i64 = 5 * 60 * 1000;
/// Most metric points [`StepRate`] keeps per job.
const STEP_SAMPLES: usize = 64;

/// Why the metrics could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The Prometheus library refused a metric or the encoding.
    #[error("prometheus: {0}")]
    Prometheus(#[from] prometheus::Error),
    /// The encoded text is not UTF-8 (never, with the text encoder).
    #[error("metrics text is not UTF-8: {0}")]
    Utf8(#[from] std::string::FromUtf8Error),
}

/// A job's training speed, from the step numbers of the metric points its ranks report.
///
/// Points whose step does not exceed the newest one are ignored (several ranks reporting
/// the same step); the window is cleared when the job's attempt ends.
#[derive(Debug, Default, Clone)]
pub struct StepRate {
    /// (report time in ms since the epoch, step), oldest first.
    samples: VecDeque<(i64, u64)>,
}

impl StepRate {
    /// Notes that the job reached `step` at `at_unix_ms`.
    pub fn observe(&mut self, at_unix_ms: i64, step: u64) {
        if let Some(&(_, last)) = self.samples.back() {
            if step <= last {
                return;
            }
        }
        self.samples.push_back((at_unix_ms, step));
        while self.samples.len() > STEP_SAMPLES
            || self
                .samples
                .front()
                .is_some_and(|&(t, _)| at_unix_ms - t > STEP_WINDOW_MS)
        {
            self.samples.pop_front();
        }
    }

    /// Forgets every point (a new attempt restarts from a checkpoint's step).
    pub fn reset(&mut self) {
        self.samples.clear();
    }

    /// Steps per second between the oldest and the newest point of the window; `None`
    /// with fewer than two points or no time between them.
    pub fn per_second(&self) -> Option<f64> {
        let (&(t0, s0), &(t1, s1)) = (self.samples.front()?, self.samples.back()?);
        let dt = (t1 - t0) as f64 / 1000.0;
        (dt > 0.0).then(|| (s1 - s0) as f64 / dt)
    }
}

/// What the scrape-time gauges show, read from the coordinator's memory.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    /// Whether this coordinator leads (only the leader's memory holds jobs and workers).
    pub leader: bool,
    /// Jobs by live state, in the order of [`LIVE_STATES`].
    pub jobs: [u64; 3],
    /// Seconds the longest-waiting PENDING job has waited since it last became PENDING.
    pub oldest_wait_s: f64,
    /// Alive workers.
    pub workers_alive: u64,
    /// Workers declared dead that `ListWorkers(include_dead)` still lists (the last 100).
    pub workers_dead: u64,
    /// Device slots of alive workers by (kind, busy).
    pub devices: BTreeMap<(String, bool), u64>,
    /// Steps per second of each RUNNING job that reported at least two steps, by job id.
    pub steps_per_second: BTreeMap<String, f64>,
}

/// `cpu`, `gpu`, or `other` for any other kind (a bounded label set).
fn kind_label(kind: &str) -> String {
    match kind {
        "cpu" | "gpu" => kind.to_string(),
        _ => "other".to_string(),
    }
}

impl Snapshot {
    /// Reads the gauges' values from `st` at `now_unix_ms`.
    pub fn of(st: &State, leader: bool, now_unix_ms: i64) -> Snapshot {
        let mut snap = Snapshot {
            leader,
            workers_alive: st.workers.len() as u64,
            workers_dead: st.dead_workers.len() as u64,
            ..Snapshot::default()
        };
        let mut oldest: Option<i64> = None;
        for e in st.jobs.values() {
            match e.job.state() {
                JobState::Pending => {
                    snap.jobs[0] += 1;
                    let since = e
                        .job
                        .transitions
                        .iter()
                        .rev()
                        .find(|t| t.to() == JobState::Pending)
                        .map(|t| t.at_unix_ms)
                        .unwrap_or(e.job.created_unix_ms);
                    oldest = Some(oldest.map_or(since, |o| o.min(since)));
                }
                JobState::Scheduled => snap.jobs[1] += 1,
                JobState::Running => {
                    snap.jobs[2] += 1;
                    if let Some(rate) = e.steps.per_second() {
                        snap.steps_per_second.insert(e.job.id.clone(), rate);
                    }
                }
                _ => {}
            }
        }
        if let Some(since) = oldest {
            snap.oldest_wait_s = ((now_unix_ms - since).max(0)) as f64 / 1000.0;
        }
        for kind in ["cpu", "gpu"] {
            snap.devices.insert((kind.to_string(), false), 0);
            snap.devices.insert((kind.to_string(), true), 0);
        }
        for w in st.workers.values() {
            for d in &w.record.devices {
                let busy = w.used.contains_key(&d.index);
                *snap.devices.entry((kind_label(&d.kind), busy)).or_default() += 1;
            }
        }
        snap
    }
}

/// The coordinator's metrics (one registry per coordinator, so several coordinators in one
/// process, as in the tests, do not share series).
pub struct Metrics {
    registry: Registry,
    /// `trainyard_placements_total`: jobs placed (gangs started), one per attempt.
    pub placements: IntCounter,
    /// `trainyard_placed_ranks_total`: ranks placed.
    pub placed_ranks: IntCounter,
    /// `trainyard_scheduling_pass_duration_seconds`: a full scheduling pass, store writes
    /// included.
    pub pass_duration: Histogram,
    /// `trainyard_job_restarts_total{cause}`: jobs requeued after a failure (cause one of
    /// [`RESTART_CAUSES`]).
    pub job_restarts: IntCounterVec,
    /// `trainyard_jobs_finished_total{state}`: jobs that ended in this process.
    pub jobs_finished: IntCounterVec,
    /// `trainyard_workers_lost_total`: workers declared dead (missed heartbeats).
    pub workers_lost: IntCounter,
    leader: IntGauge,
    jobs: IntGaugeVec,
    queue_depth: IntGauge,
    oldest_wait: Gauge,
    workers: IntGaugeVec,
    devices: IntGaugeVec,
    steps_per_second: GaugeVec,
    /// One scrape at a time sets the scrape-time gauges and gathers.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Registers `metric` in `registry`. The definitions are static and their names distinct
/// (a unit test renders them all), so this cannot fail at run time.
fn register<T: Collector + Clone + 'static>(
    registry: &Registry,
    metric: Result<T, prometheus::Error>,
) -> T {
    let metric = metric.expect("static metric definition is valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are distinct");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every series registered, counters with fixed labels at 0.
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Metrics {
            placements: register(
                &r,
                IntCounter::new(
                    "trainyard_placements_total",
                    "Jobs placed by the scheduler (one per attempt started).",
                ),
            ),
            placed_ranks: register(
                &r,
                IntCounter::new(
                    "trainyard_placed_ranks_total",
                    "Ranks placed by the scheduler.",
                ),
            ),
            pass_duration: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "trainyard_scheduling_pass_duration_seconds",
                        "Duration of a full scheduling pass, store writes included.",
                    )
                    .buckets(PASS_BUCKETS.to_vec()),
                ),
            ),
            job_restarts: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "trainyard_job_restarts_total",
                        "Jobs requeued after a failure, by cause.",
                    ),
                    &["cause"],
                ),
            ),
            jobs_finished: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "trainyard_jobs_finished_total",
                        "Jobs that reached a terminal state on this coordinator, by state.",
                    ),
                    &["state"],
                ),
            ),
            workers_lost: register(
                &r,
                IntCounter::new(
                    "trainyard_workers_lost_total",
                    "Workers declared dead after missing their heartbeat deadline.",
                ),
            ),
            leader: register(
                &r,
                IntGauge::new(
                    "trainyard_coordinator_leader",
                    "1 while this coordinator leads (its other gauges are the cluster's), else 0.",
                ),
            ),
            jobs: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("trainyard_jobs", "Live jobs by state."),
                    &["state"],
                ),
            ),
            queue_depth: register(
                &r,
                IntGauge::new("trainyard_queue_depth", "Jobs waiting to be placed (PENDING)."),
            ),
            oldest_wait: register(
                &r,
                Gauge::new(
                    "trainyard_queue_oldest_wait_seconds",
                    "How long the longest-waiting PENDING job has waited since it last became PENDING (0 when none waits).",
                ),
            ),
            workers: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "trainyard_workers",
                        "Workers by state (dead: declared dead and still listed, at most 100).",
                    ),
                    &["state"],
                ),
            ),
            devices: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "trainyard_devices",
                        "Device slots of alive workers by kind and state (free or busy).",
                    ),
                    &["kind", "state"],
                ),
            ),
            steps_per_second: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "trainyard_job_steps_per_second",
                        "Training steps per second of a RUNNING job, from the step numbers of its recent metric points.",
                    ),
                    &["job_id"],
                ),
            ),
            registry: r,
            scrape: Mutex::new(()),
        };
        for cause in RESTART_CAUSES {
            m.job_restarts.with_label_values(&[cause]);
        }
        for state in FINISHED_STATES {
            m.jobs_finished.with_label_values(&[state]);
        }
        m
    }

    /// Counts a job requeued after a failure (`cause`: one of [`RESTART_CAUSES`]).
    pub fn restarted(&self, cause: &'static str) {
        self.job_restarts.with_label_values(&[cause]).inc();
    }

    /// Renders every series in the text format, with the scrape-time gauges set from `snap`.
    pub fn render(&self, snap: &Snapshot) -> Result<String, MetricsError> {
        let _one = match self.scrape.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.leader.set(i64::from(snap.leader));
        for (state, n) in LIVE_STATES.iter().zip(snap.jobs) {
            self.jobs.with_label_values(&[*state]).set(n as i64);
        }
        self.queue_depth.set(snap.jobs[0] as i64);
        self.oldest_wait.set(snap.oldest_wait_s);
        self.workers
            .with_label_values(&["alive"])
            .set(snap.workers_alive as i64);
        self.workers
            .with_label_values(&["dead"])
            .set(snap.workers_dead as i64);
        self.devices.reset();
        for ((kind, busy), n) in &snap.devices {
            let state = if *busy { "busy" } else { "free" };
            self.devices
                .with_label_values(&[kind.as_str(), state])
                .set(*n as i64);
        }
        self.steps_per_second.reset();
        for (job, rate) in &snap.steps_per_second {
            self.steps_per_second
                .with_label_values(&[job.as_str()])
                .set(*rate);
        }
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8(buf)?)
    }
}

/// Counts the jobs that reached a terminal state since the last call, once each (a job
/// that was already terminal when this process loaded it is never counted).
pub fn count_finished(metrics: &Metrics, st: &mut State) {
    for e in st.jobs.values_mut() {
        if e.counted_finished {
            continue;
        }
        let label = match e.job.state() {
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            _ => continue,
        };
        e.counted_finished = true;
        metrics.jobs_finished.with_label_values(&[label]).inc();
    }
}

/// The metrics text of `coord` now.
pub async fn scrape(coord: &Coordinator) -> Result<String, MetricsError> {
    let leader = coord.is_leader();
    let snap = {
        let mut st = coord.state.lock().await;
        count_finished(&coord.metrics, &mut st);
        Snapshot::of(&st, leader, now_unix_ms())
    };
    coord.metrics.render(&snap)
}

/// `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn get_metrics(AxumState(coord): AxumState<Arc<Coordinator>>) -> Response {
    match scrape(&coord).await {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

/// The HTTP routes: `GET /metrics` (405 for other methods), 404 elsewhere.
pub fn router(coord: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(get_ready))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; try GET /metrics\n") })
        .with_state(coord)
}

/// `GET /readyz`: 200 while the coordinator can serve the job API (the state store
/// answers; leader or follower), 503 otherwise. Plain HTTP, for Kubernetes probes, which
/// cannot speak gRPC over TLS; `GET /healthz` answers 200 while the process serves.
async fn get_ready(AxumState(coord): AxumState<Arc<Coordinator>>) -> Response {
    let reachable = coord.leadership.borrow().store_reachable;
    if reachable {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the state store is unreachable\n",
        )
            .into_response()
    }
}

/// Serves [`router`] on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    coord: Arc<Coordinator>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let stop = async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    };
    let r = axum::serve(listener, router(coord))
        .with_graceful_shutdown(stop)
        .await;
    tracing::debug!(?addr, "metrics endpoint stopped");
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{JobEntry, WorkerEntry};
    use trainyard_proto::{Device, Job, JobSpec, Transition, Worker};

    fn job(id: &str, state: JobState, pending_since: i64) -> JobEntry {
        let job = Job {
            id: id.into(),
            state: state as i32,
            created_unix_ms: 0,
            spec: Some(JobSpec::default()),
            transitions: vec![Transition {
                from: 0,
                to: JobState::Pending as i32,
                at_unix_ms: pending_since,
                reason: "submitted".into(),
            }],
            ..Default::default()
        };
        JobEntry::new(job)
    }

    fn worker(id: &str, kinds: &[&str]) -> WorkerEntry {
        WorkerEntry::new(Worker {
            id: id.into(),
            devices: kinds
                .iter()
                .enumerate()
                .map(|(i, k)| Device {
                    index: i as u32,
                    kind: k.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    /// The value of the sample `series` (name with labels, exactly as exposed).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn step_rate_uses_the_window_and_ignores_repeats() {
        let mut r = StepRate::default();
        assert_eq!(r.per_second(), None);
        r.observe(1_000, 10);
        assert_eq!(r.per_second(), None);
        r.observe(1_500, 10); // another rank, same step
        r.observe(3_000, 30);
        assert_eq!(r.per_second(), Some(10.0));
        // Points older than the window (from the newest point) are dropped.
        r.observe(2_000 + STEP_WINDOW_MS, 40);
        let secs = (STEP_WINDOW_MS - 1_000) as f64 / 1000.0;
        assert_eq!(r.per_second(), Some(10.0 / secs));
        r.reset();
        assert_eq!(r.per_second(), None);
    }

    #[test]
    fn snapshot_counts_jobs_workers_and_devices() {
        let mut st = State::default();
        st.jobs
            .insert("a".into(), job("a", JobState::Pending, 4_000));
        st.jobs
            .insert("b".into(), job("b", JobState::Pending, 1_000));
        let mut running = job("c", JobState::Running, 0);
        running.steps.observe(0, 0);
        running.steps.observe(2_000, 8);
        st.jobs.insert("c".into(), running);
        st.jobs.insert("d".into(), job("d", JobState::Succeeded, 0));
        let mut w = worker("w1", &["gpu", "gpu", "cpu", "tpu"]);
        w.used.insert(
            1,
            crate::state::SlotUse {
                job_id: "c".into(),
                attempt: 1,
                rank: 0,
            },
        );
        st.workers.insert("w1".into(), w);
        st.remember_dead(Worker::default());
        let snap = Snapshot::of(&st, true, 11_000);
        assert_eq!(snap.jobs, [2, 0, 1]);
        assert_eq!(snap.oldest_wait_s, 10.0);
        assert_eq!((snap.workers_alive, snap.workers_dead), (1, 1));
        assert_eq!(snap.devices[&("gpu".to_string(), true)], 1);
        assert_eq!(snap.devices[&("gpu".to_string(), false)], 1);
        assert_eq!(snap.devices[&("cpu".to_string(), false)], 1);
        assert_eq!(snap.devices[&("other".to_string(), false)], 1);
        assert_eq!(snap.steps_per_second.get("c"), Some(&4.0));
    }

    #[test]
    fn exposition_has_every_series_with_conventional_names() {
        let m = Metrics::new();
        m.placements.inc();
        m.placed_ranks.inc_by(4);
        m.pass_duration.observe(0.003);
        m.restarted("worker_lost");
        let mut st = State::default();
        st.jobs.insert("x".into(), job("x", JobState::Failed, 0));
        if let Some(e) = st.jobs.get_mut("x") {
            e.counted_finished = false;
        }
        count_finished(&m, &mut st);
        count_finished(&m, &mut st); // counted once
        let mut snap = Snapshot {
            leader: true,
            jobs: [3, 1, 2],
            oldest_wait_s: 1.5,
            workers_alive: 2,
            ..Snapshot::default()
        };
        snap.devices.insert(("gpu".into(), true), 3);
        snap.steps_per_second.insert("job-1".into(), 2.5);
        let text = m.render(&snap).unwrap();
        for (series, v) in [
            ("trainyard_coordinator_leader", 1.0),
            ("trainyard_placements_total", 1.0),
            ("trainyard_placed_ranks_total", 4.0),
            ("trainyard_job_restarts_total{cause=\"worker_lost\"}", 1.0),
            ("trainyard_job_restarts_total{cause=\"rank_failed\"}", 0.0),
            ("trainyard_jobs_finished_total{state=\"failed\"}", 1.0),
            ("trainyard_jobs_finished_total{state=\"succeeded\"}", 0.0),
            ("trainyard_workers_lost_total", 0.0),
            ("trainyard_jobs{state=\"pending\"}", 3.0),
            ("trainyard_jobs{state=\"scheduled\"}", 1.0),
            ("trainyard_jobs{state=\"running\"}", 2.0),
            ("trainyard_queue_depth", 3.0),
            ("trainyard_queue_oldest_wait_seconds", 1.5),
            ("trainyard_workers{state=\"alive\"}", 2.0),
            ("trainyard_workers{state=\"dead\"}", 0.0),
            ("trainyard_devices{kind=\"gpu\",state=\"busy\"}", 3.0),
            ("trainyard_job_steps_per_second{job_id=\"job-1\"}", 2.5),
            ("trainyard_scheduling_pass_duration_seconds_count", 1.0),
            (
                "trainyard_scheduling_pass_duration_seconds_bucket{le=\"0.0025\"}",
                0.0,
            ),
            (
                "trainyard_scheduling_pass_duration_seconds_bucket{le=\"0.005\"}",
                1.0,
            ),
            (
                "trainyard_scheduling_pass_duration_seconds_bucket{le=\"+Inf\"}",
                1.0,
            ),
        ] {
            assert_eq!(value(&text, series), Some(v), "{series} in:\n{text}");
        }
        assert!(text.contains("# TYPE trainyard_scheduling_pass_duration_seconds histogram"));
        assert!(text.contains("# TYPE trainyard_placements_total counter"));
        assert!(text.contains("# TYPE trainyard_jobs gauge"));
        // Every metric has help and a type, and only our prefix.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("trainyard_"), "{line}");
        }
        // A job that stops running loses its series; device kinds no longer seen go too.
        let text = m.render(&Snapshot::default()).unwrap();
        assert!(!text.contains("job-1"), "{text}");
        assert!(!text.contains("kind=\"gpu\""), "{text}");
        assert_eq!(value(&text, "trainyard_coordinator_leader"), Some(0.0));
    }
}
