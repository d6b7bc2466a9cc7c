//! Service tests over a real loopback socket: the coordinator runs in-process on port 0,
//! the test plays the CLI and the workers with the generated gRPC clients.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Code;
use trainyard_proto::cluster_service_client::ClusterServiceClient;
use trainyard_proto::job_service_client::JobServiceClient;
use trainyard_proto::worker_service_client::WorkerServiceClient;
use trainyard_proto::{
    job_event, rank_event, worker_command, CancelJobRequest, CheckpointInfo, Device, GetJobRequest,
    HeartbeatRequest, Job, JobEvent, JobSpec, JobState, ListCheckpointsRequest,
    ListJobTypesRequest, ListJobsRequest, ListWorkersRequest, LogLine, MetricPoint, RankEvent,
    RankReport, RankState, RankStateChange, RankStatus, RegisterWorkerRequest, RendezvousEntry,
    ResultRow, ResultTable, StreamCommandsRequest, SubmitJobRequest, WatchJobRequest,
    WorkerCommand,
};

use crate::{start, CoordinatorConfig, CoordinatorHandle};

const WAIT: Duration = Duration::from_secs(5);

pub(super) fn config(dir: &Path) -> CoordinatorConfig {
    let mut c = CoordinatorConfig::with_data_dir(dir);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.heartbeat_interval = Duration::from_millis(100);
    c.heartbeat_timeout = Duration::from_millis(1000);
    c
}

pub(super) struct Cluster {
    pub(super) handle: CoordinatorHandle,
    pub(super) url: String,
    pub(super) jobs: JobServiceClient<Channel>,
}

pub(super) async fn boot(dir: &Path) -> Cluster {
    boot_with(config(dir)).await
}

/// Starts a coordinator with `config` and connects a job client.
pub(super) async fn boot_with(config: CoordinatorConfig) -> Cluster {
    let handle = start(config).await.expect("coordinator starts");
    let url = format!("http://{}", handle.local_addr());
    let jobs = JobServiceClient::connect(url.clone()).await.unwrap();
    Cluster { handle, url, jobs }
}

pub(super) fn devices(kind: &str, n: u32) -> Vec<Device> {
    (0..n)
        .map(|i| Device {
            index: i,
            kind: kind.to_string(),
            emulated: kind == "gpu",
            model: String::new(),
            memory_bytes: 0,
        })
        .collect()
}

/// A fake worker agent: registered, heartbeating, with its command stream open.
pub(super) struct FakeWorker {
    pub(super) id: String,
    client: WorkerServiceClient<Channel>,
    commands: tonic::Streaming<WorkerCommand>,
    heartbeats: JoinHandle<()>,
}

impl FakeWorker {
    pub(super) async fn join(
        url: &str,
        name: &str,
        devices: Vec<Device>,
        running: Vec<RankStatus>,
    ) -> Self {
        let mut client = WorkerServiceClient::connect(url.to_string()).await.unwrap();
        let reg = client
            .register_worker(RegisterWorkerRequest {
                name: name.to_string(),
                hostname: "localhost".into(),
                devices,
                running,
                pid: std::process::id(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reg.heartbeat_interval_ms, 100);
        assert_eq!(reg.heartbeat_timeout_ms, 1000);
        assert!(
            reg.objects_url.starts_with("file:///") || reg.objects_url.starts_with("s3://"),
            "{}",
            reg.objects_url
        );
        let id = reg.worker_id;
        let commands = client
            .stream_commands(StreamCommandsRequest {
                worker_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut hb = client.clone();
        let hb_id = id.clone();
        let heartbeats = tokio::spawn(async move {
            loop {
                let known = hb
                    .heartbeat(HeartbeatRequest {
                        worker_id: hb_id.clone(),
                        running: vec![],
                    })
                    .await
                    .map(|r| r.into_inner().known)
                    .unwrap_or(false);
                assert!(known, "worker {hb_id} became unknown while heartbeating");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self {
            id,
            client,
            commands,
            heartbeats,
        }
    }

    async fn next_command(&mut self) -> worker_command::Command {
        let msg = tokio::time::timeout(WAIT, self.commands.message())
            .await
            .expect("a command in time")
            .expect("stream ok")
            .expect("stream open");
        msg.command.expect("command set")
    }

    pub(super) async fn next_assignment(&mut self) -> trainyard_proto::RankAssignment {
        match self.next_command().await {
            worker_command::Command::Assign(a) => a,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    pub(super) async fn report(
        &mut self,
        job_id: &str,
        attempt: u32,
        rank: u32,
        events: Vec<rank_event::Kind>,
    ) -> bool {
        let events = events
            .into_iter()
            .map(|k| RankEvent {
                at_unix_ms: crate::state::now_unix_ms(),
                kind: Some(k),
            })
            .collect();
        self.client
            .report_rank(RankReport {
                worker_id: self.id.clone(),
                job_id: job_id.to_string(),
                attempt,
                rank,
                events,
            })
            .await
            .unwrap()
            .into_inner()
            .accepted
    }

    fn die(&self) {
        self.heartbeats.abort();
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

pub(super) fn state(s: RankState) -> rank_event::Kind {
    rank_event::Kind::State(RankStateChange {
        state: s as i32,
        exit_code: 0,
        message: String::new(),
    })
}

/// A quick `neural-ode` spec (one rank) for service tests.
pub(super) fn spec(max_restarts: u32) -> JobSpec {
    JobSpec {
        job: "neural-ode".into(),
        preset: "quick".into(),
        max_restarts,
        ..Default::default()
    }
}

pub(super) async fn submit(jobs: &mut JobServiceClient<Channel>, spec: JobSpec) -> Job {
    jobs.submit_job(SubmitJobRequest { spec: Some(spec) })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
}

pub(super) async fn get(jobs: &mut JobServiceClient<Channel>, id: &str) -> Job {
    jobs.get_job(GetJobRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

pub(super) async fn wait_for(
    jobs: &mut JobServiceClient<Channel>,
    id: &str,
    want: JobState,
) -> Job {
    let deadline = Instant::now() + WAIT;
    loop {
        let j = get(jobs, id).await;
        if j.state() == want {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} stuck in {:?} ({}), wanted {want:?}",
            j.state(),
            j.state_reason
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(super) async fn collect_watch(
    jobs: &mut JobServiceClient<Channel>,
    id: &str,
    follow: bool,
) -> Vec<JobEvent> {
    let mut stream = jobs
        .watch_job(WatchJobRequest {
            id: id.into(),
            follow,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("watch ends in time")
        .unwrap()
    {
        out.push(ev);
    }
    out
}

pub(super) fn transitions(events: &[JobEvent]) -> Vec<JobState> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(job_event::Kind::Transition(t)) => Some(t.to()),
            _ => None,
        })
        .collect()
}

/// Lists the services through gRPC server reflection (v1), as `grpcurl list` does.
async fn reflected_services(url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest, ServerReflectionResponse,
    };
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    );
    let codec =
        tonic_prost::ProstCodec::<ServerReflectionRequest, ServerReflectionResponse>::default();
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(vec![request])),
            path,
            codec,
        )
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().expect("a response");
    match first.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
}

#[tokio::test]
async fn a_job_runs_end_to_end_and_a_late_watcher_sees_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = boot(dir.path()).await;

    // Health and job types.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(c.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    for service in [
        "",
        "trainyard.v1.JobService",
        "trainyard.v1.WorkerService",
        "trainyard.v1.ClusterService",
    ] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    let services = reflected_services(&c.url).await;
    for s in [
        "trainyard.v1.JobService",
        "trainyard.v1.WorkerService",
        "trainyard.v1.ClusterService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|x| x == s), "{s} not in {services:?}");
    }
    let types = c
        .jobs
        .list_job_types(ListJobTypesRequest {})
        .await
        .unwrap()
        .into_inner()
        .job_types;
    let ode = types
        .iter()
        .find(|t| t.name == "neural-ode")
        .expect("neural-ode listed");
    assert!(ode.presets.iter().any(|p| p == "quick"));
    assert!(!ode.keys.is_empty());

    let mut w = FakeWorker::join(&c.url, "w1", devices("cpu", 2), vec![]).await;
    let job = submit(&mut c.jobs, spec(0)).await;
    assert!(job.id.starts_with("job-"));
    assert_eq!(job.state(), JobState::Pending);
    assert!(!job.resolved_config_json.is_empty());
    // A live watcher from the start.
    let mut live_jobs = c.jobs.clone();
    let live_id = job.id.clone();
    let live = tokio::spawn(async move { collect_watch(&mut live_jobs, &live_id, true).await });

    let a = w.next_assignment().await;
    assert_eq!(
        (a.job_id.as_str(), a.attempt, a.rank, a.world_size),
        (job.id.as_str(), 1, 0, 1)
    );
    assert_eq!(a.job, "neural-ode");
    assert_eq!(a.config_json, job.resolved_config_json);
    assert!(a.resume_from.is_none());
    assert_eq!(a.peers.len(), 1);
    assert_eq!(a.peers[0].worker_id, w.id);
    assert_eq!(a.device_kind, "cpu");
    assert_eq!(get(&mut c.jobs, &job.id).await.state(), JobState::Scheduled);

    assert!(
        w.report(&job.id, 1, 0, vec![state(RankState::Running)])
            .await
    );
    wait_for(&mut c.jobs, &job.id, JobState::Running).await;
    let cp = CheckpointInfo {
        job_id: job.id.clone(),
        step: 5,
        path: format!("jobs/{}/checkpoints/5", job.id),
        created_unix_ms: 1,
        attempt: 1,
        metrics: Default::default(),
    };
    let accepted = w
        .report(
            &job.id,
            1,
            0,
            vec![
                rank_event::Kind::Log(LogLine {
                    rank: 0,
                    stream: "stdout".into(),
                    line: "hello".into(),
                }),
                rank_event::Kind::Metric(MetricPoint {
                    rank: 0,
                    step: 5,
                    values: [("odenet/train_loss".to_string(), 0.5)].into(),
                }),
                rank_event::Kind::Checkpoint(cp.clone()),
                rank_event::Kind::Result(ResultTable {
                    title: "t".into(),
                    columns: vec!["model".into()],
                    rows: vec![ResultRow {
                        cells: vec!["odenet".into()],
                    }],
                    notes: vec![],
                    claims: vec![],
                }),
            ],
        )
        .await;
    assert!(accepted);
    // A stale attempt is refused.
    assert!(
        !w.report(&job.id, 7, 0, vec![state(RankState::Running)])
            .await
    );
    let j = get(&mut c.jobs, &job.id).await;
    assert_eq!(j.latest_metrics.get("odenet/train_loss"), Some(&0.5));
    assert_eq!(j.latest_step, 5);
    assert_eq!(j.latest_checkpoint.as_ref().map(|c| c.step), Some(5));
    let cps = c
        .jobs
        .list_checkpoints(ListCheckpointsRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    assert_eq!(cps, vec![cp]);

    let mut cluster = ClusterServiceClient::connect(c.url.clone()).await.unwrap();
    let workers = cluster
        .list_workers(ListWorkersRequest {
            include_dead: false,
        })
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].devices.len(), 2);
    assert_eq!(workers[0].used.len(), 1);
    assert_eq!(workers[0].used[0].job_id, job.id);

    assert!(
        w.report(&job.id, 1, 0, vec![state(RankState::Succeeded)])
            .await
    );
    let done = wait_for(&mut c.jobs, &job.id, JobState::Succeeded).await;
    assert!(done.result.is_some());
    assert_eq!(
        done.latest_metrics.get("odenet/train_loss"),
        Some(&0.5),
        "metrics stored"
    );
    let workers = cluster
        .list_workers(ListWorkersRequest {
            include_dead: false,
        })
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert!(workers[0].used.is_empty(), "device freed");

    // The live watcher ended with the job and saw everything in order.
    let live = tokio::time::timeout(WAIT, live).await.unwrap().unwrap();
    // A late watcher sees the same history.
    let late = collect_watch(&mut c.jobs, &job.id, true).await;
    for events in [&live, &late] {
        assert_eq!(
            transitions(events),
            [
                JobState::Pending,
                JobState::Scheduled,
                JobState::Running,
                JobState::Succeeded
            ]
        );
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| match e.kind.as_ref().unwrap() {
                job_event::Kind::Transition(_) => "transition",
                job_event::Kind::Log(_) => "log",
                job_event::Kind::Metric(_) => "metric",
                job_event::Kind::Progress(_) => "progress",
                job_event::Kind::Checkpoint(_) => "checkpoint",
                job_event::Kind::Result(_) => "result",
                job_event::Kind::Artifact(_) => "artifact",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "transition",
                "transition",
                "transition",
                "log",
                "metric",
                "checkpoint",
                "result",
                "transition"
            ]
        );
    }
    assert_eq!(live, late);
    c.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn cancel_stops_ranks_and_frees_devices_only_when_they_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = boot(dir.path()).await;
    let mut w = FakeWorker::join(&c.url, "g1", devices("gpu", 1), vec![]).await;
    let mut s = spec(0);
    s.device_kind = "gpu".into();
    let first = submit(&mut c.jobs, s.clone()).await;
    let a = w.next_assignment().await;
    assert_eq!(a.device_kind, "gpu");
    assert!(
        w.report(&first.id, 1, 0, vec![state(RankState::Running)])
            .await
    );
    wait_for(&mut c.jobs, &first.id, JobState::Running).await;

    let cancelled = c
        .jobs
        .cancel_job(CancelJobRequest {
            id: first.id.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    assert!(cancelled.state_reason.contains("changed my mind"));
    match w.next_command().await {
        worker_command::Command::Cancel(cr) => {
            assert_eq!(
                (cr.job_id.as_str(), cr.attempt, cr.rank),
                (first.id.as_str(), 1, 0)
            );
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
    // The device is still held: the next job waits with a reason.
    let second = submit(&mut c.jobs, s.clone()).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let j = get(&mut c.jobs, &second.id).await;
        if j.state_reason == "waiting for 1 free gpu slots; 0 free" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no waiting reason: {}",
            j.state_reason
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The rank reports it is gone (its job is over, so the report is not accepted).
    assert!(
        !w.report(&first.id, 1, 0, vec![state(RankState::Cancelled)])
            .await
    );
    let a2 = w.next_assignment().await;
    assert_eq!(a2.job_id, second.id);
    // Cancelling a terminal job, an unknown job, a pending job.
    let err = c
        .jobs
        .cancel_job(CancelJobRequest {
            id: first.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .jobs
        .cancel_job(CancelJobRequest {
            id: "job-nope".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let third = submit(&mut c.jobs, s).await;
    let j = c
        .jobs
        .cancel_job(CancelJobRequest {
            id: third.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(j.state(), JobState::Cancelled);
    assert_eq!(
        transitions(&collect_watch(&mut c.jobs, &third.id, true).await),
        [JobState::Pending, JobState::Cancelled]
    );
    c.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_dead_worker_requeues_its_jobs_with_restarts_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = boot(dir.path()).await;
    let mut a = FakeWorker::join(&c.url, "a", devices("cpu", 2), vec![]).await;
    let keep = submit(&mut c.jobs, spec(1)).await;
    let lose = submit(&mut c.jobs, spec(0)).await;
    let mut got = vec![a.next_assignment().await, a.next_assignment().await];
    got.sort_by(|x, y| x.job_id.cmp(&y.job_id));
    assert_eq!(got[0].job_id, keep.id, "jobs placed in submit order");
    for asg in &got {
        assert!(
            a.report(&asg.job_id, 1, 0, vec![state(RankState::Running)])
                .await
        );
    }
    let cp = CheckpointInfo {
        job_id: keep.id.clone(),
        step: 3,
        path: format!("jobs/{}/checkpoints/3", keep.id),
        created_unix_ms: 1,
        attempt: 1,
        metrics: Default::default(),
    };
    assert!(
        a.report(
            &keep.id,
            1,
            0,
            vec![rank_event::Kind::Checkpoint(cp.clone())]
        )
        .await
    );

    let mut b = FakeWorker::join(&c.url, "b", devices("cpu", 1), vec![]).await;
    a.die();
    let resumed = b.next_assignment().await;
    assert_eq!(resumed.job_id, keep.id);
    assert_eq!(resumed.attempt, 2);
    assert_eq!(resumed.resume_from, Some(cp));
    let j = get(&mut c.jobs, &keep.id).await;
    assert_eq!(j.restarts, 1);
    assert_eq!(j.attempt, 2);
    assert!(j
        .transitions
        .iter()
        .any(|t| t.to() == JobState::Pending && t.reason.contains("stopped heartbeating")));
    let failed = wait_for(&mut c.jobs, &lose.id, JobState::Failed).await;
    assert!(
        failed.state_reason.contains("stopped heartbeating"),
        "{}",
        failed.state_reason
    );
    // The dead worker is unknown now: its heartbeats say so and its reports are refused
    // until it registers again (which cancels the ranks nobody can adopt).
    let known = a
        .client
        .heartbeat(HeartbeatRequest {
            worker_id: a.id.clone(),
            running: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .known;
    assert!(!known);
    let refused = a
        .client
        .report_rank(RankReport {
            worker_id: a.id.clone(),
            job_id: keep.id.clone(),
            attempt: 1,
            rank: 0,
            events: vec![RankEvent {
                at_unix_ms: crate::state::now_unix_ms(),
                kind: Some(state(RankState::Running)),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(refused.message().starts_with("worker_id:"), "{refused}");
    let mut cluster = ClusterServiceClient::connect(c.url.clone()).await.unwrap();
    let all = cluster
        .list_workers(ListWorkersRequest { include_dead: true })
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(all.len(), 2);
    assert!(all
        .iter()
        .any(|w| w.id == a.id && w.state() == trainyard_proto::WorkerState::Dead));
    // The new attempt runs and finishes.
    assert!(
        b.report(
            &keep.id,
            2,
            0,
            vec![state(RankState::Running), state(RankState::Succeeded)]
        )
        .await
    );
    wait_for(&mut c.jobs, &keep.id, JobState::Succeeded).await;
    c.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failed_rank_requeues_then_fails_when_restarts_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = boot(dir.path()).await;
    let mut w = FakeWorker::join(&c.url, "w", devices("cpu", 1), vec![]).await;
    let job = submit(&mut c.jobs, spec(1)).await;
    for attempt in [1, 2] {
        let a = w.next_assignment().await;
        assert_eq!(a.attempt, attempt);
        let failed = rank_event::Kind::State(RankStateChange {
            state: RankState::Failed as i32,
            exit_code: 3,
            message: "boom".into(),
        });
        assert!(
            w.report(&job.id, attempt, 0, vec![state(RankState::Running), failed])
                .await
        );
    }
    let j = wait_for(&mut c.jobs, &job.id, JobState::Failed).await;
    assert!(
        j.state_reason.contains("boom") && j.state_reason.contains("exit code 3"),
        "{}",
        j.state_reason
    );
    assert_eq!(j.restarts, 1);
    c.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_submits_are_rejected_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = boot(dir.path()).await;
    let _w = FakeWorker::join(&c.url, "cpu-only", devices("cpu", 1), vec![]).await;
    let cases: Vec<(Option<JobSpec>, Code, &str)> = vec![
        (None, Code::InvalidArgument, "spec: missing"),
        (
            Some(JobSpec {
                job: "nope".into(),
                ..Default::default()
            }),
            Code::InvalidArgument,
            "spec.job: unknown job \"nope\" (known: ",
        ),
        (
            Some(JobSpec {
                config: [("bogus_key".to_string(), "1".to_string())].into(),
                ..spec(0)
            }),
            Code::InvalidArgument,
            "spec.config.bogus_key: ",
        ),
        (
            Some(JobSpec {
                preset: "enormous".into(),
                ..spec(0)
            }),
            Code::InvalidArgument,
            "spec.preset: ",
        ),
        (
            Some(JobSpec {
                ranks: 10_000,
                ..spec(0)
            }),
            Code::InvalidArgument,
            "spec.ranks: ",
        ),
        (
            Some(JobSpec {
                device_kind: "tpu".into(),
                ..spec(0)
            }),
            Code::InvalidArgument,
            "spec.device_kind: ",
        ),
        (
            Some(JobSpec {
                device_kind: "gpu".into(),
                ..spec(0)
            }),
            Code::FailedPrecondition,
            "the job needs 1 gpu slots but the cluster has 0",
        ),
    ];
    for (spec, code, prefix) in cases {
        let err = c
            .jobs
            .submit_job(SubmitJobRequest { spec: spec.clone() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{spec:?}: {}", err.message());
        assert!(
            err.message().starts_with(prefix),
            "{:?} does not start with {prefix:?}",
            err.message()
        );
    }
    let listed = c
        .jobs
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty(), "nothing stored");
    let err = c
        .jobs
        .get_job(GetJobRequest { id: "job-x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    c.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn list_jobs_filters_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = boot(dir.path()).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(submit(&mut c.jobs, spec(0)).await.id);
    }
    c.jobs
        .cancel_job(CancelJobRequest {
            id: ids[1].clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .jobs
            .list_jobs(ListJobsRequest {
                states: vec![JobState::Pending as i32],
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(seen, expected, "pending jobs in submit order");
    assert_eq!(pages, 2);
    c.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn owner_filters_page_over_other_owners_jobs_and_the_pending_cap_is_per_owner() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.limits.max_pending_jobs_per_user = 3;
    let c = boot_with(config).await;
    let coord = c.handle.coordinator().clone();
    let mut alice = Vec::new();
    // alice's jobs interleaved with bob's, so owner-filtered pages span store pages.
    for i in 0..6 {
        let owner = if i % 2 == 0 { "alice" } else { "bob" };
        let job = coord.submit(Some(spec(0)), owner).await.unwrap();
        assert_eq!(job.owner, owner);
        if owner == "alice" {
            alice.push(job.id);
        }
    }
    let err = coord.submit(Some(spec(0)), "alice").await.unwrap_err();
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("max_pending_jobs_per_user"),
        "{status:?}"
    );
    // Cancelling one makes room again; others were never held back.
    coord.cancel(&alice[0], "").await.unwrap();
    alice.push(coord.submit(Some(spec(0)), "alice").await.unwrap().id);
    assert!(coord.submit(Some(spec(0)), "carol").await.is_ok());

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = coord
            .list_jobs(ListJobsRequest {
                page_size: 1,
                page_token: token,
                owner: "alice".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.jobs.len() <= 1);
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, alice, "alice's jobs, in order, nobody else's");
    c.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restart_keeps_jobs_requeues_orphans_and_adopts_ranks_that_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = boot(dir.path()).await;
    let mut w = FakeWorker::join(&c.url, "w", devices("cpu", 2), vec![]).await;
    let kept = submit(&mut c.jobs, spec(0)).await;
    let orphan = submit(&mut c.jobs, spec(2)).await;
    let mut got = vec![w.next_assignment().await, w.next_assignment().await];
    got.sort_by(|x, y| x.job_id.cmp(&y.job_id));
    for asg in &got {
        assert!(
            w.report(&asg.job_id, 1, 0, vec![state(RankState::Running)])
                .await
        );
    }
    // Both slots are busy: this one waits.
    let pending = submit(&mut c.jobs, spec(0)).await;
    drop(w);
    c.handle.shutdown().await.unwrap();

    let mut c = boot(dir.path()).await;
    // Every job survived.
    let listed: Vec<String> = c
        .jobs
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(
        listed,
        [kept.id.clone(), orphan.id.clone(), pending.id.clone()]
    );
    // The worker comes back with one of the two ranks.
    let running = vec![RankStatus {
        job_id: kept.id.clone(),
        attempt: 1,
        rank: 0,
        state: RankState::Running as i32,
        device_index: got[0].device_index,
    }];
    let mut w2 = FakeWorker::join(&c.url, "w", devices("cpu", 2), running).await;
    // The free slot goes to the waiting job; the orphan is requeued after the grace
    // period (its rank did not come back) and placed again once a slot frees up.
    let first = w2.next_assignment().await;
    assert_eq!(
        (first.job_id.as_str(), first.attempt),
        (pending.id.as_str(), 1)
    );
    let o = wait_for(&mut c.jobs, &orphan.id, JobState::Pending).await;
    assert_eq!(o.restarts, 1);
    assert!(o
        .transitions
        .iter()
        .any(|t| t.reason.contains("coordinator restarted")));
    assert!(
        w2.report(
            &pending.id,
            1,
            0,
            vec![state(RankState::Running), state(RankState::Succeeded)]
        )
        .await
    );
    let again = w2.next_assignment().await;
    assert_eq!(
        (again.job_id.as_str(), again.attempt),
        (orphan.id.as_str(), 2)
    );
    // The adopted job kept running, now placed on the new worker id.
    let k = get(&mut c.jobs, &kept.id).await;
    assert_eq!(k.state(), JobState::Running);
    assert_eq!(k.placement[0].worker_id, w2.id);
    assert_eq!(
        k.state_reason,
        "all 1 rank(s) came back after a coordinator restart"
    );
    assert!(
        w2.report(&kept.id, 1, 0, vec![state(RankState::Succeeded)])
            .await
    );
    wait_for(&mut c.jobs, &kept.id, JobState::Succeeded).await;
    // History from before the restart is still watchable.
    let events = collect_watch(&mut c.jobs, &kept.id, false).await;
    assert_eq!(
        transitions(&events),
        [
            JobState::Pending,
            JobState::Scheduled,
            JobState::Running,
            JobState::Succeeded
        ]
    );
    assert_eq!(
        get(&mut c.jobs, &pending.id).await.state(),
        JobState::Succeeded
    );
    c.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_gang_is_placed_across_workers_and_succeeds_when_every_rank_has() {
    let dir = tempfile::tempdir().unwrap();
    // Store a 2-rank job directly (its config is not a real job's) so that the coordinator
    // recovers and gang-places it.
    let gang_id = {
        let store = crate::store::EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        let job = Job {
            id: "job-gang".into(),
            spec: Some(JobSpec {
                ranks: 2,
                device_kind: "cpu".into(),
                ..spec(0)
            }),
            state: JobState::Pending as i32,
            resolved_config_json: "{}".into(),
            ..Default::default()
        };
        crate::store::StateStore::create_job(&store, job)
            .await
            .unwrap()
            .id
    };
    let mut c = boot(dir.path()).await;
    let mut w1 = FakeWorker::join(&c.url, "w1", devices("cpu", 1), vec![]).await;
    // Not placed while only one slot exists.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let j = get(&mut c.jobs, &gang_id).await;
    assert_eq!(j.state(), JobState::Pending);
    assert_eq!(
        j.state_reason,
        "cannot fit the current cluster: needs 2 cpu slots, the alive workers have 1 in total"
    );
    let mut w2 = FakeWorker::join(&c.url, "w2", devices("cpu", 1), vec![]).await;
    let a1 = w1.next_assignment().await;
    let a2 = w2.next_assignment().await;
    assert_eq!((a1.world_size, a2.world_size), (2, 2));
    assert_eq!(a1.peers, a2.peers);
    assert_eq!(a1.peers.len(), 2);
    let mut ranks = [a1.rank, a2.rank];
    ranks.sort();
    assert_eq!(ranks, [0, 1]);
    let (first, second) = if a1.rank == 1 {
        (&mut w1, &mut w2)
    } else {
        (&mut w2, &mut w1)
    };
    // Rendezvous: each rank publishes its ring address; both workers get both entries,
    // and an entry from another attempt is dropped.
    let entry = |key: &str, value: &str| RendezvousEntry {
        key: key.into(),
        value: value.as_bytes().to_vec(),
    };
    assert!(
        !first
            .report(
                &gang_id,
                9,
                1,
                vec![rank_event::Kind::Rendezvous(entry(
                    "ring/addr/1",
                    "stale:1"
                ))]
            )
            .await,
        "a report of another attempt is not accepted"
    );
    assert!(
        first
            .report(
                &gang_id,
                1,
                1,
                vec![rank_event::Kind::Rendezvous(entry("ring/addr/1", "h1:1"))]
            )
            .await
    );
    assert!(
        second
            .report(
                &gang_id,
                1,
                0,
                vec![rank_event::Kind::Rendezvous(entry("ring/addr/0", "h0:1"))]
            )
            .await
    );
    for w in [&mut *first, &mut *second] {
        let mut got = Vec::new();
        for _ in 0..2 {
            match w.next_command().await {
                worker_command::Command::Rendezvous(u) => {
                    assert_eq!((u.job_id.as_str(), u.attempt), (gang_id.as_str(), 1));
                    assert!(u.leader_term > 0, "rendezvous updates are fenced");
                    got.extend(u.entries);
                }
                other => panic!("expected a rendezvous update, got {other:?}"),
            }
        }
        assert_eq!(
            got,
            vec![entry("ring/addr/1", "h1:1"), entry("ring/addr/0", "h0:1")]
        );
    }
    // Rank 1 finishes before rank 0 even reports RUNNING.
    assert!(
        first
            .report(&gang_id, 1, 1, vec![state(RankState::Succeeded)])
            .await
    );
    assert!(
        second
            .report(&gang_id, 1, 0, vec![state(RankState::Running)])
            .await
    );
    assert_eq!(get(&mut c.jobs, &gang_id).await.state(), JobState::Running);
    assert!(
        second
            .report(&gang_id, 1, 0, vec![state(RankState::Succeeded)])
            .await
    );
    let done = wait_for(&mut c.jobs, &gang_id, JobState::Succeeded).await;
    assert_eq!(done.state_reason, "all 2 rank(s) succeeded");
    c.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rank_that_ended_during_a_restart_keeps_its_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = boot(dir.path()).await;
    let mut w = FakeWorker::join(&c.url, "w", devices("cpu", 1), vec![]).await;
    let job = submit(&mut c.jobs, spec(2)).await;
    let asg = w.next_assignment().await;
    assert!(
        w.report(&job.id, 1, 0, vec![state(RankState::Running)])
            .await
    );
    wait_for(&mut c.jobs, &job.id, JobState::Running).await;
    drop(w);
    c.handle.shutdown().await.unwrap();

    // The rank finished while no coordinator listened: the worker lists it, ended, with
    // its exit report still to deliver.
    let mut c = boot(dir.path()).await;
    let ended = vec![RankStatus {
        job_id: job.id.clone(),
        attempt: 1,
        rank: 0,
        state: RankState::Succeeded as i32,
        device_index: asg.device_index,
    }];
    let mut w2 = FakeWorker::join(&c.url, "w", devices("cpu", 1), ended).await;
    assert!(
        w2.report(&job.id, 1, 0, vec![state(RankState::Succeeded)])
            .await
    );
    let done = wait_for(&mut c.jobs, &job.id, JobState::Succeeded).await;
    assert_eq!(done.restarts, 0);
    // No stale-rank cancel was sent for it.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), w2.commands.message())
            .await
            .is_err(),
        "unexpected command"
    );
    c.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_waiting_job_is_stored_with_its_reason_and_not_rewritten_by_passes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = boot(dir.path()).await;
    // One busy-able gpu slot; the second job of 1 gpu waits for it.
    let w = FakeWorker::join(&c.url, "w1", devices("gpu", 1), vec![]).await;
    let mut gpu = spec(0);
    gpu.device_kind = "gpu".into();
    let first = submit(&mut c.jobs, gpu.clone()).await;
    wait_for(&mut c.jobs, &first.id, JobState::Scheduled).await;
    let second = submit(&mut c.jobs, gpu).await;
    assert_eq!(second.state(), JobState::Pending);
    assert_eq!(
        second.state_reason, "waiting for 1 free gpu slots; 0 free",
        "the reason is stored with the job at submit"
    );
    // Several passes later (every rank report and the safety tick wake one), the job was
    // not written again: the pass found the same reason.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = get(&mut c.jobs, &second.id).await;
    assert_eq!(again.state_reason, second.state_reason);
    assert_eq!(
        again.revision, second.revision,
        "no write-back of an unchanged reason"
    );
    drop(w);
    c.handle.shutdown().await.unwrap();
}
