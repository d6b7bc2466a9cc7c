//! [`Nccl`]: the NCCL backend (feature `cuda`), one communicator per rank process on the
//! rank's CUDA device.
//!
//! Setup, as in PyTorch's `init_process_group("nccl")`: rank 0 calls [`Nccl::create_id`]
//! and publishes the id's 128 bytes ([`NcclId::as_bytes`] / [`NcclId::to_hex`]) through
//! the rendezvous; every rank, rank 0 included, then calls [`Nccl::new`] with its candle
//! CUDA device, its rank, the world size and that id (every rank blocks in it until all
//! have joined). NCCL refuses two ranks of one communicator on the same GPU, so a machine
//! with one GPU can only run a world of one.
//!
//! The communicator is bound to candle's own CUDA stream of the device: the collectives
//! are enqueued after the kernels that produced their inputs and before whatever uses
//! their results, with no host synchronisation. Several tensors are flattened into one
//! buffer and reduced in one NCCL call (gradient bucketing), then split again.
//!
//! Built against NCCL 2.28 (cudarc's `nccl-02028` bindings, what PyTorch 2.11 ships);
//! `libnccl.so.2` is linked dynamically.

use std::sync::Arc;

use candle_core::cuda::cudarc;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Device, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{result::NcclError, Comm, Id};

use crate::{
    check_dtypes, check_rank, check_root, device_name, Collective, CollectiveError, NcclId,
    ReduceOp, NCCL_ID_BYTES,
};

fn nccl_err(op: &'static str) -> impl Fn(NcclError) -> CollectiveError {
    move |e| CollectiveError::Nccl {
        op,
        code: format!("{:?}", e.0),
    }
}

fn cuda_err(e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Cuda(format!("{e:?}"))
}

/// The NCCL communicator handle.
struct SendComm(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `Nccl` only reaches it through `&mut self` (or `&self` in `Drop`), so at most
// one thread uses it at a time. cudarc leaves `Comm` !Send only because it holds a raw
// pointer.
unsafe impl Send for SendComm {}

/// The NCCL backend of [`Collective`], on one CUDA device.
pub struct Nccl {
    comm: SendComm,
    device: Device,
    cuda: CudaDevice,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("device", &device_name(&self.device))
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

impl Nccl {
    /// A new unique id, on rank 0 (needs `libnccl.so.2`, not a GPU).
    pub fn create_id() -> Result<NcclId, CollectiveError> {
        let id = Id::new().map_err(nccl_err("ncclGetUniqueId"))?;
        let bytes: Vec<u8> = id.internal().iter().map(|c| *c as u8).collect();
        NcclId::from_bytes(&bytes)
    }

    /// Joins the communicator `id` as `rank` of `world_size` on `device` (a candle CUDA
    /// device; the communicator uses its stream). Blocks until every rank has joined.
    pub fn new(
        device: &Device,
        rank: usize,
        world_size: usize,
        id: &NcclId,
    ) -> Result<Self, CollectiveError> {
        check_rank(rank, world_size)?;
        let Device::Cuda(cuda) = device else {
            return Err(CollectiveError::WrongDevice {
                index: 0,
                found: device_name(device),
                expected: "a CUDA device (NCCL runs on GPUs)".to_string(),
            });
        };
        let mut internal = [0 as std::ffi::c_char; NCCL_ID_BYTES];
        for (dst, src) in internal.iter_mut().zip(id.as_bytes()) {
            *dst = *src as std::ffi::c_char;
        }
        let stream = cuda.cuda_stream();
        let comm = Comm::from_rank(stream.clone(), rank, world_size, Id::uninit(internal))
            .map_err(nccl_err("ncclCommInitRank"))?;
        Ok(Self {
            comm: SendComm(comm),
            device: device.clone(),
            cuda: cuda.clone(),
            stream,
            rank,
            world_size,
        })
    }

    /// A world of one rank on `device`, with a fresh id (for checks and tests).
    pub fn single(device: &Device) -> Result<Self, CollectiveError> {
        let id = Self::create_id()?;
        Self::new(device, 0, 1, &id)
    }

    /// The candle device the communicator runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn check_devices(&self, tensors: &[Tensor]) -> Result<(), CollectiveError> {
        for (index, t) in tensors.iter().enumerate() {
            if !t.device().same_device(&self.device) {
                return Err(CollectiveError::WrongDevice {
                    index,
                    found: device_name(t.device()),
                    expected: device_name(&self.device),
                });
            }
        }
        Ok(())
    }

    /// The tensors as one contiguous `f32` tensor (no copy for a single contiguous tensor).
    fn fuse(tensors: &[Tensor]) -> Result<Tensor, CollectiveError> {
        if let [one] = tensors {
            return Ok(one.flatten_all()?.contiguous()?);
        }
        let flat = tensors
            .iter()
            .map(|t| t.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&flat, 0)?.contiguous()?)
    }

    /// Splits the fused result back into tensors of the inputs' shapes.
    fn split(fused: &Tensor, like: &[Tensor]) -> Result<Vec<Tensor>, CollectiveError> {
        let mut out = Vec::with_capacity(like.len());
        let mut offset = 0;
        for t in like {
            let n = t.elem_count();
            out.push(fused.narrow(0, offset, n)?.reshape(t.shape())?);
            offset += n;
        }
        Ok(out)
    }

    /// Runs `f(comm, src, dst)` with the fused input's device buffer and a new output
    /// buffer of the same length, and returns the output as a tensor.
    fn run_fused(
        &self,
        fused: &Tensor,
        f: impl FnOnce(
            &Comm,
            &cudarc::driver::CudaView<'_, f32>,
            &mut CudaSlice<f32>,
        ) -> Result<(), CollectiveError>,
    ) -> Result<Tensor, CollectiveError> {
        let n = fused.elem_count();
        let out = {
            let (storage, layout) = fused.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                return Err(CollectiveError::WrongDevice {
                    index: 0,
                    found: device_name(fused.device()),
                    expected: device_name(&self.device),
                });
            };
            let src = cs.as_cuda_slice::<f32>()?;
            let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
                CollectiveError::Candle(candle_core::Error::Msg(
                    "collective input is not contiguous".into(),
                ))
            })?;
            let view = src.slice(start..end);
            // SAFETY: every element of `dst` is written by the NCCL call below (all-reduce
            // and broadcast write the whole receive buffer) before anything reads it: later
            // reads are ordered after it on the same stream.
            let mut dst = unsafe { self.stream.alloc::<f32>(n) }.map_err(cuda_err)?;
            f(&self.comm.0, &view, &mut dst)?;
            dst
        };
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.cuda.clone()));
        Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false))
    }

    fn collective(
        &mut self,
        tensors: &[Tensor],
        f: impl FnOnce(
            &Comm,
            &cudarc::driver::CudaView<'_, f32>,
            &mut CudaSlice<f32>,
        ) -> Result<(), CollectiveError>,
    ) -> Result<Vec<Tensor>, CollectiveError> {
        check_dtypes(tensors)?;
        self.check_devices(tensors)?;
        let total: usize = tensors.iter().map(Tensor::elem_count).sum();
        if total == 0 {
            return Ok(tensors.iter().map(Tensor::detach).collect());
        }
        let fused = Self::fuse(tensors)?;
        let out = self.run_fused(&fused, f)?;
        Self::split(&out, tensors)
    }
}

impl Collective for Nccl {
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(
        &mut self,
        tensors: &[Tensor],
        op: ReduceOp,
    ) -> Result<Vec<Tensor>, CollectiveError> {
        let nccl_op = match op {
            ReduceOp::Sum => cudarc::nccl::ReduceOp::Sum,
            ReduceOp::Mean => cudarc::nccl::ReduceOp::Avg,
        };
        self.collective(tensors, |comm, src, dst| {
            comm.all_reduce(src, dst, &nccl_op)
                .map(|_| ())
                .map_err(nccl_err("ncclAllReduce"))
        })
    }

    fn broadcast(
        &mut self,
        tensors: &[Tensor],
        root: usize,
    ) -> Result<Vec<Tensor>, CollectiveError> {
        check_root(root, self.world_size)?;
        let is_root = root == self.rank;
        let root = i32::try_from(root).map_err(|_| CollectiveError::InvalidRoot {
            root,
            world_size: self.world_size,
        })?;
        self.collective(tensors, |comm, src, dst| {
            comm.broadcast(is_root.then_some(src), dst, root)
                .map(|_| ())
                .map_err(nccl_err("ncclBroadcast"))
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // NCCL has no barrier: a one-element all-reduce that every rank must join, then
        // wait for the device.
        let one = self.stream.alloc_zeros::<f32>(1).map_err(cuda_err)?;
        let mut out = self.stream.alloc_zeros::<f32>(1).map_err(cuda_err)?;
        self.comm
            .0
            .all_reduce(&one, &mut out, &cudarc::nccl::ReduceOp::Sum)
            .map_err(nccl_err("ncclAllReduce (barrier)"))?;
        self.stream.synchronize().map_err(cuda_err)
    }
}

#[cfg(test)]
mod tests {
    //! These need an NVIDIA GPU and `libnccl.so.2`: ignored by default (CI has no GPU); run
    //! them on a GPU machine with `cargo test -p trainyard-collective --features cuda --
    //! --ignored`. `trainyard gpu-check` runs the same checks from the release binary.
    use super::*;
    use candle_core::DType;

    #[test]
    #[ignore = "needs an NVIDIA GPU and NCCL"]
    fn single_rank_all_reduce_and_broadcast() {
        let d = Device::new_cuda(0).unwrap();
        let mut c = Nccl::single(&d).unwrap();
        assert_eq!((c.rank(), c.world_size(), c.backend()), (0, 1, "nccl"));
        let a = Tensor::arange(0f32, 6.0, &d)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[7f32], &d).unwrap();
        for op in [ReduceOp::Sum, ReduceOp::Mean] {
            let out = c.all_reduce(&[a.clone(), b.clone()], op).unwrap();
            assert_eq!(out[0].dims(), &[2, 3]);
            assert_eq!(
                out[0].to_vec2::<f32>().unwrap(),
                a.to_vec2::<f32>().unwrap()
            );
            assert_eq!(out[1].to_vec1::<f32>().unwrap(), vec![7.0]);
        }
        let out = c.broadcast(std::slice::from_ref(&a), 0).unwrap();
        assert_eq!(
            out[0].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        c.barrier().unwrap();
        let cpu = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            c.all_reduce(&[cpu], ReduceOp::Sum),
            Err(CollectiveError::WrongDevice { .. })
        ));
    }

    #[test]
    #[ignore = "needs libnccl.so.2"]
    fn unique_ids_differ() {
        let a = Nccl::create_id().unwrap();
        let b = Nccl::create_id().unwrap();
        assert_ne!(a, b);
    }
}
