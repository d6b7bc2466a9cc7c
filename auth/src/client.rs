//! The client side of authentication: a bearer token on every call.

use std::path::Path;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

/// The metadata key of the bearer token.
pub const AUTHORIZATION: &str = "authorization";

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("{flag}: cannot read {path}: {source}")]
    Read {
        /// The setting that named the file.
        flag: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The token is empty or has characters a header cannot carry.
    #[error("{flag}: {reason}")]
    Invalid {
        /// Where the token came from.
        flag: &'static str,
        /// Why.
        reason: String,
    },
}

/// Reads a token from a file (surrounding whitespace dropped).
pub fn read_token_file(path: &Path, flag: &'static str) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(TokenError::Invalid {
            flag,
            reason: format!("{} is empty", path.display()),
        });
    }
    Ok(token)
}

/// The token a process presents: the first line of `file` when given (`flag` names it in
/// errors), else the environment variable `env` when set and not blank, else none.
pub fn token_from(
    file: Option<&Path>,
    flag: &'static str,
    env: &str,
) -> Result<Option<String>, TokenError> {
    if let Some(file) = file {
        return read_token_file(file, flag).map(Some);
    }
    Ok(std::env::var(env)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

/// Adds `authorization: Bearer <token>` to every request (nothing without a token).
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<set>)"
        } else {
            "BearerToken(<none>)"
        })
    }
}

impl BearerToken {
    /// The interceptor for `token` (`None`: calls go without one); `flag` names the
    /// source in errors.
    pub fn new(token: Option<&str>, flag: &'static str) -> Result<Self, TokenError> {
        let Some(token) = token.map(str::trim) else {
            return Ok(BearerToken(None));
        };
        if token.is_empty() {
            return Err(TokenError::Invalid {
                flag,
                reason: "empty token".into(),
            });
        }
        let mut value: MetadataValue<Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| TokenError::Invalid {
                    flag,
                    reason: "the token has characters an HTTP header cannot carry".into(),
                })?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }

    /// Whether a token is set.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        Ok(request)
    }
}

/// The token of an `authorization` header value: `Bearer <token>` (scheme case-insensitive).
pub fn parse_bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_carries_the_token() {
        let mut i = BearerToken::new(Some(" tyu_abc\n"), "TRAINYARD_TOKEN").unwrap();
        let req = i.call(tonic::Request::new(())).unwrap();
        let v = req.metadata().get(AUTHORIZATION).unwrap().to_str().unwrap();
        assert_eq!(parse_bearer(v), Some("tyu_abc"));
        assert_eq!(parse_bearer("bearer x"), Some("x"));
        assert_eq!(parse_bearer("Basic x"), None);
        assert_eq!(parse_bearer("Bearer "), None);
        let mut none = BearerToken::default();
        assert!(none
            .call(tonic::Request::new(()))
            .unwrap()
            .metadata()
            .get(AUTHORIZATION)
            .is_none());
        assert!(BearerToken::new(Some("a\u{7}b"), "x").is_err());
        assert!(BearerToken::new(Some("  "), "x").is_err());
    }
}
