//! Data sets in object storage: `trainyard data push <dir> <url>` uploads a folder, and
//! workers fetch it once into a local cache keyed by its digest.
//!
//! # Layout
//!
//! ```text
//! <url>/<relative path of each file>     the files, as they were in the folder
//! <url>/dataset.json                      the manifest, written LAST
//! ```
//!
//! The manifest lists every file with its size and SHA-256. A data set's **digest** is the
//! SHA-256 of its manifest's bytes: it changes whenever any file does. A folder without a
//! manifest is not a data set (an interrupted push is invisible, as with checkpoints).
//!
//! # Cache
//!
//! [`fetch`] keeps data sets under `<cache>/<digest>/`. The first rank that needs one takes
//! an exclusive lock on `<cache>/<digest>.lock`, downloads into `<cache>/<digest>.partial/`,
//! verifies every size and digest, and renames the folder into place; ranks on the same
//! worker that ask meanwhile wait on the lock and then find the folder complete, so a
//! worker downloads each data set once. A folder in place is complete by construction
//! (the rename is the commit); a crashed download leaves only a `.partial` folder, which
//! the next fetch deletes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::{open_objects, Objects, ObjectsError};

/// Name of the manifest object of a data set.
pub const MANIFEST: &str = "dataset.json";
/// Version of the manifest format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Errors of pushing or fetching a data set.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The object store failed (or the URL is not usable).
    #[error(transparent)]
    Objects(#[from] ObjectsError),
    /// A local file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The local path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The URL names no data set (no manifest there).
    #[error(
        "{url}: no data set there (no {MANIFEST}; push one with `trainyard data push <dir> {url}`)"
    )]
    NotFound {
        /// The data set URL.
        url: String,
    },
    /// The manifest does not parse or has an unknown version.
    #[error("{url}/{MANIFEST}: {reason}")]
    BadManifest {
        /// The data set URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A downloaded file differs from its manifest entry.
    #[error("{url}: {path}: {reason}")]
    Corrupt {
        /// The data set URL.
        url: String,
        /// The file, relative to the data set.
        path: String,
        /// What differs.
        reason: String,
    },
    /// The folder to push holds no files.
    #[error("{path}: no files to push")]
    Empty {
        /// The folder.
        path: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One file of a data set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatasetFile {
    /// Path relative to the data set root, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// The manifest of a data set (`dataset.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatasetManifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Every file, sorted by path.
    pub files: Vec<DatasetFile>,
}

impl DatasetManifest {
    /// Total bytes of the files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// What [`push`] uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The manifest written.
    pub manifest: DatasetManifest,
    /// The data set's digest (SHA-256 of the manifest's bytes).
    pub digest: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The files under `dir`, recursively, as (relative `/`-path, absolute path), sorted.
fn walk(dir: &Path) -> Result<Vec<(String, PathBuf)>, DatasetError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let entry = entry.map_err(io_err(&d))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(io_err(&path))?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let rel = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                if rel != MANIFEST {
                    out.push((rel, path));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Uploads every file under `dir` to the data set at `url`, then its manifest (last).
/// `progress(done_bytes, total_bytes)` is called after each file.
pub async fn push(
    dir: &Path,
    url: &str,
    mut progress: impl FnMut(u64, u64),
) -> Result<Pushed, DatasetError> {
    let objects = open_objects(url)?;
    let files = walk(dir)?;
    if files.is_empty() {
        return Err(DatasetError::Empty {
            path: dir.display().to_string(),
        });
    }
    let mut total = 0u64;
    for (_, path) in &files {
        total += std::fs::metadata(path).map_err(io_err(path))?.len();
    }
    let mut done = 0u64;
    let mut entries = Vec::with_capacity(files.len());
    for (rel, path) in files {
        let bytes = tokio::fs::read(&path).await.map_err(io_err(&path))?;
        let entry = DatasetFile {
            path: rel.clone(),
            size: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
        };
        objects.put(&rel, Bytes::from(bytes)).await?;
        done += entry.size;
        progress(done, total);
        entries.push(entry);
    }
    let manifest = DatasetManifest {
        format_version: FORMAT_VERSION,
        files: entries,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| DatasetError::BadManifest {
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    let digest = sha256_hex(&json);
    objects.put(MANIFEST, Bytes::from(json)).await?;
    tracing::info!(url = %objects.url(), files = manifest.files.len(), bytes = manifest.total_bytes(), %digest, "data set pushed");
    Ok(Pushed { manifest, digest })
}

/// The manifest of the data set at `url` and its digest (nothing is downloaded).
pub async fn manifest(url: &str) -> Result<(DatasetManifest, String), DatasetError> {
    let objects = open_objects(url)?;
    read_manifest(&objects, url).await
}

async fn read_manifest(
    objects: &Objects,
    url: &str,
) -> Result<(DatasetManifest, String), DatasetError> {
    let Some(got) = objects.get(MANIFEST).await? else {
        return Err(DatasetError::NotFound {
            url: url.to_string(),
        });
    };
    let bad = |reason: String| DatasetError::BadManifest {
        url: url.to_string(),
        reason,
    };
    let manifest: DatasetManifest =
        serde_json::from_slice(&got.bytes).map_err(|e| bad(e.to_string()))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "format_version {} (this build reads {FORMAT_VERSION})",
            manifest.format_version
        )));
    }
    for f in &manifest.files {
        let unsafe_path = f.path.is_empty()
            || f.path.starts_with('/')
            || f.path
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..");
        if unsafe_path {
            return Err(bad(format!(
                "file path {:?} is not a plain relative path",
                f.path
            )));
        }
    }
    Ok((manifest, sha256_hex(&got.bytes)))
}

/// A data set fetched into the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The local folder holding the files (complete and verified).
    pub dir: PathBuf,
    /// The data set's digest.
    pub digest: String,
    /// Whether this call downloaded it (false: it was already cached).
    pub downloaded: bool,
}

/// Makes the data set at `url` available under `cache` (see the module docs) and returns
/// its folder. Safe to call from several processes at once: one downloads, the others wait.
pub async fn fetch(url: &str, cache: &Path) -> Result<Fetched, DatasetError> {
    let objects = open_objects(url)?;
    let (manifest, digest) = read_manifest(&objects, url).await?;
    tokio::fs::create_dir_all(cache)
        .await
        .map_err(io_err(cache))?;
    let dir = cache.join(&digest);
    if dir.is_dir() {
        return Ok(Fetched {
            dir,
            digest,
            downloaded: false,
        });
    }
    // One downloader per data set and worker: the others wait here.
    let lock_path = cache.join(format!("{digest}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
        .await
        .map_err(|e| DatasetError::Io {
            path: lock_path.display().to_string(),
            source: std::io::Error::other(e),
        })?
        .map_err(io_err(&lock_path))?;
    if dir.is_dir() {
        drop(lock);
        return Ok(Fetched {
            dir,
            digest,
            downloaded: false,
        });
    }
    let partial = cache.join(format!("{digest}.partial"));
    if partial.exists() {
        tokio::fs::remove_dir_all(&partial)
            .await
            .map_err(io_err(&partial))?;
    }
    for f in &manifest.files {
        let Some(got) = objects.get(&f.path).await? else {
            return Err(DatasetError::Corrupt {
                url: url.to_string(),
                path: f.path.clone(),
                reason: "listed in the manifest but missing".into(),
            });
        };
        let corrupt = |reason: String| DatasetError::Corrupt {
            url: url.to_string(),
            path: f.path.clone(),
            reason,
        };
        if got.bytes.len() as u64 != f.size {
            return Err(corrupt(format!(
                "{} bytes, the manifest says {}",
                got.bytes.len(),
                f.size
            )));
        }
        let actual = sha256_hex(&got.bytes);
        if actual != f.sha256 {
            return Err(corrupt(format!(
                "sha256 {actual}, the manifest says {}",
                f.sha256
            )));
        }
        let target = partial.join(&f.path);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io_err(parent))?;
        }
        tokio::fs::write(&target, &got.bytes)
            .await
            .map_err(io_err(&target))?;
    }
    tokio::fs::write(
        partial.join(MANIFEST),
        serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
    )
    .await
    .map_err(io_err(&partial))?;
    tokio::fs::rename(&partial, &dir)
        .await
        .map_err(io_err(&dir))?;
    drop(lock);
    tracing::info!(url = %objects.url(), %digest, files = manifest.files.len(), bytes = manifest.total_bytes(), "data set downloaded into the cache");
    Ok(Fetched {
        dir,
        digest,
        downloaded: true,
    })
}

/// The files of a fetched data set by relative path (for loaders that look files up by
/// name).
pub fn files_in(fetched: &Fetched) -> Result<BTreeMap<String, PathBuf>, DatasetError> {
    Ok(walk(&fetched.dir)?
        .into_iter()
        .collect::<BTreeMap<String, PathBuf>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.idx"), vec![1u8; 1000]).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/b.idx"), b"hello").unwrap();
        d
    }

    #[tokio::test]
    async fn push_then_fetch_once_and_verify() {
        let src = folder();
        let store = tempfile::tempdir().unwrap();
        let url = format!("file://{}/datasets/demo", store.path().display());
        let mut calls = Vec::new();
        let pushed = push(src.path(), &url, |d, t| calls.push((d, t)))
            .await
            .unwrap();
        assert_eq!(pushed.manifest.files.len(), 2);
        assert_eq!(calls.last(), Some(&(1005, 1005)));

        let cache = tempfile::tempdir().unwrap();
        let a = fetch(&url, cache.path()).await.unwrap();
        assert!(a.downloaded);
        assert_eq!(a.digest, pushed.digest);
        assert_eq!(std::fs::read(a.dir.join("sub/b.idx")).unwrap(), b"hello");
        let b = fetch(&url, cache.path()).await.unwrap();
        assert!(!b.downloaded, "the second fetch uses the cache");
        let files = files_in(&b).unwrap();
        assert!(files.contains_key("a.idx") && files.contains_key("sub/b.idx"));

        // A changed file is a new data set (new digest), fetched again.
        std::fs::write(src.path().join("a.idx"), vec![2u8; 1000]).unwrap();
        let pushed2 = push(src.path(), &url, |_, _| {}).await.unwrap();
        assert_ne!(pushed2.digest, pushed.digest);
        let c = fetch(&url, cache.path()).await.unwrap();
        assert!(c.downloaded);
        assert_eq!(std::fs::read(c.dir.join("a.idx")).unwrap(), vec![2u8; 1000]);
    }

    #[tokio::test]
    async fn concurrent_fetches_download_once() {
        let src = folder();
        let store = tempfile::tempdir().unwrap();
        let url = format!("file://{}/ds", store.path().display());
        push(src.path(), &url, |_, _| {}).await.unwrap();
        let cache = tempfile::tempdir().unwrap();
        let fetches = (0..6).map(|_| fetch(&url, cache.path()));
        let results = futures::future::join_all(fetches).await;
        let downloaded = results
            .iter()
            .filter(|r| r.as_ref().map(|f| f.downloaded).unwrap_or(false))
            .count();
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        assert_eq!(downloaded, 1, "one download, the others waited for it");
    }

    #[tokio::test]
    async fn corrupt_and_missing_are_reported() {
        let src = folder();
        let store = tempfile::tempdir().unwrap();
        let url = format!("file://{}/ds", store.path().display());
        let cache = tempfile::tempdir().unwrap();
        let err = fetch(&url, cache.path()).await.unwrap_err();
        assert!(matches!(err, DatasetError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("trainyard data push"));

        push(src.path(), &url, |_, _| {}).await.unwrap();
        // Plant a different file of the same size.
        std::fs::write(store.path().join("ds/a.idx"), vec![9u8; 1000]).unwrap();
        let err = fetch(&url, cache.path()).await.unwrap_err();
        assert!(
            matches!(&err, DatasetError::Corrupt { path, .. } if path == "a.idx"),
            "{err}"
        );
        assert!(
            std::fs::read_dir(cache.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .all(
                    |e| !e.path().is_dir() || e.file_name().to_string_lossy().ends_with(".partial")
                ),
            "nothing corrupt is committed to the cache"
        );

        let empty = tempfile::tempdir().unwrap();
        let err = push(empty.path(), &url, |_, _| {}).await.unwrap_err();
        assert!(matches!(err, DatasetError::Empty { .. }));
    }
}
