//! Tests of the `trainyard` binary that need no cluster: help, local validation, exit codes.
//!
//! (Having an integration test here also makes `cargo test --workspace` build
//! `target/debug/trainyard`, which the end-to-end tests in `tests/` run.)

use std::process::{Command, Output};

fn trainyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainyard"))
        .args(args)
        .env_remove("TRAINYARD_COORDINATOR")
        .env_remove("RUST_LOG")
        .output()
        .expect("running trainyard")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn closed_port_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

#[test]
fn help_lists_the_commands_but_not_rank() {
    let o = trainyard(&["--help"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for cmd in [
        "coordinator",
        "worker",
        "submit",
        "jobs",
        "describe",
        "logs",
        "cancel",
        "workers",
        "checkpoints",
        "job-types",
        "local",
        "run",
        "gpu-check",
    ] {
        assert!(out.contains(cmd), "--help lacks {cmd}:\n{out}");
    }
    assert!(!out.contains("  rank "), "rank should be hidden:\n{out}");
}

#[test]
#[cfg(not(feature = "cuda"))]
fn gpu_check_without_cuda_says_so_and_exits_2() {
    let o = trainyard(&["gpu-check"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("no cuda support"), "{out}");
    // bad arguments are bad input (2) too, and name the flag
    let o = trainyard(&["gpu-check", "--batches", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--batches"), "{}", stderr(&o));
}

#[test]
fn worker_gpu_devices_without_cuda_name_the_feature() {
    if cfg!(feature = "cuda") {
        return;
    }
    let o = trainyard(&[
        "worker",
        "--devices",
        "gpu:0",
        "--coordinator",
        &closed_port_url(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("--devices") && err.contains("built without cuda"),
        "{err}"
    );
}

#[test]
fn job_types_json_lists_neural_ode_and_its_keys() {
    let o = trainyard(&["job-types", "-o", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let ode = v
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "neural-ode")
        .expect("neural-ode");
    assert_eq!(ode["default_preset"], "quick");
    assert!(ode["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["name"] == "epochs"));
}

#[test]
fn bad_submissions_fail_with_2_before_contacting_anyone() {
    // Nothing listens at this URL: the errors must come from local validation.
    let url = closed_port_url();
    let cases: &[(&[&str], &str)] = &[
        (&["submit", "nope"], "spec.job: unknown job \"nope\""),
        (
            &["submit", "neural-ode", "--set", "epochs"],
            "--set \"epochs\"",
        ),
        (
            &["submit", "neural-ode", "--set", "epochs=-1"],
            "spec.config.epochs",
        ),
        (
            &["submit", "neural-ode", "--set", "nope=1"],
            "spec.config.nope",
        ),
        (&["submit", "neural-ode", "--ranks", "1000"], "spec.ranks"),
        (
            &["submit", "neural-ode", "--keep-best", "2"],
            "spec.checkpoints.best_metric: required when keep_best > 0",
        ),
        (
            &["submit", "neural-ode", "--keep-checkpoints", "0"],
            "spec.checkpoints.keep_latest",
        ),
        (
            &["submit", "neural-ode", "--best-mode", "biggest"],
            "--best-mode",
        ),
        (
            &["submit", "neural-ode", "--from-checkpoint", "job-a"],
            "spec.from_checkpoint",
        ),
        (
            &["submit", "neural-ode", "--priority", "high"],
            "--priority",
        ),
        (
            &["submit", "-f", "/nonexistent/spec.yaml"],
            "/nonexistent/spec.yaml",
        ),
        (&["run", "nope"], "unknown job"),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, needle) in cases {
        let mut full = vec!["--coordinator", url.as_str()];
        full.extend_from_slice(args);
        let o = trainyard(&full);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(needle),
            "{args:?}: stderr lacks {needle:?}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn unreachable_coordinator_is_exit_1() {
    let o = trainyard(&["--coordinator", &closed_port_url(), "submit", "neural-ode"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot reach the coordinator"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn rank_without_an_assignment_refuses_to_start() {
    let o = Command::new(env!("CARGO_BIN_EXE_trainyard"))
        .arg("rank")
        .env_remove("TRAINYARD_ASSIGNMENT")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("TRAINYARD_ASSIGNMENT"),
        "{}",
        stderr(&o)
    );
}
