//! Checkpoint I/O in the object store.
//!
//! Layout: `jobs/<job-id>/checkpoints/<step>/model.safetensors` (every tensor of the
//! [`Checkpoint`]) and `jobs/<job-id>/checkpoints/<step>/manifest.json`, written LAST. A
//! checkpoint folder without a manifest does not exist. The manifest records the size and
//! SHA-256 digest of every file, verified on load.

use std::collections::BTreeMap;

use bytes::Bytes;
use object_store::{GetOptions, ObjectStore, PutOptions, PutPayload};
use sha2::{Digest, Sha256};
use trainyard_jobs::Checkpoint;

use crate::objects::Objects;
use crate::protocol::float_map;

/// Name of the manifest file in a checkpoint folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the tensor file in a checkpoint folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// Version of the manifest format written by this build.
pub const FORMAT_VERSION: u32 = 1;

/// Errors of saving or loading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The object store failed.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// The job id cannot be used as a path segment.
    #[error("invalid job id {0:?}")]
    InvalidJobId(String),
    /// The tensors could not be serialised or deserialised.
    #[error("tensors: {0}")]
    Tensors(String),
    /// The manifest is not valid JSON of the expected shape.
    #[error("corrupt manifest {path}: {reason}")]
    CorruptManifest {
        /// Object-store path of the manifest.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The manifest has a format version this build does not read.
    #[error(
        "manifest {path}: unsupported format_version {version} (this build reads {FORMAT_VERSION})"
    )]
    UnsupportedVersion {
        /// Object-store path of the manifest.
        path: String,
        /// The version found.
        version: u32,
    },
    /// A file listed in the manifest is missing.
    #[error("checkpoint file {path} is missing")]
    MissingFile {
        /// Object-store path of the file.
        path: String,
    },
    /// A file's size differs from the manifest.
    #[error("checkpoint file {path}: size {actual} bytes, manifest says {expected}")]
    SizeMismatch {
        /// Object-store path of the file.
        path: String,
        /// Size in the manifest.
        expected: u64,
        /// Size found.
        actual: u64,
    },
    /// A file's SHA-256 digest differs from the manifest.
    #[error("checkpoint file {path}: sha256 {actual}, manifest says {expected}")]
    DigestMismatch {
        /// Object-store path of the file.
        path: String,
        /// Digest in the manifest.
        expected: String,
        /// Digest of the bytes found.
        actual: String,
    },
}

/// One file of a checkpoint, as listed in the manifest.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ManifestFile {
    /// File name inside the checkpoint folder.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: String,
}

/// The `manifest.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Manifest format version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Job the checkpoint belongs to.
    pub job_id: String,
    /// Attempt of the job that wrote it.
    pub attempt: u32,
    /// Training step.
    pub step: u64,
    /// When the checkpoint was committed.
    pub created_unix_ms: i64,
    /// Metrics at the checkpoint (non-finite values are written as strings "NaN", "inf").
    #[serde(with = "float_map")]
    pub metrics: BTreeMap<String, f64>,
    /// The job's own state.
    pub state: serde_json::Value,
    /// The checkpoint's files with sizes and digests.
    pub files: Vec<ManifestFile>,
}

/// The object-store path (relative to the store's prefix) of a checkpoint folder:
/// `jobs/<job-id>/checkpoints/<step>`.
pub fn checkpoint_dir(job_id: &str, step: u64) -> String {
    format!("jobs/{job_id}/checkpoints/{step}")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn put(
    store: &dyn ObjectStore,
    path: &object_store::path::Path,
    bytes: Bytes,
) -> Result<(), CheckpointError> {
    store
        .put_opts(path, PutPayload::from_bytes(bytes), PutOptions::default())
        .await?;
    Ok(())
}

/// Reads an object; `Ok(None)` if it does not exist.
async fn get(
    store: &dyn ObjectStore,
    path: &object_store::path::Path,
) -> Result<Option<Bytes>, CheckpointError> {
    match store.get_opts(path, GetOptions::default()).await {
        Ok(r) => Ok(Some(r.bytes().await?)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Saves `checkpoint` of `job_id`/`attempt`: the tensors first, the manifest last.
/// Returns the folder path (relative to the store prefix, as reported in
/// `CheckpointInfo.path`) and the manifest written.
pub async fn save_checkpoint(
    objects: &Objects,
    job_id: &str,
    attempt: u32,
    checkpoint: &Checkpoint,
) -> Result<(String, Manifest), CheckpointError> {
    if job_id.is_empty() || job_id == "." || job_id == ".." || job_id.contains('/') {
        return Err(CheckpointError::InvalidJobId(job_id.to_string()));
    }
    let dir = checkpoint_dir(job_id, checkpoint.step);
    let model = safetensors::tensor::serialize(
        checkpoint.tensors.iter().map(|(k, v)| (k.as_str(), v)),
        None,
    )
    .map_err(|e| CheckpointError::Tensors(e.to_string()))?;
    let model = Bytes::from(model);
    let files = vec![ManifestFile {
        name: MODEL_FILE.to_string(),
        size: model.len() as u64,
        sha256: sha256_hex(&model),
    }];
    put(
        objects.store.as_ref(),
        &objects.path(&format!("{dir}/{MODEL_FILE}")),
        model,
    )
    .await?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        job_id: job_id.to_string(),
        attempt,
        step: checkpoint.step,
        created_unix_ms: now_unix_ms(),
        metrics: checkpoint.metrics.clone(),
        state: checkpoint.state.clone(),
        files,
    };
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::CorruptManifest {
            path: format!("{dir}/{MANIFEST_FILE}"),
            reason: e.to_string(),
        })?;
    put(
        objects.store.as_ref(),
        &objects.path(&format!("{dir}/{MANIFEST_FILE}")),
        Bytes::from(json),
    )
    .await?;
    tracing::debug!(%dir, step = checkpoint.step, "checkpoint committed");
    Ok((dir, manifest))
}

/// Reads and parses the manifest of the checkpoint folder `dir`; `Ok(None)` if there is
/// none (the checkpoint does not exist).
pub async fn read_manifest(
    objects: &Objects,
    dir: &str,
) -> Result<Option<Manifest>, CheckpointError> {
    let path = format!("{}/{MANIFEST_FILE}", dir.trim_end_matches('/'));
    let Some(bytes) = get(objects.store.as_ref(), &objects.path(&path)).await? else {
        return Ok(None);
    };
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::CorruptManifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(CheckpointError::UnsupportedVersion {
            path,
            version: manifest.format_version,
        });
    }
    Ok(Some(manifest))
}

/// Loads the checkpoint in folder `dir` (for example `jobs/<id>/checkpoints/7`), verifying
/// every file's size and digest, with tensors on `device`. `Ok(None)` if the folder has no
/// manifest.
pub async fn load_checkpoint(
    objects: &Objects,
    dir: &str,
    device: &candle_core::Device,
) -> Result<Option<(Manifest, Checkpoint)>, CheckpointError> {
    let dir = dir.trim_end_matches('/');
    let Some(manifest) = read_manifest(objects, dir).await? else {
        return Ok(None);
    };
    let mut tensors = BTreeMap::new();
    for file in &manifest.files {
        if file.name.contains('/') || file.name.starts_with('.') {
            return Err(CheckpointError::CorruptManifest {
                path: format!("{dir}/{MANIFEST_FILE}"),
                reason: format!("bad file name {:?}", file.name),
            });
        }
        let path = format!("{dir}/{}", file.name);
        let bytes = get(objects.store.as_ref(), &objects.path(&path))
            .await?
            .ok_or_else(|| CheckpointError::MissingFile { path: path.clone() })?;
        if bytes.len() as u64 != file.size {
            return Err(CheckpointError::SizeMismatch {
                path,
                expected: file.size,
                actual: bytes.len() as u64,
            });
        }
        let digest = sha256_hex(&bytes);
        if !digest.eq_ignore_ascii_case(&file.sha256) {
            return Err(CheckpointError::DigestMismatch {
                path,
                expected: file.sha256.clone(),
                actual: digest,
            });
        }
        if file.name == MODEL_FILE {
            let loaded = candle_core::safetensors::load_buffer(&bytes, device)
                .map_err(|e| CheckpointError::Tensors(format!("{path}: {e}")))?;
            tensors.extend(loaded);
        }
    }
    let checkpoint = Checkpoint {
        step: manifest.step,
        tensors,
        state: manifest.state.clone(),
        metrics: manifest.metrics.clone(),
    };
    Ok(Some((manifest, checkpoint)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::open_objects;
    use candle_core::{Device, Tensor};

    fn sample(step: u64) -> Checkpoint {
        let dev = Device::Cpu;
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "w".to_string(),
            Tensor::arange(0f32, 12f32, &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        );
        tensors.insert("b".to_string(), Tensor::new(&[1.5f64, -2.0], &dev).unwrap());
        let mut metrics = BTreeMap::new();
        metrics.insert("loss".to_string(), 0.25);
        metrics.insert("weird".to_string(), f64::NAN);
        Checkpoint {
            step,
            tensors,
            state: serde_json::json!({"epoch": 2, "seed": 7}),
            metrics,
        }
    }

    fn store() -> (tempfile::TempDir, Objects) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/objects", dir.path().display());
        let objects = open_objects(&url).unwrap();
        (dir, objects)
    }

    #[tokio::test]
    async fn round_trip() {
        let (tmp, objects) = store();
        let ck = sample(42);
        let (dir, manifest) = save_checkpoint(&objects, "job-1", 3, &ck).await.unwrap();
        assert_eq!(dir, "jobs/job-1/checkpoints/42");
        assert!(tmp
            .path()
            .join("objects/jobs/job-1/checkpoints/42/manifest.json")
            .is_file());
        assert_eq!(manifest.attempt, 3);
        assert_eq!(manifest.files.len(), 1);
        // the manifest on disk has the contract's fields
        let raw: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                tmp.path()
                    .join("objects/jobs/job-1/checkpoints/42/manifest.json"),
            )
            .unwrap(),
        )
        .unwrap();
        for key in [
            "format_version",
            "job_id",
            "attempt",
            "step",
            "created_unix_ms",
            "metrics",
            "state",
            "files",
        ] {
            assert!(raw.get(key).is_some(), "manifest lacks {key}: {raw}");
        }
        assert_eq!(raw["files"][0]["name"], "model.safetensors");
        assert_eq!(raw["files"][0]["sha256"].as_str().unwrap().len(), 64);

        let (m2, back) = load_checkpoint(&objects, &dir, &Device::Cpu)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m2.step, 42);
        assert_eq!(back.step, 42);
        assert_eq!(back.state, ck.state);
        assert_eq!(back.metrics["loss"], 0.25);
        assert!(back.metrics["weird"].is_nan());
        assert_eq!(back.tensors.len(), 2);
        assert_eq!(
            back.tensors["w"].to_vec2::<f32>().unwrap(),
            ck.tensors["w"].to_vec2::<f32>().unwrap()
        );
        assert_eq!(back.tensors["b"].to_vec1::<f64>().unwrap(), vec![1.5, -2.0]);
    }

    #[tokio::test]
    async fn no_manifest_means_no_checkpoint() {
        let (tmp, objects) = store();
        save_checkpoint(&objects, "job-2", 1, &sample(5))
            .await
            .unwrap();
        std::fs::remove_file(
            tmp.path()
                .join("objects/jobs/job-2/checkpoints/5/manifest.json"),
        )
        .unwrap();
        // the tensors are still there, but without the manifest there is no checkpoint
        assert!(tmp
            .path()
            .join("objects/jobs/job-2/checkpoints/5/model.safetensors")
            .is_file());
        let got = load_checkpoint(&objects, "jobs/job-2/checkpoints/5", &Device::Cpu)
            .await
            .unwrap();
        assert!(got.is_none());
        let got = load_checkpoint(&objects, "jobs/never/checkpoints/1", &Device::Cpu)
            .await
            .unwrap();
        assert!(got.is_none());
    }

    #[tokio::test]
    async fn corruption_is_detected() {
        let (tmp, objects) = store();
        save_checkpoint(&objects, "job-3", 1, &sample(9))
            .await
            .unwrap();
        let model = tmp
            .path()
            .join("objects/jobs/job-3/checkpoints/9/model.safetensors");
        let mut bytes = std::fs::read(&model).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff; // same size, different content
        std::fs::write(&model, &bytes).unwrap();
        let err = load_checkpoint(&objects, "jobs/job-3/checkpoints/9", &Device::Cpu)
            .await
            .unwrap_err();
        assert!(
            matches!(err, CheckpointError::DigestMismatch { .. }),
            "{err}"
        );

        bytes.truncate(last);
        std::fs::write(&model, &bytes).unwrap();
        let err = load_checkpoint(&objects, "jobs/job-3/checkpoints/9", &Device::Cpu)
            .await
            .unwrap_err();
        assert!(matches!(err, CheckpointError::SizeMismatch { .. }), "{err}");

        std::fs::remove_file(&model).unwrap();
        let err = load_checkpoint(&objects, "jobs/job-3/checkpoints/9", &Device::Cpu)
            .await
            .unwrap_err();
        assert!(matches!(err, CheckpointError::MissingFile { .. }), "{err}");

        let manifest = tmp
            .path()
            .join("objects/jobs/job-3/checkpoints/9/manifest.json");
        std::fs::write(&manifest, b"{not json").unwrap();
        let err = load_checkpoint(&objects, "jobs/job-3/checkpoints/9", &Device::Cpu)
            .await
            .unwrap_err();
        assert!(
            matches!(err, CheckpointError::CorruptManifest { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn rejects_bad_job_id() {
        let (_tmp, objects) = store();
        let err = save_checkpoint(&objects, "../x", 1, &sample(1))
            .await
            .unwrap_err();
        assert!(matches!(err, CheckpointError::InvalidJobId(_)), "{err}");
    }
}
