//! Cancelling a running job: the job ends CANCELLED and its rank process is gone.

use std::time::Duration;

use trainyard_tests::{pid_alive, poll, rank_pids, tiny_neural_ode_args, Cluster};

#[test]
fn cancel_running_job_kills_its_rank() {
    let cluster = Cluster::start(1);
    // Large enough to still be training when we cancel it.
    let args = tiny_neural_ode_args(8000, 1000);
    let mut submit: Vec<&str> = args.iter().map(String::as_str).collect();
    submit.extend_from_slice(&["--set", "epochs=50", "--grace-period", "5"]);
    let id = cluster.submit(&submit);

    cluster.wait_state(&id, "RUNNING", Duration::from_secs(120));
    let pids = poll(
        "the job's rank process",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let p = rank_pids(&id);
            (!p.is_empty()).then_some(p)
        },
    );

    let out = cluster
        .cli(&["cancel", &id, "--reason", "e2e test", "-o", "json"])
        .ok();
    let state = out.json()["state"].as_str().unwrap_or_default().to_string();
    assert!(
        matches!(state.as_str(), "CANCELLED" | "RUNNING"),
        "cancel returned state {state}: {}",
        out.stdout
    );

    let job = cluster.wait_state(&id, "CANCELLED", Duration::from_secs(60));
    let last = job["transitions"]
        .as_array()
        .and_then(|t| t.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["to"], "CANCELLED");
    assert!(
        last["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("e2e test"),
        "cancel reason not recorded: {last}"
    );

    // The rank process is gone (SIGTERM, or SIGKILL after the 5 s grace period).
    poll(
        "the rank process to exit",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || pids.iter().all(|p| !pid_alive(*p)).then_some(()),
    );
    assert!(rank_pids(&id).is_empty());

    // Cancelled is terminal: a second cancel does not change it, and the worker is free.
    let again = cluster.cli(&["cancel", &id, "-o", "json"]);
    if again.code == 0 {
        assert_eq!(again.json()["state"], "CANCELLED", "{}", again.describe());
    } else {
        assert_eq!(again.code, 2, "{}", again.describe());
    }
    assert_eq!(cluster.describe(&id)["state"], "CANCELLED");
    poll(
        "the worker's slot to be free",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let ws = cluster.cli_json(&["workers"]);
            ws.as_array()?
                .iter()
                .all(|w| w["used"].as_array().is_some_and(|u| u.is_empty()))
                .then_some(())
        },
    );
}
