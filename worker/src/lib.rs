//! Trainyard's worker: the agent that registers with the coordinator and supervises rank
//! processes, the rank process itself (`trainyard rank`), and checkpoint I/O in the object
//! store.
//!
//! * [`devices`]: `--devices` / `--emulate-gpus` parsing.
//! * [`objects`]: opening the object store from a URL.
//! * [`checkpoint`]: saving and loading checkpoints (safetensors + manifest written last).
//! * [`protocol`]: the rank ↔ agent protocol (assignment encoding, event lines).
//! * [`rank`]: the rank-process side.
//! * [`agent`]: the worker agent.

#![warn(missing_docs)]

pub mod agent;
pub mod checkpoint;
pub mod devices;
mod error;
pub mod objects;
pub mod protocol;
pub mod rank;

pub use agent::{run_worker, WorkerConfig};
pub use devices::parse_devices;
pub use error::WorkerError;
pub use rank::run_rank_process;
