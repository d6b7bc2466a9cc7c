//! The `db-vae` job: Amini et al. 2019, "Uncovering and Mitigating Algorithmic Bias
//! through Learned Latent Structure" (the debiasing variational autoencoder).
//!
//! The brief's small-scale task ([`data`]): detect MNIST digits among Fashion-MNIST items,
//! where a rare subgroup of the digits (inverted intensities, 3% of the training digits but
//! half of the negatives) is what a plain classifier gets wrong. The DB-VAE ([`models`])
//! learns the latent structure of the digits without the subgroup labels, and samples
//! training digits with weights inversely proportional to their latent density
//! ([`resample`]), recomputed every epoch. The job trains the standard CNN with uniform
//! sampling and the DB-VAE, and reports the recall of every subgroup ([`train`]).
//!
//! It trains data-parallel on up to [`DbVaeJob::MAX_RANKS`] ranks: `batch_size` is the
//! batch of each rank.

pub mod bench;
pub mod data;
pub mod models;
pub mod resample;
pub mod schema;
pub mod train;

use crate::job::paper_job;

paper_job! {
    /// The `db-vae` job.
    pub struct DbVaeJob;
    name: "db-vae",
    description: "DB-VAE (Amini et al. 2019): debiased digit detection with a rare subgroup, MNIST vs \
        Fashion-MNIST",
    /// Most ranks the job trains on data-parallel.
    max_ranks: 32,
    schema: schema::schema,
    check: schema::check,
    run: train::run,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::ResolvedConfig;
    use crate::job::{Job, JobError};
    use crate::testing::MemoryContext;

    fn tiny(extra: &[(&str, &str)]) -> ResolvedConfig {
        crate::testing::quick_config(
            &DbVaeJob::new(),
            &[
                ("train_positives", "256"),
                ("train_negatives", "256"),
                ("rare_fraction", "0.05"),
                ("test_per_group", "25"),
                ("test_negatives", "100"),
                ("latent_dim", "4"),
                ("hidden", "32"),
                ("epochs", "2"),
                ("batch_size", "32"),
                ("lr", "0.002"),
                ("checkpoint_every", "10"),
                ("log_every", "1"),
            ],
            extra,
        )
    }

    #[test]
    fn runs_end_to_end_at_a_tiny_size() {
        let job = DbVaeJob::new();
        let ctx = MemoryContext::new();
        job.run(&tiny(&[]), &ctx).unwrap();
        let table = ctx.results_table().expect("results table");
        assert_eq!(table.rows.len(), 2);
        assert_eq!(table.rows[0][0], "Standard CNN");
        assert_eq!(table.rows[1][0], "DB-VAE");
        assert_eq!(table.rows[1].len(), table.columns.len());
        assert!(
            table
                .notes
                .iter()
                .any(|n| n.contains("claim") && n.contains("HELD")),
            "{:?}",
            table.notes
        );
        // structured claims for `trainyard reproduce`: recall gain, weight ratio, bias cut
        assert!(table.claims.len() >= 2, "{:?}", table.claims);
        assert!(table.claims[0].claim.contains("rare-subgroup recall"));
        assert!(table.claims[0].treatment.contains("rare recall"));
        // 512 images / batch 32 = 16 steps per epoch, 2 epochs, 2 models
        for m in ["cnn", "dbvae"] {
            let losses = ctx.metric_values(&format!("{m}/train_loss"));
            assert_eq!(losses.len(), 32, "{m}");
            let first: f64 = losses[..4].iter().map(|p| p.1).sum::<f64>() / 4.0;
            let last: f64 = losses[28..].iter().map(|p| p.1).sum::<f64>() / 4.0;
            assert!(last < first, "{m}: loss {first} -> {last}");
            // chance is 50% on this balanced test set (100 positives, 100 negatives)
            let acc = ctx.last_metric(&format!("{m}/test_acc")).unwrap();
            assert!(acc > 0.7, "{m}: accuracy {acc}");
        }
        assert!(ctx.last_metric("dbvae/kl").is_some());
        assert_eq!(ctx.metric_values("dbvae/weight_ratio_inverted").len(), 2);
        assert!(ctx.metric_values("cnn/weight_ratio_inverted").is_empty());
        assert!(ctx.progress_stages().contains_key("train dbvae"));
        let png = &ctx.artifacts()["db-vae-weights.png"];
        assert_eq!(&png[1..4], b"PNG");
        // checkpoints every 10 steps and at both model boundaries (32 and 64)
        let steps: Vec<u64> = ctx.checkpoints().iter().map(|c| c.step).collect();
        assert_eq!(steps, vec![10, 20, 30, 32, 40, 50, 60, 64]);
        let cp = &ctx.checkpoints()[4];
        assert!(cp.tensors.contains_key("sampler.weights"));
        assert!(cp.tensors.keys().any(|k| k.starts_with("model.decoder.")));
        assert!(cp.tensors.keys().any(|k| k.starts_with("optimizer.")));
    }

    #[test]
    fn resumes_mid_epoch_with_the_same_sampling_weights() {
        let job = DbVaeJob::new();
        let config = tiny(&[("models", "dbvae"), ("epochs", "2")]);
        let first = MemoryContext::new().stop_after_checkpoints(2);
        let err = job.run(&config, &first).unwrap_err();
        assert!(matches!(err, JobError::Stopped), "{err}");
        let cp = first.latest_checkpoint().unwrap();
        assert_eq!(cp.step, 20);
        assert_eq!(
            (
                cp.state["epoch"].as_u64(),
                cp.state["step_in_epoch"].as_u64()
            ),
            (Some(1), Some(4))
        );

        let straight = MemoryContext::new();
        job.run(&config, &straight).unwrap();
        let second = MemoryContext::resuming_from(cp);
        job.run(&config, &second).unwrap();
        assert!(second
            .logs()
            .iter()
            .any(|l| l == "resumed from checkpoint at step 20"));
        let losses = second.metric_values("dbvae/train_loss");
        assert_eq!(losses.first().map(|p| p.0), Some(21));
        let straight_losses = straight.metric_values("dbvae/train_loss");
        for (s, v) in &losses {
            let (_, w) = straight_losses.iter().find(|(t, _)| t == s).unwrap();
            assert!((v - w).abs() < 1e-4, "step {s}: {v} vs {w}");
        }
        assert_eq!(
            second.last_metric("dbvae/test_acc"),
            straight.last_metric("dbvae/test_acc")
        );
    }

    #[test]
    fn two_ranks_train_like_one_and_only_rank_0_reports() {
        let config = |batch: &str| {
            tiny(&[
                ("models", "dbvae"),
                ("batch_size", batch),
                ("checkpoint_every", "3"),
            ])
        };
        let single = MemoryContext::new().stop_after_checkpoints(1);
        let err = DbVaeJob::new().run(&config("32"), &single).unwrap_err();
        assert!(matches!(err, JobError::Stopped), "{err}");

        let ring = trainyard_collective::RingConfig {
            connect_timeout: std::time::Duration::from_secs(20),
            op_timeout: std::time::Duration::from_secs(60),
            ..Default::default()
        };
        let two: Vec<MemoryContext> = crate::testing::loopback_rings(2, "db-vae", ring)
            .unwrap()
            .into_iter()
            .zip(0..2u32)
            .map(|(r, i)| {
                MemoryContext::new()
                    .stop_after_checkpoints(1)
                    .with_rank(i, 2)
                    .with_communicator(Box::new(r))
            })
            .collect();
        let cfg = config("16");
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = two
                .iter()
                .map(|ctx| {
                    let cfg = &cfg;
                    s.spawn(move || DbVaeJob::new().run(cfg, ctx))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            assert!(matches!(r, Err(JobError::Stopped)), "{r:?}");
        }
        let (a, b) = (
            single.latest_checkpoint().unwrap(),
            two[0].latest_checkpoint().unwrap(),
        );
        assert_eq!((a.step, b.step), (3, 3));
        let (mut diff, mut scale) = (0f64, 0f64);
        for (name, t) in a.tensors.iter().filter(|(n, _)| n.starts_with("model.")) {
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
        assert!(
            diff / scale < 1e-4,
            "parameters differ by {:e}",
            diff / scale
        );
        assert!(two[1].checkpoints().is_empty());
        assert!(two[1].metric_points().is_empty());
        assert!(two[1].logs().is_empty(), "{:?}", two[1].logs());
        assert_eq!(a.state["world_size"], 1);
        assert_eq!(b.state["world_size"], 2);
    }

    /// The `quick` preset, in-process, printing its log and table (about 1.5 minutes in a
    /// release build on 2 shared cores; nextest's slow-timeout may kill it, so use cargo test):
    /// `cargo test --release -p trainyard-jobs --lib db_vae::tests::quick_preset --
    /// --ignored --nocapture`; `DB_VAE_SET=key=value,...` overrides keys.
    #[test]
    #[ignore]
    fn quick_preset() {
        let overrides = crate::testing::overrides_from_env("DB_VAE_SET", &[]);
        let job = DbVaeJob::new();
        let config = job.resolve_config("quick", &overrides).unwrap();
        let ctx = MemoryContext::new().echo_logs(true);
        job.run(&config, &ctx).unwrap();
        let table = ctx.results_table().unwrap();
        crate::testing::print_results(&table);
    }

    #[test]
    fn config_errors_name_the_key_and_presets_resolve() {
        let job = DbVaeJob::new();
        assert!(job.max_ranks() > 1);
        let set = |k: &str, v: &str| {
            [(k.to_string(), v.to_string())]
                .into_iter()
                .collect::<BTreeMap<_, _>>()
        };
        let e = job
            .resolve_config("quick", &set("positives", "ftp://x"))
            .unwrap_err();
        assert!(e.to_string().starts_with("positives:"), "{e}");
        let e = job
            .resolve_config("quick", &set("negatives", "mnist"))
            .unwrap_err();
        assert!(e.to_string().starts_with("negatives:"), "{e}");
        job.resolve_config("quick", &set("negatives", "file:///data/fashion"))
            .unwrap();
        let quick = job.resolve_config("quick", &BTreeMap::new()).unwrap();
        assert_eq!(quick.get_usize("latent_dim").unwrap(), 16);
        assert_eq!(quick.get_usize("train_positives").unwrap(), 8000);
        assert_eq!(quick.get_usize("epochs").unwrap(), 5);
        assert_eq!(quick.get_f64("rare_fraction").unwrap(), 0.01);
        assert_eq!(quick.get_str("combine").unwrap(), "max");
        assert_eq!(quick.get_f64("alpha").unwrap(), 0.01);
        let paper = job.resolve_config("paper", &BTreeMap::new()).unwrap();
        assert_eq!(paper.get_usize("latent_dim").unwrap(), 32);
        assert_eq!(paper.get_usize("epochs").unwrap(), 20);
        assert_eq!(paper.get_usize("train_positives").unwrap(), 0);
    }
}
