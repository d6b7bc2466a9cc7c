//! Data sets from object storage with real processes: `trainyard data push` uploads the
//! MNIST-10k folder of the repository to S3, jobs name it with `--set dataset=<url>`, and
//! the worker downloads it once (its second job finds it in the cache). Bad input exits 2.
//! The S3 case needs the server of `scripts/s3.sh up` (required in CI).

use std::path::PathBuf;
use std::time::Duration;

use trainyard_objects::testing::{s3_test_env, unique_prefix};
use trainyard_tests::{run_cli, tiny_neural_ode_args, Cluster, ClusterOptions};

fn mnist_folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../jobs/data/mnist-10k")
}

#[test]
fn a_pushed_data_set_is_downloaded_once_per_worker_and_trains() {
    let Some(env) = s3_test_env() else { return };
    let url = env.url(&unique_prefix("e2e-dataset"));
    let folder = mnist_folder().display().to_string();
    let pushed = run_cli(
        &["data", "push", &folder, &url],
        &[],
        Duration::from_secs(120),
    )
    .ok();
    assert!(
        pushed.stdout.contains("pushed 4 files"),
        "{}",
        pushed.describe()
    );
    let info = run_cli(&["data", "info", &url], &[], Duration::from_secs(60)).ok();
    assert!(
        info.stdout.contains("train-images-idx3-ubyte.gz"),
        "{}",
        info.describe()
    );

    let cluster = Cluster::start_with(ClusterOptions {
        workers: 1,
        ..ClusterOptions::default()
    });
    let dataset = format!("dataset={url}");
    let mut args = tiny_neural_ode_args(64, 1000);
    args.extend(["--set".to_string(), dataset]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut logs = Vec::new();
    for _ in 0..2 {
        let id = cluster.submit(&args);
        cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(300));
        logs.push(cluster.cli(&["logs", &id]).ok().stdout);
    }
    assert!(logs[0].contains("downloaded in"), "first job:\n{}", logs[0]);
    assert!(
        logs[1].contains("already in the worker's cache"),
        "second job:\n{}",
        logs[1]
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let objects = trainyard_objects::open_objects(&url).expect("opening the test store");
    for o in rt.block_on(objects.list("")).expect("listing the data set") {
        rt.block_on(objects.delete(&o.path)).expect("cleaning up");
    }
}

#[test]
fn bad_data_set_input_exits_2() {
    let out = run_cli(
        &["data", "push", "/nonexistent-folder", "file:///tmp/x"],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, 2, "{}", out.describe());
    assert!(out.stderr.contains("not a folder"), "{}", out.describe());

    let empty = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}/nothing-here", empty.path().display());
    let out = run_cli(&["data", "info", &url], &[], Duration::from_secs(30));
    assert_eq!(out.code, 2, "{}", out.describe());
    assert!(
        out.stderr.contains("no data set there"),
        "{}",
        out.describe()
    );

    let cluster = Cluster::start(1);
    let out = cluster.cli(&["submit", "neural-ode", "--set", "dataset=ftp://host/mnist"]);
    assert_eq!(out.code, 2, "{}", out.describe());
    assert!(out.stderr.contains("dataset"), "{}", out.describe());
}
