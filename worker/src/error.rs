//! The worker crate's error type.

/// Errors of the worker agent, its configuration and its object-store access.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A command-line device option could not be understood.
    #[error("{flag} {value:?}: {reason}")]
    InvalidDevices {
        /// The flag that carried the value (`--devices`, `--emulate-gpus`).
        flag: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The object store could not be configured or opened (a bad URL, missing credentials).
    #[error(transparent)]
    Objects(#[from] trainyard_objects::ObjectsError),
    /// The object store reported an error.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// The coordinator URL is malformed.
    #[error("coordinator url {url:?}: {reason}")]
    InvalidCoordinatorUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The join token or TLS files cannot be used; the message names the setting.
    #[error("{0}")]
    Security(String),
    /// The worker configuration cannot be used (for example an empty rank command).
    #[error("invalid worker config: {0}")]
    InvalidConfig(String),
    /// A rank assignment could not be encoded or decoded.
    #[error("rank assignment: {0}")]
    Assignment(String),
    /// The metrics endpoint's address could not be bound.
    #[error("cannot serve metrics on {addr}: {source}")]
    MetricsBind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Local I/O failed (work directory, process spawn).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}
