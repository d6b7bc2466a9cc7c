//! Object storage by URL with real processes: the coordinator probes `--objects` at start
//! (a bad URL, a wrong secret or a missing bucket exit 2 at once, naming the problem and
//! never the secret), and a job's checkpoints go to S3 with each worker reading the
//! credentials from its own environment. The S3 cases need the test server of
//! `scripts/s3.sh up`; without it they print a notice and pass, unless `CI` or
//! `TRAINYARD_REQUIRE_S3=1` is set.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use trainyard_objects::testing::{s3_test_env, unique_prefix};
use trainyard_tests::{run_cli, tiny_neural_ode_args, Cluster, ClusterOptions, Output};

/// `trainyard coordinator` on a free port with `--objects url` and extra environment; it
/// is expected to exit on its own.
fn coordinator_exit(objects: &str, envs: &[(&str, &str)]) -> (Output, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().display().to_string();
    let started = Instant::now();
    let out = run_cli(
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--objects",
            objects,
        ],
        envs,
        Duration::from_secs(90),
    );
    (out, started.elapsed())
}

fn assert_exit_2(out: &Output, needles: &[&str]) {
    assert_eq!(
        out.code,
        2,
        "`{}` should exit 2:\n{}",
        out.command,
        out.describe()
    );
    for needle in needles {
        assert!(
            out.stderr.contains(needle),
            "stderr should mention {needle:?}:\n{}",
            out.describe()
        );
    }
}

#[test]
fn bad_objects_urls_exit_2_naming_the_parameter() {
    let (out, _) = coordinator_exit("ftp://host/x", &[]);
    assert_exit_2(&out, &["ftp://host/x", "not supported"]);
    let (out, _) = coordinator_exit("s3://bucket/x?regoin=eu-west-1", &[]);
    assert_exit_2(&out, &["regoin", "unknown parameter"]);
    let secret = "secret-in-the-url-0123456789";
    let (out, _) = coordinator_exit(&format!("s3://AKIAX:{secret}@bucket/x"), &[]);
    assert_exit_2(&out, &["not accepted in the URL"]);
    assert!(!out.stderr.contains(secret), "{}", out.describe());
}

#[test]
fn coordinator_with_a_wrong_s3_secret_or_bucket_fails_fast_with_exit_2() {
    let Some(env) = s3_test_env() else { return };
    let url = env.url(&unique_prefix("e2e-bad-secret"));
    let wrong = "e2e-wrong-secret-0123456789abcdef";
    let (out, took) = coordinator_exit(&url, &[("AWS_SECRET_ACCESS_KEY", wrong)]);
    assert_exit_2(&out, &[&url, "probe failed", "access denied"]);
    assert!(!out.stdout.contains("listening"), "{}", out.describe());
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let real = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default();
    for secret in [wrong, real.as_str()] {
        assert!(
            !out.stderr.contains(secret) && !out.stdout.contains(secret),
            "a secret was printed:\n{}",
            out.describe()
        );
    }

    let missing = format!("s3://no-such-bucket-{}/x", std::process::id());
    let (out, _) = coordinator_exit(&missing, &[]);
    assert_exit_2(&out, &[&missing, "bucket does not exist"]);

    // An endpoint nobody listens on is not a configuration error: exit 1, but still fast.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let endpoint = format!("http://127.0.0.1:{closed}");
    let (out, took) = coordinator_exit(&url, &[("TRAINYARD_S3_ENDPOINT", endpoint.as_str())]);
    assert_eq!(out.code, 1, "{}", out.describe());
    assert!(out.stderr.contains("unreachable"), "{}", out.describe());
    assert!(took < Duration::from_secs(40), "took {took:?}");
}

#[test]
fn job_checkpoints_go_to_s3_with_credentials_from_each_process() {
    let Some(env) = s3_test_env() else { return };
    let url = env.url(&unique_prefix("e2e-job"));
    let cluster = Cluster::start_with_objects(
        ClusterOptions {
            workers: 1,
            ..ClusterOptions::default()
        },
        Some(&url),
    );
    let args = tiny_neural_ode_args(128, 4);
    let submit: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = cluster.submit(&submit);
    let job = cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(300));

    let cp = &job["latest_checkpoint"];
    let step = cp["step"].as_u64().expect("latest_checkpoint.step");
    let path = cp["path"].as_str().expect("latest_checkpoint.path");
    assert_eq!(path, format!("jobs/{id}/checkpoints/{step}"));
    assert!(
        !cluster.objects_dir().exists(),
        "nothing goes to the local objects folder"
    );

    // The checkpoint is in the bucket, under the URL's prefix, with matching digests.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let objects = trainyard_objects::open_objects(&url).expect("opening the test store");
    let manifest = rt
        .block_on(objects.get(&format!("{path}/manifest.json")))
        .expect("reading the manifest")
        .expect("the manifest is in S3");
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest.bytes).expect("manifest is JSON");
    assert_eq!(manifest["job_id"], id.as_str());
    assert_eq!(manifest["step"], step);
    for f in manifest["files"].as_array().expect("manifest.files") {
        let name = f["name"].as_str().expect("file name");
        let got = rt
            .block_on(objects.get(&format!("{path}/{name}")))
            .expect("reading a checkpoint file")
            .unwrap_or_else(|| panic!("{name} is missing in S3"));
        assert_eq!(Some(got.info.size), f["size"].as_u64(), "size of {name}");
        assert_eq!(
            Some(hex_sha256(&got.bytes).as_str()),
            f["sha256"].as_str(),
            "digest of {name}"
        );
    }

    // The secret appears in no log (the URL does).
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default();
    let coordinator_log =
        std::fs::read_to_string(&cluster.coordinator.log_path).unwrap_or_default();
    assert!(
        coordinator_log.contains("object store probe passed"),
        "{coordinator_log}"
    );
    for p in std::iter::once(&cluster.coordinator).chain(&cluster.workers) {
        let log = std::fs::read_to_string(&p.log_path).unwrap_or_default();
        assert!(
            !secret.is_empty() && !log.contains(&secret),
            "{}: the secret is in its log",
            p.name
        );
    }
    rt.block_on(objects.delete_prefix("jobs"))
        .expect("cleaning up");
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
