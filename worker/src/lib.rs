//! Trainyard's worker: the agent that registers with the coordinator and supervises rank
//! processes, the rank process itself (`trainyard rank`), and checkpoint I/O in the object
//! store.
//!
//! * [`devices`]: `--devices` / `--emulate-gpus` parsing.
//! * [`host`]: the address a worker's ranks are reached at by other workers' ranks.
//! * [`objects`]: the object store, opened from a URL (re-exported from `trainyard-objects`).
//! * [`checkpoint`]: saving and loading checkpoints (safetensors + manifest written last).
//! * [`protocol`]: the rank ↔ agent protocol (assignment encoding, event lines).
//! * [`rank`]: the rank-process side.
//! * [`rendezvous`]: how a rank finds its peers and connects its communicator.
//! * [`uploader`]: the rank's background checkpoint uploader (retries, commit deadline).
//! * [`agent`]: the worker agent.
//! * [`metrics`]: the worker's Prometheus metrics and `/metrics` endpoint.

#![warn(missing_docs)]

pub mod agent;
pub mod checkpoint;
pub mod devices;
mod error;
pub mod host;
pub mod metrics;
pub mod objects;
pub mod protocol;
pub mod rank;
pub mod rendezvous;
pub mod uploader;

pub use agent::{run_worker, WorkerConfig};
pub use devices::{parse_device_slots, parse_devices, DeviceSlots};
pub use error::WorkerError;
pub use host::collective_host_for;
pub use rank::run_rank_process;
