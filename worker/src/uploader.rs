//! The background checkpoint uploader of a rank process.
//!
//! The protocol (see also docs/architecture.md, "Checkpoint protocol"):
//!
//! * **Asynchronous.** [`CheckpointUploader::submit`] takes a checkpoint already copied to
//!   host memory ([`crate::checkpoint::prepare_checkpoint`], the only part training waits
//!   for) and returns at once; a task on the rank's tokio runtime uploads it.
//! * **At most one in flight plus one queued.** A save while two are pending blocks the
//!   trainer until the older one commits, and says so in a warning; no checkpoint is ever
//!   dropped.
//! * **In order, manifest last.** Checkpoints commit in the order they were saved; within
//!   one, the tensor file(s) go up first (large ones as concurrent multipart uploads), the
//!   manifest LAST. The commit hook (the rank's checkpoint event) runs after the manifest.
//! * **Retries and the commit deadline.** A failed upload is retried (resuming where it
//!   stopped) with exponential backoff and jitter, on top of `object_store`'s own request
//!   retries, while training continues; every failed try is logged at `warn`. When no
//!   checkpoint has been committed for `commit_timeout` while uploads keep failing, the
//!   uploader gives up: [`CheckpointUploader::fatal`] returns
//!   "no checkpoint could be committed for N s: <last error>", and every later call fails
//!   with it.
//! * **Flush.** [`CheckpointUploader::wait_idle`] waits until everything submitted is
//!   committed (a rank calls it before exiting, bounded by its grace period when stopped).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use trainyard_proto::CheckpointPolicy;

use crate::checkpoint::{BufferPool, CheckpointUpload, Manifest, PreparedCheckpoint};
use crate::objects::Objects;

/// TEST ONLY: milliseconds the uploader of a rank waits after writing a checkpoint's
/// tensor files and before writing its manifest, so end-to-end tests can kill a worker
/// while a checkpoint is partial. Never set it in production.
pub const TEST_UPLOAD_DELAY_ENV: &str = "TRAINYARD_TEST_UPLOAD_DELAY_MS";

/// Default of [`UploaderOptions::commit_timeout`] (the coordinator's default policy).
pub const DEFAULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(600);

/// How the uploader queues, retries and gives up.
#[derive(Debug, Clone, PartialEq)]
pub struct UploaderOptions {
    /// The attempt fails when no checkpoint could be committed for this long while
    /// uploads keep failing.
    pub commit_timeout: Duration,
    /// First wait before a retry (then doubled each time, with jitter).
    pub initial_backoff: Duration,
    /// Longest wait before a retry.
    pub max_backoff: Duration,
    /// Checkpoints saved but not committed (in flight plus queued) before a save blocks.
    pub max_pending: usize,
    /// TEST ONLY: wait between a checkpoint's files and its manifest ([`TEST_UPLOAD_DELAY_ENV`]).
    pub delay_before_manifest: Duration,
}

impl Default for UploaderOptions {
    fn default() -> Self {
        UploaderOptions {
            commit_timeout: DEFAULT_COMMIT_TIMEOUT,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_pending: 2,
            delay_before_manifest: Duration::ZERO,
        }
    }
}

impl UploaderOptions {
    /// The defaults with the commit deadline of a job's `policy` (0 or none: the default).
    pub fn from_policy(policy: Option<&CheckpointPolicy>) -> Self {
        let mut options = UploaderOptions::default();
        if let Some(s) = policy.map(|p| p.commit_timeout_s).filter(|s| *s > 0) {
            options.commit_timeout = Duration::from_secs(u64::from(s));
        }
        options
    }

    /// Applies [`TEST_UPLOAD_DELAY_ENV`] from this process's environment, when set.
    pub fn with_test_delay_from_env(mut self) -> Self {
        if let Some(ms) = std::env::var(TEST_UPLOAD_DELAY_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|ms| *ms > 0)
        {
            tracing::warn!(
                "{TEST_UPLOAD_DELAY_ENV}={ms}: checkpoint manifests are delayed by {ms} ms (test only)"
            );
            self.delay_before_manifest = Duration::from_millis(ms);
        }
        self
    }
}

/// A committed checkpoint, as handed to the commit hook.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Its folder (relative to the store's prefix), as reported in `CheckpointInfo.path`.
    pub dir: String,
    /// The manifest written.
    pub manifest: Manifest,
    /// Bytes of its files.
    pub bytes: u64,
    /// From [`CheckpointUploader::submit`] to the manifest written.
    pub elapsed: Duration,
    /// Tries it took (1 when the first upload succeeded).
    pub tries: u32,
}

/// Called once per committed checkpoint, in commit order, on the uploader's task.
pub type CommitHook = Box<dyn Fn(&Committed) + Send + Sync>;

/// Called once when the uploader gives up (the commit deadline passed).
pub type FatalHook = Box<dyn Fn(&UploadError) + Send + Sync>;

/// How often a save waiting for room checks whether it should give up.
pub const GIVE_UP_POLL: Duration = Duration::from_millis(50);

/// Why checkpoints cannot be (or were not) committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// Uploads kept failing for the whole commit deadline.
    #[error("no checkpoint could be committed for {seconds} s: {last_error}")]
    DeadlineExceeded {
        /// The commit deadline, in seconds.
        seconds: u64,
        /// The last upload error.
        last_error: String,
    },
    /// [`CheckpointUploader::wait_idle`] ran out of time with uploads still pending.
    #[error("{pending} checkpoint upload(s) not committed in time")]
    NotIdle {
        /// Checkpoints saved but not committed.
        pending: usize,
    },
    /// The uploader's task is gone (its runtime shut down).
    #[error("the checkpoint uploader has stopped")]
    Closed,
    /// A save waiting for room in the queue was abandoned because the rank is stopping
    /// (see [`CheckpointUploader::submit_unless`]).
    #[error("the checkpoint save was abandoned: the rank is stopping")]
    Abandoned,
}

/// Counters of an uploader, for logs, tests and benchmarks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UploaderStats {
    /// Checkpoints submitted.
    pub submitted: u64,
    /// Checkpoints committed.
    pub committed: u64,
    /// Failed upload tries (each retried or fatal).
    pub failed_tries: u64,
    /// Step of the last committed checkpoint.
    pub last_committed_step: Option<u64>,
    /// Checkpoints submitted and not committed yet.
    pub pending: usize,
    /// Total time saves blocked because two checkpoints were already pending.
    pub trainer_waited: Duration,
}

#[derive(Debug, Default)]
struct State {
    stats: UploaderStats,
    /// Start of the first failed try since the last commit.
    failing_since: Option<Instant>,
    fatal: Option<UploadError>,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

struct Queued {
    upload: CheckpointUpload,
    submitted: Instant,
}

/// Uploads a rank's checkpoints in the background; see the [module docs](self).
pub struct CheckpointUploader {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Queued>,
    options: UploaderOptions,
    buffers: BufferPool,
}

impl std::fmt::Debug for CheckpointUploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointUploader")
            .field("options", &self.options)
            .field("stats", &self.stats())
            .finish()
    }
}

impl CheckpointUploader {
    /// Starts an uploader to `objects` whose task runs on `runtime` (a multi-thread
    /// runtime, or one some thread keeps driving). `on_commit` runs after each manifest
    /// is written; `on_fatal` once if the commit deadline passes.
    pub fn new(
        runtime: &tokio::runtime::Handle,
        objects: Objects,
        options: UploaderOptions,
        on_commit: CommitHook,
        on_fatal: FatalHook,
    ) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let buffers = BufferPool::new();
        runtime.spawn(upload_loop(
            rx,
            shared.clone(),
            objects,
            options.clone(),
            buffers.clone(),
            on_commit,
            on_fatal,
        ));
        CheckpointUploader {
            shared,
            tx,
            options,
            buffers,
        }
    }

    /// Queues `prepared` for upload and returns; blocks first while `max_pending`
    /// checkpoints are already pending (logging how long training waited). Fails once
    /// the uploader has given up.
    pub fn submit(&self, prepared: PreparedCheckpoint) -> Result<(), UploadError> {
        self.submit_unless(prepared, || false)
    }

    /// [`Self::submit`], except that a wait for room ends with [`UploadError::Abandoned`]
    /// as soon as `give_up()` turns true (checked every [`GIVE_UP_POLL`]): a rank asked to
    /// stop must not sit behind slow uploads past its grace period.
    pub fn submit_unless(
        &self,
        prepared: PreparedCheckpoint,
        give_up: impl Fn() -> bool,
    ) -> Result<(), UploadError> {
        let step = prepared.step;
        let mut upload = CheckpointUpload::new(prepared);
        if !self.options.delay_before_manifest.is_zero() {
            upload = upload.with_delay_before_manifest(self.options.delay_before_manifest);
        }
        let mut state = self.shared.lock();
        let mut waited_since = None;
        loop {
            if let Some(fatal) = &state.fatal {
                return Err(fatal.clone());
            }
            if state.closed {
                return Err(UploadError::Closed);
            }
            if state.stats.pending < self.options.max_pending.max(1) {
                break;
            }
            if give_up() {
                return Err(UploadError::Abandoned);
            }
            waited_since.get_or_insert_with(Instant::now);
            state = self
                .shared
                .changed
                .wait_timeout(state, GIVE_UP_POLL)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if let Some(since) = waited_since {
            let waited = since.elapsed();
            state.stats.trainer_waited += waited;
            tracing::warn!(
                step,
                waited_s = format!("{:.2}", waited.as_secs_f64()),
                "training waited {:.2} s to save the checkpoint at step {step}: {} earlier \
                 checkpoint(s) were still uploading",
                waited.as_secs_f64(),
                self.options.max_pending.max(1)
            );
        }
        if self
            .tx
            .send(Queued {
                upload,
                submitted: Instant::now(),
            })
            .is_err()
        {
            state.closed = true;
            return Err(UploadError::Closed);
        }
        state.stats.pending += 1;
        state.stats.submitted += 1;
        Ok(())
    }

    /// Waits until every submitted checkpoint is committed (`Ok`), the uploader gives up
    /// (its error), or `deadline` passes ([`UploadError::NotIdle`]).
    pub fn wait_idle(&self, deadline: Option<Instant>) -> Result<(), UploadError> {
        let mut state = self.shared.lock();
        loop {
            if let Some(fatal) = &state.fatal {
                return Err(fatal.clone());
            }
            if state.stats.pending == 0 {
                return Ok(());
            }
            if state.closed {
                return Err(UploadError::Closed);
            }
            state = match deadline {
                None => self
                    .shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(UploadError::NotIdle {
                            pending: state.stats.pending,
                        });
                    }
                    self.shared
                        .changed
                        .wait_timeout(state, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// The error the uploader gave up with, if it did.
    pub fn fatal(&self) -> Option<UploadError> {
        self.shared.lock().fatal.clone()
    }

    /// Its counters now.
    pub fn stats(&self) -> UploaderStats {
        self.shared.lock().stats.clone()
    }

    /// Its options.
    pub fn options(&self) -> &UploaderOptions {
        &self.options
    }

    /// The pool that committed checkpoints' host buffers go back to, for
    /// [`crate::checkpoint::prepare_checkpoint_with`].
    pub fn buffer_pool(&self) -> &BufferPool {
        &self.buffers
    }
}

/// A wait of about `backoff`: uniformly random in `[backoff/2, backoff]` (equal jitter).
fn jittered(backoff: Duration) -> Duration {
    let ms = backoff.as_millis().min(u128::from(u64::MAX)) as u64;
    if ms < 2 {
        return backoff;
    }
    Duration::from_millis(rand::random_range(ms / 2..=ms))
}

async fn upload_loop(
    mut rx: mpsc::UnboundedReceiver<Queued>,
    shared: Arc<Shared>,
    objects: Objects,
    options: UploaderOptions,
    buffers: BufferPool,
    on_commit: CommitHook,
    on_fatal: FatalHook,
) {
    /// Marks the uploader closed however the task ends (runtime shutdown included).
    struct CloseOnDrop(Arc<Shared>);
    impl Drop for CloseOnDrop {
        fn drop(&mut self) {
            self.0.update(|s| s.closed = true);
        }
    }
    let _close = CloseOnDrop(shared.clone());

    // The largest checkpoint a buffer was mapped ahead for.
    let mut prefilled_for = 0u64;
    while let Some(mut job) = rx.recv().await {
        let step = job.upload.prepared().step;
        let bytes = job.upload.prepared().size();
        // The first checkpoint of a size: map a second buffer now, off the training thread,
        // so that a save during this upload copies into mapped memory. From then on two
        // buffers take turns (the one uploading, the one back in the pool) and no more are
        // needed.
        if bytes > prefilled_for && buffers.pooled_capacity() < bytes as usize {
            prefilled_for = bytes;
            let pool = buffers.clone();
            tokio::task::spawn_blocking(move || pool.prefill(bytes as usize));
        }
        let mut backoff = options.initial_backoff;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let try_start = Instant::now();
            let failing_since = shared.lock().failing_since;
            let deadline = failing_since.unwrap_or(try_start) + options.commit_timeout;
            let outcome =
                tokio::time::timeout_at(deadline.into(), job.upload.try_commit(&objects)).await;
            let error = match outcome {
                Ok(Ok((dir, manifest))) => {
                    let committed = Committed {
                        dir,
                        manifest,
                        bytes,
                        elapsed: job.submitted.elapsed(),
                        tries,
                    };
                    if let Some(since) = failing_since {
                        tracing::info!(
                            step,
                            "checkpoint uploads recovered after failing for {:.1} s",
                            since.elapsed().as_secs_f64()
                        );
                    }
                    // The hook (the rank's checkpoint event) runs before the checkpoint
                    // stops counting as pending, so a flush implies its event was sent.
                    on_commit(&committed);
                    // Its host memory serves the next checkpoint.
                    for bytes in job.upload.take_buffers() {
                        buffers.give_back(bytes);
                    }
                    shared.update(|s| {
                        s.failing_since = None;
                        s.stats.pending = s.stats.pending.saturating_sub(1);
                        s.stats.committed += 1;
                        s.stats.last_committed_step = Some(step);
                    });
                    break;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!(
                    "the upload did not finish within the commit deadline of {} s",
                    options.commit_timeout.as_secs()
                ),
            };
            let now = Instant::now();
            let since = {
                let mut s = shared.lock();
                s.stats.failed_tries += 1;
                *s.failing_since.get_or_insert(try_start)
            };
            if now.duration_since(since) >= options.commit_timeout {
                let e = UploadError::DeadlineExceeded {
                    seconds: options.commit_timeout.as_secs(),
                    last_error: error,
                };
                tracing::error!(step, tries, "{e}");
                // The hook runs before waiters see the error (as with commits).
                on_fatal(&e);
                shared.update(|s| s.fatal = Some(e));
                return;
            }
            let left = (since + options.commit_timeout).saturating_duration_since(now);
            let wait = jittered(backoff).min(left);
            tracing::warn!(
                step,
                try_number = tries,
                retry_in_ms = wait.as_millis() as u64,
                error = %error,
                "checkpoint upload failed; retrying (training continues; the attempt fails if \
                 nothing commits for {} s)",
                options.commit_timeout.as_secs()
            );
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(options.max_backoff);
        }
    }
}

#[cfg(test)]
mod tests;
