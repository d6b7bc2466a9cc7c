//! etcd goes away during a run: a coordinator on a private etcd member and one worker run
//! a job; the member is killed with SIGKILL for a few seconds (the coordinator reports
//! NOT_SERVING meanwhile), then started again on the same data directory. The coordinator
//! serves again, nothing is lost, and the job finishes SUCCEEDED without a requeue.
//!
//! Needs etcd installed and a test etcd configured (`eval "$(scripts/etcd.sh up)"`), like
//! every etcd test: without `TRAINYARD_ETCD_ENDPOINTS` it is skipped with a notice, except
//! in CI (or with `TRAINYARD_REQUIRE_ETCD=1`), where it fails. It starts its own member on
//! free ports (not the shared one), since it stops it.

use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use trainyard_tests::ha::{etcd_endpoints, unique_store_url, EtcdMember};
use trainyard_tests::{poll, tiny_neural_ode_args, Cluster, ClusterOptions};

/// The services whose health follows the store: NOT_SERVING while etcd is unreachable
/// (the overall "" status stays SERVING by design: the process itself is fine).
const STORE_SERVICES: [&str; 2] = ["trainyard.v1.JobService", "trainyard.v1.WorkerService"];

/// The health status of `service` on the coordinator, or `None` when it does not answer.
fn health(rt: &tokio::runtime::Runtime, url: &str, service: &str) -> Option<ServingStatus> {
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(url.to_string())
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .ok()?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .ok()?;
        Some(resp.into_inner().status())
    })
}

#[test]
fn etcd_restart_during_a_run_loses_nothing() {
    if etcd_endpoints("etcd_restart_during_a_run_loses_nothing").is_none() {
        return;
    }
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut etcd = EtcdMember::start();
    let cluster = Cluster::start_with(ClusterOptions {
        workers: 1,
        devices: "cpu:1".into(),
        store: Some(unique_store_url(&etcd.endpoint)),
        ..ClusterOptions::default()
    });
    let all = |status: ServingStatus| {
        STORE_SERVICES
            .iter()
            .all(|svc| health(&rt, &cluster.url, svc) == Some(status))
    };
    assert!(
        all(ServingStatus::Serving),
        "the coordinator serves before the outage"
    );

    let args = tiny_neural_ode_args(2048, 20);
    let submit: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = cluster.submit(&submit);
    cluster.wait_job(&id, "RUNNING with metrics", Duration::from_secs(60), |j| {
        j["state"] == "RUNNING"
            && j["latest_metrics"]
                .as_object()
                .is_some_and(|m| !m.is_empty())
    });

    // etcd dies. The coordinator notices and says NOT_SERVING; the outage lasts at least
    // a few seconds (longer than the workers' heartbeat timeout).
    etcd.kill9();
    let down_at = Instant::now();
    poll(
        "the coordinator to report NOT_SERVING while etcd is down",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || all(ServingStatus::NotServing).then_some(()),
    );
    eprintln!(
        "NOT_SERVING {:.2} s after etcd was killed",
        down_at.elapsed().as_secs_f64()
    );
    let outage = Duration::from_secs(4);
    if let Some(rest) = outage.checked_sub(down_at.elapsed()) {
        std::thread::sleep(rest);
    }

    // etcd comes back with the same data; the coordinator serves again.
    etcd.start_again();
    let up_at = Instant::now(); // etcd answers again
    poll(
        "the coordinator to report SERVING after etcd is back",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || all(ServingStatus::Serving).then_some(()),
    );
    eprintln!(
        "etcd down {:.2} s; SERVING again {:.2} s after it came back",
        (up_at - down_at).as_secs_f64(),
        up_at.elapsed().as_secs_f64()
    );

    // Nothing lost: the job is there, it finishes, and it was never requeued.
    assert_eq!(cluster.job_ids(), vec![id.clone()]);
    let job = cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(60));
    assert_eq!(job["restarts"].as_u64(), Some(0), "{job:#}");
    assert!(
        job["latest_metrics"].get("resumed_from_step").is_none(),
        "the job resumed from a checkpoint: {job:#}"
    );
    let workers = cluster.cli_json(&["workers"]);
    assert_eq!(
        workers
            .as_array()
            .map(|ws| ws.iter().filter(|w| w["state"] == "ALIVE").count()),
        Some(1),
        "the worker is alive: {workers:#}"
    );
    eprintln!("took {:.1} s", started.elapsed().as_secs_f64());
}
