//! Classic fixed-step fourth-order Runge–Kutta (the paper's RK-Net integrator).

use candle_core::{Result, Tensor};

use super::{combine, OdeSolution, SolveStats};

/// Integrates dy/dt = f(t, y) from `t0` to `t1` with `steps` equal RK4 steps
/// (`t1 < t0` integrates backwards). NFE forward = backward = `4 · steps`.
pub fn rk4(
    f: &mut dyn FnMut(f64, &Tensor) -> Result<Tensor>,
    y0: &Tensor,
    t0: f64,
    t1: f64,
    steps: usize,
) -> Result<OdeSolution> {
    if steps == 0 {
        candle_core::bail!("rk4 needs at least one step");
    }
    let dt = (t1 - t0) / steps as f64;
    let mut y = y0.clone();
    for i in 0..steps {
        let t = t0 + dt * i as f64;
        let k1 = f(t, &y)?;
        let k2 = f(
            t + dt / 2.0,
            &combine(&y, dt, &[0.5], std::slice::from_ref(&k1))?,
        )?;
        let k3 = f(
            t + dt / 2.0,
            &combine(&y, dt, &[0.5], std::slice::from_ref(&k2))?,
        )?;
        let k4 = f(t + dt, &combine(&y, dt, &[1.0], std::slice::from_ref(&k3))?)?;
        y = combine(
            &y,
            dt,
            &[1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0],
            &[k1, k2, k3, k4],
        )?;
    }
    Ok(OdeSolution {
        y,
        stats: SolveStats {
            nfe_forward: 4 * steps,
            nfe_backward: 4 * steps,
            accepted: steps,
            rejected: 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn decay_converges_at_fourth_order() {
        let y0 = Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
        let mut errs = Vec::new();
        for steps in [4, 8] {
            let mut f = |_t: f64, y: &Tensor| y.neg();
            let sol = rk4(&mut f, &y0, 0.0, 1.0, steps).unwrap();
            assert_eq!(sol.stats.nfe_forward, 4 * steps);
            let v = sol.y.to_vec1::<f64>().unwrap();
            let e = (v[0] - (-1.0f64).exp())
                .abs()
                .max((v[1] - 2.0 * (-1.0f64).exp()).abs());
            errs.push(e);
        }
        assert!(errs[0] < 1e-4, "{errs:?}");
        // halving the step divides the error by about 2^4
        assert!(
            errs[0] / errs[1] > 12.0 && errs[0] / errs[1] < 20.0,
            "{errs:?}"
        );
    }

    #[test]
    fn gradient_flows_through_the_steps() {
        let y0 = Var::new(&[1.5f64], &Device::Cpu).unwrap();
        let mut f = |_t: f64, y: &Tensor| y.neg();
        let sol = rk4(&mut f, y0.as_tensor(), 0.0, 1.0, 10).unwrap();
        let grads = sol.y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(y0.as_tensor()).unwrap().to_vec1::<f64>().unwrap()[0];
        assert!((g - (-1.0f64).exp()).abs() < 1e-6, "{g}");
        assert!(rk4(&mut f, y0.as_tensor(), 0.0, 1.0, 0).is_err());
    }
}
