//! Submission throughput and scheduling latency, with the embedded store and with etcd.
//!
//! For each backend: jobs accepted per second from 1 client and from 32 concurrent clients
//! (each on its own connection), then submit→RUNNING latency p50/p99 on an emulated
//! cluster: 4 workers × 8 GPU slots played by in-process gRPC workers that report a rank
//! RUNNING as soon as it is assigned, then SUCCEEDED, so the cluster stays free.
//! With etcd, the anchor is etcd's raw rate for the same number of single-key transactions
//! (create-if-absent of a 256-byte value) through the same client library, from 1 and from
//! 32 concurrent tasks; our rate is printed as a ratio of it. Our rounds and etcd's raw
//! rounds alternate ([`ROUNDS`] each, medians reported), so both see the same machine.
//!
//! Run: `cargo bench -p trainyard-coordinator --bench submit`, with
//! `TRAINYARD_ETCD_ENDPOINTS=http://127.0.0.1:23790` for the etcd rows (`scripts/etcd.sh up`).

use std::collections::HashMap;
use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use trainyard_coordinator::{start, CoordinatorConfig};
use trainyard_proto::job_service_client::JobServiceClient;
use trainyard_proto::worker_service_client::WorkerServiceClient;
use trainyard_proto::{
    rank_event, worker_command, Device, JobSpec, RankEvent, RankReport, RankState, RankStateChange,
    RegisterWorkerRequest, StreamCommandsRequest, SubmitJobRequest,
};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

const ONE_CLIENT_JOBS: usize = 400;
const CLIENTS: usize = 32;
const PER_CLIENT_JOBS: usize = 50;
/// Throughput rounds per backend (medians are reported).
const ROUNDS: usize = 3;
const LATENCY_JOBS: usize = 200;
const WORKERS: usize = 4;
const SLOTS: u32 = 8;

fn spec() -> JobSpec {
    JobSpec {
        job: "neural-ode".into(),
        preset: "quick".into(),
        ..Default::default()
    }
}

async fn connect(url: &str) -> Res<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect()
        .await?)
}

/// Jobs accepted per second: `clients` connections submitting `per_client` jobs each.
async fn throughput(url: &str, clients: usize, per_client: usize) -> Res<f64> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(JobServiceClient::new(connect(url).await?));
    }
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for mut client in conns {
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_client {
                client
                    .submit_job(SubmitJobRequest { spec: Some(spec()) })
                    .await?;
            }
            Ok::<(), tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((clients * per_client) as f64 / started.elapsed().as_secs_f64())
}

/// One emulated worker: registers `SLOTS` GPU slots and reports every assigned rank RUNNING
/// at once (recording when), then SUCCEEDED.
async fn emulated_worker(
    url: String,
    name: String,
    running_at: Arc<Mutex<HashMap<String, Instant>>>,
) -> Res<()> {
    let mut client = WorkerServiceClient::new(connect(&url).await?);
    let devices = (0..SLOTS)
        .map(|i| Device {
            index: i,
            kind: "gpu".into(),
            emulated: true,
            model: "emulated".into(),
            memory_bytes: 0,
        })
        .collect();
    let reg = client
        .register_worker(RegisterWorkerRequest {
            name,
            hostname: "bench".into(),
            devices,
            ..Default::default()
        })
        .await?
        .into_inner();
    let worker_id = reg.worker_id;
    let mut beat = client.clone();
    let beat_id = worker_id.clone();
    let interval = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.max(100)));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let req = trainyard_proto::HeartbeatRequest {
                worker_id: beat_id.clone(),
                running: Vec::new(),
            };
            if beat.heartbeat(req).await.is_err() {
                return;
            }
        }
    });
    let mut commands = client
        .stream_commands(StreamCommandsRequest {
            worker_id: worker_id.clone(),
        })
        .await?
        .into_inner();
    while let Some(cmd) = commands.message().await? {
        let Some(worker_command::Command::Assign(a)) = cmd.command else {
            continue;
        };
        let report = |state: RankState| RankReport {
            worker_id: worker_id.clone(),
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            rank: a.rank,
            events: vec![RankEvent {
                at_unix_ms: 0,
                kind: Some(rank_event::Kind::State(RankStateChange {
                    state: state as i32,
                    exit_code: 0,
                    message: String::new(),
                })),
            }],
        };
        client.report_rank(report(RankState::Running)).await?;
        if let Ok(mut m) = running_at.lock() {
            m.insert(a.job_id.clone(), Instant::now());
        }
        client.report_rank(report(RankState::Succeeded)).await?;
    }
    Ok(())
}

/// Submit→RUNNING latencies (ms, sorted) of jobs submitted one every 5 ms.
async fn latencies(url: &str) -> Res<Vec<f64>> {
    let running_at = Arc::new(Mutex::new(HashMap::new()));
    for w in 0..WORKERS {
        tokio::spawn(emulated_worker(
            url.to_string(),
            format!("emulated-{w}"),
            running_at.clone(),
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut client = JobServiceClient::new(connect(url).await?);
    let mut submitted = Vec::with_capacity(LATENCY_JOBS);
    for _ in 0..LATENCY_JOBS {
        let t0 = Instant::now();
        let job = client
            .submit_job(SubmitJobRequest { spec: Some(spec()) })
            .await?
            .into_inner()
            .job
            .ok_or("submit returned no job")?;
        submitted.push((job.id, t0));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = running_at.lock().map(|m| m.len()).unwrap_or(0);
        if done >= LATENCY_JOBS || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = running_at.lock().map_err(|_| "lock poisoned")?;
    let mut out: Vec<f64> = submitted
        .iter()
        .filter_map(|(id, t0)| m.get(id).map(|t| (*t - *t0).as_secs_f64() * 1e3))
        .collect();
    if out.len() < LATENCY_JOBS {
        return Err(format!("only {} of {LATENCY_JOBS} jobs reached RUNNING", out.len()).into());
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// etcd's raw rate: `tasks` concurrent tasks doing `per_task` create-if-absent transactions.
async fn raw_etcd(endpoints: &[String], tasks: usize, per_task: usize) -> Res<f64> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let client = etcd_client::Client::connect(endpoints, None).await?;
    let prefix = format!("/trainyard-bench-raw/{}", uuid::Uuid::new_v4());
    let value = vec![7u8; 256];
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let mut kv = client.kv_client();
        let (prefix, value) = (prefix.clone(), value.clone());
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                let key = format!("{prefix}/{t}/{i}");
                let txn = Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), value.clone(), None)]);
                kv.txn(txn).await?;
            }
            Ok::<(), etcd_client::Error>(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let rate = (tasks * per_task) as f64 / started.elapsed().as_secs_f64();
    let mut kv = client.kv_client();
    kv.delete(
        prefix,
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await?;
    Ok(rate)
}

struct Row {
    backend: &'static str,
    one: f64,
    many: f64,
    p50: f64,
    p99: f64,
    /// etcd's raw rates (1 task, 32 tasks), measured between our rounds.
    raw: Option<(f64, f64)>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Waits until the coordinator at `url` leads (its WorkerService reports SERVING): an
/// etcd-backed coordinator first has to win the election.
async fn wait_until_leading(url: &str) -> Res<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut health = HealthClient::new(connect(url).await?);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = HealthCheckRequest {
            service: "trainyard.v1.WorkerService".into(),
        };
        if let Ok(r) = health.check(req).await {
            if r.into_inner().status() == ServingStatus::Serving {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{url} did not become leader within 20 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn measure(
    backend: &'static str,
    store_url: String,
    raw_endpoints: Option<&[String]>,
) -> Res<Row> {
    let dir = tempfile::tempdir()?;
    let mut config = CoordinatorConfig::with_data_dir(dir.path());
    config.listen = "127.0.0.1:0".parse()?;
    config.store_url = store_url.clone();
    let coordinator = start(config.clone()).await?;
    let url = format!("http://{}", coordinator.local_addr());
    wait_until_leading(&url).await?;
    // Rounds alternate with etcd's raw rate, so that both see the same machine (on a
    // small shared machine the load of neighbours moves both). Medians are reported.
    let (mut one, mut many, mut raw_one, mut raw_many) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        one.push(throughput(&url, 1, ONE_CLIENT_JOBS).await?);
        if let Some(endpoints) = raw_endpoints {
            raw_one.push(raw_etcd(endpoints, 1, ONE_CLIENT_JOBS).await?);
        }
        many.push(throughput(&url, CLIENTS, PER_CLIENT_JOBS).await?);
        if let Some(endpoints) = raw_endpoints {
            raw_many.push(raw_etcd(endpoints, CLIENTS, PER_CLIENT_JOBS).await?);
        }
    }
    coordinator.shutdown().await?;

    // Latency on a fresh coordinator (an empty queue), with emulated workers.
    let dir2 = tempfile::tempdir()?;
    let mut config = CoordinatorConfig::with_data_dir(dir2.path());
    config.listen = "127.0.0.1:0".parse()?;
    if backend == "etcd" {
        config.store_url = format!("{store_url}-latency");
    }
    let coordinator = start(config).await?;
    let url = format!("http://{}", coordinator.local_addr());
    wait_until_leading(&url).await?;
    let lat = latencies(&url).await?;
    coordinator.shutdown().await?;
    Ok(Row {
        backend,
        one: median(one),
        many: median(many),
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        raw: raw_endpoints.map(|_| (median(raw_one), median(raw_many))),
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Res<()> {
    println!(
        "submit bench: {ONE_CLIENT_JOBS} submits from 1 client, {} from {CLIENTS} clients, \
         median of {ROUNDS} rounds (the queue keeps growing); latency over {LATENCY_JOBS} jobs on {WORKERS} emulated workers x {SLOTS} gpu slots",
        CLIENTS * PER_CLIENT_JOBS
    );
    let dir = tempfile::tempdir()?;
    let embedded = format!("file://{}", dir.path().join("state.redb").display());
    let mut rows = vec![measure("embedded", embedded, None).await?];

    let endpoints: Vec<String> = std::env::var("TRAINYARD_ETCD_ENDPOINTS")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().to_string())
        .collect();
    if endpoints.is_empty() {
        println!("TRAINYARD_ETCD_ENDPOINTS is not set: skipping the etcd rows");
    } else {
        let hosts: Vec<&str> = endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://"))
            .collect();
        let url = format!(
            "etcd://{}/trainyard-bench-{}",
            hosts.join(","),
            uuid::Uuid::new_v4()
        );
        rows.push(measure("etcd", url, Some(&endpoints)).await?);
    }

    println!(
        "{:<10} {:>14} {:>16} {:>14} {:>14}",
        "store", "1 client/s", "32 clients/s", "p50 RUNNING", "p99 RUNNING"
    );
    for r in &rows {
        println!(
            "{:<10} {:>14.0} {:>16.0} {:>11.1} ms {:>11.1} ms",
            r.backend, r.one, r.many, r.p50, r.p99
        );
    }
    let etcd = rows.iter().find(|r| r.backend == "etcd");
    if let Some((etcd, (raw1, raw32))) = etcd.and_then(|r| r.raw.map(|raw| (r, raw))) {
        println!(
            "{:<10} {:>14.0} {:>16.0}   (raw etcd txns, same client library)",
            "raw etcd", raw1, raw32
        );
        println!(
            "etcd store / raw etcd: {:.2} (1 client), {:.2} (32 clients); target >= 0.50 with 32",
            etcd.one / raw1,
            etcd.many / raw32
        );
    }
    if let Some(e) = rows.iter().find(|r| r.backend == "embedded") {
        println!(
            "embedded: {:.0} submits/s with 32 clients (target >= 1000); p99 submit->RUNNING {:.1} ms (target < 1000)",
            e.many, e.p99
        );
    }
    Ok(())
}
