//! SGD with momentum and Adam (PyTorch semantics), and a piecewise-constant
//! learning-rate schedule.
//!
//! `candle_nn::SGD` has no momentum, so this is our own. Update per parameter `p` with
//! gradient `g`: `g += wd·p; buf = μ·buf + g` (`buf = g` on the first step);
//! `p -= lr·buf`.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Result, Storage, Tensor, Var};

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
            // Detached: candle keeps a variable's gradient attached to the step's graph, so
            // a moment built from it would keep every step's graph alive (memory grows
            // by a whole forward pass per step).
            let mut g = g.detach();
            if self.weight_decay != 0.0 {
                g = (g + (var.as_tensor().detach() * self.weight_decay)?)?;
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

/// The constants of one Adam step (`c1 = 1 - β1^t`, `c2 = 1 - β2^t`).
struct AdamConsts {
    beta1: f64,
    beta2: f64,
    eps: f64,
    lr: f64,
    weight_decay: f64,
    c1: f64,
    c2: f64,
}

/// The contiguous `f32` data behind a CPU tensor's storage guard, or `None`.
fn cpu_f32<'a>(s: &'a Storage, l: &candle_core::Layout) -> Option<&'a [f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => l.contiguous_offsets().map(|(a, b)| &v[a..b]),
        _ => None,
    }
}

/// One Adam step of a CPU `f32` parameter in one pass: returns the new parameter and
/// moments, or `None` (the tensor-op path then runs) for other devices, dtypes or layouts.
/// The arithmetic is the tensor path's, op for op and in the same `f32` rounding (candle's
/// `t * s` is `t * (s as f32) + 0`, `t / s` is `t * ((1 / s) as f32) + 0`), so both give
/// the same bits; it replaces about twelve tensor ops, each a pass and an allocation.
fn fused_cpu_step(
    p: &Tensor,
    g: &Tensor,
    moments: Option<&(Tensor, Tensor)>,
    k: &AdamConsts,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !p.device().is_cpu()
        || p.dtype() != DType::F32
        || g.dtype() != DType::F32
        || g.shape() != p.shape()
    {
        return Ok(None);
    }
    let n = p.elem_count();
    let (mut pn, mut mn, mut vn) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    {
        let (ps, pl) = p.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (Some(pv), Some(gv)) = (cpu_f32(&ps, pl), cpu_f32(&gs, gl)) else {
            return Ok(None);
        };
        let f = |x: f64| x as f32;
        let (b1, nb1, b2, nb2) = (f(k.beta1), f(1.0 - k.beta1), f(k.beta2), f(1.0 - k.beta2));
        let (ic1, ic2, eps, lr, wd) = (
            f(1.0 / k.c1),
            f(1.0 / k.c2),
            f(k.eps),
            f(k.lr),
            f(k.weight_decay),
        );
        let decay = k.weight_decay != 0.0;
        let guards = moments.map(|(m, v)| (m.storage_and_layout(), v.storage_and_layout()));
        let old = match &guards {
            Some(((ms, ml), (vs, vl))) => match (cpu_f32(ms, ml), cpu_f32(vs, vl)) {
                (Some(m), Some(v)) if m.len() == n && v.len() == n => Some((m, v)),
                _ => return Ok(None),
            },
            None => None,
        };
        // gradient with weight decay, into the new-parameter buffer for now
        if decay {
            for ((o, &g), &p) in pn.iter_mut().zip(gv).zip(pv) {
                *o = g + (p * wd + 0.0);
            }
        } else {
            pn.copy_from_slice(gv);
        }
        match old {
            Some((m, v)) => {
                for (((mn, vn), &m), (&v, &g)) in mn
                    .iter_mut()
                    .zip(vn.iter_mut())
                    .zip(m)
                    .zip(v.iter().zip(&pn))
                {
                    *mn = (m * b1 + 0.0) + (g * nb1 + 0.0);
                    *vn = (v * b2 + 0.0) + (g * g * nb2 + 0.0);
                }
            }
            None => {
                for ((mn, vn), &g) in mn.iter_mut().zip(vn.iter_mut()).zip(&pn) {
                    *mn = g * nb1 + 0.0;
                    *vn = g * g * nb2 + 0.0;
                }
            }
        }
        for (((o, &p), &m), &v) in pn.iter_mut().zip(pv).zip(&mn).zip(&vn) {
            let update = (m * ic1 + 0.0) / ((v * ic2 + 0.0).sqrt() * 1.0 + eps);
            *o = p - (update * lr + 0.0);
        }
    }
    let shape = p.shape().clone();
    Ok(Some((
        Tensor::from_vec(pn, shape.clone(), p.device())?,
        Tensor::from_vec(mn, shape.clone(), p.device())?,
        Tensor::from_vec(vn, shape, p.device())?,
    )))
}

/// Adam (Kingma & Ba), PyTorch semantics with L2 weight decay added to the gradient:
/// `m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²;
/// p -= lr · (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + ε)`.
///
/// Unlike `candle_nn::AdamW` its state (moments and step count) can be saved and restored,
/// so a checkpointed run resumes with exactly the same updates.
#[derive(Debug)]
pub struct Adam {
    vars: Vec<(String, Var)>,
    moments: Vec<Option<(Tensor, Tensor)>>,
    steps: u64,
    /// Current learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Whether CPU `f32` parameters take [`fused_cpu_step`] (off only in tests, which
    /// compare it with the tensor-op path).
    fused: bool,
}

impl Adam {
    /// Adam over `vars` with the usual β1 = 0.9, β2 = 0.999, ε = 1e-8.
    pub fn new(vars: Vec<(String, Var)>, lr: f64, weight_decay: f64) -> Self {
        let moments = vec![None; vars.len()];
        Self {
            vars,
            moments,
            steps: 0,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            fused: true,
        }
    }

    /// One update from `grads`. Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let c1 = 1.0 - self.beta1.powi(t);
        let c2 = 1.0 - self.beta2.powi(t);
        for ((_, var), slot) in self.vars.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: candle keeps a variable's gradient attached to the step's graph, so
            // a moment built from it would keep every step's graph alive (memory grows
            // by a whole forward pass per step).
            let k = AdamConsts {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                lr: self.lr,
                weight_decay: self.weight_decay,
                c1,
                c2,
            };
            let fused = match self.fused {
                true => fused_cpu_step(var.as_tensor(), g, slot.as_ref(), &k)?,
                false => None,
            };
            if let Some((p, m, v)) = fused {
                var.set(&p)?;
                *slot = Some((m, v));
                continue;
            }
            let mut g = g.detach();
            if self.weight_decay != 0.0 {
                g = (g + (var.as_tensor().detach() * self.weight_decay)?)?;
            }
            let (m, v) = match slot.take() {
                Some((m, v)) => (
                    ((m * self.beta1)? + (&g * (1.0 - self.beta1))?)?,
                    ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?,
                ),
                None => ((&g * (1.0 - self.beta1))?, (g.sqr()? * (1.0 - self.beta2))?),
            };
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
            *slot = Some((m, v));
        }
        Ok(())
    }

    /// Moments (`m.<name>`, `v.<name>`) and the step count (`steps`, a scalar).
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for ((n, _), slot) in self.vars.iter().zip(&self.moments) {
            if let Some((m, v)) = slot {
                out.insert(format!("m.{n}"), m.clone());
                out.insert(format!("v.{n}"), v.clone());
            }
        }
        if let Some((_, var)) = self.vars.first() {
            out.insert(
                "steps".to_string(),
                Tensor::new(self.steps as f64, var.device())?,
            );
        }
        Ok(out)
    }

    /// Restores the state saved by [`Adam::state_tensors`]. Shapes must match.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        for ((name, var), slot) in self.vars.iter().zip(self.moments.iter_mut()) {
            *slot = match (
                state.get(&format!("m.{name}")),
                state.get(&format!("v.{name}")),
            ) {
                (Some(m), Some(v)) => {
                    if m.dims() != var.dims() || v.dims() != var.dims() {
                        candle_core::bail!(
                            "Adam moments of {name}: shapes {:?}/{:?} do not match {:?}",
                            m.dims(),
                            v.dims(),
                            var.dims()
                        );
                    }
                    Some((
                        m.to_dtype(var.dtype())?.copy()?,
                        v.to_dtype(var.dtype())?.copy()?,
                    ))
                }
                _ => None,
            };
        }
        self.steps = match state.get("steps") {
            Some(t) => t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? as u64,
            None => 0,
        };
        Ok(())
    }
}

/// The optimizers a job can choose by name (`sgd` with momentum, or `adam`), behind one
/// interface: step, learning rate, and state for checkpoints.
#[derive(Debug)]
pub enum Optimizer {
    /// SGD with momentum.
    Sgd(SgdMomentum),
    /// Adam.
    Adam(Adam),
}

impl Optimizer {
    /// Builds the optimizer named `name` (`sgd` or `adam`) over `vars`.
    pub fn by_name(
        name: &str,
        vars: Vec<(String, Var)>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        match name {
            "sgd" => Ok(Self::Sgd(SgdMomentum::new(
                vars,
                lr,
                momentum,
                weight_decay,
            ))),
            "adam" => Ok(Self::Adam(Adam::new(vars, lr, weight_decay))),
            other => candle_core::bail!("unknown optimizer {other:?} (known: sgd, adam)"),
        }
    }

    /// Sets the learning rate for the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Self::Sgd(o) => o.lr = lr,
            Self::Adam(o) => o.lr = lr,
        }
    }

    /// One update from `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Self::Sgd(o) => o.step(grads),
            Self::Adam(o) => o.step(grads),
        }
    }

    /// The optimizer's state as named tensors, for a checkpoint.
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        match self {
            Self::Sgd(o) => Ok(o.state_tensors()),
            Self::Adam(o) => o.state_tensors(),
        }
    }

    /// Restores the state saved by [`Optimizer::state_tensors`].
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        match self {
            Self::Sgd(o) => o.load_state(state),
            Self::Adam(o) => o.load_state(state),
        }
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

    /// The fused CPU update gives the tensor path's bits, step after step, with and
    /// without weight decay, and keeps the same state.
    #[test]
    fn fused_adam_matches_the_tensor_ops_bit_for_bit() {
        let dev = Device::Cpu;
        for wd in [0.0, 0.01] {
            let init = Tensor::randn(0f32, 1.0, (37, 5), &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (37, 5), &dev).unwrap();
            let run = |fused: bool| {
                let w = Var::from_tensor(&init).unwrap();
                let mut adam = Adam::new(vec![("w".to_string(), w.clone())], 3e-3, wd);
                adam.fused = fused;
                for _ in 0..4 {
                    let loss = (w.as_tensor() * &x)
                        .unwrap()
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    adam.step(&loss.backward().unwrap()).unwrap();
                }
                let bits = |t: &Tensor| -> Vec<u32> {
                    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v.iter().map(|f| f.to_bits()).collect()
                };
                let state = adam.state_tensors().unwrap();
                (
                    bits(w.as_tensor()),
                    bits(&state["m.w"]),
                    bits(&state["v.w"]),
                )
            };
            assert_eq!(run(true), run(false), "weight decay {wd}");
        }
    }

    /// The optimizers' state holds plain values, not graphs: a moment that tracked its
    /// gradient's ops would keep every step's forward graph alive (a memory leak of one
    /// forward pass per step).
    #[test]
    fn optimizer_state_does_not_keep_the_graph() {
        let w = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let x = Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let mut sgd = SgdMomentum::new(vars.clone(), 0.1, 0.9, 0.01);
        let mut adam = Adam::new(vars, 0.1, 0.01);
        for _ in 0..3 {
            let loss = w
                .as_tensor()
                .mul(&x)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            sgd.step(&grads).unwrap();
            adam.step(&grads).unwrap();
        }
        for t in sgd.state_tensors().values() {
            assert!(!t.track_op(), "an SGD buffer tracks ops");
        }
        for (name, t) in adam.state_tensors().unwrap() {
            assert!(!t.track_op(), "Adam's {name} tracks ops");
        }
    }

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
    fn adam_matches_the_reference_update_and_resumes_exactly() {
        let w = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = Adam::new(vec![("w".into(), w.clone())], 0.1, 0.0);
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let mut p = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=3 {
            let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            for i in 0..2 {
                let g = p[i];
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                p[i] -= 0.1 * mh / (vh.sqrt() + eps);
            }
            let got = w.as_tensor().to_vec1::<f32>().unwrap();
            for i in 0..2 {
                assert!((got[i] as f64 - p[i]).abs() < 1e-5, "{got:?} {p:?}");
            }
        }
        let state = opt.state_tensors().unwrap();
        let w2 = Var::from_tensor(&w.as_tensor().copy().unwrap()).unwrap();
        let mut opt2 =
            Optimizer::by_name("adam", vec![("w".into(), w2.clone())], 0.1, 0.0, 0.0).unwrap();
        opt2.load_state(&state).unwrap();
        let step = |var: &Var| {
            (var.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5)
                .unwrap()
                .backward()
                .unwrap()
        };
        opt.step(&step(&w)).unwrap();
        opt2.step(&step(&w2)).unwrap();
        assert_eq!(
            w.as_tensor().to_vec1::<f32>().unwrap(),
            w2.as_tensor().to_vec1::<f32>().unwrap()
        );
        assert!(Optimizer::by_name("lbfgs", vec![], 0.1, 0.0, 0.0).is_err());
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
