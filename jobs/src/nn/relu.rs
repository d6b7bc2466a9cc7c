//! ReLU as one pass forward and one pass backward on the CPU.
//!
//! candle's `relu` gradient builds `zeros_like(x)`, a `ge` mask, converts the mask to the
//! dtype and multiplies: four passes over the tensor and three temporaries, each an op on
//! candle's element-wise pool. [`relu`] computes the same values and the same gradient (it
//! flows where `x ≥ 0`, as candle's) in one pass each, split between rayon's threads when
//! large ([`super::zip_rows`]). Other devices and dtypes use candle's `relu`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `max(x, 0)`, with candle's gradient (`1` where `x ≥ 0`, else `0`).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.contiguous()?.apply_op1(Relu)
    } else {
        x.relu()
    }
}

/// The CPU [`relu`].
#[derive(Debug, Clone, Copy)]
struct Relu;

/// Element-wise `f(x)` into a new vector, in parallel blocks when large.
fn map<T: Copy + Default + Send + Sync>(x: &[T], f: impl Fn(T) -> T + Sync + Send) -> Vec<T> {
    let mut out = vec![T::default(); x.len()];
    super::zip_rows(&mut out, x, 1, |o, x| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = f(x);
        }
    });
    out
}

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = "relu";
        let out = match s {
            CpuStorage::F32(x) => {
                CpuStorage::F32(map(super::contiguous_slice(op, x, l, "input")?, |v| {
                    v.max(0.0)
                }))
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(map(super::contiguous_slice(op, x, l, "input")?, |v| {
                    v.max(0.0)
                }))
            }
            _ => candle_core::bail!("{op}: the input must be f32 or f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &ReluGrad)?))
    }
}

/// The gradient of [`Relu`]: `(x, g) → g` where `x ≥ 0`, else `0`.
#[derive(Debug, Clone, Copy)]
struct ReluGrad;

/// `g` where `x ≥ 0`, else zero, in parallel blocks when large.
fn mask<T: Copy + Default + PartialOrd + Send + Sync>(x: &[T], g: &[T]) -> Vec<T> {
    let zero = T::default();
    let mut out = g.to_vec();
    super::zip_rows(&mut out, x, 1, |o, x| {
        for (o, &x) in o.iter_mut().zip(x) {
            // below zero, or NaN (no order), gets zero, as candle's `x >= 0` mask gives it
            if matches!(x.partial_cmp(&zero), None | Some(std::cmp::Ordering::Less)) {
                *o = zero;
            }
        }
    });
    out
}

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "relu-grad: input {:?} vs gradient {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let out = super::dispatch2(
            "relu-grad",
            ["input", "gradient"],
            (s1, l1),
            (s2, l2),
            mask::<f32>,
            mask::<f64>,
        )?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_relu_in_value_and_gradient() {
        let dev = Device::Cpu;
        for (n, dtype) in [
            (7usize, DType::F32),
            (50_000, DType::F32),
            (301, DType::F64),
        ] {
            // values on both sides of zero, zero itself and -0.0
            let mut v: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            v[0] = -0.0;
            let x = Var::from_tensor(
                &Tensor::from_vec(v, n, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let w = Tensor::randn(0f32, 1.0, n, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let (a, b) = (relu(&x).unwrap(), x.relu().unwrap());
            assert_eq!(crate::nn::max_abs_diff(&a, &b), 0.0);
            let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (ga, gb) = (ga.get(&x).unwrap(), gb.get(&x).unwrap());
            assert_eq!(crate::nn::max_abs_diff(ga, gb), 0.0, "{n} {dtype:?}");
        }
    }

    #[test]
    fn nan_gets_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::new(&[f32::NAN, 1.0, -1.0], &dev).unwrap();
        let g = relu(&x).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(&x).unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 1.0, 0.0]
        );
    }
}
