//! Agent tests against a minimal coordinator: a real tonic server on a loopback port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};
use trainyard_proto::worker_service_server::{WorkerService, WorkerServiceServer};
use trainyard_proto::*;

use super::*;
use crate::protocol::decode_assignment;

/// The rank "program" of these tests: behaves according to the job id's prefix.
const SCRIPT: &str = r#"
case "$TRAINYARD_JOB_ID" in
  ok*)
    echo "hello from rank $TRAINYARD_RANK of $TRAINYARD_WORLD_SIZE"
    echo "assignment=$TRAINYARD_ASSIGNMENT"
    printf '\036trainyard:{"type":"metric","step":3,"values":{"loss":0.5}}\n'
    printf '\036trainyard:{"type":"checkpoint","job_id":"%s","step":3,"path":"jobs/%s/checkpoints/3","created_unix_ms":1,"attempt":1,"metrics":{}}\n' "$TRAINYARD_JOB_ID" "$TRAINYARD_JOB_ID"
    echo "to stderr" >&2
    exit 0 ;;
  fail*)
    echo "working"
    echo "boom: something broke" >&2
    exit 3 ;;
  sleep*)
    sleep 30 &
    echo $! > child.pid
    echo $$ > leader.pid
    wait ;;
  rdv*)
    printf '\036trainyard:{"type":"rendezvous","key":"ring/addr/0","value_hex":"6869"}\n'
    read -r line
    echo "got: $line"
    exit 0 ;;
  stubborn*)
    trap '' TERM
    echo $$ > leader.pid
    while :; do sleep 0.05; done ;;
esac
"#;

#[derive(Default)]
struct Fake {
    registrations: u32,
    heartbeats: u32,
    known: bool,
    reject_reports: bool,
    commands: Option<mpsc::Sender<Result<WorkerCommand, Status>>>,
    reports: Vec<RankReport>,
}

#[derive(Clone)]
struct FakeCoordinator(Arc<Mutex<Fake>>);

#[tonic::async_trait]
impl WorkerService for FakeCoordinator {
    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let r = request.into_inner();
        assert!(!r.devices.is_empty());
        let mut f = self.0.lock().unwrap();
        f.registrations += 1;
        f.known = true;
        Ok(Response::new(RegisterWorkerResponse {
            worker_id: format!("w-{}", f.registrations),
            heartbeat_interval_ms: 100,
            heartbeat_timeout_ms: 1000,
            objects_url: String::new(),
        }))
    }

    async fn heartbeat(
        &self,
        _request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let mut f = self.0.lock().unwrap();
        f.heartbeats += 1;
        Ok(Response::new(HeartbeatResponse { known: f.known }))
    }

    type StreamCommandsStream = ReceiverStream<Result<WorkerCommand, Status>>;

    async fn stream_commands(
        &self,
        _request: Request<StreamCommandsRequest>,
    ) -> Result<Response<Self::StreamCommandsStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        self.0.lock().unwrap().commands = Some(tx);
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_rank(
        &self,
        request: Request<RankReport>,
    ) -> Result<Response<ReportRankResponse>, Status> {
        let mut f = self.0.lock().unwrap();
        f.reports.push(request.into_inner());
        Ok(Response::new(ReportRankResponse {
            accepted: !f.reject_reports,
        }))
    }
}

struct Harness {
    fake: Arc<Mutex<Fake>>,
    work_dir: PathBuf,
    _tmp: tempfile::TempDir,
    stop_worker: Option<oneshot::Sender<()>>,
    worker: tokio::task::JoinHandle<Result<(), WorkerError>>,
    _stop_server: oneshot::Sender<()>,
}

async fn serve(fake: Arc<Mutex<Fake>>, listener: tokio::net::TcpListener) -> oneshot::Sender<()> {
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(FakeCoordinator(fake)))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = rx.await;
            }),
    );
    tx
}

fn worker_config(addr: SocketAddr, work_dir: &Path) -> WorkerConfig {
    WorkerConfig {
        coordinator_url: format!("http://{addr}"),
        name: "test-worker".into(),
        devices: crate::parse_devices(Some("cpu:2"), 1).unwrap(),
        cuda_ordinals: Default::default(),
        work_dir: work_dir.to_path_buf(),
        rank_command: vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()],
        collective_host: "127.0.0.1".into(),
        metrics_listen: None,
        join_token: None,
        tls: Default::default(),
    }
}

impl Harness {
    async fn start() -> Harness {
        let fake = Arc::new(Mutex::new(Fake::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop_server = serve(fake.clone(), listener).await;
        let tmp = tempfile::tempdir().unwrap();
        let work_dir = tmp.path().join("work");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let worker = tokio::spawn(run_worker(worker_config(addr, &work_dir), async {
            let _ = stop_rx.await;
        }));
        let h = Harness {
            fake,
            work_dir,
            _tmp: tmp,
            stop_worker: Some(stop_tx),
            worker,
            _stop_server: stop_server,
        };
        h.wait("command stream", |f| f.commands.is_some()).await;
        h
    }

    async fn wait(&self, what: &str, pred: impl Fn(&Fake) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if pred(&self.fake.lock().unwrap()) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn send(&self, command: worker_command::Command) {
        let tx = self.fake.lock().unwrap().commands.clone().unwrap();
        tx.send(Ok(WorkerCommand {
            command: Some(command),
        }))
        .await
        .unwrap();
    }

    async fn assign(&self, job_id: &str, grace_period_s: u32) {
        self.send(worker_command::Command::Assign(assignment(
            job_id,
            grace_period_s,
        )))
        .await;
    }

    /// Every event reported for `job_id`, in order.
    fn events(&self, job_id: &str) -> Vec<rank_event::Kind> {
        self.fake
            .lock()
            .unwrap()
            .reports
            .iter()
            .filter(|r| r.job_id == job_id)
            .flat_map(|r| r.events.iter().filter_map(|e| e.kind.clone()))
            .collect()
    }

    fn states(&self, job_id: &str) -> Vec<RankStateChange> {
        self.events(job_id)
            .into_iter()
            .filter_map(|k| match k {
                rank_event::Kind::State(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    async fn wait_final(&self, job_id: &str) -> RankStateChange {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(last) = self.states(job_id).last() {
                if last.state > RankState::Running as i32 {
                    return last.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no final state for {job_id}; events: {:#?}",
                self.events(job_id)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn rank_dir(&self, job_id: &str) -> PathBuf {
        self.work_dir
            .join("ranks")
            .join(job_id)
            .join("attempt-1-rank-0")
    }

    async fn read_pid(&self, job_id: &str, file: &str) -> libc::pid_t {
        let path = self.rank_dir(job_id).join(file);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(s) = std::fs::read_to_string(&path) {
                if let Ok(pid) = s.trim().parse() {
                    return pid;
                }
            }
            assert!(Instant::now() < deadline, "no {}", path.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop_worker.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.worker)
            .await
            .expect("worker did not stop")
            .unwrap()
            .unwrap();
    }
}

fn assignment(job_id: &str, grace_period_s: u32) -> RankAssignment {
    RankAssignment {
        job_id: job_id.into(),
        attempt: 1,
        rank: 0,
        world_size: 1,
        job: "test".into(),
        config_json: "{}".into(),
        device_index: 2,
        device_kind: "gpu".into(),
        grace_period_s,
        ..Default::default()
    }
}

/// True while `pid` is a live (non-zombie) process.
fn alive(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // state is the field after the parenthesised command name
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

async fn wait_gone(pid: libc::pid_t) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn logs(events: &[rank_event::Kind]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|k| match k {
            rank_event::Kind::Log(l) => Some((l.stream.clone(), l.line.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn each_slot_gets_its_share_of_the_cores() {
    assert_eq!(supervisor::threads_per_slot(16, 2), 8);
    assert_eq!(supervisor::threads_per_slot(16, 3), 5);
    assert_eq!(supervisor::threads_per_slot(2, 2), 1);
    assert_eq!(supervisor::threads_per_slot(2, 8), 1);
    assert_eq!(supervisor::threads_per_slot(4, 0), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_entries_go_up_as_events_and_down_to_the_ranks_stdin() {
    let h = Harness::start().await;
    h.assign("rdv-1", 0).await;
    // The rank's published entry reaches the coordinator as a rendezvous event.
    h.wait("the rank's rendezvous event", |f| {
        f.reports.iter().any(|r| {
            r.events.iter().any(|e| {
                e.kind
                    == Some(rank_event::Kind::Rendezvous(RendezvousEntry {
                        key: "ring/addr/0".into(),
                        value: b"hi".to_vec(),
                    }))
            })
        })
    })
    .await;
    // An update for another attempt is not delivered; the one for this attempt is.
    let update = |attempt: u32, value: &[u8]| {
        worker_command::Command::Rendezvous(RendezvousUpdate {
            job_id: "rdv-1".into(),
            attempt,
            entries: vec![RendezvousEntry {
                key: "nccl/id".into(),
                value: value.to_vec(),
            }],
            leader_term: 0,
        })
    };
    h.send(update(7, b"old")).await;
    h.send(update(1, &[0xab, 0xcd])).await;
    let last = h.wait_final("rdv-1").await;
    assert_eq!(last.state, RankState::Succeeded as i32, "{last:?}");
    let lines: Vec<String> = logs(&h.events("rdv-1"))
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    assert!(
        lines.contains(&"got: rendezvous nccl/id abcd".to_string()),
        "{lines:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_rank_and_reports_logs_events_and_exit() {
    let h = Harness::start().await;
    h.assign("ok-1", 0).await;
    let last = h.wait_final("ok-1").await;
    assert_eq!(last.state, RankState::Succeeded as i32, "{last:?}");
    assert_eq!(last.exit_code, 0);

    let states: Vec<i32> = h.states("ok-1").iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        [
            RankState::Starting as i32,
            RankState::Running as i32,
            RankState::Succeeded as i32
        ]
    );
    let events = h.events("ok-1");
    let logs = logs(&events);
    assert!(
        logs.contains(&("stdout".into(), "hello from rank 0 of 1".into())),
        "{logs:?}"
    );
    assert!(
        logs.contains(&("stderr".into(), "to stderr".into())),
        "{logs:?}"
    );
    // the rank got its assignment through the environment, decodable
    let encoded = logs
        .iter()
        .find_map(|(_, l)| l.strip_prefix("assignment="))
        .expect("assignment line");
    assert_eq!(decode_assignment(encoded).unwrap(), assignment("ok-1", 0));
    // event lines became events, not log lines
    assert!(events.iter().any(|k| matches!(k,
        rank_event::Kind::Metric(m) if m.step == 3 && m.values.get("loss") == Some(&0.5))));
    assert!(events.iter().any(|k| matches!(k,
        rank_event::Kind::Checkpoint(c) if c.step == 3 && c.path == "jobs/ok-1/checkpoints/3")));
    assert!(
        !logs.iter().any(|(_, l)| l.contains("trainyard:")),
        "{logs:?}"
    );
    {
        let f = h.fake.lock().unwrap();
        let r = f.reports.iter().find(|r| r.job_id == "ok-1").unwrap();
        assert_eq!((r.worker_id.as_str(), r.attempt, r.rank), ("w-1", 1, 0));
        // batching: far fewer calls than events
        let calls = f.reports.iter().filter(|r| r.job_id == "ok-1").count();
        assert!(
            calls < events.len(),
            "{calls} calls for {} events",
            events.len()
        );
        assert!(f.heartbeats >= 1);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_rank_is_reported_failed_and_worker_keeps_running() {
    let h = Harness::start().await;
    h.assign("fail-1", 0).await;
    let last = h.wait_final("fail-1").await;
    assert_eq!(last.state, RankState::Failed as i32, "{last:?}");
    assert_eq!(last.exit_code, 3);
    assert!(last.message.contains("exit code 3"), "{}", last.message);
    assert!(
        last.message.contains("boom: something broke"),
        "{}",
        last.message
    );

    // the worker is still there and runs the next rank
    h.assign("ok-2", 0).await;
    let last = h.wait_final("ok-2").await;
    assert_eq!(last.state, RankState::Succeeded as i32, "{last:?}");
    // a replayed assignment of a finished rank is not run again
    h.assign("fail-1", 0).await;
    h.assign("ok-3", 0).await;
    h.wait_final("ok-3").await;
    assert_eq!(h.states("fail-1").len(), 3);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_process_group() {
    let h = Harness::start().await;
    h.assign("sleep-1", 30).await;
    // a duplicate of a running rank is ignored
    h.assign("sleep-1", 30).await;
    let leader = h.read_pid("sleep-1", "leader.pid").await;
    let child = h.read_pid("sleep-1", "child.pid").await;
    assert!(alive(leader) && alive(child));
    // in its own process group
    assert_eq!(unsafe { libc::getpgid(leader) }, leader);
    assert_eq!(unsafe { libc::getpgid(child) }, leader);

    let started = Instant::now();
    h.send(worker_command::Command::Cancel(CancelRank {
        job_id: "sleep-1".into(),
        attempt: 1,
        rank: 0,
        reason: "user asked".into(),
        leader_term: 0,
    }))
    .await;
    let last = h.wait_final("sleep-1").await;
    assert_eq!(last.state, RankState::Cancelled as i32, "{last:?}");
    assert!(last.message.contains("user asked"), "{}", last.message);
    // SIGTERM did it, long before the 30 s grace period
    assert!(started.elapsed() < Duration::from_secs(10));
    wait_gone(leader).await;
    wait_gone(child).await;
    let starts = h
        .states("sleep-1")
        .iter()
        .filter(|s| s.state == RankState::Starting as i32)
        .count();
    assert_eq!(
        starts, 1,
        "the duplicate assignment started a second process"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_grace_period() {
    let h = Harness::start().await;
    h.assign("stubborn-1", 1).await;
    let leader = h.read_pid("stubborn-1", "leader.pid").await;
    let started = Instant::now();
    h.send(worker_command::Command::Cancel(CancelRank {
        job_id: "stubborn-1".into(),
        attempt: 1,
        rank: 0,
        reason: String::new(),
        leader_term: 0,
    }))
    .await;
    let last = h.wait_final("stubborn-1").await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "killed before the grace period"
    );
    assert_eq!(last.state, RankState::Cancelled as i32, "{last:?}");
    assert_eq!(last.exit_code, -1);
    assert!(last.message.contains("signal 9"), "{}", last.message);
    wait_gone(leader).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_ranks_and_rejected_reports_stop_a_rank() {
    let h = Harness::start().await;
    h.assign("sleep-a", 5).await;
    let leader_a = h.read_pid("sleep-a", "leader.pid").await;
    h.wait("sleep-a running", |f| {
        f.reports.iter().any(|r| {
            r.job_id == "sleep-a"
                && r.events.iter().any(|e| {
                    matches!(&e.kind, Some(rank_event::Kind::State(s)) if s.state == RankState::Running as i32)
                })
        })
    })
    .await;

    // the coordinator fences the attempt off: the agent stops the rank
    h.fake.lock().unwrap().reject_reports = true;
    h.assign("sleep-b", 5).await;
    let leader_b = h.read_pid("sleep-b", "leader.pid").await;
    wait_gone(leader_b).await;
    assert!(alive(leader_a));
    h.fake.lock().unwrap().reject_reports = false;

    h.stop().await; // returns only after its ranks are stopped
    assert!(!alive(leader_a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reregisters_when_unknown_and_waits_for_the_coordinator() {
    // The coordinator is not up yet when the worker starts.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = reserved.local_addr().unwrap();
    drop(reserved);
    let tmp = tempfile::tempdir().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let worker = tokio::spawn(run_worker(worker_config(addr, tmp.path()), async {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let fake = Arc::new(Mutex::new(Fake::default()));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _stop_server = serve(fake.clone(), listener).await;
    let h_wait = |pred: fn(&Fake) -> bool, what: &'static str| {
        let fake = fake.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !pred(&fake.lock().unwrap()) {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    h_wait(
        |f| f.registrations == 1 && f.heartbeats >= 2,
        "registration",
    )
    .await;
    // The coordinator forgets the worker: it registers again.
    fake.lock().unwrap().known = false;
    h_wait(|f| f.registrations >= 2, "re-registration").await;
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Kills a process group when the test ends, passed or failed.
struct KillGroupOnDrop(libc::pid_t);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        unsafe { libc::killpg(self.0, libc::SIGKILL) };
    }
}

#[test]
fn rank_dies_with_the_thread_that_spawned_it() {
    // PR_SET_PDEATHSIG fires when the spawning thread ends, exactly as when the whole
    // worker is killed with SIGKILL.
    let tmp = tempfile::tempdir().unwrap();
    let work_dir = tmp.path().to_path_buf();
    let a = assignment("sleep-pdeath", 0);
    let key = RankKey {
        job_id: a.job_id.clone(),
        attempt: 1,
        rank: 0,
    };
    let command: Vec<std::ffi::OsString> = vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()];
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    let wd = work_dir.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut child =
                supervisor::spawn(&wd, &command, &key, &a, None, "127.0.0.1", 2).unwrap();
            pid_tx.send(child.id().unwrap() as libc::pid_t).unwrap();
            // give the shell time to start; then the thread ends without killing it
            tokio::time::sleep(Duration::from_millis(300)).await;
            // not reaped by us: forget the handle so kill_on_drop does not do the test's job
            let _ = child.stdout.take();
            std::mem::forget(child);
        });
    })
    .join()
    .unwrap();
    let leader = pid_rx.recv().unwrap();
    let _group = KillGroupOnDrop(leader);
    let deadline = Instant::now() + Duration::from_secs(10);
    // the leader is our (unreaped) child: it becomes a zombie when killed
    while alive(leader) {
        assert!(
            Instant::now() < deadline,
            "rank survived its spawning thread"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut status = 0;
    unsafe {
        libc::killpg(leader, libc::SIGKILL); // the shell's own child is not ours to test
        libc::waitpid(leader, &mut status, 0);
    }
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "status {status:#x}"
    );
}

#[test]
fn device_environment_of_a_rank() {
    let mut a = assignment("env", 0);
    let vars = |a: &RankAssignment, o| -> Vec<(String, String)> {
        supervisor::device_env(a, o)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    };
    let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
    a.device_kind = "cpu".into();
    assert_eq!(vars(&a, None), [pair("TRAINYARD_DEVICE", "cpu")]);
    a.device_kind = "gpu".into();
    a.device_index = 3;
    // an emulated GPU slot: trains on the CPU
    assert_eq!(
        vars(&a, None),
        [
            pair("CUDA_VISIBLE_DEVICES", "3"),
            pair("TRAINYARD_DEVICE", "cpu")
        ]
    );
    // slot 3 is the real GPU with CUDA ordinal 1
    assert_eq!(
        vars(&a, Some(1)),
        [
            pair("CUDA_VISIBLE_DEVICES", "1"),
            pair("TRAINYARD_DEVICE", "cuda")
        ]
    );
}

#[test]
fn empty_rank_command_is_an_error() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut config = worker_config("127.0.0.1:1".parse().unwrap(), tmp.path());
    config.rank_command.clear();
    let err = rt.block_on(run_worker(config, async {})).unwrap_err();
    assert!(err.to_string().contains("rank_command"), "{err}");
    let mut config = worker_config("127.0.0.1:1".parse().unwrap(), tmp.path());
    config.coordinator_url = "not a url".into();
    let err = rt.block_on(run_worker(config, async {})).unwrap_err();
    assert!(
        matches!(err, WorkerError::InvalidCoordinatorUrl { .. }),
        "{err}"
    );
}

/// Entry point of a real rank process in the tests below: the test binary re-runs itself
/// with only this test selected and `TRAINYARD_ASSIGNMENT` set.
#[test]
#[ignore = "entry point of rank processes started by the agent tests"]
fn rank_process_entry() {
    if std::env::var_os(crate::protocol::ASSIGNMENT_ENV).is_some() {
        std::process::exit(crate::run_rank_process());
    }
}

fn real_rank_command() -> Vec<std::ffi::OsString> {
    vec![
        std::env::current_exe().unwrap().into(),
        "agent::tests::rank_process_entry".into(),
        "--exact".into(),
        "--ignored".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ]
}

/// A tiny neural-ode config: the ResNet only, a few images, seconds on a CPU.
fn tiny_config(epochs: u32) -> String {
    let job = trainyard_jobs::registry()
        .get("neural-ode")
        .expect("neural-ode registered");
    let overrides = [
        ("models", "resnet".to_string()),
        ("width", "4".to_string()),
        ("epochs", epochs.to_string()),
        ("train_samples", "64".to_string()),
        ("test_samples", "32".to_string()),
        ("batch_size", "32".to_string()),
        ("eval_batch_size", "32".to_string()),
        ("checkpoint_every", "2".to_string()),
        ("log_every", "1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    job.resolve_config("quick", &overrides).unwrap().to_json()
}

fn real_assignment(
    job_id: &str,
    attempt: u32,
    config_json: String,
    objects_url: &str,
) -> RankAssignment {
    RankAssignment {
        job_id: job_id.into(),
        attempt,
        rank: 0,
        world_size: 1,
        job: "neural-ode".into(),
        config_json,
        objects_url: objects_url.into(),
        device_index: 0,
        device_kind: "cpu".into(),
        grace_period_s: 10,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_rank_trains_checkpoints_and_resumes() {
    let (h, objects_url) = {
        let fake = Arc::new(Mutex::new(Fake::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop_server = serve(fake.clone(), listener).await;
        let tmp = tempfile::tempdir().unwrap();
        let work_dir = tmp.path().join("work");
        let mut config = worker_config(addr, &work_dir);
        config.rank_command = real_rank_command();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let worker = tokio::spawn(run_worker(config, async {
            let _ = stop_rx.await;
        }));
        let objects_url = format!("file://{}", tmp.path().join("objects").display());
        let h = Harness {
            fake,
            work_dir,
            _tmp: tmp,
            stop_worker: Some(stop_tx),
            worker,
            _stop_server: stop_server,
        };
        h.wait("command stream", |f| f.commands.is_some()).await;
        (h, objects_url)
    };

    let a = real_assignment("real-1", 1, tiny_config(1), &objects_url);
    h.send(worker_command::Command::Assign(a.clone())).await;
    let last = h.wait_final("real-1").await;
    let events = h.events("real-1");
    assert_eq!(
        last.state,
        RankState::Succeeded as i32,
        "{last:?}\n{:#?}",
        logs(&events)
    );
    assert!(
        events
            .iter()
            .any(|k| matches!(k, rank_event::Kind::Metric(_))),
        "no metrics"
    );
    assert!(
        events
            .iter()
            .any(|k| matches!(k, rank_event::Kind::Result(_))),
        "no results table"
    );
    let checkpoint = events
        .iter()
        .filter_map(|k| match k {
            rank_event::Kind::Checkpoint(c) => Some(c.clone()),
            _ => None,
        })
        .find(|c| c.step > 0)
        .expect("no checkpoint with step > 0");
    assert_eq!(
        checkpoint.path,
        format!("jobs/real-1/checkpoints/{}", checkpoint.step)
    );
    let manifest = h
        ._tmp
        .path()
        .join("objects")
        .join(&checkpoint.path)
        .join("manifest.json");
    assert!(manifest.is_file(), "{}", manifest.display());

    // attempt 2 resumes from that checkpoint
    let mut b = real_assignment("real-1", 2, tiny_config(1), &objects_url);
    b.resume_from = Some(checkpoint.clone());
    h.send(worker_command::Command::Assign(b)).await;
    let resumed = format!("resumed from checkpoint at step {}", checkpoint.step);
    h.wait("attempt 2 to finish", |f| {
        f.reports
            .iter()
            .filter(|r| r.job_id == "real-1" && r.attempt == 2)
            .flat_map(|r| r.events.iter())
            .any(|e| {
                matches!(&e.kind, Some(rank_event::Kind::State(s)) if s.state > RankState::Running as i32)
            })
    })
    .await;
    let events2: Vec<rank_event::Kind> = h
        .fake
        .lock()
        .unwrap()
        .reports
        .iter()
        .filter(|r| r.job_id == "real-1" && r.attempt == 2)
        .flat_map(|r| r.events.iter().filter_map(|e| e.kind.clone()))
        .collect();
    let logs2 = logs(&events2);
    assert!(
        logs2.iter().any(|(_, l)| l.contains(&resumed)),
        "{logs2:#?}"
    );
    assert!(events2.iter().any(|k| matches!(k,
        rank_event::Kind::Metric(m) if m.values.get("resumed_from_step") == Some(&(checkpoint.step as f64)))));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_rank_stops_on_cancel() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _stop_server = serve(fake.clone(), listener).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut config = worker_config(addr, &tmp.path().join("work"));
    config.rank_command = real_rank_command();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let worker = tokio::spawn(run_worker(config, async {
        let _ = stop_rx.await;
    }));
    let objects_url = format!("file://{}", tmp.path().join("objects").display());
    let h = Harness {
        fake,
        work_dir: tmp.path().join("work"),
        _tmp: tmp,
        stop_worker: Some(stop_tx),
        worker,
        _stop_server,
    };
    h.wait("command stream", |f| f.commands.is_some()).await;
    // long enough that it is still training when cancelled
    let a = real_assignment("real-cancel", 1, tiny_config(1000), &objects_url);
    h.send(worker_command::Command::Assign(a)).await;
    h.wait("a metric", |f| {
        f.reports.iter().any(|r| {
            r.job_id == "real-cancel"
                && r.events
                    .iter()
                    .any(|e| matches!(e.kind, Some(rank_event::Kind::Metric(_))))
        })
    })
    .await;
    h.send(worker_command::Command::Cancel(CancelRank {
        job_id: "real-cancel".into(),
        attempt: 1,
        rank: 0,
        reason: "test cancel".into(),
        leader_term: 0,
    }))
    .await;
    let last = h.wait_final("real-cancel").await;
    assert_eq!(last.state, RankState::Cancelled as i32, "{last:?}");
    // the job noticed should_stop() and exited by itself with 143, before SIGKILL
    assert_eq!(last.exit_code, 143, "{last:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_from_a_deposed_leader_are_ignored() {
    let h = Harness::start().await;
    // A leader of term 7 starts a rank.
    h.send(worker_command::Command::Assign(RankAssignment {
        leader_term: 7,
        ..assignment("sleep-fenced-1", 30)
    }))
    .await;
    let leader = h.read_pid("sleep-fenced-1", "leader.pid").await;
    // A deposed leader (term 5) cannot cancel it, nor start another rank.
    h.send(worker_command::Command::Cancel(CancelRank {
        job_id: "sleep-fenced-1".into(),
        attempt: 1,
        rank: 0,
        reason: "stale leader".into(),
        leader_term: 5,
    }))
    .await;
    h.send(worker_command::Command::Assign(RankAssignment {
        leader_term: 5,
        ..assignment("ok-fenced-2", 0)
    }))
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(leader), "a stale cancel stopped the rank");
    assert!(h.states("ok-fenced-2").is_empty(), "a stale assignment ran");
    // The current leader (same or newer term) can.
    h.send(worker_command::Command::Cancel(CancelRank {
        job_id: "sleep-fenced-1".into(),
        attempt: 1,
        rank: 0,
        reason: "current leader".into(),
        leader_term: 8,
    }))
    .await;
    let last = h.wait_final("sleep-fenced-1").await;
    assert_eq!(last.state, RankState::Cancelled as i32, "{last:?}");
    wait_gone(leader).await;
    h.stop().await;
}
