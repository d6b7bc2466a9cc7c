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

use candle_core::{Result, Tensor};

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
pub(crate) fn combine(y: &Tensor, dt: f64, coeffs: &[f64], ks: &[Tensor]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (c, k) in coeffs.iter().zip(ks) {
        if *c == 0.0 {
            continue;
        }
        let term = (k * (c * dt))?;
        acc = Some(match acc {
            Some(a) => (a + term)?,
            None => term,
        });
    }
    match acc {
        Some(a) => y + a,
        None => Ok(y.clone()),
    }
}
