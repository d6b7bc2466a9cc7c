//! The `neural-ode` job: Chen et al. 2018, "Neural Ordinary Differential Equations".
//!
//! `experiment=mnist` trains the paper's ResNet (6 pre-activation ResBlocks) and ODE-Net
//! (one ODEBlock solved with dopri5 or RK4, backprop through the solver) on the embedded
//! MNIST-10k subset and compares test accuracy, parameter count and NFE.
//!
//! `experiment=cnf` trains a continuous normalizing flow and a planar normalizing flow by
//! maximum likelihood on 2-D densities and compares their held-out NLL (see [`cnf`]).
//!
//! It trains data-parallel on up to [`NeuralOdeJob::MAX_RANKS`] ranks (see [`mnist`]):
//! `batch_size` is the batch of each rank, so the global batch is `batch_size × ranks`,
//! as with PyTorch's DDP. Scale `lr` with the global batch if you want the paper's
//! `0.1 × batch / 128` rule.

pub mod bench;
pub mod cnf;
pub mod latent;
pub mod mnist;
pub mod models;
pub mod schema;
pub mod toy2d;

use crate::config::ResolvedConfig;
use crate::job::{paper_job, JobContext, JobError};

paper_job! {
    /// The `neural-ode` job.
    pub struct NeuralOdeJob;
    name: "neural-ode",
    description: "Neural ODEs (Chen et al. 2018): ODE-Net vs ResNet on MNIST-10k",
    /// Most ranks the job trains on data-parallel (a TCP ring or NCCL of up to 32 ranks;
    /// MNIST-10k's 8,000 images give a rank of 32 only 250 per epoch).
    max_ranks: 32,
    schema: schema::schema,
    check: schema::check,
    run: run,
}

/// Runs the experiment `config` names.
fn run(config: &ResolvedConfig, ctx: &dyn JobContext) -> Result<(), JobError> {
    match config.get_str("experiment")? {
        "mnist" => mnist::run(config, ctx),
        "latent-ode" => latent::run(config, ctx),
        "cnf" => cnf::run(config, ctx),
        other => Err(JobError::Other(format!("unknown experiment {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::job::Job;
    use crate::testing::MemoryContext;

    fn tiny(extra: &[(&str, &str)]) -> ResolvedConfig {
        crate::testing::quick_config(
            &NeuralOdeJob::new(),
            &[
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
            ],
            extra,
        )
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

    /// Connects `n` ranks over a loopback TCP ring and builds their contexts with `make`.
    fn ranks(n: u32, make: impl Fn(u32) -> MemoryContext) -> Vec<MemoryContext> {
        let config = trainyard_collective::RingConfig {
            connect_timeout: std::time::Duration::from_secs(20),
            op_timeout: std::time::Duration::from_secs(60),
            ..Default::default()
        };
        crate::testing::loopback_rings(n as usize, "test-attempt", config)
            .unwrap()
            .into_iter()
            .zip(0..n)
            .map(|(ring, r)| make(r).with_rank(r, n).with_communicator(Box::new(ring)))
            .collect()
    }

    /// Runs the job on every context, one thread per rank.
    fn run_ranks(config: &ResolvedConfig, contexts: &[MemoryContext]) -> Vec<Result<(), JobError>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = contexts
                .iter()
                .map(|ctx| s.spawn(move || NeuralOdeJob::new().run(config, ctx)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// The largest difference between two checkpoints' tensors, relative to the largest
    /// magnitude (the names must match).
    fn max_rel_diff(a: &crate::job::Checkpoint, b: &crate::job::Checkpoint) -> f64 {
        assert_eq!(
            a.tensors.keys().collect::<Vec<_>>(),
            b.tensors.keys().collect::<Vec<_>>()
        );
        let (mut diff, mut scale) = (0f64, 0f64);
        for (name, t) in &a.tensors {
            let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = b.tensors[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (x, y) in x.iter().zip(&y) {
                diff = diff.max((x - y).abs() as f64);
                scale = scale.max(x.abs() as f64);
            }
        }
        diff / scale.max(1e-12)
    }

    #[test]
    fn two_ranks_of_batch_b_train_like_one_rank_of_batch_2b() {
        // K = 3 steps of global batch 16, then rank 0 stops after its first checkpoint and
        // rank 1 must stop with it. RK4: dopri5 adapts its steps to the whole batch, so
        // only a fixed-step solver gives the same ODE solve on a split batch.
        for model in ["resnet", "odenet"] {
            let config = |batch: &str| {
                tiny(&[
                    ("models", model),
                    ("solver", "rk4"),
                    ("rk4_steps", "2"),
                    ("batch_size", batch),
                    ("checkpoint_every", "3"),
                ])
            };
            let single = MemoryContext::new().stop_after_checkpoints(1);
            let err = NeuralOdeJob::new().run(&config("16"), &single).unwrap_err();
            assert!(matches!(err, JobError::Stopped), "{err}");

            let two = ranks(2, |_| MemoryContext::new().stop_after_checkpoints(1));
            for r in run_ranks(&config("8"), &two) {
                assert!(matches!(r, Err(JobError::Stopped)), "{r:?}");
            }
            let a = single.latest_checkpoint().unwrap();
            let b = two[0].latest_checkpoint().unwrap();
            assert_eq!((a.step, b.step), (3, 3));
            assert!(b.tensors.keys().any(|k| k.starts_with("optimizer.")));
            let d = max_rel_diff(&a, &b);
            assert!(d < 1e-4, "{model}: parameters differ by {d:e} (relative)");
            // the tolerance tells batches apart: one rank of batch 8 ends elsewhere
            let half = MemoryContext::new().stop_after_checkpoints(1);
            let _ = NeuralOdeJob::new().run(&config("8"), &half);
            let off = max_rel_diff(&a, &half.latest_checkpoint().unwrap());
            assert!(off > 1e-3, "{model}: batch 8 vs 16 differ by only {off:e}");
            // the reported loss is the mean over the ranks: the loss of the global batch
            let la = single.metric_values(&format!("{model}/train_loss"));
            let lb = two[0].metric_values(&format!("{model}/train_loss"));
            assert_eq!(la.len(), 3);
            assert_eq!(
                la.iter().map(|p| p.0).collect::<Vec<_>>(),
                lb.iter().map(|p| p.0).collect::<Vec<_>>()
            );
            for ((s, x), (_, y)) in la.iter().zip(&lb) {
                assert!(
                    (x - y).abs() < 1e-4 * x.abs().max(1.0),
                    "{model} step {s}: {x} vs {y}"
                );
            }
            assert!(two[1].checkpoints().is_empty());
        }
    }

    #[test]
    fn only_rank_0_reports_saves_and_publishes() {
        let config = tiny(&[]);
        let two = ranks(2, |_| MemoryContext::new());
        for r in run_ranks(&config, &two) {
            r.unwrap();
        }
        let (r0, r1) = (&two[0], &two[1]);
        // rank 1 left logs, metrics, progress, checkpoints and results to rank 0 (the
        // rank process logs each rank's joining the ring)
        assert!(r1.checkpoints().is_empty());
        assert!(r1.metric_points().is_empty());
        assert!(r1.results_table().is_none());
        assert!(r1.progress_stages().is_empty());
        assert!(r1.logs().is_empty(), "{:?}", r1.logs());
        // 64 images / 2 ranks / batch 16 = 2 steps per epoch, 2 epochs, 2 models;
        // checkpoints every 3 steps and at the boundaries 4 and 8
        assert_eq!(r0.metric_values("resnet/train_loss").len(), 4);
        assert_eq!(r0.metric_values("odenet/train_loss").len(), 4);
        let steps: Vec<u64> = r0.checkpoints().iter().map(|c| c.step).collect();
        assert_eq!(steps, vec![3, 4, 6, 8]);
        assert_eq!(r0.checkpoints()[0].state["world_size"], 2);
        let table = r0.results_table().expect("results table");
        assert_eq!(table.rows.len(), 2);
        assert!(
            table.notes[0].contains("batch 16 per rank x 2 ranks = 32"),
            "{}",
            table.notes[0]
        );
        // the sharded evaluation saw the whole test set
        let acc = r0.last_metric("odenet/test_acc").unwrap();
        assert!((acc * 32.0 - (acc * 32.0).round()).abs() < 1e-9, "{acc}");
        assert!(r0.last_metric("odenet/test_nfe_forward").unwrap() >= 8.0);
        let share = r0.last_metric("resnet/comm_share").unwrap();
        assert!(share > 0.0 && share < 1.0, "{share}");
        assert!(r0.last_metric("resnet/samples_per_second").unwrap() > 0.0);
        assert!(r0
            .logs()
            .iter()
            .any(|l| l.contains("x 2 ranks (global batch 32, ring backend)")));
    }

    #[test]
    fn every_rank_resumes_from_the_same_checkpoint() {
        let config = tiny(&[("models", "resnet"), ("epochs", "3")]);
        // 2 steps per epoch, 6 in all; stop after the checkpoint at step 3
        let first = ranks(2, |_| MemoryContext::new().stop_after_checkpoints(1));
        for r in run_ranks(&config, &first) {
            assert!(matches!(r, Err(JobError::Stopped)), "{r:?}");
        }
        let cp = first[0].latest_checkpoint().unwrap();
        assert_eq!((cp.step, cp.state["epoch"].as_u64()), (3, Some(1)));
        let straight = ranks(2, |_| MemoryContext::new());
        for r in run_ranks(&config, &straight) {
            r.unwrap();
        }
        let second = ranks(2, |_| MemoryContext::resuming_from(cp.clone()));
        for r in run_ranks(&config, &second) {
            r.unwrap();
        }
        assert!(second[0]
            .logs()
            .iter()
            .any(|l| l == "resumed from checkpoint at step 3"));
        let losses = second[0].metric_values("resnet/train_loss");
        assert_eq!(
            losses.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![4, 5, 6]
        );
        let straight_losses = straight[0].metric_values("resnet/train_loss");
        for (s, v) in &losses {
            let (_, w) = straight_losses.iter().find(|(t, _)| t == s).unwrap();
            assert!((v - w).abs() < 1e-4, "step {s}: {v} vs {w}");
        }
        let (a, b) = (
            straight[0].latest_checkpoint().unwrap(),
            second[0].latest_checkpoint().unwrap(),
        );
        assert_eq!(a.step, b.step);
        assert_eq!(
            second[0].last_metric("resnet/test_acc"),
            straight[0].last_metric("resnet/test_acc")
        );
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
            .resolve_config("quick", &set("experiment", "gan"))
            .unwrap_err();
        assert!(e.to_string().starts_with("experiment:"), "{e}");
        let e = job.resolve_config("huge", &BTreeMap::new()).unwrap_err();
        assert_eq!(job.max_ranks(), NeuralOdeJob::MAX_RANKS);
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
