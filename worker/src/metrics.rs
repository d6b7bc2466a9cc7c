//! The worker's Prometheus metrics and its `/metrics` endpoint (text exposition format
//! 0.0.4, on a listener of its own: `trainyard worker --metrics-listen ADDR`).
//!
//! Checkpoint saves and uploads and all-reduces happen inside the rank processes; a rank
//! measures them and reports [`RankMessage::Telemetry`](crate::protocol::RankMessage)
//! lines to its agent, which adds them up here (they are not forwarded to the
//! coordinator). Series carry no job or rank label, so their number is fixed: they sum
//! over every rank this worker ran. Every series is listed in `docs/metrics.md`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State as AxumState;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::protocol::Measured;

/// The port the docs recommend for a worker's metrics (`--metrics-listen 0.0.0.0:9461`).
pub const RECOMMENDED_PORT: u16 = 9461;

/// `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets of the checkpoint save histogram: 1 ms to 60 s (a save copies the tensors to
/// host memory and blocks only while two uploads are in flight).
pub const SAVE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0, 60.0,
];
/// Buckets of the checkpoint upload histogram: 10 ms to 30 min (retries included).
pub const UPLOAD_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0, 1800.0,
];

/// Terminal rank states of `trainyard_worker_rank_exits_total`.
pub const EXIT_STATES: [&str; 3] = ["succeeded", "failed", "cancelled"];

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

/// Rank processes the agent supervises now, by state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RankCounts {
    /// Spawned, not yet running.
    pub starting: u64,
    /// Running.
    pub running: u64,
}

/// The worker's metrics.
pub struct WorkerMetrics {
    registry: Registry,
    save_duration: Histogram,
    save_bytes: IntCounter,
    upload_duration: Histogram,
    upload_bytes: IntCounter,
    allreduce_seconds: prometheus::Counter,
    allreduce_bytes: IntCounter,
    allreduce_calls: IntCounter,
    allreduce_bandwidth: Gauge,
    rank_exits: IntCounterVec,
    ranks: IntGaugeVec,
    scrape: Mutex<()>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
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

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    /// Every series registered, at 0.
    pub fn new() -> Self {
        let r = Registry::new();
        let m = WorkerMetrics {
            save_duration: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "trainyard_checkpoint_save_duration_seconds",
                        "Time a rank's training was blocked saving a checkpoint (copy to host memory, waiting for room in the upload queue).",
                    )
                    .buckets(SAVE_BUCKETS.to_vec()),
                ),
            ),
            save_bytes: register(
                &r,
                IntCounter::new(
                    "trainyard_checkpoint_save_bytes_total",
                    "Bytes of the checkpoints ranks saved (queued for upload).",
                ),
            ),
            upload_duration: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "trainyard_checkpoint_upload_duration_seconds",
                        "Time from a checkpoint queued for upload to its manifest committed in the object store (retries included).",
                    )
                    .buckets(UPLOAD_BUCKETS.to_vec()),
                ),
            ),
            upload_bytes: register(
                &r,
                IntCounter::new(
                    "trainyard_checkpoint_upload_bytes_total",
                    "Bytes of the checkpoints committed to the object store.",
                ),
            ),
            allreduce_seconds: register(
                &r,
                prometheus::Counter::new(
                    "trainyard_allreduce_duration_seconds_total",
                    "Seconds ranks spent in all-reduce collectives (CPU ring; bandwidth = rate of bytes / rate of this).",
                ),
            ),
            allreduce_bytes: register(
                &r,
                IntCounter::new(
                    "trainyard_allreduce_bytes_total",
                    "Bytes of the buffers ranks all-reduced (each rank's input size).",
                ),
            ),
            allreduce_calls: register(
                &r,
                IntCounter::new(
                    "trainyard_allreduce_calls_total",
                    "All-reduce collectives ranks ran.",
                ),
            ),
            allreduce_bandwidth: register(
                &r,
                Gauge::new(
                    "trainyard_allreduce_bandwidth_bytes_per_second",
                    "All-reduce algorithm bandwidth (bytes reduced / seconds in all-reduce) of the latest report of a rank on this worker.",
                ),
            ),
            rank_exits: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "trainyard_worker_rank_exits_total",
                        "Rank processes that ended on this worker, by final state.",
                    ),
                    &["state"],
                ),
            ),
            ranks: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "trainyard_worker_ranks",
                        "Rank processes this worker supervises, by state.",
                    ),
                    &["state"],
                ),
            ),
            registry: r,
            scrape: Mutex::new(()),
        };
        for state in EXIT_STATES {
            m.rank_exits.with_label_values(&[state]);
        }
        m
    }

    /// Adds one telemetry report of a rank: `count` operations of kind `what` that took
    /// `seconds` in all and moved `bytes`.
    pub fn observe(&self, what: Measured, seconds: f64, bytes: u64, count: u64) {
        let seconds = if seconds.is_finite() && seconds >= 0.0 {
            seconds
        } else {
            0.0
        };
        match what {
            Measured::CheckpointSave => {
                self.save_duration.observe(seconds);
                self.save_bytes.inc_by(bytes);
            }
            Measured::CheckpointUpload => {
                self.upload_duration.observe(seconds);
                self.upload_bytes.inc_by(bytes);
            }
            Measured::AllReduce => {
                self.allreduce_seconds.inc_by(seconds);
                self.allreduce_bytes.inc_by(bytes);
                self.allreduce_calls.inc_by(count);
                if seconds > 0.0 {
                    self.allreduce_bandwidth.set(bytes as f64 / seconds);
                }
            }
        }
    }

    /// Counts a rank that ended in `state` (`succeeded`, `failed` or `cancelled`).
    pub fn rank_exited(&self, state: &'static str) {
        self.rank_exits.with_label_values(&[state]).inc();
    }

    /// Renders every series in the text format, with the rank gauges set from `ranks`.
    pub fn render(&self, ranks: RankCounts) -> Result<String, MetricsError> {
        let _one = match self.scrape.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.ranks
            .with_label_values(&["starting"])
            .set(ranks.starting as i64);
        self.ranks
            .with_label_values(&["running"])
            .set(ranks.running as i64);
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8(buf)?)
    }
}

/// What the endpoint renders: the metrics and a way to count the ranks now.
#[derive(Clone)]
pub(crate) struct Source {
    pub metrics: Arc<WorkerMetrics>,
    pub ranks: Arc<dyn Fn() -> RankCounts + Send + Sync>,
}

async fn get_metrics(AxumState(source): AxumState<Source>) -> Response {
    match source.metrics.render((source.ranks)()) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

/// The HTTP routes: `GET /metrics` (405 for other methods), `GET /healthz` (200 while the
/// agent serves; for Kubernetes probes), 404 elsewhere.
pub(crate) fn router(source: Source) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; try GET /metrics\n") })
        .with_state(source)
}

/// Binds `addr` for the metrics endpoint; returns the listener and the bound address.
pub(crate) async fn bind(
    addr: SocketAddr,
) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

/// Serves [`router`] on `listener` until the task is aborted.
pub(crate) async fn serve(listener: tokio::net::TcpListener, source: Source) {
    if let Err(e) = axum::serve(listener, router(source)).await {
        tracing::warn!(error = %e, "metrics endpoint failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn telemetry_adds_up_in_the_exposition() {
        let m = WorkerMetrics::new();
        m.observe(Measured::CheckpointSave, 0.02, 1000, 1);
        m.observe(Measured::CheckpointUpload, 0.3, 1000, 1);
        m.observe(Measured::CheckpointUpload, 0.7, 3000, 1);
        m.observe(Measured::AllReduce, 0.5, 4_000_000, 10);
        m.observe(Measured::AllReduce, 0.5, 2_000_000, 5);
        m.observe(Measured::AllReduce, f64::NAN, 0, 0);
        m.rank_exited("succeeded");
        let text = m
            .render(RankCounts {
                starting: 1,
                running: 2,
            })
            .unwrap();
        for (series, v) in [
            ("trainyard_checkpoint_save_duration_seconds_count", 1.0),
            ("trainyard_checkpoint_save_duration_seconds_sum", 0.02),
            (
                "trainyard_checkpoint_save_duration_seconds_bucket{le=\"0.025\"}",
                1.0,
            ),
            (
                "trainyard_checkpoint_save_duration_seconds_bucket{le=\"0.01\"}",
                0.0,
            ),
            ("trainyard_checkpoint_save_bytes_total", 1000.0),
            ("trainyard_checkpoint_upload_duration_seconds_count", 2.0),
            (
                "trainyard_checkpoint_upload_duration_seconds_bucket{le=\"0.5\"}",
                1.0,
            ),
            (
                "trainyard_checkpoint_upload_duration_seconds_bucket{le=\"+Inf\"}",
                2.0,
            ),
            ("trainyard_checkpoint_upload_bytes_total", 4000.0),
            ("trainyard_allreduce_duration_seconds_total", 1.0),
            ("trainyard_allreduce_bytes_total", 6e6),
            ("trainyard_allreduce_calls_total", 15.0),
            ("trainyard_allreduce_bandwidth_bytes_per_second", 4e6),
            (
                "trainyard_worker_rank_exits_total{state=\"succeeded\"}",
                1.0,
            ),
            ("trainyard_worker_rank_exits_total{state=\"failed\"}", 0.0),
            ("trainyard_worker_ranks{state=\"starting\"}", 1.0),
            ("trainyard_worker_ranks{state=\"running\"}", 2.0),
        ] {
            assert_eq!(value(&text, series), Some(v), "{series} in:\n{text}");
        }
        assert!(text.contains("# TYPE trainyard_checkpoint_upload_duration_seconds histogram"));
        assert!(text.contains("# TYPE trainyard_allreduce_bytes_total counter"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("trainyard_"), "{line}");
        }
    }
}
