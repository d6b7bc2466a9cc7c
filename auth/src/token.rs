//! Bearer tokens (users) and join tokens (workers).
//!
//! A token is a prefix saying what it is for (`tyu_` user, `tyw_` worker join) and 32
//! random bytes from the operating system, in hex: 256 bits of entropy, so a plain
//! SHA-256 of it is a safe thing to store (slow password hashes exist for low-entropy
//! secrets people choose; these are not). The coordinator keeps only the hashes and
//! compares a presented token's hash against every stored one in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The prefix of user bearer tokens.
pub const USER_PREFIX: &str = "tyu_";
/// The prefix of worker join tokens.
pub const WORKER_PREFIX: &str = "tyw_";

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw random bytes from the operating system: {0}")]
pub struct RandomError(String);

/// A new random token with `prefix` ([`USER_PREFIX`] or [`WORKER_PREFIX`]).
pub fn generate(prefix: &str) -> Result<String, RandomError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| RandomError(e.to_string()))?;
    Ok(format!("{prefix}{}", hex::encode(bytes)))
}

/// The SHA-256 of a token: what the auth file stores.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A hash is not a secret, but there is no reason to print it either.
        f.write_str("TokenHash(..)")
    }
}

impl TokenHash {
    /// The hash of `token` (surrounding whitespace ignored, as when read from a file).
    pub fn of(token: &str) -> Self {
        TokenHash(Sha256::digest(token.trim().as_bytes()).into())
    }

    /// Parses the 64 hex digits of a stored hash.
    pub fn parse_hex(s: &str) -> Result<Self, String> {
        let bytes = hex::decode(s.trim()).map_err(|e| format!("not hex: {e}"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("{} bytes, a SHA-256 has 32", b.len()))?;
        Ok(TokenHash(arr))
    }

    /// The hash as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Constant-time equality (the time taken does not depend on where the hashes differ).
    pub fn ct_eq(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_hash_stably() {
        let a = generate(USER_PREFIX).unwrap();
        let b = generate(USER_PREFIX).unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("tyu_") && a.len() == 4 + 64, "{a}");
        assert!(TokenHash::of(&a).ct_eq(&TokenHash::of(&format!(" {a}\n"))));
        assert!(!TokenHash::of(&a).ct_eq(&TokenHash::of(&b)));
        let hex = TokenHash::of(&a).to_hex();
        assert!(TokenHash::parse_hex(&hex)
            .unwrap()
            .ct_eq(&TokenHash::of(&a)));
    }

    #[test]
    fn bad_hashes_are_refused_with_the_reason() {
        assert!(TokenHash::parse_hex("zz").unwrap_err().contains("not hex"));
        assert!(TokenHash::parse_hex("abcd")
            .unwrap_err()
            .contains("2 bytes"));
    }
}
