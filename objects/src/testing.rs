//! Helpers for tests that need a real S3 server (any crate's): the server named by the
//! environment that `scripts/s3.sh up` prints (`TRAINYARD_S3_ENDPOINT`,
//! `TRAINYARD_S3_BUCKET`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`).
//!
//! Without it, [`s3_test_env`] prints a notice and returns `None` (the test passes without
//! running) — unless `CI` or `TRAINYARD_REQUIRE_S3=1` is set, where a missing server fails
//! the test.

/// The variable naming the test server's endpoint.
pub const ENDPOINT_ENV: &str = "TRAINYARD_S3_ENDPOINT";
/// The variable naming the test bucket.
pub const BUCKET_ENV: &str = "TRAINYARD_S3_BUCKET";
/// Set to 1 to make a missing test server a failure.
pub const REQUIRE_ENV: &str = "TRAINYARD_REQUIRE_S3";

/// The S3 server that tests use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3TestEnv {
    /// Its endpoint (`http://127.0.0.1:39000`).
    pub endpoint: String,
    /// The bucket tests write under (each under its own prefix).
    pub bucket: String,
}

impl S3TestEnv {
    /// `s3://<bucket>/<prefix>`; endpoint, region and credentials come from the environment.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix.trim_start_matches('/'))
    }
}

fn truthy(var: &str) -> bool {
    std::env::var(var)
        .map(|v| {
            let v = v.trim().to_ascii_lowercase();
            !v.is_empty() && v != "0" && v != "false" && v != "no"
        })
        .unwrap_or(false)
}

/// The test S3 server; `None` (after a notice on stderr) when there is none and none is
/// required. Panics when `CI` or `TRAINYARD_REQUIRE_S3` asks for one and it is missing.
pub fn s3_test_env() -> Option<S3TestEnv> {
    let get = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let endpoint = get(ENDPOINT_ENV);
    let bucket = get(BUCKET_ENV);
    let keys = get("AWS_ACCESS_KEY_ID").is_some() && get("AWS_SECRET_ACCESS_KEY").is_some();
    if let (Some(endpoint), Some(bucket), true) = (endpoint, bucket, keys) {
        return Some(S3TestEnv { endpoint, bucket });
    }
    let what = format!(
        "{ENDPOINT_ENV}, {BUCKET_ENV}, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not all set"
    );
    if truthy(REQUIRE_ENV) || truthy("CI") {
        panic!(
            "{what}, but CI / {REQUIRE_ENV}=1 require the S3 tests to run: start the test \
             server with `eval \"$(scripts/s3.sh up)\"` and rerun"
        );
    }
    eprintln!("NOTICE: S3 test skipped: {what} (run `eval \"$(scripts/s3.sh up)\"` to run it)");
    None
}

/// A fresh key prefix for one test: `trainyard-test/<tag>-<uuid>`.
pub fn unique_prefix(tag: &str) -> String {
    format!("trainyard-test/{tag}-{}", uuid::Uuid::new_v4().simple())
}
