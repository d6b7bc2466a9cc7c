//! ODE solvers over candle tensors, differentiable by plain autograd ("backprop through
//! the solver"): adaptive Dormand–Prince 5(4) ([`dopri5`]) and fixed-step RK4 ([`rk4`]).
//!
//! The state is one tensor (for a batch, the whole batch is one state, as in
//! torchdiffeq: one shared step size, error norms over all elements). Step-size
//! decisions use detached values, so gradients flow through the stages and the
//! solution but not through the choice of step sizes.
//!
//! # Counting function evaluations
//! * `nfe_forward`: every call of `f`, including rejected steps and the two calls of
//!   the initial-step heuristic.
//! * `nfe_backward`: the calls of `f` whose graph the backward pass traverses, i.e.
//!   those that contribute to the returned solution. For dopri5 with `A` accepted
//!   steps that is `6·A`: `f(t0, y0)` (the first step's k1), stages k2–k6 of every
//!   accepted step, and the FSAL stage k7 of every accepted step but the last (it is
//!   the next step's k1). Rejected steps, the initial-step probe and the final k7
//!   are never traversed. For RK4 it equals `nfe_forward = 4·steps`. The adjoint
//!   method ([`adjoint`]) solves a second ODE backwards and counts its own evaluations
//!   (one vector–Jacobian product each).

pub mod adjoint;
pub mod dopri5;
pub mod rk4;

pub use dopri5::{dopri5, Dopri5Options};
pub use rk4::rk4;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Function-evaluation and step counts of one solve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SolveStats {
    /// Calls of `f` during the solve.
    pub nfe_forward: usize,
    /// Calls of `f` that contribute to the solution (traversed by backprop).
    pub nfe_backward: usize,
    /// Accepted steps.
    pub accepted: usize,
    /// Rejected steps.
    pub rejected: usize,
}

/// The state at `t1` and the solve's statistics.
#[derive(Debug, Clone)]
pub struct OdeSolution {
    /// y(t1).
    pub y: Tensor,
    /// Counts.
    pub stats: SolveStats,
}

/// Which solver to use, with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Solver {
    /// Adaptive Dormand–Prince 5(4).
    Dopri5(Dopri5Options),
    /// Classic RK4 with this many equal steps.
    Rk4 {
        /// Number of steps on `[t0, t1]`.
        steps: usize,
    },
}

impl Solver {
    /// Solves dy/dt = f(t, y) from `t0` to `t1` starting at `y0`.
    pub fn solve(
        &self,
        f: &mut dyn FnMut(f64, &Tensor) -> Result<Tensor>,
        y0: &Tensor,
        t0: f64,
        t1: f64,
    ) -> Result<OdeSolution> {
        match self {
            Solver::Dopri5(opts) => dopri5(f, y0, t0, t1, opts),
            Solver::Rk4 { steps } => rk4(f, y0, t0, t1, *steps),
        }
    }
}

/// Root mean square of all elements, as f64 (a detached scalar).
pub(crate) fn rms(x: &Tensor) -> Result<f64> {
    let n = x.elem_count().max(1) as f64;
    let s = x
        .detach()
        .to_dtype(candle_core::DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok((s / n).sqrt())
}

/// `y + dt · Σ coeffs[i] · ks[i]`, skipping zero coefficients.
///
/// On the CPU each term after the first is added by one fused op ([`Axpy`]) rather than
/// candle's scale-then-add (two tensors and two sweeps a term), with the same rounding:
/// the sum is bit for bit what `acc + k·(c·dt)` gives.
pub(crate) fn combine(y: &Tensor, dt: f64, coeffs: &[f64], ks: &[Tensor]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (c, k) in coeffs.iter().zip(ks) {
        if *c == 0.0 {
            continue;
        }
        acc = Some(match acc {
            Some(a) if Axpy::applies(&a, k) => a.apply_op2(k, Axpy { s: c * dt })?,
            Some(a) => (a + (k * (c * dt))?)?,
            None => (k * (c * dt))?,
        });
    }
    match acc {
        Some(a) => y + a,
        None => Ok(y.clone()),
    }
}

/// `a + s·b` in one sweep on the CPU (f32, f64; equal shapes): `s·b` rounded to the
/// dtype, then the sum, as candle's `a + b·s` rounds. Backward: `(g, s·g)`.
#[derive(Debug, Clone, Copy)]
struct Axpy {
    s: f64,
}

impl Axpy {
    /// Whether the fused op serves `a + s·b` (else candle's ops do).
    fn applies(a: &Tensor, b: &Tensor) -> bool {
        a.device().is_cpu()
            && a.dtype() == b.dtype()
            && matches!(a.dtype(), DType::F32 | DType::F64)
            && a.dims() == b.dims()
            && a.is_contiguous()
            && b.is_contiguous()
    }
}

impl CustomOp2 for Axpy {
    fn name(&self) -> &'static str {
        "trainyard-axpy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        if l1.shape() != l2.shape() {
            candle_core::bail!("{op}: operands of different shapes");
        }
        let sf = self.s as f32;
        let out = crate::nn::dispatch2(
            op,
            ["first operand", "second operand"],
            (s1, l1),
            (s2, l2),
            |a, b| a.iter().zip(b).map(|(a, b)| *a + *b * sf).collect(),
            |a, b| a.iter().zip(b).map(|(a, b)| *a + *b * self.s).collect(),
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some((grad * self.s)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused combination gives the same values (bit for bit) and gradients as candle's
    /// scale-then-add chain, in f32 and f64.
    #[test]
    fn combine_matches_the_unfused_chain() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let vars: Vec<Var> = (0..4)
                .map(|_| {
                    Var::from_tensor(
                        &Tensor::randn(0f64, 1.0, (3, 5), &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    )
                    .unwrap()
                })
                .collect();
            let y = vars[0].as_tensor();
            let ks: Vec<Tensor> = vars[1..].iter().map(|v| v.as_tensor().clone()).collect();
            let (dt, coeffs) = (0.37, [0.25, 0.0, -1.5]);
            let fused = combine(y, dt, &coeffs, &ks).unwrap();
            let mut acc = (&ks[0] * (coeffs[0] * dt)).unwrap();
            acc = (acc + (&ks[2] * (coeffs[2] * dt)).unwrap()).unwrap();
            let plain = (y + acc).unwrap();
            let bits = |t: &Tensor| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            assert_eq!(bits(&fused), bits(&plain), "{dtype:?}");
            let r = Tensor::randn(0f64, 1.0, (3, 5), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let g1 = (&fused * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (&plain * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&vars[0], &vars[1], &vars[3]] {
                let (a, b) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(bits(a), bits(b), "{dtype:?}");
            }
            assert!(g1.get(vars[2].as_tensor()).is_none());
        }
    }
}
