//! Training-step timing of the MNIST models on a given device, for `trainyard gpu-check`:
//! the same models, initialisation, data and optimizer as the `mnist` experiment, a few
//! warm-up steps, then the mean wall time of a full step (forward, loss, backward,
//! optimizer update, loss read back to the host, so the device has finished the step).
//!
//! With the same config, seed and batch, the loss before the first update is the same on
//! every device up to rounding: a cheap cross-device correctness check.
//!
//! [`data_parallel_throughput`] measures data-parallel scaling instead: the whole job,
//! trained by `n` ranks that are threads of this process joined by a TCP ring over
//! loopback (`cargo bench -p trainyard-jobs --bench scaling` prints the table).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Device;
use rand::RngCore;

use super::mnist::{build_model, Settings};
use crate::config::ResolvedConfig;
use crate::data::{batches, derived_rng, epoch_order, make_batch, mnist_10k};
use crate::job::{device_name, Job, JobError};
use crate::neural_ode::NeuralOdeJob;
use crate::testing::{loopback_rings, MemoryContext};
use crate::train::{count_params, init_pytorch_style, named_vars, Optimizer};

/// What [`time_training_steps`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTiming {
    /// `resnet` or `odenet`.
    pub model: String,
    /// Mini-batch size.
    pub batch: usize,
    /// Device, e.g. `cuda:0` or `cpu`.
    pub device: String,
    /// Trainable parameters.
    pub params: usize,
    /// Timed steps (after the warm-up).
    pub steps: usize,
    /// Mean seconds per timed step.
    pub mean_step_s: f64,
    /// Training loss of the first step, before any update.
    pub first_loss: f64,
    /// Training loss of the last timed step.
    pub last_loss: f64,
    /// Forward NFE of the last step (ODE-Net only).
    pub nfe_forward: Option<usize>,
}

/// Trains `model` (`resnet` or `odenet`) of the experiment `config` describes (width,
/// groups, solver, optimizer, lr, seed) for `warmup + steps` steps of `batch` images on
/// `device`, and times the last `steps`.
pub fn time_training_steps(
    config: &ResolvedConfig,
    model: &str,
    batch: usize,
    warmup: usize,
    steps: usize,
    device: &Device,
) -> Result<StepTiming, JobError> {
    let s = Settings::from_config(config)?;
    if batch == 0 || steps == 0 {
        return Err(JobError::Other(
            "batch and steps must be at least 1".to_string(),
        ));
    }
    let (train, _) = mnist_10k().map_err(|e| JobError::Data(e.to_string()))?;
    let (net, varmap) = build_model(model, &s, device)?;
    init_pytorch_style(&varmap, derived_rng(s.seed, 3, 0, 0).next_u64())?;
    let vars = named_vars(&varmap);
    let params = count_params(&varmap);
    let mut opt = Optimizer::by_name(&s.optimizer, vars, s.lr, s.momentum, s.weight_decay)?;
    let order = epoch_order(train.len(), s.seed, 0);
    let all = batches(&order, batch, true);
    if all.is_empty() || batch > train.len() {
        return Err(JobError::Other(format!(
            "batch {batch} is larger than the {} training images",
            train.len()
        )));
    }
    let mut first_loss = f64::NAN;
    let mut last_loss = f64::NAN;
    let mut started = Instant::now();
    for i in 0..warmup + steps {
        if i == warmup {
            device.synchronize()?;
            started = Instant::now();
        }
        let (x, y) = make_batch(&train, &all[i % all.len()], None, device)?;
        let logits = net.forward(&x)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        last_loss = loss.to_scalar::<f32>()? as f64;
        if i == 0 {
            first_loss = last_loss;
        }
        if !last_loss.is_finite() {
            return Err(JobError::Other(format!(
                "{model} on {}: loss is {last_loss} at step {i}",
                device_name(device)
            )));
        }
    }
    device.synchronize()?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(StepTiming {
        model: model.to_string(),
        batch,
        device: device_name(device),
        params,
        steps,
        mean_step_s: elapsed / steps as f64,
        first_loss,
        last_loss,
        nfe_forward: net.stats().map(|st| st.nfe_forward),
    })
}

/// What [`data_parallel_throughput`] measured (rank 0's figures, averaged over the ranks).
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingRow {
    /// `resnet` or `odenet`.
    pub model: String,
    /// Ranks (threads of this process).
    pub ranks: usize,
    /// Batch of each rank; the global batch is `batch × ranks`.
    pub batch: usize,
    /// Training steps each rank took.
    pub steps: usize,
    /// Training samples per second over all ranks (steps only: no evaluation).
    pub samples_per_second: f64,
    /// Fraction of a step spent in collectives (gradient all-reduce, metric average, the
    /// stop agreement), waiting for the slowest rank included.
    pub comm_share: f64,
    /// Wall seconds of the whole run (connect, train, evaluate).
    pub wall_seconds: f64,
}

/// The config [`data_parallel_throughput`] trains: the `quick` preset's `model` with
/// `overrides`, one epoch of `steps` steps of `batch` images per rank on `ranks` ranks, a
/// small final evaluation, no checkpoints but the boundary ones, and few logs.
pub fn scaling_config(
    model: &str,
    ranks: usize,
    batch: usize,
    steps: usize,
    overrides: &BTreeMap<String, String>,
) -> Result<ResolvedConfig, JobError> {
    if ranks == 0 || batch == 0 || steps == 0 {
        return Err(JobError::Other(
            "ranks, batch and steps must be at least 1".to_string(),
        ));
    }
    let mut o: BTreeMap<String, String> = [
        ("models", model.to_string()),
        ("epochs", "1".to_string()),
        ("batch_size", batch.to_string()),
        ("train_samples", (steps * batch * ranks).to_string()),
        ("test_samples", "100".to_string()),
        ("eval_batch_size", "100".to_string()),
        ("checkpoint_every", "0".to_string()),
        ("log_every", "1000000".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    o.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(NeuralOdeJob::new().resolve_config("quick", &o)?)
}

/// The [`ScalingRow`] of a run of [`scaling_config`] from rank 0's context.
pub fn scaling_row(
    model: &str,
    ranks: usize,
    batch: usize,
    rank0: &MemoryContext,
    wall_seconds: f64,
) -> Result<ScalingRow, JobError> {
    let metric = |name: &str| {
        rank0
            .last_metric(&format!("{model}/{name}"))
            .ok_or_else(|| JobError::Other(format!("the job reported no {model}/{name}")))
    };
    Ok(ScalingRow {
        model: model.to_string(),
        ranks,
        batch,
        steps: rank0.metric_values(&format!("{model}/train_loss")).len(),
        samples_per_second: metric("samples_per_second")?,
        comm_share: metric("comm_share")?,
        wall_seconds,
    })
}

/// Trains [`scaling_config`] data-parallel on `ranks` threads of this process, each with its
/// own [`MemoryContext`] and a TCP ring over 127.0.0.1, and returns its throughput (the
/// job's `samples_per_second` and `comm_share` metrics). Each rank uses as many CPU threads
/// as `RAYON_NUM_THREADS` says (all CPUs when unset). candle sizes its CPU thread pools once
/// per process and the ranks share them: set the variable before the process's first tensor
/// operation (the `scaling` bench does).
pub fn data_parallel_throughput(
    model: &str,
    ranks: usize,
    batch: usize,
    steps: usize,
    overrides: &BTreeMap<String, String>,
) -> Result<ScalingRow, JobError> {
    let config = scaling_config(model, ranks, batch, steps, overrides)?;
    let job = NeuralOdeJob::new();
    let started = Instant::now();
    let rings = loopback_rings(ranks, "scaling-bench", Default::default())?;
    let contexts: Vec<MemoryContext> = rings
        .into_iter()
        .zip(0u32..)
        .map(|(ring, r)| {
            MemoryContext::new()
                .with_rank(r, ranks as u32)
                .with_communicator(Box::new(ring))
        })
        .collect();
    let results: Vec<Result<(), JobError>> = std::thread::scope(|s| {
        let handles: Vec<_> = contexts
            .iter()
            .map(|ctx| {
                let (job, config) = (&job, &config);
                s.spawn(move || job.run(config, ctx))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(JobError::Other("a rank thread panicked".into())))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    scaling_row(
        model,
        ranks,
        batch,
        &contexts[0],
        started.elapsed().as_secs_f64(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Job;
    use crate::neural_ode::NeuralOdeJob;
    use std::collections::BTreeMap;

    fn tiny() -> ResolvedConfig {
        let o: BTreeMap<String, String> = [("width", "4"), ("groups", "2")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        NeuralOdeJob::new().resolve_config("quick", &o).unwrap()
    }

    #[test]
    fn times_both_models_and_repeats_the_first_loss() {
        let c = tiny();
        for model in ["resnet", "odenet"] {
            let a = time_training_steps(&c, model, 8, 1, 2, &Device::Cpu).unwrap();
            assert_eq!((a.steps, a.batch, a.device.as_str()), (2, 8, "cpu"));
            assert!(a.mean_step_s > 0.0 && a.first_loss.is_finite() && a.params > 0);
            assert_eq!(a.nfe_forward.is_some(), model == "odenet");
            // same seed, same batch: the same loss before the first update
            let b = time_training_steps(&c, model, 8, 0, 1, &Device::Cpu).unwrap();
            assert_eq!(a.first_loss, b.first_loss);
        }
    }

    #[test]
    fn measures_data_parallel_throughput() {
        let o: BTreeMap<String, String> = [("width", "4"), ("groups", "2")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let one = data_parallel_throughput("resnet", 1, 8, 2, &o).unwrap();
        assert_eq!((one.ranks, one.batch, one.steps), (1, 8, 2));
        assert!(one.samples_per_second > 0.0);
        assert_eq!(one.comm_share, 0.0);
        let two = data_parallel_throughput("resnet", 2, 8, 2, &o).unwrap();
        assert_eq!((two.ranks, two.steps), (2, 2));
        assert!(two.comm_share > 0.0 && two.comm_share < 1.0, "{two:?}");
        assert!(data_parallel_throughput("resnet", 0, 8, 2, &o).is_err());
        assert!(scaling_config("resnet", 2, 8, 0, &o).is_err());
    }

    #[test]
    fn bad_arguments_are_errors() {
        let c = tiny();
        assert!(time_training_steps(&c, "resnet", 0, 0, 1, &Device::Cpu).is_err());
        assert!(time_training_steps(&c, "resnet", 8, 0, 0, &Device::Cpu).is_err());
        assert!(time_training_steps(&c, "vgg", 8, 0, 1, &Device::Cpu).is_err());
        assert!(time_training_steps(&c, "resnet", 1_000_000, 0, 1, &Device::Cpu).is_err());
    }
}
