//! The crate's error type. Every message names the store by its URL, never with a secret:
//! credentials are not accepted in URLs, and URLs in messages go through
//! [`crate::redact_url`].

use std::fmt;

/// Why a [probe](crate::Objects::probe) of the store failed, as far as it can be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeProblem {
    /// The server refused the request: wrong credentials, or credentials without the
    /// permission to write, read and delete in the bucket.
    Denied,
    /// The bucket (or container, or local folder) does not exist.
    MissingBucket,
    /// The endpoint did not answer (connection refused, DNS failure, timeout).
    Unreachable,
    /// The probe object read back differently from what was written.
    Mismatch,
    /// Any other failure.
    Other,
}

impl ProbeProblem {
    /// Whether the problem is the configuration's fault (credentials, bucket name), as
    /// opposed to a server that is down or misbehaving.
    pub fn is_config_error(self) -> bool {
        matches!(self, ProbeProblem::Denied | ProbeProblem::MissingBucket)
    }
}

impl fmt::Display for ProbeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProbeProblem::Denied => {
                "access denied: the credentials are wrong or may not write to the bucket \
                 (they come from this process's environment or credentials file, never from the URL)"
            }
            ProbeProblem::MissingBucket => "the bucket does not exist",
            ProbeProblem::Unreachable => "the endpoint is unreachable",
            ProbeProblem::Mismatch => "the probe object read back differently from what was written",
            ProbeProblem::Other => "the store failed",
        })
    }
}

/// Errors of configuring, opening and using an object store.
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    /// The URL is malformed.
    #[error("objects url {url}: {reason}")]
    InvalidUrl {
        /// The URL (redacted).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL names a scheme this build cannot open.
    #[error(
        "objects url {url}: scheme {scheme:?} is not supported (supported: file://, s3://, gs://, az://)"
    )]
    UnsupportedScheme {
        /// The URL (redacted).
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// A setting (a URL query parameter, a part of the URL, or an environment variable) has
    /// a bad value.
    #[error("objects url {url}: {param}: {reason}")]
    InvalidParameter {
        /// The URL (redacted).
        url: String,
        /// The setting, for example `endpoint` or `region (from AWS_REGION)`.
        param: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Credentials are missing, incomplete or unreadable.
    #[error("objects url {url}: credentials: {reason}")]
    Credentials {
        /// The URL (redacted).
        url: String,
        /// What is wrong (never the secret itself).
        reason: String,
    },
    /// The local folder of a `file://` URL could not be created or opened.
    #[error("objects url {url}: {path}: {source}")]
    Io {
        /// The URL (redacted).
        url: String,
        /// The local path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The object-store client could not be built from the configuration.
    #[error("objects url {url}: cannot open the store: {source}")]
    Open {
        /// The URL (redacted).
        url: String,
        /// The object store's error.
        source: Box<object_store::Error>,
    },
    /// An operation on an object failed.
    #[error("object store {url}: {op} {path}: {source}")]
    Operation {
        /// The store's URL (redacted).
        url: String,
        /// The operation: `put`, `get`, `list`, `delete`, ...
        op: &'static str,
        /// The object's path in the store.
        path: String,
        /// The object store's error.
        source: Box<object_store::Error>,
    },
    /// A download ended with fewer or more bytes than the object's size.
    #[error("object store {url}: get {path}: received {actual} bytes, the object has {expected}")]
    SizeMismatch {
        /// The store's URL (redacted).
        url: String,
        /// The object's path in the store.
        path: String,
        /// The size the store reported.
        expected: u64,
        /// The number of bytes received.
        actual: u64,
    },
    /// A relative object path is unusable (`..`, `.`).
    #[error("object path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The start-up probe (write, read back, delete a small object) failed.
    #[error("object store {url}: probe failed: {problem}: {detail}")]
    Probe {
        /// The store's URL (redacted).
        url: String,
        /// The kind of failure.
        problem: ProbeProblem,
        /// The underlying error's message.
        detail: String,
    },
}

impl ObjectsError {
    /// Whether the error is the configuration's fault (a bad URL or setting, missing or
    /// rejected credentials, a missing bucket, a local folder that cannot be created): a process that fails to start with it should
    /// exit as for bad input, and retrying cannot help.
    pub fn is_config_error(&self) -> bool {
        match self {
            ObjectsError::InvalidUrl { .. }
            | ObjectsError::UnsupportedScheme { .. }
            | ObjectsError::InvalidParameter { .. }
            | ObjectsError::Credentials { .. }
            | ObjectsError::Open { .. }
            | ObjectsError::Io { .. }
            | ObjectsError::InvalidPath { .. } => true,
            ObjectsError::Probe { problem, .. } => problem.is_config_error(),
            ObjectsError::Operation { .. } | ObjectsError::SizeMismatch { .. } => false,
        }
    }
}
