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

/// The tensors of `tensors` whose name starts with `prefix`, renamed without it: e.g. the
/// optimizer state (`optimizer.m.w` → `m.w`) of a checkpoint's tensors.
pub fn with_prefix(
    tensors: &std::collections::BTreeMap<String, candle_core::Tensor>,
    prefix: &str,
) -> std::collections::BTreeMap<String, candle_core::Tensor> {
    tensors
        .iter()
        .filter_map(|(k, t)| k.strip_prefix(prefix).map(|n| (n.to_string(), t.clone())))
        .collect()
}

/// `vars` sorted by `(stage(name), name)`: the order the forward pass uses them when
/// `stage` numbers the model's parts in that order, so that [`crate::train::DataParallel`]
/// fills its gradient buckets from the last part back, the order backward produces them.
pub fn forward_order(vars: &[(String, Var)], stage: impl Fn(&str) -> usize) -> Vec<(String, Var)> {
    let mut out = vars.to_vec();
    out.sort_by(|a, b| (stage(&a.0), &a.0).cmp(&(stage(&b.0), &b.0)));
    out
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
    fn with_prefix_strips_and_filters() {
        let t = candle_core::Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let all: std::collections::BTreeMap<String, candle_core::Tensor> = [
            ("model.w".to_string(), t.clone()),
            ("optimizer.m.w".to_string(), t.clone()),
            ("optimizer.steps".to_string(), t),
        ]
        .into();
        let got: Vec<String> = with_prefix(&all, "optimizer.").into_keys().collect();
        assert_eq!(got, vec!["m.w".to_string(), "steps".to_string()]);
    }

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
