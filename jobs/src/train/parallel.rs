//! [`DataParallel`]: data-parallel training over a [`Collective`], as PyTorch's
//! `DistributedDataParallel` + `DistributedSampler` do it.
//!
//! Every rank holds a full copy of the model. A training job:
//!
//! 1. builds (or restores) its model, then calls [`DataParallel::broadcast_params`], so every
//!    rank starts from rank 0's parameters;
//! 2. each epoch, shuffles the sample indices with the seed every rank shares and keeps its
//!    shard of them ([`DataParallel::shard`]), batched with the per-rank batch size (the
//!    global batch is `batch × world size`);
//! 3. each step, runs forward and backward on its own batch, averages the gradients over
//!    the ranks ([`DataParallel::all_reduce_grads`]) and steps its optimizer: since every
//!    rank applies the same averaged gradient to the same parameters, the replicas stay
//!    identical, and a step equals one step of a single rank on the global batch (for a
//!    model without batch-dependent layers, and a loss that is a mean over the batch);
//! 4. averages the metrics it reports ([`DataParallel::average_metrics`]); rank 0 alone
//!    reports them, writes checkpoints and publishes results, and every rank restores the
//!    same checkpoint.
//!
//! Gradients are all-reduced in buckets of about [`DataParallel::DEFAULT_BUCKET_BYTES`],
//! filled in reverse parameter order (the order backward produces them, as Horovod's tensor
//! fusion and DDP's buckets do), each bucket fused into one flat buffer, so that a model of
//! many small tensors costs a few collectives, not one per tensor. candle's backward returns
//! every gradient at once, so the buckets do not overlap communication with the backward
//! pass yet; the order is there for when they do.
//!
//! With a world of one rank every method returns at once without touching the
//! communicator, so a single-rank job pays nothing.
//!
//! [`DataParallel`] also measures the time spent in collectives against the time of a whole
//! step ([`CommTiming`]), for the scaling benchmark and the job's logs. A collective's time
//! includes waiting for the slowest rank to get there.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use trainyard_collective::{Collective, ReduceOp};

use crate::job::{JobContext, JobError};

/// Time spent in collectives, against the time of whole training steps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommTiming {
    /// Steps timed (between [`DataParallel::begin_step`] and [`DataParallel::end_step`]).
    pub steps: u64,
    /// Seconds of those steps, end to end.
    pub step_seconds: f64,
    /// Seconds of collectives inside those steps.
    pub step_comm_seconds: f64,
    /// Seconds of all collectives, inside steps or not (broadcast, evaluation...).
    pub comm_seconds: f64,
    /// Bytes of gradients all-reduced (this rank's input size, summed over calls).
    pub grad_bytes: u64,
    /// Gradient collectives (buckets) run.
    pub grad_buckets: u64,
}

impl CommTiming {
    /// The fraction of step time spent in collectives (0 when no step was timed).
    pub fn comm_share(&self) -> f64 {
        if self.step_seconds > 0.0 {
            self.step_comm_seconds / self.step_seconds
        } else {
            0.0
        }
    }
}

/// One rank's side of data-parallel training: its communicator, the gradient bucket size,
/// and timing counters. See the module docs.
pub struct DataParallel {
    comm: Box<dyn Collective>,
    bucket_bytes: usize,
    device: Device,
    timing: CommTiming,
    step_started: Option<Instant>,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("backend", &self.comm.backend())
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("bucket_bytes", &self.bucket_bytes)
            .field("timing", &self.timing)
            .finish()
    }
}

impl DataParallel {
    /// Default gradient bucket size: 4 MiB (DDP's default is 25 MB, Horovod's fusion
    /// buffer 64 MB; the models here are small, so a smaller bucket still fuses them).
    pub const DEFAULT_BUCKET_BYTES: usize = 4 << 20;

    /// Data parallelism over `comm` for a model on `device`, with the default bucket size.
    pub fn new(comm: Box<dyn Collective>, device: &Device) -> Self {
        Self {
            comm,
            bucket_bytes: Self::DEFAULT_BUCKET_BYTES,
            device: device.clone(),
            timing: CommTiming::default(),
            step_started: None,
        }
    }

    /// Connects this rank to the others of its job ([`JobContext::communicator`]; call it
    /// once per run, on every rank, after [`JobContext::device`]) and checks that the
    /// communicator agrees with the context on rank and world size.
    pub fn from_context(ctx: &dyn JobContext, device: &Device) -> Result<Self, JobError> {
        let comm = ctx.communicator()?;
        if comm.rank() != ctx.rank() as usize || comm.world_size() != ctx.world_size() as usize {
            return Err(JobError::Other(format!(
                "the communicator is rank {} of {}, the job runs rank {} of {}",
                comm.rank(),
                comm.world_size(),
                ctx.rank(),
                ctx.world_size()
            )));
        }
        Ok(Self::new(comm, device))
    }

    /// Sets the gradient bucket size in bytes (at least one tensor goes in each bucket).
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Self {
        self.bucket_bytes = bytes.max(1);
        self
    }

    /// The gradient bucket size in bytes.
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }

    /// This rank, from 0.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// True on rank 0, the rank that reports metrics, saves checkpoints and publishes results.
    pub fn is_primary(&self) -> bool {
        self.rank() == 0
    }

    /// The communicator's backend (`local`, `ring`, `nccl`).
    pub fn backend(&self) -> &'static str {
        self.comm.backend()
    }

    /// The timing counters so far.
    pub fn timing(&self) -> CommTiming {
        self.timing
    }

    /// Starts timing a training step.
    pub fn begin_step(&mut self) {
        self.step_started = Some(Instant::now());
    }

    /// Ends the step [`DataParallel::begin_step`] started (nothing if none was started).
    pub fn end_step(&mut self) {
        if let Some(started) = self.step_started.take() {
            self.timing.steps += 1;
            self.timing.step_seconds += started.elapsed().as_secs_f64();
        }
    }

    /// Runs a collective and counts its time.
    fn timed<T>(&mut self, f: impl FnOnce(&mut dyn Collective) -> T) -> T {
        let started = Instant::now();
        let out = f(self.comm.as_mut());
        let secs = started.elapsed().as_secs_f64();
        self.timing.comm_seconds += secs;
        if self.step_started.is_some() {
            self.timing.step_comm_seconds += secs;
        }
        out
    }

    /// Sets every rank's `vars` to rank 0's values (in buckets, like the gradients). Call it
    /// once the model is built or restored, before the first step.
    pub fn broadcast_params(&mut self, vars: &[(String, Var)]) -> Result<(), JobError> {
        if self.world_size() <= 1 {
            return Ok(());
        }
        let values: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let plan = bucket_plan(&byte_sizes(&values), self.bucket_bytes);
        let primary = self.is_primary();
        for bucket in plan {
            let tensors: Vec<Tensor> = bucket.iter().map(|&i| values[i].clone()).collect();
            let out = self.timed(|c| fused(&tensors, |flat| c.broadcast(flat, 0)))?;
            if !primary {
                for (&i, t) in bucket.iter().zip(out) {
                    vars[i].1.set(&t)?;
                }
            }
        }
        Ok(())
    }

    /// This rank's share of an epoch's samples, with `DistributedSampler` semantics:
    /// `epoch_order` is the epoch's shuffled order, the same on every rank (shuffled with
    /// the seed they share); it is padded by repeating its start until its length is a
    /// multiple of the world size (so every rank gets the same number of samples, and no
    /// sample is left out), and rank `r` takes positions `r, r + n, r + 2n, …`. See
    /// [`shard_of`].
    pub fn shard(&self, epoch_order: &[usize]) -> Vec<usize> {
        shard_of(epoch_order, self.rank(), self.world_size())
    }

    /// This rank's contiguous share of `len` items (an evaluation set): rank `r` of `n`
    /// takes `r·len/n .. (r+1)·len/n`, without padding; with one rank, all of them.
    pub fn contiguous_shard(&self, len: usize) -> std::ops::Range<usize> {
        let (rank, world) = (self.rank(), self.world_size().max(1));
        rank * len / world..(rank + 1) * len / world
    }

    /// How the ranks split a global batch, for a job's first log line: empty with one
    /// rank, else ` x <n> ranks (global batch <global_batch>, <backend> backend)`.
    pub fn ranks_note(&self, global_batch: impl std::fmt::Display) -> String {
        let world = self.world_size();
        if world > 1 {
            format!(
                " x {world} ranks (global batch {global_batch}, {} backend)",
                self.backend()
            )
        } else {
            String::new()
        }
    }

    /// Replaces every gradient of `vars` in `grads` with its mean over the ranks, in
    /// buckets of about [`DataParallel::bucket_bytes`] filled in reverse order of `vars`
    /// (pass them in the order the forward pass uses them). A variable without a gradient
    /// on this rank contributes zeros (so that every rank runs the same collectives), and
    /// gets the averaged gradient too.
    pub fn all_reduce_grads(
        &mut self,
        vars: &[(String, Var)],
        grads: &mut GradStore,
    ) -> Result<(), JobError> {
        if self.world_size() <= 1 {
            return Ok(());
        }
        let local: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => v.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        let sizes = byte_sizes(&local);
        for bucket in bucket_plan(&sizes, self.bucket_bytes) {
            let tensors: Vec<Tensor> = bucket.iter().map(|&i| local[i].clone()).collect();
            let out = self.timed(|c| fused(&tensors, |flat| c.all_reduce(flat, ReduceOp::Mean)))?;
            self.timing.grad_buckets += 1;
            self.timing.grad_bytes += bucket.iter().map(|&i| sizes[i] as u64).sum::<u64>();
            for (&i, g) in bucket.iter().zip(out) {
                grads.insert(vars[i].1.as_tensor(), g);
            }
        }
        Ok(())
    }

    /// The mean over the ranks of each metric value, in one small all-reduce (in `f32`:
    /// about 7 significant digits; with one rank the values come back unchanged).
    pub fn average_metrics<S: Clone>(
        &mut self,
        metrics: &[(S, f64)],
    ) -> Result<Vec<(S, f64)>, JobError> {
        let values: Vec<f64> = metrics.iter().map(|(_, v)| *v).collect();
        let reduced = self.reduce_values(&values, ReduceOp::Mean)?;
        Ok(metrics
            .iter()
            .zip(reduced)
            .map(|((name, _), v)| (name.clone(), v))
            .collect())
    }

    /// The sum over the ranks of each value (counts of a sharded evaluation), in one small
    /// all-reduce (`f32`: integers are exact up to 2^24).
    pub fn sum_values(&mut self, values: &[f64]) -> Result<Vec<f64>, JobError> {
        self.reduce_values(values, ReduceOp::Sum)
    }

    /// True on every rank if `flag` is true on any rank: how ranks agree to stop at the same
    /// step when only some of them were asked to.
    pub fn any(&mut self, flag: bool) -> Result<bool, JobError> {
        let v = self.reduce_values(&[if flag { 1.0 } else { 0.0 }], ReduceOp::Sum)?;
        Ok(v[0] > 0.0)
    }

    fn reduce_values(&mut self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>, JobError> {
        if self.world_size() <= 1 || values.is_empty() {
            return Ok(values.to_vec());
        }
        let host: Vec<f32> = values.iter().map(|v| *v as f32).collect();
        // On the model's device, where NCCL wants it; the values are few.
        let t = Tensor::from_vec(host, values.len(), &self.device)?;
        let out = self.timed(|c| c.all_reduce(&[t], op))?;
        let reduced = out
            .first()
            .ok_or_else(|| JobError::Other("all_reduce returned no tensor".into()))?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        Ok(reduced.into_iter().map(f64::from).collect())
    }
}

/// Rank `rank`'s shard of `epoch_order` in a world of `world_size` ranks, with
/// `DistributedSampler` semantics (its default `drop_last=False`): the order is padded by
/// repeating it from its start until its length is a multiple of `world_size` (so each
/// rank gets `ceil(len / world_size)` indices and a few samples appear twice in the epoch),
/// then rank `r` takes positions `r, r + n, r + 2n, …`. With one rank it is the order itself.
pub fn shard_of(epoch_order: &[usize], rank: usize, world_size: usize) -> Vec<usize> {
    let n = world_size.max(1);
    if n == 1 || epoch_order.is_empty() {
        return epoch_order.to_vec();
    }
    let per_rank = epoch_order.len().div_ceil(n);
    (0..per_rank)
        .map(|k| epoch_order[(rank + k * n) % epoch_order.len()])
        .collect()
}

/// Groups tensors of `sizes` bytes into buckets of at most `cap` bytes, filled in reverse
/// order (the last tensor first): a bucket is closed when the next tensor would overflow it,
/// and a tensor larger than `cap` gets a bucket of its own. Returns the tensors' indices per
/// bucket, in the order the buckets are reduced.
pub fn bucket_plan(sizes: &[usize], cap: usize) -> Vec<Vec<usize>> {
    let mut buckets = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut filled = 0usize;
    for i in (0..sizes.len()).rev() {
        if !current.is_empty() && filled + sizes[i] > cap {
            buckets.push(std::mem::take(&mut current));
            filled = 0;
        }
        current.push(i);
        filled += sizes[i];
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

fn byte_sizes(tensors: &[Tensor]) -> Vec<usize> {
    tensors
        .iter()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .collect()
}

/// Runs `op` on `tensors` fused into one flat tensor, and cuts the result back into tensors
/// of the inputs' shapes (views of the one result, no copies).
fn fused(
    tensors: &[Tensor],
    op: impl FnOnce(&[Tensor]) -> Result<Vec<Tensor>, trainyard_collective::CollectiveError>,
) -> Result<Vec<Tensor>, JobError> {
    let flat: Vec<Tensor> = tensors
        .iter()
        .map(Tensor::flatten_all)
        .collect::<candle_core::Result<_>>()?;
    let buffer = match flat.as_slice() {
        [one] => one.clone(),
        many => Tensor::cat(many, 0)?,
    };
    let reduced = op(&[buffer])?;
    let reduced = reduced
        .into_iter()
        .next()
        .ok_or_else(|| JobError::Other("collective returned no tensor".into()))?;
    let mut out = Vec::with_capacity(tensors.len());
    let mut offset = 0;
    for t in tensors {
        let len = t.elem_count();
        out.push(reduced.narrow(0, offset, len)?.reshape(t.shape())?);
        offset += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::loopback_rings;
    use std::collections::BTreeSet;
    use std::time::Duration;
    use trainyard_collective::{CollectiveError, RingConfig};

    #[test]
    fn shards_are_disjoint_cover_the_epoch_and_are_equal_in_size() {
        let order = crate::data::epoch_order(100, 7, 3);
        for n in [1, 2, 3, 4, 7, 100] {
            let shards: Vec<Vec<usize>> = (0..n).map(|r| shard_of(&order, r, n)).collect();
            let per = 100usize.div_ceil(n);
            assert!(shards.iter().all(|s| s.len() == per), "n={n}");
            // together they cover every sample; only the padding repeats any
            let all: BTreeSet<usize> = shards.iter().flatten().copied().collect();
            assert_eq!(all.len(), 100, "n={n}");
            let total: usize = shards.iter().map(Vec::len).sum();
            assert_eq!(total - 100, per * n - 100, "n={n}");
            if 100 % n == 0 {
                // without padding the shards are disjoint
                assert_eq!(total, 100, "n={n}");
            }
            // rank r takes positions r, r + n, ...
            assert_eq!(shards[n - 1][0], order[n - 1]);
            if per > 1 {
                assert_eq!(shards[0][1], order[n]);
            }
        }
        assert_eq!(shard_of(&order, 0, 1), order);
    }

    #[test]
    fn uneven_epochs_are_padded_from_the_start() {
        let order: Vec<usize> = vec![10, 11, 12, 13, 14];
        assert_eq!(shard_of(&order, 0, 2), vec![10, 12, 14]);
        assert_eq!(shard_of(&order, 1, 2), vec![11, 13, 10]);
        // more ranks than samples: the order repeats
        assert_eq!(shard_of(&order[..2], 0, 3), vec![10]);
        assert_eq!(shard_of(&order[..2], 1, 3), vec![11]);
        assert_eq!(shard_of(&order[..2], 2, 3), vec![10]);
        assert!(shard_of(&[], 1, 2).is_empty());
    }

    #[test]
    fn every_rank_shuffles_with_the_same_seed() {
        // Ranks build the epoch's order from the shared seed independently; the same
        // (seed, epoch) gives the same order, hence complementary shards.
        let (a, b) = (
            crate::data::epoch_order(64, 11, 2),
            crate::data::epoch_order(64, 11, 2),
        );
        let mut union: Vec<usize> = shard_of(&a, 0, 2);
        union.extend(shard_of(&b, 1, 2));
        union.sort_unstable();
        assert_eq!(union, (0..64).collect::<Vec<_>>());
        assert_ne!(
            shard_of(&crate::data::epoch_order(64, 11, 3), 0, 2),
            shard_of(&a, 0, 2)
        );
    }

    #[test]
    fn buckets_fill_in_reverse_order_up_to_the_cap() {
        // four 1 KiB tensors, cap 2 KiB: [3, 2], [1, 0]
        assert_eq!(bucket_plan(&[1024; 4], 2048), vec![vec![3, 2], vec![1, 0]]);
        // the cap is not exceeded: 3 + 3 > 5 closes a bucket
        assert_eq!(
            bucket_plan(&[3, 3, 2, 3], 5),
            vec![vec![3, 2], vec![1], vec![0]]
        );
        // a tensor bigger than a bucket gets one of its own, and does not swallow the next
        assert_eq!(
            bucket_plan(&[1, 100, 1, 1], 10),
            vec![vec![3, 2], vec![1], vec![0]]
        );
        assert_eq!(bucket_plan(&[100], 10), vec![vec![0]]);
        // everything fits: one bucket, last tensor first
        assert_eq!(bucket_plan(&[1, 2, 3], 1 << 20), vec![vec![2, 1, 0]]);
        assert!(bucket_plan(&[], 10).is_empty());
        // every tensor lands in exactly one bucket
        let sizes: Vec<usize> = (0..50).map(|i| (i * 37) % 700 + 1).collect();
        let plan = bucket_plan(&sizes, 1000);
        let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
        assert_eq!(seen, (0..50).rev().collect::<Vec<_>>());
        seen.sort_unstable();
        for b in &plan {
            let bytes: usize = b.iter().map(|&i| sizes[i]).sum();
            assert!(bytes <= 1000 || b.len() == 1, "{b:?}: {bytes}");
        }
    }

    /// A world of one whose collectives panic: proves a one-rank `DataParallel` skips them.
    struct NoCalls;

    impl Collective for NoCalls {
        fn backend(&self) -> &'static str {
            "none"
        }
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            1
        }
        fn all_reduce(
            &mut self,
            _: &[Tensor],
            _: ReduceOp,
        ) -> Result<Vec<Tensor>, CollectiveError> {
            panic!("all_reduce called in a world of one")
        }
        fn broadcast(&mut self, _: &[Tensor], _: usize) -> Result<Vec<Tensor>, CollectiveError> {
            panic!("broadcast called in a world of one")
        }
        fn barrier(&mut self) -> Result<(), CollectiveError> {
            panic!("barrier called in a world of one")
        }
    }

    fn vars(values: &[&[f32]]) -> Vec<(String, Var)> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("v{i}"), Var::new(*v, &Device::Cpu).unwrap()))
            .collect()
    }

    #[test]
    fn a_world_of_one_skips_every_collective() {
        let mut dp = DataParallel::new(Box::new(NoCalls), &Device::Cpu);
        let vs = vars(&[&[1.0, 2.0], &[3.0]]);
        dp.broadcast_params(&vs).unwrap();
        let loss = vs[0].1.as_tensor().sum_all().unwrap();
        let mut grads = loss.backward().unwrap();
        dp.all_reduce_grads(&vs, &mut grads).unwrap();
        assert_eq!(
            grads
                .get(vs[0].1.as_tensor())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![1.0, 1.0]
        );
        assert!(grads.get(vs[1].1.as_tensor()).is_none());
        let m = dp.average_metrics(&[("loss", 2.5f64.sqrt())]).unwrap();
        assert_eq!(m, vec![("loss", 2.5f64.sqrt())]);
        assert_eq!(dp.sum_values(&[3.0]).unwrap(), vec![3.0]);
        assert!(dp.any(true).unwrap() && !dp.any(false).unwrap());
        assert_eq!(dp.shard(&[4, 2, 9]), vec![4, 2, 9]);
        assert_eq!(dp.timing().comm_seconds, 0.0);
    }

    fn quick() -> RingConfig {
        RingConfig {
            connect_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(10),
            ..RingConfig::default()
        }
    }

    #[test]
    fn two_ranks_broadcast_average_and_agree() {
        let rings = loopback_rings(2, "dp-test", quick()).unwrap();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = rings
                .into_iter()
                .map(|ring| {
                    s.spawn(move || {
                        let r = ring.rank() as f32;
                        // tiny buckets: three tensors of 8, 4 and 12 bytes, cap 12 bytes
                        let mut dp =
                            DataParallel::new(Box::new(ring), &Device::Cpu).with_bucket_bytes(12);
                        let vs = vars(&[&[10.0 + r, 20.0 + r], &[30.0 + r], &[1.0, 2.0, 3.0]]);
                        dp.broadcast_params(&vs).unwrap();
                        let params: Vec<Vec<f32>> = vs
                            .iter()
                            .map(|(_, v)| v.as_tensor().to_vec1::<f32>().unwrap())
                            .collect();
                        // grads: v0 -> rank+1 each, v1 -> 2*(rank+1), v2 only on rank 1
                        let mut loss = ((vs[0].1.as_tensor().sum_all().unwrap()
                            * (r as f64 + 1.0))
                            .unwrap()
                            + (vs[1].1.as_tensor().sum_all().unwrap() * (2.0 * (r as f64 + 1.0)))
                                .unwrap())
                        .unwrap();
                        if r == 1.0 {
                            loss = (loss + vs[2].1.as_tensor().sum_all().unwrap()).unwrap();
                        }
                        let mut grads = loss.backward().unwrap();
                        dp.begin_step();
                        dp.all_reduce_grads(&vs, &mut grads).unwrap();
                        dp.end_step();
                        let g: Vec<Vec<f32>> = vs
                            .iter()
                            .map(|(_, v)| {
                                grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
                            })
                            .collect();
                        let m = dp
                            .average_metrics(&[
                                ("loss".to_string(), 1.0 + r as f64),
                                ("nfe".into(), 8.0),
                            ])
                            .unwrap();
                        let sum = dp.sum_values(&[r as f64 + 1.0]).unwrap();
                        let stop_one = dp.any(r == 1.0).unwrap();
                        let stop_none = dp.any(false).unwrap();
                        (params, g, m, sum, stop_one, stop_none, dp.timing())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (params, g, m, sum, stop_one, stop_none, timing) in &results {
            // rank 0's parameters everywhere
            assert_eq!(
                params,
                &vec![vec![10.0, 20.0], vec![30.0], vec![1.0, 2.0, 3.0]]
            );
            // means of (1, 2), (2, 4), and (0, 1): zeros stood in for the missing gradient
            assert_eq!(g, &vec![vec![1.5, 1.5], vec![3.0], vec![0.5, 0.5, 0.5]]);
            assert_eq!(
                m,
                &vec![("loss".to_string(), 1.5), ("nfe".to_string(), 8.0)]
            );
            assert_eq!(sum, &vec![3.0]);
            assert!(*stop_one && !*stop_none);
            // 24 bytes in buckets of 12: [v2], [v1, v0]
            assert_eq!(
                (timing.grad_buckets, timing.grad_bytes, timing.steps),
                (2, 24, 1)
            );
            assert!(
                timing.step_comm_seconds > 0.0 && timing.comm_seconds >= timing.step_comm_seconds
            );
            assert!(timing.comm_share() > 0.0 && timing.comm_share() <= 1.0);
        }
        // both ranks computed the same averages
        assert_eq!(results[0].2, results[1].2);
    }
}
