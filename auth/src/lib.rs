//! Trainyard's credentials and transport security, shared by the coordinator (which checks
//! them), the workers and the CLI (which present them):
//!
//! - [`token`]: bearer tokens for users and join tokens for workers, random and prefixed,
//!   stored only as SHA-256 hashes and compared in constant time;
//! - [`auth_file`]: the coordinator's auth file (who may call, with which role), and the
//!   edits `trainyard auth add|remove|list` make to it;
//! - [`tls`]: TLS settings from PEM files for the gRPC server and clients (rustls), with
//!   optional client certificates (mutual TLS);
//! - [`client`]: the interceptor that puts a bearer token on every call;
//! - [`files`]: atomic writes of secret files;
//! - [`certs`]: a development CA and certificates for a first try (`trainyard certs init`).

#![warn(missing_docs)]

pub mod auth_file;
pub mod certs;
pub mod client;
pub mod files;
pub mod tls;
pub mod token;

pub use auth_file::{AuthError, Credentials};
pub use token::TokenHash;

/// What an authenticated caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A user who may also read and cancel every user's jobs.
    Admin,
    /// A user: submits jobs, reads and cancels their own.
    User,
    /// A worker agent: may call only the worker protocol (`WorkerService`).
    Worker,
}

impl Role {
    /// The role's name in the auth file and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Worker => "worker",
        }
    }

    /// Whether the role is a user's (admin or user), not a worker's.
    pub fn is_user(self) -> bool {
        matches!(self, Role::Admin | Role::User)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller: the name in the auth file and the role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// The user's or the join token's name.
    pub name: String,
    /// What the caller may do.
    pub role: Role,
}

impl Principal {
    /// The caller of a coordinator that runs without credentials (loopback only, or
    /// `--insecure`): everyone is this one administrator.
    pub fn anonymous() -> Self {
        Principal {
            name: String::new(),
            role: Role::Admin,
        }
    }
}

/// Makes ring rustls's process-wide crypto provider (the binary links both ring and
/// aws-lc-rs through its dependencies, and rustls needs to be told which to use). Safe to
/// call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
