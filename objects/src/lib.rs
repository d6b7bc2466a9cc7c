//! Trainyard's object-store seam, shared by the coordinator and the worker: checkpoints,
//! and later logs and results, live in an object store named by URL.
//!
//! * [`ObjectsConfig`]: a URL (`file://`, `s3://`, `gs://`, `az://`) plus this process's
//!   environment, parsed into a typed configuration; see [`config`] for every parameter.
//!   Credentials never come from the URL and never appear in `Debug`/`Display` output or
//!   error messages, so the URL alone can be logged and sent to workers.
//! * [`Objects`]: an opened store and the key prefix under which Trainyard's objects live,
//!   with [`Objects::put`] (multipart with concurrent parts for large payloads),
//!   [`Objects::get`], [`Objects::head`], [`Objects::list`], [`Objects::delete`],
//!   [`Objects::delete_prefix`] and [`Objects::probe`].
//! * [`open_and_probe`]: what a server does at start: open, then write, read back and
//!   delete a small object, failing with a readable [`ObjectsError::Probe`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), trainyard_objects::ObjectsError> {
//! // AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and TRAINYARD_S3_ENDPOINT come
//! // from the environment.
//! let objects = trainyard_objects::open_and_probe("s3://ckpt/team-a").await?;
//! objects.put("jobs/j1/hello.txt", bytes::Bytes::from_static(b"hi")).await?;
//! let got = objects.get("jobs/j1/hello.txt").await?.expect("just written");
//! assert_eq!(got.info.size, 2);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod config;
pub mod datasets;
mod error;
mod store;
pub mod testing;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
    WriteMultipart,
};

pub use config::{redact_url, Backend, ClientSettings, ObjectsConfig, Secret};
pub use error::{ObjectsError, ProbeProblem};
pub use store::NamedStore;

/// Re-export of the `object_store` crate this one is built on.
pub use object_store;

/// How [`Objects::put_with`] uploads: one request up to `multipart_threshold` bytes, else a
/// multipart upload of `part_size` parts with up to `max_concurrency` in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadOptions {
    /// Payloads larger than this go up as multipart uploads (default 8 MiB).
    pub multipart_threshold: usize,
    /// Size of each part but the last (default 8 MiB; S3 requires at least 5 MiB).
    pub part_size: usize,
    /// Parts uploaded at the same time (default 8).
    pub max_concurrency: usize,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            multipart_threshold: 8 << 20,
            part_size: 8 << 20,
            max_concurrency: 8,
        }
    }
}

/// What [`Objects::put`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutInfo {
    /// Bytes written.
    pub size: u64,
    /// Parts of the multipart upload; 0 when it was a single request.
    pub parts: usize,
    /// The object's entity tag, if the store returns one.
    pub e_tag: Option<String>,
}

/// An object's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its path relative to the [`Objects`] prefix (for example `jobs/j1/checkpoints/3/manifest.json`).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, milliseconds since the Unix epoch.
    pub last_modified_unix_ms: i64,
    /// The entity tag, if the store returns one.
    pub e_tag: Option<String>,
}

/// An object read by [`Objects::get`]: its bytes (as many as its size says) and metadata.
#[derive(Debug, Clone)]
pub struct GetObject {
    /// The content.
    pub bytes: Bytes,
    /// The metadata.
    pub info: ObjectInfo,
}

/// An opened object store plus the path prefix under which Trainyard's objects live.
///
/// Stores opened here ([`open_objects`], [`Objects::from_config`]) print as their URL in
/// `Debug` and `Display`, never with credentials.
#[derive(Debug, Clone)]
pub struct Objects {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// Prefix of every Trainyard object in the store (empty for `file://`, whose store is
    /// rooted at the folder itself; the key prefix of a bucket URL: `a/b` in `s3://bucket/a/b`).
    pub prefix: ObjectPath,
}

/// How long [`Objects::probe`] waits for the whole probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens the object store named by `url`, with credentials from this process's
/// environment. For `file:///abs/path` the folder is created if it is missing. Nothing is
/// sent over the network yet; see [`open_and_probe`].
pub fn open_objects(url: &str) -> Result<Objects, ObjectsError> {
    Objects::from_config(&ObjectsConfig::from_url(url)?)
}

/// Opens the store named by `url` and [probes](Objects::probe) it, with few retries so a
/// wrong endpoint is reported within seconds. For a server's start: wrong credentials, a
/// missing bucket or an unreachable endpoint fail here with a message naming the URL.
pub async fn open_and_probe(url: &str) -> Result<Objects, ObjectsError> {
    let config = ObjectsConfig::from_url(url)?;
    let objects = Objects::from_config(&config)?;
    if !matches!(config.backend, Backend::File { .. }) {
        let mut quick = config.clone();
        quick.client.max_retries = quick.client.max_retries.min(3);
        quick.client.retry_timeout = quick.client.retry_timeout.min(Duration::from_secs(10));
        quick.client.connect_timeout = quick.client.connect_timeout.min(Duration::from_secs(5));
        Objects::from_config(&quick)?.probe().await?;
    } else {
        objects.probe().await?;
    }
    Ok(objects)
}

/// Splits a relative path into its non-empty segments, rejecting `.` and `..`.
fn segments(relative: &str) -> Result<Vec<&str>, ObjectsError> {
    let parts: Vec<&str> = relative.split('/').filter(|s| !s.is_empty()).collect();
    if let Some(bad) = parts.iter().find(|p| **p == "." || **p == "..") {
        return Err(ObjectsError::InvalidPath {
            path: relative.to_string(),
            reason: format!("segment {bad:?} is not allowed"),
        });
    }
    Ok(parts)
}

impl Objects {
    /// Opens the store that `config` describes (creating the folder of a `file://` URL).
    pub fn from_config(config: &ObjectsConfig) -> Result<Objects, ObjectsError> {
        let store = store::build(config)?;
        let prefix =
            ObjectPath::parse(&config.prefix).map_err(|e| ObjectsError::InvalidParameter {
                url: config.url().to_string(),
                param: "prefix".into(),
                reason: e.to_string(),
            })?;
        Ok(Objects { store, prefix })
    }

    /// The store's name for messages: its URL for stores opened by this crate.
    pub fn url(&self) -> String {
        self.store.to_string()
    }

    /// The full store path of `relative` (for example `jobs/<id>/checkpoints/7`).
    pub fn path(&self, relative: &str) -> ObjectPath {
        let mut parts: Vec<String> = self
            .prefix
            .parts()
            .map(|p| p.as_ref().to_string())
            .collect();
        parts.extend(
            relative
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
        ObjectPath::from_iter(parts)
    }

    /// Like [`Objects::path`], but rejects `.` and `..` segments.
    fn checked_path(&self, relative: &str) -> Result<ObjectPath, ObjectsError> {
        segments(relative)?;
        Ok(self.path(relative))
    }

    /// `full` relative to the prefix (`None` if it lies outside it).
    pub fn relative(&self, full: &ObjectPath) -> Option<String> {
        let parts: Vec<_> = full.prefix_match(&self.prefix)?.collect();
        Some(
            parts
                .iter()
                .map(|p| p.as_ref())
                .collect::<Vec<_>>()
                .join("/"),
        )
    }

    fn op_error(
        &self,
        op: &'static str,
        path: &ObjectPath,
        source: object_store::Error,
    ) -> ObjectsError {
        ObjectsError::Operation {
            url: self.url(),
            op,
            path: path.to_string(),
            source: Box::new(source),
        }
    }

    fn info(&self, meta: &ObjectMeta) -> ObjectInfo {
        ObjectInfo {
            path: self
                .relative(&meta.location)
                .unwrap_or_else(|| meta.location.to_string()),
            size: meta.size,
            last_modified_unix_ms: meta.last_modified.timestamp_millis(),
            e_tag: meta.e_tag.clone(),
        }
    }

    /// Writes `bytes` to `relative` with the default [`UploadOptions`]: one request up to
    /// 8 MiB, a multipart upload with 8 concurrent parts above. The object appears
    /// atomically, whole, or not at all.
    pub async fn put(&self, relative: &str, bytes: Bytes) -> Result<PutInfo, ObjectsError> {
        self.put_with(relative, bytes, &UploadOptions::default())
            .await
    }

    /// Writes `bytes` to `relative` as `options` say. A failed multipart upload is aborted
    /// (a cancelled one may leave parts behind until the bucket's lifecycle rules clean them).
    pub async fn put_with(
        &self,
        relative: &str,
        bytes: Bytes,
        options: &UploadOptions,
    ) -> Result<PutInfo, ObjectsError> {
        let path = self.checked_path(relative)?;
        let size = bytes.len() as u64;
        if bytes.len() <= options.multipart_threshold || options.part_size == 0 {
            let result = self
                .store
                .put_opts(&path, PutPayload::from_bytes(bytes), PutOptions::default())
                .await
                .map_err(|e| self.op_error("put", &path, e))?;
            return Ok(PutInfo {
                size,
                parts: 0,
                e_tag: result.e_tag,
            });
        }
        let upload = self
            .store
            .put_multipart_opts(&path, PutMultipartOptions::default())
            .await
            .map_err(|e| self.op_error("put (start multipart)", &path, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, options.part_size);
        let mut rest = bytes;
        let mut parts = 0;
        while !rest.is_empty() {
            let chunk = rest.split_to(rest.len().min(options.part_size));
            if let Err(e) = writer
                .wait_for_capacity(options.max_concurrency.max(1))
                .await
            {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(store = %self.url(), %path, error = %abort, "aborting a failed multipart upload failed");
                }
                return Err(self.op_error("put (upload part)", &path, e));
            }
            writer.put(chunk);
            parts += 1;
        }
        let result = writer
            .finish()
            .await
            .map_err(|e| self.op_error("put (complete multipart)", &path, e))?;
        tracing::debug!(store = %self.url(), %path, size, parts, "multipart upload done");
        Ok(PutInfo {
            size,
            parts,
            e_tag: result.e_tag,
        })
    }

    /// Reads the object at `relative`: `Ok(None)` if it does not exist; an error if fewer
    /// or more bytes arrive than its size.
    pub async fn get(&self, relative: &str) -> Result<Option<GetObject>, ObjectsError> {
        let path = self.checked_path(relative)?;
        let result = match self.store.get_opts(&path, GetOptions::default()).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.op_error("get", &path, e)),
        };
        let info = self.info(&result.meta);
        let bytes = result
            .bytes()
            .await
            .map_err(|e| self.op_error("get", &path, e))?;
        if bytes.len() as u64 != info.size {
            return Err(ObjectsError::SizeMismatch {
                url: self.url(),
                path: path.to_string(),
                expected: info.size,
                actual: bytes.len() as u64,
            });
        }
        Ok(Some(GetObject { bytes, info }))
    }

    /// The metadata of the object at `relative`; `Ok(None)` if it does not exist.
    pub async fn head(&self, relative: &str) -> Result<Option<ObjectInfo>, ObjectsError> {
        let path = self.checked_path(relative)?;
        let options = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        match self.store.get_opts(&path, options).await {
            Ok(r) => Ok(Some(self.info(&r.meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.op_error("head", &path, e)),
        }
    }

    /// Every object under the folder `relative` (`jobs/j1` lists `jobs/j1/...`, not
    /// `jobs/j10/...`; `""` lists everything under the prefix), sorted by path.
    pub async fn list(&self, relative: &str) -> Result<Vec<ObjectInfo>, ObjectsError> {
        let path = self.checked_path(relative)?;
        let prefix = (!path.as_ref().is_empty()).then_some(&path);
        let metas: Vec<ObjectMeta> = match self.store.list(prefix).try_collect().await {
            Ok(m) => m,
            // A local folder that does not exist yet holds nothing.
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(self.op_error("list", &path, e)),
        };
        let mut infos: Vec<ObjectInfo> = metas.iter().map(|m| self.info(m)).collect();
        infos.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(infos)
    }

    /// Deletes the object at `relative`; deleting an object that does not exist succeeds.
    pub async fn delete(&self, relative: &str) -> Result<(), ObjectsError> {
        let path = self.checked_path(relative)?;
        let stream = futures::stream::once(futures::future::ready(Ok(path.clone())));
        let result: Result<Vec<ObjectPath>, _> = self
            .store
            .delete_stream(Box::pin(stream))
            .try_collect()
            .await;
        match result {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.op_error("delete", &path, e)),
        }
    }

    /// Deletes every object under the folder `relative` (as [`Objects::list`] finds them);
    /// returns how many were deleted. An empty `relative` is refused: it would empty the
    /// whole prefix.
    pub async fn delete_prefix(&self, relative: &str) -> Result<usize, ObjectsError> {
        let parts = segments(relative)?;
        if parts.is_empty() {
            return Err(ObjectsError::InvalidPath {
                path: relative.to_string(),
                reason: "refusing to delete everything under the store's prefix".into(),
            });
        }
        let path = self.path(relative);
        let objects = self.list(relative).await?;
        let locations: Vec<object_store::Result<ObjectPath>> =
            objects.iter().map(|o| Ok(self.path(&o.path))).collect();
        let deleted: Vec<ObjectPath> = match self
            .store
            .delete_stream(Box::pin(futures::stream::iter(locations)))
            .try_collect()
            .await
        {
            Ok(d) => d,
            Err(e) => return Err(self.op_error("delete", &path, e)),
        };
        Ok(deleted.len())
    }

    /// Checks that the store works with this process's credentials: writes a small object
    /// under the prefix, reads it back, deletes it, within [`PROBE_TIMEOUT`]. The error
    /// says what is wrong (access denied, missing bucket, unreachable endpoint) and names
    /// the URL, never a secret.
    pub async fn probe(&self) -> Result<(), ObjectsError> {
        self.probe_within(PROBE_TIMEOUT).await
    }

    /// [`Objects::probe`] with another time limit.
    pub async fn probe_within(&self, limit: Duration) -> Result<(), ObjectsError> {
        let started = std::time::Instant::now();
        match tokio::time::timeout(limit, self.probe_steps()).await {
            Ok(result) => {
                if result.is_ok() {
                    tracing::debug!(store = %self.url(), elapsed = ?started.elapsed(), "object store probe passed");
                }
                result
            }
            Err(_) => Err(ObjectsError::Probe {
                url: self.url(),
                problem: ProbeProblem::Unreachable,
                detail: format!("no answer within {limit:?}"),
            }),
        }
    }

    async fn probe_steps(&self) -> Result<(), ObjectsError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let path = self.path(&format!("_trainyard-probe-{id}"));
        let payload = Bytes::from(format!("trainyard object store probe {id}\n"));
        let fail = |step: &str, problem: ProbeProblem, e: &dyn std::fmt::Display| {
            let full = e.to_string();
            tracing::debug!(store = %self.url(), step, error = %full, "object store probe failed");
            ObjectsError::Probe {
                url: self.url(),
                problem,
                detail: format!("{step} {path}: {}", concise(&full)),
            }
        };
        self.store
            .put_opts(
                &path,
                PutPayload::from_bytes(payload.clone()),
                PutOptions::default(),
            )
            .await
            .map_err(|e| fail("write", classify(&e, true), &e))?;
        let read = async {
            self.store
                .get_opts(&path, GetOptions::default())
                .await?
                .bytes()
                .await
        };
        let back = read.await;
        let deleted = self.delete_probe(&path).await;
        let back = back.map_err(|e| fail("read", classify(&e, false), &e))?;
        if back != payload {
            return Err(fail(
                "read",
                ProbeProblem::Mismatch,
                &format!(
                    "{} bytes differ from the {} written",
                    back.len(),
                    payload.len()
                ),
            ));
        }
        deleted.map_err(|e| fail("delete", classify(&e, false), &e))
    }

    async fn delete_probe(&self, path: &ObjectPath) -> Result<(), object_store::Error> {
        let stream = futures::stream::once(futures::future::ready(Ok(path.clone())));
        let result: Result<Vec<ObjectPath>, _> = self
            .store
            .delete_stream(Box::pin(stream))
            .try_collect()
            .await;
        match result {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The S3 error code and message of a server's XML answer (`AccessDenied: Forbidden:
/// Invalid signature`), else the whole text.
fn concise(text: &str) -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find("</")? + start;
        Some(text[start..end].trim().to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => {
            let status = text
                .find("status code: ")
                .map(|i| &text[i + 13..])
                .and_then(|rest| rest.split(':').next())
                .map(|s| format!("HTTP {} ", s.trim()))
                .unwrap_or_default();
            format!("{status}{code}: {message}")
        }
        _ => text.to_string(),
    }
}

/// What kind of failure an object-store error is. `writing`: a not-found answer to a write
/// means the bucket (or folder) is missing.
fn classify(err: &object_store::Error, writing: bool) -> ProbeProblem {
    match err {
        object_store::Error::Unauthenticated { .. }
        | object_store::Error::PermissionDenied { .. } => return ProbeProblem::Denied,
        object_store::Error::NotFound { .. } if writing => return ProbeProblem::MissingBucket,
        _ => {}
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(http) = e.downcast_ref::<object_store::client::HttpError>() {
            use object_store::client::HttpErrorKind;
            if matches!(http.kind(), HttpErrorKind::Connect | HttpErrorKind::Timeout) {
                return ProbeProblem::Unreachable;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::PermissionDenied => return ProbeProblem::Denied,
                std::io::ErrorKind::NotFound if writing => return ProbeProblem::MissingBucket,
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut => {
                    return ProbeProblem::Unreachable
                }
                _ => {}
            }
        }
        source = e.source();
    }
    let text = err.to_string();
    if text.contains("NoSuchBucket") {
        ProbeProblem::MissingBucket
    } else if [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidSignature",
    ]
    .iter()
    .any(|code| text.contains(code))
    {
        ProbeProblem::Denied
    } else {
        ProbeProblem::Other
    }
}

#[cfg(test)]
mod tests;
