//! Seeded, PyTorch-style parameter initialisation (candle's CPU RNG cannot be seeded).
//!
//! Weights with ≥ 2 dimensions (conv, linear) and their `bias` get
//! `U(-1/√fan_in, 1/√fan_in)` — PyTorch's default `kaiming_uniform_(a=√5)` bound and
//! bias rule. 1-D weights (norm scales) are set to 1 and their biases to 0.

use candle_core::{Result, Tensor, Var};
use rand::Rng;

use super::params::named_vars;
use crate::data::derived_rng;

/// Re-initialises every variable of `varmap` from `seed`.
pub fn init_pytorch_style(varmap: &candle_nn::VarMap, seed: u64) -> Result<()> {
    let vars = named_vars(varmap);
    let fan_in_of = |prefix: &str| -> Option<usize> {
        vars.iter()
            .find(|(n, _)| n == &format!("{prefix}.weight"))
            .and_then(|(_, v)| {
                let dims = v.dims();
                (dims.len() >= 2).then(|| dims[1..].iter().product())
            })
    };
    for (i, (name, var)) in vars.iter().enumerate() {
        let (prefix, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let dims = var.dims();
        let value = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            uniform(var, fan_in, seed, i as u64)?
        } else if leaf == "bias" {
            match fan_in_of(prefix) {
                Some(fan_in) => uniform(var, fan_in, seed, i as u64)?,
                None => var.zeros_like()?,
            }
        } else {
            var.ones_like()?
        };
        var.set(&value)?;
    }
    Ok(())
}

fn uniform(var: &Var, fan_in: usize, seed: u64, index: u64) -> Result<Tensor> {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    let mut rng = derived_rng(seed, 0x1417, index, 0);
    let values: Vec<f32> = (0..var.elem_count())
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn build(seed: u64) -> VarMap {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        candle_nn::linear(16, 4, vb.pp("fc")).unwrap();
        candle_nn::group_norm(2, 4, 1e-5, vb.pp("gn")).unwrap();
        init_pytorch_style(&vm, seed).unwrap();
        vm
    }

    fn values(vm: &VarMap) -> Vec<(String, Vec<f32>)> {
        named_vars(vm)
            .into_iter()
            .map(|(n, v)| (n, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect()
    }

    #[test]
    fn seeded_and_in_bounds() {
        let a = values(&build(1));
        assert_eq!(a, values(&build(1)));
        assert_ne!(a, values(&build(2)));
        for (name, v) in &a {
            match name.as_str() {
                "fc.weight" | "fc.bias" => {
                    assert!(v.iter().all(|x| x.abs() <= 0.25), "{name}");
                    assert!(v.iter().any(|x| *x != 0.0), "{name}");
                }
                "gn.weight" => assert!(v.iter().all(|x| *x == 1.0)),
                "gn.bias" => assert!(v.iter().all(|x| *x == 0.0)),
                other => panic!("unexpected {other}"),
            }
        }
    }
}
