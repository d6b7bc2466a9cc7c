//! The uploader against an in-memory store that can be slowed down or made to fail.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use super::*;
use crate::checkpoint::{load_checkpoint, prepare_checkpoint};

/// An in-memory store whose puts can be delayed and made to fail; it records every
/// successful put in completion order.
#[derive(Debug, Default)]
struct TestStore {
    inner: InMemory,
    put_delay_ms: AtomicUsize,
    /// The next this-many puts (of paths containing `fail_only`, if set) fail.
    fail_next: AtomicUsize,
    /// Every put fails while this is non-zero.
    fail_all: AtomicUsize,
    fail_only: Mutex<Option<&'static str>>,
    puts: Mutex<Vec<String>>,
}

impl std::fmt::Display for TestStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("test://store")
    }
}

impl TestStore {
    fn injected(&self, location: &Path) -> Option<object_store::Error> {
        let error = || object_store::Error::Generic {
            store: "test",
            source: "injected failure".into(),
        };
        if self.fail_all.load(Ordering::SeqCst) > 0 {
            return Some(error());
        }
        let only = *self.fail_only.lock().unwrap();
        if only.is_some_and(|needle| !location.as_ref().contains(needle)) {
            return None;
        }
        self.fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .ok()
            .map(|_| error())
    }

    fn puts(&self) -> Vec<String> {
        self.puts.lock().unwrap().clone()
    }
}

#[async_trait]
impl ObjectStore for TestStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let delay = self.put_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        }
        if let Some(e) = self.injected(location) {
            return Err(e);
        }
        let result = self.inner.put_opts(location, payload, opts).await?;
        self.puts.lock().unwrap().push(location.to_string());
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        if let Some(e) = self.injected(location) {
            return Err(e);
        }
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    store: Arc<TestStore>,
    objects: Objects,
    commits: Arc<Mutex<Vec<Committed>>>,
    fatals: Arc<Mutex<Vec<UploadError>>>,
}

impl Fixture {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(TestStore::default());
        let objects = Objects {
            store: store.clone(),
            prefix: Path::default(),
        };
        Fixture {
            runtime,
            store,
            objects,
            commits: Arc::default(),
            fatals: Arc::default(),
        }
    }

    fn uploader(&self, options: UploaderOptions) -> CheckpointUploader {
        let commits = self.commits.clone();
        let fatals = self.fatals.clone();
        CheckpointUploader::new(
            self.runtime.handle(),
            self.objects.clone(),
            options,
            Box::new(move |c| commits.lock().unwrap().push(c.clone())),
            Box::new(move |e| fatals.lock().unwrap().push(e.clone())),
        )
    }

    fn committed_steps(&self) -> Vec<u64> {
        self.commits
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.manifest.step)
            .collect()
    }

    fn exists(&self, path: &str) -> bool {
        self.runtime
            .block_on(self.objects.head(path))
            .unwrap()
            .is_some()
    }
}

fn fast_retries(commit_timeout: Duration) -> UploaderOptions {
    UploaderOptions {
        commit_timeout,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        ..UploaderOptions::default()
    }
}

fn prepared(step: u64) -> PreparedCheckpoint {
    let dev = candle_core::Device::Cpu;
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "w".to_string(),
        candle_core::Tensor::arange(0f32, 64f32, &dev)
            .unwrap()
            .affine(1.0, step as f64)
            .unwrap(),
    );
    let ck = trainyard_jobs::Checkpoint {
        step,
        tensors,
        state: serde_json::json!({ "step": step }),
        metrics: BTreeMap::new(),
    };
    prepare_checkpoint("job-u", 1, &ck).unwrap()
}

const SECOND: Duration = Duration::from_secs(1);

/// True once `f` holds, checking every 10 ms for up to `limit`.
fn poll(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

#[test]
fn save_returns_before_the_upload_and_commits_in_order_with_the_manifest_last() {
    let fx = Fixture::new();
    fx.store.put_delay_ms.store(300, Ordering::SeqCst);
    let uploader = fx.uploader(UploaderOptions::default());
    for step in [1, 2] {
        let started = Instant::now();
        uploader.submit(prepared(step)).unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(150),
            "submit blocked for {:?}",
            started.elapsed()
        );
    }
    // Nothing is committed yet: the first put alone takes 300 ms.
    assert!(!fx.exists("jobs/job-u/checkpoints/1/manifest.json"));
    assert_eq!(uploader.stats().pending, 2);

    uploader
        .wait_idle(Some(Instant::now() + 10 * SECOND))
        .unwrap();
    assert_eq!(
        fx.store.puts(),
        [
            "jobs/job-u/checkpoints/1/model.safetensors",
            "jobs/job-u/checkpoints/1/manifest.json",
            "jobs/job-u/checkpoints/2/model.safetensors",
            "jobs/job-u/checkpoints/2/manifest.json",
        ]
    );
    assert_eq!(fx.committed_steps(), [1, 2]);
    let stats = uploader.stats();
    assert_eq!((stats.submitted, stats.committed, stats.pending), (2, 2, 0));
    assert_eq!(stats.last_committed_step, Some(2));
    assert_eq!(stats.trainer_waited, Duration::ZERO);
    // What was committed verifies.
    let (_, back) = fx
        .runtime
        .block_on(load_checkpoint(
            &fx.objects,
            "jobs/job-u/checkpoints/2",
            &candle_core::Device::Cpu,
        ))
        .unwrap()
        .unwrap();
    assert_eq!(back.step, 2);
    let c = &fx.commits.lock().unwrap()[1];
    assert_eq!(c.dir, "jobs/job-u/checkpoints/2");
    assert_eq!(c.tries, 1);
    assert!(c.elapsed >= Duration::from_millis(600), "{:?}", c.elapsed);
}

#[test]
fn a_third_save_waits_while_two_are_pending_and_none_is_dropped() {
    let fx = Fixture::new();
    fx.store.put_delay_ms.store(200, Ordering::SeqCst);
    let uploader = fx.uploader(UploaderOptions::default());
    uploader.submit(prepared(1)).unwrap();
    uploader.submit(prepared(2)).unwrap();
    let started = Instant::now();
    uploader.submit(prepared(3)).unwrap();
    let blocked = started.elapsed();
    // Step 1 (model + manifest, 2 x 200 ms) had to commit first.
    assert!(blocked >= Duration::from_millis(250), "{blocked:?}");
    assert!(fx.committed_steps().contains(&1));
    assert!(uploader.stats().trainer_waited >= Duration::from_millis(250));
    uploader
        .wait_idle(Some(Instant::now() + 10 * SECOND))
        .unwrap();
    assert_eq!(fx.committed_steps(), [1, 2, 3]);
}

#[test]
fn failed_uploads_are_retried_until_they_succeed() {
    let fx = Fixture::new();
    fx.store.fail_next.store(3, Ordering::SeqCst);
    let uploader = fx.uploader(fast_retries(10 * SECOND));
    uploader.submit(prepared(7)).unwrap();
    uploader
        .wait_idle(Some(Instant::now() + 10 * SECOND))
        .unwrap();
    assert_eq!(fx.committed_steps(), [7]);
    assert_eq!(fx.commits.lock().unwrap()[0].tries, 4);
    assert_eq!(uploader.stats().failed_tries, 3);
    assert!(uploader.fatal().is_none());
    assert!(fx.fatals.lock().unwrap().is_empty());
    assert!(fx.exists("jobs/job-u/checkpoints/7/manifest.json"));
}

#[test]
fn a_retry_resumes_where_the_failed_try_stopped() {
    let fx = Fixture::new();
    // The tensors go up; the manifest fails twice.
    *fx.store.fail_only.lock().unwrap() = Some("manifest.json");
    fx.store.fail_next.store(2, Ordering::SeqCst);
    let uploader = fx.uploader(fast_retries(10 * SECOND));
    uploader.submit(prepared(3)).unwrap();
    uploader
        .wait_idle(Some(Instant::now() + 10 * SECOND))
        .unwrap();
    assert_eq!(
        fx.store.puts(),
        [
            "jobs/job-u/checkpoints/3/model.safetensors",
            "jobs/job-u/checkpoints/3/manifest.json",
        ],
        "the tensor file is written once"
    );
    assert_eq!(uploader.stats().failed_tries, 2);
}

#[test]
fn the_attempt_fails_when_nothing_commits_within_the_deadline() {
    let fx = Fixture::new();
    fx.store.fail_all.store(1, Ordering::SeqCst);
    let uploader = fx.uploader(fast_retries(SECOND));
    let started = Instant::now();
    uploader.submit(prepared(1)).unwrap();
    let err = uploader
        .wait_idle(Some(Instant::now() + 10 * SECOND))
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= SECOND && took < 3 * SECOND,
        "gave up after {took:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with("no checkpoint could be committed for 1 s: ")
            && text.contains("injected failure"),
        "{text}"
    );
    assert!(uploader.stats().failed_tries >= 3, "{:?}", uploader.stats());
    assert_eq!(uploader.fatal(), Some(err.clone()));
    assert_eq!(*fx.fatals.lock().unwrap(), std::slice::from_ref(&err));
    // Every later save fails with the same error, at once.
    assert_eq!(uploader.submit(prepared(2)).unwrap_err(), err);
    assert!(fx.committed_steps().is_empty());
    assert!(!fx.exists("jobs/job-u/checkpoints/1/manifest.json"));
}

#[test]
fn the_deadline_counts_from_the_first_failure_not_from_the_last_commit() {
    let fx = Fixture::new();
    let uploader = fx.uploader(fast_retries(SECOND));
    uploader.submit(prepared(1)).unwrap();
    uploader
        .wait_idle(Some(Instant::now() + 10 * SECOND))
        .unwrap();
    // Longer than the deadline without a save, then a save whose first tries fail.
    std::thread::sleep(Duration::from_millis(1200));
    fx.store.fail_next.store(2, Ordering::SeqCst);
    uploader.submit(prepared(2)).unwrap();
    uploader
        .wait_idle(Some(Instant::now() + 10 * SECOND))
        .unwrap();
    assert_eq!(fx.committed_steps(), [1, 2]);
    assert!(uploader.fatal().is_none());
}

#[test]
fn wait_idle_times_out_with_uploads_pending() {
    let fx = Fixture::new();
    fx.store.put_delay_ms.store(500, Ordering::SeqCst);
    let uploader = fx.uploader(UploaderOptions::default());
    uploader.submit(prepared(1)).unwrap();
    let err = uploader
        .wait_idle(Some(Instant::now() + Duration::from_millis(100)))
        .unwrap_err();
    assert_eq!(err, UploadError::NotIdle { pending: 1 });
    uploader
        .wait_idle(Some(Instant::now() + 10 * SECOND))
        .unwrap();
}

#[test]
fn a_stale_manifest_of_the_same_step_is_removed_before_the_files_are_replaced() {
    let fx = Fixture::new();
    let uploader = fx.uploader(fast_retries(10 * SECOND));
    uploader.submit(prepared(4)).unwrap();
    uploader
        .wait_idle(Some(Instant::now() + 10 * SECOND))
        .unwrap();
    // A later attempt saves the same step; its tensor upload fails for a while.
    *fx.store.fail_only.lock().unwrap() = Some("model.safetensors");
    fx.store.fail_next.store(1000, Ordering::SeqCst);
    uploader.submit(prepared(4)).unwrap();
    let gone = poll(Duration::from_secs(5), || {
        !fx.exists("jobs/job-u/checkpoints/4/manifest.json")
    });
    assert!(
        gone,
        "the old manifest must not describe the files being replaced"
    );
    fx.store.fail_next.store(0, Ordering::SeqCst);
    uploader
        .wait_idle(Some(Instant::now() + 10 * SECOND))
        .unwrap();
    assert!(fx.exists("jobs/job-u/checkpoints/4/manifest.json"));
}

/// On a real store (a local folder) the host memory of a committed checkpoint goes back
/// to the pool (the in-memory store keeps the bytes it was given).
#[test]
fn committed_buffers_go_back_to_the_pool() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let objects =
        crate::objects::open_objects(&format!("file://{}/objects", dir.path().display())).unwrap();
    let uploader = CheckpointUploader::new(
        fx.runtime.handle(),
        objects,
        UploaderOptions::default(),
        Box::new(|_| {}),
        Box::new(|_| {}),
    );
    let p = prepared(1);
    let size = p.size() as usize;
    uploader.submit(p).unwrap();
    uploader
        .wait_idle(Some(Instant::now() + 10 * SECOND))
        .unwrap();
    assert!(uploader.buffer_pool().pooled_capacity() >= size);
}

#[test]
fn options_come_from_the_policy() {
    let o = UploaderOptions::from_policy(None);
    assert_eq!(o.commit_timeout, DEFAULT_COMMIT_TIMEOUT);
    assert_eq!(o.max_pending, 2);
    let p = CheckpointPolicy {
        commit_timeout_s: 42,
        ..Default::default()
    };
    assert_eq!(
        UploaderOptions::from_policy(Some(&p)).commit_timeout,
        Duration::from_secs(42)
    );
    let zero = CheckpointPolicy::default();
    assert_eq!(
        UploaderOptions::from_policy(Some(&zero)).commit_timeout,
        DEFAULT_COMMIT_TIMEOUT
    );
}

#[test]
fn jitter_stays_within_half_to_full_backoff() {
    for _ in 0..100 {
        let d = jittered(Duration::from_millis(1000));
        assert!(d >= Duration::from_millis(500) && d <= Duration::from_millis(1000));
    }
    assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
}

#[test]
fn a_save_waiting_for_room_gives_up_when_asked() {
    let fx = Fixture::new();
    fx.store.put_delay_ms.store(5_000, Ordering::SeqCst);
    let uploader = fx.uploader(UploaderOptions::default());
    uploader.submit(prepared(1)).unwrap();
    uploader.submit(prepared(2)).unwrap();
    let started = Instant::now();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let r = uploader.submit_unless(prepared(3), || {
            stop.load(std::sync::atomic::Ordering::SeqCst)
        });
        assert_eq!(r, Err(UploadError::Abandoned));
    });
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
