//! Trainyard's collective operations: the seam through which data-parallel ranks combine
//! their gradients.
//!
//! A job sees one [`Collective`]: its rank, the world size, and the collectives it needs
//! ([`Collective::all_reduce`], [`Collective::broadcast`], [`Collective::barrier`]) over
//! candle [`Tensor`]s. Backends:
//!
//! * [`Local`]: a world of one rank, in process. Every collective is the identity, so CPU
//!   code paths and tests use the same trait as a real cluster.
//! * `nccl::Nccl` (feature `cuda`): NVIDIA NCCL over the rank's CUDA device, on candle's own
//!   CUDA stream, so it is ordered with the training step's kernels without extra syncs.
//! * [`Ring`]: a ring between rank processes (on one or several workers), connected over
//!   TCP. `all_reduce` runs a pipelined ring reduce-scatter + all-gather over the sockets,
//!   reading CPU tensors in place; when every rank of the ring is on the same host it
//!   switches to a shared-memory segment in `/dev/shm` (chosen at connect, falling back to
//!   TCP when any rank cannot map it). Every operation has a timeout, so a dead peer is an
//!   error, never a hang.
//!
//! The collectives take tensors and return new ones (same shapes, dtype and device, in the
//! same order) instead of writing into their inputs: candle tensors are immutable, and
//! returning fresh tensors lets a backend reduce on the device (NCCL) or through host
//! buffers (TCP) alike. The results carry no autograd history. Only `f32` tensors are
//! accepted today (what the jobs train in); every backend checks that the same way.
//!
//! NCCL needs the 128-byte unique id of rank 0 on every rank before it can connect; the
//! [`NcclId`] type carries those bytes (and their hex form) through a rendezvous and is
//! available without the `cuda` feature.

#![warn(missing_docs)]

mod id;
mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;

use candle_core::{DType, Tensor};

pub use id::{NcclId, NCCL_ID_BYTES};
pub use local::Local;
pub use ring::{Ring, RingConfig};

/// How [`Collective::all_reduce`] combines the ranks' values, element-wise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum over ranks.
    Sum,
    /// The sum over ranks divided by the world size (gradient averaging).
    Mean,
}

impl std::fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
        })
    }
}

/// Errors of setting up a communicator or running a collective.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The rank is not below the world size (or the world size is 0).
    #[error("rank {rank} is out of range for a world of {world_size}")]
    InvalidRank {
        /// The rank given.
        rank: usize,
        /// The world size given.
        world_size: usize,
    },
    /// The root of a broadcast is not a rank of the world.
    #[error("broadcast root {root} is out of range for a world of {world_size}")]
    InvalidRoot {
        /// The root given.
        root: usize,
        /// The world size.
        world_size: usize,
    },
    /// A tensor has a dtype the collectives do not support.
    #[error("tensor {index}: dtype {dtype:?} is not supported (collectives take f32 tensors)")]
    UnsupportedDType {
        /// Position of the tensor in the argument.
        index: usize,
        /// Its dtype.
        dtype: DType,
    },
    /// A tensor is not on the communicator's device.
    #[error("tensor {index} is on {found}, the communicator is on {expected}")]
    WrongDevice {
        /// Position of the tensor in the argument.
        index: usize,
        /// Where the tensor is.
        found: String,
        /// Where the communicator is.
        expected: String,
    },
    /// A unique id (from a rendezvous) is malformed.
    #[error("invalid NCCL unique id: {0}")]
    InvalidId(String),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The CUDA driver failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// NCCL returned an error.
    #[error("NCCL {op}: {code}")]
    Nccl {
        /// The NCCL call that failed.
        op: &'static str,
        /// NCCL's result code, e.g. `ncclUnhandledCudaError`.
        code: String,
    },
    /// The transport between ranks failed (a peer went away, a socket error...).
    #[error("transport: {0}")]
    Transport(String),
    /// A peer made no progress within the operation's timeout (it died, hangs, or never
    /// called the collective).
    #[error("{op}: timed out after {timeout:?} waiting for rank {peer}")]
    PeerTimeout {
        /// The peer rank waited for.
        peer: usize,
        /// The operation, e.g. `all_reduce` or `connect`.
        op: &'static str,
        /// The timeout that elapsed.
        timeout: std::time::Duration,
    },
    /// The connection with a peer failed (closed, reset, or a protocol violation).
    #[error("{op}: connection with rank {peer} failed: {reason}")]
    PeerFailed {
        /// The peer rank.
        peer: usize,
        /// The operation, e.g. `all_reduce`.
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A peer's handshake did not match this rank's (another job attempt, world size or
    /// rank): the connection is refused.
    #[error("handshake with rank {peer} refused: {reason}")]
    HandshakeRefused {
        /// The peer rank (as this rank expected it).
        peer: usize,
        /// What did not match.
        reason: String,
    },
}

/// A communicator: one rank's handle on a group of ranks that run collectives together.
///
/// Every rank of the world must call the same collectives in the same order with tensors of
/// the same shapes; a collective returns once this rank's result is available (for device
/// backends: enqueued on the device's stream, ordered with later work on it).
pub trait Collective: Send {
    /// Name of the backend, e.g. `local` or `nccl`.
    fn backend(&self) -> &'static str;

    /// This rank, from 0.
    fn rank(&self) -> usize;

    /// Number of ranks in the world.
    fn world_size(&self) -> usize;

    /// Reduces each tensor element-wise over all ranks with `op`; returns the results in
    /// the order of `tensors`, each with its input's shape, on its input's device.
    fn all_reduce(
        &mut self,
        tensors: &[Tensor],
        op: ReduceOp,
    ) -> Result<Vec<Tensor>, CollectiveError>;

    /// Returns rank `root`'s values of `tensors` on every rank (non-root ranks pass tensors
    /// of the right shapes; their values are ignored).
    fn broadcast(
        &mut self,
        tensors: &[Tensor],
        root: usize,
    ) -> Result<Vec<Tensor>, CollectiveError>;

    /// Returns once every rank has called it (for device backends: once the device has
    /// finished the work queued before it).
    fn barrier(&mut self) -> Result<(), CollectiveError>;
}

/// Checks that `rank` is a rank of a world of `world_size` (at least 1).
pub fn check_rank(rank: usize, world_size: usize) -> Result<(), CollectiveError> {
    if world_size == 0 || rank >= world_size {
        return Err(CollectiveError::InvalidRank { rank, world_size });
    }
    Ok(())
}

/// Checks that `root` is a rank of a world of `world_size`.
pub fn check_root(root: usize, world_size: usize) -> Result<(), CollectiveError> {
    if root >= world_size {
        return Err(CollectiveError::InvalidRoot { root, world_size });
    }
    Ok(())
}

/// Checks that every tensor is `f32` (the dtype every backend supports).
pub fn check_dtypes(tensors: &[Tensor]) -> Result<(), CollectiveError> {
    for (index, t) in tensors.iter().enumerate() {
        if t.dtype() != DType::F32 {
            return Err(CollectiveError::UnsupportedDType {
                index,
                dtype: t.dtype(),
            });
        }
    }
    Ok(())
}

/// Describes a device for messages: `cpu`, `cuda:0`, `metal:0`.
pub fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rank_and_root_checks() {
        assert!(check_rank(0, 1).is_ok());
        assert!(check_rank(3, 4).is_ok());
        assert!(matches!(
            check_rank(4, 4),
            Err(CollectiveError::InvalidRank {
                rank: 4,
                world_size: 4
            })
        ));
        assert!(check_rank(0, 0).is_err());
        assert!(check_root(0, 1).is_ok());
        let err = check_root(2, 2).unwrap_err().to_string();
        assert!(
            err.contains("root 2") && err.contains("world of 2"),
            "{err}"
        );
    }

    #[test]
    fn only_f32_is_accepted() {
        let d = Device::Cpu;
        let ok = Tensor::zeros(3, DType::F32, &d).unwrap();
        let bad = Tensor::zeros(3, DType::F64, &d).unwrap();
        assert!(check_dtypes(std::slice::from_ref(&ok)).is_ok());
        let err = check_dtypes(&[ok, bad]).unwrap_err();
        assert!(matches!(
            err,
            CollectiveError::UnsupportedDType {
                index: 1,
                dtype: DType::F64
            }
        ));
        assert!(err.to_string().contains("tensor 1"), "{err}");
    }

    #[test]
    fn names() {
        assert_eq!(device_name(&Device::Cpu), "cpu");
        assert_eq!(ReduceOp::Mean.to_string(), "mean");
        assert_eq!(ReduceOp::Sum.to_string(), "sum");
    }
}
