//! Operations on a local folder (always), and against a real S3 server (Garage from
//! `scripts/s3.sh up`; see [`crate::testing`] for when these skip).

use std::collections::HashMap;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::*;
use crate::testing::{s3_test_env, unique_prefix};

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Deterministic pseudo-random bytes (xorshift), so a digest mismatch cannot hide in zeros.
fn payload(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn local() -> (tempfile::TempDir, Objects) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "file://{}",
        dir.path().join("a b").join("objects").display()
    )
    .replace(' ', "%20");
    let objects = open_objects(&url).unwrap();
    (dir, objects)
}

#[tokio::test]
async fn file_url_creates_folder_and_stores_objects() {
    let (dir, objects) = local();
    let root = dir.path().join("a b").join("objects");
    assert!(root.is_dir());
    objects
        .put("jobs/j1/x.txt", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(root.join("jobs/j1/x.txt")).unwrap(), b"hello");
    let got = objects.get("jobs/j1/x.txt").await.unwrap().unwrap();
    assert_eq!(&got.bytes[..], b"hello");
    assert_eq!(got.info.size, 5);
    assert_eq!(got.info.path, "jobs/j1/x.txt");
    assert!(objects.url().starts_with("file://"), "{}", objects.url());
    assert!(format!("{objects:?}").contains("file://"));
}

#[tokio::test]
async fn local_put_get_list_delete() {
    let (_dir, objects) = local();
    let small = payload(1000, 1);
    let large = payload(3 << 20, 2);
    let info = objects.put("jobs/a/small", small.clone()).await.unwrap();
    assert_eq!((info.size, info.parts), (1000, 0));
    // Multipart on a local folder too, with small parts.
    let options = UploadOptions {
        multipart_threshold: 1 << 20,
        part_size: 1 << 20,
        max_concurrency: 2,
    };
    let info = objects
        .put_with("jobs/a/large", large.clone(), &options)
        .await
        .unwrap();
    assert_eq!((info.size, info.parts), (3 << 20, 3));
    objects
        .put("jobs/ab/other", Bytes::from_static(b"x"))
        .await
        .unwrap();
    let got = objects.get("jobs/a/large").await.unwrap().unwrap();
    assert_eq!(sha256(&got.bytes), sha256(&large));
    assert_eq!(
        objects.head("jobs/a/small").await.unwrap().unwrap().size,
        1000
    );
    assert!(objects.head("jobs/a/none").await.unwrap().is_none());
    assert!(objects.get("jobs/a/none").await.unwrap().is_none());

    let listed: Vec<String> = objects
        .list("jobs/a")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.path)
        .collect();
    assert_eq!(listed, ["jobs/a/large", "jobs/a/small"]);
    assert_eq!(objects.list("").await.unwrap().len(), 3);
    assert!(objects.list("jobs/zzz").await.unwrap().is_empty());

    objects.delete("jobs/a/small").await.unwrap();
    objects.delete("jobs/a/small").await.unwrap(); // idempotent
    assert!(objects.get("jobs/a/small").await.unwrap().is_none());
    assert_eq!(objects.delete_prefix("jobs/a").await.unwrap(), 1);
    assert!(objects.list("jobs/a").await.unwrap().is_empty());
    assert_eq!(objects.list("jobs/ab").await.unwrap().len(), 1);
    assert!(matches!(
        objects.delete_prefix("/").await.unwrap_err(),
        ObjectsError::InvalidPath { .. }
    ));
    assert!(matches!(
        objects.put("../escape", Bytes::new()).await.unwrap_err(),
        ObjectsError::InvalidPath { .. }
    ));
    objects.probe().await.unwrap();
    // The probe leaves nothing behind.
    assert_eq!(objects.list("").await.unwrap().len(), 1);
}

#[tokio::test]
async fn local_probe_reports_a_read_only_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ro");
    std::fs::create_dir_all(&root).unwrap();
    let objects = open_objects(&format!("file://{}", root.display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o555)).unwrap();
    let result = objects.probe().await;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    // root may write anywhere; the probe then passes, which is right too.
    if let Err(err) = result {
        assert!(
            matches!(
                err,
                ObjectsError::Probe {
                    problem: ProbeProblem::Denied,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&root.display().to_string()),
            "{err}"
        );
    }
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
    assert_eq!(
        objects
            .relative(&ObjectPath::from("base/pre/jobs/a"))
            .as_deref(),
        Some("jobs/a")
    );
    assert_eq!(objects.relative(&ObjectPath::from("other/x")), None);
}

#[test]
fn unsupported_and_bad_urls() {
    let err = open_objects("ftp://bucket/prefix").unwrap_err();
    assert!(
        matches!(err, ObjectsError::UnsupportedScheme { .. }),
        "{err}"
    );
    assert!(err.is_config_error());
    let err = open_objects("file://relative/path").unwrap_err();
    assert!(err.to_string().contains("absolute"), "{err}");
}

#[tokio::test]
async fn cloud_stores_build_from_configuration_alone() {
    // gs:// and az:// cannot be exercised here without a server; opening them checks that
    // the configuration reaches the client builders (nothing is sent).
    let env: HashMap<&str, &str> = [
        ("AZURE_STORAGE_ACCOUNT_KEY", "a2V5"), // base64 "key"
    ]
    .into_iter()
    .collect();
    for url in [
        "gs://bucket/prefix",
        "gs://bucket?endpoint=http://127.0.0.1:4443",
        "az://container/prefix?account=acct",
        "az://container?use_emulator=true",
        "s3://bucket/prefix?region=eu-west-1",
    ] {
        let config =
            ObjectsConfig::parse_with_env(url, &|k| env.get(k).map(|v| v.to_string())).unwrap();
        let objects = Objects::from_config(&config).unwrap();
        assert_eq!(objects.url(), url);
        assert_eq!(
            objects.prefix.as_ref(),
            config.prefix.as_str(),
            "prefix of {url}"
        );
    }
}

// ---- against a real S3 server -------------------------------------------------------

/// The environment of this process with `overrides` on top.
fn parse_with(url: &str, overrides: &[(&str, &str)]) -> Result<ObjectsConfig, ObjectsError> {
    let overrides: HashMap<String, String> = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ObjectsConfig::parse_with_env(url, &|k| {
        overrides.get(k).cloned().or_else(|| std::env::var(k).ok())
    })
}

#[tokio::test]
async fn s3_round_trip_list_delete_and_probe() {
    let Some(env) = s3_test_env() else { return };
    let url = env.url(&unique_prefix("objects"));
    let objects = open_and_probe(&url)
        .await
        .expect("probe of the test server");
    assert_eq!(objects.url(), url);

    let small = payload(4096, 3);
    let large = payload(24 << 20, 4); // 24 MiB: a multipart upload of 3 parts
    let info = objects
        .put("jobs/j1/small.bin", small.clone())
        .await
        .unwrap();
    assert_eq!(info.parts, 0);
    let started = std::time::Instant::now();
    let info = objects
        .put("jobs/j1/large.bin", large.clone())
        .await
        .unwrap();
    eprintln!("24 MiB multipart put in {:?}", started.elapsed());
    assert_eq!((info.size, info.parts), (24 << 20, 3));
    objects
        .put(
            "jobs/j10/other.bin",
            Bytes::from_static(b"not under jobs/j1"),
        )
        .await
        .unwrap();

    for (name, sent) in [("small.bin", &small), ("large.bin", &large)] {
        let got = objects
            .get(&format!("jobs/j1/{name}"))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(got.info.size, sent.len() as u64, "{name}");
        assert_eq!(sha256(&got.bytes), sha256(sent), "{name}: digest differs");
    }
    assert_eq!(
        objects
            .head("jobs/j1/large.bin")
            .await
            .unwrap()
            .unwrap()
            .size,
        24 << 20
    );
    assert!(objects.get("jobs/j1/absent").await.unwrap().is_none());

    let listed: Vec<(String, u64)> = objects
        .list("jobs/j1")
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.path, o.size))
        .collect();
    assert_eq!(
        listed,
        [
            ("jobs/j1/large.bin".to_string(), 24 << 20),
            ("jobs/j1/small.bin".to_string(), 4096)
        ]
    );

    objects.delete("jobs/j1/small.bin").await.unwrap();
    objects.delete("jobs/j1/small.bin").await.unwrap(); // idempotent
    assert!(objects.get("jobs/j1/small.bin").await.unwrap().is_none());
    assert_eq!(objects.delete_prefix("jobs").await.unwrap(), 2);
    assert!(objects.list("").await.unwrap().is_empty());
}

#[tokio::test]
async fn s3_probe_with_a_wrong_secret_fails_clearly() {
    let Some(env) = s3_test_env() else { return };
    let url = env.url(&unique_prefix("probe-bad-secret"));
    let wrong = "wrong-secret-0123456789-wrong-secret";
    let config = parse_with(&url, &[("AWS_SECRET_ACCESS_KEY", wrong)]).unwrap();
    let objects = Objects::from_config(&config).unwrap();
    let err = objects.probe().await.expect_err("a wrong secret must fail");
    let text = err.to_string();
    eprintln!("wrong secret: {text}");
    assert!(
        matches!(
            err,
            ObjectsError::Probe {
                problem: ProbeProblem::Denied,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_config_error());
    assert!(text.contains(&url), "the message names the URL: {text}");
    assert!(text.contains("access denied"), "{text}");
    assert!(text.contains("HTTP 403"), "{text}");
    let real = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default();
    for secret in [wrong, real.as_str()] {
        assert!(!text.contains(secret), "secret in the message: {text}");
        assert!(!format!("{err:?} {objects:?} {config:?}").contains(secret));
    }

    // An unknown key id is denied too.
    let config = parse_with(
        &url,
        &[("AWS_ACCESS_KEY_ID", "GK00000000000000000000000000")],
    )
    .unwrap();
    let err = Objects::from_config(&config)
        .unwrap()
        .probe()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ObjectsError::Probe {
                problem: ProbeProblem::Denied,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn s3_probe_reports_a_missing_bucket_and_an_unreachable_endpoint() {
    let Some(env) = s3_test_env() else { return };
    let url = format!("s3://no-such-bucket-{}/x", uuid::Uuid::new_v4().simple());
    let err = open_and_probe(&url).await.unwrap_err();
    eprintln!("missing bucket: {err}");
    assert!(
        matches!(
            err,
            ObjectsError::Probe {
                problem: ProbeProblem::MissingBucket,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_config_error());
    assert!(err.to_string().contains(&url), "{err}");
    assert!(err.to_string().contains("NoSuchBucket"), "{err}");

    // A port nobody listens on (the test server's, plus one that is never used).
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!(
        "{}?endpoint=http://127.0.0.1:{closed}&max_retries=1&retry_timeout=2s",
        env.url("x")
    );
    let started = std::time::Instant::now();
    let err = open_and_probe(&url).await.unwrap_err();
    eprintln!("unreachable: {err} after {:?}", started.elapsed());
    assert!(
        matches!(
            err,
            ObjectsError::Probe {
                problem: ProbeProblem::Unreachable,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_config_error());
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}
