//! Adaptive Dormand–Prince 5(4) with FSAL, as in torchdiffeq's `dopri5.py`/`misc.py`:
//! RMS error ratio against `atol + rtol·max(|y0|, |y1|)`, step-size factor
//! `min(10, max(dfactor, 0.9·ratio^(-1/5)))` (dfactor 0.2 on rejection, 1 on
//! acceptance), Hairer's initial step. Steps are clipped to land exactly on `t1`.

use candle_core::{Result, Tensor};

use super::{combine, rms, OdeSolution, SolveStats};

/// Nodes c.
const C: [f64; 7] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];
/// Rows of A (row i gives the coefficients of k1..ki for stage i+1).
const A: [&[f64]; 6] = [
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
    ],
    &[
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
    ],
    &[
        35.0 / 384.0,
        0.0,
        500.0 / 1113.0,
        125.0 / 192.0,
        -2187.0 / 6784.0,
        11.0 / 84.0,
    ],
];
/// Fifth-order weights (the last row of A; the 7th weight is 0).
const B: [f64; 6] = [
    35.0 / 384.0,
    0.0,
    500.0 / 1113.0,
    125.0 / 192.0,
    -2187.0 / 6784.0,
    11.0 / 84.0,
];
/// Error weights b5 − b4.
const E: [f64; 7] = [
    35.0 / 384.0 - 1951.0 / 21600.0,
    0.0,
    500.0 / 1113.0 - 22642.0 / 50085.0,
    125.0 / 192.0 - 451.0 / 720.0,
    -2187.0 / 6784.0 + 12231.0 / 42400.0,
    11.0 / 84.0 - 649.0 / 6300.0,
    -1.0 / 60.0,
];

const SAFETY: f64 = 0.9;
const IFACTOR: f64 = 10.0;
const DFACTOR: f64 = 0.2;

/// Settings of [`dopri5`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dopri5Options {
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Give up after this many (accepted + rejected) steps.
    pub max_steps: usize,
    /// Initial step size; `None` uses Hairer's heuristic (2 function evaluations).
    pub first_step: Option<f64>,
}

impl Dopri5Options {
    /// Tolerances with the default step limit (10,000) and heuristic first step.
    pub fn new(rtol: f64, atol: f64) -> Self {
        Self {
            rtol,
            atol,
            max_steps: 10_000,
            first_step: None,
        }
    }
}

/// `atol + rtol · |y|` (detached).
fn scale(y: &Tensor, rtol: f64, atol: f64) -> Result<Tensor> {
    y.detach().abs()?.affine(rtol, atol)
}

/// The step's error ratio (detached): the RMS of `err / (atol + rtol·max(|y|, |y1|))`
/// with `err = dt·Σ E_i·k_i`. On the CPU one sweep over the data, with the same
/// element-wise rounding as the tensor ops it replaces (a dozen tensors and sweeps), which
/// are used elsewhere.
fn error_ratio(
    y: &Tensor,
    y1: &Tensor,
    ks: &[Tensor],
    dt: f64,
    rtol: f64,
    atol: f64,
) -> Result<f64> {
    match error_ratio_cpu(y, y1, ks, dt, rtol, atol) {
        Some(r) => Ok(r),
        None => error_ratio_tensors(y, y1, ks, dt, rtol, atol),
    }
}

/// [`error_ratio`] by tensor ops (any device).
fn error_ratio_tensors(
    y: &Tensor,
    y1: &Tensor,
    ks: &[Tensor],
    dt: f64,
    rtol: f64,
    atol: f64,
) -> Result<f64> {
    let detached: Vec<Tensor> = ks.iter().map(Tensor::detach).collect();
    let zero = y.detach().zeros_like()?;
    let err = combine(&zero, dt, &E, &detached)?;
    let tol = y
        .detach()
        .abs()?
        .maximum(&y1.detach().abs()?)?
        .affine(rtol, atol)?;
    rms(&err.div(&tol)?)
}

/// [`error_ratio`] in one sweep, where every tensor is a contiguous f32 or f64 one of the
/// same size on the CPU (else `None`).
fn error_ratio_cpu(
    y: &Tensor,
    y1: &Tensor,
    ks: &[Tensor],
    dt: f64,
    rtol: f64,
    atol: f64,
) -> Option<f64> {
    use candle_core::{CpuStorage, DType, Storage};
    let all: Vec<&Tensor> = [y, y1].into_iter().chain(ks).collect();
    let n = y.elem_count();
    if ks.len() != E.len()
        || !matches!(y.dtype(), DType::F32 | DType::F64)
        || !all.iter().all(|t| {
            t.device().is_cpu()
                && t.is_contiguous()
                && t.dtype() == y.dtype()
                && t.elem_count() == n
        })
    {
        return None;
    }
    let guards: Vec<_> = all.iter().map(|t| t.storage_and_layout()).collect();
    macro_rules! sweep {
        ($variant:ident, $t:ty) => {{
            let mut slices: Vec<&[$t]> = Vec::with_capacity(guards.len());
            for (storage, layout) in &guards {
                let (start, end) = layout.contiguous_offsets()?;
                match &**storage {
                    Storage::Cpu(CpuStorage::$variant(v)) => slices.push(&v[start..end]),
                    _ => return None,
                }
            }
            // the terms as `combine` forms them: k·(E_i·dt) rounded, summed in order
            let terms: Vec<(&[$t], $t)> = E
                .iter()
                .zip(&slices[2..])
                .filter(|(e, _)| **e != 0.0)
                .map(|(e, k)| (*k, (e * dt) as $t))
                .collect();
            let (rt, at) = (rtol as $t, atol as $t);
            let mut sum = 0f64;
            for i in 0..n {
                let mut err: $t = 0.0;
                for (j, (k, m)) in terms.iter().enumerate() {
                    err = if j == 0 { k[i] * m } else { err + k[i] * m };
                }
                let tol = slices[0][i].abs().max(slices[1][i].abs()) * rt + at;
                let q = (err / tol) as f64;
                sum += q * q;
            }
            Some((sum / n.max(1) as f64).sqrt())
        }};
    }
    match y.dtype() {
        DType::F32 => sweep!(F32, f32),
        _ => sweep!(F64, f64),
    }
}

/// Hairer's initial step size (magnitude). Uses one extra evaluation of `f`.
fn initial_step(
    f: &mut dyn FnMut(f64, &Tensor) -> Result<Tensor>,
    t0: f64,
    y0: &Tensor,
    f0: &Tensor,
    direction: f64,
    rtol: f64,
    atol: f64,
) -> Result<f64> {
    let y0 = y0.detach();
    let f0 = f0.detach();
    let sc = scale(&y0, rtol, atol)?;
    let d0 = rms(&y0.div(&sc)?)?;
    let d1 = rms(&f0.div(&sc)?)?;
    let h0 = if d0 < 1e-5 || d1 < 1e-5 {
        1e-6
    } else {
        0.01 * d0 / d1
    };
    let y1 = (&y0 + (&f0 * (h0 * direction))?)?;
    let f1 = f(t0 + h0 * direction, &y1)?.detach();
    let d2 = rms(&(f1 - &f0)?.div(&sc)?)? / h0;
    let h1 = if d1 <= 1e-15 && d2 <= 1e-15 {
        (h0 * 1e-3).max(1e-6)
    } else {
        (0.01 / d1.max(d2)).powf(1.0 / 5.0)
    };
    Ok((100.0 * h0).min(h1))
}

/// Integrates dy/dt = f(t, y) from `t0` to `t1` (either direction) with adaptive
/// dopri5. Autograd flows through every accepted stage to the returned `y`.
pub fn dopri5(
    f: &mut dyn FnMut(f64, &Tensor) -> Result<Tensor>,
    y0: &Tensor,
    t0: f64,
    t1: f64,
    opts: &Dopri5Options,
) -> Result<OdeSolution> {
    if !(opts.rtol > 0.0 || opts.atol > 0.0) {
        candle_core::bail!("dopri5: rtol or atol must be positive");
    }
    let mut stats = SolveStats::default();
    if t0 == t1 {
        return Ok(OdeSolution {
            y: y0.clone(),
            stats,
        });
    }
    let direction = if t1 > t0 { 1.0 } else { -1.0 };
    let mut f_y = f(t0, y0)?;
    stats.nfe_forward += 1;
    let mut h = match opts.first_step {
        Some(h) => h.abs(),
        None => {
            stats.nfe_forward += 1;
            initial_step(f, t0, y0, &f_y, direction, opts.rtol, opts.atol)?
        }
    };
    let mut t = t0;
    let mut y = y0.clone();
    while (t1 - t) * direction > 0.0 {
        if stats.accepted + stats.rejected >= opts.max_steps {
            candle_core::bail!(
                "dopri5: gave up after {} steps at t={t} (rtol {}, atol {})",
                opts.max_steps,
                opts.rtol,
                opts.atol
            );
        }
        if !h.is_finite() || h < 1e-12 * (1.0 + t.abs()) {
            candle_core::bail!("dopri5: step size underflow ({h}) at t={t}");
        }
        // Clip the step so the last one lands exactly on t1.
        let remaining = (t1 - t).abs();
        let last = h >= remaining;
        let dt = if last { remaining } else { h } * direction;

        let mut ks: Vec<Tensor> = Vec::with_capacity(7);
        ks.push(f_y.clone());
        let mut y1 = y.clone();
        for (i, row) in A.iter().enumerate() {
            let yi = combine(&y, dt, row, &ks)?;
            ks.push(f(t + C[i + 1] * dt, &yi)?);
            y1 = yi;
        }
        stats.nfe_forward += 6;
        // The last stage's input is the 5th-order solution (A's last row equals B): y1.
        debug_assert_eq!(A[5], &B[..]);
        let ratio = error_ratio(&y, &y1, &ks, dt, opts.rtol, opts.atol)?;
        if !ratio.is_finite() {
            candle_core::bail!("dopri5: non-finite error estimate at t={t}");
        }
        let accept = ratio <= 1.0;
        let factor = if ratio == 0.0 {
            IFACTOR
        } else {
            let dfactor = if accept { 1.0 } else { DFACTOR };
            (SAFETY * ratio.powf(-1.0 / 5.0)).max(dfactor).min(IFACTOR)
        };
        let h_next = dt.abs() * factor;
        if accept {
            stats.accepted += 1;
            t = if last { t1 } else { t + dt };
            y = y1;
            f_y = ks.swap_remove(6);
        } else {
            stats.rejected += 1;
        }
        h = h_next;
    }
    // f(t0, y0) plus k2..k6 of each accepted step plus the FSAL k7 of all but the last.
    stats.nfe_backward = 6 * stats.accepted;
    Ok(OdeSolution { y, stats })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn decay(tol: f64) -> (f64, SolveStats) {
        let y0 = Tensor::new(&[1.0f64, -2.0, 0.5], &Device::Cpu).unwrap();
        let mut f = |_t: f64, y: &Tensor| y.neg();
        let sol = dopri5(&mut f, &y0, 0.0, 1.0, &Dopri5Options::new(tol, tol)).unwrap();
        let got = sol.y.to_vec1::<f64>().unwrap();
        let e = (-1.0f64).exp();
        let err = [1.0, -2.0, 0.5]
            .iter()
            .zip(&got)
            .map(|(a, g)| (a * e - g).abs())
            .fold(0.0, f64::max);
        (err, sol.stats)
    }

    /// The one-sweep error ratio agrees with the tensor ops', in f32 and f64.
    #[test]
    fn error_ratio_sweep_matches_the_tensor_ops() {
        let dev = Device::Cpu;
        for dtype in [candle_core::DType::F32, candle_core::DType::F64] {
            let t = |s: f64| {
                Tensor::randn(0f64, s, (4, 3, 5), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (y, y1) = (t(1.0), t(1.0));
            let ks: Vec<Tensor> = (0..7).map(|_| t(3.0)).collect();
            let a = error_ratio_cpu(&y, &y1, &ks, 0.13, 1e-3, 1e-4).unwrap();
            let b = error_ratio_tensors(&y, &y1, &ks, 0.13, 1e-3, 1e-4).unwrap();
            assert!((a - b).abs() <= 1e-12 * b.abs(), "{dtype:?}: {a} {b}");
            // a non-contiguous stage falls back to the tensor ops
            let mut ks2 = ks.clone();
            ks2[3] = ks[3]
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            assert!(error_ratio_cpu(&y, &y1, &ks2, 0.13, 1e-3, 1e-4).is_none());
        }
    }

    #[test]
    fn exponential_decay_matches_closed_form() {
        let (err, stats) = decay(1e-6);
        assert!(err < 1e-5, "error {err}");
        assert!(stats.nfe_forward < 100, "{stats:?}");
        assert_eq!(stats.nfe_forward, 2 + 6 * (stats.accepted + stats.rejected));
        assert_eq!(stats.nfe_backward, 6 * stats.accepted);
    }

    #[test]
    fn tighter_tolerance_costs_more_and_is_more_accurate() {
        let (e3, s3) = decay(1e-3);
        let (e6, s6) = decay(1e-6);
        let (e9, s9) = decay(1e-9);
        assert!(s3.nfe_forward < s6.nfe_forward && s6.nfe_forward < s9.nfe_forward);
        assert!(e3 > e6 && e6 > e9, "{e3} {e6} {e9}");
        assert!(e3 < 1e-2 && e9 < 1e-8, "{e3} {e9}");
    }

    #[test]
    fn harmonic_oscillator_over_a_period() {
        // x' = v, v' = -x, from (1, 0): x = cos t, v = -sin t
        let mut f = |_t: f64, y: &Tensor| {
            let x = y.narrow(0, 0, 1)?;
            let v = y.narrow(0, 1, 1)?;
            Tensor::cat(&[v, x.neg()?], 0)
        };
        let y0 = Tensor::new(&[1.0f64, 0.0], &Device::Cpu).unwrap();
        let t1 = 2.0 * std::f64::consts::PI + 1.0;
        let sol = dopri5(&mut f, &y0, 0.0, t1, &Dopri5Options::new(1e-8, 1e-8)).unwrap();
        let got = sol.y.to_vec1::<f64>().unwrap();
        assert!((got[0] - t1.cos()).abs() < 1e-6, "{got:?}");
        assert!((got[1] + t1.sin()).abs() < 1e-6, "{got:?}");
        assert!(sol.stats.nfe_forward < 1000, "{:?}", sol.stats);
        assert!(sol.stats.accepted > 5, "{:?}", sol.stats);
    }

    #[test]
    fn linear_system_and_backwards_in_time() {
        // y' = M y with M = [[-0.1, 2], [-2, -0.1]]: y(t) = e^{-0.1t} R(2t) y0
        let m = Tensor::new(&[[-0.1f64, 2.0], [-2.0, -0.1]], &Device::Cpu).unwrap();
        let mut f = |_t: f64, y: &Tensor| y.matmul(&m.t()?);
        let y0 = Tensor::new(&[[2.0f64, 0.0]], &Device::Cpu).unwrap();
        let t1 = 3.0;
        let opts = Dopri5Options::new(1e-9, 1e-9);
        let sol = dopri5(&mut f, &y0, 0.0, t1, &opts).unwrap();
        let got = sol.y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let d = (-0.1 * t1).exp();
        let want = [2.0 * d * (2.0 * t1).cos(), -2.0 * d * (2.0 * t1).sin()];
        assert!(
            (got[0] - want[0]).abs() < 1e-5 && (got[1] - want[1]).abs() < 1e-5,
            "{got:?} {want:?}"
        );
        // and back to the start
        let back = dopri5(&mut f, &sol.y, t1, 0.0, &opts).unwrap();
        let got = back.y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(
            (got[0] - 2.0).abs() < 1e-5 && got[1].abs() < 1e-5,
            "{got:?}"
        );
    }

    #[test]
    fn rejects_steps_when_the_first_step_is_too_large() {
        let y0 = Tensor::new(&[1.0f64], &Device::Cpu).unwrap();
        let mut f = |_t: f64, y: &Tensor| y * -50.0;
        let mut opts = Dopri5Options::new(1e-6, 1e-6);
        opts.first_step = Some(1.0);
        let sol = dopri5(&mut f, &y0, 0.0, 1.0, &opts).unwrap();
        assert!(sol.stats.rejected > 0, "{:?}", sol.stats);
        assert_eq!(
            sol.stats.nfe_forward,
            1 + 6 * (sol.stats.accepted + sol.stats.rejected)
        );
        let got = sol.y.to_vec1::<f64>().unwrap()[0];
        assert!((got - (-50.0f64).exp()).abs() < 1e-5, "{got}");
        opts.max_steps = 2;
        let e = dopri5(&mut f, &y0, 0.0, 1.0, &opts).unwrap_err();
        assert!(e.to_string().contains("gave up"), "{e}");
    }

    #[test]
    fn gradients_flow_through_the_solver() {
        // y(1) = y0 · e^{-k}: d/dy0 = e^{-k}, d/dk = -y0 e^{-k}
        let y0 = Var::new(&[1.5f64], &Device::Cpu).unwrap();
        let k = Var::new(&[0.7f64], &Device::Cpu).unwrap();
        let kt = k.as_tensor().clone();
        let mut f = |_t: f64, y: &Tensor| y.broadcast_mul(&kt)?.neg();
        let sol = dopri5(
            &mut f,
            y0.as_tensor(),
            0.0,
            1.0,
            &Dopri5Options::new(1e-8, 1e-8),
        )
        .unwrap();
        let grads = sol.y.sum_all().unwrap().backward().unwrap();
        let e = (-0.7f64).exp();
        let gy = grads.get(y0.as_tensor()).unwrap().to_vec1::<f64>().unwrap()[0];
        let gk = grads.get(k.as_tensor()).unwrap().to_vec1::<f64>().unwrap()[0];
        assert!((gy - e).abs() < 1e-6, "{gy}");
        assert!((gk + 1.5 * e).abs() < 1e-6, "{gk}");
    }

    #[test]
    fn tableau_is_consistent() {
        for (i, row) in A.iter().enumerate() {
            let s: f64 = row.iter().sum();
            assert!((s - C[i + 1]).abs() < 1e-12, "row {i}");
        }
        assert!((B.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(E.iter().sum::<f64>().abs() < 1e-12);
    }
}
