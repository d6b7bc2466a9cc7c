//! Config keys and presets of the `gm-dgm` job, plus the cross-key checks the schema's
//! per-key types cannot express.

use crate::config::{
    check_dataset, checkpoint_keys, ConfigError, ConfigKey, ConfigSchema, ResolvedConfig,
};

/// Which models to train.
pub const MODELS: &[&str] = &["both", "m2", "gmdgm"];
/// How the classifier weight α is scaled.
pub const ALPHA_SCALINGS: &[&str] = &["none", "n-over-nl"];
/// The `dataset` value of the Fashion-MNIST-12k subset embedded in the binary.
pub const BUILTIN_FASHION: &str = "builtin:fashion-mnist-12k";
/// Number of classes of Fashion-MNIST.
pub const CLASSES: usize = 10;

/// The job's schema: presets `quick` (default, a few minutes on 2 CPU cores) and `paper`
/// (the paper's sizes and optimiser).
pub fn schema() -> ConfigSchema {
    let mut keys = vec![
        ConfigKey::choice(
            "models",
            MODELS,
            "both",
            "train M2 (the baseline), the GM-DGM, or both (M2 first)",
        ),
        ConfigKey::str(
            "dataset",
            BUILTIN_FASHION,
            "the data: builtin:fashion-mnist-12k (10k train / 2k test, in the binary), or the URL \
             of a folder in MNIST layout pushed with `trainyard data push` (file://, s3://, gs://, \
             az://); the paper preset wants the full Fashion-MNIST this way",
        ),
        ConfigKey::float(
            "labelled_fraction",
            1e-4,
            1.0,
            0.02,
            "fraction of each labelled class's training images that keep their label (the \
             paper's v1 abstract: 2%; the brief's split and the small-scale design: 5%)",
        )
        .preset("quick", 0.05),
        ConfigKey::str(
            "masked_classes",
            "0,1,2,3,4",
            "comma-separated classes with no labels at all (half of Fashion-MNIST's 10)",
        ),
        ConfigKey::int(
            "extra_components",
            0,
            100,
            5,
            "N_aug: mixture components beyond the 10 classes, never labelled (n_y = 10 + N_aug)",
        ),
        ConfigKey::int(
            "hidden",
            1,
            4096,
            500,
            "n_h: units of each of the 2 hidden layers of every MLP",
        )
        .preset("quick", 256),
        ConfigKey::int("latent", 1, 1024, 100, "n_z: latent dimensions").preset("quick", 32),
        ConfigKey::int(
            "epochs",
            1,
            100_000,
            300,
            "epochs per model (an epoch is one pass over the unlabelled set)",
        )
        .preset("quick", 20),
        ConfigKey::int(
            "batch_size",
            1,
            10_000,
            100,
            "per-rank batch: this many unlabelled plus this many labelled images per step",
        ),
        ConfigKey::float("lr", 1e-7, 1.0, 3e-4, "Adam learning rate").preset("quick", 1e-3),
        ConfigKey::int(
            "lr_decay_epochs",
            0,
            100_000,
            200,
            "multiply lr by lr_decay every this many epochs, floored at lr/10 (0: constant)",
        ),
        ConfigKey::float("lr_decay", 0.0, 1.0, 0.75, "staircase lr factor"),
        ConfigKey::float(
            "alpha",
            0.0,
            1e6,
            1.1,
            "weight of the classifier term log q(y|x) on labelled data",
        ),
        ConfigKey::choice(
            "alpha_scaling",
            ALPHA_SCALINGS,
            "none",
            "none: alpha as is (what the paper's code actually trains with); n-over-nl: alpha x \
             N_train / N_labelled (what its code intended)",
        ),
        ConfigKey::float(
            "l2_reg",
            0.0,
            1e6,
            0.5,
            "weight prior: l2_reg x sum log N(W; 0, I) / N_train over all weight matrices",
        ),
        ConfigKey::float(
            "clip",
            0.0,
            1e6,
            1.0,
            "clip every gradient element to [-clip, clip] (0: no clipping)",
        ),
        ConfigKey::float(
            "drop_std",
            0.0,
            1.0,
            0.1,
            "drop pixels whose training-set standard deviation is below this",
        ),
        ConfigKey::int(
            "train_samples",
            1,
            60_000,
            60_000,
            "training images used (all of them when larger than the set)",
        ),
        ConfigKey::int(
            "test_samples",
            1,
            10_000,
            10_000,
            "test images used (all of them when larger than the set)",
        ),
        ConfigKey::int(
            "eval_batch_size",
            1,
            10_000,
            500,
            "batch size for evaluation",
        ),
        ConfigKey::bool(
            "eval_each_epoch",
            true,
            "evaluate test accuracy after every epoch, not only at the end",
        )
        .preset("quick", false),
        ConfigKey::int(
            "seed",
            0,
            i64::MAX,
            0,
            "seed for the label split, init, shuffling, binarisation and sampling",
        ),
    ];
    keys.extend(checkpoint_keys(20));
    ConfigSchema::fixed(
        "gm-dgm",
        &[
            (
                "quick",
                "small CPU run on the embedded Fashion-MNIST-12k: MLPs of 256, n_z 32, lr 1e-3, \
                 5% labels on classes 5-9, 20 epochs",
            ),
            (
                "paper",
                "the paper's sizes: MLPs of 500, n_z 100, lr 3e-4 with its decay, 300 epochs, 2% \
                 labels; pass the full Fashion-MNIST with --set dataset=<url>",
            ),
        ],
        keys,
    )
}

/// Parses `masked_classes` into sorted, distinct class ids; at least one class must stay
/// labelled.
pub fn masked_classes(config: &ResolvedConfig) -> Result<Vec<usize>, ConfigError> {
    let raw = config.get_str("masked_classes")?;
    let bad = |reason: String| ConfigError::InvalidValue {
        key: "masked_classes".into(),
        value: raw.to_string(),
        reason,
    };
    let mut out = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let c: usize = part
            .parse()
            .map_err(|_| bad(format!("\"{part}\" is not a class id")))?;
        if c >= CLASSES {
            return Err(bad(format!("class {c} is not in 0..{CLASSES}")));
        }
        if out.contains(&c) {
            return Err(bad(format!("class {c} is listed twice")));
        }
        out.push(c);
    }
    if out.len() >= CLASSES {
        return Err(bad("at least one class must keep labels".to_string()));
    }
    out.sort_unstable();
    Ok(out)
}

/// Checks what single-key validation cannot: the masked classes and the data set URL.
pub fn check(config: &ResolvedConfig) -> Result<(), ConfigError> {
    masked_classes(config)?;
    check_dataset(config, "dataset", BUILTIN_FASHION)
}
