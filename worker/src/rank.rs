//! The rank-process side: the body of the hidden `trainyard rank` subcommand.
//!
//! A rank process reads its [`RankAssignment`] from the environment, resolves the job's
//! config, runs the job with a [`RankContext`], and reports everything through event lines
//! on stdout (see [`crate::protocol`]). SIGTERM and SIGINT make `should_stop()` true.
//!
//! The job trains on the device the agent chose ([`crate::protocol::DEVICE_ENV`]): CUDA
//! device 0 (the rank's GPU, the only one `CUDA_VISIBLE_DEVICES` shows it) when the rank
//! was placed on a real GPU and this binary was built with `cuda`, else the CPU.
//!
//! Checkpoints are saved asynchronously: `save_checkpoint` copies the tensors to host
//! memory and returns while a [`CheckpointUploader`] on the rank's runtime uploads them
//! (manifest last) and then emits the checkpoint event. Before exiting, the rank waits for
//! the pending uploads to commit: without a limit after success (the uploader's commit
//! deadline still applies), within the grace period (less a margin) after a stop request
//! or a job error. `restore_checkpoint` falls back to the newest older committed
//! checkpoint when the requested one is corrupt or partial, and says which it skipped.
//!
//! Exit codes: 0 success, 1 job error (message on stderr; also when no checkpoint could be
//! committed within the commit deadline), 2 bad assignment, 143 stopped on request.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trainyard_jobs::{Checkpoint, JobContext, JobError, ResolvedConfig, ResultsTable};
use trainyard_proto::RankAssignment;

use crate::checkpoint;
use crate::objects::{open_objects, Objects};
use crate::protocol::{
    decode_assignment, ClaimMessage, Measured, RankMessage, ASSIGNMENT_ENV, DATA_CACHE_ENV,
    DEVICE_CPU, DEVICE_CUDA, DEVICE_ENV,
};
use crate::rendezvous::{self, Mailbox, Rendezvous};
use crate::uploader::{CheckpointUploader, Committed, UploadError, UploaderOptions};

/// Exit code of a rank that finished its job.
pub const EXIT_OK: i32 = 0;
/// Exit code of a rank whose job failed.
pub const EXIT_JOB_ERROR: i32 = 1;
/// Exit code of a rank whose assignment could not be used.
pub const EXIT_BAD_ASSIGNMENT: i32 = 2;
/// Exit code of a rank that stopped on request (128 + SIGTERM).
pub const EXIT_STOPPED: i32 = 143;

/// Set by the SIGTERM/SIGINT handler.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// CLOCK_MONOTONIC milliseconds of the first stop signal (0: none yet).
static STOP_REQUESTED_AT_MS: AtomicU64 = AtomicU64::new(0);

/// CLOCK_MONOTONIC in milliseconds (async-signal-safe: clock_gettime only).
fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64).saturating_mul(1000) + (ts.tv_nsec as u64) / 1_000_000
}

extern "C" fn on_stop_signal(_signal: libc::c_int) {
    // Only atomic stores and clock_gettime: async-signal-safe.
    let _ = STOP_REQUESTED_AT_MS.compare_exchange(
        0,
        monotonic_ms().max(1),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// How long ago the stop signal arrived, if one did.
fn since_stop_signal() -> Option<Duration> {
    match STOP_REQUESTED_AT_MS.load(Ordering::SeqCst) {
        0 => None,
        at => Some(Duration::from_millis(monotonic_ms().saturating_sub(at))),
    }
}

/// The part of the grace period a stopping rank leaves unused, so that it exits before
/// the worker's SIGKILL: a tenth of it, between 0.5 and 3 seconds (at most half of it).
pub fn grace_margin(grace: Duration) -> Duration {
    (grace / 10)
        .clamp(Duration::from_millis(500), Duration::from_secs(3))
        .min(grace / 2)
}

fn install_stop_handlers() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic; the sigaction struct is zeroed and
        // then filled in as sigaction(2) requires.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!(signal, "cannot install stop handler");
            }
        }
    }
}

/// Runs a rank process: reads `TRAINYARD_ASSIGNMENT`, runs the job, and returns the exit
/// code (0 success, 1 job error, 2 bad assignment, 143 stopped on request).
pub fn run_rank_process() -> i32 {
    install_stop_handlers();
    let encoded = std::env::var(ASSIGNMENT_ENV).ok();
    run_rank(
        encoded.as_deref(),
        Box::new(std::io::stdout()),
        &STOP_REQUESTED,
        true,
    )
}

/// [`run_rank_process`] with its inputs made explicit (for tests); `read_stdin` starts the
/// reader of rendezvous entries on the process's stdin.
pub(crate) fn run_rank(
    encoded: Option<&str>,
    out: Box<dyn Write + Send>,
    stop: &'static AtomicBool,
    read_stdin: bool,
) -> i32 {
    let Some(encoded) = encoded else {
        eprintln!(
            "trainyard rank: {ASSIGNMENT_ENV} is not set (rank processes are started by a worker)"
        );
        return EXIT_BAD_ASSIGNMENT;
    };
    let assignment = match decode_assignment(encoded) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("trainyard rank: {e}");
            return EXIT_BAD_ASSIGNMENT;
        }
    };
    let config = match ResolvedConfig::from_json(&assignment.config_json) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trainyard rank: config of job {}: {e}", assignment.job_id);
            return EXIT_BAD_ASSIGNMENT;
        }
    };
    let registry = trainyard_jobs::registry();
    let Some(job) = registry.get(&assignment.job) else {
        eprintln!(
            "trainyard rank: unknown job {:?} (known: {})",
            assignment.job,
            registry.names().join(", ")
        );
        return EXIT_BAD_ASSIGNMENT;
    };
    let ctx = match RankContext::new(assignment, out, stop) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("trainyard rank: {e}");
            return EXIT_BAD_ASSIGNMENT;
        }
    };
    if read_stdin {
        ctx.mailbox().read_stdin();
    }
    tracing::info!(
        job = job.name(),
        job_id = %ctx.assignment.job_id,
        attempt = ctx.assignment.attempt,
        rank = ctx.assignment.rank,
        "rank starting"
    );
    let result = job.run(&config, &ctx);
    // Checkpoints still uploading must commit before the process exits.
    let uploads = ctx.finish_uploads(result.is_ok());
    ctx.flush();
    let stopped = ctx.stop.load(Ordering::SeqCst);
    if let Err(e @ UploadError::DeadlineExceeded { .. }) = &uploads {
        if !stopped {
            eprintln!("trainyard rank: {e}");
            return EXIT_JOB_ERROR;
        }
    }
    match result {
        Ok(()) => EXIT_OK,
        Err(JobError::Stopped) => {
            eprintln!("trainyard rank: stopped on request");
            EXIT_STOPPED
        }
        Err(e) => {
            eprintln!("trainyard rank: job {} failed: {e}", ctx.assignment.job);
            EXIT_JOB_ERROR
        }
    }
}

/// The [`JobContext`] of a rank process: events go to the agent as event lines on `out`
/// (stdout), checkpoints go to the object store.
pub struct RankContext {
    assignment: RankAssignment,
    objects: Option<Objects>,
    /// Uploads checkpoints in the background (present when `objects` is).
    uploader: Option<CheckpointUploader>,
    /// Drives the uploader (two worker threads) and the blocking restore.
    runtime: tokio::runtime::Runtime,
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    stop: &'static AtomicBool,
    /// When `should_stop` first saw a stop request (the grace period's start when the
    /// signal's own time is unknown).
    stop_seen: Mutex<Option<Instant>>,
    /// The value of [`DEVICE_ENV`] this rank was started with.
    requested_device: Option<String>,
    /// The training device, opened on first use (one CUDA context per process).
    device: Mutex<Option<candle_core::Device>>,
    /// Rendezvous entries of this attempt's ranks (read from stdin).
    mailbox: Arc<Mailbox>,
}

/// The device for a rank started with `DEVICE_ENV=requested`: the CPU for `cpu` or nothing,
/// CUDA device 0 for `cuda` (an error in a binary built without the `cuda` feature, or
/// when the GPU cannot be opened).
pub fn select_device(requested: Option<&str>) -> Result<candle_core::Device, JobError> {
    match requested.map(str::trim) {
        None | Some("") | Some(DEVICE_CPU) => Ok(candle_core::Device::Cpu),
        Some(DEVICE_CUDA) => open_cuda(),
        Some(other) => Err(JobError::Other(format!(
            "{DEVICE_ENV}={other:?}: unknown device (expected {DEVICE_CPU} or {DEVICE_CUDA})"
        ))),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Result<candle_core::Device, JobError> {
    candle_core::Device::new_cuda(0).map_err(|e| {
        JobError::Other(format!(
            "cannot open the rank's GPU (CUDA device 0, CUDA_VISIBLE_DEVICES={}): {e}",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> Result<candle_core::Device, JobError> {
    Err(JobError::Other(format!(
        "this rank was placed on a real GPU ({DEVICE_ENV}={DEVICE_CUDA}) but this trainyard \
         was built without cuda; rebuild with `--features cuda` (docs/gpu.md)"
    )))
}

impl RankContext {
    /// A context for `assignment`, writing event lines to `out`, stopping when `stop` is set.
    pub fn new(
        assignment: RankAssignment,
        out: Box<dyn Write + Send>,
        stop: &'static AtomicBool,
    ) -> Result<Self, crate::WorkerError> {
        let objects = if assignment.objects_url.is_empty() {
            None
        } else {
            Some(open_objects(&assignment.objects_url)?)
        };
        // Multi-thread: the uploader runs while the training thread computes.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("trainyard-upload")
            .enable_all()
            .build()?;
        let out = Arc::new(Mutex::new(out));
        let uploader = objects.as_ref().map(|objects| {
            let options = UploaderOptions::from_policy(assignment.checkpoint_policy.as_ref())
                .with_test_delay_from_env();
            let events = out.clone();
            let grace = grace_period(&assignment);
            CheckpointUploader::new(
                runtime.handle(),
                objects.clone(),
                options,
                Box::new(move |c| emit_to(&events, committed_events(c))),
                Box::new(move |e| exit_after_grace(e, grace)),
            )
        });
        Ok(RankContext {
            assignment,
            objects,
            uploader,
            runtime,
            out,
            stop,
            stop_seen: Mutex::new(None),
            requested_device: std::env::var(DEVICE_ENV).ok(),
            device: Mutex::new(None),
            mailbox: Mailbox::new(),
        })
    }

    /// Writes one event line. A broken stdout (the agent is gone) is ignored: the
    /// parent-death signal ends this process soon after.
    fn emit(&self, msg: RankMessage) {
        emit_to(&self.out, [msg]);
    }

    /// Where the rendezvous entries the agent hands this rank are collected.
    pub fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }

    /// The background uploader's counters, `None` without an object store.
    pub fn upload_stats(&self) -> Option<crate::uploader::UploaderStats> {
        self.uploader.as_ref().map(|u| u.stats())
    }

    /// Waits until every checkpoint saved so far is committed, or `deadline` passes, or
    /// the uploader gives up. `Ok` without an object store.
    pub fn wait_for_uploads(&self, deadline: Option<Instant>) -> Result<(), UploadError> {
        match &self.uploader {
            Some(u) => u.wait_idle(deadline),
            None => Ok(()),
        }
    }

    /// The end of the grace period, less a margin, once a stop was requested.
    fn stop_deadline(&self) -> Option<Instant> {
        if !self.stop.load(Ordering::SeqCst) {
            return None;
        }
        let grace = grace_period(&self.assignment);
        let now = Instant::now();
        let since = since_stop_signal().unwrap_or_else(|| {
            let seen = self.stop_seen.lock().map(|s| *s).unwrap_or(None);
            seen.map(|t| now.duration_since(t)).unwrap_or_default()
        });
        Some(now + (grace - grace_margin(grace)).saturating_sub(since))
    }

    /// Waits for the pending uploads before the rank exits: after a successful job until
    /// they commit (or the uploader gives up) unless a stop arrives meanwhile; after a
    /// stop request within the grace period less a margin; after a job error within the
    /// grace period. Logs what did not commit.
    fn finish_uploads(&self, job_succeeded: bool) -> Result<(), UploadError> {
        let Some(uploader) = &self.uploader else {
            return Ok(());
        };
        let pending = uploader.stats().pending;
        if pending == 0 {
            return uploader.fatal().map_or(Ok(()), Err);
        }
        let started = Instant::now();
        tracing::info!(
            pending,
            "waiting for checkpoint uploads to commit before exiting"
        );
        let error_deadline = (!job_succeeded).then(|| started + grace_period(&self.assignment));
        let result = loop {
            let deadline = self.stop_deadline().or(error_deadline);
            // Wake up now and then: a stop may arrive while waiting without a deadline.
            let slice = Instant::now() + Duration::from_millis(200);
            match uploader.wait_idle(Some(deadline.map_or(slice, |d| d.min(slice)))) {
                Err(UploadError::NotIdle { pending })
                    if deadline.is_some_and(|d| Instant::now() >= d) =>
                {
                    break Err(UploadError::NotIdle { pending })
                }
                Err(UploadError::NotIdle { .. }) => continue,
                other => break other,
            }
        };
        match &result {
            Ok(()) => tracing::info!(
                waited_s = format!("{:.2}", started.elapsed().as_secs_f64()),
                "checkpoint uploads committed"
            ),
            Err(UploadError::NotIdle { pending }) => {
                let line = format!(
                    "{pending} checkpoint upload(s) did not commit within the grace period; \
                     the job resumes from the last committed checkpoint"
                );
                tracing::warn!("{line}");
                eprintln!("trainyard rank: {line}");
            }
            Err(e) => tracing::error!("{e}"),
        }
        result
    }

    fn flush(&self) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.flush();
        }
    }

    fn objects(&self) -> Result<&Objects, JobError> {
        self.objects.as_ref().ok_or_else(|| {
            JobError::Checkpoint(
                "the assignment has no objects_url: checkpoints are unavailable".into(),
            )
        })
    }
}

/// Writes event lines to the rank's stdout, all under one lock.
fn emit_to(out: &Mutex<Box<dyn Write + Send>>, msgs: impl IntoIterator<Item = RankMessage>) {
    let mut out = match out.lock() {
        Ok(o) => o,
        Err(poisoned) => poisoned.into_inner(),
    };
    for msg in msgs {
        let _ = writeln!(out, "{}", msg.to_line());
    }
    let _ = out.flush();
}

/// The events of a committed checkpoint: a log line, then the checkpoint event the
/// coordinator records.
fn committed_events(c: &Committed) -> [RankMessage; 3] {
    let m = &c.manifest;
    let line = format!(
        "checkpoint at step {} committed: {:.1} MiB in {:.2} s{}",
        m.step,
        c.bytes as f64 / (1u64 << 20) as f64,
        c.elapsed.as_secs_f64(),
        if c.tries > 1 {
            format!(" ({} tries)", c.tries)
        } else {
            String::new()
        }
    );
    tracing::debug!("{line}");
    [
        RankMessage::Log { line },
        RankMessage::Checkpoint {
            job_id: m.job_id.clone(),
            step: m.step,
            path: c.dir.clone(),
            created_unix_ms: m.created_unix_ms,
            attempt: m.attempt,
            metrics: m.metrics.clone(),
        },
        RankMessage::Telemetry {
            what: Measured::CheckpointUpload,
            seconds: c.elapsed.as_secs_f64(),
            bytes: c.bytes,
            count: 1,
        },
    ]
}

/// How often a [`Metered`] communicator reports its all-reduce totals to the agent.
const ALL_REDUCE_REPORT_EVERY: Duration = Duration::from_secs(2);

/// A communicator that measures its all-reduces (time in the call, bytes of the inputs)
/// and reports them to the agent as [`Measured::AllReduce`] telemetry, at most every
/// [`ALL_REDUCE_REPORT_EVERY`] and when dropped. Only for backends whose `all_reduce`
/// returns once the result is on the host (the TCP ring): a device backend (NCCL) returns
/// once the work is queued, so timing the call would not measure the transfer.
struct Metered {
    inner: Box<dyn trainyard_collective::Collective>,
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    seconds: f64,
    bytes: u64,
    calls: u64,
    last_report: Instant,
}

impl Metered {
    fn report(&mut self) {
        if self.calls == 0 {
            return;
        }
        emit_to(
            &self.out,
            [RankMessage::Telemetry {
                what: Measured::AllReduce,
                seconds: self.seconds,
                bytes: self.bytes,
                count: self.calls,
            }],
        );
        self.seconds = 0.0;
        self.bytes = 0;
        self.calls = 0;
        self.last_report = Instant::now();
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.report();
    }
}

impl trainyard_collective::Collective for Metered {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce(
        &mut self,
        tensors: &[candle_core::Tensor],
        op: trainyard_collective::ReduceOp,
    ) -> Result<Vec<candle_core::Tensor>, trainyard_collective::CollectiveError> {
        let started = Instant::now();
        let out = self.inner.all_reduce(tensors, op)?;
        self.seconds += started.elapsed().as_secs_f64();
        self.bytes += tensors
            .iter()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum::<u64>();
        self.calls += 1;
        if self.last_report.elapsed() >= ALL_REDUCE_REPORT_EVERY {
            self.report();
        }
        Ok(out)
    }

    fn broadcast(
        &mut self,
        tensors: &[candle_core::Tensor],
        root: usize,
    ) -> Result<Vec<candle_core::Tensor>, trainyard_collective::CollectiveError> {
        self.inner.broadcast(tensors, root)
    }

    fn barrier(&mut self) -> Result<(), trainyard_collective::CollectiveError> {
        self.inner.barrier()
    }
}

/// The grace period of `assignment` (the worker's default when it carries none).
fn grace_period(assignment: &RankAssignment) -> Duration {
    match assignment.grace_period_s {
        0 => crate::agent::DEFAULT_GRACE_PERIOD,
        s => Duration::from_secs(u64::from(s)),
    }
}

/// After the uploader gave up, the job is asked to stop (`should_stop`) and the rank
/// exits 1 when it returns; a job that does not return within `grace` is ended here.
fn exit_after_grace(error: &UploadError, grace: Duration) {
    let message = error.to_string();
    let spawned = std::thread::Builder::new()
        .name("trainyard-upload-deadline".into())
        .spawn(move || {
            std::thread::sleep(grace);
            eprintln!("trainyard rank: {message} (the job did not stop within {grace:?})");
            std::process::exit(EXIT_JOB_ERROR);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the upload-deadline watchdog");
    }
}

impl JobContext for RankContext {
    fn rank(&self) -> u32 {
        self.assignment.rank
    }

    fn world_size(&self) -> u32 {
        self.assignment.world_size.max(1)
    }

    fn log(&self, line: &str) {
        self.emit(RankMessage::Log {
            line: line.to_string(),
        });
    }

    fn metrics(&self, step: u64, values: &[(&str, f64)]) {
        self.emit(RankMessage::Metric {
            step,
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        });
    }

    fn progress(&self, stage: &str, done: u64, total: u64) {
        self.emit(RankMessage::Progress {
            stage: stage.to_string(),
            done,
            total,
        });
    }

    fn should_stop(&self) -> bool {
        let requested = self.stop.load(Ordering::SeqCst);
        if requested {
            if let Ok(mut seen) = self.stop_seen.lock() {
                seen.get_or_insert_with(Instant::now);
            }
            return true;
        }
        // Uploads failed past the commit deadline: wind the job down (the rank exits 1).
        self.uploader.as_ref().is_some_and(|u| u.fatal().is_some())
    }

    /// Copies the tensors to host memory and queues the upload; returns before it is
    /// committed (see the module docs). Blocks only while two earlier checkpoints are
    /// still uploading. Fails when there is no object store or uploads have failed past
    /// the commit deadline.
    fn save_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), JobError> {
        self.objects()?;
        let Some(uploader) = &self.uploader else {
            return Err(JobError::Checkpoint("no checkpoint uploader".into()));
        };
        if let Some(e) = uploader.fatal() {
            return Err(JobError::Checkpoint(e.to_string()));
        }
        let started = Instant::now();
        let prepared = checkpoint::prepare_checkpoint_with(
            &self.assignment.job_id,
            self.assignment.attempt,
            checkpoint,
            Some(uploader.buffer_pool()),
        )
        .map_err(|e| JobError::Checkpoint(e.to_string()))?;
        let copied = started.elapsed();
        let bytes = prepared.size();
        uploader
            .submit_unless(prepared, || self.stop.load(Ordering::SeqCst))
            .map_err(|e| match e {
                // Stopping while earlier checkpoints still upload: the job winds down now
                // (they get the rest of the grace period to commit).
                crate::uploader::UploadError::Abandoned => JobError::Stopped,
                e => JobError::Checkpoint(e.to_string()),
            })?;
        self.emit(RankMessage::Telemetry {
            what: Measured::CheckpointSave,
            seconds: started.elapsed().as_secs_f64(),
            bytes,
            count: 1,
        });
        tracing::debug!(
            step = checkpoint.step,
            bytes,
            copy_ms = copied.as_secs_f64() * 1e3,
            blocked_ms = started.elapsed().as_secs_f64() * 1e3,
            "checkpoint copied to host memory; uploading in the background"
        );
        Ok(())
    }

    /// Restores the newest committed checkpoint at or below `resume_from`'s step whose
    /// manifest verifies; corrupt or partial ones are skipped with a warning and a log
    /// line naming them and why.
    fn restore_checkpoint(
        &self,
        device: &candle_core::Device,
    ) -> Result<Option<Checkpoint>, JobError> {
        let Some(info) = self.assignment.resume_from.as_ref() else {
            return Ok(None);
        };
        let objects = self.objects()?;
        let restored = self
            .runtime
            .block_on(checkpoint::restore_latest(
                objects, &info.path, info.step, device,
            ))
            .map_err(|e| JobError::Checkpoint(e.to_string()))?;
        for skipped in &restored.skipped {
            let line = format!(
                "skipping checkpoint {} (step {}): {}; falling back to an older one",
                skipped.dir, skipped.step, skipped.reason
            );
            tracing::warn!("{line}");
            self.log(&line);
        }
        match restored.found {
            Some((dir, _, checkpoint)) => {
                if dir != info.path.trim_end_matches('/') {
                    let line = format!(
                        "restoring checkpoint {dir} (step {}) instead of {} (step {})",
                        checkpoint.step, info.path, info.step
                    );
                    tracing::warn!("{line}");
                    self.log(&line);
                }
                Ok(Some(checkpoint))
            }
            None => {
                let reasons: Vec<String> = restored
                    .skipped
                    .iter()
                    .map(|s| format!("step {}: {}", s.step, s.reason))
                    .collect();
                Err(JobError::Checkpoint(format!(
                    "no usable checkpoint at or below step {} of {} ({})",
                    info.step,
                    info.path,
                    if reasons.is_empty() {
                        "none committed".to_string()
                    } else {
                        reasons.join("; ")
                    }
                )))
            }
        }
    }

    fn results(&self, table: &ResultsTable) {
        self.emit(RankMessage::Result {
            title: table.title.clone(),
            columns: table.columns.clone(),
            rows: table.rows.clone(),
            notes: table.notes.clone(),
            claims: table.claims.iter().map(ClaimMessage::from).collect(),
        });
    }

    /// Fetches the data set into the worker's cache ([`DATA_CACHE_ENV`], else
    /// `./datasets` of the rank's folder): downloaded once per worker and verified, shared
    /// by its ranks.
    fn dataset(&self, url: &str) -> Result<std::path::PathBuf, JobError> {
        let cache = std::env::var_os(DATA_CACHE_ENV)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from("datasets"));
        let started = Instant::now();
        let fetched = self
            .runtime
            .block_on(trainyard_objects::datasets::fetch(url, &cache))
            .map_err(|e| JobError::Data(e.to_string()))?;
        let how = if fetched.downloaded {
            format!("downloaded in {:.1} s", started.elapsed().as_secs_f64())
        } else {
            "already in the worker's cache".to_string()
        };
        self.log(&format!(
            "data set {} (digest {}): {how}",
            trainyard_objects::redact_url(url),
            &fetched.digest[..12.min(fetched.digest.len())]
        ));
        Ok(fetched.dir)
    }

    fn device(&self) -> Result<candle_core::Device, JobError> {
        let mut slot = match self.device.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(device) = slot.as_ref() {
            return Ok(device.clone());
        }
        let device = select_device(self.requested_device.as_deref())?;
        if device.is_cuda() {
            let line = format!(
                "training on the GPU: {} (CUDA_VISIBLE_DEVICES={})",
                trainyard_jobs::device_name(&device),
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
            );
            tracing::info!("{line}");
            self.log(&line);
        }
        *slot = Some(device.clone());
        Ok(device)
    }

    fn save_artifact(&self, name: &str, bytes: &[u8]) -> Result<(), JobError> {
        trainyard_jobs::check_artifact_name(name)?;
        let objects = self.objects.as_ref().ok_or_else(|| {
            JobError::Other(format!(
                "{name}: this rank has no object store to keep artifacts in"
            ))
        })?;
        let path = format!("jobs/{}/results/{name}", self.assignment.job_id);
        let data = bytes::Bytes::copy_from_slice(bytes);
        self.runtime
            .block_on(objects.put(&path, data))
            .map_err(|e| JobError::Other(format!("storing {path}: {e}")))?;
        self.emit(RankMessage::Artifact {
            name: name.to_string(),
            path,
            size_bytes: bytes.len() as u64,
        });
        Ok(())
    }

    fn communicator(&self) -> Result<Box<dyn trainyard_collective::Collective>, JobError> {
        let device = self.device()?;
        let publish = |msg: RankMessage| self.emit(msg);
        let r = Rendezvous {
            job_id: &self.assignment.job_id,
            attempt: self.assignment.attempt,
            rank: self.assignment.rank as usize,
            world_size: self.world_size() as usize,
            mailbox: &self.mailbox,
            publish: &publish,
            stop: self.stop,
        };
        let started = Instant::now();
        let comm = rendezvous::connect(&r, &device)?;
        if r.world_size > 1 {
            self.log(&format!(
                "rank {} of {} connected ({}) in {:.1} s",
                r.rank,
                r.world_size,
                comm.backend(),
                started.elapsed().as_secs_f64()
            ));
        }
        if r.world_size > 1 && comm.backend() != "nccl" {
            return Ok(Box::new(Metered {
                inner: comm,
                out: self.out.clone(),
                seconds: 0.0,
                bytes: 0,
                calls: 0,
                last_report: Instant::now(),
            }));
        }
        Ok(comm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_assignment, parse_line, ParsedLine};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    /// A `Write` whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        /// Every event written, telemetry included.
        fn all_events(&self) -> Vec<RankMessage> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|l| match parse_line(l) {
                    ParsedLine::Event(m) => m,
                    ParsedLine::Log(l) => panic!("plain line {l:?}"),
                })
                .collect()
        }

        /// The events for the coordinator (telemetry left out).
        fn events(&self) -> Vec<RankMessage> {
            self.all_events()
                .into_iter()
                .filter(|m| !matches!(m, RankMessage::Telemetry { .. }))
                .collect()
        }

        /// The telemetry written: (what, bytes, count).
        fn telemetry(&self) -> Vec<(Measured, u64, u64)> {
            self.all_events()
                .into_iter()
                .filter_map(|m| match m {
                    RankMessage::Telemetry {
                        what,
                        bytes,
                        count,
                        seconds,
                    } => {
                        assert!(seconds.is_finite() && seconds >= 0.0, "{seconds}");
                        Some((what, bytes, count))
                    }
                    _ => None,
                })
                .collect()
        }
    }

    fn leak_flag() -> &'static AtomicBool {
        Box::leak(Box::new(AtomicBool::new(false)))
    }

    fn assignment(objects_url: String) -> RankAssignment {
        RankAssignment {
            job_id: "job-7".into(),
            attempt: 2,
            rank: 0,
            world_size: 1,
            job: "neural-ode".into(),
            objects_url,
            ..Default::default()
        }
    }

    #[test]
    fn artifacts_go_to_the_object_store_and_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/objects", dir.path().display());
        let cap = Capture::default();
        let ctx = RankContext::new(assignment(url), Box::new(cap.clone()), leak_flag()).unwrap();
        ctx.save_artifact("plot.png", b"\x89PNG fake").unwrap();
        let stored = dir.path().join("objects/jobs/job-7/results/plot.png");
        assert_eq!(std::fs::read(&stored).unwrap(), b"\x89PNG fake");
        assert_eq!(
            cap.events(),
            vec![RankMessage::Artifact {
                name: "plot.png".into(),
                path: "jobs/job-7/results/plot.png".into(),
                size_bytes: 9,
            }]
        );
        for bad in ["", "../x.png", "a/b.png", ".hidden"] {
            let err = ctx.save_artifact(bad, b"x").unwrap_err().to_string();
            assert!(err.contains("artifact name"), "{bad:?}: {err}");
        }
        let none = RankContext::new(
            assignment(String::new()),
            Box::new(Capture::default()),
            leak_flag(),
        )
        .unwrap();
        let err = none.save_artifact("a.png", b"x").unwrap_err().to_string();
        assert!(err.contains("no object store"), "{err}");
    }

    #[test]
    fn context_reports_events_and_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/objects", dir.path().display());
        let cap = Capture::default();
        let stop = leak_flag();
        let ctx = RankContext::new(assignment(url.clone()), Box::new(cap.clone()), stop).unwrap();
        ctx.log("hello");
        ctx.metrics(3, &[("loss", 0.5)]);
        ctx.progress("epoch 1/1", 1, 2);
        assert!(!ctx.should_stop());
        stop.store(true, Ordering::SeqCst);
        assert!(ctx.should_stop());
        assert!(ctx
            .restore_checkpoint(&candle_core::Device::Cpu)
            .unwrap()
            .is_none());

        let mut tensors = BTreeMap::new();
        tensors.insert(
            "w".to_string(),
            candle_core::Tensor::new(&[1f32, 2., 3.], &candle_core::Device::Cpu).unwrap(),
        );
        let ck = Checkpoint {
            step: 11,
            tensors,
            state: serde_json::json!({"epoch": 1}),
            metrics: [("acc".to_string(), 0.75)].into_iter().collect(),
        };
        ctx.save_checkpoint(&ck).unwrap();
        // The upload runs in the background; the event follows the manifest.
        ctx.wait_for_uploads(Some(Instant::now() + Duration::from_secs(30)))
            .unwrap();
        assert!(dir
            .path()
            .join("objects/jobs/job-7/checkpoints/11/manifest.json")
            .is_file());
        ctx.results(&ResultsTable {
            title: "T".into(),
            columns: vec!["c".into()],
            rows: vec![vec!["v".into()]],
            notes: vec![],
            claims: vec![trainyard_jobs::Claim {
                experiment: "e".into(),
                claim: "c".into(),
                held: true,
                treatment_value: Some(61.5),
                baseline_value: Some(f64::NAN),
                unit: "%".into(),
                ..Default::default()
            }],
        });

        let events = cap.events();
        assert_eq!(events.len(), 6, "{events:?}");
        match &events[5] {
            RankMessage::Result { claims, .. } => {
                assert_eq!(claims.len(), 1);
                assert!(claims[0].held && claims[0].experiment == "e");
                // a number JSON cannot carry is dropped, not sent as null garbage
                assert_eq!(claims[0].treatment_value, Some(61.5));
                assert_eq!(claims[0].baseline_value, None);
                assert_eq!(claims[0].unit, "%");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            events[0],
            RankMessage::Log {
                line: "hello".into()
            }
        );
        match &events[3] {
            RankMessage::Log { line } => assert!(
                line.starts_with("checkpoint at step 11 committed: "),
                "{line}"
            ),
            other => panic!("{other:?}"),
        }
        match &events[4] {
            RankMessage::Checkpoint {
                job_id,
                step,
                path,
                attempt,
                metrics,
                ..
            } => {
                assert_eq!((job_id.as_str(), *step, *attempt), ("job-7", 11, 2));
                assert_eq!(path, "jobs/job-7/checkpoints/11");
                assert_eq!(metrics["acc"], 0.75);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ctx.upload_stats().map(|s| s.committed), Some(1));
        // The worker's metrics hear of the save and of the upload, with the same size.
        let telemetry = cap.telemetry();
        let kinds: Vec<Measured> = telemetry.iter().map(|t| t.0).collect();
        assert_eq!(
            kinds,
            vec![Measured::CheckpointSave, Measured::CheckpointUpload],
            "{telemetry:?}"
        );
        assert!(
            telemetry.iter().all(|t| t.1 > 0 && t.2 == 1),
            "{telemetry:?}"
        );

        // A restarted attempt restores what the first one saved.
        let mut resumed = assignment(url);
        resumed.attempt = 3;
        resumed.resume_from = Some(trainyard_proto::CheckpointInfo {
            job_id: "job-7".into(),
            step: 11,
            path: "jobs/job-7/checkpoints/11".into(),
            ..Default::default()
        });
        let ctx2 = RankContext::new(resumed, Box::new(Capture::default()), leak_flag()).unwrap();
        let back = ctx2
            .restore_checkpoint(&candle_core::Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(back.step, 11);
        assert_eq!(
            back.tensors["w"].to_vec1::<f32>().unwrap(),
            vec![1., 2., 3.]
        );
    }

    fn small_checkpoint(step: u64) -> Checkpoint {
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "w".to_string(),
            candle_core::Tensor::new(&[step as f32; 4], &candle_core::Device::Cpu).unwrap(),
        );
        Checkpoint {
            step,
            tensors,
            state: serde_json::json!({ "step": step }),
            metrics: BTreeMap::new(),
        }
    }

    #[test]
    fn restore_falls_back_to_the_previous_committed_checkpoint_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/objects", dir.path().display());
        let ctx = RankContext::new(
            assignment(url.clone()),
            Box::new(Capture::default()),
            leak_flag(),
        )
        .unwrap();
        for step in [5, 10, 15] {
            ctx.save_checkpoint(&small_checkpoint(step)).unwrap();
        }
        ctx.wait_for_uploads(Some(Instant::now() + Duration::from_secs(30)))
            .unwrap();
        // Step 10's tensors are corrupted (same size); step 15 stays the newest but the
        // coordinator asks for step 10, so 15 is not a candidate.
        let model = dir
            .path()
            .join("objects/jobs/job-7/checkpoints/10/model.safetensors");
        let mut bytes = std::fs::read(&model).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(&model, bytes).unwrap();

        let mut resumed = assignment(url);
        resumed.attempt = 3;
        resumed.resume_from = Some(trainyard_proto::CheckpointInfo {
            job_id: "job-7".into(),
            step: 10,
            path: "jobs/job-7/checkpoints/10".into(),
            ..Default::default()
        });
        let cap = Capture::default();
        let ctx2 = RankContext::new(resumed.clone(), Box::new(cap.clone()), leak_flag()).unwrap();
        let back = ctx2
            .restore_checkpoint(&candle_core::Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(back.step, 5);
        let lines: Vec<String> = cap
            .events()
            .into_iter()
            .filter_map(|e| match e {
                RankMessage::Log { line } => Some(line),
                _ => None,
            })
            .collect();
        assert!(
            lines[0].starts_with("skipping checkpoint jobs/job-7/checkpoints/10 (step 10): ")
                && lines[0].contains("sha256"),
            "{lines:?}"
        );
        assert!(
            lines[1].contains("instead of jobs/job-7/checkpoints/10"),
            "{lines:?}"
        );

        // With every candidate unusable, the restore fails naming them.
        std::fs::remove_file(
            dir.path()
                .join("objects/jobs/job-7/checkpoints/5/manifest.json"),
        )
        .unwrap();
        let ctx3 = RankContext::new(resumed, Box::new(Capture::default()), leak_flag()).unwrap();
        let err = ctx3
            .restore_checkpoint(&candle_core::Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no usable checkpoint at or below step 10") && err.contains("step 10: "),
            "{err}"
        );
    }

    #[test]
    fn a_stop_request_bounds_the_final_wait_by_the_grace_period() {
        assert_eq!(
            grace_margin(Duration::from_secs(30)),
            Duration::from_secs(3)
        );
        assert_eq!(
            grace_margin(Duration::from_secs(10)),
            Duration::from_secs(1)
        );
        assert_eq!(
            grace_margin(Duration::from_secs(1)),
            Duration::from_millis(500)
        );
        assert_eq!(
            grace_margin(Duration::from_millis(600)),
            Duration::from_millis(300)
        );
        let stop = leak_flag();
        let mut a = assignment(String::new());
        a.grace_period_s = 4;
        let ctx = RankContext::new(a, Box::new(Capture::default()), stop).unwrap();
        assert!(ctx.stop_deadline().is_none());
        stop.store(true, Ordering::SeqCst);
        assert!(ctx.should_stop());
        let deadline = ctx.stop_deadline().unwrap();
        let left = deadline.saturating_duration_since(Instant::now());
        // 4 s less the 0.5 s margin, counted from when the stop was first seen.
        assert!(
            left <= Duration::from_millis(3500) && left > Duration::from_millis(3000),
            "{left:?}"
        );
        // Without an object store there is nothing to wait for.
        assert!(ctx.finish_uploads(false).is_ok());
    }

    #[test]
    fn bad_assignments_exit_2() {
        let out = || Box::new(Capture::default()) as Box<dyn Write + Send>;
        assert_eq!(
            run_rank(None, out(), leak_flag(), false),
            EXIT_BAD_ASSIGNMENT
        );
        assert_eq!(
            run_rank(Some("not hex"), out(), leak_flag(), false),
            EXIT_BAD_ASSIGNMENT
        );
        let mut a = assignment(String::new());
        a.config_json = "{broken".into();
        assert_eq!(
            run_rank(Some(&encode_assignment(&a)), out(), leak_flag(), false),
            EXIT_BAD_ASSIGNMENT
        );
        // an unknown job, with a config that does resolve
        let job = trainyard_jobs::registry()
            .get("neural-ode")
            .expect("neural-ode registered");
        let config = job.resolve_config("quick", &BTreeMap::new()).unwrap();
        a.config_json = config.to_json();
        a.job = "no-such-job".into();
        assert_eq!(
            run_rank(Some(&encode_assignment(&a)), out(), leak_flag(), false),
            EXIT_BAD_ASSIGNMENT
        );
    }

    #[test]
    fn device_selection() {
        for cpu in [None, Some(""), Some("cpu"), Some(" cpu ")] {
            assert!(select_device(cpu).unwrap().is_cpu(), "{cpu:?}");
        }
        let err = select_device(Some("tpu")).unwrap_err().to_string();
        assert!(
            err.contains("TRAINYARD_DEVICE") && err.contains("tpu"),
            "{err}"
        );
        if !cfg!(feature = "cuda") {
            let err = select_device(Some("cuda")).unwrap_err().to_string();
            assert!(err.contains("built without cuda"), "{err}");
        }
        let ctx = RankContext::new(
            assignment(String::new()),
            Box::new(Capture::default()),
            leak_flag(),
        )
        .unwrap();
        if ctx.requested_device.is_none() {
            assert!(ctx.device().unwrap().is_cpu());
            assert!(ctx.device().unwrap().is_cpu());
        }
    }
}
