//! The MNIST models of the paper (torchdiffeq `odenet_mnist.py`, downsampling method
//! `conv`): a shared downsampling stem, then either 6 pre-activation ResBlocks (ResNet)
//! or one ODEBlock (ODE-Net), then the head GN → ReLU → global average pool → Linear.
//!
//! Every norm is GroupNorm (eps 1e-5; the paper uses `min(32, C)` groups, the group
//! count is a parameter), built from plain candle ops so it has a backward pass.

use std::cell::Cell;

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::nn::{GemmConv2d, GroupNorm, Linear};

use crate::ode::{OdeSolution, SolveStats, Solver};

/// Number of classes.
pub const CLASSES: usize = 10;

/// GroupNorm over `c` channels with `min(groups, c)` groups (the paper: 32); the fused
/// [`crate::nn::GroupNorm`], same parameters as `candle_nn::group_norm`.
pub fn norm(c: usize, groups: usize, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(groups.clamp(1, c), c, 1e-5, vb)
}

fn conv(
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<GemmConv2d> {
    GemmConv2d::new(c_in, c_out, k, stride, padding, bias, vb)
}

/// The downsampling stem: Conv(1→C, 3) → GN → ReLU → Conv(C→C, 4, s2, p1) → GN → ReLU →
/// Conv(C→C, 4, s2, p1). 28×28 → 6×6.
#[derive(Debug, Clone)]
pub struct Stem {
    conv1: GemmConv2d,
    norm1: GroupNorm,
    conv2: GemmConv2d,
    norm2: GroupNorm,
    conv3: GemmConv2d,
}

impl Stem {
    /// Builds the stem with width `c` under `vb`.
    pub fn new(c: usize, g: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: conv(1, c, 3, 1, 0, true, vb.pp("conv1"))?,
            norm1: norm(c, g, vb.pp("norm1"))?,
            conv2: conv(c, c, 4, 2, 1, true, vb.pp("conv2"))?,
            norm2: norm(c, g, vb.pp("norm2"))?,
            conv3: conv(c, c, 4, 2, 1, true, vb.pp("conv3"))?,
        })
    }
}

impl Module for Stem {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.conv1.forward(x)?;
        let x = self.conv2.forward(&self.norm1.forward_relu(&x)?)?;
        self.conv3.forward(&self.norm2.forward_relu(&x)?)
    }
}

/// The head: GN → ReLU → global average pool → Linear(C → 10).
#[derive(Debug, Clone)]
pub struct Head {
    norm: GroupNorm,
    fc: Linear,
}

impl Head {
    /// Builds the head with width `c` under `vb`.
    pub fn new(c: usize, g: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: norm(c, g, vb.pp("norm"))?,
            fc: crate::nn::linear(c, CLASSES, vb.pp("fc"))?,
        })
    }
}

impl Module for Head {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward_relu(x)?;
        let x = x.mean(3)?.mean(2)?;
        self.fc.forward(&x)
    }
}

/// Pre-activation residual block: `x + conv2(relu(gn2(conv1(relu(gn1(x))))))`,
/// 3×3 convolutions, padding 1, no bias.
#[derive(Debug, Clone)]
pub struct ResBlock {
    norm1: GroupNorm,
    conv1: GemmConv2d,
    norm2: GroupNorm,
    conv2: GemmConv2d,
}

impl ResBlock {
    /// Builds a block of width `c` under `vb`.
    pub fn new(c: usize, g: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: norm(c, g, vb.pp("norm1"))?,
            conv1: conv(c, c, 3, 1, 1, false, vb.pp("conv1"))?,
            norm2: norm(c, g, vb.pp("norm2"))?,
            conv2: conv(c, c, 3, 1, 1, false, vb.pp("conv2"))?,
        })
    }
}

impl Module for ResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.conv1.forward(&self.norm1.forward_relu(x)?)?;
        let out = self.conv2.forward(&self.norm2.forward_relu(&out)?)?;
        out + x
    }
}

/// The paper's ResNet: stem, 6 ResBlocks, head.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: Stem,
    blocks: Vec<ResBlock>,
    head: Head,
}

impl ResNet {
    /// Number of residual blocks.
    pub const BLOCKS: usize = 6;

    /// Builds the ResNet of width `c` under `vb`.
    pub fn new(c: usize, g: usize, vb: VarBuilder) -> Result<Self> {
        let blocks = (0..Self::BLOCKS)
            .map(|i| ResBlock::new(c, g, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            stem: Stem::new(c, g, vb.pp("stem"))?,
            blocks,
            head: Head::new(c, g, vb.pp("head"))?,
        })
    }
}

impl Module for ResNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.stem.forward(x)?;
        for block in &self.blocks {
            h = block.forward(&h)?;
        }
        self.head.forward(&h)
    }
}

/// A 3×3 convolution (padding 1, bias) over the input with a constant channel holding
/// the time `t` prepended, so the layer depends on t.
#[derive(Debug, Clone)]
pub struct ConcatConv2d {
    conv: GemmConv2d,
}

impl ConcatConv2d {
    /// `c_in` data channels (+1 time channel) → `c_out`.
    pub fn new(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv(c_in + 1, c_out, 3, 1, 1, true, vb)?,
        })
    }

    /// Applies the layer at time `t`.
    pub fn forward(&self, t: f64, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let tt = Tensor::full(t as f32, (b, 1, h, w), x.device())?.to_dtype(x.dtype())?;
        self.conv.forward(&Tensor::cat(&[&tt, x], 1)?)
    }
}

/// The ODE function f(t, h): GN → ReLU → ConcatConv → GN → ReLU → ConcatConv → GN.
#[derive(Debug, Clone)]
pub struct OdeFunc {
    norm1: GroupNorm,
    conv1: ConcatConv2d,
    norm2: GroupNorm,
    conv2: ConcatConv2d,
    norm3: GroupNorm,
}

impl OdeFunc {
    /// Builds f of width `c` under `vb`.
    pub fn new(c: usize, g: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: norm(c, g, vb.pp("norm1"))?,
            conv1: ConcatConv2d::new(c, c, vb.pp("conv1"))?,
            norm2: norm(c, g, vb.pp("norm2"))?,
            conv2: ConcatConv2d::new(c, c, vb.pp("conv2"))?,
            norm3: norm(c, g, vb.pp("norm3"))?,
        })
    }

    /// f(t, h).
    pub fn forward(&self, t: f64, x: &Tensor) -> Result<Tensor> {
        let out = self.conv1.forward(t, &self.norm1.forward_relu(x)?)?;
        let out = self.conv2.forward(t, &self.norm2.forward_relu(&out)?)?;
        self.norm3.forward(&out)
    }
}

/// The paper's ODE-Net: stem, one ODEBlock solving dh/dt = f(t, h) on [0, 1], head.
#[derive(Debug, Clone)]
pub struct OdeNet {
    stem: Stem,
    func: OdeFunc,
    head: Head,
    solver: Solver,
    last_stats: Cell<SolveStats>,
}

impl OdeNet {
    /// Builds the ODE-Net of width `c` under `vb`, integrating with `solver`.
    pub fn new(c: usize, g: usize, solver: Solver, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            stem: Stem::new(c, g, vb.pp("stem"))?,
            func: OdeFunc::new(c, g, vb.pp("odefunc"))?,
            head: Head::new(c, g, vb.pp("head"))?,
            solver,
            last_stats: Cell::new(SolveStats::default()),
        })
    }

    /// The solver in use.
    pub fn solver(&self) -> Solver {
        self.solver
    }

    /// Replaces the solver (e.g. for a tolerance sweep at evaluation time).
    pub fn set_solver(&mut self, solver: Solver) {
        self.solver = solver;
    }

    /// Runs the ODE block alone: h(1) from h(0), with the solve's statistics.
    pub fn ode_block(&self, h0: &Tensor) -> Result<OdeSolution> {
        let mut f = |t: f64, h: &Tensor| self.func.forward(t, h);
        self.solver.solve(&mut f, h0, 0.0, 1.0)
    }

    /// Statistics (NFE) of the most recent forward pass.
    pub fn last_stats(&self) -> SolveStats {
        self.last_stats.get()
    }
}

impl Module for OdeNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.stem.forward(x)?;
        let sol = self.ode_block(&h)?;
        self.last_stats.set(sol.stats);
        self.head.forward(&sol.y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ode::Dopri5Options;
    use crate::train::{check_grads, count_params, named_vars};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn batch(n: usize) -> (Tensor, Tensor) {
        let x = Tensor::rand(0f32, 1.0, (n, 1, 28, 28), &Device::Cpu).unwrap();
        let y = Tensor::new(
            (0..n as u32).map(|i| i % 10).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        (x, y)
    }

    #[test]
    fn parameter_counts_match_the_paper_at_width_64() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        OdeNet::new(64, 32, Solver::Rk4 { steps: 1 }, vb).unwrap();
        assert_eq!(count_params(&vm), 208_266);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        ResNet::new(64, 32, vb).unwrap();
        assert_eq!(count_params(&vm), 576_778);
    }

    #[test]
    fn every_resnet_parameter_gets_a_gradient() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let model = ResNet::new(8, 4, vb).unwrap();
        let (x, y) = batch(4);
        let logits = model.forward(&x).unwrap();
        assert_eq!(logits.dims(), &[4, 10]);
        let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
        let grads = loss.backward().unwrap();
        let vars = named_vars(&vm);
        assert_eq!(vars.len(), 10 + 6 * 6 + 4);
        check_grads(&vars, &grads).unwrap();
    }

    #[test]
    fn every_odenet_parameter_gets_a_gradient() {
        for solver in [
            Solver::Dopri5(Dopri5Options::new(1e-2, 1e-2)),
            Solver::Rk4 { steps: 2 },
        ] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            let model = OdeNet::new(8, 4, solver, vb).unwrap();
            let (x, y) = batch(4);
            let logits = model.forward(&x).unwrap();
            let stats = model.last_stats();
            assert!(
                stats.nfe_forward >= 8 && stats.nfe_backward > 0,
                "{stats:?}"
            );
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            let grads = loss.backward().unwrap();
            let vars = named_vars(&vm);
            assert_eq!(vars.len(), 10 + 10 + 4);
            check_grads(&vars, &grads).unwrap();
        }
    }

    #[test]
    fn concat_conv_depends_on_time() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let f = OdeFunc::new(4, 2, vb).unwrap();
        let x = Tensor::rand(0f32, 1.0, (2, 4, 6, 6), &Device::Cpu).unwrap();
        let a = f.forward(0.0, &x).unwrap();
        let b = f.forward(1.0, &x).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d > 1e-4, "{d}");
    }
}
