//! A single coordinator is killed with SIGKILL and restarted on the same address and data
//! directory while jobs are pending and running: every job is still there afterwards (the
//! same ids) and all of them finish SUCCEEDED. Once with the embedded store, once with
//! etcd.
//!
//! The etcd variant needs a real etcd: `eval "$(scripts/etcd.sh up)"` exports
//! `TRAINYARD_ETCD_ENDPOINTS`. Without it that test is skipped with a notice, except in CI
//! (or with `TRAINYARD_REQUIRE_ETCD=1`), where it fails.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use trainyard_tests::ha::{etcd_endpoints, unique_store_url};
use trainyard_tests::{poll, rank_pids, tiny_neural_ode_args, Cluster, ClusterOptions};

/// Job id -> state, from `jobs -o json`.
fn job_states(cluster: &Cluster) -> BTreeMap<String, String> {
    let v = cluster.cli_json(&["jobs", "--limit", "1000"]);
    let mut out = BTreeMap::new();
    for j in v.as_array().expect("jobs -o json is an array") {
        let id = j["id"].as_str().expect("job id").to_string();
        let state = j["state"].as_str().unwrap_or("").to_string();
        assert!(
            out.insert(id.clone(), state).is_none(),
            "job {id} is listed twice: {v:#}"
        );
    }
    out
}

fn restart_with_pending_and_running_jobs(store: Option<String>) {
    let started = Instant::now();
    let mut cluster = Cluster::start_with(ClusterOptions {
        workers: 2,
        devices: "cpu:1".into(),
        store,
        ..ClusterOptions::default()
    });

    // Three jobs on two one-slot workers: two run, one waits. Long enough to still be
    // running across the restart.
    let args = tiny_neural_ode_args(1024, 8);
    let submit: Vec<&str> = args.iter().map(String::as_str).collect();
    let ids: Vec<String> = (0..3).map(|_| cluster.submit(&submit)).collect();

    let before = poll(
        "two running jobs (with metrics) and one pending",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let states = job_states(&cluster);
            let running: Vec<&String> = states
                .iter()
                .filter(|(_, s)| *s == "RUNNING")
                .map(|(id, _)| id)
                .collect();
            let pending = states.values().filter(|s| *s == "PENDING").count();
            let trained = running.iter().all(|id| {
                cluster.describe(id)["latest_metrics"]
                    .as_object()
                    .is_some_and(|m| !m.is_empty())
            });
            (running.len() == 2 && pending == 1 && trained).then_some(states)
        },
    );
    let mut expected: Vec<&String> = ids.iter().collect();
    expected.sort();
    assert_eq!(before.keys().collect::<Vec<_>>(), expected, "{before:?}");

    // The rank processes of the running jobs: they must survive the restart.
    let rank_pids_before: BTreeMap<String, Vec<u32>> = before
        .iter()
        .filter(|(_, s)| *s == "RUNNING")
        .map(|(id, _)| (id.clone(), rank_pids(id)))
        .collect();
    for (id, pids) in &rank_pids_before {
        assert_eq!(
            pids.len(),
            1,
            "job {id}: one rank process expected: {pids:?}"
        );
    }

    cluster.coordinator.kill9();
    let killed_at = Instant::now();
    cluster.restart_coordinator();
    eprintln!(
        "coordinator restarted in {:.2} s",
        killed_at.elapsed().as_secs_f64()
    );

    // Every job is still there, under the same id, right after the restart.
    let after = job_states(&cluster);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        expected,
        "jobs before the restart: {before:?}; after: {after:?}"
    );
    for (id, state) in &after {
        assert!(
            matches!(
                state.as_str(),
                "PENDING" | "SCHEDULED" | "RUNNING" | "SUCCEEDED"
            ),
            "job {id} is {state} after the restart (before: {})",
            before[id]
        );
    }

    // The running ranks kept running (re-reported, not restarted).
    for (id, pids) in &rank_pids_before {
        let now = rank_pids(id);
        assert!(
            now.is_empty() || now == *pids,
            "job {id}: its rank process changed across the restart: {pids:?} then {now:?}"
        );
    }

    // And every one of them finishes.
    for id in &ids {
        let job = cluster.wait_state(id, "SUCCEEDED", Duration::from_secs(60));
        eprintln!(
            "job {id}: SUCCEEDED, restarts {}, attempt {}",
            job["restarts"], job["attempt"]
        );
        // A coordinator restart costs no training: no requeue, no resume from a
        // checkpoint.
        assert_eq!(job["restarts"].as_u64(), Some(0), "{job:#}");
        assert!(
            job["latest_metrics"].get("resumed_from_step").is_none(),
            "job {id} resumed from a checkpoint: {job:#}"
        );
    }
    let end = job_states(&cluster);
    assert_eq!(end.keys().collect::<Vec<_>>(), expected, "{end:?}");
    assert!(end.values().all(|s| s == "SUCCEEDED"), "{end:?}");
    eprintln!("took {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn restarted_coordinator_keeps_and_finishes_every_job_embedded_store() {
    restart_with_pending_and_running_jobs(None);
}

#[test]
fn restarted_coordinator_keeps_and_finishes_every_job_etcd_store() {
    let Some(endpoints) =
        etcd_endpoints("restarted_coordinator_keeps_and_finishes_every_job_etcd_store")
    else {
        return;
    };
    restart_with_pending_and_running_jobs(Some(unique_store_url(&endpoints)));
}
