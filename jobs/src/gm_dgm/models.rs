//! M2 (Kingma et al. 2014) and the GM-DGM (Willetts et al.): semi-supervised VAEs with a
//! discrete class variable `y` of `n_y` components and a Gaussian latent `z`.
//!
//! | Model  | generative model            | inference          |
//! |--------|-----------------------------|--------------------|
//! | M2     | p(y) N(z; 0, I) p(x\|y,z)   | q(y\|x) q(z\|x,y)  |
//! | GM-DGM | p(y) p(z\|y) p(x\|z)        | q(y\|x) q(z\|x,y)  |
//!
//! In the GM-DGM `p(z|y) = N(μ_y, diag exp(logvar_y))` with `μ_y`, `logvar_y` linear in the
//! one-hot `y`, and the decoder does not see `y`: the latent is a Gaussian mixture, so the
//! unlabelled data can form components of its own. Every MLP has 2 hidden ReLU layers of
//! `n_h` units; the likelihood is Bernoulli on binarised pixels.
//!
//! A layer fed `concat[a, y_onehot]` is computed as `W_a a + W_y y_onehot + b`, the same
//! function with the same parameters split in two, so that tiling an unlabelled image over
//! all `n_y` values of `y` computes its (large) `W_a a` once.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use candle_nn::{Module, VarBuilder, VarMap};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use crate::data::derived_rng;
use crate::nn::fastmath::{sigmoid, softplus};
use crate::nn::PARALLEL_MIN;
use crate::nn::{linear, linear_no_bias, Linear};
use crate::train::named_vars;

const LOG_2PI: f64 = 1.837_877_066_409_345_5;

/// Which of the two models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Kingma et al.'s M2: standard normal prior on z, the decoder sees y.
    M2,
    /// The Gaussian-mixture DGM: p(z|y) learnt, the decoder sees only z.
    GmDgm,
}

impl Kind {
    /// The config name (`m2`, `gmdgm`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::M2 => "m2",
            Kind::GmDgm => "gmdgm",
        }
    }

    /// The display name (`M2`, `GM-DGM`).
    pub fn display(self) -> &'static str {
        match self {
            Kind::M2 => "M2",
            Kind::GmDgm => "GM-DGM",
        }
    }

    /// The kind called `name` by the config.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "m2" => Some(Kind::M2),
            "gmdgm" => Some(Kind::GmDgm),
            _ => None,
        }
    }
}

/// Sizes of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Input pixels kept (`n_x`).
    pub x: usize,
    /// Mixture components (`n_y` = classes + extra components).
    pub y: usize,
    /// Latent dimensions (`n_z`).
    pub z: usize,
    /// Hidden units of each hidden layer (`n_h`).
    pub h: usize,
}

/// q(y|x): an MLP from the pixels to `n_y` logits.
#[derive(Debug, Clone)]
pub struct Classifier {
    h1: Linear,
    h2: Linear,
    out: Linear,
}

impl Classifier {
    /// The classifier's layers under `vb`.
    pub fn new(d: Dims, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            h1: linear(d.x, d.h, vb.pp("h1"))?,
            h2: linear(d.h, d.h, vb.pp("h2"))?,
            out: linear(d.h, d.y, vb.pp("out"))?,
        })
    }

    /// Logits `[B, n_y]` of images `[B, n_x]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.h1.forward(x)?.relu()?;
        let h = self.h2.forward(&h)?.relu()?;
        self.out.forward(&h)
    }
}

/// q(z|x,y): a shared trunk on `concat[x, y]` with separate mean and log-variance heads.
#[derive(Debug, Clone)]
pub struct Encoder {
    x_in: Linear,
    y_in: Linear,
    h2: Linear,
    mu: Linear,
    logvar: Linear,
}

impl Encoder {
    /// The encoder's layers under `vb`.
    pub fn new(d: Dims, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            x_in: linear(d.x, d.h, vb.pp("x_in"))?,
            y_in: linear_no_bias(d.y, d.h, vb.pp("y_in"))?,
            h2: linear(d.h, d.h, vb.pp("h2"))?,
            mu: linear(d.h, d.z, vb.pp("mu"))?,
            logvar: linear(d.h, d.z, vb.pp("logvar"))?,
        })
    }

    /// The image's share of the first layer's pre-activation, `[B, n_h]`.
    pub fn project_x(&self, x: &Tensor) -> Result<Tensor> {
        self.x_in.forward(x)
    }

    /// `(μ, logvar)` `[R, n_z]` from [`Encoder::project_x`] rows and one-hot `y` rows.
    pub fn forward(&self, hx: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = (hx + self.y_in.forward(y)?)?.relu()?;
        let h = self.h2.forward(&h)?.relu()?;
        Ok((self.mu.forward(&h)?, self.logvar.forward(&h)?))
    }
}

/// p(x|z) (GM-DGM) or p(x|y,z) (M2): an MLP to Bernoulli logits over the pixels.
#[derive(Debug, Clone)]
pub struct Decoder {
    z_in: Linear,
    y_in: Option<Linear>,
    h2: Linear,
    out: Linear,
}

impl Decoder {
    /// The decoder's layers under `vb`; `sees_y` adds the one-hot `y` to its input.
    pub fn new(d: Dims, sees_y: bool, vb: VarBuilder) -> Result<Self> {
        let y_in = if sees_y {
            Some(linear_no_bias(d.y, d.h, vb.pp("y_in"))?)
        } else {
            None
        };
        Ok(Self {
            z_in: linear(d.z, d.h, vb.pp("z_in"))?,
            y_in,
            h2: linear(d.h, d.h, vb.pp("h2"))?,
            out: linear(d.h, d.x, vb.pp("out"))?,
        })
    }

    /// Logits `[R, n_x]` of latents `[R, n_z]` (and one-hot `y` rows, used by M2 only).
    pub fn forward(&self, z: &Tensor, y: &Tensor) -> Result<Tensor> {
        let mut h = self.z_in.forward(z)?;
        if let Some(y_in) = &self.y_in {
            h = (h + y_in.forward(y)?)?;
        }
        let h = self.h2.forward(&h.relu()?)?.relu()?;
        self.out.forward(&h)
    }
}

/// The GM-DGM's p(z|y) = N(μ_y, diag exp(logvar_y)), both linear in the one-hot `y`.
#[derive(Debug, Clone)]
pub struct MixturePrior {
    mean: Linear,
    logvar: Linear,
}

impl MixturePrior {
    /// The prior's layers under `vb`.
    pub fn new(d: Dims, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            mean: linear(d.y, d.z, vb.pp("mean"))?,
            logvar: linear(d.y, d.z, vb.pp("logvar"))?,
        })
    }

    /// `(μ_y, logvar_y)` `[R, n_z]` of one-hot `y` rows.
    pub fn forward(&self, y: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.mean.forward(y)?, self.logvar.forward(y)?))
    }
}

/// The terms of one step's loss, as scalar tensors.
#[derive(Debug, Clone)]
pub struct Losses {
    /// The loss to minimise: `-(mean L + mean U + α·mean log q(y|x))` (without the weight
    /// prior, which the trainer adds).
    pub total: Tensor,
    /// Mean labelled bound `L(x, y)` (nats per image).
    pub labelled_bound: Tensor,
    /// Mean unlabelled bound `U(x)` (nats per image).
    pub unlabelled_bound: Tensor,
    /// Mean `-log q(y|x)` on the labelled images.
    pub classifier_nll: Tensor,
}

/// M2 or the GM-DGM: classifier, encoder, decoder, (GM-DGM) mixture prior, and the fixed
/// class prior `log p(y)`.
#[derive(Debug, Clone)]
pub struct SemiVae {
    kind: Kind,
    dims: Dims,
    classifier: Classifier,
    encoder: Encoder,
    decoder: Decoder,
    prior: Option<MixturePrior>,
    log_py: Tensor,
}

impl SemiVae {
    /// A model of `kind` and `dims` under `vb`, with class prior `p_y` (`n_y` values that
    /// sum to 1, see [`class_prior`]).
    pub fn new(kind: Kind, dims: Dims, p_y: &[f64], vb: VarBuilder) -> Result<Self> {
        if p_y.len() != dims.y {
            candle_core::bail!("class prior has {} values, n_y is {}", p_y.len(), dims.y);
        }
        let log_py: Vec<f32> = p_y.iter().map(|p| p.max(1e-30).ln() as f32).collect();
        let log_py = Tensor::from_vec(log_py, (dims.y, 1), vb.device())?;
        Ok(Self {
            kind,
            dims,
            classifier: Classifier::new(dims, vb.pp("cls"))?,
            encoder: Encoder::new(dims, vb.pp("enc"))?,
            decoder: Decoder::new(dims, kind == Kind::M2, vb.pp("dec"))?,
            prior: match kind {
                Kind::GmDgm => Some(MixturePrior::new(dims, vb.pp("prior"))?),
                Kind::M2 => None,
            },
            log_py,
        })
    }

    /// Which model this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The model's sizes.
    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// q(y|x) logits `[B, n_y]`.
    pub fn classify(&self, x: &Tensor) -> Result<Tensor> {
        self.classifier.forward(x)
    }

    /// The bound `L(x, y) = log p(x|z[,y]) + log p(y) + log p(z[|y]) - log q(z|x,y)` of each
    /// row, `[R]`, with `z = μ + σ·eps` (one sample): images `x` `[R, n_x]`, their
    /// [`Encoder::project_x`] `hx` `[R, n_h]`, one-hot `y` `[R, n_y]`, noise `eps` `[R, n_z]`.
    pub fn bound(&self, x: &Tensor, hx: &Tensor, y: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let (mu, logvar) = self.encoder.forward(hx, y)?;
        let z = (&mu + (logvar.affine(0.5, 0.0)?.exp()? * eps)?)?;
        let log_q = ((logvar + eps.sqr()?)?
            .affine(1.0, LOG_2PI)?
            .sum(D::Minus1)?
            * -0.5)?;
        let log_pz = match &self.prior {
            None => (z.sqr()?.affine(1.0, LOG_2PI)?.sum(D::Minus1)? * -0.5)?,
            Some(prior) => {
                let (pm, plv) = prior.forward(y)?;
                let sq = ((&z - pm)?.sqr()? * plv.neg()?.exp()?)?;
                ((plv + sq)?.affine(1.0, LOG_2PI)?.sum(D::Minus1)? * -0.5)?
            }
        };
        let logits = self.decoder.forward(&z, y)?;
        let log_px = bernoulli_log_prob(x, &logits)?;
        let log_py = y.matmul(&self.log_py)?.squeeze(1)?;
        log_px + log_py + log_pz - log_q
    }

    /// `U(x) = Σ_y q(y|x) L(x, y) + H(q(y|x))` of each image `[B]`, summing exactly over all
    /// `n_y` components; `eps` is `[B·n_y, n_z]` (rows image-major). Also returns the
    /// classifier's logits.
    pub fn unlabelled_bound(&self, x: &Tensor, eps: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, nx) = x.dims2()?;
        let ny = self.dims.y;
        let logits = self.classify(x)?;
        let log_qy = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let qy = log_qy.exp()?;
        let tile = |t: &Tensor, w: usize| -> Result<Tensor> {
            t.unsqueeze(1)?
                .broadcast_as((b, ny, w))?
                .contiguous()?
                .reshape((b * ny, w))
        };
        let hx = self.encoder.project_x(x)?;
        let hx_rows = tile(&hx, self.dims.h)?;
        let x_rows = tile(x, nx)?;
        let eye = Tensor::eye(ny, x.dtype(), x.device())?;
        let y_rows = eye
            .unsqueeze(0)?
            .broadcast_as((b, ny, ny))?
            .contiguous()?
            .reshape((b * ny, ny))?;
        let l = self
            .bound(&x_rows, &hx_rows, &y_rows, eps)?
            .reshape((b, ny))?;
        let expected = (&qy * l)?.sum(D::Minus1)?;
        let entropy = (qy * log_qy)?.sum(D::Minus1)?.neg()?;
        Ok(((expected + entropy)?, logits))
    }

    /// The loss of one step: labelled images `xl` `[Bl, n_x]` with classes `yl` `[Bl]`
    /// (u32) and noise `eps_l` `[Bl, n_z]`, unlabelled images `xu` `[Bu, n_x]` with noise
    /// `eps_u` `[Bu·n_y, n_z]`, and classifier weight `alpha`.
    pub fn loss(
        &self,
        xl: &Tensor,
        yl: &Tensor,
        eps_l: &Tensor,
        xu: &Tensor,
        eps_u: &Tensor,
        alpha: f64,
    ) -> Result<Losses> {
        let y_onehot = one_hot(yl, self.dims.y, xl.dtype())?;
        let hx = self.encoder.project_x(xl)?;
        let labelled_bound = self.bound(xl, &hx, &y_onehot, eps_l)?.mean_all()?;
        let (u, _) = self.unlabelled_bound(xu, eps_u)?;
        let unlabelled_bound = u.mean_all()?;
        let log_qy = candle_nn::ops::log_softmax(&self.classify(xl)?, D::Minus1)?;
        let classifier_nll = candle_nn::loss::nll(&log_qy, yl)?;
        let total = ((&classifier_nll * alpha)? - (&labelled_bound + &unlabelled_bound)?)?;
        Ok(Losses {
            total,
            labelled_bound,
            unlabelled_bound,
            classifier_nll,
        })
    }
}

/// `Σ_i x_i log σ(l_i) + (1 - x_i) log(1 - σ(l_i)) = Σ_i x_i l_i - softplus(l_i)` per row
/// of `[R, n_x]` images and logits. On the CPU in `f32` this is one fused pass
/// ([`BernoulliLogProb`], and one more for its gradient) instead of ten elementwise tensor
/// ops and their backward: the decoder's `[B·n_y, n_x]` logits are the step's largest
/// tensor. Elsewhere (CUDA, other dtypes) it is [`bernoulli_log_prob_ops`].
pub fn bernoulli_log_prob(x: &Tensor, logits: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu()
        && logits.dtype() == DType::F32
        && x.dtype() == DType::F32
        && logits.rank() == 2
        && x.dims() == logits.dims()
    {
        x.contiguous()?
            .apply_op2(&logits.contiguous()?, BernoulliLogProb)
    } else {
        bernoulli_log_prob_ops(x, logits)
    }
}

/// [`bernoulli_log_prob`] from candle's tensor ops (any device and dtype).
pub fn bernoulli_log_prob_ops(x: &Tensor, logits: &Tensor) -> Result<Tensor> {
    // softplus(l) = max(l, 0) + log(1 + exp(-|l|)), stable for large |l|
    let softplus = (logits.relu()? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    ((x * logits)? - softplus)?.sum(D::Minus1)
}

/// `Σ_i x_i l_i - softplus(l_i)` of one row, in 8 interleaved partial sums (so the loop
/// vectorises; the order of summation is fixed, so results do not depend on threads).
fn bernoulli_row(x: &[f32], l: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, lc) = (x.chunks_exact(8), l.chunks_exact(8));
    let (xr, lr) = (xc.remainder(), lc.remainder());
    for (x8, l8) in xc.zip(lc) {
        for k in 0..8 {
            acc[k] += x8[k] * l8[k] - softplus(l8[k]);
        }
    }
    let tail: f32 = xr.iter().zip(lr).map(|(&x, &l)| x * l - softplus(l)).sum();
    acc.iter().sum::<f32>() + tail
}

/// The contiguous `f32` data of a CPU tensor.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("bernoulli log-prob: {what} is not f32");
    };
    crate::nn::contiguous_slice("bernoulli log-prob", v, l, what)
}

/// The fused CPU [`bernoulli_log_prob`]: `(x [R, C], logits [R, C]) → [R]`.
#[derive(Debug, Clone, Copy)]
struct BernoulliLogProb;

impl CustomOp2 for BernoulliLogProb {
    fn name(&self) -> &'static str {
        "gm-dgm-bernoulli-log-prob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = l2.shape().dims2()?;
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "bernoulli log-prob: x {:?} vs logits {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let (x, l) = (f32_slice(s1, l1, "x")?, f32_slice(s2, l2, "logits")?);
        let mut out = vec![0f32; rows];
        let row = |(r, o): (usize, &mut f32)| {
            let span = r * cols..(r + 1) * cols;
            *o = bernoulli_row(&x[span.clone()], &l[span]);
        };
        if rows * cols < PARALLEL_MIN {
            out.iter_mut().enumerate().for_each(row);
        } else {
            out.par_iter_mut().enumerate().for_each(row);
        }
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        logits: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dl = x.apply_op3_no_bwd(logits, &grad_res.contiguous()?, &BernoulliLogProbGrad)?;
        Ok((None, Some(dl)))
    }
}

/// The gradient of [`BernoulliLogProb`] in the logits: `(x [R, C], logits [R, C], g [R])
/// → g_r (x_rc - σ(l_rc))`.
#[derive(Debug, Clone, Copy)]
struct BernoulliLogProbGrad;

impl CustomOp3 for BernoulliLogProbGrad {
    fn name(&self) -> &'static str {
        "gm-dgm-bernoulli-log-prob-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = l2.shape().dims2()?;
        let (x, l, g) = (
            f32_slice(s1, l1, "x")?,
            f32_slice(s2, l2, "logits")?,
            f32_slice(s3, l3, "gradient")?,
        );
        if x.len() != rows * cols || g.len() != rows {
            candle_core::bail!("bernoulli log-prob gradient: shapes do not match");
        }
        let mut out = vec![0f32; rows * cols];
        let row = |(r, o): (usize, &mut [f32])| {
            let span = r * cols..(r + 1) * cols;
            for ((o, &x), &l) in o.iter_mut().zip(&x[span.clone()]).zip(&l[span]) {
                *o = g[r] * (x - sigmoid(l));
            }
        };
        if rows * cols < PARALLEL_MIN || cols == 0 {
            out.chunks_mut(cols.max(1)).enumerate().for_each(row);
        } else {
            out.par_chunks_mut(cols).enumerate().for_each(row);
        }
        Ok((CpuStorage::F32(out), l2.shape().clone()))
    }
}

/// One-hot rows `[B, n]` of class ids `[B]` (u32).
pub fn one_hot(y: &Tensor, n: usize, dtype: DType) -> Result<Tensor> {
    let ids = y.to_vec1::<u32>()?;
    let mut v = vec![0f32; ids.len() * n];
    for (i, &c) in ids.iter().enumerate() {
        if (c as usize) >= n {
            candle_core::bail!("class {c} out of range for {n} components");
        }
        v[i * n + c as usize] = 1.0;
    }
    Tensor::from_vec(v, (ids.len(), n), y.device())?.to_dtype(dtype)
}

/// The class prior p(y) over `classes + extra` components: a labelled class gets its
/// empirical frequency `1/classes`; the masked classes' mass is shared equally by the
/// masked classes and the extra components; then renormalised.
pub fn class_prior(classes: usize, masked: &[usize], extra: usize) -> Vec<f64> {
    let labelled = classes - masked.len();
    let hidden_mass = 1.0 - labelled as f64 / classes as f64;
    let share = if masked.len() + extra > 0 {
        hidden_mass / (masked.len() + extra) as f64
    } else {
        0.0
    };
    let mut p: Vec<f64> = (0..classes + extra)
        .map(|k| {
            if k < classes && !masked.contains(&k) {
                1.0 / classes as f64
            } else {
                share
            }
        })
        .collect();
    let sum: f64 = p.iter().sum();
    for v in &mut p {
        *v /= sum;
    }
    p
}

/// Seeded initialisation after the paper's code: hidden layers get Glorot-normal weights
/// and N(0, 0.001) biases; output layers (classifier logits, encoder heads, decoder
/// logits) N(0, 0.001) weights and biases; the mixture prior's mean layer N(0, 0.001)
/// weights, its log-variance layer Glorot-normal weights, both zero biases.
///
/// A first layer that takes a concatenation (`concat[x, y]` in the encoder, `concat[z, y]`
/// in M2's decoder) is stored here as one linear map per input (`x_in` + `y_in`, `z_in` +
/// `y_in`); each part gets the Glorot std of the whole layer, fan-in summed over the parts,
/// as the paper's single layer has.
pub fn init_params(varmap: &VarMap, seed: u64) -> Result<()> {
    let vars = named_vars(varmap);
    // fan-in of each split first layer, summed over its parts (keyed by the module prefix)
    let mut joint_fan_in: std::collections::BTreeMap<&str, usize> = Default::default();
    for (name, var) in &vars {
        if let Some(prefix) = split_part(name) {
            if let [_, i] = var.dims() {
                *joint_fan_in.entry(prefix).or_default() += *i;
            }
        }
    }
    for (i, (name, var)) in vars.iter().enumerate() {
        let (layer, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let is_output =
            layer.ends_with(".out") || layer.ends_with(".mu") || layer.ends_with(".logvar");
        let std = match (layer, leaf) {
            ("prior.mean" | "prior.logvar", "bias") => 0.0,
            ("prior.logvar", _) => glorot_std(var.dims()),
            (_, "weight") if !is_output && !layer.starts_with("prior") => {
                match (
                    split_part(name).and_then(|p| joint_fan_in.get(p)),
                    var.dims(),
                ) {
                    (Some(&fan_in), [fan_out, _]) => {
                        (2.0 / (fan_in + fan_out).max(1) as f64).sqrt()
                    }
                    _ => glorot_std(var.dims()),
                }
            }
            _ => 1e-3,
        };
        let mut rng = derived_rng(seed, 0x6d6d, i as u64, 0);
        let normal = Normal::new(0.0f64, std.max(0.0))
            .map_err(|e| candle_core::Error::Msg(format!("init {name}: {e}")))?;
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| normal.sample(&mut rng) as f32)
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// The module prefix of a split first layer's weight (`…encoder` of
/// `…encoder.x_in.weight`), or `None` for any other variable.
fn split_part(name: &str) -> Option<&str> {
    let layer = name.strip_suffix(".weight")?;
    let (prefix, part) = layer.rsplit_once('.')?;
    matches!(part, "x_in" | "y_in" | "z_in").then_some(prefix)
}

fn glorot_std(dims: &[usize]) -> f64 {
    let (fan_out, fan_in) = match dims {
        [o, i] => (*o, *i),
        _ => (1, dims.iter().product()),
    };
    (2.0 / (fan_in + fan_out).max(1) as f64).sqrt()
}

/// Standard normal noise `[rows, cols]` from `rng` (candle's CPU RNG cannot be seeded).
pub fn normal_noise(
    rows: usize,
    cols: usize,
    rng: &mut rand::rngs::StdRng,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| rand_distr::StandardNormal.sample(rng))
        .collect();
    Tensor::from_vec(values, (rows, cols), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn test_rng(seed: u64) -> rand::rngs::StdRng {
        derived_rng(seed, 0, 0, 0)
    }

    fn model(kind: Kind) -> (SemiVae, VarMap) {
        let dims = Dims {
            x: 12,
            y: 5,
            z: 3,
            h: 8,
        };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let p_y = class_prior(4, &[2, 3], 1);
        let m = SemiVae::new(kind, dims, &p_y, vb).unwrap();
        init_params(&vm, 1).unwrap();
        (m, vm)
    }

    fn binary(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut rng = test_rng(seed);
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| {
                if rand::Rng::random_bool(&mut rng, 0.3) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn class_prior_shares_the_hidden_mass() {
        // the brief's example: 5 hidden classes and 5 extra components get 0.05 each
        let p = class_prior(10, &[0, 1, 2, 3, 4], 5);
        assert_eq!(p.len(), 15);
        for (k, v) in p.iter().enumerate() {
            let want = if (5..10).contains(&k) { 0.1 } else { 0.05 };
            assert!((v - want).abs() < 1e-12, "{k}: {v}");
        }
        let p = class_prior(10, &[0, 1, 2, 3, 4], 0);
        assert!(p.iter().all(|v| (v - 0.1).abs() < 1e-12));
    }

    #[test]
    fn shapes_and_finite_losses_of_both_models() {
        for kind in [Kind::M2, Kind::GmDgm] {
            let (m, vm) = model(kind);
            let d = m.dims();
            let mut rng = test_rng(3);
            let xl = binary(4, d.x, 1);
            let yl = Tensor::new(&[0u32, 1, 0, 4], &Device::Cpu).unwrap();
            let xu = binary(6, d.x, 2);
            let eps_l = normal_noise(4, d.z, &mut rng, &Device::Cpu).unwrap();
            let eps_u = normal_noise(6 * d.y, d.z, &mut rng, &Device::Cpu).unwrap();
            assert_eq!(m.classify(&xu).unwrap().dims(), &[6, d.y]);
            let hx = m.encoder.project_x(&xl).unwrap();
            let y1 = one_hot(&yl, d.y, DType::F32).unwrap();
            let l = m.bound(&xl, &hx, &y1, &eps_l).unwrap();
            assert_eq!(l.dims(), &[4]);
            let (u, logits) = m.unlabelled_bound(&xu, &eps_u).unwrap();
            assert_eq!((u.dims(), logits.dims()), (&[6][..], &[6, d.y][..]));
            let losses = m.loss(&xl, &yl, &eps_l, &xu, &eps_u, 1.1).unwrap();
            let get = |t: &Tensor| t.to_scalar::<f32>().unwrap() as f64;
            let (lb, ub, nll, total) = (
                get(&losses.labelled_bound),
                get(&losses.unlabelled_bound),
                get(&losses.classifier_nll),
                get(&losses.total),
            );
            for v in [lb, ub, nll, total] {
                assert!(v.is_finite(), "{kind:?}: {lb} {ub} {nll} {total}");
            }
            // bounds on log-likelihoods of 12 binary pixels: negative, and near
            // 12·log(1/2) + log p(y) at init (decoder logits about 0)
            assert!(lb < 0.0 && ub < 0.0, "{kind:?}: {lb} {ub}");
            // initial classifier is uniform: nll about log 5
            assert!((nll - 5f64.ln()).abs() < 0.05, "{nll}");
            assert!((total - (1.1 * nll - lb - ub)).abs() < 1e-3);
            // every parameter gets a gradient (M2 has no prior, GM-DGM no decoder y_in)
            let grads = losses.total.backward().unwrap();
            for (name, var) in named_vars(&vm) {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}"));
                let s = g
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(s.is_finite(), "{name}");
            }
            let names: Vec<String> = named_vars(&vm).into_iter().map(|(n, _)| n).collect();
            assert_eq!(
                names.iter().any(|n| n.starts_with("prior.")),
                kind == Kind::GmDgm
            );
            assert_eq!(
                names.iter().any(|n| n == "dec.y_in.weight"),
                kind == Kind::M2
            );
        }
    }

    #[test]
    fn unlabelled_bound_is_the_q_weighted_sum_of_labelled_bounds() {
        let (m, _) = model(Kind::GmDgm);
        let d = m.dims();
        let x = binary(2, d.x, 5);
        let mut rng = test_rng(9);
        let eps = normal_noise(2 * d.y, d.z, &mut rng, &Device::Cpu).unwrap();
        let (u, logits) = m.unlabelled_bound(&x, &eps).unwrap();
        let q = candle_nn::ops::softmax(&logits, 1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let u = u.to_vec1::<f32>().unwrap();
        let hx = m.encoder.project_x(&x).unwrap();
        for i in 0..2 {
            let xi = x.narrow(0, i, 1).unwrap();
            let hi = hx.narrow(0, i, 1).unwrap();
            let mut want = 0.0f64;
            for (k, &qk) in q[i].iter().enumerate() {
                let y = Tensor::new(&[k as u32], &Device::Cpu).unwrap();
                let y = one_hot(&y, d.y, DType::F32).unwrap();
                let e = eps.narrow(0, i * d.y + k, 1).unwrap();
                let l = m.bound(&xi, &hi, &y, &e).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
                let qk = qk as f64;
                want += qk * l - qk * qk.max(1e-30).ln();
            }
            assert!(
                (u[i] as f64 - want).abs() < 1e-3 * want.abs(),
                "{} vs {want}",
                u[i]
            );
        }
    }

    #[test]
    fn fused_bernoulli_log_prob_matches_the_tensor_ops_and_their_gradient() {
        let x = binary(7, 13, 4);
        let mut rng = test_rng(8);
        let l = (normal_noise(7, 13, &mut rng, &Device::Cpu).unwrap() * 4.0).unwrap();
        let l = candle_core::Var::from_tensor(&l).unwrap();
        let w = normal_noise(7, 1, &mut rng, &Device::Cpu)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let fused = bernoulli_log_prob(&x, l.as_tensor()).unwrap();
        let plain = bernoulli_log_prob_ops(&x, l.as_tensor()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(diff(&fused, &plain) < 1e-4, "{fused} vs {plain}");
        let grad = |v: &Tensor| {
            let g = (v * &w).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(l.as_tensor()).unwrap().clone()
        };
        let (gf, gp) = (grad(&fused), grad(&plain));
        assert!(diff(&gf, &gp) < 1e-5, "{gf} vs {gp}");
    }

    #[test]
    fn bernoulli_log_prob_is_stable() {
        let x = Tensor::new(&[[1f32, 0.0, 1.0]], &Device::Cpu).unwrap();
        let l = Tensor::new(&[[0f32, 100.0, -100.0]], &Device::Cpu).unwrap();
        let v = bernoulli_log_prob(&x, &l)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!((v - (-(2f32.ln()) - 100.0 - 100.0)).abs() < 1e-3, "{v}");
    }
}
