//! The coordinator's auth file: the users (name, role) and worker join tokens it accepts,
//! each by the SHA-256 of its token. A TOML file, kept in a Kubernetes Secret or a file
//! readable only by the coordinator:
//!
//! ```toml
//! [[users]]
//! name = "alice"
//! role = "admin"        # or "user"
//! token_sha256 = "9f86d08188...0a08"
//!
//! [[workers]]
//! name = "gpu-pool"
//! token_sha256 = "60303ae22b...4f1c"
//! ```
//!
//! [`add`], [`remove`] and [`list`] are what `trainyard auth add-user|add-worker|remove|list`
//! do: [`add`] draws the token, prints it once and stores only its hash.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::token::{self, TokenHash};
use crate::{Principal, Role};

/// Why the auth file could not be read, used or changed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read.
    #[error("cannot read the auth file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("auth file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (with the line).
        message: String,
    },
    /// An entry is invalid.
    #[error("auth file {path}: {field}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The entry's field, e.g. `users[2].role`.
        field: String,
        /// Why.
        reason: String,
    },
    /// The file could not be written.
    #[error("cannot write the auth file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An entry of that name already exists.
    #[error(
        "name: {kind} {name:?} already exists in {path} (remove it first to rotate its token)"
    )]
    Exists {
        /// "user" or "worker".
        kind: &'static str,
        /// The name.
        name: String,
        /// The file.
        path: PathBuf,
    },
    /// No entry of that name.
    #[error("name: no user or worker named {name:?} in {path}")]
    NotFound {
        /// The name.
        name: String,
        /// The file.
        path: PathBuf,
    },
    /// A bad name or role given to [`add`].
    #[error("{field}: {reason}")]
    BadInput {
        /// The argument.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// No randomness for the token.
    #[error(transparent)]
    Random(#[from] token::RandomError),
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    users: Vec<UserRepr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    workers: Vec<WorkerRepr>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserRepr {
    name: String,
    role: String,
    token_sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerRepr {
    name: String,
    token_sha256: String,
}

/// Checks a user or join-token name: 1 to 64 of `A-Z a-z 0-9 . _ @ -`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{name:?} must be 1 to 64 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-')))
    {
        return Err(format!(
            "{name:?} has {c:?}; use letters, digits, '.', '_', '@' and '-'"
        ));
    }
    Ok(())
}

/// Parses a user role: `admin` or `user`.
pub fn parse_user_role(s: &str) -> Result<Role, String> {
    match s {
        "admin" => Ok(Role::Admin),
        "user" => Ok(Role::User),
        other => Err(format!("{other:?} is not a user role (admin or user)")),
    }
}

/// The credentials the coordinator accepts, loaded from an auth file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    entries: Vec<(TokenHash, Principal)>,
}

impl Credentials {
    /// Loads and checks an auth file: valid names (unique per section), roles and hashes.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let repr = read(path)?;
        let invalid = |field: String, reason: String| AuthError::Invalid {
            path: path.to_path_buf(),
            field,
            reason,
        };
        let mut entries = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, u) in repr.users.iter().enumerate() {
            check_name(&u.name).map_err(|r| invalid(format!("users[{i}].name"), r))?;
            if !seen.insert(("user", u.name.clone())) {
                return Err(invalid(
                    format!("users[{i}].name"),
                    format!("{:?} appears twice", u.name),
                ));
            }
            let role =
                parse_user_role(&u.role).map_err(|r| invalid(format!("users[{i}].role"), r))?;
            let hash = TokenHash::parse_hex(&u.token_sha256)
                .map_err(|r| invalid(format!("users[{i}].token_sha256"), r))?;
            entries.push((
                hash,
                Principal {
                    name: u.name.clone(),
                    role,
                },
            ));
        }
        for (i, w) in repr.workers.iter().enumerate() {
            check_name(&w.name).map_err(|r| invalid(format!("workers[{i}].name"), r))?;
            if !seen.insert(("worker", w.name.clone())) {
                return Err(invalid(
                    format!("workers[{i}].name"),
                    format!("{:?} appears twice", w.name),
                ));
            }
            let hash = TokenHash::parse_hex(&w.token_sha256)
                .map_err(|r| invalid(format!("workers[{i}].token_sha256"), r))?;
            entries.push((
                hash,
                Principal {
                    name: w.name.clone(),
                    role: Role::Worker,
                },
            ));
        }
        Ok(Credentials { entries })
    }

    /// Credentials from (token, principal) pairs (tests, embedding).
    pub fn from_tokens<'a>(pairs: impl IntoIterator<Item = (&'a str, Principal)>) -> Self {
        Credentials {
            entries: pairs
                .into_iter()
                .map(|(t, p)| (TokenHash::of(t), p))
                .collect(),
        }
    }

    /// How many users and how many join tokens there are.
    pub fn counts(&self) -> (usize, usize) {
        let workers = self
            .entries
            .iter()
            .filter(|(_, p)| p.role == Role::Worker)
            .count();
        (self.entries.len() - workers, workers)
    }

    /// Who presents `token`, if anyone. Every stored hash is compared, in constant time,
    /// whether or not an earlier one matched.
    pub fn authenticate(&self, token: &str) -> Option<&Principal> {
        let presented = TokenHash::of(token);
        let mut found = None;
        for (hash, principal) in &self.entries {
            if hash.ct_eq(&presented) {
                found = Some(principal);
            }
        }
        found
    }
}

fn read(path: &Path) -> Result<FileRepr, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| AuthError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads the file, or an empty one if it does not exist yet.
fn read_or_empty(path: &Path) -> Result<FileRepr, AuthError> {
    if path.exists() {
        read(path)
    } else {
        Ok(FileRepr::default())
    }
}

const HEADER: &str =
    "# Trainyard auth file: who may call the coordinator. Only SHA-256 hashes of tokens\n\
# are stored here; edit it with `trainyard auth add-user|add-worker|remove|list`.\n\n";

/// Writes the file atomically (see [`crate::files::write_atomic`]), readable by its owner
/// only, creating its folder.
fn write(path: &Path, repr: &FileRepr) -> Result<(), AuthError> {
    let err = |source| AuthError::Write {
        path: path.to_path_buf(),
        source,
    };
    let body = toml::to_string(repr).map_err(|e| err(std::io::Error::other(e.to_string())))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let text = format!("{HEADER}{body}");
    crate::files::write_atomic(path, text.as_bytes(), 0o600).map_err(err)
}

/// What [`add`] adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewEntry {
    /// A user with a bearer token.
    User {
        /// The user's name (becomes the owner of their jobs).
        name: String,
        /// [`Role::Admin`] or [`Role::User`].
        role: Role,
    },
    /// A worker join token.
    Worker {
        /// A label for the token (a node pool, a cluster).
        name: String,
    },
}

/// Adds a user or a join token to the auth file (creating it), and returns the new token:
/// the only time it is ever shown.
pub fn add(path: &Path, entry: &NewEntry) -> Result<String, AuthError> {
    let mut repr = read_or_empty(path)?;
    let bad = |reason| AuthError::BadInput {
        field: "name",
        reason,
    };
    let exists = |kind, name: &str| AuthError::Exists {
        kind,
        name: name.to_string(),
        path: path.to_path_buf(),
    };
    let token = match entry {
        NewEntry::User { name, role } => {
            check_name(name).map_err(bad)?;
            if *role == Role::Worker {
                return Err(AuthError::BadInput {
                    field: "role",
                    reason: "a user's role is admin or user".into(),
                });
            }
            if repr.users.iter().any(|u| u.name == *name) {
                return Err(exists("user", name));
            }
            let token = token::generate(token::USER_PREFIX)?;
            repr.users.push(UserRepr {
                name: name.clone(),
                role: role.as_str().to_string(),
                token_sha256: TokenHash::of(&token).to_hex(),
            });
            token
        }
        NewEntry::Worker { name } => {
            check_name(name).map_err(bad)?;
            if repr.workers.iter().any(|w| w.name == *name) {
                return Err(exists("worker", name));
            }
            let token = token::generate(token::WORKER_PREFIX)?;
            repr.workers.push(WorkerRepr {
                name: name.clone(),
                token_sha256: TokenHash::of(&token).to_hex(),
            });
            token
        }
    };
    write(path, &repr)?;
    Ok(token)
}

/// Removes the user and/or join token called `name` (revoking its token once the
/// coordinator reloads the file).
pub fn remove(path: &Path, name: &str) -> Result<(), AuthError> {
    let mut repr = read(path)?;
    let before = repr.users.len() + repr.workers.len();
    repr.users.retain(|u| u.name != name);
    repr.workers.retain(|w| w.name != name);
    if repr.users.len() + repr.workers.len() == before {
        return Err(AuthError::NotFound {
            name: name.to_string(),
            path: path.to_path_buf(),
        });
    }
    write(path, &repr)
}

/// The entries of the auth file: name and role, never the hashes.
pub fn list(path: &Path) -> Result<Vec<Principal>, AuthError> {
    let creds = Credentials::load(path)?;
    Ok(creds.entries.into_iter().map(|(_, p)| p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_tokens_authenticate_with_their_role_and_only_hashes_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        let admin = NewEntry::User {
            name: "alice".into(),
            role: Role::Admin,
        };
        let a = add(&path, &admin).unwrap();
        let b = add(
            &path,
            &NewEntry::User {
                name: "bob".into(),
                role: Role::User,
            },
        )
        .unwrap();
        let w = add(
            &path,
            &NewEntry::Worker {
                name: "pool-1".into(),
            },
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        for t in [&a, &b, &w] {
            assert!(!text.contains(t.as_str()), "a token was stored in clear");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let creds = Credentials::load(&path).unwrap();
        assert_eq!(creds.counts(), (2, 1));
        assert_eq!(creds.authenticate(&a).unwrap().role, Role::Admin);
        assert_eq!(creds.authenticate(&b).unwrap().name, "bob");
        assert_eq!(creds.authenticate(&w).unwrap().role, Role::Worker);
        assert!(creds.authenticate("tyu_wrong").is_none());
        assert!(creds.authenticate("").is_none());

        assert!(matches!(add(&path, &admin), Err(AuthError::Exists { .. })));
        remove(&path, "bob").unwrap();
        let creds = Credentials::load(&path).unwrap();
        assert!(creds.authenticate(&b).is_none());
        assert!(creds.authenticate(&a).is_some());
        assert!(matches!(
            remove(&path, "bob"),
            Err(AuthError::NotFound { .. })
        ));
        let names: Vec<String> = list(&path).unwrap().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["alice", "pool-1"]);
    }

    #[test]
    fn invalid_entries_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        let good = "a".repeat(64);
        for (text, field) in [
            (
                format!("[[users]]\nname = \"x\"\nrole = \"root\"\ntoken_sha256 = \"{good}\"\n"),
                "users[0].role",
            ),
            (
                format!("[[users]]\nname = \"x y\"\nrole = \"user\"\ntoken_sha256 = \"{good}\"\n"),
                "users[0].name",
            ),
            (
                "[[workers]]\nname = \"w\"\ntoken_sha256 = \"abc\"\n".to_string(),
                "workers[0].token_sha256",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Credentials::load(&path).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        std::fs::write(&path, "[[users]]\nnme = 1\n").unwrap();
        let err = Credentials::load(&path).unwrap_err();
        assert!(matches!(err, AuthError::Parse { .. }), "{err}");
        assert!(matches!(
            add(
                &path,
                &NewEntry::User {
                    name: "bad name".into(),
                    role: Role::User
                }
            ),
            Err(AuthError::Parse { .. })
        ));
    }
}
