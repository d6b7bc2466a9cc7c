//! [`MemoryContext`]: an in-memory [`JobContext`] for tests of every crate.
//!
//! It records logs, metrics, progress, checkpoints and the results table; `stop()` (or
//! [`MemoryContext::stop_after_checkpoints`]) makes `should_stop()` true; and a context
//! built with [`MemoryContext::resuming_from`] hands a saved checkpoint back to the job.
//!
//! Several ranks of one job run as threads of a test: [`loopback_rings`] joins `n` ranks
//! in a `Ring` over 127.0.0.1, and [`MemoryContext::with_communicator`] hands one to each
//! rank's context.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use trainyard_collective::{Collective, Ring, RingConfig};

use crate::job::{Checkpoint, JobContext, JobError, ResultsTable};

/// One recorded metric value.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricPoint {
    /// Step it was reported at.
    pub step: u64,
    /// Metric name.
    pub name: String,
    /// Value.
    pub value: f64,
}

#[derive(Debug, Default)]
struct Recorded {
    logs: Vec<String>,
    metrics: Vec<MetricPoint>,
    progress: BTreeMap<String, (u64, u64)>,
    checkpoints: Vec<Checkpoint>,
    results: Option<ResultsTable>,
    artifacts: BTreeMap<String, Vec<u8>>,
}

/// An in-memory [`JobContext`]. Thread-safe, so a test may call [`MemoryContext::stop`]
/// from another thread while the job runs.
#[derive(Debug)]
pub struct MemoryContext {
    rank: u32,
    world_size: u32,
    stop: AtomicBool,
    stop_after_checkpoints: Option<usize>,
    resume: Option<Checkpoint>,
    echo: bool,
    device: candle_core::Device,
    communicator: Communicator,
    recorded: Mutex<Recorded>,
}

/// The communicator a [`MemoryContext`] hands out once.
#[derive(Default)]
struct Communicator(Mutex<Option<Box<dyn Collective>>>);

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match self.0.lock() {
            Ok(c) => c.as_ref().map(|c| c.backend()),
            Err(_) => None,
        };
        f.debug_tuple("Communicator").field(&backend).finish()
    }
}

impl Default for MemoryContext {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryContext {
    /// A fresh context for rank 0 of 1, with nothing to resume from.
    pub fn new() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            stop: AtomicBool::new(false),
            stop_after_checkpoints: None,
            resume: None,
            echo: false,
            device: candle_core::Device::Cpu,
            communicator: Communicator::default(),
            recorded: Mutex::new(Recorded::default()),
        }
    }

    /// A fresh context whose `restore_checkpoint` returns `checkpoint`.
    pub fn resuming_from(checkpoint: Checkpoint) -> Self {
        Self {
            resume: Some(checkpoint),
            ..Self::new()
        }
    }

    /// Sets rank and world size.
    pub fn with_rank(mut self, rank: u32, world_size: u32) -> Self {
        self.rank = rank;
        self.world_size = world_size;
        self
    }

    /// Makes `should_stop()` true once `n` checkpoints have been saved.
    pub fn stop_after_checkpoints(mut self, n: usize) -> Self {
        self.stop_after_checkpoints = Some(n);
        self
    }

    /// Makes `device()` return `device` (the CPU by default).
    pub fn with_device(mut self, device: candle_core::Device) -> Self {
        self.device = device;
        self
    }

    /// Makes `communicator()` return `comm` (once; a second call is an error). Without
    /// one, a context of one rank returns the in-process `Local` and larger worlds fail.
    pub fn with_communicator(self, comm: Box<dyn Collective>) -> Self {
        *self
            .communicator
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(comm);
        self
    }

    /// Also prints log lines to stderr (handy in examples).
    pub fn echo_logs(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// Asks the job to stop: `should_stop()` returns true from now on.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        // A panic in another test thread must not hide this context's records.
        self.recorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// All log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.lock().logs.clone()
    }

    /// All metric values so far, in report order.
    pub fn metric_points(&self) -> Vec<MetricPoint> {
        self.lock().metrics.clone()
    }

    /// `(step, value)` of every report of metric `name`.
    pub fn metric_values(&self, name: &str) -> Vec<(u64, f64)> {
        self.lock()
            .metrics
            .iter()
            .filter(|m| m.name == name)
            .map(|m| (m.step, m.value))
            .collect()
    }

    /// The last reported value of metric `name`.
    pub fn last_metric(&self, name: &str) -> Option<f64> {
        self.metric_values(name).last().map(|(_, v)| *v)
    }

    /// Latest `(done, total)` per progress stage.
    pub fn progress_stages(&self) -> BTreeMap<String, (u64, u64)> {
        self.lock().progress.clone()
    }

    /// Every checkpoint saved, oldest first.
    pub fn checkpoints(&self) -> Vec<Checkpoint> {
        self.lock().checkpoints.clone()
    }

    /// The most recently saved checkpoint.
    pub fn latest_checkpoint(&self) -> Option<Checkpoint> {
        self.lock().checkpoints.last().cloned()
    }

    /// The results table, once the job published it.
    pub fn results_table(&self) -> Option<ResultsTable> {
        self.lock().results.clone()
    }

    /// The artifacts saved so far (name → bytes).
    pub fn artifacts(&self) -> BTreeMap<String, Vec<u8>> {
        self.lock().artifacts.clone()
    }
}

impl JobContext for MemoryContext {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world_size
    }

    fn log(&self, line: &str) {
        if self.echo {
            eprintln!("{line}");
        }
        self.lock().logs.push(line.to_string());
    }

    fn metrics(&self, step: u64, values: &[(&str, f64)]) {
        let mut recorded = self.lock();
        for (name, value) in values {
            recorded.metrics.push(MetricPoint {
                step,
                name: name.to_string(),
                value: *value,
            });
        }
    }

    fn progress(&self, stage: &str, done: u64, total: u64) {
        self.lock()
            .progress
            .insert(stage.to_string(), (done, total));
    }

    fn should_stop(&self) -> bool {
        if self.stop.load(Ordering::SeqCst) {
            return true;
        }
        match self.stop_after_checkpoints {
            Some(n) => self.lock().checkpoints.len() >= n,
            None => false,
        }
    }

    fn save_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), JobError> {
        // Copy the tensors so later in-place updates of the model cannot change a
        // saved checkpoint (a real store serialises them at this point too).
        let mut tensors = BTreeMap::new();
        for (name, t) in &checkpoint.tensors {
            tensors.insert(name.clone(), t.copy()?);
        }
        self.lock().checkpoints.push(Checkpoint {
            step: checkpoint.step,
            tensors,
            state: checkpoint.state.clone(),
            metrics: checkpoint.metrics.clone(),
        });
        Ok(())
    }

    fn restore_checkpoint(
        &self,
        device: &candle_core::Device,
    ) -> Result<Option<Checkpoint>, JobError> {
        let Some(cp) = &self.resume else {
            return Ok(None);
        };
        let mut tensors = BTreeMap::new();
        for (name, t) in &cp.tensors {
            tensors.insert(name.clone(), t.to_device(device)?.copy()?);
        }
        Ok(Some(Checkpoint {
            step: cp.step,
            tensors,
            state: cp.state.clone(),
            metrics: cp.metrics.clone(),
        }))
    }

    fn results(&self, table: &ResultsTable) {
        self.lock().results = Some(table.clone());
    }

    fn save_artifact(&self, name: &str, bytes: &[u8]) -> Result<(), JobError> {
        crate::job::check_artifact_name(name)?;
        self.lock()
            .artifacts
            .insert(name.to_string(), bytes.to_vec());
        Ok(())
    }

    /// `file://` data sets are their own folder (nothing to download); others are errors.
    fn dataset(&self, url: &str) -> Result<std::path::PathBuf, JobError> {
        match url.strip_prefix("file://") {
            Some(path) if path.starts_with('/') => Ok(std::path::PathBuf::from(path)),
            _ => Err(JobError::Data(format!(
                "{url}: a MemoryContext reads only file:///abs/path data sets"
            ))),
        }
    }

    fn device(&self) -> Result<candle_core::Device, JobError> {
        Ok(self.device.clone())
    }

    /// The communicator given to [`MemoryContext::with_communicator`], else the default.
    fn communicator(&self) -> Result<Box<dyn Collective>, JobError> {
        let given = self
            .communicator
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        match given {
            Some(comm) => Ok(comm),
            None if self.world_size <= 1 => Ok(Box::new(trainyard_collective::Local::new())),
            None => Err(JobError::Other(format!(
                "this MemoryContext has no communicator for {} ranks (with_communicator), or \
                 it was taken already",
                self.world_size
            ))),
        }
    }
}

/// Connects a [`Ring`] of `n` ranks over 127.0.0.1 (port-0 listeners, one thread per rank
/// while they connect) for the job attempt `attempt`; returns the rings by rank.
pub fn loopback_rings(n: usize, attempt: &str, config: RingConfig) -> Result<Vec<Ring>, JobError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| JobError::Other(format!("cannot listen on 127.0.0.1: {e}")))?;
    let addrs = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<std::io::Result<Vec<SocketAddr>>>()
        .map_err(|e| JobError::Other(format!("listener address: {e}")))?;
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (addrs, config) = (&addrs, config.clone());
                s.spawn(move || Ring::connect(addrs, rank, listener, attempt, config))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(ring) => Ok(ring?),
                Err(_) => Err(JobError::Other("a ring connect thread panicked".into())),
            })
            .collect()
    })
}

/// The `quick` config of `job` with the overrides `base`, then `extra` (later keys win), for
/// tests. Panics when it does not resolve.
pub fn quick_config(
    job: &dyn crate::job::Job,
    base: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> crate::config::ResolvedConfig {
    let overrides: BTreeMap<String, String> = base
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    job.resolve_config("quick", &overrides)
        .unwrap_or_else(|e| panic!("{}: {e}", job.name()))
}

/// Config overrides for the ignored `quick_preset` tests: `base` plus the comma-separated
/// `key=value` pairs of the environment variable `var` (later keys win). Panics on an entry
/// without `=`, naming the variable.
pub fn overrides_from_env(var: &str, base: &[(&str, &str)]) -> BTreeMap<String, String> {
    let extra = std::env::var(var).unwrap_or_default();
    let mut out: BTreeMap<String, String> = base
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for kv in extra.split(',').filter(|kv| !kv.trim().is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .unwrap_or_else(|| panic!("{var}: \"{kv}\" is not key=value"));
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    out
}

/// Prints a results table as plain text (title, `|`-separated rows, notes, claims), for the
/// ignored `quick_preset` tests that print a job's full-size results.
pub fn print_results(table: &ResultsTable) {
    println!("{}", table.title);
    println!("{}", table.columns.join(" | "));
    for row in &table.rows {
        println!("{}", row.join(" | "));
    }
    for note in &table.notes {
        println!("  * {note}");
    }
    for c in &table.claims {
        println!(
            "  claim {}: {} | paper {} | ours {} | baseline {} | {}",
            c.experiment,
            c.claim,
            c.paper,
            c.treatment,
            c.baseline,
            if c.held { "HELD" } else { "NOT HELD" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn records_and_restores() {
        let ctx = MemoryContext::new().stop_after_checkpoints(1);
        assert!(!ctx.should_stop());
        ctx.log("hello");
        ctx.metrics(3, &[("a", 1.0), ("b", 2.0)]);
        ctx.metrics(4, &[("a", 1.5)]);
        ctx.progress("train", 1, 10);
        assert_eq!(ctx.logs(), vec!["hello"]);
        assert_eq!(ctx.metric_values("a"), vec![(3, 1.0), (4, 1.5)]);
        assert_eq!(ctx.last_metric("b"), Some(2.0));
        assert_eq!(ctx.progress_stages()["train"], (1, 10));
        assert!(ctx.restore_checkpoint(&Device::Cpu).unwrap().is_none());

        let t = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let cp = Checkpoint {
            step: 7,
            tensors: [("w".to_string(), t)].into_iter().collect(),
            state: serde_json::json!({"epoch": 1}),
            metrics: BTreeMap::new(),
        };
        ctx.save_checkpoint(&cp).unwrap();
        assert!(ctx.should_stop());

        let next = MemoryContext::resuming_from(ctx.latest_checkpoint().unwrap());
        assert!(!next.should_stop());
        let back = next.restore_checkpoint(&Device::Cpu).unwrap().unwrap();
        assert_eq!(back.step, 7);
        assert_eq!(back.state["epoch"], 1);
        assert_eq!(
            back.tensors["w"].to_vec1::<f32>().unwrap(),
            vec![1.0, 2.0, 3.0]
        );
        next.stop();
        assert!(next.should_stop());
        next.results(&ResultsTable::default());
        assert_eq!(next.results_table(), Some(ResultsTable::default()));
    }
}
