//! Neural-network layers shared by jobs, where candle's own are slow or missing.

pub mod conv;
pub mod conv_transpose;
pub mod fastmath;
pub mod linear;
pub mod norm;

pub use conv::GemmConv2d;
pub use conv_transpose::GemmConvTranspose2d;
pub use linear::{bias_add, linear, linear_no_bias, Linear};
pub use norm::GroupNorm;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// Elements below which a row-wise CPU kernel runs on the calling thread: handing work to
/// rayon's pool costs more than it saves for small tensors.
pub(crate) const PARALLEL_MIN: usize = 1 << 15;

/// Rows per parallel task for a kernel over `len / n` rows of `n`: all of them (run
/// inline) below [`PARALLEL_MIN`] elements, else enough for about 4 tasks per thread.
pub(crate) fn row_block(len: usize, n: usize) -> usize {
    let rows = len / n.max(1);
    if len < PARALLEL_MIN {
        return rows.max(1);
    }
    let tasks = 4 * rayon::current_num_threads();
    rows.div_ceil(tasks).max(1)
}

/// The contiguous data of one argument of a custom op (`what` names it in the error).
pub(crate) fn contiguous_slice<'a, T>(
    op: &str,
    data: &'a [T],
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the {what} must be contiguous"),
    }
}

/// Runs the `f32` or `f64` kernel of a two-argument custom op `op` on its CPU storages,
/// which must share one of those dtypes and be contiguous (`names` name the arguments in
/// errors).
pub(crate) fn dispatch2(
    op: &str,
    names: [&str; 2],
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f32_kernel: impl Fn(&[f32], &[f32]) -> Vec<f32>,
    f64_kernel: impl Fn(&[f64], &[f64]) -> Vec<f64>,
) -> Result<CpuStorage> {
    let [n1, n2] = names;
    Ok(match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(f32_kernel(
            contiguous_slice(op, a, l1, n1)?,
            contiguous_slice(op, b, l2, n2)?,
        )),
        (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(f64_kernel(
            contiguous_slice(op, a, l1, n1)?,
            contiguous_slice(op, b, l2, n2)?,
        )),
        _ => candle_core::bail!(
            "{op}: unsupported dtypes {:?}, {:?}",
            s1.dtype(),
            s2.dtype()
        ),
    })
}

/// Runs the `f32` or `f64` kernel of a three-argument custom op `op` on its CPU storages,
/// which must share one of those dtypes and be contiguous (`names` name the arguments in
/// errors).
pub(crate) fn dispatch3(
    op: &str,
    names: [&str; 3],
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    f32_kernel: impl Fn(&[f32], &[f32], &[f32]) -> Vec<f32>,
    f64_kernel: impl Fn(&[f64], &[f64], &[f64]) -> Vec<f64>,
) -> Result<CpuStorage> {
    let [n1, n2, n3] = names;
    Ok(match (s1, s2, s3) {
        (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => {
            CpuStorage::F32(f32_kernel(
                contiguous_slice(op, a, l1, n1)?,
                contiguous_slice(op, b, l2, n2)?,
                contiguous_slice(op, c, l3, n3)?,
            ))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => {
            CpuStorage::F64(f64_kernel(
                contiguous_slice(op, a, l1, n1)?,
                contiguous_slice(op, b, l2, n2)?,
                contiguous_slice(op, c, l3, n3)?,
            ))
        }
        _ => candle_core::bail!(
            "{op}: unsupported dtypes {:?}, {:?}, {:?}",
            s1.dtype(),
            s2.dtype(),
            s3.dtype()
        ),
    })
}

/// The gradients `(dx, dW, db)` of a convolution-like op, from its backward op's flat
/// `[dx | dW | db]` output: `dx` and `dW` reshaped to `dx_shape` and `dw_shape`, only the
/// `want`ed ones kept (the bias's always).
fn split_grads(
    all: &candle_core::Tensor,
    dx_shape: (usize, usize, usize, usize),
    dw_shape: (usize, usize, usize, usize),
    db_len: usize,
    want: conv::Wanted,
) -> Result<(
    Option<candle_core::Tensor>,
    Option<candle_core::Tensor>,
    Option<candle_core::Tensor>,
)> {
    let nx = dx_shape.0 * dx_shape.1 * dx_shape.2 * dx_shape.3;
    let nw = dw_shape.0 * dw_shape.1 * dw_shape.2 * dw_shape.3;
    let dx = all.narrow(0, 0, nx)?.reshape(dx_shape)?;
    let dw = all.narrow(0, nx, nw)?.reshape(dw_shape)?;
    let db = all.narrow(0, nx + nw, db_len)?;
    Ok((
        want.input.then_some(dx),
        want.weight.then_some(dw),
        Some(db),
    ))
}

/// The largest absolute difference of two tensors of one shape, in f64 (for the tests that
/// compare these layers with candle's).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    use candle_core::DType;
    let (a, b) = (
        a.to_dtype(DType::F64).unwrap(),
        b.to_dtype(DType::F64).unwrap(),
    );
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
