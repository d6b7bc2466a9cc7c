//! The `neural-ode` job: Chen et al. 2018, "Neural Ordinary Differential Equations".
//!
//! `experiment=mnist` trains the paper's ResNet (6 pre-activation ResBlocks) and ODE-Net
//! (one ODEBlock solved with dopri5 or RK4, backprop through the solver) on the embedded
//! MNIST-10k subset and compares test accuracy, parameter count and NFE.

pub mod bench;
pub mod mnist;
pub mod models;
pub mod schema;

use std::collections::BTreeMap;

use crate::config::{ConfigError, ConfigSchema, ResolvedConfig};
use crate::job::{Job, JobContext, JobError};

/// The `neural-ode` job.
#[derive(Debug)]
pub struct NeuralOdeJob {
    schema: ConfigSchema,
}

impl NeuralOdeJob {
    /// The job with its config schema.
    pub fn new() -> Self {
        Self {
            schema: schema::schema(),
        }
    }
}

impl Default for NeuralOdeJob {
    fn default() -> Self {
        Self::new()
    }
}

impl Job for NeuralOdeJob {
    fn name(&self) -> &'static str {
        "neural-ode"
    }

    fn description(&self) -> &'static str {
        "Neural ODEs (Chen et al. 2018): ODE-Net vs ResNet on MNIST-10k"
    }

    fn schema(&self) -> &ConfigSchema {
        &self.schema
    }

    fn resolve_config(
        &self,
        preset: &str,
        overrides: &BTreeMap<String, String>,
    ) -> Result<ResolvedConfig, ConfigError> {
        let config = self.schema.resolve(preset, overrides)?;
        schema::check(&config)?;
        Ok(config)
    }

    fn run(&self, config: &ResolvedConfig, ctx: &dyn JobContext) -> Result<(), JobError> {
        schema::check(config)?;
        match config.get_str("experiment")? {
            "mnist" => mnist::run(config, ctx),
            other => Err(JobError::Other(format!("unknown experiment {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryContext;

    fn tiny(extra: &[(&str, &str)]) -> ResolvedConfig {
        let mut o: BTreeMap<String, String> = [
            ("width", "4"),
            ("groups", "2"),
            ("epochs", "2"),
            ("batch_size", "16"),
            ("train_samples", "64"),
            ("test_samples", "32"),
            ("eval_batch_size", "16"),
            ("rtol", "0.1"),
            ("atol", "0.1"),
            ("checkpoint_every", "3"),
            ("log_every", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            o.insert(k.to_string(), v.to_string());
        }
        NeuralOdeJob::new().resolve_config("quick", &o).unwrap()
    }

    #[test]
    fn runs_end_to_end_at_a_tiny_size() {
        let job = NeuralOdeJob::new();
        let ctx = MemoryContext::new();
        job.run(&tiny(&[]), &ctx).unwrap();
        let table = ctx.results_table().expect("results table");
        assert_eq!(table.rows.len(), 2);
        assert_eq!(table.rows[0][0], "ResNet");
        assert_eq!(table.rows[1][0], "ODE-Net");
        assert!(table.notes.iter().any(|n| n.contains("parameter ratio")));
        assert!(table.notes.iter().any(|n| n.contains("paper's claim")));
        // 64 images / batch 16 = 4 steps per epoch, 2 epochs, 2 models
        assert_eq!(ctx.metric_values("resnet/train_loss").len(), 8);
        assert_eq!(ctx.metric_values("odenet/train_loss").len(), 8);
        let acc = ctx.last_metric("odenet/test_acc").unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert!(ctx.last_metric("odenet/test_nfe_forward").unwrap() >= 8.0);
        assert!(ctx.last_metric("resnet/test_acc").is_some());
        // checkpoints at steps 3 and 6 (resnet), the boundary at 8, 9 and 12 (odenet),
        // and the final boundary at 16
        let steps: Vec<u64> = ctx.checkpoints().iter().map(|c| c.step).collect();
        assert_eq!(steps, vec![3, 6, 8, 9, 12, 15, 16]);
        assert!(ctx.progress_stages().contains_key("train odenet"));
        assert!(ctx.logs().iter().all(|l| !l.contains("resumed")));
    }

    #[test]
    fn trains_on_a_data_set_folder_named_by_url_and_rejects_other_values() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist-10k");
        let url = format!("file://{}", dir.display());
        let job = NeuralOdeJob::new();
        let ctx = MemoryContext::new();
        job.run(&tiny(&[("models", "resnet"), ("dataset", &url)]), &ctx)
            .unwrap();
        assert!(
            ctx.logs().iter().any(|l| l.contains(&url)),
            "{:?}",
            ctx.logs()
        );
        assert!(ctx.last_metric("resnet/test_acc").is_some());

        let mut o = BTreeMap::new();
        o.insert("dataset".to_string(), "ftp://host/mnist".to_string());
        let err = job.resolve_config("quick", &o).unwrap_err();
        assert!(err.to_string().contains("dataset"), "{err}");
        o.insert("dataset".to_string(), "s3://".to_string());
        assert!(job.resolve_config("quick", &o).is_err());
    }

    #[test]
    fn resumes_from_a_checkpoint_where_it_stopped() {
        let job = NeuralOdeJob::new();
        let config = tiny(&[("models", "odenet")]);
        // first attempt: stop right after the second checkpoint (step 6)
        let first = MemoryContext::new().stop_after_checkpoints(2);
        let err = job.run(&config, &first).unwrap_err();
        assert!(matches!(err, JobError::Stopped), "{err}");
        let cp = first.latest_checkpoint().unwrap();
        assert_eq!(cp.step, 6);
        assert_eq!(cp.state["epoch"], 1);
        assert_eq!(cp.state["step_in_epoch"], 2);
        assert!(cp.tensors.keys().any(|k| k.starts_with("model.odefunc.")));
        assert!(cp.tensors.keys().any(|k| k.starts_with("optimizer.")));
        assert!(first.results_table().is_none());

        // a straight run for comparison
        let straight = MemoryContext::new();
        job.run(&config, &straight).unwrap();

        let second = MemoryContext::resuming_from(cp);
        job.run(&config, &second).unwrap();
        assert!(second
            .logs()
            .iter()
            .any(|l| l == "resumed from checkpoint at step 6"));
        assert_eq!(second.metric_values("resumed_from_step"), vec![(6, 6.0)]);
        // only the remaining steps 7 and 8 were trained
        let losses = second.metric_values("odenet/train_loss");
        assert_eq!(
            losses.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![7, 8]
        );
        // and they are exactly the steps of an uninterrupted run
        let straight_losses = straight.metric_values("odenet/train_loss");
        for (s, v) in &losses {
            let (_, w) = straight_losses.iter().find(|(t, _)| t == s).unwrap();
            assert!((v - w).abs() < 1e-4, "step {s}: {v} vs {w}");
        }
        assert_eq!(
            second.last_metric("odenet/test_acc"),
            straight.last_metric("odenet/test_acc")
        );
        assert!(second.results_table().is_some());
    }

    #[test]
    fn config_errors_name_the_key() {
        let job = NeuralOdeJob::new();
        let set = |k: &str, v: &str| {
            [(k.to_string(), v.to_string())]
                .into_iter()
                .collect::<BTreeMap<_, _>>()
        };
        let e = job
            .resolve_config("quick", &set("width", "36"))
            .unwrap_err();
        assert!(e.to_string().starts_with("width:"), "{e}");
        let e = job
            .resolve_config("quick", &set("lr_milestones", "0.5,2"))
            .unwrap_err();
        assert!(e.to_string().starts_with("lr_milestones:"), "{e}");
        let e = job
            .resolve_config("quick", &set("experiment", "cnf"))
            .unwrap_err();
        assert!(e.to_string().starts_with("experiment:"), "{e}");
        let e = job.resolve_config("huge", &BTreeMap::new()).unwrap_err();
        assert!(e.to_string().contains("quick, paper"), "{e}");
        let paper = job.resolve_config("paper", &BTreeMap::new()).unwrap();
        assert_eq!(paper.get_usize("width").unwrap(), 64);
        assert_eq!(paper.get_usize("epochs").unwrap(), 160);
        assert_eq!(paper.get_usize("batch_size").unwrap(), 128);
        assert_eq!(paper.get_f64("rtol").unwrap(), 1e-3);
        let fr = schema::milestones(&paper).unwrap();
        let epochs: Vec<f64> = fr.iter().map(|f| f * 160.0).collect();
        assert_eq!(epochs, vec![60.0, 100.0, 140.0]);
    }
}
