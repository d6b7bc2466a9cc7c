//! Leader failover with etcd: two coordinators, two workers; kill -9 the leader while a job
//! trains. The follower takes over within 5 s, the workers reconnect and re-report their
//! ranks, and the job finishes with its rank process never restarted.
//!
//! Needs a real etcd: `eval "$(scripts/etcd.sh up)"` exports `TRAINYARD_ETCD_ENDPOINTS`.
//! Without it the test is skipped with a notice, except in CI (or with
//! `TRAINYARD_REQUIRE_ETCD=1`), where it fails.

use std::time::{Duration, Instant};

use trainyard_tests::ha::{etcd_endpoints, HaCluster};
use trainyard_tests::{rank_pids, tiny_neural_ode_args};

#[test]
fn killed_leader_is_replaced_and_the_rank_keeps_running() {
    let Some(endpoints) = etcd_endpoints("killed_leader_is_replaced_and_the_rank_keeps_running")
    else {
        return;
    };
    let mut cluster = HaCluster::start(&endpoints, 2, 2);
    let leader = cluster.wait_for_leader(Duration::from_secs(10));
    let follower = 1 - leader;

    // Several epochs, so that it trains well past the failover; checkpoints exist but must
    // not be resumed from.
    let args: Vec<String> = tiny_neural_ode_args(1024, 20)
        .into_iter()
        .map(|a| {
            if a == "epochs=1" {
                "epochs=6".to_string()
            } else {
                a
            }
        })
        .collect();
    let mut submit: Vec<&str> = vec!["submit"];
    submit.extend(args.iter().map(String::as_str));
    submit.extend_from_slice(&["--max-restarts", "2", "-o", "json"]);
    let id = cluster.cli(&submit).ok().json()["id"]
        .as_str()
        .expect("submit returns an id")
        .to_string();

    cluster.wait_job(&id, Duration::from_secs(120), |j| {
        j["state"] == "RUNNING"
            && j["latest_metrics"]
                .as_object()
                .is_some_and(|m| !m.is_empty())
    });
    let pids = rank_pids(&id);
    assert_eq!(pids.len(), 1, "one rank process expected: {pids:?}");
    let pid = pids[0];

    let killed_at = Instant::now();
    cluster.coordinators[leader].kill9();

    // The follower leads within 5 s: its log says so, and it serves the job.
    let follower_url = format!("http://{}", cluster.addrs[follower]);
    let took = loop {
        if cluster.leader_index() == Some(follower) {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(5),
            "no new leader within 5 s of killing the old one"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let job = cluster
        .describe_at(&follower_url, &id)
        .expect("the new leader serves the job");
    eprintln!(
        "failover: new leader after {:.2} s; job {} is {}",
        took.as_secs_f64(),
        id,
        job["state"]
    );
    assert!(took < Duration::from_secs(5), "failover took {took:?}");

    // Workers find the new leader; the job finishes without a restart.
    let job = cluster.wait_job(&id, Duration::from_secs(300), |j| {
        let now = rank_pids(&id);
        assert!(
            now.iter().all(|p| *p == pid),
            "the rank process changed: {pid} then {now:?}"
        );
        matches!(
            j["state"].as_str(),
            Some("SUCCEEDED" | "FAILED" | "CANCELLED")
        )
    });
    eprintln!(
        "failover: job finished {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    assert_eq!(job["state"], "SUCCEEDED", "{job:#}");
    assert_eq!(job["restarts"].as_u64().unwrap_or(0), 0, "{job:#}");
    assert_eq!(job["attempt"].as_u64().unwrap_or(0), 1, "{job:#}");
    assert!(
        job["latest_metrics"].get("resumed_from_step").is_none(),
        "the job resumed from a checkpoint: {job:#}"
    );
    // The same rank process ran throughout (checked while waiting) and no second one was
    // ever started.
    let worker_logs: String = (0..cluster.workers.len())
        .map(|i| {
            std::fs::read_to_string(cluster.log_dir().join(format!("worker-w{i}.log")))
                .unwrap_or_default()
        })
        .collect();
    let new_leader_log =
        std::fs::read_to_string(&cluster.coordinators[follower].log_path).unwrap_or_default();
    assert!(
        new_leader_log.contains("all ranks came back after restart; job kept"),
        "the new leader did not adopt the running rank"
    );
    let spawned = worker_logs.matches("rank assigned").count();
    assert_eq!(spawned, 1, "the rank was started {spawned} times");
}
