//! Training-step timing of the job's two models (the standard CNN and the DB-VAE) on the
//! CPU, for the `steps` bench (ours against PyTorch).
//!
//! [`DbVaeStep`] builds the model the job trains ([`Classifier`] or [`DbVae`] with the
//! config's sizes, PyTorch-style initialisation and Adam) and takes the job's step on a
//! batch of `batch_size` images, half positives (digits of the built-in MNIST, label 1)
//! and half negatives (built-in Fashion-MNIST, label 0): the loss ([`classifier_loss`], or
//! [`dbvae_loss`] whose decoder runs on the positives with fresh noise), backward, Adam.
//! The job's resampling of the positives only decides which digits a batch holds, so the
//! bench takes them in order.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::RngCore;
use rand_distr::{Distribution, StandardNormal};

use super::models::{classifier_loss, dbvae_loss, Classifier, DbVae};
use crate::config::ResolvedConfig;
use crate::data::{derived_rng, fashion_mnist_12k, mnist_10k, ImageDataset};
use crate::job::JobError;
use crate::train::{count_params, init_pytorch_style, named_vars, Optimizer};

enum Net {
    Cnn(Classifier),
    Vae(DbVae),
}

/// One of the job's models set up to take training steps.
pub struct DbVaeStep {
    net: Net,
    opt: Optimizer,
    positives: ImageDataset,
    negatives: ImageDataset,
    batch: usize,
    kl_weight: f64,
    seed: u64,
    next: usize,
    params: usize,
}

impl DbVaeStep {
    /// `model` (`cnn` or `dbvae`) of the `config` (a resolved `db-vae` config).
    pub fn new(config: &ResolvedConfig, model: &str) -> Result<Self, JobError> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let hidden = config.get_usize("hidden")?;
        let net = match model {
            "cnn" => Net::Cnn(Classifier::new(hidden, vb)?),
            "dbvae" => Net::Vae(DbVae::new(config.get_usize("latent_dim")?, hidden, vb)?),
            other => return Err(JobError::Other(format!("unknown db-vae model {other}"))),
        };
        let seed = config.get_u64("seed")?;
        init_pytorch_style(&varmap, derived_rng(seed, 3, 0, 0).next_u64())?;
        let opt = Optimizer::by_name("adam", named_vars(&varmap), config.get_f64("lr")?, 0.0, 0.0)?;
        let (positives, _) = mnist_10k().map_err(|e| JobError::Data(e.to_string()))?;
        let (negatives, _) = fashion_mnist_12k().map_err(|e| JobError::Data(e.to_string()))?;
        Ok(Self {
            net,
            opt,
            positives,
            negatives,
            batch: config.get_usize("batch_size")?,
            kl_weight: config.get_f64("kl_weight")?,
            seed,
            next: 0,
            params: count_params(&varmap),
        })
    }

    /// Images per step (half positives).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Trainable parameters.
    pub fn params(&self) -> usize {
        self.params
    }

    /// One training step; returns its loss (before the update).
    pub fn step(&mut self) -> Result<f64, JobError> {
        let dev = Device::Cpu;
        let n_pos = self.batch / 2;
        let mut pixels = Vec::with_capacity(self.batch * 28 * 28);
        let mut labels = Vec::with_capacity(self.batch);
        for j in 0..self.batch {
            let (ds, label) = if j < n_pos {
                (&self.positives, 1u8)
            } else {
                (&self.negatives, 0u8)
            };
            let i = (self.next * self.batch + j) % ds.len();
            pixels.extend(ds.image(i).iter().map(|p| *p as f32 / 255.0));
            labels.push(label);
        }
        let x = Tensor::from_vec(pixels, (self.batch, 1, 28, 28), &dev)?;
        let loss = match &self.net {
            Net::Cnn(m) => classifier_loss(m, &x, &labels)?,
            Net::Vae(m) => {
                let mut rng = derived_rng(self.seed, 30, self.next as u64, 0);
                let eps: Vec<f32> = (0..n_pos * m.latent())
                    .map(|_| StandardNormal.sample(&mut rng))
                    .collect();
                let eps = Tensor::from_vec(eps, (n_pos, m.latent()), &dev)?;
                dbvae_loss(m, &x, &labels, &eps, self.kl_weight)?.total
            }
        };
        self.next += 1;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        self.opt.step(&grads)?;
        Ok(loss_v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db_vae::DbVaeJob;
    use crate::job::Job;
    use std::collections::BTreeMap;

    #[test]
    fn both_models_take_finite_bench_steps() {
        let o: BTreeMap<String, String> =
            [("hidden", "8"), ("latent_dim", "2"), ("batch_size", "4")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let c = DbVaeJob::new().resolve_config("quick", &o).unwrap();
        for model in ["cnn", "dbvae"] {
            let mut s = DbVaeStep::new(&c, model).unwrap();
            assert_eq!(s.batch(), 4);
            assert!(s.params() > 0);
            assert!(s.step().unwrap().is_finite());
            assert!(s.step().unwrap().is_finite());
        }
        assert!(DbVaeStep::new(&c, "vgg").is_err());
    }
}
