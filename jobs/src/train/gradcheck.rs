//! Checks that every trainable variable receives a non-zero gradient — catches layers
//! whose candle op has no backward (fused norms, `softmax_last_dim`) and detached paths.

use candle_core::backprop::GradStore;
use candle_core::Var;

/// Errors from [`check_grads`].
#[derive(Debug, thiserror::Error)]
pub enum GradCheckError {
    /// Variables with no gradient at all, or an all-zero / non-finite one.
    #[error("variables without a usable gradient: {}", .0.join(", "))]
    Missing(Vec<String>),
    /// Reading a gradient failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Returns an error naming every variable whose gradient is missing, all zero, or not
/// finite.
pub fn check_grads(vars: &[(String, Var)], grads: &GradStore) -> Result<(), GradCheckError> {
    let mut bad = Vec::new();
    for (name, var) in vars {
        match grads.get(var.as_tensor()) {
            None => bad.push(format!("{name} (none)")),
            Some(g) => {
                let v = g
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1::<f64>()?;
                if v.iter().any(|x| !x.is_finite()) {
                    bad.push(format!("{name} (not finite)"));
                } else if v.iter().all(|x| *x == 0.0) {
                    bad.push(format!("{name} (zero)"));
                }
            }
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(GradCheckError::Missing(bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn finds_missing_and_zero_grads() {
        let a = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let b = Var::new(&[3.0f32], &Device::Cpu).unwrap();
        let c = Var::new(&[0.0f32], &Device::Cpu).unwrap();
        // c enters only multiplied by a zero tensor: its gradient exists but is zero
        let zero = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
        let loss = (a.as_tensor().sum_all().unwrap()
            + c.as_tensor().mul(&zero).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let vars = vec![
            ("a".to_string(), a),
            ("b".to_string(), b),
            ("c".to_string(), c),
        ];
        let err = check_grads(&vars, &grads).unwrap_err().to_string();
        assert!(
            err.contains("b (none)") && err.contains("c (zero)"),
            "{err}"
        );
        assert!(!err.contains("a ("), "{err}");
        assert!(check_grads(&vars[..1], &grads).is_ok());
    }
}
