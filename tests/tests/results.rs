//! Results over real processes: a job stores plots with its results (`ctx.save_artifact`),
//! the coordinator lists them on the job, `trainyard results` prints the table and the
//! files and `--download` fetches them from the object store; `trainyard reproduce` runs a
//! job and prints its claims.

use std::time::Duration;

use trainyard_tests::Cluster;

/// A tiny CNF run of the neural-ode job on two moons (seconds).
const TINY_CNF: &[&str] = &[
    "neural-ode",
    "--set",
    "experiment=cnf",
    "--set",
    "cnf_density=moons",
    "--set",
    "cnf_iterations=15",
    "--set",
    "cnf_batch_size=64",
    "--set",
    "cnf_test_samples=128",
    "--set",
    "cnf_grid=16",
    "--set",
    "cnf_width=8",
    "--set",
    "cnf_planar_layers=4",
    "--set",
    "cnf_tol=0.01",
];

#[test]
fn plots_are_stored_with_the_results_and_can_be_downloaded() {
    let cluster = Cluster::start(1);
    let id = cluster.submit(TINY_CNF);
    let job = cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(240));
    let artifacts = job["artifacts"].as_array().cloned().unwrap_or_default();
    let plot = artifacts
        .iter()
        .find(|a| a["name"] == "cnf-moons.png")
        .unwrap_or_else(|| panic!("no cnf-moons.png among {artifacts:?}"));
    assert_eq!(plot["path"], format!("jobs/{id}/results/cnf-moons.png"));
    assert!(
        plot["url"]
            .as_str()
            .unwrap_or_default()
            .ends_with(&format!("jobs/{id}/results/cnf-moons.png")),
        "{plot}"
    );
    let stored = cluster
        .objects_dir()
        .join(format!("jobs/{id}/results/cnf-moons.png"));
    let bytes = std::fs::read(&stored).expect("the plot is in the object store");
    assert_eq!(plot["size_bytes"].as_u64(), Some(bytes.len() as u64));

    // The table and the files, as text; then downloaded.
    let out = cluster.cli(&["results", &id]).ok().stdout;
    assert!(out.contains("cnf-moons.png"), "{out}");
    assert!(
        out.contains("Planar"),
        "the results table is printed: {out}"
    );
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("got");
    let out = cluster
        .cli(&["results", &id, "--download", to.to_str().unwrap()])
        .ok()
        .stdout;
    assert!(out.contains("downloaded"), "{out}");
    let got = std::fs::read(to.join("cnf-moons.png")).expect("downloaded");
    assert_eq!(got, bytes);
    assert_eq!(&got[..8], b"\x89PNG\r\n\x1a\n");

    // The job's history mentions the stored file.
    let logs = cluster.cli(&["describe", &id, "-o", "json"]).ok().json();
    assert!(
        logs["artifacts"].as_array().is_some_and(|a| !a.is_empty()),
        "{logs}"
    );
}

#[test]
fn reproduce_prints_whether_the_claims_held() {
    let cluster = Cluster::start(1);
    let mut args = vec!["reproduce"];
    for pair in TINY_CNF.iter().skip(1).collect::<Vec<_>>().chunks(2) {
        args.extend(pair.iter().copied());
    }
    args.extend(["neural-ode", "-o", "json"]);
    let out = cluster.cli(&args).ok().json();
    let rows = out.as_array().cloned().unwrap_or_default();
    assert!(!rows.is_empty(), "{out}");
    // The CNF run checks one structured claim per density it trained.
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["experiment"], "cnf/moons", "{out}");
    assert!(
        rows[0]["treatment"]
            .as_str()
            .unwrap_or_default()
            .starts_with("CNF "),
        "{out}"
    );
    for row in &rows {
        assert_eq!(row["job"], "neural-ode", "{row}");
        assert_eq!(row["state"], "SUCCEEDED", "{row}");
        assert!(row["held"].is_boolean(), "{row}");
        assert!(
            !row["claim"].as_str().unwrap_or_default().is_empty(),
            "{row}"
        );
        // the number behind the text travels with the claim
        assert!(
            row["treatment_value"].as_f64().is_some_and(f64::is_finite),
            "{row}"
        );
        assert_eq!(row["unit"], "nats", "{row}");
    }

    // Two seeds: each a job of its own, then one summary per claim over them.
    let mut seeded = args.clone();
    seeded.extend(["--seeds", "3-4"]);
    let out = cluster.cli(&seeded).ok().json();
    let runs = out["runs"].as_array().cloned().unwrap_or_default();
    assert_eq!(runs.len(), 2, "{out}");
    assert_eq!(
        (runs[0]["seed"].as_u64(), runs[1]["seed"].as_u64()),
        (Some(3), Some(4))
    );
    assert_ne!(runs[0]["job_id"], runs[1]["job_id"], "{out}");
    let claims = out["claims"].as_array().cloned().unwrap_or_default();
    assert_eq!(claims.len(), 1, "{out}");
    let c = &claims[0];
    assert_eq!(
        (c["runs"].as_u64(), c["experiment"].as_str()),
        (Some(2), Some("cnf/moons"))
    );
    assert!(c["held"].as_u64().is_some_and(|h| h <= 2), "{c}");
    let mean = c["treatment"]["mean"]
        .as_f64()
        .expect("a mean over the seeds");
    let per_seed: Vec<f64> = runs
        .iter()
        .filter_map(|r| r["treatment_value"].as_f64())
        .collect();
    assert_eq!(per_seed.len(), 2, "{out}");
    assert!(
        (mean - (per_seed[0] + per_seed[1]) / 2.0).abs() < 1e-9,
        "{c}"
    );

    // --seeds and --set seed=… contradict each other: a usage error, nothing submitted.
    let mut both = args.clone();
    both.extend(["--seeds", "1", "--set", "seed=2"]);
    let bad = cluster.cli(&both);
    assert_eq!(bad.code, 2, "{}", bad.describe());
    assert!(bad.stderr.contains("--seeds"), "{}", bad.describe());
    let jobs = cluster.cli(&["jobs", "-o", "json"]).ok().json();
    assert_eq!(jobs.as_array().map(Vec::len), Some(3), "{jobs}");
}
