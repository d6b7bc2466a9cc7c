//! The life of one rank process: spawn it in its own process group (dying with the
//! worker), turn its output into events, stop it on request (SIGTERM to the group, SIGKILL
//! after the grace period), and report how it ended.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use trainyard_proto::{
    rank_event, LogLine, RankAssignment, RankEvent, RankState, RankStateChange, RendezvousEntry,
};

use super::{lock, reporter, Agent, RankKey, StopReason, DEFAULT_GRACE_PERIOD};
use crate::checkpoint::now_unix_ms;
use crate::protocol::{
    encode_assignment, rendezvous_line, split_line, ParsedLine, RankMessage, ASSIGNMENT_ENV,
    COLLECTIVE_HOST_ENV, DATA_CACHE_ENV, DEVICE_CPU, DEVICE_CUDA, DEVICE_ENV, RANK_ENV,
    WORLD_SIZE_ENV,
};

/// Longest line kept from a rank's output; longer lines are split.
const MAX_LINE: u64 = 64 * 1024;
/// How many stderr lines a failure message quotes.
const STDERR_TAIL: usize = 20;
/// How long to wait for the output pipes to drain after the process exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

type Events = mpsc::UnboundedSender<RankEvent>;
type Tail = Arc<Mutex<VecDeque<String>>>;

fn event(kind: rank_event::Kind) -> RankEvent {
    RankEvent {
        at_unix_ms: now_unix_ms(),
        kind: Some(kind),
    }
}

fn state_event(state: RankState, exit_code: i32, message: String) -> RankEvent {
    event(rank_event::Kind::State(RankStateChange {
        state: state as i32,
        exit_code,
        message,
    }))
}

/// What the agent sends a supervised rank.
pub(crate) struct Channels {
    /// Set when the rank must stop, and why.
    pub stop: watch::Receiver<Option<StopReason>>,
    /// Rendezvous entries of the rank's attempt, for its stdin.
    pub inbox: mpsc::UnboundedReceiver<RendezvousEntry>,
}

/// Supervises the rank `key` from spawn to its last report.
pub(crate) async fn supervise(
    agent: Arc<Agent>,
    key: RankKey,
    assignment: RankAssignment,
    state: Arc<AtomicI32>,
    channels: Channels,
) {
    let Channels {
        mut stop,
        mut inbox,
    } = channels;
    let (tx, rx) = mpsc::unbounded_channel();
    let reporter =
        tokio::spawn(reporter::report_loop(agent.clone(), key.clone(), rx).in_current_span());
    let _ = tx.send(state_event(RankState::Starting, 0, String::new()));

    let grace = match assignment.grace_period_s {
        0 => DEFAULT_GRACE_PERIOD,
        s => Duration::from_secs(s as u64),
    };
    let cuda_ordinal = agent
        .config
        .cuda_ordinals
        .get(&assignment.device_index)
        .copied()
        .filter(|_| assignment.device_kind == "gpu");
    let final_event = match spawn(
        &agent.config.work_dir,
        &agent.config.rank_command,
        &key,
        &assignment,
        cuda_ordinal,
        &agent.config.collective_host,
        agent.config.devices.len(),
    ) {
        Err(e) => {
            tracing::error!(error = %e, "cannot start rank process");
            state_event(
                RankState::Failed,
                -1,
                format!("cannot start rank process: {e}"),
            )
        }
        Ok(mut child) => {
            state.store(RankState::Running as i32, Ordering::SeqCst);
            let _ = tx.send(state_event(RankState::Running, 0, String::new()));
            let pid = child.id().map(|p| p as libc::pid_t);
            tracing::info!(pid, "rank process started");
            let tail: Tail = Arc::new(Mutex::new(VecDeque::new()));
            // Rendezvous entries go to the rank's stdin, one line each.
            let feeder = child.stdin.take().map(|mut stdin| {
                tokio::spawn(
                    async move {
                        while let Some(e) = inbox.recv().await {
                            let line = format!("{}\n", rendezvous_line(&e));
                            if let Err(err) = stdin.write_all(line.as_bytes()).await {
                                tracing::debug!(error = %err, "rank stdin closed");
                                break;
                            }
                            let _ = stdin.flush().await;
                        }
                    }
                    .in_current_span(),
                )
            });
            let readers = [
                child.stdout.take().map(|out| {
                    let sink = Sink {
                        tx: tx.clone(),
                        metrics: Some(agent.metrics.clone()),
                    };
                    tokio::spawn(read_lines(out, "stdout", key.rank, sink, None).in_current_span())
                }),
                child.stderr.take().map(|err| {
                    let sink = Sink {
                        tx: tx.clone(),
                        metrics: None,
                    };
                    tokio::spawn(
                        read_lines(err, "stderr", key.rank, sink, Some(tail.clone()))
                            .in_current_span(),
                    )
                }),
            ];
            let (status, stopped) = wait_or_stop(&mut child, pid, &mut stop, grace, &key).await;
            if let Some(feeder) = feeder {
                feeder.abort();
            }
            // Sweep whatever is left of the group (a rank's own children).
            if let Some(pid) = pid {
                signal_group(pid, libc::SIGKILL);
            }
            for reader in readers.into_iter().flatten() {
                let abort = reader.abort_handle();
                if tokio::time::timeout(DRAIN_TIMEOUT, reader).await.is_err() {
                    abort.abort();
                }
            }
            let tail: Vec<String> = lock(&tail).iter().cloned().collect();
            final_state(status, stopped, &tail)
        }
    };
    if let Some(rank_event::Kind::State(s)) = &final_event.kind {
        state.store(s.state, Ordering::SeqCst);
        // Keep a failed rank's scratch folder for inspection; drop the others.
        if s.state != RankState::Failed as i32 {
            let dir = rank_dir(&agent.config.work_dir, &assignment);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot remove rank folder");
            }
        }
        let exit = match RankState::try_from(s.state) {
            Ok(RankState::Succeeded) => "succeeded",
            Ok(RankState::Cancelled) => "cancelled",
            _ => "failed",
        };
        agent.metrics.rank_exited(exit);
        tracing::info!(
            state = RankState::try_from(s.state)
                .map(|s| s.as_str_name())
                .unwrap_or("?"),
            exit_code = s.exit_code,
            "rank finished"
        );
    }
    let _ = tx.send(final_event);
    drop(tx);
    let _ = reporter.await;
}

/// The device variables of a rank's environment: a rank on a real GPU (`cuda_ordinal`) sees
/// only that GPU and trains on CUDA; a rank on an emulated GPU slot keeps
/// `CUDA_VISIBLE_DEVICES=<slot>` as before but trains on the CPU, like a CPU rank.
pub(crate) fn device_env(
    a: &RankAssignment,
    cuda_ordinal: Option<u32>,
) -> Vec<(&'static str, String)> {
    match cuda_ordinal {
        Some(ordinal) => vec![
            ("CUDA_VISIBLE_DEVICES", ordinal.to_string()),
            (DEVICE_ENV, DEVICE_CUDA.to_string()),
        ],
        None if a.device_kind == "gpu" => vec![
            ("CUDA_VISIBLE_DEVICES", a.device_index.to_string()),
            (DEVICE_ENV, DEVICE_CPU.to_string()),
        ],
        None => vec![(DEVICE_ENV, DEVICE_CPU.to_string())],
    }
}

/// Starts the rank process for `a` with `rank_command`, in a folder under `work_dir`;
/// `cuda_ordinal` is the CUDA ordinal of the real GPU the rank was placed on, if any.
pub(crate) fn spawn(
    work_dir: &Path,
    rank_command: &[OsString],
    key: &RankKey,
    a: &RankAssignment,
    cuda_ordinal: Option<u32>,
    collective_host: &str,
    slots: usize,
) -> std::io::Result<Child> {
    let dir = rank_dir(work_dir, a);
    std::fs::create_dir_all(&dir)?;
    let (program, args) = rank_command
        .split_first()
        .ok_or_else(|| std::io::Error::other("empty rank command"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(&dir)
        .env(ASSIGNMENT_ENV, encode_assignment(a))
        .env(RANK_ENV, a.rank.to_string())
        .env(WORLD_SIZE_ENV, a.world_size.max(1).to_string())
        .env("TRAINYARD_JOB_ID", &a.job_id)
        .env("TRAINYARD_ATTEMPT", a.attempt.to_string())
        .env(DATA_CACHE_ENV, work_dir.join("datasets"))
        .env(COLLECTIVE_HOST_ENV, collective_host)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (name, value) in device_env(a, cuda_ordinal) {
        cmd.env(name, value);
    }
    // Each slot owns its share of the cores: N ranks on one host must not each start a
    // thread per core (candle's CPU pools are sized once, from RAYON_NUM_THREADS). A value
    // the worker was started with wins.
    if std::env::var_os(THREADS_ENV).is_none() {
        cmd.env(THREADS_ENV, threads_per_slot(cores(), slots).to_string());
    }
    // Shorter idle spinning for candle's element-wise pool (see trainyard_jobs::cpu).
    for (name, value) in trainyard_jobs::cpu::pool_env() {
        cmd.env(name, value);
    }
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid, raise) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // The rank dies with the worker (PR_SET_PDEATHSIG fires when the thread that
            // forked it ends; the agent spawns from long-lived runtime threads).
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The worker may have died between fork and prctl.
            if libc::getppid() != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
    tracing::debug!(key = %key, dir = %dir.display(), "spawning rank process");
    cmd.spawn()
}

/// Environment variable that sizes a rank's CPU thread pools (rayon's, which candle uses).
pub(crate) const THREADS_ENV: &str = "RAYON_NUM_THREADS";

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// CPU threads of a rank on a worker with `slots` device slots and `cores` cores: an equal
/// share of the cores per slot, at least one.
pub(crate) fn threads_per_slot(cores: usize, slots: usize) -> usize {
    (cores / slots.max(1)).max(1)
}

/// The scratch folder (working directory) of a rank:
/// `<work_dir>/ranks/<job-id>/attempt-<a>-rank-<r>`.
pub(crate) fn rank_dir(work_dir: &Path, a: &RankAssignment) -> PathBuf {
    work_dir
        .join("ranks")
        .join(sanitize(&a.job_id))
        .join(format!("attempt-{}-rank-{}", a.attempt, a.rank))
}

/// Makes a job id safe as one folder name.
fn sanitize(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

fn signal_group(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: plain syscall; ESRCH (the group is gone) is fine.
    unsafe {
        libc::killpg(pid, signal);
    }
}

/// Waits for the process to exit; on a stop request sends SIGTERM to its group and
/// SIGKILL after `grace`. Returns the exit status and why it was stopped, if it was.
async fn wait_or_stop(
    child: &mut Child,
    pid: Option<libc::pid_t>,
    stop: &mut watch::Receiver<Option<StopReason>>,
    grace: Duration,
    key: &RankKey,
) -> (std::io::Result<ExitStatus>, Option<StopReason>) {
    let mut stopped: Option<StopReason> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            status = child.wait() => return (status, stopped),
            changed = stop.wait_for(|r| r.is_some()), if stopped.is_none() => {
                let reason = match changed {
                    Ok(r) => r.clone(),
                    // The agent dropped the entry: treat as a shutdown.
                    Err(_) => Some(StopReason::Shutdown),
                };
                tracing::info!(key = %key, ?reason, grace_s = grace.as_secs_f64(), "stopping rank: SIGTERM");
                stopped = reason;
                if let Some(pid) = pid {
                    signal_group(pid, libc::SIGTERM);
                }
                kill_at = Some(tokio::time::Instant::now() + grace);
            }
            _ = async { if let Some(t) = kill_at { tokio::time::sleep_until(t).await } }, if kill_at.is_some() => {
                tracing::warn!(key = %key, "rank did not stop within its grace period: SIGKILL");
                if let Some(pid) = pid {
                    signal_group(pid, libc::SIGKILL);
                }
                let _ = child.start_kill();
                kill_at = None;
            }
        }
    }
}

/// The final state change of a rank from how it ended.
fn final_state(
    status: std::io::Result<ExitStatus>,
    stopped: Option<StopReason>,
    stderr_tail: &[String],
) -> RankEvent {
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return state_event(
                RankState::Failed,
                -1,
                format!("cannot wait for the rank process: {e}"),
            )
        }
    };
    let (exit_code, how) = match (status.code(), status.signal()) {
        (Some(code), _) => (code, format!("exit code {code}")),
        (None, Some(sig)) => (-1, format!("killed by signal {sig}")),
        (None, None) => (-1, "ended without a status".to_string()),
    };
    if exit_code == 0 {
        return state_event(RankState::Succeeded, 0, how);
    }
    match stopped {
        Some(StopReason::Cancel(reason)) => {
            state_event(RankState::Cancelled, exit_code, format!("{reason} ({how})"))
        }
        Some(StopReason::Stale) => state_event(
            RankState::Cancelled,
            exit_code,
            format!("stale attempt stopped ({how})"),
        ),
        Some(StopReason::Superseded(attempt)) => state_event(
            RankState::Cancelled,
            exit_code,
            format!("superseded by attempt {attempt} ({how})"),
        ),
        Some(StopReason::Shutdown) => state_event(
            RankState::Failed,
            exit_code,
            format!("worker shut down ({how})"),
        ),
        None => {
            let mut message = format!("rank process failed: {how}");
            if !stderr_tail.is_empty() {
                message.push('\n');
                message.push_str(&stderr_tail.join("\n"));
            }
            state_event(RankState::Failed, exit_code, message)
        }
    }
}

/// Where a rank's output goes: events to the reporter, telemetry to the worker's metrics.
struct Sink {
    tx: Events,
    /// Where [`RankMessage::Telemetry`](crate::protocol::RankMessage) lines are added up
    /// (stdout only).
    metrics: Option<Arc<crate::metrics::WorkerMetrics>>,
}

/// Turns one output stream of the rank into events, line by line.
async fn read_lines(
    reader: impl AsyncRead + Unpin,
    stream: &'static str,
    rank: u32,
    sink: Sink,
    tail: Option<Tail>,
) {
    let Sink { tx, metrics } = sink;
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(stream, error = %e, "rank output read failed");
                return;
            }
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        let line = String::from_utf8_lossy(&buf).into_owned();
        let kinds: Vec<rank_event::Kind> = if stream == "stdout" {
            split_line(&line)
                .into_iter()
                .filter_map(|parsed| match parsed {
                    ParsedLine::Event(RankMessage::Telemetry {
                        what,
                        seconds,
                        bytes,
                        count,
                    }) => {
                        if let Some(m) = &metrics {
                            m.observe(what, seconds, bytes, count);
                        }
                        None
                    }
                    ParsedLine::Event(msg) => msg.into_event_kind(rank),
                    ParsedLine::Log(line) => Some(rank_event::Kind::Log(LogLine {
                        rank,
                        stream: stream.into(),
                        line,
                    })),
                })
                .collect()
        } else {
            if let Some(tail) = &tail {
                let mut t = lock(tail);
                if t.len() >= STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line.clone());
            }
            vec![rank_event::Kind::Log(LogLine {
                rank,
                stream: stream.into(),
                line,
            })]
        };
        for kind in kinds {
            if tx.send(event(kind)).is_err() {
                return;
            }
        }
    }
}
