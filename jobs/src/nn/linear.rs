//! A fully connected layer whose bias is added, and differentiated, in one pass.
//!
//! candle's `Linear` adds its bias with `broadcast_add`, whose gradient in the bias is a
//! `sum` over the batch dimension. On the CPU candle sums over a leading dimension one
//! strided element at a time on one thread: for the `[1600, 691]` decoder logits of a
//! GM-DGM step that sum took 3.2 ms against 4.4 ms for the layer's whole matrix product
//! (one thread, timed once in isolation; see the README's steps section).
//! Here the bias is added by [`BiasAdd`] (`x + b` row by row) and its gradient is
//! [`ColumnSum`] (rows accumulated into one row, a pass that vectorises), both split over
//! rows between the rayon threads that also run candle's matrix products.
//!
//! [`linear`] and [`linear_no_bias`] create the same variables, with the same names and
//! initialisation, as `candle_nn`'s, so checkpoints and seeded runs do not change.
//! Other devices and dtypes fall back to candle's `broadcast_add`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// `y = x Wᵀ + b` for `x` `[…, in]`, `W` `[out, in]`, `b` `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer of `weight` `[out, in]` and an optional `bias` `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl From<candle_nn::Linear> for Linear {
    fn from(l: candle_nn::Linear) -> Self {
        Self::new(l.weight().clone(), l.bias().cloned())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match x.dims() {
            [_, _] => x.matmul(&self.weight.t()?)?,
            [] | [_] => candle_core::bail!("linear: input of rank {} (at least 2)", x.rank()),
            dims => {
                // fold the leading dimensions into rows: one matrix product, no broadcast
                let (lead, k) = (&dims[..dims.len() - 1], dims[dims.len() - 1]);
                let rows = lead.iter().product::<usize>();
                let y = x
                    .contiguous()?
                    .reshape((rows, k))?
                    .matmul(&self.weight.t()?)?;
                let mut shape = lead.to_vec();
                shape.push(y.dim(1)?);
                y.reshape(shape)?
            }
        };
        match &self.bias {
            None => Ok(y),
            Some(b) => bias_add(&y, b),
        }
    }
}

/// A [`Linear`] of `in_dim → out_dim` with a bias, its variables `weight` and `bias` under
/// `vb` (created as `candle_nn::linear` creates them).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb).map(Linear::from)
}

/// A [`Linear`] of `in_dim → out_dim` without a bias (as `candle_nn::linear_no_bias`).
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb).map(Linear::from)
}

/// `x + b` with `b` `[n]` added to every row of `x` `[…, n]`: [`BiasAdd`] on the CPU in
/// `f32`/`f64`, `broadcast_add` elsewhere.
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = b.elem_count();
    let fused = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == b.dtype()
        && b.rank() == 1
        && x.rank() >= 1
        && x.dims()[x.rank() - 1] == n
        && n > 0;
    if fused {
        x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
    } else {
        x.broadcast_add(b)
    }
}

/// The CPU [`bias_add`]: `(x [R, n], b [n]) → x + b` per row.
#[derive(Debug, Clone, Copy)]
struct BiasAdd;

/// `out[r, j] = x[r, j] + b[j]`, split over rows between the pool's threads when large.
fn add_rows<T>(x: &[T], b: &[T]) -> Vec<T>
where
    T: Copy + Send + Sync + Default + std::ops::Add<Output = T>,
{
    let n = b.len();
    let mut out = vec![T::default(); x.len()];
    let kernel = |(o, x): (&mut [T], &[T])| {
        for (ro, rx) in o.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
            for ((o, &x), &b) in ro.iter_mut().zip(rx).zip(b) {
                *o = x + b;
            }
        }
    };
    let rows_per_task = super::row_block(x.len(), n);
    if rows_per_task * n >= x.len() {
        kernel((&mut out, x));
    } else {
        out.par_chunks_mut(rows_per_task * n)
            .zip(x.par_chunks(rows_per_task * n))
            .for_each(kernel);
    }
    out
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = super::dispatch2(
            "bias-add",
            ["input", "bias"],
            (s1, l1),
            (s2, l2),
            add_rows::<f32>,
            add_rows::<f64>,
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad.contiguous()?.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// The sum over every dimension but the last: `[…, n] → [n]` (the bias gradient).
#[derive(Debug, Clone, Copy)]
struct ColumnSum;

/// `Σ_r g[r, j]`: each task sums a block of rows into its own row, then the rows are added.
fn sum_rows<T>(g: &[T], n: usize) -> Vec<T>
where
    T: Copy + Send + Sync + Default + std::ops::AddAssign,
{
    let kernel = |g: &[T]| {
        let mut acc = vec![T::default(); n];
        for row in g.chunks_exact(n) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
        acc
    };
    let rows_per_task = super::row_block(g.len(), n);
    if rows_per_task * n >= g.len() {
        return kernel(g);
    }
    let partial: Vec<Vec<T>> = g.par_chunks(rows_per_task * n).map(kernel).collect();
    let mut acc = vec![T::default(); n];
    for p in partial {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    acc
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = "column-sum";
        let n = match l.dims().last() {
            Some(&n) if n > 0 => n,
            _ => candle_core::bail!("{op}: needs a non-empty last dimension"),
        };
        let out = match s {
            CpuStorage::F32(g) => {
                CpuStorage::F32(sum_rows(super::contiguous_slice(op, g, l, "gradient")?, n))
            }
            CpuStorage::F64(g) => {
                CpuStorage::F64(sum_rows(super::contiguous_slice(op, g, l, "gradient")?, n))
            }
            _ => candle_core::bail!("{op}: the gradient must be f32 or f64"),
        };
        Ok((out, Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::max_abs_diff;
    use candle_core::{Device, Var, D};
    use candle_nn::VarMap;

    /// Our layer and candle's on the same variables: same outputs and gradients.
    fn compare(dims: &[usize], dtype: DType) {
        let dev = Device::Cpu;
        let k = dims[dims.len() - 1];
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &dev);
        let ours = linear(k, 7, vb.pp("l")).unwrap();
        let theirs = candle_nn::Linear::new(ours.weight().clone(), ours.bias().cloned());
        let x = Var::from_tensor(
            &Tensor::randn(0f32, 1.0, dims, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let weights = Tensor::randn(0f32, 1.0, 7, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let loss = |y: Tensor| y.broadcast_mul(&weights).unwrap().sqr().unwrap().sum_all();
        let (a, b) = (ours.forward(&x).unwrap(), theirs.forward(&x).unwrap());
        assert_eq!(a.dims(), b.dims());
        assert!(max_abs_diff(&a, &b) < 1e-5);
        let ga = loss(a).unwrap().backward().unwrap();
        let gb = loss(b).unwrap().backward().unwrap();
        for t in [x.as_tensor(), ours.weight(), ours.bias().unwrap()] {
            let (u, v) = (ga.get(t).unwrap(), gb.get(t).unwrap());
            let scale = v
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(D::Minus1)
                .unwrap();
            let scale = scale
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(max_abs_diff(u, v) <= 1e-5 * scale.max(1.0), "{dims:?}");
        }
    }

    #[test]
    fn matches_candle_linear_in_value_and_gradient() {
        compare(&[5, 3], DType::F32);
        compare(&[4, 2, 3], DType::F64);
        // large enough to split rows between threads
        compare(&[300, 200], DType::F32);
    }

    #[test]
    fn bias_sum_of_many_rows_is_exact_enough() {
        let g: Vec<f64> = (0..100_000).map(|i| (i % 7) as f64).collect();
        let s = sum_rows(&g, 10);
        let want: Vec<f64> = (0..10)
            .map(|j| (0..10_000).map(|r| ((r * 10 + j) % 7) as f64).sum())
            .collect();
        assert_eq!(s, want);
    }

    #[test]
    fn rejects_a_rank_one_input() {
        let dev = Device::Cpu;
        let vb = VarBuilder::zeros(DType::F32, &dev);
        let l = linear(3, 2, vb).unwrap();
        let err = l
            .forward(&Tensor::zeros(3, DType::F32, &dev).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("rank 1"), "{err}");
    }
}
