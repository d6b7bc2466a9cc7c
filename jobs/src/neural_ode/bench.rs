//! Training-step timing of the MNIST models on a given device, for `trainyard gpu-check`:
//! the same models, initialisation, data and optimizer as the `mnist` experiment, a few
//! warm-up steps, then the mean wall time of a full step (forward, loss, backward,
//! optimizer update, loss read back to the host, so the device has finished the step).
//!
//! With the same config, seed and batch, the loss before the first update is the same on
//! every device up to rounding: a cheap cross-device correctness check.

use std::time::Instant;

use candle_core::Device;
use rand::RngCore;

use super::mnist::{build_model, Settings};
use crate::config::ResolvedConfig;
use crate::data::{batches, derived_rng, epoch_order, make_batch, mnist_10k};
use crate::job::{device_name, JobError};
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
    fn bad_arguments_are_errors() {
        let c = tiny();
        assert!(time_training_steps(&c, "resnet", 0, 0, 1, &Device::Cpu).is_err());
        assert!(time_training_steps(&c, "resnet", 8, 0, 0, &Device::Cpu).is_err());
        assert!(time_training_steps(&c, "vgg", 8, 0, 1, &Device::Cpu).is_err());
        assert!(time_training_steps(&c, "resnet", 1_000_000, 0, 1, &Device::Cpu).is_err());
    }
}
