//! [`Local`]: the collective of a world of one rank.

use candle_core::Tensor;

use crate::{check_dtypes, check_root, Collective, CollectiveError, ReduceOp};

/// A world of one rank, in process: every collective returns its inputs (detached), as a
/// real backend would with a single rank. Lets single-rank and CPU code paths use the
/// [`Collective`] trait without a network.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl Local {
    /// The single-rank communicator.
    pub fn new() -> Self {
        Self
    }
}

impl Collective for Local {
    fn backend(&self) -> &'static str {
        "local"
    }

    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce(
        &mut self,
        tensors: &[Tensor],
        _op: ReduceOp,
    ) -> Result<Vec<Tensor>, CollectiveError> {
        // The sum over one rank and the mean over one rank are both the value itself.
        check_dtypes(tensors)?;
        Ok(tensors.iter().map(Tensor::detach).collect())
    }

    fn broadcast(
        &mut self,
        tensors: &[Tensor],
        root: usize,
    ) -> Result<Vec<Tensor>, CollectiveError> {
        check_root(root, 1)?;
        check_dtypes(tensors)?;
        Ok(tensors.iter().map(Tensor::detach).collect())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn one_rank_collectives_are_the_identity() {
        let d = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &d).unwrap();
        let b = Tensor::new(&[-1f32], &d).unwrap();
        let mut c = Local::new();
        assert_eq!((c.rank(), c.world_size(), c.backend()), (0, 1, "local"));
        for op in [ReduceOp::Sum, ReduceOp::Mean] {
            let out = c.all_reduce(&[a.clone(), b.clone()], op).unwrap();
            assert_eq!(out.len(), 2);
            assert_eq!(
                out[0].to_vec2::<f32>().unwrap(),
                a.to_vec2::<f32>().unwrap()
            );
            assert_eq!(out[1].to_vec1::<f32>().unwrap(), vec![-1.0]);
        }
        let out = c.broadcast(std::slice::from_ref(&a), 0).unwrap();
        assert_eq!(out[0].dims(), &[2, 2]);
        assert!(c.broadcast(&[a], 1).is_err());
        c.barrier().unwrap();
        assert!(c.all_reduce(&[], ReduceOp::Sum).unwrap().is_empty());
    }

    #[test]
    fn results_are_detached_and_dtypes_checked() {
        let d = Device::Cpu;
        let v = Var::new(&[1f32, 2.0], &d).unwrap();
        let mut c = Local::new();
        let out = c
            .all_reduce(&[v.as_tensor().clone()], ReduceOp::Mean)
            .unwrap();
        assert!(!out[0].is_variable());
        let f64s = Tensor::zeros(2, DType::F64, &d).unwrap();
        assert!(matches!(
            c.all_reduce(&[f64s], ReduceOp::Sum),
            Err(CollectiveError::UnsupportedDType { index: 0, .. })
        ));
    }

    #[test]
    fn usable_as_a_trait_object() {
        let mut boxed: Box<dyn Collective> = Box::new(Local::new());
        let t = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let out = boxed.all_reduce(&[t], ReduceOp::Sum).unwrap();
        assert_eq!(out[0].to_vec1::<f32>().unwrap(), vec![1.0; 4]);
    }
}
