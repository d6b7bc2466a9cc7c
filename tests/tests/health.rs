//! The coordinator answers the standard gRPC health check.

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use trainyard_tests::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_reports_serving() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(0))
        .await
        .unwrap();
    let channel = tonic::transport::Channel::from_shared(cluster.url.clone())
        .expect("valid url")
        .connect()
        .await
        .expect("connect to the coordinator");
    let mut client = HealthClient::new(channel);
    let resp = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(resp.status(), ServingStatus::Serving);
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

#[test]
fn cluster_lists_workers_and_job_types() {
    let cluster = Cluster::start(2);
    let workers = cluster.cli_json(&["workers"]);
    let mut names: Vec<&str> = workers
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["w0", "w1"], "{workers}");
    for w in workers.as_array().unwrap() {
        assert_eq!(w["state"], "ALIVE");
        assert_eq!(w["devices"].as_array().map(Vec::len), Some(1), "{w}");
        assert_eq!(w["devices"][0]["kind"], "cpu");
    }
    let table = cluster.cli(&["workers"]).ok();
    assert!(
        table.stdout.contains("w0") && table.stdout.contains("0/2 device slots in use"),
        "{}",
        table.stdout
    );

    // The coordinator's job types (not this binary's: `--local` is not given).
    let types = cluster.cli(&["job-types", "-o", "json"]).ok();
    assert!(
        !types.stderr.contains("built into this binary"),
        "{}",
        types.describe()
    );
    let types = types.json();
    let ode = types
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "neural-ode")
        .expect("neural-ode");
    assert!(
        ode["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["name"] == "checkpoint_every"),
        "{ode}"
    );
}
