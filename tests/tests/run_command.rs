//! `trainyard run`: a throw-away local cluster runs one job and prints its results.

use std::time::Duration;

use trainyard_tests::{run_cli, tiny_neural_ode_args};

#[test]
fn run_prints_results_table_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("run");
    let args = tiny_neural_ode_args(128, 0);
    let mut cmd: Vec<&str> = vec!["run"];
    cmd.extend(args.iter().map(String::as_str));
    let data_s = data.display().to_string();
    cmd.extend_from_slice(&["--data-dir", &data_s]);
    let out = run_cli(&cmd, &[], Duration::from_secs(300)).ok();
    assert!(out.stdout.contains("SUCCEEDED"), "{}", out.describe());
    // A results table was drawn (box-drawing borders) with at least one data row.
    let table_lines = out.stdout.lines().filter(|l| l.starts_with('│')).count();
    assert!(table_lines >= 2, "no results table:\n{}", out.describe());
    // Its state lives in the data dir it printed.
    assert!(out.stdout.contains(&data_s), "{}", out.describe());
    assert!(data.exists());
}

#[test]
fn run_with_bad_input_exits_2_before_starting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("never");
    let data_s = data.display().to_string();
    let out = run_cli(
        &[
            "run",
            "neural-ode",
            "--set",
            "width=-3",
            "--data-dir",
            &data_s,
        ],
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, 2, "{}", out.describe());
    assert!(out.stderr.contains("width"), "{}", out.describe());
    assert!(!data.exists(), "a cluster was started for a bad job");
}
