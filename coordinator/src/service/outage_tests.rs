//! etcd down during operation, against a private etcd process this test starts on free
//! loopback ports with a temporary data folder (so stopping it disturbs no other test).
//! Needs the `etcd` binary on `PATH`; without it the test prints a notice and passes,
//! unless `CI` or `TRAINYARD_REQUIRE_ETCD=1` is set, where a missing etcd fails it.
//!
//! The coordinator must stop scheduling and report NOT_SERVING for the job and worker
//! services while etcd is frozen (SIGSTOP) or dead (SIGKILL), never crash on the store
//! errors meanwhile, and lead, serve and have every job again once etcd is back.

use super::tests::spec;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use trainyard_proto::job_service_client::JobServiceClient;
use trainyard_proto::{GetJobRequest, JobState, SubmitJobRequest};

use crate::{start, CoordinatorConfig};

const JOB_SERVICE: &str = "trainyard.v1.JobService";
const WORKER_SERVICE: &str = "trainyard.v1.WorkerService";

fn required() -> bool {
    let truthy = |v: &str| {
        std::env::var(v).is_ok_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            !v.is_empty() && v != "0" && v != "false" && v != "no"
        })
    };
    truthy("CI") || truthy("TRAINYARD_REQUIRE_ETCD")
}

/// Whether an `etcd` binary runs; a notice (or a panic when etcd is required) otherwise.
fn etcd_installed() -> bool {
    let ok = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !required(),
            "the etcd binary is not installed, but CI / TRAINYARD_REQUIRE_ETCD=1 require the \
             etcd outage test to run (scripts/etcd.sh up installs it)"
        );
        eprintln!("NOTICE: etcd outage test skipped: the etcd binary is not installed");
    }
    ok
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A private single-member etcd; killed when dropped.
struct PrivateEtcd {
    child: Option<Child>,
    data: PathBuf,
    client_port: u16,
    peer_port: u16,
}

impl PrivateEtcd {
    fn start(dir: &Path) -> Self {
        let mut etcd = Self {
            child: None,
            data: dir.join("etcd-data"),
            client_port: free_port(),
            peer_port: free_port(),
        };
        etcd.spawn();
        etcd
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.with_extension("log"))
            .expect("etcd log file");
        let child = Command::new("etcd")
            .args(["--name", "outage-test", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &self.endpoint()])
            .args(["--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("outage-test={peer}")])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("etcd runs")
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {sig} etcd");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let probe = async {
                let mut c = etcd_client::Client::connect([self.endpoint()], None).await?;
                c.get("health", None).await
            };
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), probe).await {
                return;
            }
            assert!(Instant::now() < deadline, "the private etcd did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for PrivateEtcd {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A frozen etcd must be thawed to die of SIGKILL cleanly (it dies either way).
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

async fn status_of(addr: SocketAddr, service: &str) -> i32 {
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map(|r| r.into_inner().status)
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("health check of {service} on {addr} failed: {e}"),
        Err(_) => panic!("health check of {service} on {addr} timed out"),
    }
}

/// Waits until both the job and the worker service report `want`.
async fn wait_health(addr: SocketAddr, want: ServingStatus, within: Duration, what: &str) {
    let started = Instant::now();
    loop {
        let job = status_of(addr, JOB_SERVICE).await;
        let worker = status_of(addr, WORKER_SERVICE).await;
        if job == want as i32 && worker == want as i32 {
            eprintln!("{what}: {want:?} after {:?}", started.elapsed());
            return;
        }
        assert!(
            started.elapsed() < within,
            "{what}: job service {job}, worker service {worker}, wanted {want:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits a job, retrying while the coordinator (re)takes leadership.
async fn submit(client: &mut JobServiceClient<tonic::transport::Channel>) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .submit_job(SubmitJobRequest {
                spec: Some(spec(0)),
            })
            .await
        {
            Ok(r) => return r.into_inner().job.expect("a job").id,
            Err(e) => {
                assert!(Instant::now() < deadline, "submit kept failing: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn get_state(client: &mut JobServiceClient<tonic::transport::Channel>, id: &str) -> JobState {
    let job = client
        .get_job(GetJobRequest { id: id.into() })
        .await
        .unwrap_or_else(|e| panic!("job {id} after the outage: {e:?}"))
        .into_inner();
    job.state()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_stops_serving_and_recovers_without_losing_jobs() {
    if !etcd_installed() {
        return;
    }
    let tmp = tempfile::tempdir().expect("a temp dir");
    let mut etcd = PrivateEtcd::start(tmp.path());
    etcd.wait_healthy(Duration::from_secs(20)).await;

    let mut config = CoordinatorConfig::with_data_dir(&tmp.path().join("coord"));
    config.listen = "127.0.0.1:0".parse().expect("an address");
    config.store_url = format!("etcd://127.0.0.1:{}", etcd.client_port);
    config.heartbeat_interval = Duration::from_millis(100);
    config.heartbeat_timeout = Duration::from_millis(1000);
    let coord = start(config).await.expect("the coordinator starts");
    let addr = coord.local_addr();
    wait_health(
        addr,
        ServingStatus::Serving,
        Duration::from_secs(10),
        "start",
    )
    .await;
    let mut client = JobServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("a client");
    let first = submit(&mut client).await;

    // 1. etcd frozen (SIGSTOP): NOT_SERVING, writes refused, no crash.
    etcd.signal("-STOP");
    wait_health(
        addr,
        ServingStatus::NotServing,
        Duration::from_secs(10),
        "etcd frozen",
    )
    .await;
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        client.submit_job(SubmitJobRequest {
            spec: Some(spec(0)),
        }),
    )
    .await
    .expect("a refused submit answers");
    assert!(refused.is_err(), "a submit while etcd is frozen must fail");
    // A read answers (from memory until the coordinator steps down, then with an error
    // once the store times out): it never hangs.
    let _answer = tokio::time::timeout(
        Duration::from_secs(10),
        client.get_job(GetJobRequest { id: first.clone() }),
    )
    .await
    .expect("a read while etcd is frozen answers");

    // Thawed: the coordinator leads and serves again by itself, with the job.
    etcd.signal("-CONT");
    wait_health(
        addr,
        ServingStatus::Serving,
        Duration::from_secs(20),
        "etcd thawed",
    )
    .await;
    assert_eq!(get_state(&mut client, &first).await, JobState::Pending);
    let second = submit(&mut client).await;

    // 2. etcd killed and restarted on the same data: the same again.
    etcd.kill();
    wait_health(
        addr,
        ServingStatus::NotServing,
        Duration::from_secs(10),
        "etcd killed",
    )
    .await;
    etcd.spawn();
    etcd.wait_healthy(Duration::from_secs(20)).await;
    wait_health(
        addr,
        ServingStatus::Serving,
        Duration::from_secs(20),
        "etcd restarted",
    )
    .await;
    assert_eq!(get_state(&mut client, &first).await, JobState::Pending);
    assert_eq!(get_state(&mut client, &second).await, JobState::Pending);
    let third = submit(&mut client).await;
    assert_eq!(get_state(&mut client, &third).await, JobState::Pending);

    coord.shutdown().await.expect("a clean shutdown");
}
