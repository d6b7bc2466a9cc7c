//! Built-in image data sets, embedded in the binary with `include_bytes!`.
//!
//! * MNIST-10k: 8,000 training and 2,000 test images (28×28, 10 classes) from
//!   `jobs/data/mnist-10k/`.
//! * Fashion-MNIST-12k: 10,000 training and 2,000 test images (28×28, 10 classes: 1,000 and
//!   200 per class) from `jobs/data/fashion-mnist-12k/`.

use super::idx::{parse_idx, parse_labels, IdxArray, IdxError};

const MNIST_TRAIN_IMAGES: &[u8] = include_bytes!("../../data/mnist-10k/train-images-idx3-ubyte.gz");
const MNIST_TRAIN_LABELS: &[u8] = include_bytes!("../../data/mnist-10k/train-labels-idx1-ubyte.gz");
const MNIST_TEST_IMAGES: &[u8] = include_bytes!("../../data/mnist-10k/t10k-images-idx3-ubyte.gz");
const MNIST_TEST_LABELS: &[u8] = include_bytes!("../../data/mnist-10k/t10k-labels-idx1-ubyte.gz");
const FASHION_TRAIN_IMAGES: &[u8] =
    include_bytes!("../../data/fashion-mnist-12k/train-images-idx3-ubyte.gz");
const FASHION_TRAIN_LABELS: &[u8] =
    include_bytes!("../../data/fashion-mnist-12k/train-labels-idx1-ubyte.gz");
const FASHION_TEST_IMAGES: &[u8] =
    include_bytes!("../../data/fashion-mnist-12k/t10k-images-idx3-ubyte.gz");
const FASHION_TEST_LABELS: &[u8] =
    include_bytes!("../../data/fashion-mnist-12k/t10k-labels-idx1-ubyte.gz");

/// A labelled set of single-channel u8 images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDataset {
    /// Row-major pixels, `len() * rows * cols` bytes.
    pub images: Vec<u8>,
    /// One class id per image.
    pub labels: Vec<u8>,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// Number of classes.
    pub classes: usize,
}

impl ImageDataset {
    /// Builds a data set from IDX image and label files (gzipped or not).
    pub fn from_idx(
        name: &str,
        images: &[u8],
        labels: &[u8],
        classes: u8,
    ) -> Result<Self, IdxError> {
        let labels = parse_labels(&format!("{name} labels"), labels, classes)?;
        let arr = parse_idx_images(name, images)?;
        if arr.dims[0] != labels.len() {
            return Err(IdxError::Dims {
                name: format!("{name} images"),
                expected: format!("{} images to match the labels", labels.len()),
                found: arr.dims,
            });
        }
        Ok(Self {
            rows: arr.dims[1],
            cols: arr.dims[2],
            images: arr.data,
            labels,
            classes: classes as usize,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.images[i * n..(i + 1) * n]
    }

    /// Images `start..end` (clamped to the data set), e.g. one rank's share of a test set.
    pub fn slice(&self, start: usize, end: usize) -> Self {
        let end = end.min(self.len());
        let start = start.min(end);
        let px = self.rows * self.cols;
        Self {
            images: self.images[start * px..end * px].to_vec(),
            labels: self.labels[start..end].to_vec(),
            ..*self
        }
    }

    /// The first `n` images (all of them if `n >= len()`).
    pub fn take(&self, n: usize) -> Self {
        let n = n.min(self.len());
        Self {
            images: self.images[..n * self.rows * self.cols].to_vec(),
            labels: self.labels[..n].to_vec(),
            ..*self
        }
    }
}

fn parse_idx_images(name: &str, bytes: &[u8]) -> Result<IdxArray, IdxError> {
    let arr = parse_idx(&format!("{name} images"), bytes)?;
    if arr.dims.len() != 3 {
        return Err(IdxError::Dims {
            name: format!("{name} images"),
            expected: "[n, rows, cols]".to_string(),
            found: arr.dims,
        });
    }
    Ok(arr)
}

/// The embedded MNIST-10k subset: `(train, test)` with 8,000 and 2,000 images.
pub fn mnist_10k() -> Result<(ImageDataset, ImageDataset), IdxError> {
    let train = ImageDataset::from_idx(
        "mnist-10k train",
        MNIST_TRAIN_IMAGES,
        MNIST_TRAIN_LABELS,
        10,
    )?;
    let test = ImageDataset::from_idx("mnist-10k test", MNIST_TEST_IMAGES, MNIST_TEST_LABELS, 10)?;
    Ok((train, test))
}

/// The embedded Fashion-MNIST-12k subset: `(train, test)` with 10,000 and 2,000 images
/// (classes: 0 T-shirt/top, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt,
/// 7 sneaker, 8 bag, 9 ankle boot).
pub fn fashion_mnist_12k() -> Result<(ImageDataset, ImageDataset), IdxError> {
    let train = ImageDataset::from_idx(
        "fashion-mnist-12k train",
        FASHION_TRAIN_IMAGES,
        FASHION_TRAIN_LABELS,
        10,
    )?;
    let test = ImageDataset::from_idx(
        "fashion-mnist-12k test",
        FASHION_TEST_IMAGES,
        FASHION_TEST_LABELS,
        10,
    )?;
    Ok((train, test))
}

/// File names of an MNIST-format data set folder (as published, optionally `.gz`).
pub const MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// A data set embedded in the binary, as `(train, test)`.
pub type Builtin = fn() -> Result<(ImageDataset, ImageDataset), IdxError>;

/// The `(train, test)` sets of a job's data set value `value`: the embedded set `builtins`
/// names it by, or else the MNIST-format folder the context fetched for the URL `value`
/// (labels below `classes`; rank 0, `primary`, logs where it is). An error names `value`.
pub fn load_images(
    ctx: &dyn crate::job::JobContext,
    value: &str,
    builtins: &[(&str, Builtin)],
    classes: u8,
    primary: bool,
) -> Result<(ImageDataset, ImageDataset), crate::job::JobError> {
    let loaded = match builtins.iter().find(|(name, _)| *name == value) {
        Some((_, builtin)) => builtin(),
        None => {
            let dir = ctx.dataset(value)?;
            if primary {
                ctx.log(&format!("data set {value} in {}", dir.display()));
            }
            mnist_from_dir(&dir, classes)
        }
    };
    loaded.map_err(|e| crate::job::JobError::Data(format!("{value}: {e}")))
}

/// Loads an MNIST-format folder (MNIST, Fashion-MNIST, or any set in that layout): the four
/// files of [`MNIST_FILES`], each plain or gzipped (`.gz`). `classes` bounds the labels.
pub fn mnist_from_dir(
    dir: &std::path::Path,
    classes: u8,
) -> Result<(ImageDataset, ImageDataset), IdxError> {
    let read = |stem: &str| -> Result<Vec<u8>, IdxError> {
        let plain = dir.join(stem);
        let gz = dir.join(format!("{stem}.gz"));
        let path = if gz.is_file() { gz } else { plain };
        std::fs::read(&path).map_err(|source| IdxError::Read {
            name: path.display().to_string(),
            source,
        })
    };
    let name = dir.display().to_string();
    let [train_images, train_labels, test_images, test_labels] = MNIST_FILES;
    let train = ImageDataset::from_idx(
        &format!("{name} train"),
        &read(train_images)?,
        &read(train_labels)?,
        classes,
    )?;
    let test = ImageDataset::from_idx(
        &format!("{name} test"),
        &read(test_images)?,
        &read(test_labels)?,
        classes,
    )?;
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::idx::tests::{gzip, idx_bytes};

    #[test]
    fn a_folder_in_mnist_layout_loads_like_the_embedded_set() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist-10k");
        let (train, test) = mnist_from_dir(&dir, 10).unwrap();
        let (etrain, etest) = mnist_10k().unwrap();
        assert_eq!(train, etrain);
        assert_eq!(test, etest);
        let err = mnist_from_dir(std::path::Path::new("/nonexistent"), 10).unwrap_err();
        assert!(err.to_string().contains("/nonexistent"), "{err}");
    }

    #[test]
    fn embedded_fashion_mnist_12k() {
        let (train, test) = fashion_mnist_12k().unwrap();
        assert_eq!((train.len(), test.len()), (10_000, 2_000));
        for (ds, per_class) in [(&train, 1000), (&test, 200)] {
            let mut counts = [0usize; 10];
            for l in &ds.labels {
                counts[*l as usize] += 1;
            }
            assert_eq!(counts, [per_class; 10]);
        }
        // Brighter than MNIST on average (mean intensity about 0.29 vs 0.13).
        let mean =
            train.images.iter().map(|p| *p as f64).sum::<f64>() / train.images.len() as f64 / 255.0;
        assert!((0.25..0.33).contains(&mean), "{mean}");
    }

    #[test]
    fn embedded_mnist_10k() {
        let (train, test) = mnist_10k().unwrap();
        assert_eq!((train.len(), test.len()), (8000, 2000));
        assert_eq!((train.rows, train.cols, train.classes), (28, 28, 10));
        // every class is present in both splits, roughly balanced
        for ds in [&train, &test] {
            let mut counts = [0usize; 10];
            for l in &ds.labels {
                counts[*l as usize] += 1;
            }
            let min = *counts.iter().min().unwrap();
            assert!(min * 10 > ds.len() * 7 / 10, "{counts:?}");
        }
        // pixels look like MNIST: mostly black, some full-intensity strokes
        let img = train.image(0);
        assert!(img.iter().filter(|p| **p == 0).count() > 400);
        assert!(img.iter().any(|p| *p > 200));
        assert_eq!(train.take(10).len(), 10);
        assert_eq!(train.take(10).image(9), train.image(9));
        let part = test.slice(1000, 1010);
        assert_eq!(
            (part.len(), part.image(3), part.labels[3]),
            (10, test.image(1003), test.labels[1003])
        );
        assert_eq!(test.slice(1990, 5000).len(), 10);
        assert!(test.slice(3000, 4000).is_empty());
    }

    #[test]
    fn mismatched_counts_are_errors() {
        let imgs = gzip(&idx_bytes(&[2, 2, 2], &[0; 8]));
        let labels = gzip(&idx_bytes(&[3], &[0, 1, 2]));
        let e = ImageDataset::from_idx("t", &imgs, &labels, 10).unwrap_err();
        assert!(e.to_string().contains("3 images"), "{e}");
        let labels = idx_bytes(&[2], &[0, 1]);
        let ds = ImageDataset::from_idx("t", &imgs, &labels, 10).unwrap();
        assert_eq!((ds.len(), ds.rows, ds.cols), (2, 2, 2));
    }
}
