//! Trainyard's jobs: one per paper, behind the [`Job`] trait, plus the shared training
//! utilities (data sets, batching, ODE solvers, evaluation) they are built from.
//!
//! A job never talks to the network itself: everything it reports (logs, metrics,
//! progress, checkpoints, the results table) goes through the [`JobContext`] the
//! rank process hands it, and so does the device it trains on ([`JobContext::device`]).
//!
//! Feature `cuda` builds candle's CUDA backend in, so a rank placed on a real GPU trains
//! there; without it every job trains on the CPU.

#![warn(missing_docs)]

pub mod config;
pub mod cpu;
pub mod data;
pub mod db_vae;
pub mod gm_dgm;
pub mod job;
pub mod neural_ode;
pub mod nn;
pub mod ode;
pub mod plot;
pub mod registry;
pub mod testing;
pub mod train;

pub use config::{ConfigError, ConfigKey, ConfigKind, ConfigSchema, ResolvedConfig};
pub use job::{
    check_artifact_name, device_name, publish_results, Checkpoint, Claim, Job, JobContext,
    JobError, ResultsTable,
};
pub use registry::{registry, Registry};
