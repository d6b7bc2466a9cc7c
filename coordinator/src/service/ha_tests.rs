//! Two in-process coordinators over one etcd (needs `TRAINYARD_ETCD_ENDPOINTS`; skipped
//! with a notice without it, failing in CI or with `TRAINYARD_REQUIRE_ETCD=1`): one leads,
//! the other answers reads, refuses writes with a redirect, reports its WorkerService
//! NOT_SERVING, and takes over when the leader resigns.

use super::tests::spec;
use std::time::{Duration, Instant};

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use trainyard_proto::job_service_client::JobServiceClient;
use trainyard_proto::{GetJobRequest, ListJobsRequest, SubmitJobRequest};

use crate::coordinator::LEADER_METADATA;
use crate::{start, CoordinatorConfig, CoordinatorHandle};

fn etcd() -> Option<String> {
    match std::env::var("TRAINYARD_ETCD_ENDPOINTS") {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => {
            let required = std::env::var_os("CI").is_some()
                || std::env::var("TRAINYARD_REQUIRE_ETCD").is_ok_and(|v| v == "1");
            assert!(!required, "TRAINYARD_ETCD_ENDPOINTS is required here");
            eprintln!("SKIPPED: TRAINYARD_ETCD_ENDPOINTS is not set");
            None
        }
    }
}

async fn boot(dir: &std::path::Path, store_url: &str) -> CoordinatorHandle {
    let mut c = CoordinatorConfig::with_data_dir(dir);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.store_url = store_url.to_string();
    c.heartbeat_interval = Duration::from_millis(100);
    c.heartbeat_timeout = Duration::from_millis(1000);
    start(c).await.expect("coordinator starts")
}

async fn worker_service_status(addr: std::net::SocketAddr) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(channel);
    h.check(HealthCheckRequest {
        service: "trainyard.v1.WorkerService".into(),
    })
    .await
    .unwrap()
    .into_inner()
    .status
}

async fn wait_serving(addr: std::net::SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    while worker_service_status(addr).await != ServingStatus::Serving as i32 {
        assert!(
            Instant::now() < deadline,
            "{addr} did not become the leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_redirects_writes_and_takes_over_when_the_leader_resigns() {
    let Some(endpoints) = etcd() else { return };
    let hosts = endpoints.trim().trim_start_matches("http://");
    let prefix = format!(
        "/ty-unit-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let store_url = format!("etcd://{hosts}{prefix}");
    let tmp = tempfile::tempdir().unwrap();
    let a = boot(&tmp.path().join("a"), &store_url).await;
    wait_serving(a.local_addr(), Duration::from_secs(10)).await;
    let b = boot(&tmp.path().join("b"), &store_url).await;
    let (a_addr, b_addr) = (a.local_addr(), b.local_addr());
    // b follows a.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        worker_service_status(b_addr).await,
        ServingStatus::NotServing as i32
    );

    let mut leader = JobServiceClient::connect(format!("http://{a_addr}"))
        .await
        .unwrap();
    let mut follower = JobServiceClient::connect(format!("http://{b_addr}"))
        .await
        .unwrap();
    let job = leader
        .submit_job(SubmitJobRequest {
            spec: Some(spec(0)),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();

    // Writes to the follower: Unavailable, naming the leader.
    let err = follower
        .submit_job(SubmitJobRequest {
            spec: Some(spec(0)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("not the leader; leader is {a_addr}")),
        "{err:?}"
    );
    assert_eq!(
        err.metadata()
            .get(LEADER_METADATA)
            .and_then(|v| v.to_str().ok()),
        Some(a_addr.to_string().as_str())
    );
    // Reads from the follower come from the store.
    let got = follower
        .get_job(GetJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, job.id);
    let listed = follower
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.iter().any(|j| j.id == job.id));

    // The leader resigns (graceful shutdown): the follower leads at once and has the job.
    let handover = Instant::now();
    a.shutdown().await.unwrap();
    wait_serving(b_addr, Duration::from_secs(5)).await;
    eprintln!("handover after resign: {:?}", handover.elapsed());
    let mut writes = Ok(());
    for _ in 0..50 {
        writes = follower
            .submit_job(SubmitJobRequest {
                spec: Some(spec(0)),
            })
            .await
            .map(|_| ());
        if writes.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writes.expect("the new leader accepts writes");
    let got = follower
        .get_job(GetJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, job.id);
    b.shutdown().await.unwrap();
    // Leave the shared etcd clean.
    let mut etcd = etcd_client::Client::connect([endpoints.trim()], None)
        .await
        .unwrap();
    etcd.delete(
        format!("{prefix}/"),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .unwrap();
}

/// A leader partitioned away from etcd while another one is elected: its store fence (set
/// when it took over) refuses its writes with a typed error, nothing is written, and it
/// stops leading in that term at once — before its own elector notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_write_and_steps_down() {
    use crate::coordinator::{Coordinator, OpError, Settings};
    use crate::leader::Leadership;
    use crate::store::{EtcdStore, JobQuery, StateStore};

    let Some(endpoints) = etcd() else { return };
    let endpoints: Vec<String> = endpoints.split(',').map(|e| e.trim().to_string()).collect();
    let mut config = crate::store::etcd::EtcdConfig::new(endpoints);
    config.prefix = format!("/ty-unit-fence-{}", uuid::Uuid::new_v4().simple());
    config.startup_retry = Some(Duration::from_secs(10));
    let store = EtcdStore::connect(config.clone()).await.unwrap();
    let election_key = format!("{}leader/partitioned", store.root());
    let mut kv = store.client().kv_client();
    kv.put(election_key.as_str(), "old-leader", None)
        .await
        .unwrap();
    let term = kv.get(election_key.as_str(), None).await.unwrap().kvs()[0].create_revision();
    // The old leader's view: it leads in `term` (its elector has not noticed anything).
    let (_tx, leadership) = tokio::sync::watch::channel(Leadership {
        is_leader: true,
        leader_addr: Some("127.0.0.1:1".into()),
        term: term as u64,
        key: Some(election_key.clone().into_bytes()),
        store_reachable: true,
    });
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::new(
        std::sync::Arc::new(store.clone()),
        Settings {
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_millis(1000),
            objects_url: format!("file://{}", tmp.path().display()),
            ..Settings::default()
        },
    )
    .with_leadership(leadership);
    coord.take_over().await.unwrap();
    let kept = coord
        .submit(Some(spec(0)), "")
        .await
        .expect("the leader submits");

    // Another coordinator wins the election: the old key is gone, a new one leads.
    kv.delete(election_key.as_str(), None).await.unwrap();
    kv.put(election_key.as_str(), "new-leader", None)
        .await
        .unwrap();
    let err = coord.submit(Some(spec(0)), "").await.unwrap_err();
    assert!(matches!(err, OpError::NotLeader(_)), "{err:?}");
    assert!(!coord.is_leader(), "a fenced-out leader stops leading");
    assert_eq!(coord.fenced_out_term(), term as u64);
    assert!(matches!(
        coord.cancel(&kept.id, "").await,
        Err(OpError::NotLeader(_))
    ));
    let jobs = store.list_jobs(&JobQuery::default()).await.unwrap().jobs;
    assert_eq!(jobs.len(), 1, "only the job submitted while leading exists");
    assert_eq!(jobs[0].id, kept.id);
    assert_eq!(jobs[0].state(), trainyard_proto::JobState::Pending);
    kv.delete(
        format!("{}/", config.prefix),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .unwrap();
}
