//! One module per subcommand.

pub mod auth;
pub mod cancel;
pub mod certs;
pub mod checkpoints;
pub mod coordinator;
pub mod data;
pub mod describe;
pub mod gpu_check;
pub mod job_types;
pub mod jobs;
pub mod local;
pub mod logs;
pub mod reproduce;
pub mod results;
pub mod run;
pub mod submit;
pub mod worker;
pub mod workers;
