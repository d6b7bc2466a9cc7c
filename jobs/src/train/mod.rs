//! Training utilities shared by all jobs: optimizer and schedule, evaluation,
//! parameter counting, checkpoint tensors, the gradient check, and data-parallel training.

pub mod checkpoint;
pub mod eval;
pub mod gradcheck;
pub mod init;
pub mod optim;
pub mod parallel;
pub mod params;

pub use checkpoint::{checkpoint_tensors, optimizer_state, restore_vars};
pub use eval::{evaluate, EvalResult};
pub use gradcheck::{check_grads, GradCheckError};
pub use init::init_pytorch_style;
pub use optim::{Adam, Optimizer, PiecewiseLr, SgdMomentum};
pub use parallel::{bucket_plan, shard_of, CommTiming, DataParallel};
pub use params::{count_params, named_vars, with_prefix};
