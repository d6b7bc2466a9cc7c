//! Data sets and input pipelines shared by all jobs.

pub mod batch;
pub mod idx;
pub mod mnist;

pub use batch::{batches, derived_rng, epoch_order, make_batch, random_crop};
pub use idx::{parse_idx, IdxArray, IdxError};
pub use mnist::{
    fashion_mnist_12k, load_images, mnist_10k, mnist_from_dir, Builtin, ImageDataset, MNIST_FILES,
};
