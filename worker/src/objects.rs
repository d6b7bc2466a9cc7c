//! Opening the object store (checkpoints, later logs and results) from a URL.
//!
//! `file:///abs/path` is supported now; `s3://`, `gs://` and `az://` come later and are
//! added in [`open_objects`] only.

use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

use crate::WorkerError;

/// An opened object store plus the path prefix under which Trainyard's objects live.
#[derive(Debug, Clone)]
pub struct Objects {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// Prefix of every Trainyard object in the store (empty for `file://`, whose store is
    /// rooted at the folder itself; the key prefix of a bucket URL later).
    pub prefix: ObjectPath,
}

impl Objects {
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
}

/// Opens the object store named by `url`. For `file:///abs/path` the folder is created if
/// it is missing. Every other scheme is an error saying it is not supported yet.
pub fn open_objects(url: &str) -> Result<Objects, WorkerError> {
    let invalid = |reason: &str| WorkerError::InvalidObjectsUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(invalid(
            "expected SCHEME://..., for example file:///var/lib/trainyard/objects",
        ));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "file" => {
            // file:///abs/path or file://localhost/abs/path
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(invalid(
                    "a file:// URL needs an absolute path (file:///abs/path)",
                ));
            }
            let path = percent_decode(path).ok_or_else(|| invalid("bad percent-encoding"))?;
            std::fs::create_dir_all(&path)?;
            let store = LocalFileSystem::new_with_prefix(&path)?;
            Ok(Objects {
                store: Arc::new(store),
                prefix: ObjectPath::default(),
            })
        }
        // s3 / gs / az: added by the object-storage issue, here.
        other => Err(WorkerError::UnsupportedObjectsScheme {
            url: url.to_string(),
            scheme: other.to_string(),
        }),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::{ObjectStoreExt, PutPayload};

    #[tokio::test]
    async fn file_url_creates_folder_and_stores_objects() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("a b").join("objects");
        let url = format!("file://{}", root.display()).replace(' ', "%20");
        let objects = open_objects(&url).unwrap();
        assert!(root.is_dir());
        let p = objects.path("jobs/j1/x.txt");
        objects
            .store
            .put(&p, PutPayload::from_static(b"hello"))
            .await
            .unwrap();
        assert_eq!(std::fs::read(root.join("jobs/j1/x.txt")).unwrap(), b"hello");
        let got = objects.store.get(&p).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], b"hello");
    }

    #[test]
    fn bad_and_unsupported_urls() {
        let err = open_objects("s3://bucket/prefix").unwrap_err();
        assert!(
            matches!(err, WorkerError::UnsupportedObjectsScheme { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("not supported yet"), "{err}");
        let err = open_objects("file://relative/path").unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
        let err = open_objects("/no/scheme").unwrap_err();
        assert!(
            matches!(err, WorkerError::InvalidObjectsUrl { .. }),
            "{err}"
        );
    }

    #[test]
    fn prefix_joins_paths() {
        let objects = Objects {
            store: Arc::new(object_store::memory::InMemory::new()),
            prefix: ObjectPath::from("base/pre"),
        };
        assert_eq!(
            objects.path("jobs/a/checkpoints/3").as_ref(),
            "base/pre/jobs/a/checkpoints/3"
        );
    }
}
