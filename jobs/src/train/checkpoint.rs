//! A job's checkpoint: its tensors (the model's variables under `model.<name>` and the
//! optimizer's state under `optimizer.<name>`) and its JSON state, written and read the
//! same way by every job.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::job::{Checkpoint, JobContext, JobError};
use crate::train::Optimizer;

/// Prefix of a model variable's tensor in a checkpoint.
pub const MODEL_PREFIX: &str = "model.";
/// Prefix of an optimizer state tensor in a checkpoint.
pub const OPTIMIZER_PREFIX: &str = "optimizer.";

/// The checkpoint tensors of `vars` and of the optimizer state `optimizer` (as its
/// `state_tensors()` returns it).
pub fn checkpoint_tensors(
    vars: &[(String, Var)],
    optimizer: BTreeMap<String, Tensor>,
) -> BTreeMap<String, Tensor> {
    let mut out: BTreeMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (format!("{MODEL_PREFIX}{n}"), v.as_tensor().clone()))
        .collect();
    for (n, t) in optimizer {
        out.insert(format!("{OPTIMIZER_PREFIX}{n}"), t);
    }
    out
}

/// Sets every variable of `vars` from its `model.<name>` tensor in `tensors`; a missing
/// tensor or one of another shape is a [`JobError::Checkpoint`] naming it.
pub fn restore_vars(
    vars: &[(String, Var)],
    tensors: &BTreeMap<String, Tensor>,
) -> Result<(), JobError> {
    for (n, v) in vars {
        let key = format!("{MODEL_PREFIX}{n}");
        let t = tensors
            .get(&key)
            .ok_or_else(|| JobError::Checkpoint(format!("checkpoint lacks tensor {key}")))?;
        if t.dims() != v.dims() {
            return Err(JobError::Checkpoint(format!(
                "tensor {key} has shape {:?}, the model needs {:?}",
                t.dims(),
                v.dims()
            )));
        }
        v.set(&t.to_dtype(v.dtype())?)?;
    }
    Ok(())
}

/// The optimizer state in `tensors`, named as the optimizer's `load_state` expects.
pub fn optimizer_state(tensors: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    crate::train::with_prefix(tensors, OPTIMIZER_PREFIX)
}

/// Sets `vars` and the state of `opt` from a checkpoint's `tensors` (as
/// [`checkpoint_tensors`] wrote them).
pub fn restore_training(
    vars: &[(String, Var)],
    opt: &mut Optimizer,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<(), JobError> {
    restore_vars(vars, tensors)?;
    opt.load_state(&optimizer_state(tensors))
        .map_err(|e| JobError::Checkpoint(e.to_string()))
}

/// Saves a checkpoint at `step` of the job's `state` (as JSON), `tensors` and `metrics`.
pub fn save_state(
    ctx: &dyn JobContext,
    step: u64,
    state: &impl Serialize,
    tensors: BTreeMap<String, Tensor>,
    metrics: &[(&str, f64)],
) -> Result<(), JobError> {
    let cp = Checkpoint {
        step,
        tensors,
        state: serde_json::to_value(state).map_err(|e| JobError::Checkpoint(e.to_string()))?,
        metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    };
    ctx.save_checkpoint(&cp)?;
    tracing::debug!(step, "checkpoint saved");
    Ok(())
}

/// The job state of checkpoint `cp`, which must have field `version` equal to `version`.
pub fn load_state<S: DeserializeOwned>(cp: &Checkpoint, version: u32) -> Result<S, JobError> {
    let state: S = serde_json::from_value(cp.state.clone())
        .map_err(|e| JobError::Checkpoint(e.to_string()))?;
    let found = cp.state.get("version").and_then(serde_json::Value::as_u64);
    if found != Some(u64::from(version)) {
        let found = found.map_or_else(|| "none".to_string(), |v| v.to_string());
        return Err(JobError::Checkpoint(format!(
            "unsupported state version {found}"
        )));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn tensors_round_trip_and_bad_ones_are_named() {
        let d = Device::Cpu;
        let w = Var::new(&[1f32, 2.], &d).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let m = Tensor::new(&[0.5f32, 0.5], &d).unwrap();
        let all = checkpoint_tensors(&vars, [("m.w".to_string(), m)].into());
        let keys: Vec<&str> = all.keys().map(String::as_str).collect();
        assert_eq!(keys, ["model.w", "optimizer.m.w"]);
        assert_eq!(optimizer_state(&all).len(), 1);
        // As read back from storage: copies, not the variables' own tensors.
        let all: BTreeMap<String, Tensor> = all
            .into_iter()
            .map(|(k, t)| (k, t.copy().unwrap()))
            .collect();
        w.set(&Tensor::new(&[9f32, 9.], &d).unwrap()).unwrap();
        restore_vars(&vars, &all).unwrap();
        assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), [1., 2.]);
        let other = vec![("x".to_string(), w.clone())];
        let err = restore_vars(&other, &all).unwrap_err().to_string();
        assert!(err.contains("lacks tensor model.x"), "{err}");
        let short: BTreeMap<String, Tensor> =
            [("model.w".to_string(), Tensor::new(&[1f32], &d).unwrap())].into();
        let err = restore_vars(&vars, &short).unwrap_err().to_string();
        assert!(err.contains("shape"), "{err}");
    }
}
