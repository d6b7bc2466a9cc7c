//! Training-step timing of the MNIST models on a given device, for `trainyard gpu-check`:
//! the same models, initialisation, data and optimizer as the `mnist` experiment, a few
//! warm-up steps, then the mean wall time of a full step (forward, loss, backward,
//! optimizer update, loss read back to the host, so the device has finished the step).
//!
//! With the same config, seed and batch, the loss before the first update is the same on
//! every device up to rounding: a cheap cross-device correctness check.
//!
//! [`MnistStep`], [`CnfStep`] and [`LatentStep`] take single training steps of every model
//! of the three experiments on the CPU, for the `steps` bench (ours against PyTorch).
//!
//! [`data_parallel_throughput`] measures data-parallel scaling instead: the whole job,
//! trained by `n` ranks that are threads of this process joined by a TCP ring over
//! loopback (`cargo bench -p trainyard-jobs --bench scaling` prints the table).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::RngCore;
use rand_distr::{Distribution, Normal};

use super::cnf::{Cnf, PlanarFlow};
use super::latent::{self, observed_subsets, spirals, LatentOde, RnnBaseline, Spirals, N_OBS};
use super::mnist::{build_model, Settings};
use super::toy2d::{to_tensor, Density};
use crate::config::ResolvedConfig;
use crate::data::{batches, derived_rng, epoch_order, make_batch, mnist_10k};
use crate::job::{device_name, Job, JobError};
use crate::neural_ode::NeuralOdeJob;
use crate::ode::Dopri5Options;
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

/// One model of the `mnist` experiment set up to take training steps: the job's model,
/// initialisation, optimizer and data, cycling through the shuffled batches of the first
/// epoch. Each [`MnistStep::step`] is a full step (batch, forward, loss, backward,
/// optimizer update, loss read back to the host).
pub struct MnistStep {
    net: super::mnist::Model,
    opt: Optimizer,
    train: crate::data::ImageDataset,
    batches: Vec<Vec<usize>>,
    next: usize,
    device: Device,
    params: usize,
}

impl MnistStep {
    /// `model` (`resnet` or `odenet`) of the experiment `config` describes (width, groups,
    /// solver, optimizer, lr, seed), stepping on batches of `batch` images on `device`.
    pub fn new(
        config: &ResolvedConfig,
        model: &str,
        batch: usize,
        device: &Device,
    ) -> Result<Self, JobError> {
        let s = Settings::from_config(config)?;
        if batch == 0 {
            return Err(JobError::Other("batch must be at least 1".to_string()));
        }
        let (train, _) = mnist_10k().map_err(|e| JobError::Data(e.to_string()))?;
        let (net, varmap) = build_model(model, &s, device)?;
        init_pytorch_style(&varmap, derived_rng(s.seed, 3, 0, 0).next_u64())?;
        let vars = named_vars(&varmap);
        let params = count_params(&varmap);
        let opt = Optimizer::by_name(&s.optimizer, vars, s.lr, s.momentum, s.weight_decay)?;
        let order = epoch_order(train.len(), s.seed, 0);
        let batches = batches(&order, batch, true);
        if batches.is_empty() || batch > train.len() {
            return Err(JobError::Other(format!(
                "batch {batch} is larger than the {} training images",
                train.len()
            )));
        }
        Ok(Self {
            net,
            opt,
            train,
            batches,
            next: 0,
            device: device.clone(),
            params,
        })
    }

    /// Trainable parameters.
    pub fn params(&self) -> usize {
        self.params
    }

    /// One training step; returns its loss (before the update).
    pub fn step(&mut self) -> Result<f64, JobError> {
        let idx = &self.batches[self.next % self.batches.len()];
        self.next += 1;
        let (x, y) = make_batch(&self.train, idx, None, &self.device)?;
        let logits = self.net.forward(&x)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let grads = loss.backward()?;
        self.opt.step(&grads)?;
        Ok(loss.to_scalar::<f32>()? as f64)
    }

    /// Forward NFE of the last step (ODE-Net only).
    pub fn nfe_forward(&self) -> Option<usize> {
        self.net.stats().map(|st| st.nfe_forward)
    }
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
    if batch == 0 || steps == 0 {
        return Err(JobError::Other(
            "batch and steps must be at least 1".to_string(),
        ));
    }
    let mut run = MnistStep::new(config, model, batch, device)?;
    let mut first_loss = f64::NAN;
    let mut last_loss = f64::NAN;
    let mut started = Instant::now();
    for i in 0..warmup + steps {
        if i == warmup {
            device.synchronize()?;
            started = Instant::now();
        }
        last_loss = run.step()?;
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
        params: run.params(),
        steps,
        mean_step_s: elapsed / steps as f64,
        first_loss,
        last_loss,
        nfe_forward: run.nfe_forward(),
    })
}

/// The `cnf` experiment's models set up to take training steps on the CPU: the CNF
/// (`cnf`: time hypernetwork, exact trace, dopri5 from `cnf_t1` to 0 at `cnf_tol`) or the
/// planar flow (`planar`), with the job's sizes, initialisation and Adam, each step on
/// `cnf_batch_size` fresh samples of the eight Gaussians. A step: sample, forward
/// (`-mean log p(x)`), backward, Adam update, loss read back.
pub struct CnfStep {
    model: CnfModel,
    opt: Optimizer,
    batch: usize,
    seed: u64,
    next: u64,
}

enum CnfModel {
    Cnf(Box<Cnf>),
    Planar(PlanarFlow),
}

impl CnfStep {
    /// `model` (`cnf` or `planar`) of the `cnf` experiment `config` describes.
    pub fn new(config: &ResolvedConfig, model: &str) -> Result<Self, JobError> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = match model {
            "cnf" => {
                let tol = config.get_f64("cnf_tol")?;
                CnfModel::Cnf(Box::new(Cnf::new(
                    config.get_usize("cnf_width")?,
                    config.get_usize("cnf_hidden")?,
                    config.get_f64("cnf_t1")?,
                    Dopri5Options::new(tol, tol),
                    vb.pp("cnf"),
                )?))
            }
            "planar" => CnfModel::Planar(PlanarFlow::new(
                config.get_usize("cnf_planar_layers")?,
                vb.pp("planar"),
            )?),
            other => return Err(JobError::Other(format!("unknown cnf model {other}"))),
        };
        let seed = config.get_u64("seed")?;
        init_pytorch_style(&varmap, derived_rng(seed, 3, 0, 0).next_u64())?;
        let opt = Optimizer::by_name(
            "adam",
            named_vars(&varmap),
            config.get_f64("cnf_lr")?,
            0.0,
            0.0,
        )?;
        Ok(Self {
            model,
            opt,
            batch: config.get_usize("cnf_batch_size")?,
            seed,
            next: 0,
        })
    }

    /// Samples per step.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// One training step; returns its loss (before the update).
    pub fn step(&mut self) -> Result<f64, JobError> {
        let mut rng = derived_rng(self.seed, 0x5ca1, self.next, 0);
        self.next += 1;
        let x = to_tensor(
            &Density::Gaussians.sample(self.batch, &mut rng),
            &Device::Cpu,
        )?;
        let log_p = match &self.model {
            CnfModel::Cnf(m) => m.log_prob(&x)?,
            CnfModel::Planar(m) => m.log_prob(&x)?,
        };
        let loss = log_p.mean_all()?.neg()?;
        let grads = loss.backward()?;
        self.opt.step(&grads)?;
        Ok(loss.to_scalar::<f32>()? as f64)
    }

    /// Forward NFE of the last step (CNF only).
    pub fn nfe_forward(&self) -> Option<usize> {
        match &self.model {
            CnfModel::Cnf(m) => Some(m.last_stats().nfe_forward),
            CnfModel::Planar(_) => None,
        }
    }
}

/// The `latent-ode` experiment's models set up to take training steps on the CPU: the
/// latent ODE (`latent_ode`: negative ELBO, RK4 one step per interval of the 150-point
/// grid) or the RNN baseline (`rnn`: teacher-forced MSE), with the job's sizes,
/// initialisation and Adam, full batch of the `latent_train` training spirals; the
/// observation count cycles through 30, 50 and 100 from step to step as in the job. A step:
/// batch, forward, backward, Adam update, loss read back.
pub struct LatentStep {
    ode: Option<LatentOde>,
    rnn: Option<RnnBaseline>,
    opt: Optimizer,
    data: Spirals,
    subsets: Vec<Vec<Vec<usize>>>,
    noise: f64,
    seed: u64,
    next: u64,
}

impl LatentStep {
    /// `model` (`latent_ode` or `rnn`) of the `latent-ode` experiment `config` describes.
    pub fn new(config: &ResolvedConfig, model: &str) -> Result<Self, JobError> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let (ode, rnn) = match model {
            "latent_ode" => (Some(LatentOde::new(4, 25, 20, vb.pp("latent"))?), None),
            "rnn" => (None, Some(RnnBaseline::new(25, vb.pp("rnn"))?)),
            other => return Err(JobError::Other(format!("unknown latent-ode model {other}"))),
        };
        let seed = config.get_u64("seed")?;
        init_pytorch_style(&varmap, derived_rng(seed, 70, 0, 0).next_u64())?;
        let opt = Optimizer::by_name(
            "adam",
            named_vars(&varmap),
            config.get_f64("latent_lr")?,
            0.0,
            0.0,
        )?;
        let noise = config.get_f64("latent_noise")?;
        let data = spirals(config.get_usize("latent_train")?, noise, seed, 0);
        let subsets = N_OBS
            .iter()
            .map(|&k| observed_subsets(data.n, k, seed, 0))
            .collect();
        Ok(Self {
            ode,
            rnn,
            opt,
            data,
            subsets,
            noise,
            seed,
            next: 0,
        })
    }

    /// Spirals per step.
    pub fn batch(&self) -> usize {
        self.data.n
    }

    /// One training step; returns its loss (before the update).
    pub fn step(&mut self) -> Result<f64, JobError> {
        let dev = Device::Cpu;
        let which = (self.next % N_OBS.len() as u64) as usize;
        let rows: Vec<usize> = (0..self.data.n).collect();
        let b = latent::make_batch(&self.data, &rows, N_OBS[which], &self.subsets[which], &dev)?;
        let loss = if let Some(ode) = &self.ode {
            let mut rng = derived_rng(self.seed, 80, self.next, 0);
            let normal = Normal::new(0.0f32, 1.0).map_err(|e| JobError::Other(e.to_string()))?;
            let eps: Vec<f32> = (0..rows.len() * 4)
                .map(|_| normal.sample(&mut rng))
                .collect();
            let eps = Tensor::from_vec(eps, (rows.len(), 4), &dev)?;
            ode.neg_elbo(
                &b.xs,
                &b.targets,
                &b.mask,
                &self.data.ts,
                &eps,
                self.noise.max(1e-3),
            )?
        } else if let Some(rnn) = &self.rnn {
            rnn.loss(&b.targets, &b.observed, &self.data.ts)?
        } else {
            return Err(JobError::Other("no model".to_string()));
        };
        self.next += 1;
        let grads = loss.backward()?;
        self.opt.step(&grads)?;
        Ok(loss.to_scalar::<f32>()? as f64)
    }
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
    fn cnf_and_latent_models_take_finite_steps() {
        let o: BTreeMap<String, String> = [
            ("cnf_width", "4"),
            ("cnf_hidden", "4"),
            ("cnf_planar_layers", "3"),
            ("cnf_batch_size", "16"),
            ("latent_train", "6"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = NeuralOdeJob::new().resolve_config("quick", &o).unwrap();
        for model in ["cnf", "planar"] {
            let mut s = CnfStep::new(&c, model).unwrap();
            assert_eq!(s.batch(), 16);
            assert!(s.step().unwrap().is_finite() && s.step().unwrap().is_finite());
            assert_eq!(s.nfe_forward().is_some(), model == "cnf");
        }
        for model in ["latent_ode", "rnn"] {
            let mut s = LatentStep::new(&c, model).unwrap();
            assert_eq!(s.batch(), 6);
            for _ in 0..3 {
                assert!(s.step().unwrap().is_finite());
            }
        }
        assert!(CnfStep::new(&c, "realnvp").is_err());
        assert!(LatentStep::new(&c, "gru").is_err());
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
