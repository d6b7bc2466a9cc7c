//! SGD with momentum (PyTorch semantics) and a piecewise-constant learning-rate schedule.
//!
//! `candle_nn::SGD` has no momentum, so this is our own. Update per parameter `p` with
//! gradient `g`: `g += wd·p; buf = μ·buf + g` (`buf = g` on the first step);
//! `p -= lr·buf`.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// SGD with momentum over a fixed, named set of variables.
#[derive(Debug)]
pub struct SgdMomentum {
    vars: Vec<(String, Var)>,
    buffers: Vec<Option<Tensor>>,
    /// Current learning rate.
    pub lr: f64,
    /// Momentum factor μ.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
}

impl SgdMomentum {
    /// An optimizer for `vars` (names are used for checkpoints).
    pub fn new(vars: Vec<(String, Var)>, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        let buffers = vec![None; vars.len()];
        Self {
            vars,
            buffers,
            lr,
            momentum,
            weight_decay,
        }
    }

    /// The variables, by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update from `grads`. Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for ((_, var), buf) in self.vars.iter().zip(self.buffers.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let mut g = g.clone();
            if self.weight_decay != 0.0 {
                g = (g + (var.as_tensor() * self.weight_decay)?)?;
            }
            let d = if self.momentum != 0.0 {
                let next = match buf.take() {
                    Some(b) => ((b * self.momentum)? + g)?,
                    None => g,
                };
                *buf = Some(next.clone());
                next
            } else {
                g
            };
            var.set(&(var.as_tensor() - (d * self.lr)?)?)?;
        }
        Ok(())
    }

    /// Momentum buffers by variable name (only those that exist yet).
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .zip(&self.buffers)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| (n.clone(), b.clone())))
            .collect()
    }

    /// Restores momentum buffers saved by [`SgdMomentum::state_tensors`]; names not
    /// present start without a buffer. Shapes must match.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        for ((name, var), buf) in self.vars.iter().zip(self.buffers.iter_mut()) {
            *buf = match state.get(name) {
                Some(t) => {
                    if t.dims() != var.dims() {
                        candle_core::bail!(
                            "momentum buffer {name}: shape {:?} does not match {:?}",
                            t.dims(),
                            var.dims()
                        );
                    }
                    Some(t.to_dtype(var.dtype())?.copy()?)
                }
                None => None,
            };
        }
        Ok(())
    }
}

/// Piecewise-constant learning rate: `base · factor^k` after the k-th boundary step.
#[derive(Debug, Clone, PartialEq)]
pub struct PiecewiseLr {
    /// Learning rate before the first boundary.
    pub base: f64,
    /// Steps at which the rate is multiplied by `factor`, ascending.
    pub boundaries: Vec<u64>,
    /// Factor applied at each boundary.
    pub factor: f64,
}

impl PiecewiseLr {
    /// Boundaries given as fractions of `total_steps` (e.g. the paper's 60/160, 100/160,
    /// 140/160 of training).
    pub fn from_fractions(base: f64, fractions: &[f64], total_steps: u64, factor: f64) -> Self {
        let mut boundaries: Vec<u64> = fractions
            .iter()
            .map(|f| (f * total_steps as f64).round() as u64)
            .collect();
        boundaries.sort_unstable();
        Self {
            base,
            boundaries,
            factor,
        }
    }

    /// The learning rate at (0-based) global step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        let k = self.boundaries.iter().filter(|b| step >= **b).count();
        self.base * self.factor.powi(k as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn momentum_matches_pytorch_semantics() {
        let w = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = SgdMomentum::new(vec![("w".into(), w.clone())], 0.1, 0.9, 0.0);
        // loss = sum(w^2) / 2 -> grad = w
        let mut expected = [1.0f64, -2.0];
        let mut buf = [0.0f64; 2];
        for step in 0..3 {
            let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads).unwrap();
            for i in 0..2 {
                let g = expected[i];
                buf[i] = if step == 0 { g } else { 0.9 * buf[i] + g };
                expected[i] -= 0.1 * buf[i];
            }
            let got = w.as_tensor().to_vec1::<f32>().unwrap();
            for i in 0..2 {
                assert!(
                    (got[i] as f64 - expected[i]).abs() < 1e-6,
                    "{got:?} {expected:?}"
                );
            }
        }
        // the state round-trips into a fresh optimizer and gives the same next step
        let state = opt.state_tensors();
        assert_eq!(state.len(), 1);
        let w2 = Var::from_tensor(&w.as_tensor().copy().unwrap()).unwrap();
        let mut opt2 = SgdMomentum::new(vec![("w".into(), w2.clone())], 0.1, 0.9, 0.0);
        opt2.load_state(&state).unwrap();
        let g1 = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5)
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (w2.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5)
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&g1).unwrap();
        opt2.step(&g2).unwrap();
        assert_eq!(
            w.as_tensor().to_vec1::<f32>().unwrap(),
            w2.as_tensor().to_vec1::<f32>().unwrap()
        );
        let bad: BTreeMap<String, Tensor> = [(
            "w".to_string(),
            Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        )]
        .into_iter()
        .collect();
        assert!(opt2.load_state(&bad).is_err());
    }

    #[test]
    fn piecewise_schedule() {
        // the paper: 160 epochs, decays at 60/100/140
        let s = PiecewiseLr::from_fractions(
            0.1,
            &[60.0 / 160.0, 100.0 / 160.0, 140.0 / 160.0],
            160,
            0.1,
        );
        assert_eq!(s.boundaries, vec![60, 100, 140]);
        assert!((s.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(59) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.01).abs() < 1e-12);
        assert!((s.lr_at(139) - 0.001).abs() < 1e-12);
        assert!((s.lr_at(159) - 0.0001).abs() < 1e-12);
    }
}
