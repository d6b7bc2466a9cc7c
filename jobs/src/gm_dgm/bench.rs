//! Training-step timing of the job's two models (M2 and the GM-DGM) on the CPU, for the
//! `steps` bench (ours against PyTorch).
//!
//! [`GmDgmStep`] builds the model the job trains (the same [`SemiVae`], sizes, class prior,
//! initialisation and Adam) and takes the job's step: `batch_size` labelled plus
//! `batch_size` unlabelled binarised images, the loss with the unlabelled bound summed
//! exactly over all `n_y` components, the weight prior, backward, element-wise clipping and
//! the Adam update. The data are the job's own ([`Data::prepare`]: pixels kept by
//! training-set std, the label split, dynamic binarisation); only the draw of the batch
//! (uniform, with replacement) is the bench's: a step costs the same whichever images it
//! draws.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::Rng;

use super::models::{class_prior, init_params, normal_noise, Dims, Kind, SemiVae};
use super::schema::{masked_classes, BUILTIN_FASHION, CLASSES};
use super::train::{Data, Settings};
use crate::config::ResolvedConfig;
use crate::data::{derived_rng, fashion_mnist_12k};
use crate::job::JobError;
use crate::train::{count_params, named_vars, Adam};

/// One of the job's models set up to take training steps.
pub struct GmDgmStep {
    model: SemiVae,
    vars: Vec<(String, Var)>,
    weights: Vec<Tensor>,
    opt: Adam,
    dims: Dims,
    /// The job's own preprocessing: kept pixels, the label split.
    data: Data,
    batch: usize,
    alpha: f64,
    l2_reg: f64,
    clip: f64,
    seed: u64,
    next: u64,
    params: usize,
}

impl GmDgmStep {
    /// `model` (`m2` or `gmdgm`) of the `config` (a resolved `gm-dgm` config; only the
    /// built-in data set is supported).
    pub fn new(config: &ResolvedConfig, model: &str) -> Result<Self, JobError> {
        let kind = Kind::from_name(model)
            .ok_or_else(|| JobError::Other(format!("unknown gm-dgm model {model}")))?;
        if config.get_str("dataset")? != BUILTIN_FASHION {
            return Err(JobError::Other(format!(
                "the bench trains on {BUILTIN_FASHION} only"
            )));
        }
        let (train, test) = fashion_mnist_12k().map_err(|e| JobError::Data(e.to_string()))?;
        let train = train.take(config.get_usize("train_samples")?);
        let data = Data::prepare(&train, &test, &Settings::from_config(config)?);
        let masked = masked_classes(config)?;
        let extra = config.get_usize("extra_components")?;
        let dims = Dims {
            x: data.n_x,
            y: CLASSES + extra,
            z: config.get_usize("latent")?,
            h: config.get_usize("hidden")?,
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = SemiVae::new(kind, dims, &class_prior(CLASSES, &masked, extra), vb)?;
        let seed = config.get_u64("seed")?;
        init_params(&varmap, derived_rng(seed, 3, 0, 0).random())?;
        let vars = named_vars(&varmap);
        let weights = vars
            .iter()
            .filter(|(n, _)| n.ends_with(".weight"))
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        let opt = Adam::new(vars.clone(), config.get_f64("lr")?, 0.0);
        Ok(Self {
            model,
            vars,
            weights,
            opt,
            dims,
            data,
            batch: config.get_usize("batch_size")?,
            alpha: config.get_f64("alpha")?,
            l2_reg: config.get_f64("l2_reg")?,
            clip: config.get_f64("clip")?,
            seed,
            next: 0,
            params: count_params(&varmap),
        })
    }

    /// Labelled (and, as many, unlabelled) images per step.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The model's sizes (`n_x` is the pixels kept).
    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// Trainable parameters.
    pub fn params(&self) -> usize {
        self.params
    }

    /// One training step; returns its loss (before the update).
    pub fn step(&mut self) -> Result<f64, JobError> {
        let dev = Device::Cpu;
        let mut rng = derived_rng(self.seed, 7, self.next, 0);
        self.next += 1;
        let pick = |pool: &[usize], rng: &mut StdRng| -> Vec<usize> {
            (0..self.batch)
                .map(|_| pool[rng.random_range(0..pool.len())])
                .collect()
        };
        let l_idx = pick(&self.data.labelled, &mut rng);
        let u_idx = pick(&self.data.unlabelled, &mut rng);
        let (xl, yl) = self.data.train_batch(&l_idx, &mut rng, &dev)?;
        let (xu, _) = self.data.train_batch(&u_idx, &mut rng, &dev)?;
        let (ny, nz) = (self.dims.y, self.dims.z);
        let eps_l = normal_noise(l_idx.len(), nz, &mut rng, &dev)?;
        let eps_u = normal_noise(u_idx.len() * ny, nz, &mut rng, &dev)?;
        let losses = self.model.loss(&xl, &yl, &eps_l, &xu, &eps_u, self.alpha)?;
        let mut sq = Vec::with_capacity(self.weights.len());
        for w in &self.weights {
            sq.push(w.sqr()?.sum_all()?);
        }
        let n_train = self.data.train_len() as f64;
        let prior = (Tensor::stack(&sq, 0)?.sum_all()? * (0.5 * self.l2_reg / n_train))?;
        let total = (&losses.total + prior)?;
        let mut grads = total.backward()?;
        for (_, v) in &self.vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let mut g = g.detach();
                if self.clip > 0.0 {
                    g = g.clamp(-self.clip, self.clip)?;
                }
                grads.insert(v.as_tensor(), g);
            }
        }
        let loss = total.to_scalar::<f32>()? as f64;
        self.opt.step(&grads)?;
        Ok(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gm_dgm::GmDgmJob;
    use crate::job::Job;
    use std::collections::BTreeMap;

    #[test]
    fn both_models_take_finite_bench_steps() {
        let o: BTreeMap<String, String> = [("hidden", "16"), ("latent", "4"), ("batch_size", "8")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let c = GmDgmJob::new().resolve_config("quick", &o).unwrap();
        for model in ["m2", "gmdgm"] {
            let mut s = GmDgmStep::new(&c, model).unwrap();
            assert_eq!(s.batch(), 8);
            assert!(s.dims().x > 100 && s.dims().x <= 784 && s.params() > 0);
            assert!(s.step().unwrap().is_finite());
            assert!(s.step().unwrap().is_finite());
        }
        assert!(GmDgmStep::new(&c, "vae").is_err());
    }
}
