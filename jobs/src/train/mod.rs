//! Training utilities shared by all jobs: optimizer and schedule, evaluation,
//! parameter counting, checkpoints, the gradient check, data-parallel training, and the
//! bookkeeping around each training step ([`phase`]).

pub mod checkpoint;
pub mod eval;
pub mod gradcheck;
pub mod init;
pub mod optim;
pub mod parallel;
pub mod params;
pub mod phase;

pub use checkpoint::{
    checkpoint_tensors, load_state, optimizer_state, restore_training, restore_vars, save_state,
};
pub use eval::{evaluate, EvalResult};
pub use gradcheck::{check_grads, GradCheckError};
pub use init::init_pytorch_style;
pub use optim::{Adam, Optimizer, PiecewiseLr, SgdMomentum};
pub use parallel::{bucket_plan, shard_of, CommTiming, DataParallel};
pub use params::{count_params, forward_order, named_vars, with_prefix};
pub use phase::{finite_loss, report, stop_if_asked, Cadence, Phase, PhaseState, Tensors};
