//! The paper jobs over real processes: `gm-dgm` and `db-vae`, shrunk to seconds, train
//! data-parallel with 2 ranks on 2 workers × 1 emulated GPU (TCP ring between the rank
//! processes), and end with a results table, metrics and a checkpoint.

use std::time::Duration;

use trainyard_tests::{Cluster, ClusterOptions};

fn sets(pairs: &[(&str, &str)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(k, v)| ["--set".to_string(), format!("{k}={v}")])
        .collect()
}

fn run_two_ranks(cluster: &Cluster, job: &str, pairs: &[(&str, &str)]) -> serde_json::Value {
    let mut args: Vec<String> = vec![job.to_string()];
    args.extend(sets(pairs));
    args.extend(["--ranks", "2", "--device-kind", "gpu"].map(String::from));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = cluster.submit(&argv);
    let done = cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(300));
    let workers: std::collections::BTreeSet<&str> = done["placement"]
        .as_array()
        .map(|p| p.iter().filter_map(|r| r["worker_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(workers.len(), 2, "one rank per worker: {done}");
    let logs = cluster.cli(&["logs", &id]).ok().stdout;
    assert!(logs.contains("of 2 connected (ring)"), "{job}: {logs}");
    assert!(
        done["result"]["rows"]
            .as_array()
            .is_some_and(|r| r.len() >= 2),
        "{job}: treatment and baseline rows expected: {done}"
    );
    assert!(
        done["latest_checkpoint"]["step"].as_u64().unwrap_or(0) > 0,
        "{job}: no checkpoint: {done}"
    );
    done
}

#[test]
fn gm_dgm_and_db_vae_train_data_parallel_on_two_workers() {
    let cluster = Cluster::start_with(ClusterOptions {
        workers: 2,
        devices: String::new(),
        emulate_gpus: 1,
        ..ClusterOptions::default()
    });
    let gm = run_two_ranks(
        &cluster,
        "gm-dgm",
        &[
            ("train_samples", "400"),
            ("test_samples", "100"),
            ("labelled_fraction", "0.1"),
            ("epochs", "1"),
            ("hidden", "8"),
            ("latent", "4"),
            ("batch_size", "32"),
            ("checkpoint_every", "2"),
        ],
    );
    assert!(
        gm["latest_metrics"].as_object().is_some_and(|m| m
            .keys()
            .any(|k| k.starts_with("gmdgm/") || k.starts_with("gm"))),
        "{gm}"
    );
    let db = run_two_ranks(
        &cluster,
        "db-vae",
        &[
            ("train_positives", "128"),
            ("train_negatives", "128"),
            ("rare_fraction", "0.05"),
            ("test_per_group", "10"),
            ("test_negatives", "40"),
            ("latent_dim", "4"),
            ("hidden", "16"),
            ("epochs", "1"),
            ("batch_size", "32"),
            ("checkpoint_every", "2"),
        ],
    );
    let artifacts = db["artifacts"].as_array().cloned().unwrap_or_default();
    assert!(
        artifacts.iter().any(|a| a["name"] == "db-vae-weights.png"),
        "{db}"
    );
}
