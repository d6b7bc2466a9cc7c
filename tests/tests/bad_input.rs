//! Bad inputs exit with code 2, name the problem, and store nothing.

use trainyard_tests::{Cluster, Output};

fn assert_bad(out: &Output, needle: &str) {
    assert_eq!(
        out.code,
        2,
        "`{}` should exit 2:\n{}",
        out.command,
        out.describe()
    );
    assert!(
        out.stderr.contains(needle),
        "`{}`: stderr should mention {needle:?}:\n{}",
        out.command,
        out.describe()
    );
}

#[test]
fn bad_submissions_exit_2_and_store_nothing() {
    let cluster = Cluster::start(1);
    let before = cluster.job_ids();

    assert_bad(
        &cluster.cli(&["submit", "no-such-job"]),
        "unknown job \"no-such-job\"",
    );
    assert_bad(
        &cluster.cli(&["submit", "neural-ode", "--set", "epochs=lots"]),
        "epochs",
    );
    assert_bad(
        &cluster.cli(&["submit", "neural-ode", "--set", "epochs=0"]),
        "epochs",
    );
    assert_bad(
        &cluster.cli(&["submit", "neural-ode", "--set", "learning_rate=1"]),
        "learning_rate",
    );
    assert_bad(
        &cluster.cli(&["submit", "neural-ode", "--set", "epochs"]),
        "--set \"epochs\"",
    );
    assert_bad(
        &cluster.cli(&["submit", "neural-ode", "--preset", "gigantic"]),
        "gigantic",
    );
    // More ranks than the job supports (caught locally) ...
    assert_bad(
        &cluster.cli(&["submit", "neural-ode", "--ranks", "64"]),
        "spec.ranks",
    );
    // ... and a gang that can never fit this cpu-only cluster (checked by the coordinator).
    assert_bad(
        &cluster.cli(&["submit", "neural-ode", "--device-kind", "gpu"]),
        "gpu",
    );
    assert_bad(
        &cluster.cli(&["submit", "neural-ode", "--device-kind", "tpu"]),
        "spec.device_kind",
    );
    // Not a number at all: clap rejects it.
    assert_bad(
        &cluster.cli(&["submit", "neural-ode", "--ranks", "two"]),
        "--ranks",
    );

    // Spec files: malformed, unknown field, bad value.
    let dir = cluster.dir.path();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let malformed = write("malformed.yaml", "job: neural-ode\nconfig: [epochs: 1\n");
    assert_bad(
        &cluster.cli(&["submit", "-f", &malformed]),
        "malformed.yaml",
    );
    let unknown = write("unknown.yaml", "job: neural-ode\nrankz: 2\n");
    assert_bad(&cluster.cli(&["submit", "-f", &unknown]), "rankz");
    let json = write(
        "bad.json",
        "{\"job\": \"neural-ode\", \"config\": {\"epochs\": \"x\"}}",
    );
    assert_bad(&cluster.cli(&["submit", "-f", &json]), "epochs");
    let missing = dir.join("missing.yaml").display().to_string();
    assert_bad(&cluster.cli(&["submit", "-f", &missing]), "missing.yaml");

    // Unknown ids: NotFound is bad input too.
    assert_bad(&cluster.cli(&["describe", "no-such-id"]), "no-such-id");
    assert_bad(&cluster.cli(&["cancel", "no-such-id"]), "no-such-id");
    assert_bad(&cluster.cli(&["jobs", "--state", "sleepy"]), "sleepy");

    // Nothing was stored.
    assert_eq!(cluster.job_ids(), before, "a rejected submit stored a job");
}

#[test]
fn unreachable_coordinator_exits_1_with_a_hint() {
    let port = trainyard_tests::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let out = trainyard_tests::run_cli(
        &["--coordinator", &url, "jobs"],
        &[],
        std::time::Duration::from_secs(30),
    );
    assert_eq!(out.code, 1, "{}", out.describe());
    assert!(
        out.stderr.contains("cannot reach the coordinator"),
        "{}",
        out.describe()
    );
}
