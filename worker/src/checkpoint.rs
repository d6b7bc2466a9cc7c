//! Checkpoint I/O in the object store.
//!
//! Layout: `jobs/<job-id>/checkpoints/<step>/model.safetensors` (every tensor of the
//! [`Checkpoint`]) and `jobs/<job-id>/checkpoints/<step>/manifest.json`, written LAST. A
//! checkpoint folder without a manifest does not exist. The manifest records the size and
//! SHA-256 digest of every file, verified on load.
//!
//! Saving is split in two so that training blocks only for the first part:
//! [`prepare_checkpoint`] copies the tensors to host memory as one safetensors buffer (one
//! copy of each tensor), and a [`CheckpointUpload`] writes it to the store: any stale
//! manifest of the same step removed first, the tensor file(s) as concurrent multipart
//! uploads with their digests computed alongside, then the manifest. A failed
//! [`CheckpointUpload::try_commit`] can be called again and resumes where it stopped
//! (the background uploader of [`crate::uploader`] does so with backoff).
//! [`save_checkpoint`] does both in one call.
//!
//! Restoring ([`restore_latest`]) picks the newest checkpoint at or below the requested
//! step whose manifest verifies, skipping (and reporting) corrupt or partial ones.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use candle_core::{CpuStorage, Device, Storage, Tensor};
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
    /// Reading or writing an object failed (the message names the store's URL and the path).
    #[error(transparent)]
    Objects(#[from] trainyard_objects::ObjectsError),
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
    /// The checkpoint folder has no manifest: it was never committed (a partial upload).
    #[error("checkpoint {dir} has no manifest (never committed: a partial upload)")]
    NotCommitted {
        /// Object-store path of the folder.
        dir: String,
    },
    /// A background task of the upload (the digest) failed.
    #[error("checkpoint upload task: {0}")]
    Task(String),
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

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads an object; `Ok(None)` if it does not exist.
async fn get(objects: &Objects, relative: &str) -> Result<Option<Bytes>, CheckpointError> {
    Ok(objects.get(relative).await?.map(|o| o.bytes))
}

/// One file of a [`PreparedCheckpoint`]: its name in the checkpoint folder and its bytes.
#[derive(Debug, Clone)]
pub struct PreparedFile {
    /// File name inside the checkpoint folder ([`MODEL_FILE`]).
    pub name: String,
    /// The file's content.
    pub bytes: Bytes,
}

/// A checkpoint copied to host memory and serialised, ready to upload: everything the
/// manifest needs but the digests and the commit time. Independent of the tensors it was
/// made from, so training may change them as soon as [`prepare_checkpoint`] returns.
#[derive(Debug, Clone)]
pub struct PreparedCheckpoint {
    /// Job the checkpoint belongs to.
    pub job_id: String,
    /// Attempt of the job that saves it.
    pub attempt: u32,
    /// Training step.
    pub step: u64,
    /// Metrics at the checkpoint.
    pub metrics: BTreeMap<String, f64>,
    /// The job's own state.
    pub state: serde_json::Value,
    /// The files to upload before the manifest.
    pub files: Vec<PreparedFile>,
}

impl PreparedCheckpoint {
    /// The checkpoint's folder (relative to the store's prefix).
    pub fn dir(&self) -> String {
        checkpoint_dir(&self.job_id, self.step)
    }

    /// Bytes of all its files.
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.bytes.len() as u64).sum()
    }
}

/// Copies `checkpoint` of `job_id`/`attempt` to host memory as a safetensors buffer: the
/// part of saving that training waits for.
pub fn prepare_checkpoint(
    job_id: &str,
    attempt: u32,
    checkpoint: &Checkpoint,
) -> Result<PreparedCheckpoint, CheckpointError> {
    prepare_checkpoint_with(job_id, attempt, checkpoint, None)
}

/// [`prepare_checkpoint`] into a buffer of `pool` when it has one (no fresh memory to
/// fault in on the training thread).
pub fn prepare_checkpoint_with(
    job_id: &str,
    attempt: u32,
    checkpoint: &Checkpoint,
    pool: Option<&BufferPool>,
) -> Result<PreparedCheckpoint, CheckpointError> {
    if job_id.is_empty() || job_id == "." || job_id == ".." || job_id.contains('/') {
        return Err(CheckpointError::InvalidJobId(job_id.to_string()));
    }
    let model = serialize_tensors_with(&checkpoint.tensors, pool)?;
    Ok(PreparedCheckpoint {
        job_id: job_id.to_string(),
        attempt,
        step: checkpoint.step,
        metrics: checkpoint.metrics.clone(),
        state: checkpoint.state.clone(),
        files: vec![PreparedFile {
            name: MODEL_FILE.to_string(),
            bytes: Bytes::from(model),
        }],
    })
}

/// Host buffers for checkpoints: handed back by the uploader once committed, or filled in
/// ahead by it ([`BufferPool::prefill`]), and reused by the next
/// [`prepare_checkpoint_with`], whose copy then writes to memory already mapped (a fresh
/// buffer costs the training thread about as much in page faults as the copy itself).
/// Keeps at most one buffer: the rank's host memory holds one more checkpoint between
/// saves.
#[derive(Debug, Clone, Default)]
pub struct BufferPool(Arc<Mutex<Option<Vec<u8>>>>);

impl BufferPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// A cleared buffer of at least `capacity` bytes: the pooled one when it is large
    /// enough and not more than twice that, else a new one.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let pooled = self.0.lock().ok().and_then(|mut slot| slot.take());
        match pooled {
            Some(mut buf)
                if buf.capacity() >= capacity && buf.capacity() <= capacity.saturating_mul(2) =>
            {
                buf.clear();
                buf
            }
            _ => Vec::with_capacity(capacity),
        }
    }

    /// Keeps the memory of `bytes` for a later [`BufferPool::take`] when nothing else
    /// holds it and the pool has no buffer at least as large (otherwise it is dropped).
    pub fn give_back(&self, bytes: Bytes) {
        if let Ok(unique) = bytes.try_into_mut() {
            if let Ok(mut slot) = self.0.lock() {
                if slot
                    .as_ref()
                    .is_none_or(|b| b.capacity() < unique.capacity())
                {
                    *slot = Some(unique.into());
                }
            }
        }
    }

    /// When the pool is empty, allocates a buffer of `capacity` bytes and touches every
    /// page of it (on the calling thread: the uploader's, not training's), so that the
    /// next checkpoint of that size is copied into mapped memory even while the previous
    /// one is still uploading.
    pub fn prefill(&self, capacity: usize) {
        if self.pooled_capacity() >= capacity {
            return;
        }
        // One write per page maps it (allocated pages are only mapped on first write);
        // volatile, so that the compiler keeps writes that nothing reads.
        let mut buf: Vec<u8> = Vec::with_capacity(capacity);
        for page in buf.spare_capacity_mut().chunks_mut(4096) {
            // SAFETY: `page` is a non-empty slice of the buffer's spare capacity, so its
            // pointer is valid for a one-byte write.
            unsafe { std::ptr::write_volatile(page.as_mut_ptr(), std::mem::MaybeUninit::new(0)) };
        }
        if let Ok(mut slot) = self.0.lock() {
            if slot.as_ref().is_none_or(|b| b.capacity() < capacity) {
                *slot = Some(buf);
            }
        }
    }

    /// Capacity of the pooled buffer (0 when empty).
    pub fn pooled_capacity(&self) -> usize {
        self.0
            .lock()
            .ok()
            .and_then(|slot| slot.as_ref().map(Vec::capacity))
            .unwrap_or(0)
    }
}

/// A tensor's bytes as `safetensors` serialises them, borrowed from host memory.
struct HostView<'a> {
    dtype: safetensors::Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl safetensors::View for HostView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The bytes of a slice of plain numbers.
fn bytes_of<T: Copy>(values: &[T]) -> &[u8] {
    // SAFETY: `T` is one of candle's element types (integers, IEEE floats, bf16/f16/f8
    // newtypes over integers): plain data without padding or invalid bit patterns, so its
    // memory may be read as bytes; the length covers exactly the slice.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

/// Elements `start..end` of a CPU storage as bytes.
fn cpu_bytes(storage: &CpuStorage, start: usize, end: usize) -> Option<&[u8]> {
    Some(match storage {
        CpuStorage::U8(v) => bytes_of(v.get(start..end)?),
        CpuStorage::U32(v) => bytes_of(v.get(start..end)?),
        CpuStorage::I16(v) => bytes_of(v.get(start..end)?),
        CpuStorage::I32(v) => bytes_of(v.get(start..end)?),
        CpuStorage::I64(v) => bytes_of(v.get(start..end)?),
        CpuStorage::BF16(v) => bytes_of(v.get(start..end)?),
        CpuStorage::F16(v) => bytes_of(v.get(start..end)?),
        CpuStorage::F32(v) => bytes_of(v.get(start..end)?),
        CpuStorage::F64(v) => bytes_of(v.get(start..end)?),
        CpuStorage::F8E4M3(v) => bytes_of(v.get(start..end)?),
        // Packed sub-byte formats: element offsets are not byte offsets.
        CpuStorage::F6E2M3(_)
        | CpuStorage::F6E3M2(_)
        | CpuStorage::F4(_)
        | CpuStorage::F8E8M0(_) => return None,
    })
}

/// Serialises `tensors` as one safetensors buffer with a single copy of each CPU tensor
/// (GPU tensors are first copied to the host, non-contiguous ones made contiguous).
pub fn serialize_tensors(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>, CheckpointError> {
    serialize_tensors_with(tensors, None)
}

/// [`serialize_tensors`] into a buffer from `pool`. The bytes are exactly what
/// `safetensors::tensor::serialize` writes: the header is computed by it, the tensors are
/// copied in its order (descending dtype, then name) straight from their storage.
pub fn serialize_tensors_with(
    tensors: &BTreeMap<String, Tensor>,
    pool: Option<&BufferPool>,
) -> Result<Vec<u8>, CheckpointError> {
    let tensor_err =
        |name: &str, e: candle_core::Error| CheckpointError::Tensors(format!("{name}: {e}"));
    let mut host: Vec<(&str, Tensor)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = if t.device().is_cpu() {
            t.clone()
        } else {
            t.to_device(&Device::Cpu).map_err(|e| tensor_err(name, e))?
        };
        let t = if t.is_contiguous() {
            t
        } else {
            t.contiguous().map_err(|e| tensor_err(name, e))?
        };
        host.push((name.as_str(), t));
    }
    let guards: Vec<_> = host
        .iter()
        .map(|(name, t)| {
            let (storage, layout) = t.storage_and_layout();
            (*name, t, storage, layout)
        })
        .collect();
    let mut views = Vec::with_capacity(guards.len());
    for (name, t, storage, layout) in &guards {
        let data = match &**storage {
            Storage::Cpu(cpu) => layout
                .contiguous_offsets()
                .and_then(|(start, end)| cpu_bytes(cpu, start, end)),
            _ => None,
        }
        .ok_or_else(|| {
            CheckpointError::Tensors(format!(
                "{name}: dtype {:?} cannot be written to a checkpoint",
                t.dtype()
            ))
        })?;
        views.push((
            *name,
            HostView {
                dtype: t.dtype().into(),
                shape: t.dims(),
                data,
            },
        ));
    }
    // safetensors' own order: descending dtype, then name.
    views.sort_by(|(ln, l), (rn, r)| r.dtype.cmp(&l.dtype).then(ln.cmp(rn)));
    // The header alone, from safetensors itself: the same views without their data.
    let header = safetensors::tensor::serialize(
        views.iter().map(|(name, v)| {
            (
                *name,
                HeaderOnly {
                    dtype: v.dtype,
                    shape: v.shape,
                    len: v.data.len(),
                },
            )
        }),
        None,
    )
    .map_err(|e| CheckpointError::Tensors(e.to_string()))?;
    let total = header.len() + views.iter().map(|(_, v)| v.data.len()).sum::<usize>();
    let mut out = match pool {
        Some(pool) => pool.take(total),
        None => Vec::with_capacity(total),
    };
    out.extend_from_slice(&header);
    for (_, v) in &views {
        out.extend_from_slice(v.data);
    }
    Ok(out)
}

/// A tensor's dtype, shape and size without its data: `safetensors` writes the header.
struct HeaderOnly<'a> {
    dtype: safetensors::Dtype,
    shape: &'a [usize],
    len: usize,
}

impl safetensors::View for HeaderOnly<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&[])
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

/// The upload of one [`PreparedCheckpoint`], resumable after a failure: each call of
/// [`CheckpointUpload::try_commit`] does what is left (removing a stale manifest of the
/// same step, then each file not yet written, then the manifest, LAST).
#[derive(Debug)]
pub struct CheckpointUpload {
    prepared: PreparedCheckpoint,
    stale_manifest_removed: bool,
    uploaded: Vec<bool>,
    digests: Vec<Option<String>>,
    digest_tasks: Vec<Option<tokio::task::JoinHandle<String>>>,
    delay_before_manifest: Duration,
}

impl CheckpointUpload {
    /// An upload of `prepared` that has not started.
    pub fn new(prepared: PreparedCheckpoint) -> Self {
        let n = prepared.files.len();
        CheckpointUpload {
            prepared,
            stale_manifest_removed: false,
            uploaded: vec![false; n],
            digests: vec![None; n],
            digest_tasks: (0..n).map(|_| None).collect(),
            delay_before_manifest: Duration::ZERO,
        }
    }

    /// TEST ONLY: waits `delay` after the files and before the manifest, so tests can
    /// observe (or kill a process during) the window of a partial checkpoint.
    pub fn with_delay_before_manifest(mut self, delay: Duration) -> Self {
        self.delay_before_manifest = delay;
        self
    }

    /// The checkpoint being uploaded.
    pub fn prepared(&self) -> &PreparedCheckpoint {
        &self.prepared
    }

    /// Takes the files' bytes out of a committed upload (to hand them to a
    /// [`BufferPool`]); the upload must not be tried again afterwards.
    pub fn take_buffers(&mut self) -> Vec<Bytes> {
        self.prepared
            .files
            .iter_mut()
            .map(|f| std::mem::take(&mut f.bytes))
            .collect()
    }

    /// Does what is left of the upload; `Ok` once the manifest is written (the checkpoint
    /// is committed), with the folder and the manifest. After an error (or when the
    /// future is dropped), calling it again resumes.
    pub async fn try_commit(
        &mut self,
        objects: &Objects,
    ) -> Result<(String, Manifest), CheckpointError> {
        let dir = self.prepared.dir();
        // Digests are computed on the blocking pool, alongside the uploads.
        for (i, file) in self.prepared.files.iter().enumerate() {
            if self.digests[i].is_none() && self.digest_tasks[i].is_none() {
                let bytes = file.bytes.clone();
                self.digest_tasks[i] =
                    Some(tokio::task::spawn_blocking(move || sha256_hex(&bytes)));
            }
        }
        if !self.stale_manifest_removed {
            // A manifest left at this step by an earlier attempt would describe other bytes
            // while the files are being replaced: the folder must not look committed.
            objects.delete(&format!("{dir}/{MANIFEST_FILE}")).await?;
            self.stale_manifest_removed = true;
        }
        let pending: Vec<usize> = (0..self.prepared.files.len())
            .filter(|i| !self.uploaded[*i])
            .collect();
        let puts = pending.iter().map(|&i| {
            let file = &self.prepared.files[i];
            let path = format!("{dir}/{}", file.name);
            async move { objects.put(&path, file.bytes.clone()).await.map(|_| i) }
        });
        let results = futures::future::join_all(puts).await;
        let mut first_error = None;
        for result in results {
            match result {
                Ok(i) => self.uploaded[i] = true,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e.into());
        }
        let mut files = Vec::with_capacity(self.prepared.files.len());
        for (i, file) in self.prepared.files.iter().enumerate() {
            if self.digests[i].is_none() {
                if let Some(task) = self.digest_tasks[i].as_mut() {
                    let digest = task
                        .await
                        .map_err(|e| CheckpointError::Task(e.to_string()))?;
                    self.digests[i] = Some(digest);
                    self.digest_tasks[i] = None;
                }
            }
            let sha256 = match &self.digests[i] {
                Some(d) => d.clone(),
                None => sha256_hex(&file.bytes),
            };
            files.push(ManifestFile {
                name: file.name.clone(),
                size: file.bytes.len() as u64,
                sha256,
            });
        }
        if !self.delay_before_manifest.is_zero() {
            tokio::time::sleep(self.delay_before_manifest).await;
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            job_id: self.prepared.job_id.clone(),
            attempt: self.prepared.attempt,
            step: self.prepared.step,
            created_unix_ms: now_unix_ms(),
            metrics: self.prepared.metrics.clone(),
            state: self.prepared.state.clone(),
            files,
        };
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::CorruptManifest {
                path: format!("{dir}/{MANIFEST_FILE}"),
                reason: e.to_string(),
            })?;
        objects
            .put(&format!("{dir}/{MANIFEST_FILE}"), Bytes::from(json))
            .await?;
        tracing::debug!(%dir, step = manifest.step, "checkpoint committed");
        Ok((dir, manifest))
    }
}

/// Saves `checkpoint` of `job_id`/`attempt` and returns once it is committed: the tensors
/// first, the manifest last. Returns the folder path (relative to the store prefix, as
/// reported in `CheckpointInfo.path`) and the manifest written. (A rank saves through the
/// background [`crate::uploader::CheckpointUploader`] instead.)
pub async fn save_checkpoint(
    objects: &Objects,
    job_id: &str,
    attempt: u32,
    checkpoint: &Checkpoint,
) -> Result<(String, Manifest), CheckpointError> {
    let prepared = prepare_checkpoint(job_id, attempt, checkpoint)?;
    CheckpointUpload::new(prepared).try_commit(objects).await
}

/// Reads and parses the manifest of the checkpoint folder `dir`; `Ok(None)` if there is
/// none (the checkpoint does not exist).
pub async fn read_manifest(
    objects: &Objects,
    dir: &str,
) -> Result<Option<Manifest>, CheckpointError> {
    let path = format!("{}/{MANIFEST_FILE}", dir.trim_end_matches('/'));
    let Some(bytes) = get(objects, &path).await? else {
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
        let bytes = get(objects, &path)
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

/// Whether `err` says the checkpoint itself is unusable (corrupt, partial, unreadable
/// format), as opposed to the store failing to answer.
pub fn is_unusable(err: &CheckpointError) -> bool {
    !matches!(
        err,
        CheckpointError::Store(_) | CheckpointError::Objects(_) | CheckpointError::Task(_)
    )
}

/// A checkpoint [`restore_latest`] passed over, and why.
#[derive(Debug)]
pub struct SkippedCheckpoint {
    /// Its folder.
    pub dir: String,
    /// Its step.
    pub step: u64,
    /// What is wrong with it.
    pub reason: CheckpointError,
}

/// What [`restore_latest`] found.
#[derive(Debug)]
pub struct Restored {
    /// The newest checkpoint that verified: its folder, manifest and content.
    pub found: Option<(String, Manifest, Checkpoint)>,
    /// Newer checkpoints passed over because they were corrupt or partial, newest first.
    pub skipped: Vec<SkippedCheckpoint>,
}

/// The committed checkpoints (folders with a manifest) directly under `parent` (for
/// example `jobs/<id>/checkpoints`) at or below `max_step`, newest first, as
/// `(step, folder)`.
pub async fn committed_checkpoints(
    objects: &Objects,
    parent: &str,
    max_step: u64,
) -> Result<Vec<(u64, String)>, CheckpointError> {
    let parent = parent.trim_end_matches('/');
    let mut out: Vec<(u64, String)> = objects
        .list(parent)
        .await?
        .into_iter()
        .filter_map(|o| {
            let rest = o.path.strip_prefix(parent)?.strip_prefix('/')?;
            let (step, file) = rest.split_once('/')?;
            let step: u64 = step.parse().ok()?;
            (file == MANIFEST_FILE && step <= max_step).then(|| (step, format!("{parent}/{step}")))
        })
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.0));
    out.dedup();
    Ok(out)
}

/// Restores the newest usable checkpoint at or below `requested_step` among the
/// requested folder `requested_dir` (the job's latest recorded checkpoint,
/// `<parent>/<step>`) and the committed checkpoints beside it in `<parent>`. Each
/// candidate is verified (sizes and digests); corrupt or partial ones are skipped and
/// listed in [`Restored::skipped`]. An error of the store itself (unreachable, denied)
/// is returned rather than skipped.
pub async fn restore_latest(
    objects: &Objects,
    requested_dir: &str,
    requested_step: u64,
    device: &Device,
) -> Result<Restored, CheckpointError> {
    let requested_dir = requested_dir.trim_end_matches('/');
    let mut candidates = vec![(requested_step, requested_dir.to_string())];
    if let Some((parent, _)) = requested_dir.rsplit_once('/') {
        match committed_checkpoints(objects, parent, requested_step).await {
            Ok(listed) => candidates.extend(listed),
            Err(e) => tracing::warn!(
                folder = parent,
                error = %e,
                "cannot list older checkpoints; only the requested one can be restored"
            ),
        }
    }
    // Newest first; the requested folder first among equal steps; each folder once.
    candidates.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| (a.1 != requested_dir).cmp(&(b.1 != requested_dir)))
    });
    let mut seen = std::collections::BTreeSet::new();
    candidates.retain(|(_, dir)| seen.insert(dir.clone()));

    let mut skipped = Vec::new();
    for (step, dir) in candidates {
        let result = match load_checkpoint(objects, &dir, device).await {
            Ok(Some((manifest, checkpoint))) => Ok((manifest, checkpoint)),
            Ok(None) => Err(CheckpointError::NotCommitted { dir: dir.clone() }),
            Err(e) => Err(e),
        };
        match result {
            Ok((manifest, checkpoint)) => {
                return Ok(Restored {
                    found: Some((dir, manifest, checkpoint)),
                    skipped,
                })
            }
            Err(e) if is_unusable(&e) => skipped.push(SkippedCheckpoint {
                dir,
                step,
                reason: e,
            }),
            Err(e) => return Err(e),
        }
    }
    Ok(Restored {
        found: None,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    //! Every test runs against a local folder (`file::`) and against a real S3 server
    //! (`s3::`, Garage from `scripts/s3.sh up`; skipped with a notice when it is not
    //! running, unless `CI` or `TRAINYARD_REQUIRE_S3=1` is set).

    use super::*;
    use crate::objects::testing::{s3_test_env, unique_prefix};
    use crate::objects::{open_objects, ObjectsError};
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

    fn file_store() -> (tempfile::TempDir, Objects) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/objects", dir.path().display());
        let objects = open_objects(&url).unwrap();
        (dir, objects)
    }

    /// A store under a fresh prefix of the test S3 server, or `None` when S3 tests skip.
    fn s3_store(test: &str) -> Option<Objects> {
        let env = s3_test_env()?;
        Some(open_objects(&env.url(&unique_prefix(test))).expect("opening the test S3 store"))
    }

    /// Defines `file::NAME` and `s3::NAME` tests that run the async fn `NAME(&Objects)`.
    macro_rules! on_every_store {
        ($($name:ident),* $(,)?) => {
            mod file {
                $(
                    #[tokio::test]
                    async fn $name() {
                        let (_tmp, objects) = super::file_store();
                        super::$name(&objects).await;
                    }
                )*
            }
            mod s3 {
                $(
                    #[tokio::test]
                    async fn $name() {
                        let Some(objects) = super::s3_store(stringify!($name)) else {
                            return;
                        };
                        super::$name(&objects).await;
                        objects.delete_prefix("jobs").await.expect("cleaning up");
                    }
                )*
            }
        };
    }

    on_every_store!(
        round_trip,
        large_round_trip,
        no_manifest_means_no_checkpoint,
        corruption_is_detected,
        rejects_bad_job_id,
        restore_skips_corrupt_and_partial_checkpoints,
    );

    async fn round_trip(objects: &Objects) {
        let ck = sample(42);
        let (dir, manifest) = save_checkpoint(objects, "job-1", 3, &ck).await.unwrap();
        assert_eq!(dir, "jobs/job-1/checkpoints/42");
        assert_eq!(manifest.attempt, 3);
        assert_eq!(manifest.files.len(), 1);
        // The layout: the tensors and the manifest in the checkpoint's folder.
        let listed: Vec<String> = objects
            .list("jobs/job-1/checkpoints/42")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.path)
            .collect();
        assert_eq!(
            listed,
            [
                "jobs/job-1/checkpoints/42/manifest.json",
                "jobs/job-1/checkpoints/42/model.safetensors"
            ]
        );
        // The manifest in the store has the contract's fields.
        let raw = objects
            .get("jobs/job-1/checkpoints/42/manifest.json")
            .await
            .unwrap()
            .expect("manifest written");
        let raw: serde_json::Value = serde_json::from_slice(&raw.bytes).unwrap();
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

        let (m2, back) = load_checkpoint(objects, &dir, &Device::Cpu)
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

    /// A 24 MiB model: a multipart upload on S3, verified by its digest on load.
    async fn large_round_trip(objects: &Objects) {
        let n = 6 << 20; // f32s
        let mut ck = sample(7);
        let big = Tensor::arange(0u32, n as u32, &Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        ck.tensors.insert("big".to_string(), big);
        let (dir, manifest) = save_checkpoint(objects, "job-big", 1, &ck).await.unwrap();
        assert!(manifest.files[0].size > 24 << 20, "{:?}", manifest.files);
        let (_, back) = load_checkpoint(objects, &dir, &Device::Cpu)
            .await
            .unwrap()
            .unwrap();
        let got = back.tensors["big"].to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), n);
        assert_eq!(got[n - 1], (n - 1) as f32);
    }

    async fn no_manifest_means_no_checkpoint(objects: &Objects) {
        save_checkpoint(objects, "job-2", 1, &sample(5))
            .await
            .unwrap();
        objects
            .delete("jobs/job-2/checkpoints/5/manifest.json")
            .await
            .unwrap();
        // the tensors are still there, but without the manifest there is no checkpoint
        assert!(objects
            .head("jobs/job-2/checkpoints/5/model.safetensors")
            .await
            .unwrap()
            .is_some());
        let got = load_checkpoint(objects, "jobs/job-2/checkpoints/5", &Device::Cpu)
            .await
            .unwrap();
        assert!(got.is_none());
        let got = load_checkpoint(objects, "jobs/never/checkpoints/1", &Device::Cpu)
            .await
            .unwrap();
        assert!(got.is_none());
    }

    async fn corruption_is_detected(objects: &Objects) {
        save_checkpoint(objects, "job-3", 1, &sample(9))
            .await
            .unwrap();
        let model = "jobs/job-3/checkpoints/9/model.safetensors";
        let mut bytes = objects.get(model).await.unwrap().unwrap().bytes.to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff; // same size, different content
        objects
            .put(model, Bytes::from(bytes.clone()))
            .await
            .unwrap();
        let err = load_checkpoint(objects, "jobs/job-3/checkpoints/9", &Device::Cpu)
            .await
            .unwrap_err();
        assert!(
            matches!(err, CheckpointError::DigestMismatch { .. }),
            "{err}"
        );

        bytes.truncate(last);
        objects.put(model, Bytes::from(bytes)).await.unwrap();
        let err = load_checkpoint(objects, "jobs/job-3/checkpoints/9", &Device::Cpu)
            .await
            .unwrap_err();
        assert!(matches!(err, CheckpointError::SizeMismatch { .. }), "{err}");

        objects.delete(model).await.unwrap();
        let err = load_checkpoint(objects, "jobs/job-3/checkpoints/9", &Device::Cpu)
            .await
            .unwrap_err();
        assert!(matches!(err, CheckpointError::MissingFile { .. }), "{err}");

        objects
            .put(
                "jobs/job-3/checkpoints/9/manifest.json",
                Bytes::from_static(b"{not json"),
            )
            .await
            .unwrap();
        let err = load_checkpoint(objects, "jobs/job-3/checkpoints/9", &Device::Cpu)
            .await
            .unwrap_err();
        assert!(
            matches!(err, CheckpointError::CorruptManifest { .. }),
            "{err}"
        );
    }

    /// Checkpoints 5, 10, 15 committed, 15's tensors corrupted, 20 partial (tensors, no
    /// manifest): restoring "20" gives 10 and reports 20 and 15.
    async fn restore_skips_corrupt_and_partial_checkpoints(objects: &Objects) {
        for step in [5, 10, 15, 20] {
            save_checkpoint(objects, "job-r", 1, &sample(step))
                .await
                .unwrap();
        }
        objects
            .delete("jobs/job-r/checkpoints/20/manifest.json")
            .await
            .unwrap();
        let model = "jobs/job-r/checkpoints/15/model.safetensors";
        let mut bytes = objects.get(model).await.unwrap().unwrap().bytes.to_vec();
        bytes[0] ^= 0x01;
        objects.put(model, Bytes::from(bytes)).await.unwrap();

        let listed = committed_checkpoints(objects, "jobs/job-r/checkpoints", 100)
            .await
            .unwrap();
        assert_eq!(
            listed.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [15, 10, 5],
            "only folders with a manifest are committed"
        );
        assert_eq!(listed[1].1, "jobs/job-r/checkpoints/10");

        let r = restore_latest(objects, "jobs/job-r/checkpoints/20", 20, &Device::Cpu)
            .await
            .unwrap();
        let (dir, manifest, ck) = r.found.expect("an older checkpoint verifies");
        assert_eq!(
            (dir.as_str(), manifest.step, ck.step),
            ("jobs/job-r/checkpoints/10", 10, 10)
        );
        let skipped: Vec<(u64, String)> = r
            .skipped
            .iter()
            .map(|s| (s.step, s.reason.to_string()))
            .collect();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert_eq!(skipped[0].0, 20);
        assert!(skipped[0].1.contains("no manifest"), "{skipped:?}");
        assert_eq!(skipped[1].0, 15);
        assert!(
            matches!(r.skipped[1].reason, CheckpointError::DigestMismatch { .. }),
            "{skipped:?}"
        );

        // Newer checkpoints than the requested one are never candidates.
        let r = restore_latest(objects, "jobs/job-r/checkpoints/5", 5, &Device::Cpu)
            .await
            .unwrap();
        assert_eq!(r.found.map(|f| f.2.step), Some(5));
        assert!(r.skipped.is_empty());

        // Nothing usable: no checkpoint, every reason reported.
        let r = restore_latest(objects, "jobs/nobody/checkpoints/3", 3, &Device::Cpu)
            .await
            .unwrap();
        assert!(r.found.is_none());
        assert_eq!(r.skipped.len(), 1);
    }

    async fn rejects_bad_job_id(objects: &Objects) {
        let err = save_checkpoint(objects, "../x", 1, &sample(1))
            .await
            .unwrap_err();
        assert!(matches!(err, CheckpointError::InvalidJobId(_)), "{err}");
    }

    /// One copy per tensor, whatever its layout, dtype or device: a transposed view, a
    /// narrowed one (non-zero offset) and several dtypes round-trip exactly.
    #[test]
    fn serialize_tensors_handles_views_and_dtypes() {
        let dev = Device::Cpu;
        let base = Tensor::arange(0f32, 24f32, &dev)
            .unwrap()
            .reshape((4, 6))
            .unwrap();
        let mut tensors = BTreeMap::new();
        tensors.insert("t".to_string(), base.t().unwrap());
        tensors.insert("n".to_string(), base.narrow(0, 1, 2).unwrap());
        tensors.insert("u8".to_string(), Tensor::new(&[1u8, 2, 255], &dev).unwrap());
        tensors.insert(
            "i64".to_string(),
            Tensor::new(&[-7i64, 1 << 40], &dev).unwrap(),
        );
        tensors.insert(
            "bf16".to_string(),
            base.to_dtype(candle_core::DType::BF16).unwrap(),
        );
        tensors.insert(
            "f16".to_string(),
            base.to_dtype(candle_core::DType::F16).unwrap(),
        );
        let bytes = serialize_tensors(&tensors).unwrap();
        let back = candle_core::safetensors::load_buffer(&bytes, &dev).unwrap();
        assert_eq!(back.len(), tensors.len());
        for (name, t) in &tensors {
            let got = &back[name];
            assert_eq!(got.dims(), t.dims(), "{name}");
            assert_eq!(got.dtype(), t.dtype(), "{name}");
            let (a, b) = (
                t.to_dtype(candle_core::DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
                got.to_dtype(candle_core::DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
            );
            assert_eq!(a, b, "{name}");
        }
        // The same bytes as candle's own serialisation.
        let reference =
            safetensors::tensor::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None)
                .unwrap();
        assert_eq!(bytes, reference);
    }

    /// A committed checkpoint's buffer is reused by the next one (same allocation), and
    /// the bytes are the same as with a fresh buffer.
    #[test]
    fn buffer_pool_reuses_the_memory_of_a_committed_checkpoint() {
        let pool = BufferPool::new();
        let ck = sample(1);
        let first = prepare_checkpoint_with("job-p", 1, &ck, Some(&pool)).unwrap();
        let bytes = first.files[0].bytes.clone();
        let ptr = bytes.as_ptr();
        let len = bytes.len();
        // Still shared: not taken back.
        pool.give_back(bytes.clone());
        assert_eq!(pool.pooled_capacity(), 0);
        drop(first);
        pool.give_back(bytes);
        assert!(pool.pooled_capacity() >= len);
        let second = prepare_checkpoint_with("job-p", 1, &ck, Some(&pool)).unwrap();
        assert_eq!(
            second.files[0].bytes.as_ptr(),
            ptr,
            "the pooled buffer is reused"
        );
        assert_eq!(pool.pooled_capacity(), 0);
        let fresh = prepare_checkpoint("job-p", 1, &ck).unwrap();
        assert_eq!(second.files[0].bytes, fresh.files[0].bytes);
        // A much smaller checkpoint does not pin a large buffer.
        pool.give_back(Bytes::from(vec![0u8; 1 << 20]));
        assert_eq!(pool.take(100).capacity(), 100);
        // Filled in ahead.
        pool.prefill(4096);
        assert_eq!(pool.pooled_capacity(), 4096);
        pool.prefill(100);
        assert_eq!(
            pool.pooled_capacity(),
            4096,
            "a large enough buffer is kept"
        );
        let buf = pool.take(4000);
        assert!(buf.is_empty() && buf.capacity() == 4096);
    }

    /// The serialised checkpoint does not change when the model's tensors do afterwards.
    #[test]
    fn prepared_checkpoint_is_a_copy() {
        let var = candle_core::Var::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let mut ck = sample(1);
        ck.tensors.insert("v".to_string(), var.as_tensor().clone());
        let prepared = prepare_checkpoint("job-c", 1, &ck).unwrap();
        var.set(&Tensor::new(&[9f32, 9., 9.], &Device::Cpu).unwrap())
            .unwrap();
        let back =
            candle_core::safetensors::load_buffer(&prepared.files[0].bytes, &Device::Cpu).unwrap();
        assert_eq!(back["v"].to_vec1::<f32>().unwrap(), vec![1., 2., 3.]);
        assert_eq!(prepared.dir(), "jobs/job-c/checkpoints/1");
        assert_eq!(prepared.size(), prepared.files[0].bytes.len() as u64);
    }

    #[tokio::test]
    async fn file_layout_on_disk() {
        let (tmp, objects) = file_store();
        save_checkpoint(&objects, "job-1", 3, &sample(42))
            .await
            .unwrap();
        let dir = tmp.path().join("objects/jobs/job-1/checkpoints/42");
        assert!(dir.join("manifest.json").is_file());
        assert!(dir.join("model.safetensors").is_file());
    }

    #[tokio::test]
    async fn store_errors_name_the_store() {
        let (_tmp, objects) = file_store();
        let err = load_checkpoint(&objects, "jobs/../x", &Device::Cpu)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                CheckpointError::Objects(ObjectsError::InvalidPath { .. })
            ),
            "{err:?}"
        );
    }
}
