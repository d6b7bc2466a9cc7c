//! IDX files (the MNIST format), optionally gzipped: magic check, dimensions, clear errors.
//!
//! Format: two zero bytes, a type byte (0x08 = u8), the number of dimensions, then one
//! big-endian u32 per dimension, then the data.

use std::io::Read;

/// Errors reading an IDX file.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    /// Gzip decompression failed.
    #[error("{name}: cannot decompress: {source}")]
    Gzip {
        /// What was being read.
        name: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A data file could not be read.
    #[error("{name}: cannot read: {source}")]
    Read {
        /// The file.
        name: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The header is malformed.
    #[error("{name}: bad IDX header: {reason}")]
    Header {
        /// What was being read.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The data length does not match the dimensions.
    #[error("{name}: expected {expected} data bytes for dims {dims:?}, found {found}")]
    Length {
        /// What was being read.
        name: String,
        /// Dimensions from the header.
        dims: Vec<usize>,
        /// Bytes the dimensions imply.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// The dimensions are not what the caller needs.
    #[error("{name}: expected dims {expected}, found {found:?}")]
    Dims {
        /// What was being read.
        name: String,
        /// A description of what was expected.
        expected: String,
        /// Dimensions found.
        found: Vec<usize>,
    },
}

/// A decoded IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions, outermost first.
    pub dims: Vec<usize>,
    /// Row-major data.
    pub data: Vec<u8>,
}

/// Decompresses `bytes` if they start with the gzip magic, else returns them as is.
pub fn maybe_gunzip(name: &str, bytes: &[u8]) -> Result<Vec<u8>, IdxError> {
    if bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|source| IdxError::Gzip {
                name: name.to_string(),
                source,
            })?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Parses an (optionally gzipped) IDX file of u8 values. `name` appears in errors.
pub fn parse_idx(name: &str, bytes: &[u8]) -> Result<IdxArray, IdxError> {
    let raw = maybe_gunzip(name, bytes)?;
    let header = |reason: String| IdxError::Header {
        name: name.to_string(),
        reason,
    };
    if raw.len() < 4 {
        return Err(header(format!("only {} bytes", raw.len())));
    }
    if raw[0] != 0 || raw[1] != 0 {
        return Err(header(format!(
            "magic must start with two zero bytes, found {:02x} {:02x}",
            raw[0], raw[1]
        )));
    }
    if raw[2] != 0x08 {
        return Err(header(format!(
            "element type 0x{:02x} is not supported (only 0x08 = u8)",
            raw[2]
        )));
    }
    let ndims = raw[3] as usize;
    if ndims == 0 {
        return Err(header("zero dimensions".to_string()));
    }
    let data_start = 4 + 4 * ndims;
    if raw.len() < data_start {
        return Err(header(format!(
            "{ndims} dimensions need a {data_start}-byte header, file has {} bytes",
            raw.len()
        )));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]) as usize
        })
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| header(format!("dims {dims:?} overflow")))?;
    let found = raw.len() - data_start;
    if found != expected {
        return Err(IdxError::Length {
            name: name.to_string(),
            dims,
            expected,
            found,
        });
    }
    Ok(IdxArray {
        dims,
        data: raw[data_start..].to_vec(),
    })
}

/// Parses a labels file: one dimension `[n]`, every label `< classes`.
pub fn parse_labels(name: &str, bytes: &[u8], classes: u8) -> Result<Vec<u8>, IdxError> {
    let arr = parse_idx(name, bytes)?;
    if arr.dims.len() != 1 {
        return Err(IdxError::Dims {
            name: name.to_string(),
            expected: "[n]".to_string(),
            found: arr.dims,
        });
    }
    if let Some(bad) = arr.data.iter().find(|l| **l >= classes) {
        return Err(IdxError::Header {
            name: name.to_string(),
            reason: format!("label {bad} is not below {classes}"),
        });
    }
    Ok(arr.data)
}

/// Parses an images file: three dimensions `[n, rows, cols]` (rows/cols as given).
pub fn parse_images(
    name: &str,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<IdxArray, IdxError> {
    let arr = parse_idx(name, bytes)?;
    if arr.dims.len() != 3 || arr.dims[1] != rows || arr.dims[2] != cols {
        return Err(IdxError::Dims {
            name: name.to_string(),
            expected: format!("[n, {rows}, {cols}]"),
            found: arr.dims,
        });
    }
    Ok(arr)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Builds a u8 IDX buffer.
    pub(crate) fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn parses_plain_and_gzipped() {
        let data: Vec<u8> = (0..12).collect();
        let raw = idx_bytes(&[3, 2, 2], &data);
        for bytes in [raw.clone(), gzip(&raw)] {
            let arr = parse_images("x", &bytes, 2, 2).unwrap();
            assert_eq!(arr.dims, vec![3, 2, 2]);
            assert_eq!(arr.data, data);
        }
        let labels = parse_labels("l", &gzip(&idx_bytes(&[3], &[0, 9, 4])), 10).unwrap();
        assert_eq!(labels, vec![0, 9, 4]);
    }

    #[test]
    fn rejects_bad_files_with_clear_errors() {
        let msg = |r: Result<IdxArray, IdxError>| r.unwrap_err().to_string();
        assert!(msg(parse_idx("f", &[0, 0])).contains("only 2 bytes"));
        assert!(msg(parse_idx("f", &[1, 0, 8, 1, 0, 0, 0, 0])).contains("magic"));
        assert!(msg(parse_idx("f", &[0, 0, 0x0d, 1, 0, 0, 0, 0])).contains("0x0d"));
        let short = idx_bytes(&[2, 2, 2], &[0; 7]);
        let e = msg(parse_idx("f", &short));
        assert!(e.contains("expected 8") && e.contains("found 7"), "{e}");
        let wrong = idx_bytes(&[1, 3, 2], &[0; 6]);
        assert!(msg(parse_images("imgs", &wrong, 2, 2)).contains("imgs: expected dims"));
        let e = parse_labels("l", &idx_bytes(&[2], &[1, 10]), 10).unwrap_err();
        assert!(e.to_string().contains("label 10"), "{e}");
        let e = parse_idx("g", &[0x1f, 0x8b, 1, 2, 3]).unwrap_err();
        assert!(e.to_string().contains("g: cannot decompress"), "{e}");
    }
}
