//! A job submitted through the CLI to a coordinator and two workers (real processes)
//! trains to SUCCEEDED, with metrics, a committed checkpoint, and logs.

use std::time::Duration;

use trainyard_tests::{tiny_neural_ode_args, Cluster};

#[test]
fn neural_ode_trains_to_success_with_checkpoint_metrics_and_logs() {
    let cluster = Cluster::start(2);
    let args = tiny_neural_ode_args(128, 4);
    let mut submit: Vec<&str> = args.iter().map(String::as_str).collect();
    submit.extend_from_slice(&["--name", "e2e-train"]);
    let id = cluster.submit(&submit);

    let job = cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(300));
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["spec"]["name"], "e2e-train");
    assert_eq!(job["spec"]["config"]["train_samples"], "128");
    assert_eq!(job["restarts"], 0);
    assert_eq!(job["placement"].as_array().map(Vec::len), Some(1), "{job}");

    // Metrics: the job reported some, all finite numbers, including an accuracy in [0, 1].
    let metrics = job["latest_metrics"]
        .as_object()
        .expect("latest_metrics is an object");
    assert!(!metrics.is_empty(), "no metrics: {job}");
    let accs: Vec<f64> = metrics
        .iter()
        .filter(|(k, _)| k.contains("acc"))
        .map(|(k, v)| {
            v.as_f64()
                .unwrap_or_else(|| panic!("metric {k} is not a number: {v}"))
        })
        .collect();
    assert!(!accs.is_empty(), "no accuracy metric in {metrics:?}");
    assert!(
        accs.iter().all(|a| (0.0..=1.0).contains(a)),
        "accuracies out of range: {metrics:?}"
    );

    // The latest checkpoint is committed: its manifest exists in the object folder.
    let cp = &job["latest_checkpoint"];
    let step = cp["step"].as_u64().expect("latest_checkpoint.step");
    assert!(step > 0, "checkpoint at step 0: {cp}");
    let path = cp["path"].as_str().expect("latest_checkpoint.path");
    assert_eq!(path, format!("jobs/{id}/checkpoints/{step}"));
    let manifest = cluster.objects_dir().join(path).join("manifest.json");
    let text = std::fs::read_to_string(&manifest)
        .unwrap_or_else(|e| panic!("reading {}: {e}", manifest.display()));
    let manifest: serde_json::Value = serde_json::from_str(&text).expect("manifest is JSON");
    assert_eq!(manifest["job_id"], id.as_str());
    assert_eq!(manifest["step"], step);
    for f in manifest["files"].as_array().expect("manifest.files") {
        let name = f["name"].as_str().expect("file name");
        let size = std::fs::metadata(cluster.objects_dir().join(path).join(name))
            .unwrap_or_else(|e| panic!("checkpoint file {name}: {e}"))
            .len();
        assert_eq!(Some(size), f["size"].as_u64(), "size of {name}");
    }

    // `checkpoints` lists it.
    let cps = cluster.cli_json(&["checkpoints", &id]);
    let cps = cps.as_array().expect("checkpoints is a list");
    assert!(
        cps.iter().any(|c| c["step"] == step && c["path"] == path),
        "checkpoint {path} not listed: {cps:?}"
    );
    // Its table form too.
    let table = cluster.cli(&["checkpoints", &id]).ok();
    assert!(table.stdout.contains(path), "{}", table.stdout);

    // `logs` shows the job's lines; `describe` (table) and `jobs` show the job.
    let logs = cluster.cli(&["logs", &id]).ok();
    assert!(
        logs.stdout.lines().count() >= 3,
        "too few log lines:\n{}",
        logs.stdout
    );
    let described = cluster.cli(&["describe", &id]).ok();
    assert!(
        described.stdout.contains("SUCCEEDED"),
        "{}",
        described.stdout
    );
    let listed = cluster.cli_json(&["jobs", "--state", "succeeded"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id.as_str()),
        "{listed}"
    );
    let listed = cluster.cli_json(&["jobs", "--state", "running"]);
    assert!(
        !listed
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id.as_str()),
        "{listed}"
    );

    // The history went through the whole lifecycle, in order.
    let to: Vec<&str> = job["transitions"]
        .as_array()
        .expect("transitions")
        .iter()
        .filter_map(|t| t["to"].as_str())
        .collect();
    let pos = |s: &str| {
        to.iter()
            .position(|t| *t == s)
            .unwrap_or_else(|| panic!("no {s} in {to:?}"))
    };
    assert!(
        pos("SCHEDULED") < pos("RUNNING") && pos("RUNNING") < pos("SUCCEEDED"),
        "{to:?}"
    );
}

#[test]
fn submit_follow_prints_results_and_exit_code() {
    let cluster = Cluster::start(1);
    let args = tiny_neural_ode_args(64, 0);
    let mut submit: Vec<&str> = vec!["submit"];
    submit.extend(args.iter().map(String::as_str));

    // Table mode: live lines, the results table, a summary line; exit 0 on success.
    let mut follow = submit.clone();
    follow.push("--follow");
    let out = cluster.cli(&follow).ok();
    assert!(out.stdout.contains("→ RUNNING"), "{}", out.describe());
    assert!(out.stdout.contains("SUCCEEDED after"), "{}", out.describe());
    assert!(
        out.stdout.lines().any(|l| l.starts_with('│')),
        "no results table:\n{}",
        out.describe()
    );

    // JSON mode: nothing but the final job.
    follow.extend_from_slice(&["-o", "json"]);
    let out = cluster.cli(&follow).ok();
    let job = out.json();
    assert_eq!(job["state"], "SUCCEEDED", "{job}");
    assert!(
        !job["result"]["rows"]
            .as_array()
            .expect("result rows")
            .is_empty(),
        "{job}"
    );
}

#[test]
fn spec_file_with_flag_overrides_is_stored_as_given() {
    let cluster = Cluster::start(1);
    let spec = cluster.dir.path().join("job.yaml");
    std::fs::write(
        &spec,
        "job: neural-ode\nname: from-file\npriority: 3\nmax_restarts: 1\nconfig:\n  \
         train_samples: 64\n  test_samples: 32\n  eval_batch_size: 32\n  epochs: 1\n  \
         width: 4\n  batch_size: 16\n  augment: false\n",
    )
    .unwrap();
    let spec = spec.display().to_string();
    let id = cluster.submit(&["-f", &spec, "--priority", "7", "--set", "width=2"]);
    let job = cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(300));
    let s = &job["spec"];
    assert_eq!(s["name"], "from-file");
    assert_eq!(s["priority"], 7, "flag overrides the file");
    assert_eq!(s["max_restarts"], 1);
    assert_eq!(s["config"]["width"], "2", "--set overrides the file");
    assert_eq!(s["config"]["augment"], "false");
    let resolved: serde_json::Value =
        serde_json::from_str(job["resolved_config_json"].as_str().unwrap()).unwrap();
    assert_eq!(resolved["preset"], "quick", "{resolved}");
    assert_eq!(resolved["values"]["width"], 2, "{resolved}");
    assert_eq!(resolved["values"]["train_samples"], 64, "{resolved}");
}
