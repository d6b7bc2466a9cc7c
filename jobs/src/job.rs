//! The [`Job`] trait every paper job implements, and the [`JobContext`] it runs in.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::config::{ConfigError, ConfigSchema, ResolvedConfig};

/// Errors a job's `run` can end with.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The resolved config did not make sense to the job (should have been caught by the schema).
    #[error("invalid config: {0}")]
    Config(#[from] ConfigError),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// Saving or restoring a checkpoint failed.
    #[error("checkpoint error: {0}")]
    Checkpoint(String),
    /// Loading a data set failed.
    #[error("data error: {0}")]
    Data(String),
    /// The job was asked to stop (cancel or preemption) and stopped cleanly.
    #[error("stopped on request")]
    Stopped,
    /// A collective operation (rendezvous, all-reduce, broadcast) failed: a peer died or
    /// hung, or the ranks disagreed. The attempt fails and restarts from its checkpoint.
    #[error("collective: {0}")]
    Collective(#[from] trainyard_collective::CollectiveError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// A checkpoint as a job sees it: named tensors plus the job's own JSON state
/// (step, epoch, RNG seed, optimizer scalars...).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Training step the checkpoint was taken at.
    pub step: u64,
    /// Model and optimizer tensors by name (written as safetensors).
    pub tensors: BTreeMap<String, Tensor>,
    /// Job-defined state, stored in the manifest.
    pub state: serde_json::Value,
    /// Metrics at the time of the checkpoint, stored in the manifest.
    pub metrics: BTreeMap<String, f64>,
}

/// The final results table of a job, printed by `trainyard run` and stored with the job.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResultsTable {
    /// Title line, e.g. "Neural ODE: MNIST".
    pub title: String,
    /// Column headers.
    pub columns: Vec<String>,
    /// Rows of cells, each as long as `columns`.
    pub rows: Vec<Vec<String>>,
    /// Conclusions, one per line (for example whether the paper's claim held).
    pub notes: Vec<String>,
    /// The paper's claims this run checked (`trainyard reproduce` collects them).
    #[serde(default)]
    pub claims: Vec<Claim>,
}

/// One claim of a paper, checked by a job: the paper's number, ours for the treatment and
/// for the baseline trained in the same job, and whether the claim held.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Claim {
    /// Experiment within the job, e.g. `mnist` or `cnf/two-moons`.
    pub experiment: String,
    /// The claim in words.
    pub claim: String,
    /// The paper's number(s), as text (`-` when the paper gives none at this scale).
    pub paper: String,
    /// Our treatment's number.
    pub treatment: String,
    /// Our baseline's number.
    pub baseline: String,
    /// Whether the claim held in this run.
    pub held: bool,
    /// The single number behind `treatment`, in `unit` (for averaging over seeds).
    #[serde(default)]
    pub treatment_value: Option<f64>,
    /// The single number behind `baseline`, in `unit`.
    #[serde(default)]
    pub baseline_value: Option<f64>,
    /// Unit of the values, e.g. `%`.
    #[serde(default)]
    pub unit: String,
}

/// What a running job can do with the outside world. The rank process implements it;
/// tests use an in-memory implementation.
pub trait JobContext {
    /// This rank's index, from 0.
    fn rank(&self) -> u32;
    /// Number of ranks in the job.
    fn world_size(&self) -> u32;
    /// A log line, shown by `trainyard logs`.
    fn log(&self, line: &str);
    /// Metric values at a training step (names like `odenet/train_loss`).
    fn metrics(&self, step: u64, values: &[(&str, f64)]);
    /// Progress of a long stage, for progress bars (`done` of `total`).
    fn progress(&self, stage: &str, done: u64, total: u64);
    /// True once the job has been asked to stop (cancel, preemption, or its checkpoints
    /// can no longer be committed). A job checks it at least once per step and returns
    /// [`JobError::Stopped`] (after a checkpoint if it likes).
    fn should_stop(&self) -> bool;
    /// Saves a checkpoint. Returns once the tensors are copied out of the model (to host
    /// memory), so the job may keep training and change them at once; the checkpoint is
    /// written in the background and counts once it is committed (its manifest written
    /// last). The rank process keeps at most one upload in flight plus one queued: a save
    /// while two are pending blocks until the older one commits, and the process waits
    /// for pending uploads before it exits. An implementation may also commit before
    /// returning (the in-memory test context does).
    ///
    /// Errors: the tensors cannot be copied, there is no object store, or uploads have
    /// been failing for longer than the job's commit deadline (the attempt then fails).
    fn save_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), JobError>;
    /// The checkpoint to resume from, if this attempt is a restart (or was started from one).
    /// Tensors are loaded onto `device`.
    fn restore_checkpoint(
        &self,
        device: &candle_core::Device,
    ) -> Result<Option<Checkpoint>, JobError>;
    /// Publishes the final results table.
    fn results(&self, table: &ResultsTable);
    /// The local folder holding the data set at `url` (a folder pushed with
    /// `trainyard data push`: `file://`, `s3://`, ...). A worker downloads each data set
    /// once into its cache, verified against the data set's manifest, and its ranks share
    /// it. The default says the context cannot fetch data sets.
    fn dataset(&self, url: &str) -> Result<std::path::PathBuf, JobError> {
        Err(JobError::Data(format!(
            "{url}: this context cannot fetch data sets"
        )))
    }
    /// Stores a file the job produced (a plot as PNG, a JSON of its results) with the job's
    /// results, as `name` (a plain file name such as `cnf-density.png`): the rank process
    /// writes it to the object store under `jobs/<job-id>/results/<name>` and the job's
    /// record lists it (`trainyard results <job-id>`). Only rank 0 should call it. The
    /// default says the context cannot store artifacts.
    fn save_artifact(&self, name: &str, bytes: &[u8]) -> Result<(), JobError> {
        let _ = bytes;
        Err(JobError::Other(format!(
            "{name}: this context cannot store artifacts"
        )))
    }
    /// The candle device this rank trains on: the CPU unless the rank was placed on a real
    /// GPU and the binary was built with CUDA (feature `cuda`). A job creates its model,
    /// batches and optimizer state there, and restores checkpoints onto it.
    fn device(&self) -> Result<candle_core::Device, JobError> {
        Ok(candle_core::Device::Cpu)
    }
    /// Connects this rank to the other ranks of its job attempt and returns the
    /// communicator a data-parallel job all-reduces its gradients through: NCCL when the
    /// rank trains on a GPU, the TCP ring otherwise, and an in-process world of one when
    /// the job has a single rank (the default here; contexts that run several ranks
    /// override it). Call it once, after [`JobContext::device`]; every rank of the job must
    /// call it, since the ranks rendezvous here.
    fn communicator(&self) -> Result<Box<dyn trainyard_collective::Collective>, JobError> {
        if self.world_size() <= 1 {
            Ok(Box::new(trainyard_collective::Local::new()))
        } else {
            Err(JobError::Other(format!(
                "this context cannot connect {} ranks",
                self.world_size()
            )))
        }
    }
}

/// Checks that an artifact name is a plain file name: 1 to 128 characters of letters,
/// digits, `-`, `_` and `.`, not starting with a dot.
pub fn check_artifact_name(name: &str) -> Result<(), JobError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(JobError::Other(format!(
            "artifact name {name:?}: use 1 to 128 letters, digits, '-', '_' or '.', not starting \
             with '.'"
        )))
    }
}

/// Publishes the results `table` of a job: logs its notes, one a line, then hands it to
/// the context. Only rank 0 should call it.
pub fn publish_results(ctx: &dyn JobContext, table: &ResultsTable) {
    for note in &table.notes {
        ctx.log(note);
    }
    ctx.results(table);
}

/// Describes a device for logs and tables: `cpu`, `cuda:0`, `metal:0`.
pub fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// One trainable paper job.
pub trait Job: Send + Sync {
    /// Registry name, e.g. `neural-ode`.
    fn name(&self) -> &'static str;
    /// One-line description shown by the CLI.
    fn description(&self) -> &'static str;
    /// The job's config keys, with types, ranges, and a default per preset.
    fn schema(&self) -> &ConfigSchema;
    /// Most ranks the job can use (1 until the job trains data-parallel).
    fn max_ranks(&self) -> u32 {
        1
    }
    /// Resolves `preset` plus `overrides` into a validated config. Unknown keys, unknown
    /// presets and out-of-range values are errors that name the key.
    fn resolve_config(
        &self,
        preset: &str,
        overrides: &BTreeMap<String, String>,
    ) -> Result<ResolvedConfig, ConfigError> {
        self.schema().resolve(preset, overrides)
    }
    /// Trains. Reports through `ctx`; returns when done, failed or stopped.
    fn run(&self, config: &ResolvedConfig, ctx: &dyn JobContext) -> Result<(), JobError>;
}

/// Declares a paper job: a struct `$job` holding the schema `$schema()` (its `new()` and
/// `Default`), its most ranks `$job::MAX_RANKS`, and its [`Job`] impl, which checks a
/// resolved config with `$check` (when resolving and again before running) and runs
/// `$run(config, ctx)`.
macro_rules! paper_job {
    (
        $(#[$doc:meta])*
        pub struct $job:ident;
        name: $name:literal,
        description: $description:expr,
        $(#[$ranks_doc:meta])*
        max_ranks: $max_ranks:expr,
        schema: $schema:path,
        check: $check:path,
        run: $run:path $(,)?
    ) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $job {
            schema: $crate::config::ConfigSchema,
        }

        impl $job {
            $(#[$ranks_doc])*
            pub const MAX_RANKS: u32 = $max_ranks;

            /// The job with its config schema.
            pub fn new() -> Self {
                Self { schema: $schema() }
            }
        }

        impl Default for $job {
            fn default() -> Self {
                Self::new()
            }
        }

        impl $crate::job::Job for $job {
            fn name(&self) -> &'static str {
                $name
            }

            fn description(&self) -> &'static str {
                $description
            }

            fn schema(&self) -> &$crate::config::ConfigSchema {
                &self.schema
            }

            fn max_ranks(&self) -> u32 {
                Self::MAX_RANKS
            }

            fn resolve_config(
                &self,
                preset: &str,
                overrides: &std::collections::BTreeMap<String, String>,
            ) -> Result<$crate::config::ResolvedConfig, $crate::config::ConfigError> {
                let config = self.schema.resolve(preset, overrides)?;
                $check(&config)?;
                Ok(config)
            }

            fn run(
                &self,
                config: &$crate::config::ResolvedConfig,
                ctx: &dyn $crate::job::JobContext,
            ) -> Result<(), $crate::job::JobError> {
                $check(config)?;
                $run(config, ctx)
            }
        }
    };
}
pub(crate) use paper_job;
