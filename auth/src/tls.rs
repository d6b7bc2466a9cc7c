//! TLS settings for the gRPC server and its clients, from PEM files.
//!
//! The server presents a certificate and key; with a client CA it also asks clients for a
//! certificate (mutual TLS) and verifies any it gets against that CA. Whether a client
//! *must* present one is decided per service by the coordinator (workers must, users may
//! not have one). Clients trust the CA file they are given, or the public web roots.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{flag}: cannot read {path}: {source}")]
    Read {
        /// The setting that named the file, e.g. `--tls-cert`.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not what the setting needs.
    #[error("{flag}: {path} {reason}")]
    Content {
        /// The setting that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A certificate was given without its key, or the other way round.
    #[error("{0}")]
    Pair(String),
    /// rustls refused the certificate or key.
    #[error("TLS configuration refused: {0}")]
    Rejected(String),
}

/// Reads a PEM file that must hold a block whose label contains `label`.
fn read_pem(path: &Path, flag: &'static str, label: &str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let has_block = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.contains(label));
    if !has_block {
        return Err(TlsError::Content {
            flag,
            path: path.to_path_buf(),
            reason: format!("holds no PEM block of type {label:?}"),
        });
    }
    Ok(bytes)
}

/// The server side: certificate, key and, for mutual TLS, the CA of client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The server's certificate chain (PEM), `--tls-cert`.
    pub cert: PathBuf,
    /// Its private key (PEM), `--tls-key`.
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to, `--tls-client-ca`.
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// Reads the files into a server TLS configuration (client certificates are
    /// requested and verified when [`ServerTlsFiles::client_ca`] is set, optional at the
    /// TLS layer).
    pub fn load(&self) -> Result<ServerTlsConfig, TlsError> {
        let cert = read_pem(&self.cert, "--tls-cert", "CERTIFICATE")?;
        let key = read_pem(&self.key, "--tls-key", "PRIVATE KEY")?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.client_ca {
            let ca = read_pem(ca, "--tls-client-ca", "CERTIFICATE")?;
            config = config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        Ok(config)
    }
}

/// The client side: which CA to trust and, for mutual TLS, the client's certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CA certificate (PEM) to trust for the coordinator's certificate, `--tls-ca`; without
    /// it, the public web roots.
    pub ca: Option<PathBuf>,
    /// The client's certificate (PEM), `--tls-cert`.
    pub cert: Option<PathBuf>,
    /// Its key (PEM), `--tls-key`.
    pub key: Option<PathBuf>,
    /// The name to verify the coordinator's certificate for, instead of the host of the
    /// address dialled (`--tls-server-name`): for coordinators reached by pod IP, as
    /// after a follower's redirect in Kubernetes.
    pub server_name: Option<String>,
}

impl ClientTlsFiles {
    /// Whether any file is set (a reason to use TLS even for an `http://` address: an
    /// error, see [`check_scheme`]).
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.server_name.is_some()
    }

    /// Reads the files into a client TLS configuration.
    pub fn load(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut config = ClientTlsConfig::new();
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read_pem(
                ca,
                "--tls-ca",
                "CERTIFICATE",
            )?)),
            None => config.with_webpki_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let cert = read_pem(cert, "--tls-cert", "CERTIFICATE")?;
                let key = read_pem(key, "--tls-key", "PRIVATE KEY")?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(TlsError::Pair(
                    "--tls-key: missing (--tls-cert needs its key)".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(TlsError::Pair(
                    "--tls-cert: missing (--tls-key needs its certificate)".into(),
                ))
            }
        }
        Ok(config)
    }
}

/// Turns TLS on for an `https://` endpoint, with `config` (from [`ClientTlsFiles::load`])
/// or else trusting the public web roots; `http://` endpoints are returned as they are.
pub fn secure_endpoint(
    endpoint: Endpoint,
    url: &str,
    config: Option<&ClientTlsConfig>,
) -> Result<Endpoint, TlsError> {
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let config = config
        .cloned()
        .unwrap_or_else(|| ClientTlsConfig::new().with_webpki_roots());
    endpoint
        .tls_config(config)
        .map_err(|e| TlsError::Rejected(format!("{url}: {e}")))
}

/// Checks that TLS files are only given for `https://` coordinator addresses (a CA file
/// with an `http://` address is almost certainly a mistake that would send tokens in the
/// clear).
pub fn check_scheme(url: &str, files: &ClientTlsFiles) -> Result<(), TlsError> {
    if files.any() && url.starts_with("http://") {
        return Err(TlsError::Pair(format!(
            "--coordinator: {url} is plain http:// but TLS files were given; use https://"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_wrong_files_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("x.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let files = ServerTlsFiles {
            cert: dir.path().join("missing.pem"),
            key: not_pem.clone(),
            client_ca: None,
        };
        let err = files.load().unwrap_err().to_string();
        assert!(err.starts_with("--tls-cert: cannot read"), "{err}");
        let files = ClientTlsFiles {
            ca: Some(not_pem.clone()),
            ..Default::default()
        };
        let err = files.load().unwrap_err().to_string();
        assert!(
            err.contains("--tls-ca") && err.contains("CERTIFICATE"),
            "{err}"
        );
        let files = ClientTlsFiles {
            cert: Some(not_pem),
            ..Default::default()
        };
        assert!(files.load().unwrap_err().to_string().contains("--tls-key"));
        assert!(check_scheme("http://h:1", &files).is_err());
        assert!(check_scheme("https://h:1", &files).is_ok());
    }
}
