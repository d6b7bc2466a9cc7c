//! GroupNorm as one fused op on the CPU.
//!
//! `candle_nn::GroupNorm` is a chain of a dozen tensor ops; its backward sums the
//! gradients of the per-channel scale and shift over the batch and pixel dimensions, which
//! candle's CPU reduction does element by element with two integer divisions each. Here
//! the layer is one custom op ([`GroupNormOp`]): the forward pass computes each group's
//! mean and variance (two sweeps, each in a few independent partial sums of the input's
//! type, totalled in f64) and writes `(x − μ)/σ · γ + β` in one sweep; the
//! backward ([`GroupNormBackward`]) recomputes the statistics and gives all three gradients
//! in two sweeps: `dβ_c = Σ dy`, `dγ_c = Σ dy·x̂`, and
//! `dx = (γ·dy − mean_g(γ·dy) − x̂·mean_g(γ·dy·x̂)) / σ`. Same parameters (`weight` ones,
//! `bias` zeros, shapes `[C]`), eps and biased variance as candle's; off the CPU candle's
//! own layer is used. The gradients have no graph of their own (no second derivatives).
//!
//! [`GroupNorm::forward_relu`] fuses the ReLU that follows the norm in the pre-activation
//! models into the same op: `max(y, 0)` in the forward sweep, and the backward masks `dy`
//! where `y < 0` (recomputed from the statistics, as candle's `relu` lets the gradient
//! through where `y ≥ 0`). That spares a tensor and candle's four-op ReLU backward.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

/// The sizes of one application: `b` samples of `c` channels of `hw` values, `groups`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dims {
    b: usize,
    c: usize,
    hw: usize,
    groups: usize,
    eps: f64,
    /// A ReLU follows the norm in the same op.
    relu: bool,
}

impl Dims {
    fn len(&self) -> usize {
        self.b * self.c * self.hw
    }
    /// Values per group.
    fn group_len(&self) -> usize {
        self.c / self.groups * self.hw
    }
}

/// What the kernels need of an element type (f32, f64).
trait Elem:
    Copy
    + Default
    + Send
    + Sync
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + PartialOrd
{
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Elem for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Elem for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// Lanes of the sums below: independent accumulators, so that the loops vectorize and are
/// not bound by the latency of one long chain of additions.
const LANES: usize = 8;

/// `(Σ f(x), Σ g(x))` over `x`: [`LANES`] partial sums in `T` (each over a few dozen
/// values at the layers' sizes), added up in f64.
#[inline(always)]
fn lane_sums<T: Elem>(x: &[T], y: &[T], f: impl Fn(T, T) -> (T, T)) -> (f64, f64) {
    let (mut a, mut b) = ([T::default(); LANES], [T::default(); LANES]);
    let (mut xs, mut ys) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    for (cx, cy) in (&mut xs).zip(&mut ys) {
        for i in 0..LANES {
            let (u, v) = f(cx[i], cy[i]);
            a[i] = a[i] + u;
            b[i] = b[i] + v;
        }
    }
    let (mut sa, mut sb) = (0f64, 0f64);
    for (u, v) in xs.remainder().iter().zip(ys.remainder()) {
        let (u, v) = f(*u, *v);
        sa += u.to_f64();
        sb += v.to_f64();
    }
    for i in 0..LANES {
        sa += a[i].to_f64();
        sb += b[i].to_f64();
    }
    (sa, sb)
}

/// `(μ, 1/σ)` of one group's values (the biased variance about the mean, in two sweeps).
fn stats<T: Elem>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let mean = lane_sums(x, x, |v, _| (v, T::default())).0 / n;
    let m = T::from_f64(mean);
    let var = lane_sums(x, x, |v, _| {
        let d = v - m;
        (d * d, T::default())
    })
    .0 / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// A channel's `(scale, shift)`, the forward pass's `y = x·scale + shift` (also used by the
/// backward to recompute `y` bit for bit for the ReLU's mask).
fn affine<T: Elem>(gamma: T, beta: T, mean: f64, rstd: f64) -> (T, T) {
    let scale = gamma.to_f64() * rstd;
    (
        T::from_f64(scale),
        T::from_f64(beta.to_f64() - mean * scale),
    )
}

fn forward<T: Elem>(x: &[T], w: &[T], bias: &[T], d: Dims) -> Vec<T> {
    if d.relu {
        forward_kernel::<T, true>(x, w, bias, d)
    } else {
        forward_kernel::<T, false>(x, w, bias, d)
    }
}

fn forward_kernel<T: Elem, const RELU: bool>(x: &[T], w: &[T], bias: &[T], d: Dims) -> Vec<T> {
    let mut out = vec![T::default(); d.len()];
    let (gl, cpg) = (d.group_len(), d.c / d.groups);
    let zero = T::default();
    for (gi, (src, dst)) in x.chunks(gl).zip(out.chunks_mut(gl)).enumerate() {
        let (mean, rstd) = stats(src, d.eps);
        let c0 = (gi % d.groups) * cpg;
        for (ci, (s, o)) in src.chunks(d.hw).zip(dst.chunks_mut(d.hw)).enumerate() {
            let (scale, shift) = affine(w[c0 + ci], bias[c0 + ci], mean, rstd);
            for (o, s) in o.iter_mut().zip(s) {
                let y = *s * scale + shift;
                *o = if RELU && y < zero { zero } else { y };
            }
        }
    }
    out
}

/// `[dx (B·C·HW) | dγ (C) | dβ (C)]`. `params` is `γ` (`[C]`), or `[γ | β]` (`[2C]`) when
/// a ReLU follows (its mask needs the forward's `y`).
fn backward<T: Elem>(x: &[T], params: &[T], dy: &[T], d: Dims) -> Vec<T> {
    if d.relu {
        let (w, bias) = params.split_at(d.c);
        backward_kernel::<T, true>(x, w, bias, dy, d)
    } else {
        backward_kernel::<T, false>(x, params, params, dy, d)
    }
}

/// [`backward`]; `bias` is read only when `RELU`.
fn backward_kernel<T: Elem, const RELU: bool>(
    x: &[T],
    w: &[T],
    bias: &[T],
    dy: &[T],
    d: Dims,
) -> Vec<T> {
    let zero = T::default();
    let mut out = vec![T::default(); d.len() + 2 * d.c];
    let (dx, rest) = out.split_at_mut(d.len());
    let mut dw = vec![0f64; d.c];
    let mut db = vec![0f64; d.c];
    let (gl, cpg) = (d.group_len(), d.c / d.groups);
    let n = gl.max(1) as f64;
    let mut masked = if RELU { vec![zero; gl] } else { Vec::new() };
    for (gi, ((src, g), dst)) in x
        .chunks(gl)
        .zip(dy.chunks(gl))
        .zip(dx.chunks_mut(gl))
        .enumerate()
    {
        let (mean, rstd) = stats(src, d.eps);
        let (mean_t, rstd_t) = (T::from_f64(mean), T::from_f64(rstd));
        let c0 = (gi % d.groups) * cpg;
        // with the ReLU, dy where the forward's y ≥ 0, else 0 (one plain sweep that
        // vectorizes, rather than a data-dependent branch in the sums)
        let g = if RELU {
            for (ci, ((s, g), m)) in src
                .chunks(d.hw)
                .zip(g.chunks(d.hw))
                .zip(masked.chunks_mut(d.hw))
                .enumerate()
            {
                let (scale, shift) = affine(w[c0 + ci], bias[c0 + ci], mean, rstd);
                let (s, g) = (&s[..m.len()], &g[..m.len()]);
                for i in 0..m.len() {
                    let (y, gv) = (s[i] * scale + shift, g[i]);
                    m[i] = if y < zero { zero } else { gv };
                }
            }
            &masked[..g.len()]
        } else {
            g
        };
        // mean over the group of γ·dy and of γ·dy·x̂
        let (mut m1, mut m2) = (0f64, 0f64);
        for (ci, (s, g)) in src.chunks(d.hw).zip(g.chunks(d.hw)).enumerate() {
            let gamma = w[c0 + ci].to_f64();
            let (sg, sgx) = lane_sums(s, g, |s, g| (g, g * ((s - mean_t) * rstd_t)));
            db[c0 + ci] += sg;
            dw[c0 + ci] += sgx;
            m1 += gamma * sg;
            m2 += gamma * sgx;
        }
        let (m1, m2) = (m1 / n, m2 / n);
        for (ci, ((s, g), o)) in src
            .chunks(d.hw)
            .zip(g.chunks(d.hw))
            .zip(dst.chunks_mut(d.hw))
            .enumerate()
        {
            // dx = γ/σ·dy − m1/σ − x̂·m2/σ
            let a = T::from_f64(w[c0 + ci].to_f64() * rstd);
            let (b0, b1) = (T::from_f64(m1 * rstd), T::from_f64(m2 * rstd));
            for ((s, g), o) in s.iter().zip(g).zip(o.iter_mut()) {
                let xhat = (*s - mean_t) * rstd_t;
                *o = *g * a - b0 - xhat * b1;
            }
        }
    }
    for (o, v) in rest.iter_mut().zip(dw.iter().chain(&db)) {
        *o = T::from_f64(*v);
    }
    out
}

/// The fused GroupNorm `(x [B, C, ...], γ [C], β [C]) → y` on the CPU; its backward is
/// [`GroupNormBackward`].
#[derive(Debug, Clone, Copy)]
pub struct GroupNormOp {
    dims: Dims,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "trainyard-group-norm"
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
        let d = self.dims;
        let out = super::dispatch3(
            self.name(),
            ["input", "weight", "bias"],
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, b| forward(x, w, b, d),
            |x, w, b| forward(x, w, b, d),
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims;
        let params = if d.relu {
            Tensor::cat(&[weight, bias], 0)?
        } else {
            weight.clone()
        };
        let all = x.apply_op3_no_bwd(
            &params,
            &grad_res.contiguous()?,
            &GroupNormBackward { dims: d },
        )?;
        let n = d.len();
        let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = all.narrow(0, n, d.c)?;
        let db = all.narrow(0, n + d.c, d.c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The gradients of [`GroupNormOp`], `(x, γ, dy) → [dx | dγ | dβ]` flattened into one
/// vector (`(x, [γ | β], dy)` with the fused ReLU). Has no backward of its own.
#[derive(Debug, Clone, Copy)]
pub struct GroupNormBackward {
    dims: Dims,
}

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "trainyard-group-norm-backward"
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
        let d = self.dims;
        let out = super::dispatch3(
            self.name(),
            ["input", "parameters", "output gradient"],
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, g| backward(x, w, g, d),
            |x, w, g| backward(x, w, g, d),
        )?;
        Ok((out, Shape::from(d.len() + 2 * d.c)))
    }
}

/// GroupNorm over `[B, C, ...]` (fused on the CPU, see the module docs); a drop-in for
/// `candle_nn::GroupNorm` with the same parameters.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    channels: usize,
    eps: f64,
}

impl GroupNorm {
    /// `weight` (ones) and `bias` (zeros), `[channels]` each, under `vb`, as
    /// `candle_nn::group_norm`; `groups` must divide `channels`.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("group norm: {groups} groups do not divide {channels} channels");
        }
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            inner,
            weight,
            bias,
            groups,
            channels,
            eps,
        })
    }
}

impl GroupNorm {
    /// `relu(self.forward(x))`, fused into one op on the CPU (see the module docs).
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
            let y = self.inner.forward(x)?;
            return if relu { y.relu() } else { Ok(y) };
        }
        let dims = x.dims();
        if dims.len() < 3 || dims[1] != self.channels {
            candle_core::bail!(
                "group norm: input {:?}, expected [B, {}, ...]",
                dims,
                self.channels
            );
        }
        let d = Dims {
            b: dims[0],
            c: dims[1],
            hw: dims[2..].iter().product(),
            groups: self.groups,
            eps: self.eps,
            relu,
        };
        x.contiguous()?.apply_op3(
            &self.weight.contiguous()?,
            &self.bias.contiguous()?,
            GroupNormOp { dims: d },
        )
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    /// Forward and the three gradients agree with candle_nn's GroupNorm (random scale and
    /// shift), in f64 to rounding and in f32 to f32 precision.
    #[test]
    fn matches_candle_group_norm() {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-4)] {
            for (b, c, h, groups) in [(2, 6, 5, 3), (3, 8, 4, 8), (4, 32, 6, 8), (2, 4, 1, 1)] {
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, dtype, &dev);
                let ours = GroupNorm::new(groups, c, 1e-5, vb).unwrap();
                for (_, v) in vm.data().lock().unwrap().iter() {
                    v.set(
                        &Tensor::randn(0.5, 1.0, c, &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    )
                    .unwrap();
                }
                let theirs = candle_nn::GroupNorm::new(
                    ours.weight.clone(),
                    ours.bias.clone(),
                    c,
                    groups,
                    1e-5,
                )
                .unwrap();
                let x = Var::from_tensor(
                    &Tensor::randn(1.0, 2.0, (b, c, h, h), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
                // plain, and with the fused ReLU against candle's norm then relu
                for relu in [false, true] {
                    let (y1, y2) = if relu {
                        (
                            ours.forward_relu(x.as_tensor()).unwrap(),
                            theirs.forward(x.as_tensor()).unwrap().relu().unwrap(),
                        )
                    } else {
                        (
                            ours.forward(x.as_tensor()).unwrap(),
                            theirs.forward(x.as_tensor()).unwrap(),
                        )
                    };
                    let what = format!("{dtype:?} {b} {c} {h} {groups} relu {relu}");
                    assert!(crate::nn::max_abs_diff(&y1, &y2) < tol, "{what}");
                    let r = Tensor::randn(0.0, 1.0, y1.dims(), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let g1 = (&y1 * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let g2 = (&y2 * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    for t in [x.as_tensor(), &ours.weight, &ours.bias] {
                        let e = crate::nn::max_abs_diff(g1.get(t).unwrap(), g2.get(t).unwrap());
                        assert!(e < 10.0 * tol, "{what}: {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_groups_that_do_not_divide_the_channels() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        assert!(GroupNorm::new(3, 8, 1e-5, vb.clone()).is_err());
        assert!(GroupNorm::new(0, 8, 1e-5, vb).is_err());
    }
}
