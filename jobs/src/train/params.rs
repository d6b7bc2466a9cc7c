//! Parameter counting and named access to a `VarMap`'s variables.

use candle_core::Var;
use candle_nn::VarMap;

/// All variables of `varmap`, sorted by name (a stable order for optimizers and
/// checkpoints).
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap
        .data()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Total number of scalar parameters in `varmap`.
pub fn count_params(varmap: &VarMap) -> usize {
    named_vars(varmap).iter().map(|(_, v)| v.elem_count()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;

    #[test]
    fn counts_linear_layer() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        candle_nn::linear(5, 3, vb.pp("fc")).unwrap();
        assert_eq!(count_params(&vm), 5 * 3 + 3);
        let names: Vec<String> = named_vars(&vm).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["fc.bias", "fc.weight"]);
    }
}
