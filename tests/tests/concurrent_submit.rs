//! Concurrent submissions: 8 client processes against 2 coordinators sharing one etcd,
//! each client submitting several jobs with its own coordinator first in the list (so half
//! of them land on the follower, which must forward or redirect). Every accepted job (every
//! id printed) exists exactly once, and nothing else does.
//!
//! Needs a real etcd: `eval "$(scripts/etcd.sh up)"` exports `TRAINYARD_ETCD_ENDPOINTS`.
//! Without it the test is skipped with a notice, except in CI (or with
//! `TRAINYARD_REQUIRE_ETCD=1`), where it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use trainyard_tests::ha::{etcd_endpoints, HaCluster};
use trainyard_tests::{run_cli, CLI_TIMEOUT};

const CLIENTS: usize = 8;
const JOBS_PER_CLIENT: usize = 5;

/// Job id -> how many times it is listed, from `jobs -o json` through `url`.
fn listed(cluster: &HaCluster, url: &str) -> BTreeMap<String, (usize, String)> {
    let v = cluster
        .cli_at(url, &["jobs", "--limit", "10000", "-o", "json"])
        .ok()
        .json();
    let mut out: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for j in v.as_array().expect("jobs -o json is an array") {
        let id = j["id"].as_str().expect("job id").to_string();
        let state = j["state"].as_str().unwrap_or("").to_string();
        let e = out.entry(id).or_insert((0, state));
        e.0 += 1;
    }
    out
}

#[test]
fn concurrent_submissions_from_8_clients_to_2_coordinators_exist_exactly_once() {
    let Some(endpoints) = etcd_endpoints(
        "concurrent_submissions_from_8_clients_to_2_coordinators_exist_exactly_once",
    ) else {
        return;
    };
    // No workers: every job stays PENDING, so the test checks the store, not training.
    let cluster = HaCluster::start(&endpoints, 2, 0);
    let urls: Vec<String> = cluster
        .addrs
        .iter()
        .map(|a| format!("http://{a}"))
        .collect();

    let started = Instant::now();
    let accepted: Vec<(usize, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                // This client's coordinator list, starting at a different coordinator.
                let n = urls.len();
                let list: Vec<&str> = (0..n).map(|k| urls[(client + k) % n].as_str()).collect();
                let list = list.join(",");
                s.spawn(move || {
                    (0..JOBS_PER_CLIENT)
                        .map(|k| {
                            let name = format!("c{client}-j{k}");
                            let out = run_cli(
                                &[
                                    "--coordinator",
                                    &list,
                                    "submit",
                                    "neural-ode",
                                    "--preset",
                                    "quick",
                                    "--set",
                                    "epochs=1",
                                    "--set",
                                    "train_samples=64",
                                    "--name",
                                    &name,
                                    "-o",
                                    "json",
                                ],
                                &[],
                                CLI_TIMEOUT,
                            )
                            .ok();
                            let id = out.json()["id"]
                                .as_str()
                                .unwrap_or_else(|| panic!("no id printed:\n{}", out.describe()))
                                .to_string();
                            (client, id)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a client thread panicked"))
            .collect()
    });
    let took = started.elapsed();
    eprintln!(
        "{} submissions from {CLIENTS} clients in {:.2} s",
        accepted.len(),
        took.as_secs_f64()
    );
    assert_eq!(accepted.len(), CLIENTS * JOBS_PER_CLIENT);

    // Every printed id is distinct...
    let ids: BTreeSet<&str> = accepted.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(
        ids.len(),
        accepted.len(),
        "an id was printed twice: {accepted:?}"
    );

    // ...and exists exactly once, as listed by the leader and by the follower alike, with
    // no job that nobody submitted.
    for url in &urls {
        let jobs = listed(&cluster, url);
        let twice: Vec<_> = jobs.iter().filter(|(_, (n, _))| *n != 1).collect();
        assert!(
            twice.is_empty(),
            "jobs listed more than once via {url}: {twice:?}"
        );
        let listed_ids: BTreeSet<&str> = jobs.keys().map(String::as_str).collect();
        assert_eq!(
            listed_ids, ids,
            "via {url}: listed jobs differ from the accepted ones"
        );
        assert_eq!(jobs.len(), CLIENTS * JOBS_PER_CLIENT);
        for (id, (_, state)) in &jobs {
            assert_eq!(state, "PENDING", "job {id} (no workers exist)");
        }
    }
    // Each accepted job carries the name its client gave it.
    for (client, id) in &accepted {
        let job = cluster.cli(&["describe", id, "-o", "json"]).ok().json();
        let name = job["spec"]["name"].as_str().unwrap_or("");
        assert!(
            name.starts_with(&format!("c{client}-j")),
            "job {id} submitted by client {client} is named {name:?}"
        );
    }

    // Clean up: cancel them all, and check that they are.
    for (_, id) in &accepted {
        cluster.cli(&["cancel", id]).ok();
    }
    let jobs = listed(&cluster, &cluster.urls());
    assert_eq!(jobs.len(), CLIENTS * JOBS_PER_CLIENT);
    for (id, (_, state)) in &jobs {
        assert_eq!(state, "CANCELLED", "job {id} after cancel");
    }
}
