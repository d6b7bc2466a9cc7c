//! Config keys and presets of the `neural-ode` job, plus the cross-key checks the
//! schema's per-key types cannot express.

use crate::config::{
    check_dataset, checkpoint_keys, ConfigError, ConfigKey, ConfigSchema, ResolvedConfig,
};

/// Experiments this job can run (later issues add `cnf` and `latent-ode`).
pub const EXPERIMENTS: &[&str] = &["mnist", "cnf", "latent-ode"];
/// Which models to train.
pub const MODELS: &[&str] = &["both", "odenet", "resnet"];
/// Target densities of `experiment=cnf` (`all` trains each in turn).
pub const CNF_DENSITIES: &[&str] = &["all", "circles", "moons", "gaussians"];
/// ODE solvers.
pub const SOLVERS: &[&str] = &["dopri5", "rk4"];
/// Gradient modes of the ODE solves: through the solver's stages, or the adjoint method.
pub const GRADIENTS: &[&str] = &["backprop", "adjoint"];
/// Optimizers the job can train with.
pub const OPTIMIZERS: &[&str] = &["sgd", "adam"];

/// The job's schema: presets `quick` (default, a few minutes on 2 CPU cores) and
/// `paper` (the paper's recipe).
pub fn schema() -> ConfigSchema {
    let mut keys =
        vec![
        ConfigKey::choice("experiment", EXPERIMENTS, "mnist", "which experiment to run"),
        ConfigKey::choice(
            "models",
            MODELS,
            "both",
            "train the ResNet, the ODE-Net, or both (ResNet first)",
        ),
        ConfigKey::str(
            "dataset",
            BUILTIN_MNIST,
            "the data: builtin:mnist-10k (in the binary), or the URL of a folder in MNIST layout \
             pushed with `trainyard data push` (file://, s3://, gs://, az://)",
        ),
        ConfigKey::choice("solver", SOLVERS, "dopri5", "ODE solver of the ODE-Net"),
        ConfigKey::float("rtol", 1e-9, 1.0, 1e-3, "dopri5 relative tolerance")
            .preset("quick", 0.1),
        ConfigKey::float("atol", 1e-9, 1.0, 1e-3, "dopri5 absolute tolerance")
            .preset("quick", 0.1),
        ConfigKey::int("rk4_steps", 1, 1000, 4, "RK4 steps on [0, 1] (solver=rk4)"),
        ConfigKey::int(
            "latent_train",
            1,
            100_000,
            1000,
            "experiment=latent-ode: training spirals (full batch, split over the ranks)",
        )
        .preset("quick", 300),
        ConfigKey::int("latent_test", 1, 100_000, 200, "experiment=latent-ode: test spirals")
            .preset("quick", 100),
        ConfigKey::int(
            "latent_iterations",
            1,
            1_000_000,
            2000,
            "experiment=latent-ode: Adam iterations (both models train together)",
        )
        .preset("quick", 300),
        ConfigKey::float("latent_lr", 1e-6, 1.0, 0.01, "experiment=latent-ode: Adam learning rate"),
        ConfigKey::float(
            "latent_noise",
            0.0,
            10.0,
            0.3,
            "experiment=latent-ode: observation noise std (also the likelihood's fixed std)",
        ),
        ConfigKey::choice(
            "gradient",
            GRADIENTS,
            "backprop",
            "how the ODE-Net gets its gradients: backprop through the solver's stages, or the \
             adjoint method (a second ODE solved backwards; memory independent of the steps)",
        ),
        ConfigKey::int(
            "width",
            1,
            512,
            64,
            "channels C of every layer",
        )
        .preset("quick", 32),
        ConfigKey::int(
            "groups",
            1,
            512,
            32,
            "GroupNorm groups, capped at the width (paper: min(32, C)); must divide the width",
        )
        .preset("quick", 8),
        ConfigKey::int("epochs", 1, 10_000, 160, "training epochs per model").preset("quick", 4),
        ConfigKey::int("batch_size", 1, 8000, 128, "mini-batch size").preset("quick", 32),
        ConfigKey::float(
            "lr",
            1e-6,
            10.0,
            0.1,
            "initial learning rate (paper: 0.1 x batch/128)",
        )
        .preset("quick", 0.05),
        ConfigKey::str(
            "lr_milestones",
            "0.375,0.625,0.875",
            "comma-separated fractions of training (0..1) at which lr is multiplied by lr_decay \
             (paper: epochs 60,100,140 of 160)",
        )
        .preset("quick", "0.75"),
        ConfigKey::float("lr_decay", 0.0, 1.0, 0.1, "lr factor at each milestone"),
        ConfigKey::choice(
            "optimizer",
            OPTIMIZERS,
            "sgd",
            "sgd (with momentum; the paper) or adam",
        ),
        ConfigKey::float("momentum", 0.0, 0.999, 0.9, "SGD momentum"),
        ConfigKey::float("weight_decay", 0.0, 1.0, 0.0, "L2 weight decay"),
        ConfigKey::bool("augment", true, "random crop (pad 4, crop 28)").preset("quick", false),
        ConfigKey::int(
            "train_samples",
            1,
            8000,
            8000,
            "training images used (of 8,000)",
        ),
        ConfigKey::int("test_samples", 1, 2000, 2000, "test images used (of 2,000)"),
        ConfigKey::int(
            "eval_batch_size",
            1,
            2000,
            500,
            "batch size for evaluation (NFE is per test batch)",
        ),
        ConfigKey::bool(
            "eval_each_epoch",
            true,
            "evaluate on the test set after every epoch, not only at the end",
        )
        .preset("quick", false),
        ConfigKey::choice(
            "cnf_density",
            CNF_DENSITIES,
            "all",
            "experiment=cnf: the 2-D target density (two circles, two moons, 8 Gaussians) or all",
        ),
        ConfigKey::int("cnf_width", 1, 1024, 64, "experiment=cnf: CNF width M (planar units)"),
        ConfigKey::int(
            "cnf_hidden",
            1,
            1024,
            32,
            "experiment=cnf: hidden units of the CNF's time hypernetwork",
        ),
        ConfigKey::int(
            "cnf_planar_layers",
            1,
            1024,
            32,
            "experiment=cnf: layers K of the planar-flow baseline",
        ),
        ConfigKey::int(
            "cnf_iterations",
            1,
            1_000_000,
            10_000,
            "experiment=cnf: training iterations per model and density",
        )
        .preset("quick", 300),
        ConfigKey::int(
            "cnf_batch_size",
            1,
            100_000,
            512,
            "experiment=cnf: fresh samples per iteration (per rank)",
        )
        .preset("quick", 256),
        ConfigKey::float("cnf_lr", 1e-6, 1.0, 1e-3, "experiment=cnf: Adam learning rate")
            .preset("quick", 5e-3),
        ConfigKey::float(
            "cnf_tol",
            1e-9,
            1.0,
            1e-5,
            "experiment=cnf: dopri5 rtol = atol of the CNF",
        )
        .preset("quick", 1e-3),
        ConfigKey::float(
            "cnf_t1",
            1e-3,
            100.0,
            10.0,
            "experiment=cnf: the CNF integrates over [0, t1]",
        ),
        ConfigKey::int(
            "cnf_test_samples",
            1,
            1_000_000,
            10_000,
            "experiment=cnf: fresh held-out samples for the NLL",
        )
        .preset("quick", 2000),
        ConfigKey::int(
            "cnf_grid",
            2,
            400,
            100,
            "experiment=cnf: cells per side of the density plots",
        )
        .preset("quick", 64),
        ConfigKey::int("seed", 0, i64::MAX, 0, "seed for init, shuffling and augmentation"),
    ];
    keys.extend(checkpoint_keys(10));
    // The schema above is fixed; a bad default is a bug caught by the registry test.
    ConfigSchema::fixed(
        "neural-ode",
        &[
            (
                "quick",
                "small CPU run: width 32 (8 groups), batch 32, 4 epochs, one lr decay, no augmentation, \
                 tolerance 0.1",
            ),
            (
                "paper",
                "the paper's recipe: width 64, batch 128, lr 0.1, 160 epochs, tol 1e-3",
            ),
        ],
        keys,
    )
}

/// Parses `lr_milestones` into sorted fractions in (0, 1).
pub fn milestones(config: &ResolvedConfig) -> Result<Vec<f64>, ConfigError> {
    let raw = config.get_str("lr_milestones")?;
    let mut out = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let v: f64 = part.parse().map_err(|_| ConfigError::InvalidValue {
            key: "lr_milestones".into(),
            value: raw.to_string(),
            reason: format!("\"{part}\" is not a number"),
        })?;
        if !(v > 0.0 && v < 1.0) {
            return Err(ConfigError::InvalidValue {
                key: "lr_milestones".into(),
                value: raw.to_string(),
                reason: format!("{part} is not a fraction in (0, 1)"),
            });
        }
        out.push(v);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// Checks what single-key validation cannot: GroupNorm divisibility and milestones.
pub fn check(config: &ResolvedConfig) -> Result<(), ConfigError> {
    let width = config.get_usize("width")?;
    let groups = config.get_usize("groups")?.min(width);
    if width % groups != 0 {
        return Err(ConfigError::InvalidValue {
            key: "width".into(),
            value: width.to_string(),
            reason: format!("must be a multiple of the GroupNorm group count {groups}"),
        });
    }
    milestones(config)?;
    check_dataset(config, "dataset", BUILTIN_MNIST)
}

/// The `dataset` value of the MNIST-10k subset embedded in the binary.
pub const BUILTIN_MNIST: &str = "builtin:mnist-10k";
