//! The brief's 28×28 models: the encoder CNN (the standard classifier with `2k + 1`
//! outputs), the mirrored decoder, the DB-VAE that joins them, the standard CNN (the same
//! encoder with 1 output), and the DB-VAE loss.
//!
//! Encoder: Conv(12, 5, s2, p2) → Conv(24, 5, s2, p2) → Conv(48, 3, s2, p1) →
//! Conv(72, 3, s1, p1), each followed by ReLU and a norm, then flatten → Dense(hidden, ReLU)
//! → Dense(outputs). Outputs: `[0]` the class logit, `[1..k+1]` μ, `[k+1..]` the log-variance.
//!
//! Decoder: Dense(4·4·72, ReLU) → reshape → ConvT(48, 3, s2, p1) → ReLU → ConvT(24, 4, s2,
//! p1) → ReLU → ConvT(1, 4, s2, p1) → sigmoid: 4 → 7 → 14 → 28.
//!
//! The norm is GroupNorm (4 groups) where the lab has BatchNorm: it does not depend on the
//! batch, so two ranks of batch `B` take the steps of one rank of batch `2B` and no running
//! statistics need synchronising or checkpointing.

use candle_core::{Result, Tensor, D};
use candle_nn::{Module, VarBuilder};

use crate::nn::Linear;

use crate::nn::{GemmConv2d, GemmConvTranspose2d, GroupNorm};

/// Channels of the encoder's convolutions (the decoder mirrors them).
pub const CHANNELS: [usize; 4] = [12, 24, 48, 72];
/// GroupNorm groups after each convolution.
pub const GROUPS: usize = 4;
/// Side of the encoder's last feature map (28 → 14 → 7 → 4 → 4).
pub const FEATURE_SIDE: usize = 4;

/// The encoder CNN.
#[derive(Debug, Clone)]
pub struct Encoder {
    convs: Vec<(GemmConv2d, GroupNorm)>,
    fc1: Linear,
    fc2: Linear,
}

impl Encoder {
    /// The encoder with `outputs` outputs and a hidden dense layer of `hidden` units.
    pub fn new(outputs: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        // (c_in, c_out, kernel, stride, padding)
        let specs = [
            (1, CHANNELS[0], 5, 2, 2),
            (CHANNELS[0], CHANNELS[1], 5, 2, 2),
            (CHANNELS[1], CHANNELS[2], 3, 2, 1),
            (CHANNELS[2], CHANNELS[3], 3, 1, 1),
        ];
        let mut convs = Vec::new();
        for (i, (ci, co, k, s, p)) in specs.into_iter().enumerate() {
            let conv = GemmConv2d::new(ci, co, k, s, p, true, vb.pp(format!("conv{}", i + 1)))?;
            let norm = GroupNorm::new(GROUPS, co, 1e-5, vb.pp(format!("norm{}", i + 1)))?;
            convs.push((conv, norm));
        }
        let flat = CHANNELS[3] * FEATURE_SIDE * FEATURE_SIDE;
        Ok(Self {
            convs,
            fc1: crate::nn::linear(flat, hidden, vb.pp("fc1"))?,
            fc2: crate::nn::linear(hidden, outputs, vb.pp("fc2"))?,
        })
    }

    /// Images `[B, 1, 28, 28]` → `[B, outputs]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (conv, norm) in &self.convs {
            h = norm.forward(&conv.forward(&h)?.relu()?)?;
        }
        let h = self.fc1.forward(&h.flatten_from(1)?)?.relu()?;
        self.fc2.forward(&h)
    }
}

/// The decoder: latent `[B, k]` → images `[B, 1, 28, 28]` in `(0, 1)`.
#[derive(Debug, Clone)]
pub struct Decoder {
    fc: Linear,
    deconvs: Vec<GemmConvTranspose2d>,
}

impl Decoder {
    /// The decoder of a `latent`-dimensional code.
    pub fn new(latent: usize, vb: VarBuilder) -> Result<Self> {
        let flat = CHANNELS[3] * FEATURE_SIDE * FEATURE_SIDE;
        // (c_in, c_out, kernel): stride 2, padding 1
        let specs = [
            (CHANNELS[3], CHANNELS[2], 3),
            (CHANNELS[2], CHANNELS[1], 4),
            (CHANNELS[1], 1, 4),
        ];
        let mut deconvs = Vec::new();
        for (i, (ci, co, k)) in specs.into_iter().enumerate() {
            deconvs.push(GemmConvTranspose2d::new(
                ci,
                co,
                k,
                2,
                1,
                true,
                vb.pp(format!("deconv{}", i + 1)),
            )?);
        }
        Ok(Self {
            fc: crate::nn::linear(latent, flat, vb.pp("fc"))?,
            deconvs,
        })
    }

    /// Latent codes `[B, k]` → reconstructions `[B, 1, 28, 28]`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let b = z.dim(0)?;
        let mut h =
            self.fc
                .forward(z)?
                .relu()?
                .reshape((b, CHANNELS[3], FEATURE_SIDE, FEATURE_SIDE))?;
        let last = self.deconvs.len() - 1;
        for (i, d) in self.deconvs.iter().enumerate() {
            h = d.forward(&h)?;
            h = if i < last {
                h.relu()?
            } else {
                candle_nn::ops::sigmoid(&h)?
            };
        }
        Ok(h)
    }
}

/// What the DB-VAE's encoder outputs for a batch.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Class logits `[B]` (digit vs not).
    pub logit: Tensor,
    /// Latent means `[B, k]`.
    pub mu: Tensor,
    /// Latent log-variances `[B, k]`.
    pub logvar: Tensor,
}

/// The debiasing VAE: the encoder with `2k + 1` outputs and the decoder.
#[derive(Debug, Clone)]
pub struct DbVae {
    encoder: Encoder,
    decoder: Decoder,
    latent: usize,
}

impl DbVae {
    /// A DB-VAE with a `latent`-dimensional code and a `hidden`-unit dense layer.
    pub fn new(latent: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            encoder: Encoder::new(2 * latent + 1, hidden, vb.pp("encoder"))?,
            decoder: Decoder::new(latent, vb.pp("decoder"))?,
            latent,
        })
    }

    /// The latent size `k`.
    pub fn latent(&self) -> usize {
        self.latent
    }

    /// Encodes `x` `[B, 1, 28, 28]` into the class logit, μ and log-variance.
    pub fn encode(&self, x: &Tensor) -> Result<Encoded> {
        let out = self.encoder.forward(x)?;
        let k = self.latent;
        Ok(Encoded {
            logit: out.narrow(1, 0, 1)?.squeeze(1)?,
            mu: out.narrow(1, 1, k)?,
            logvar: out.narrow(1, 1 + k, k)?,
        })
    }

    /// Decodes latent codes `[B, k]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder.forward(z)
    }

    /// The class logits `[B]` alone (evaluation).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.encode(x)?.logit)
    }
}

/// The standard CNN: the same encoder with 1 output.
#[derive(Debug, Clone)]
pub struct Classifier {
    encoder: Encoder,
}

impl Classifier {
    /// The classifier with a `hidden`-unit dense layer.
    pub fn new(hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            encoder: Encoder::new(1, hidden, vb.pp("encoder"))?,
        })
    }

    /// Class logits `[B]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.encoder.forward(x)?.squeeze(1)
    }
}

/// Per-sample sigmoid cross-entropy of logits `[B]` against targets `[B]` in {0, 1}:
/// `max(x, 0) − x·y + log(1 + exp(−|x|))`.
pub fn bce_with_logits(logit: &Tensor, target: &Tensor) -> Result<Tensor> {
    let softplus = (logit.abs()?.neg()?.exp()? + 1.0)?.log()?;
    (logit.relu()? - (logit * target)?)? + softplus
}

/// The parts of a batch's loss.
#[derive(Debug, Clone)]
pub struct LossParts {
    /// `mean_batch[L_y + 1[y = 1]·L_VAE]`, the scalar to minimise.
    pub total: Tensor,
    /// Mean classification loss over the batch.
    pub class: f64,
    /// Mean KL over the positives (0 without positives).
    pub kl: f64,
    /// Mean L1 reconstruction error over the positives (0 without positives).
    pub recon: f64,
}

/// The DB-VAE loss of a batch `x` with class labels `labels` (1 a positive): the sigmoid
/// cross-entropy on every sample, plus on the positives only `c·KL + mean |x − x̂|`, where
/// `x̂` decodes `z = μ + exp(½·logvar)·ε` with the noise `eps` `[positives, k]`; the sum is
/// divided by the batch size. The decoder runs on the positives alone.
pub fn dbvae_loss(
    model: &DbVae,
    x: &Tensor,
    labels: &[u8],
    eps: &Tensor,
    kl_weight: f64,
) -> Result<LossParts> {
    let b = labels.len();
    let enc = model.encode(x)?;
    let target = Tensor::from_vec(
        labels
            .iter()
            .map(|l| (*l == 1) as u8 as f32)
            .collect::<Vec<_>>(),
        b,
        x.device(),
    )?;
    let class = bce_with_logits(&enc.logit, &target)?;
    let class_sum = class.sum_all()?;
    let class_mean = class_sum.to_scalar::<f32>()? as f64 / b.max(1) as f64;
    let pos: Vec<u32> = (0..b as u32).filter(|&i| labels[i as usize] == 1).collect();
    if pos.is_empty() {
        return Ok(LossParts {
            total: (class_sum / b.max(1) as f64)?,
            class: class_mean,
            kl: 0.0,
            recon: 0.0,
        });
    }
    let idx = Tensor::from_vec(pos.clone(), pos.len(), x.device())?;
    let mu = enc.mu.contiguous()?.index_select(&idx, 0)?;
    let logvar = enc.logvar.contiguous()?.index_select(&idx, 0)?;
    let xp = x.index_select(&idx, 0)?;
    let z = (&mu + (logvar.affine(0.5, 0.0)?.exp()? * eps)?)?;
    let x_hat = model.decode(&z)?;
    // KL(N(μ, σ²) ‖ N(0, 1)) per sample, and the mean L1 error per sample
    let kl = ((logvar.exp()? + mu.sqr()?)? - logvar)?
        .affine(1.0, -1.0)?
        .sum(D::Minus1)?
        .affine(0.5, 0.0)?;
    let recon = (xp - x_hat)?.abs()?.flatten_from(1)?.mean(D::Minus1)?;
    let vae_sum = ((kl.clone() * kl_weight)? + &recon)?.sum_all()?;
    let n_pos = pos.len() as f64;
    Ok(LossParts {
        total: ((class_sum + vae_sum)? / b as f64)?,
        class: class_mean,
        kl: kl.sum_all()?.to_scalar::<f32>()? as f64 / n_pos,
        recon: recon.sum_all()?.to_scalar::<f32>()? as f64 / n_pos,
    })
}

/// The standard CNN's loss: the mean sigmoid cross-entropy.
pub fn classifier_loss(model: &Classifier, x: &Tensor, labels: &[u8]) -> Result<Tensor> {
    let target = Tensor::from_vec(
        labels
            .iter()
            .map(|l| (*l == 1) as u8 as f32)
            .collect::<Vec<_>>(),
        labels.len(),
        x.device(),
    )?;
    bce_with_logits(&model.forward(x)?, &target)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn images(b: usize, seed: u32) -> Tensor {
        let v: Vec<f32> = (0..b * 784)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 1000.0
            })
            .collect();
        Tensor::from_vec(v, (b, 1, 28, 28), &Device::Cpu).unwrap()
    }

    fn dbvae(k: usize) -> (DbVae, VarMap) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        (DbVae::new(k, 32, vb).unwrap(), vm)
    }

    #[test]
    fn forward_shapes() {
        let (m, vm) = dbvae(6);
        let x = images(3, 0);
        let e = m.encode(&x).unwrap();
        assert_eq!(e.logit.dims(), &[3]);
        assert_eq!(e.mu.dims(), &[3, 6]);
        assert_eq!(e.logvar.dims(), &[3, 6]);
        let r = m.decode(&e.mu).unwrap();
        assert_eq!(r.dims(), &[3, 1, 28, 28]);
        let v = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|p| *p > 0.0 && *p < 1.0));
        assert_eq!(m.forward(&x).unwrap().dims(), &[3]);
        assert_eq!(m.latent(), 6);
        assert!(crate::train::count_params(&vm) > 1000);

        let vm = VarMap::new();
        let c =
            Classifier::new(32, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        assert_eq!(c.forward(&x).unwrap().dims(), &[3]);
        let l = classifier_loss(&c, &x, &[1, 0, 1]).unwrap();
        assert!(l.to_scalar::<f32>().unwrap() > 0.0);
    }

    #[test]
    fn bce_matches_the_formula() {
        let x = Tensor::new(&[-2.0f32, 0.0, 3.0], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0.0f32, 1.0, 1.0], &Device::Cpu).unwrap();
        let l = bce_with_logits(&x, &y).unwrap().to_vec1::<f32>().unwrap();
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let want = [-(1.0 - sig(-2.0)).ln(), -sig(0.0).ln(), -sig(3.0).ln()];
        for (a, b) in l.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn the_vae_terms_count_positives_only() {
        let (m, vm) = dbvae(4);
        let eps = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        // negatives only: the loss is the classification loss alone
        let none = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
        let p = dbvae_loss(&m, &images(3, 1), &[0, 0, 0], &none, 5e-4).unwrap();
        let total = p.total.to_scalar::<f32>().unwrap() as f64;
        assert!((total - p.class).abs() < 1e-5 && p.kl == 0.0 && p.recon == 0.0);

        // two positives (rows 0 and 2) and two negatives
        let x = images(4, 2);
        let labels = [1, 0, 1, 0];
        let p = dbvae_loss(&m, &x, &labels, &eps, 5e-4).unwrap();
        let total = p.total.to_scalar::<f32>().unwrap() as f64;
        let want = p.class + 2.0 * (5e-4 * p.kl + p.recon) / 4.0;
        assert!((total - want).abs() < 1e-5, "{total} vs {want}");
        assert!(p.kl >= 0.0 && p.recon > 0.0);
        // changing the negatives' pixels leaves the VAE terms alone
        let rows: Vec<Tensor> = (0..4)
            .map(|i| {
                let src = if labels[i] == 1 { &x } else { &images(4, 99) };
                src.narrow(0, i, 1).unwrap()
            })
            .collect();
        let x2 = Tensor::cat(&rows, 0).unwrap();
        let q = dbvae_loss(&m, &x2, &labels, &eps, 5e-4).unwrap();
        assert!((q.kl - p.kl).abs() < 1e-6 && (q.recon - p.recon).abs() < 1e-6);
        // and every parameter gets a gradient (the decoder's through the positives)
        let grads = p.total.backward().unwrap();
        crate::train::check_grads(&crate::train::named_vars(&vm), &grads).unwrap();
    }
}
