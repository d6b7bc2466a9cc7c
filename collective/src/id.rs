//! The NCCL unique id as bytes, for a rendezvous to carry from rank 0 to the other ranks.

use crate::CollectiveError;

/// Size of an NCCL unique id (`ncclUniqueId`), in bytes.
pub const NCCL_ID_BYTES: usize = 128;

/// The unique id of one NCCL communicator: rank 0 creates it (`nccl::Nccl::create_id`, feature
/// `cuda`), publishes [`NcclId::as_bytes`] or [`NcclId::to_hex`] through the rendezvous, and
/// every other rank rebuilds it with [`NcclId::from_bytes`] or [`NcclId::from_hex`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; NCCL_ID_BYTES]);

impl NcclId {
    /// The id from its 128 bytes; any other length is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CollectiveError> {
        let arr: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| {
            CollectiveError::InvalidId(format!("{} bytes, expected {NCCL_ID_BYTES}", bytes.len()))
        })?;
        Ok(Self(arr))
    }

    /// The id from 256 hex digits (as written by [`NcclId::to_hex`]).
    pub fn from_hex(text: &str) -> Result<Self, CollectiveError> {
        let bytes = hex::decode(text.trim())
            .map_err(|e| CollectiveError::InvalidId(format!("not hex: {e}")))?;
        Self::from_bytes(&bytes)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; NCCL_ID_BYTES] {
        &self.0
    }

    /// The id as 256 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The whole id is a connection secret of sorts and long: show a prefix only.
        write!(f, "NcclId({}…)", &self.to_hex()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_hex_round_trip() {
        let bytes: Vec<u8> = (0..NCCL_ID_BYTES).map(|i| (i * 7 % 256) as u8).collect();
        let id = NcclId::from_bytes(&bytes).unwrap();
        assert_eq!(id.as_bytes().as_slice(), bytes.as_slice());
        let hex = id.to_hex();
        assert_eq!(hex.len(), 2 * NCCL_ID_BYTES);
        assert_eq!(NcclId::from_hex(&format!(" {hex}\n")).unwrap(), id);
        assert!(format!("{id:?}").starts_with("NcclId(00070e15"));
    }

    #[test]
    fn wrong_lengths_and_bad_hex_are_errors() {
        let err = NcclId::from_bytes(&[0u8; 127]).unwrap_err().to_string();
        assert!(err.contains("127 bytes, expected 128"), "{err}");
        assert!(NcclId::from_bytes(&[0u8; 129]).is_err());
        assert!(NcclId::from_hex("zz").is_err());
        assert!(NcclId::from_hex(&"00".repeat(64)).is_err());
    }
}
