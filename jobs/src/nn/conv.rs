//! A 2-D convolution computed as im2col + one GEMM, for speed on CPU.
//!
//! candle's CPU `conv2d` backward goes through a naive `conv_transpose2d`, which is
//! several times slower than the forward pass. Here the convolution is an
//! [`Im2Col`] custom op (whose backward is the matching col2im) followed by a plain
//! `matmul`, so both gradients are GEMMs. Off the CPU, candle's own `conv2d` is used.
//! Parameter names and shapes match `candle_nn::conv2d` (`weight` `[out, in, k, k]`,
//! `bias` `[out]`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

/// Geometry of an im2col transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Geometry {
    fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    fn cols(&self) -> usize {
        self.c * self.k * self.k
    }
    fn rows_per_image(&self) -> usize {
        self.out_h() * self.out_w()
    }
}

/// Threads of the im2col/col2im loops: `RAYON_NUM_THREADS` when set (the variable candle's
/// CPU GEMM and rayon follow, so one setting bounds a rank's threads), else every CPU.
fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// Runs `f(image_index, chunk)` over per-image chunks of `out` on a few threads (on this
/// one when only one is wanted).
fn per_image<T: Send>(out: &mut [T], per: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let n = threads().min(out.len() / per.max(1)).max(1);
    if n == 1 {
        for (i, img) in out.chunks_mut(per.max(1)).enumerate() {
            f(i, img);
        }
        return;
    }
    let images = out.len() / per.max(1);
    let per_thread = images.div_ceil(n).max(1);
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(per_thread * per).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, img) in chunk.chunks_mut(per).enumerate() {
                    f(t * per_thread + i, img);
                }
            });
        }
    });
}

fn im2col<T: Copy + Default + Send + Sync>(x: &[T], g: Geometry) -> Vec<T> {
    let (oh, ow, kk) = (g.out_h(), g.out_w(), g.cols());
    let per = oh * ow * kk;
    let mut out = vec![T::default(); g.b * per];
    per_image(&mut out, per, |b, dst| {
        let src = &x[b * g.c * g.h * g.w..(b + 1) * g.c * g.h * g.w];
        for oy in 0..oh {
            for ox in 0..ow {
                let row = &mut dst[(oy * ow + ox) * kk..(oy * ow + ox + 1) * kk];
                for c in 0..g.c {
                    for ky in 0..g.k {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        let base = (c * g.k + ky) * g.k;
                        if iy < 0 || iy >= g.h as isize {
                            continue; // stays zero
                        }
                        let src_row = &src[(c * g.h + iy as usize) * g.w..][..g.w];
                        for kx in 0..g.k {
                            let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                            if ix >= 0 && ix < g.w as isize {
                                row[base + kx] = src_row[ix as usize];
                            }
                        }
                    }
                }
            }
        }
    });
    out
}

fn col2im<T: Copy + Default + Send + Sync + std::ops::AddAssign>(
    cols: &[T],
    g: Geometry,
) -> Vec<T> {
    let (oh, ow, kk) = (g.out_h(), g.out_w(), g.cols());
    let per = g.c * g.h * g.w;
    let mut out = vec![T::default(); g.b * per];
    per_image(&mut out, per, |b, dst| {
        let src = &cols[b * oh * ow * kk..(b + 1) * oh * ow * kk];
        for oy in 0..oh {
            for ox in 0..ow {
                let row = &src[(oy * ow + ox) * kk..(oy * ow + ox + 1) * kk];
                for c in 0..g.c {
                    for ky in 0..g.k {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let base = (c * g.k + ky) * g.k;
                        let dst_row = &mut dst[(c * g.h + iy as usize) * g.w..][..g.w];
                        for kx in 0..g.k {
                            let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                            if ix >= 0 && ix < g.w as isize {
                                dst_row[ix as usize] += row[base + kx];
                            }
                        }
                    }
                }
            }
        }
    });
    out
}

fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("im2col/col2im need a contiguous input"),
    }
}

/// `[B, C, H, W]` → `[B, OH·OW, C·K·K]` patches; backward is [`Col2Im`].
#[derive(Debug, Clone, Copy)]
pub struct Im2Col {
    geometry: Geometry,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "trainyard-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let shape = Shape::from((g.b, g.rows_per_image(), g.cols()));
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(im2col(contiguous_slice(v, layout)?, g)),
            CpuStorage::F64(v) => CpuStorage::F64(im2col(contiguous_slice(v, layout)?, g)),
            other => candle_core::bail!("im2col: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?.apply_op1_no_bwd(&Col2Im {
            geometry: self.geometry,
        })?;
        Ok(Some(grad))
    }
}

/// `[B, OH·OW, C·K·K]` → `[B, C, H, W]`, summing overlapping patches (the adjoint of
/// [`Im2Col`]). Has no backward of its own (no second derivatives).
#[derive(Debug, Clone, Copy)]
pub struct Col2Im {
    geometry: Geometry,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "trainyard-col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let shape = Shape::from((g.b, g.c, g.h, g.w));
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(col2im(contiguous_slice(v, layout)?, g)),
            CpuStorage::F64(v) => CpuStorage::F64(col2im(contiguous_slice(v, layout)?, g)),
            other => candle_core::bail!("col2im: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, shape))
    }
}

/// A square 2-D convolution layer (im2col + GEMM on CPU).
#[derive(Debug, Clone)]
pub struct GemmConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl GemmConv2d {
    /// Creates `weight` `[c_out, c_in, k, k]` (and `bias` `[c_out]` if `bias`) under `vb`,
    /// with candle_nn's default initialisation.
    pub fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (c_out, c_in, k, k),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = if bias {
            let bound = 1.0 / ((c_in * k * k) as f64).sqrt();
            Some(vb.get_with_hints(
                c_out,
                "bias",
                candle_nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?)
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

    /// The weight tensor.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for GemmConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (c_out, c_in, k, _) = self.weight.dims4()?;
        if !x.device().is_cpu() {
            let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(&b.reshape((1, c_out, 1, 1))?),
                None => Ok(y),
            };
        }
        let (b, c, h, w) = x.dims4()?;
        if c != c_in {
            candle_core::bail!("conv: input has {c} channels, the layer expects {c_in}");
        }
        let geometry = Geometry {
            b,
            c,
            h,
            w,
            k,
            stride: self.stride,
            pad: self.padding,
        };
        if h + 2 * self.padding < k || w + 2 * self.padding < k {
            candle_core::bail!("conv: input {h}x{w} is smaller than the kernel {k}");
        }
        let (oh, ow) = (geometry.out_h(), geometry.out_w());
        let cols = x.contiguous()?.apply_op1(Im2Col { geometry })?;
        let wm = self.weight.reshape((c_out, geometry.cols()))?;
        let mut y = cols
            .reshape((b * oh * ow, geometry.cols()))?
            .matmul(&wm.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        y.reshape((b, oh * ow, c_out))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, c_out, oh, ow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn matches_candle_conv2d_forward_and_backward() {
        let d = Device::Cpu;
        for (c_in, c_out, h, k, stride, pad) in [
            (3, 4, 7, 3, 1, 1),
            (2, 3, 9, 4, 2, 1),
            (1, 2, 6, 3, 1, 0),
            (2, 2, 5, 3, 2, 0),
        ] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F64, &d);
            let conv = GemmConv2d::new(c_in, c_out, k, stride, pad, true, vb).unwrap();
            let x =
                Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, c_in, h, h), &d).unwrap()).unwrap();
            let ours = conv.forward(x.as_tensor()).unwrap();
            let bias = conv
                .bias
                .as_ref()
                .unwrap()
                .reshape((1, c_out, 1, 1))
                .unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(&conv.weight, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_diff(&ours, &theirs) < 1e-10);
            // gradients w.r.t. input, weight and bias agree for a random cotangent
            let r = Tensor::randn(0f64, 1.0, ours.dims(), &d).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for t in [x.as_tensor(), &conv.weight, conv.bias.as_ref().unwrap()] {
                let diff = max_diff(g1.get(t).unwrap(), g2.get(t).unwrap());
                assert!(diff < 1e-9, "{c_in} {c_out} {h} {k} {stride} {pad}: {diff}");
            }
        }
    }
}
