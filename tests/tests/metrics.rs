//! Prometheus metrics over real processes: a coordinator and a worker (2 emulated GPUs)
//! started with `--metrics-listen`, the worker with `--log-format json`. A 2-rank
//! `neural-ode` job runs (its ranks all-reduce over the TCP ring and checkpoint) while a
//! second one waits in the queue; both endpoints are scraped over HTTP while it runs and
//! after it is cancelled, every scrape is checked with `promtool check metrics`, and the
//! expected series must be there with sane values. The worker's JSON log lines about the
//! ranks carry the job id and the rank as fields.
//!
//! `promtool` comes from `scripts/promtool.sh install`; when it is not on PATH the check is
//! skipped with a notice, unless `TRAINYARD_REQUIRE_PROMTOOL=1` (set by CI) makes that a
//! failure.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use trainyard_tests::{http_request, poll, tiny_neural_ode_args, Cluster, ClusterOptions};

/// The samples of a scrape: series (name with labels, as exposed) -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let v = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().ok()?,
            };
            Some((series.to_string(), v))
        })
        .collect()
}

/// One scrape of `addr`'s `/metrics`, checked for status, content type and by promtool.
fn scrape(addr: SocketAddr, what: &str) -> BTreeMap<String, f64> {
    let r = poll(
        &format!("{what} /metrics to answer"),
        Duration::from_secs(30),
        Duration::from_millis(200),
        || http_request(addr, "GET", "/metrics"),
    );
    assert_eq!(r.status, 200, "{what}: {r:?}");
    let content_type = r
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    assert_eq!(
        content_type,
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "{what}"
    );
    promtool_check(&r.body, what);
    samples(&r.body)
}

/// `promtool check metrics` on `text` (the exposition and Prometheus' naming lints).
fn promtool_check(text: &str, what: &str) {
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let required = std::env::var("TRAINYARD_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "promtool is not on PATH ({e}) and TRAINYARD_REQUIRE_PROMTOOL=1: run scripts/promtool.sh install"
            );
            eprintln!(
                "notice: promtool not found ({e}); skipping `promtool check metrics` (scripts/promtool.sh install)"
            );
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .expect("writing to promtool");
    }
    let out = child.wait_with_output().expect("running promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed on the {what} scrape:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    match m.get(series) {
        Some(v) => *v,
        None => panic!(
            "series {series} missing; have:\n{}",
            m.keys().cloned().collect::<Vec<_>>().join("\n")
        ),
    }
}

#[test]
fn coordinator_and_worker_expose_prometheus_metrics() {
    let cluster = Cluster::start_with(ClusterOptions {
        workers: 1,
        devices: String::new(),
        emulate_gpus: 2,
        worker_args: vec!["--log-format".into(), "json".into()],
        metrics: true,
        ..ClusterOptions::default()
    });
    let coord = cluster.coordinator_metrics.expect("coordinator metrics");
    let worker = cluster.worker_metrics[0].expect("worker metrics");

    // Before any job: the series exist, at rest.
    let m = scrape(coord, "coordinator");
    assert_eq!(get(&m, "trainyard_coordinator_leader"), 1.0);
    assert_eq!(get(&m, "trainyard_workers{state=\"alive\"}"), 1.0);
    assert_eq!(
        get(&m, "trainyard_devices{kind=\"gpu\",state=\"free\"}"),
        2.0
    );
    assert_eq!(get(&m, "trainyard_queue_depth"), 0.0);
    assert_eq!(get(&m, "trainyard_placements_total"), 0.0);
    let m = scrape(worker, "worker");
    assert_eq!(get(&m, "trainyard_checkpoint_upload_bytes_total"), 0.0);
    assert_eq!(get(&m, "trainyard_worker_ranks{state=\"running\"}"), 0.0);

    // Plain-HTTP probes for Kubernetes (its gRPC probes cannot speak TLS).
    for (addr, path) in [
        (coord, "/healthz"),
        (coord, "/readyz"),
        (worker, "/healthz"),
    ] {
        let r = http_request(addr, "GET", path).expect("the endpoint answers");
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }

    // Only GET /metrics is served.
    let r = http_request(coord, "GET", "/nope").expect("coordinator answers");
    assert_eq!(r.status, 404, "{r:?}");
    let r = http_request(coord, "POST", "/metrics").expect("coordinator answers");
    assert_eq!(r.status, 405, "{r:?}");
    let r = http_request(worker, "GET", "/").expect("worker answers");
    assert_eq!(r.status, 404, "{r:?}");

    // A 2-rank job (32 samples a step, a checkpoint every 4 steps), long enough to be
    // scraped while it runs (it is cancelled once it was); and a second one queued behind it.
    let args = tiny_neural_ode_args(6144, 4);
    let mut submit: Vec<&str> = args.iter().map(String::as_str).collect();
    submit.extend_from_slice(&[
        "--set",
        "epochs=100",
        "--ranks",
        "2",
        "--device-kind",
        "gpu",
    ]);
    let id = cluster.submit(&submit);
    let queued = cluster.submit(&submit);

    let steps_series = format!("trainyard_job_steps_per_second{{job_id=\"{id}\"}}");
    let m = poll(
        "the running job's steps per second and a committed checkpoint",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || {
            let job = cluster.describe(&id);
            assert_ne!(
                job["state"], "SUCCEEDED",
                "the job ended before it was scraped"
            );
            if job["latest_checkpoint"]["step"].as_u64().unwrap_or(0) == 0 {
                return None;
            }
            let m = scrape(coord, "coordinator");
            m.contains_key(&steps_series).then_some(m)
        },
    );
    assert!(get(&m, &steps_series) > 0.0, "{m:?}");
    assert_eq!(cluster.describe(&id)["spec"]["ranks"], 2);
    assert_eq!(get(&m, "trainyard_jobs{state=\"running\"}"), 1.0);
    assert_eq!(get(&m, "trainyard_jobs{state=\"pending\"}"), 1.0);
    assert_eq!(get(&m, "trainyard_queue_depth"), 1.0);
    assert!(
        get(&m, "trainyard_queue_oldest_wait_seconds") > 0.0,
        "{m:?}"
    );
    assert_eq!(
        get(&m, "trainyard_devices{kind=\"gpu\",state=\"busy\"}"),
        2.0
    );
    assert_eq!(get(&m, "trainyard_placements_total"), 1.0);
    assert_eq!(get(&m, "trainyard_placed_ranks_total"), 2.0);
    assert!(get(&m, "trainyard_scheduling_pass_duration_seconds_count") >= 1.0);
    assert_eq!(
        get(
            &m,
            "trainyard_scheduling_pass_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        get(&m, "trainyard_scheduling_pass_duration_seconds_count")
    );
    assert_eq!(
        get(&m, "trainyard_job_restarts_total{cause=\"rank_failed\"}"),
        0.0
    );

    // The worker heard of the checkpoint and of the all-reduces.
    let m = poll(
        "the worker's checkpoint and all-reduce telemetry",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let m = scrape(worker, "worker");
            (get(&m, "trainyard_checkpoint_upload_duration_seconds_count") >= 1.0
                && get(&m, "trainyard_allreduce_calls_total") >= 1.0)
                .then_some(m)
        },
    );
    assert_eq!(get(&m, "trainyard_worker_ranks{state=\"running\"}"), 2.0);
    assert!(get(&m, "trainyard_checkpoint_save_duration_seconds_count") >= 1.0);
    assert!(get(&m, "trainyard_checkpoint_save_bytes_total") > 0.0);
    assert!(get(&m, "trainyard_checkpoint_upload_bytes_total") > 0.0);
    assert!(get(&m, "trainyard_checkpoint_upload_duration_seconds_sum") > 0.0);
    assert!(get(&m, "trainyard_allreduce_bytes_total") > 0.0);
    assert!(get(&m, "trainyard_allreduce_duration_seconds_total") > 0.0);
    let bandwidth = get(&m, "trainyard_allreduce_bandwidth_bytes_per_second");
    assert!(
        bandwidth > 1e3 && bandwidth.is_finite(),
        "implausible all-reduce bandwidth {bandwidth} B/s"
    );

    // Cancel both; the running job's series goes, the finished jobs are counted.
    cluster.cli(&["cancel", &queued]).ok();
    cluster.cli(&["cancel", &id]).ok();
    cluster.wait_state(&id, "CANCELLED", Duration::from_secs(60));
    let m = poll(
        "the coordinator to count both cancelled jobs",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let m = scrape(coord, "coordinator");
            (get(&m, "trainyard_jobs_finished_total{state=\"cancelled\"}") == 2.0).then_some(m)
        },
    );
    assert!(!m.contains_key(&steps_series), "{m:?}");
    assert_eq!(get(&m, "trainyard_jobs{state=\"running\"}"), 0.0);
    assert_eq!(get(&m, "trainyard_queue_depth"), 0.0);
    assert_eq!(get(&m, "trainyard_queue_oldest_wait_seconds"), 0.0);
    let m = poll(
        "the worker to count its 2 ranks' exits",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || {
            let m = scrape(worker, "worker");
            (get(&m, "trainyard_worker_ranks{state=\"running\"}") == 0.0).then_some(m)
        },
    );
    let exits: f64 = ["succeeded", "failed", "cancelled"]
        .iter()
        .map(|s| {
            get(
                &m,
                &format!("trainyard_worker_rank_exits_total{{state=\"{s}\"}}"),
            )
        })
        .sum();
    assert_eq!(exits, 2.0, "{m:?}");

    // JSON logs: the worker's lines about a rank carry the job id and the rank as fields.
    let log = std::fs::read_to_string(&cluster.workers[0].log_path).expect("worker log");
    let about_rank: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["span"]["job_id"] == id.as_str())
        .collect();
    assert!(
        about_rank.iter().any(|v| v["span"]["rank"] == 0)
            && about_rank.iter().any(|v| v["span"]["rank"] == 1),
        "no JSON log line with span.job_id={id} for ranks 0 and 1 in the worker log:\n{log}"
    );
    assert!(
        about_rank
            .iter()
            .any(|v| v["fields"]["message"] == "rank finished"),
        "{about_rank:?}"
    );
}
