//! A 2-D transposed convolution built from the GEMM convolution of [`super::conv`].
//!
//! A transposed convolution is the input gradient of a convolution: with `G` the
//! convolution that maps the transposed layer's output shape `[B, Co, OH, OW]` back to its
//! input shape `[B, Ci, H, W]` (same kernel, stride and padding, weight `[Ci, Co, k, k]`,
//! which is exactly the transposed layer's weight layout), the layer is
//!
//! * forward: `y = Gᵀ(x) + bias`, the convolution's input-gradient pass with `dy = x`;
//! * backward: `dx = G(dY)` (a plain convolution forward, no bias), `dW` = the
//!   convolution's weight gradient with input `dY` and output gradient `x`, and `db` the sums
//!   of `dY` per channel.
//!
//! So every pass is an im2col or col2im plus GEMMs, unlike candle's CPU
//! `conv_transpose2d`, whose loops are several times slower. Off the CPU candle's own op is
//! used. Parameter names, shapes and initialisation match `candle_nn::conv_transpose2d`
//! (`weight` `[in, out, k, k]`, `bias` `[out]`, output padding and dilation not supported).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::conv::{conv_backward, conv_forward, Elem, Geometry, Wanted};

/// Forward: `[B, Co, OH, OW]` from `x` `[B, Ci, H, W]`, `weight` `[Ci, Co·k·k]` and `bias`.
fn forward<T: Elem>(x: &[T], weight: &[T], bias: &[T], g: Geometry, one: T) -> Vec<T> {
    // `g` is the convolution from the output (c = Co, h = OH) to the input (c_out = Ci)
    let want = Wanted {
        input: true,
        weight: false,
    };
    let mut all = conv_backward(&[], weight, x, g, one, want);
    all.truncate(g.input_len());
    let plane = g.h * g.w;
    if plane > 0 {
        for (i, chan) in all.chunks_mut(plane).enumerate() {
            let b = bias[i % g.c];
            for v in chan {
                *v += b;
            }
        }
    }
    all
}

/// Backward: `[dx (B·Ci·H·W) | dW (Ci·Co·k·k) | db (Co)]` from `x`, `weight` and `dy`.
/// `want` skips the input or the weight gradient (left zero) when nobody needs it.
fn backward<T: Elem>(x: &[T], weight: &[T], dy: &[T], g: Geometry, one: T, want: Wanted) -> Vec<T> {
    let mut out = if want.input {
        let zero_bias = vec![T::default(); g.c_out];
        conv_forward(dy, weight, &zero_bias, g, one)
    } else {
        vec![T::default(); g.b * g.c_out * g.out_h() * g.out_w()]
    };
    if want.weight {
        let only_weight = Wanted {
            input: false,
            weight: true,
        };
        let grads = conv_backward(dy, weight, x, g, one, only_weight);
        out.extend_from_slice(&grads[g.input_len()..g.input_len() + g.c_out * g.cols()]);
    } else {
        out.resize(out.len() + g.c_out * g.cols(), T::default());
    }
    let plane = g.h * g.w;
    let mut db = vec![T::default(); g.c];
    if plane > 0 {
        for (i, chan) in dy.chunks(plane).enumerate() {
            let acc = &mut db[i % g.c];
            for v in chan {
                *acc += *v;
            }
        }
    }
    out.extend_from_slice(&db);
    out
}

/// The fused transposed convolution `(x [B, Ci, H, W], weight [Ci, Co, k, k], bias [Co]) →
/// [B, Co, OH, OW]` on the CPU; its backward is [`ConvTranspose2dBackward`].
#[derive(Debug, Clone, Copy)]
pub struct ConvTranspose2dOp {
    /// The convolution from this op's output shape back to its input shape.
    geometry: Geometry,
}

impl CustomOp3 for ConvTranspose2dOp {
    fn name(&self) -> &'static str {
        "trainyard-conv-transpose2d"
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
        let g = self.geometry;
        let out = super::dispatch3(
            self.name(),
            ["input", "weight", "bias"],
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, b| forward(x, w, b, g, 1.0),
            |x, w, b| forward(x, w, b, g, 1.0),
        )?;
        Ok((out, Shape::from((g.b, g.c, g.h, g.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry;
        let want = Wanted {
            input: x.track_op(),
            weight: weight.track_op(),
        };
        let all = x.apply_op3_no_bwd(
            weight,
            &grad_res.contiguous()?,
            &ConvTranspose2dBackward { geometry: g, want },
        )?;
        super::split_grads(
            &all,
            (g.b, g.c_out, g.out_h(), g.out_w()),
            (g.c_out, g.c, g.k, g.k),
            g.c,
            want,
        )
    }
}

/// The gradients of [`ConvTranspose2dOp`], `(x, weight, dy) → [dx | dW | db]` flattened.
/// Has no backward of its own (no second derivatives).
#[derive(Debug, Clone, Copy)]
pub struct ConvTranspose2dBackward {
    geometry: Geometry,
    want: Wanted,
}

impl CustomOp3 for ConvTranspose2dBackward {
    fn name(&self) -> &'static str {
        "trainyard-conv-transpose2d-backward"
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
        let g = self.geometry;
        let want = self.want;
        let out = super::dispatch3(
            self.name(),
            ["input", "weight", "output gradient"],
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, dy| backward(x, w, dy, g, 1.0, want),
            |x, w, dy| backward(x, w, dy, g, 1.0, want),
        )?;
        let n = g.b * g.c_out * g.out_h() * g.out_w() + g.c_out * g.cols() + g.c;
        Ok((out, Shape::from(n)))
    }
}

/// A square 2-D transposed convolution layer (GEMMs on CPU, see the module docs).
#[derive(Debug, Clone)]
pub struct GemmConvTranspose2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl GemmConvTranspose2d {
    /// Creates `weight` `[c_in, c_out, k, k]` (and `bias` `[c_out]` if `bias`) under `vb`,
    /// initialised like `candle_nn::conv_transpose2d`.
    pub fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        if stride == 0 || k == 0 {
            candle_core::bail!("conv_transpose: kernel and stride must be at least 1");
        }
        let bound = 1.0 / (c_out as f64).sqrt() / k as f64;
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((c_in, c_out, k, k), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(c_out, "bias", init)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    /// The weight tensor `[c_in, c_out, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Output side for an input side `n`: `(n − 1)·stride − 2·padding + k`.
    fn out_side(&self, n: usize, k: usize) -> Result<usize> {
        let full = (n.max(1) - 1) * self.stride + k;
        match full.checked_sub(2 * self.padding) {
            Some(v) if v > 0 => Ok(v),
            _ => candle_core::bail!(
                "conv_transpose: input side {n} with kernel {k}, stride {} and padding {} \
                 gives an empty output",
                self.stride,
                self.padding
            ),
        }
    }
}

impl Module for GemmConvTranspose2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (c_in, c_out, k, _) = self.weight.dims4()?;
        if !x.device().is_cpu() {
            let y = x.conv_transpose2d(&self.weight, self.padding, 0, self.stride, 1)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(&b.reshape((1, c_out, 1, 1))?),
                None => Ok(y),
            };
        }
        let (b, c, h, w) = x.dims4()?;
        if c != c_in {
            candle_core::bail!("conv_transpose: input has {c} channels, the layer expects {c_in}");
        }
        if !matches!(x.dtype(), DType::F32 | DType::F64) {
            candle_core::bail!("conv_transpose: unsupported dtype {:?}", x.dtype());
        }
        let geometry = Geometry {
            b,
            c: c_out,
            h: self.out_side(h, k)?,
            w: self.out_side(w, k)?,
            k,
            stride: self.stride,
            pad: self.padding,
            c_out: c_in,
        };
        debug_assert_eq!((geometry.out_h(), geometry.out_w()), (h, w));
        let bias = match &self.bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(c_out, x.dtype(), x.device())?,
        };
        x.contiguous()?.apply_op3(
            &self.weight.contiguous()?,
            &bias.contiguous()?,
            ConvTranspose2dOp { geometry },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    fn check(dtype: DType, tol: f64, shapes: &[(usize, usize, usize, usize, usize, usize)]) {
        let d = Device::Cpu;
        for &(c_in, c_out, h, k, stride, pad) in shapes {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, dtype, &d);
            let layer = GemmConvTranspose2d::new(c_in, c_out, k, stride, pad, true, vb).unwrap();
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (3, c_in, h, h), &d)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let ours = layer.forward(x.as_tensor()).unwrap();
            let bias = layer.bias.as_ref().unwrap().reshape((1, c_out, 1, 1));
            let theirs = x
                .as_tensor()
                .conv_transpose2d(&layer.weight, pad, 0, stride, 1)
                .unwrap()
                .broadcast_add(&bias.unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let f = crate::nn::max_abs_diff(&ours, &theirs);
            assert!(
                f < tol,
                "forward {c_in} {c_out} {h} {k} {stride} {pad}: {f}"
            );
            let r = Tensor::randn(0f32, 1.0, ours.dims(), &d)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, t) in [
                ("x", x.as_tensor()),
                ("weight", &layer.weight),
                ("bias", layer.bias.as_ref().unwrap()),
            ] {
                let diff = crate::nn::max_abs_diff(g1.get(t).unwrap(), g2.get(t).unwrap());
                assert!(
                    diff < tol,
                    "{name} {c_in} {c_out} {h} {k} {stride} {pad}: {diff}"
                );
            }
        }
    }

    #[test]
    fn matches_candle_conv_transpose2d_forward_and_backward() {
        check(
            DType::F64,
            1e-9,
            &[
                (3, 4, 4, 3, 2, 1),
                (2, 3, 7, 4, 2, 1),
                (1, 2, 5, 3, 1, 1),
                (2, 2, 3, 3, 1, 0),
                (3, 1, 4, 5, 2, 2),
                (2, 3, 2, 3, 3, 0),
            ],
        );
    }

    /// The DB-VAE decoder's layers (4→7→14→28), in f32.
    #[test]
    fn matches_candle_at_the_decoder_sizes_in_f32() {
        check(
            DType::F32,
            1e-3,
            &[
                (72, 48, 4, 3, 2, 1),
                (48, 24, 7, 4, 2, 1),
                (24, 1, 14, 4, 2, 1),
            ],
        );
    }

    /// An input that needs no gradient (the images) skips its GEMMs: the weight and bias
    /// gradients of both layers still match candle's.
    #[test]
    fn an_untracked_input_still_gets_exact_weight_gradients() {
        let d = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &d);
        let conv = crate::nn::GemmConv2d::new(2, 3, 3, 2, 1, true, vb.pp("c")).unwrap();
        let deconv = GemmConvTranspose2d::new(3, 2, 4, 2, 1, true, vb.pp("d")).unwrap();
        let x = Tensor::randn(0f64, 1.0, (2, 2, 8, 8), &d).unwrap();
        let z = Tensor::randn(0f64, 1.0, (2, 3, 4, 4), &d).unwrap();
        let ours = (conv.forward(&x).unwrap().sum_all().unwrap()
            + deconv
                .forward(&z)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        let theirs = (x
            .conv2d(conv.weight(), 1, 2, 1, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            + z.conv_transpose2d(deconv.weight(), 1, 0, 2, 1)
                .unwrap()
                .broadcast_add(&deconv.bias.as_ref().unwrap().reshape((1, 2, 1, 1)).unwrap())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        let (g1, g2) = (ours.backward().unwrap(), theirs.backward().unwrap());
        assert!(g1.get(&x).is_none() && g1.get(&z).is_none());
        for t in [
            conv.weight(),
            deconv.weight(),
            deconv.bias.as_ref().unwrap(),
        ] {
            let diff = crate::nn::max_abs_diff(g1.get(t).unwrap(), g2.get(t).unwrap());
            assert!(diff < 1e-9, "{diff}");
        }
    }

    #[test]
    fn rejects_an_empty_output_and_wrong_channels() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let layer = GemmConvTranspose2d::new(2, 3, 1, 1, 1, true, vb).unwrap();
        let x = Tensor::zeros((1, 2, 1, 1), DType::F32, &Device::Cpu).unwrap();
        assert!(layer.forward(&x).is_err());
        let x = Tensor::zeros((1, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(layer.forward(&x).is_err());
    }
}
