//! The adjoint sensitivity method (Chen et al. 2018, §2; torchdiffeq's `adjoint.py`):
//! gradients of a loss through an ODE solve in memory independent of the number of solver
//! steps.
//!
//! The forward pass ([`solve_no_grad`]) integrates dz/dt = f(t, z; θ) without keeping a
//! graph: every evaluation of `f` is detached, so nothing of the solver's stages stays
//! alive. The backward pass ([`adjoint_backward`]) integrates the augmented state
//! s = [z, a, a_θ] backwards in time with the same solver, where a(t) = ∂L/∂z(t):
//!
//! * dz/dt = f(t, z; θ)
//! * da/dt = −aᵀ ∂f/∂z
//! * da_θ/dt = −aᵀ ∂f/∂θ
//!
//! from s(t1) = [z(t1), ∂L/∂z(t1), 0] to t0, giving ∂L/∂z(t0) = a(t0) and
//! ∂L/∂θ = a_θ(t0). Both vector–Jacobian products come from one reverse-mode pass of
//! candle's autograd per evaluation: `f(t, z)` is recomputed with `z` as a fresh [`Var`]
//! (the parameters are `Var`s already), and `(f · a).sum().backward()` yields aᵀ∂f/∂z and
//! aᵀ∂f/∂θ.
//!
//! With several output times t0 < t1 < … < tN, the backward pass runs segment by segment:
//! at each tᵢ it resets z to the stored forward value z(tᵢ) and adds the external gradient
//! ∂L/∂z(tᵢ) to a (torchdiffeq does the same). The augmented state is one flat tensor, so
//! the adaptive solver's error norm covers z, a and a_θ together (torchdiffeq's default).
//!
//! candle has no custom autograd functions, so a model using the adjoint splits its
//! backward pass in three: the part after the solve (a loss head) is differentiated with
//! z(t1) as a leaf [`Var`], the adjoint gives the solve's gradients, and the part before it
//! is differentiated with `(z0 · ∂L/∂z0).sum().backward()`; [`accumulate`] merges them.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::{SolveStats, Solver};

/// The forward solve's outputs: `ys[i]` = z(`ts[i]`) (detached, `ys[0]` is `y0`).
#[derive(Debug, Clone)]
pub struct ForwardSolution {
    /// States at the requested times, without a graph.
    pub ys: Vec<Tensor>,
    /// Counts summed over the segments.
    pub stats: SolveStats,
}

/// The adjoint backward pass's results.
#[derive(Debug, Clone)]
pub struct AdjointGrads {
    /// ∂L/∂z(t0).
    pub grad_y0: Tensor,
    /// ∂L/∂θ, one per parameter in the order given.
    pub grad_params: Vec<Tensor>,
    /// Counts of the augmented backward solve (`nfe_forward` = vector–Jacobian products).
    pub stats: SolveStats,
}

fn add_stats(total: &mut SolveStats, s: SolveStats) {
    total.nfe_forward += s.nfe_forward;
    total.nfe_backward += s.nfe_backward;
    total.accepted += s.accepted;
    total.rejected += s.rejected;
}

/// Solves dy/dt = f(t, y) through the times `ts` (at least two, monotone) without keeping
/// an autograd graph, and returns y at every time. Memory is that of a few states,
/// whatever the number of steps.
pub fn solve_no_grad(
    solver: &Solver,
    f: &mut dyn FnMut(f64, &Tensor) -> Result<Tensor>,
    y0: &Tensor,
    ts: &[f64],
) -> Result<ForwardSolution> {
    if ts.len() < 2 {
        candle_core::bail!("solve_no_grad needs at least two times, got {}", ts.len());
    }
    let mut stats = SolveStats::default();
    let mut g = |t: f64, y: &Tensor| -> Result<Tensor> { Ok(f(t, &y.detach())?.detach()) };
    let mut ys = Vec::with_capacity(ts.len());
    let mut y = y0.detach();
    ys.push(y.clone());
    for w in ts.windows(2) {
        let sol = solver.solve(&mut g, &y, w[0], w[1])?;
        add_stats(&mut stats, sol.stats);
        y = sol.y.detach();
        ys.push(y.clone());
    }
    Ok(ForwardSolution { ys, stats })
}

/// The adjoint backward pass of a solve through `ts` whose forward outputs are `ys` (from
/// [`solve_no_grad`]). `grad_ys[i]` is ∂L/∂z(`ts[i]`) (`None`: the loss does not use that
/// output). `params` are the `Var`s that `f` uses; `f` must build its output from them and
/// from its `z` argument with candle ops, so that autograd reaches both. All tensors must
/// share one dtype.
pub fn adjoint_backward(
    solver: &Solver,
    f: &mut dyn FnMut(f64, &Tensor) -> Result<Tensor>,
    params: &[Var],
    ts: &[f64],
    ys: &[Tensor],
    grad_ys: &[Option<Tensor>],
) -> Result<AdjointGrads> {
    let n = ts.len();
    if n < 2 || ys.len() != n || grad_ys.len() != n {
        candle_core::bail!(
            "adjoint_backward: {} times, {} states, {} gradients (need equal, at least 2)",
            n,
            ys.len(),
            grad_ys.len()
        );
    }
    let shape = ys[0].shape().clone();
    let nz = ys[0].elem_count();
    let sizes: Vec<usize> = params.iter().map(|p| p.elem_count()).collect();
    let dtype = ys[0].dtype();
    let device = ys[0].device().clone();

    // ds/dt for s = [z, a, a_θ] (flat). One reverse pass of f per evaluation.
    let mut aug = |t: f64, s: &Tensor| -> Result<Tensor> {
        let z = s.narrow(0, 0, nz)?.reshape(&shape)?;
        let a = s.narrow(0, nz, nz)?.reshape(&shape)?.detach();
        let zv = Var::from_tensor(&z.detach())?;
        let fz = f(t, zv.as_tensor())?;
        let grads = (&fz * &a)?.sum_all()?.backward()?;
        let mut parts = Vec::with_capacity(2 + params.len());
        parts.push(fz.detach().flatten_all()?);
        let gz = match grads.get(zv.as_tensor()) {
            Some(g) => g.neg()?.flatten_all()?,
            None => Tensor::zeros(nz, dtype, &device)?,
        };
        parts.push(gz);
        for (p, &size) in params.iter().zip(&sizes) {
            parts.push(match grads.get(p.as_tensor()) {
                Some(g) => g.neg()?.flatten_all()?.to_dtype(dtype)?,
                None => Tensor::zeros(size, dtype, &device)?,
            });
        }
        Tensor::cat(&parts, 0)
    };

    let zeros_z = Tensor::zeros(nz, dtype, &device)?;
    let flat_grad = |g: &Option<Tensor>| -> Result<Tensor> {
        match g {
            Some(g) => g.detach().to_dtype(dtype)?.flatten_all(),
            None => Ok(zeros_z.clone()),
        }
    };
    let mut a = flat_grad(&grad_ys[n - 1])?;
    let total: usize = sizes.iter().sum();
    let mut a_theta = Tensor::zeros(total, dtype, &device)?;
    let mut stats = SolveStats::default();
    for i in (1..n).rev() {
        let z = ys[i].detach().flatten_all()?.to_dtype(dtype)?;
        let s = Tensor::cat(&[&z, &a, &a_theta], 0)?;
        let sol = solver.solve(&mut aug, &s, ts[i], ts[i - 1])?;
        add_stats(&mut stats, sol.stats);
        // z is reset to the stored forward value at the next segment; keep a and a_θ.
        a = (sol.y.narrow(0, nz, nz)? + flat_grad(&grad_ys[i - 1])?)?;
        a_theta = sol.y.narrow(0, 2 * nz, total)?;
    }
    let mut grad_params = Vec::with_capacity(params.len());
    let mut offset = 0;
    for (p, &size) in params.iter().zip(&sizes) {
        grad_params.push(
            a_theta
                .narrow(0, offset, size)?
                .reshape(p.shape())?
                .to_dtype(p.dtype())?,
        );
        offset += size;
    }
    Ok(AdjointGrads {
        grad_y0: a.reshape(&shape)?,
        grad_params,
        stats,
    })
}

/// Adds `grads[i]` to `store`'s gradient of `vars[i]` (inserting it where there is none).
pub fn accumulate(store: &mut GradStore, vars: &[Var], grads: &[Tensor]) -> Result<()> {
    for (v, g) in vars.iter().zip(grads) {
        let sum = match store.get(v.as_tensor()) {
            Some(old) => (old + g)?,
            None => g.clone(),
        };
        store.insert(v.as_tensor(), sum);
    }
    Ok(())
}

/// The relative difference `max|x − y| / max(max|y|, tiny)` of two tensors, as f64 (for
/// comparing gradient modes).
pub fn max_rel_diff(x: &Tensor, y: &Tensor) -> Result<f64> {
    let x = x.to_dtype(candle_core::DType::F64)?.flatten_all()?;
    let y = y.to_dtype(candle_core::DType::F64)?.flatten_all()?;
    let diff = (&x - &y)?.abs()?.max(0)?.to_scalar::<f64>()?;
    let scale = y.abs()?.max(0)?.to_scalar::<f64>()?;
    Ok(diff / scale.max(1e-300))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Linear;
    use crate::ode::Dopri5Options;
    use candle_core::{DType, Device};
    use candle_nn::{Module, VarBuilder, VarMap};

    #[test]
    fn decay_gradients_match_the_closed_form() {
        // z(1) = z0 e^{-k}, L = Σ z(1): dL/dz0 = e^{-k}, dL/dk = -Σ z0 e^{-k}
        let dev = Device::Cpu;
        let k = Var::new(&[0.7f64], &dev).unwrap();
        let kt = k.as_tensor().clone();
        let mut f = |_t: f64, z: &Tensor| z.broadcast_mul(&kt)?.neg();
        let z0 = Tensor::new(&[1.5f64, -0.5], &dev).unwrap();
        let solver = Solver::Dopri5(Dopri5Options::new(1e-10, 1e-10));
        let ts = [0.0, 1.0];
        let fwd = solve_no_grad(&solver, &mut f, &z0, &ts).unwrap();
        let gy = fwd.ys[1].ones_like().unwrap();
        let g = adjoint_backward(
            &solver,
            &mut f,
            std::slice::from_ref(&k),
            &ts,
            &fwd.ys,
            &[None, Some(gy)],
        )
        .unwrap();
        let e = (-0.7f64).exp();
        let gz = g.grad_y0.to_vec1::<f64>().unwrap();
        assert!(
            (gz[0] - e).abs() < 1e-8 && (gz[1] - e).abs() < 1e-8,
            "{gz:?}"
        );
        let gk = g.grad_params[0].to_vec1::<f64>().unwrap()[0];
        assert!((gk + 1.0 * e).abs() < 1e-8, "{gk}");
        assert!(g.stats.nfe_forward > 0);
    }

    /// f(t, z) = W2 tanh(W1 [z, t] + b1) + b2: a small MLP in f64.
    struct Mlp {
        l1: Linear,
        l2: Linear,
    }

    impl Mlp {
        fn new(d: usize, h: usize, vb: VarBuilder) -> Self {
            Self {
                l1: crate::nn::linear(d + 1, h, vb.pp("l1")).unwrap(),
                l2: crate::nn::linear(h, d, vb.pp("l2")).unwrap(),
            }
        }
        fn forward(&self, t: f64, z: &Tensor) -> Result<Tensor> {
            let tt = Tensor::full(t, (z.dim(0)?, 1), z.device())?.to_dtype(z.dtype())?;
            let h = self.l1.forward(&Tensor::cat(&[z, &tt], 1)?)?.tanh()?;
            self.l2.forward(&h)
        }
    }

    #[test]
    fn adjoint_matches_backprop_through_the_solver() {
        // Tolerance 1e-9 on f64 for both modes: they then agree to ~1e-7 relative.
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let mlp = Mlp::new(3, 16, vb);
        let params: Vec<Var> = vm.all_vars();
        let z0v = Var::new(&[[0.5f64, -1.0, 0.2], [1.0, 0.3, -0.4]], &dev).unwrap();
        let target = Tensor::new(&[[0.1f64, 0.2, 0.3], [-0.3, 0.0, 0.5]], &dev).unwrap();
        let solver = Solver::Dopri5(Dopri5Options::new(1e-9, 1e-9));
        // Loss over three output times: Σ_i |z(t_i) − target|² weights (1, 2, 3).
        let ts = [0.0, 0.4, 1.1, 2.0];
        let mut f = |t: f64, z: &Tensor| mlp.forward(t, z);

        // backprop through the solver, segment by segment
        let mut loss = Tensor::zeros((), DType::F64, &dev).unwrap();
        let mut y = z0v.as_tensor().clone();
        for (i, w) in ts.windows(2).enumerate() {
            y = solver.solve(&mut f, &y, w[0], w[1]).unwrap().y;
            let term = (((&y - &target).unwrap().sqr().unwrap().sum_all().unwrap())
                * (i + 1) as f64)
                .unwrap();
            loss = (loss + term).unwrap();
        }
        let bp = loss.backward().unwrap();

        // the adjoint
        let fwd = solve_no_grad(&solver, &mut f, z0v.as_tensor(), &ts).unwrap();
        let grad_ys: Vec<Option<Tensor>> = fwd
            .ys
            .iter()
            .enumerate()
            .map(|(i, y)| (i > 0).then(|| ((y - &target).unwrap() * (2.0 * i as f64)).unwrap()))
            .collect();
        let adj = adjoint_backward(&solver, &mut f, &params, &ts, &fwd.ys, &grad_ys).unwrap();

        let d = max_rel_diff(&adj.grad_y0, bp.get(z0v.as_tensor()).unwrap()).unwrap();
        assert!(d < 1e-6, "dL/dz0 differs by {d:e}");
        for (p, g) in params.iter().zip(&adj.grad_params) {
            let d = max_rel_diff(g, bp.get(p.as_tensor()).unwrap()).unwrap();
            assert!(d < 1e-6, "dL/dθ {:?} differs by {d:e}", p.shape());
        }
        // the forward outputs are graph-free
        assert!(fwd.ys.iter().all(|y| !y.track_op()));
    }

    #[test]
    fn accumulate_adds_to_existing_gradients() {
        let dev = Device::Cpu;
        let v = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let w = Var::new(&[3.0f32], &dev).unwrap();
        let mut store = (v.as_tensor() * 2.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = [
            Tensor::new(&[1.0f32, 1.0], &dev).unwrap(),
            Tensor::new(&[5.0f32], &dev).unwrap(),
        ];
        accumulate(&mut store, &[v.clone(), w.clone()], &g).unwrap();
        assert_eq!(
            store.get(&v).unwrap().to_vec1::<f32>().unwrap(),
            vec![3.0, 3.0]
        );
        assert_eq!(store.get(&w).unwrap().to_vec1::<f32>().unwrap(), vec![5.0]);
        assert!(solve_no_grad(
            &Solver::Rk4 { steps: 1 },
            &mut |_, z| Ok(z.clone()),
            &g[0],
            &[0.0]
        )
        .is_err());
    }
}
