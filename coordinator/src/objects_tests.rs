//! The object store is opened and probed at start: a bad URL, rejected credentials or a
//! missing bucket fail `start` with a configuration error, before anything is served. The
//! S3 cases need the test server of `scripts/s3.sh up` (see `trainyard_objects::testing`).

use std::net::SocketAddr;

use trainyard_objects::testing::{s3_test_env, unique_prefix};
use trainyard_objects::{ObjectsError, ProbeProblem};

use super::*;

fn config(dir: &std::path::Path, objects_url: &str) -> CoordinatorConfig {
    let mut config = CoordinatorConfig::with_data_dir(dir);
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.objects_url = objects_url.to_string();
    config
}

async fn start_err(objects_url: &str) -> CoordinatorError {
    let dir = tempfile::tempdir().unwrap();
    match start(config(dir.path(), objects_url)).await {
        Ok(handle) => {
            let _ = handle.shutdown().await;
            panic!("start with --objects {objects_url} should fail")
        }
        Err(e) => e,
    }
}

#[tokio::test]
async fn file_objects_folder_is_created_and_probed() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("deep").join("objects");
    let url = format!("file://{}", objects.display());
    let handle = start(config(dir.path(), &url)).await.unwrap();
    assert!(objects.is_dir());
    // The probe cleaned up after itself.
    assert_eq!(std::fs::read_dir(&objects).unwrap().count(), 0);
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_objects_urls_fail_start_as_config_errors() {
    for (url, needle) in [
        ("ftp://host/x", "not supported"),
        ("objects", "SCHEME://"),
        ("file://relative", "absolute"),
        ("s3://bucket/x?regoin=eu", "regoin"),
        (
            "s3://bucket/x?endpoint=http://127.0.0.1:9&credentials_file=/nonexistent/credentials",
            "/nonexistent/credentials",
        ),
    ] {
        let err = start_err(url).await;
        assert!(err.is_config_error(), "{url}: {err:?}");
        assert!(err.to_string().contains(needle), "{url}: {err}");
    }
}

#[tokio::test]
async fn s3_objects_are_probed_at_start() {
    let Some(env) = s3_test_env() else { return };
    // Good credentials: the coordinator starts.
    let dir = tempfile::tempdir().unwrap();
    let url = env.url(&unique_prefix("coordinator-start"));
    let handle = start(config(dir.path(), &url))
        .await
        .expect("start with S3");
    handle.shutdown().await.unwrap();

    // The right key id with a wrong secret, from a credentials file named in the URL.
    let key_id = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default();
    let wrong = "wrong-secret-for-the-coordinator-start-test";
    let creds = dir.path().join("credentials");
    std::fs::write(
        &creds,
        format!("[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {wrong}\n"),
    )
    .unwrap();
    let bad = format!("{url}?credentials_file={}", creds.display());
    let err = start_err(&bad).await;
    assert!(err.is_config_error(), "{err:?}");
    assert!(
        matches!(
            err,
            CoordinatorError::Objects(ObjectsError::Probe {
                problem: ProbeProblem::Denied,
                ..
            })
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&url) && text.contains("access denied"),
        "{text}"
    );
    assert!(!text.contains(wrong), "{text}");

    // A bucket that does not exist.
    let missing = format!("s3://no-such-bucket-{}/x", uuid::Uuid::new_v4().simple());
    let err = start_err(&missing).await;
    assert!(err.is_config_error(), "{err:?}");
    assert!(err.to_string().contains("bucket does not exist"), "{err}");
}
