//! Development certificate authority and certificates for `trainyard certs init`.
//!
//! [`init`] creates a self-signed CA and three leaf certificates signed by it:
//!
//! | file                                    | purpose                                          |
//! |-----------------------------------------|--------------------------------------------------|
//! | `ca.pem`, `ca-key.pem`                  | the development CA (trust anchor for everyone)    |
//! | `coordinator.pem`, `coordinator-key.pem`| coordinator gRPC server (server auth, host SANs)  |
//! | `worker.pem`, `worker-key.pem`          | worker client identity (client auth)              |
//! | `client.pem`, `client-key.pem`          | CLI client identity (client auth)                 |
//!
//! All files are PEM. Keys are ECDSA P-256 in PKCS#8. Every file is written to a temporary
//! file in the target folder and then renamed into place, so a crash never leaves a
//! half-written file behind; on unix, key files get mode `0600` and certificates `0644`.
//!
//! These certificates are meant for development and test clusters, not for production PKI.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate.
pub const CA_CERT: &str = "ca.pem";
/// File name of the CA private key.
pub const CA_KEY: &str = "ca-key.pem";
/// File name of the coordinator (server) certificate.
pub const COORDINATOR_CERT: &str = "coordinator.pem";
/// File name of the coordinator (server) private key.
pub const COORDINATOR_KEY: &str = "coordinator-key.pem";
/// File name of the worker (client) certificate.
pub const WORKER_CERT: &str = "worker.pem";
/// File name of the worker (client) private key.
pub const WORKER_KEY: &str = "worker-key.pem";
/// File name of the CLI client certificate.
pub const CLIENT_CERT: &str = "client.pem";
/// File name of the CLI client private key.
pub const CLIENT_KEY: &str = "client-key.pem";

/// Every file [`init`] writes, in the order it writes them.
pub const ALL_FILES: [&str; 8] = [
    CA_CERT,
    CA_KEY,
    COORDINATOR_CERT,
    COORDINATOR_KEY,
    WORKER_CERT,
    WORKER_KEY,
    CLIENT_CERT,
    CLIENT_KEY,
];

/// Common name of the development CA.
pub const CA_COMMON_NAME: &str = "Trainyard development CA";
/// Common name of the coordinator's server certificate.
pub const COORDINATOR_COMMON_NAME: &str = "trainyard-coordinator";
/// Common name of the worker's client certificate.
pub const WORKER_COMMON_NAME: &str = "trainyard-worker";
/// Common name of the CLI's client certificate.
pub const CLIENT_COMMON_NAME: &str = "trainyard-client";

/// Hosts always included in the coordinator certificate.
pub const DEFAULT_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Multiplier applied to [`InitOptions::days`] for the CA's validity.
const CA_VALIDITY_FACTOR: i64 = 10;

/// How far in the past `notBefore` is set, to tolerate small clock skew between machines.
const BACKDATE: Duration = Duration::hours(1);

/// Errors from generating or writing the development certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// The output folder could not be created.
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        /// The folder that could not be created.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// An output file already exists and `force` was not set; nothing was written.
    #[error("refusing to overwrite {}: file already exists (use force to overwrite)", path.display())]
    AlreadyExists {
        /// The first existing file found.
        path: PathBuf,
    },
    /// Checking whether an output file exists failed.
    #[error("cannot check {}: {source}", path.display())]
    Stat {
        /// The file that could not be inspected.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing (or renaming into place) an output file failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The destination file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// A value in [`InitOptions::hosts`] is neither an IP address nor a valid DNS name.
    #[error("invalid host {host:?}: {reason}")]
    InvalidHost {
        /// The rejected value, exactly as given.
        host: String,
        /// Why it was rejected.
        reason: String,
    },
    /// [`InitOptions::days`] is zero or too large to represent.
    #[error("invalid validity of {days} days: {reason}")]
    InvalidDays {
        /// The rejected value.
        days: u32,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Key or certificate generation failed inside `rcgen`.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being generated, e.g. "coordinator certificate".
        what: &'static str,
        /// The underlying `rcgen` error.
        #[source]
        source: rcgen::Error,
    },
}

/// What `init` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The folder the files were written to (as given in [`InitOptions::dir`]).
    pub dir: PathBuf,
    /// Full paths of the written files, in write order (see [`ALL_FILES`]).
    pub files: Vec<PathBuf>,
}

/// Options for [`init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    /// Folder to write into (created with parents if missing).
    pub dir: PathBuf,
    /// DNS names and/or IP addresses the coordinator's server certificate is valid for; `localhost`, `127.0.0.1` and `::1` are always added.
    pub hosts: Vec<String>,
    /// Overwrite existing files (otherwise: error naming the first existing file, nothing written).
    pub force: bool,
    /// Validity in days of the leaf certificates (the CA gets 10x).
    pub days: u32,
}

/// Generates a development CA plus coordinator, worker and client certificates and writes
/// them as PEM files into `opts.dir`.
///
/// All hosts are validated and all keys and certificates are generated in memory before
/// anything touches the disk. Without `opts.force`, if any of the target files already
/// exists, [`CertsError::AlreadyExists`] names the first one and nothing is written; if a
/// write fails part-way, the files this call already created are removed again.
pub fn init(opts: &InitOptions) -> Result<Generated, CertsError> {
    let sans = coordinator_sans(&opts.hosts)?;
    let validity = Validity::new(opts.days)?;
    let bundle = generate(&sans, &validity)?;

    let dir = opts.dir.as_path();
    fs::create_dir_all(dir).map_err(|source| CertsError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;

    if !opts.force {
        for name in ALL_FILES {
            let path = dir.join(name);
            match fs::symlink_metadata(&path) {
                Ok(_) => return Err(CertsError::AlreadyExists { path }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(CertsError::Stat { path, source }),
            }
        }
    }

    let mut written = Vec::with_capacity(ALL_FILES.len());
    for (name, contents, kind) in bundle.files() {
        let path = dir.join(name);
        if let Err(err) = write_atomic(&path, contents.as_bytes(), kind) {
            if !opts.force {
                // Every file written so far was new: undo them so no partial set is left.
                for done in &written {
                    let _ = fs::remove_file(done);
                }
            }
            return Err(err);
        }
        written.push(path);
    }
    sync_dir(dir);

    Ok(Generated {
        dir: dir.to_path_buf(),
        files: written,
    })
}

/// Parses the coordinator hosts (plus [`DEFAULT_HOSTS`]) into subject alternative names,
/// removing duplicates while keeping the order (defaults first).
fn coordinator_sans(hosts: &[String]) -> Result<Vec<SanType>, CertsError> {
    let mut seen = HashSet::new();
    let mut sans = Vec::new();
    let all = DEFAULT_HOSTS
        .iter()
        .copied()
        .chain(hosts.iter().map(String::as_str));
    for host in all {
        let san = parse_host(host)?;
        if seen.insert(san.clone()) {
            sans.push(san);
        }
    }
    Ok(sans)
}

/// Parses one host: an IP address (IPv6 optionally in brackets) becomes an IP SAN,
/// anything else must be a valid DNS name (a leading `*.` wildcard label is allowed).
fn parse_host(host: &str) -> Result<SanType, CertsError> {
    let invalid = |reason: String| CertsError::InvalidHost {
        host: host.to_string(),
        reason,
    };
    if host.is_empty() {
        return Err(invalid("empty host name".into()));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match inner.parse::<std::net::Ipv6Addr>() {
            Ok(ip) => Ok(SanType::IpAddress(IpAddr::V6(ip))),
            Err(_) => Err(invalid("not a valid IPv6 address inside brackets".into())),
        };
    }
    let name = validate_dns_name(host).map_err(invalid)?;
    let ia5 = rcgen::string::Ia5String::try_from(name).map_err(|e| invalid(e.to_string()))?;
    Ok(SanType::DnsName(ia5))
}

/// Checks `host` as a DNS name (RFC 1123 labels, optional leading `*` label, optional
/// trailing dot) and returns it lower-cased without the trailing dot.
fn validate_dns_name(host: &str) -> Result<String, String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err("empty DNS name".into());
    }
    if name.len() > 253 {
        return Err(format!(
            "DNS name is {} characters long, at most 253 allowed",
            name.len()
        ));
    }
    let labels: Vec<&str> = name.split('.').collect();
    for (i, label) in labels.iter().enumerate() {
        if i == 0 && *label == "*" {
            if labels.len() < 3 {
                return Err("a wildcard needs at least two labels after `*.`".into());
            }
            continue;
        }
        if label.is_empty() {
            return Err("empty label (consecutive, leading or trailing dots)".into());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!(
                "character {c:?} is not allowed (only letters, digits, '-' and '.'; \
                 IP addresses must be valid IPv4/IPv6)"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    if labels
        .last()
        .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
    {
        return Err("looks like an IP address but is not a valid one".into());
    }
    Ok(name.to_ascii_lowercase())
}

/// `notBefore` / `notAfter` for the CA and the leaf certificates.
struct Validity {
    not_before: OffsetDateTime,
    leaf_not_after: OffsetDateTime,
    ca_not_after: OffsetDateTime,
}

impl Validity {
    fn new(days: u32) -> Result<Self, CertsError> {
        let invalid = |reason| CertsError::InvalidDays { days, reason };
        if days == 0 {
            return Err(invalid("must be at least 1"));
        }
        let now = OffsetDateTime::now_utc();
        let after = |d: i64| {
            now.checked_add(Duration::days(d))
                .filter(|t| t.year() <= 9999)
                .ok_or_else(|| invalid("expiry would be after the year 9999"))
        };
        Ok(Validity {
            not_before: now - BACKDATE,
            leaf_not_after: after(i64::from(days))?,
            ca_not_after: after(i64::from(days) * CA_VALIDITY_FACTOR)?,
        })
    }
}

/// Whether a file is a private key (0600) or a certificate (0644).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileKind {
    Cert,
    Key,
}

impl FileKind {
    fn mode(self) -> u32 {
        match self {
            FileKind::Cert => 0o644,
            FileKind::Key => 0o600,
        }
    }
}

/// A PEM certificate and its PEM private key.
struct Pair {
    cert: String,
    key: String,
}

/// Everything [`init`] writes, generated in memory.
struct Bundle {
    ca: Pair,
    coordinator: Pair,
    worker: Pair,
    client: Pair,
}

impl Bundle {
    fn files(&self) -> [(&'static str, &str, FileKind); 8] {
        [
            (CA_CERT, &self.ca.cert, FileKind::Cert),
            (CA_KEY, &self.ca.key, FileKind::Key),
            (COORDINATOR_CERT, &self.coordinator.cert, FileKind::Cert),
            (COORDINATOR_KEY, &self.coordinator.key, FileKind::Key),
            (WORKER_CERT, &self.worker.cert, FileKind::Cert),
            (WORKER_KEY, &self.worker.key, FileKind::Key),
            (CLIENT_CERT, &self.client.cert, FileKind::Cert),
            (CLIENT_KEY, &self.client.key, FileKind::Key),
        ]
    }
}

fn gen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> CertsError {
    move |source| CertsError::Generate { what, source }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Trainyard");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn generate(sans: &[SanType], validity: &Validity) -> Result<Bundle, CertsError> {
    let ca_key = KeyPair::generate().map_err(gen_err("CA key"))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = distinguished_name(CA_COMMON_NAME);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = validity.not_before;
    ca_params.not_after = validity.ca_not_after;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(gen_err("CA certificate"))?;
    let ca = Pair {
        cert: ca_cert.pem(),
        key: ca_key.serialize_pem(),
    };
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |common_name: &str,
                eku: ExtendedKeyUsagePurpose,
                sans: Vec<SanType>,
                what_key: &'static str,
                what_cert: &'static str|
     -> Result<Pair, CertsError> {
        let key = KeyPair::generate().map_err(gen_err(what_key))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.leaf_not_after;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(gen_err(what_cert))?;
        Ok(Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    };

    let coordinator = leaf(
        COORDINATOR_COMMON_NAME,
        ExtendedKeyUsagePurpose::ServerAuth,
        sans.to_vec(),
        "coordinator key",
        "coordinator certificate",
    )?;
    let worker = leaf(
        WORKER_COMMON_NAME,
        ExtendedKeyUsagePurpose::ClientAuth,
        Vec::new(),
        "worker key",
        "worker certificate",
    )?;
    let client = leaf(
        CLIENT_COMMON_NAME,
        ExtendedKeyUsagePurpose::ClientAuth,
        Vec::new(),
        "client key",
        "client certificate",
    )?;

    Ok(Bundle {
        ca,
        coordinator,
        worker,
        client,
    })
}

/// Writes `contents` to `path` atomically with the permissions of `kind`.
fn write_atomic(path: &Path, contents: &[u8], kind: FileKind) -> Result<(), CertsError> {
    crate::files::write_atomic(path, contents, kind.mode()).map_err(|source| CertsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Best effort: makes the renames durable by syncing the folder (unix only).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::crypto::CryptoProvider;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{CertificateError, RootCertStore};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use std::sync::Arc;

    fn opts(dir: &Path, hosts: &[&str]) -> InitOptions {
        InitOptions {
            dir: dir.to_path_buf(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            force: false,
            days: 30,
        }
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn cert(dir: &Path, name: &str) -> CertificateDer<'static> {
        let pem = fs::read(dir.join(name)).unwrap();
        CertificateDer::from_pem_slice(&pem).unwrap()
    }

    fn roots(dir: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(cert(dir, CA_CERT)).unwrap();
        Arc::new(roots)
    }

    fn verify_server(dir: &Path, cert_name: &str, host: &str) -> Result<(), rustls::Error> {
        let verifier = WebPkiServerVerifier::builder_with_provider(roots(dir), provider())
            .build()
            .unwrap();
        let name = ServerName::try_from(host.to_string()).unwrap();
        verifier
            .verify_server_cert(&cert(dir, cert_name), &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn verify_client(dir: &Path, cert_name: &str) -> Result<(), rustls::Error> {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir), provider())
            .build()
            .unwrap();
        verifier
            .verify_client_cert(&cert(dir, cert_name), &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn writes_all_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/certs");
        let generated = init(&opts(&dir, &[])).unwrap();
        assert_eq!(generated.dir, dir);
        let expected: Vec<PathBuf> = ALL_FILES.iter().map(|n| dir.join(n)).collect();
        assert_eq!(generated.files, expected);
        let mut on_disk: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        on_disk.sort();
        let mut want: Vec<String> = ALL_FILES.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(on_disk, want, "no temp files may be left behind");
        for f in &generated.files {
            let text = fs::read_to_string(f).unwrap();
            assert!(
                text.starts_with("-----BEGIN "),
                "{} is not PEM",
                f.display()
            );
        }
    }

    #[test]
    fn keys_load_in_rustls() {
        let tmp = tempfile::tempdir().unwrap();
        init(&opts(tmp.path(), &[])).unwrap();
        let provider = provider();
        for name in [CA_KEY, COORDINATOR_KEY, WORKER_KEY, CLIENT_KEY] {
            let pem = fs::read(tmp.path().join(name)).unwrap();
            let key = PrivateKeyDer::from_pem_slice(&pem).unwrap();
            provider.key_provider.load_private_key(key).unwrap();
        }
    }

    #[test]
    fn server_cert_verifies_for_listed_hosts_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init(&opts(
            dir,
            &["coord.example.internal", "10.1.2.3", "[fd00::7]"],
        ))
        .unwrap();
        for host in [
            "localhost",
            "127.0.0.1",
            "::1",
            "coord.example.internal",
            "10.1.2.3",
            "fd00::7",
        ] {
            verify_server(dir, COORDINATOR_CERT, host)
                .unwrap_or_else(|e| panic!("{host} should verify: {e}"));
        }
        for host in ["other.example.internal", "10.1.2.4", "example.internal"] {
            match verify_server(dir, COORDINATOR_CERT, host) {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => {}
                other => panic!("{host} must not verify, got {other:?}"),
            }
        }
    }

    fn assert_wrong_purpose(result: Result<(), rustls::Error>) {
        match result {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
            )) => {}
            other => panic!("expected an extended key usage error, got {other:?}"),
        }
    }

    #[test]
    fn client_certs_verify_as_clients_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init(&opts(dir, &[])).unwrap();
        verify_client(dir, WORKER_CERT).unwrap();
        verify_client(dir, CLIENT_CERT).unwrap();
        // Wrong extended key usage in both directions.
        assert_wrong_purpose(verify_client(dir, COORDINATOR_CERT));
        assert_wrong_purpose(verify_server(dir, WORKER_CERT, "localhost"));
        assert_wrong_purpose(verify_server(dir, CLIENT_CERT, "localhost"));
    }

    #[test]
    fn certs_from_another_ca_do_not_verify() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init(&opts(a.path(), &[])).unwrap();
        init(&opts(b.path(), &[])).unwrap();
        fs::copy(a.path().join(CA_CERT), b.path().join(CA_CERT)).unwrap();
        assert!(verify_server(b.path(), COORDINATOR_CERT, "localhost").is_err());
        assert!(verify_client(b.path(), WORKER_CERT).is_err());
    }

    #[test]
    fn refuses_to_overwrite_without_force_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let existing = dir.join(WORKER_CERT);
        fs::write(&existing, "keep me").unwrap();
        let err = init(&opts(dir, &[])).unwrap_err();
        match &err {
            CertsError::AlreadyExists { path } => assert_eq!(path, &existing),
            other => panic!("unexpected error: {other}"),
        }
        assert!(err.to_string().contains(&existing.display().to_string()));
        assert_eq!(fs::read_to_string(&existing).unwrap(), "keep me");
        let entries: Vec<_> = fs::read_dir(dir).unwrap().collect();
        assert_eq!(entries.len(), 1, "nothing else may be written");
    }

    #[test]
    fn force_overwrites() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init(&opts(dir, &[])).unwrap();
        let old_ca = fs::read(dir.join(CA_CERT)).unwrap();
        let mut o = opts(dir, &[]);
        o.force = true;
        init(&o).unwrap();
        assert_ne!(fs::read(dir.join(CA_CERT)).unwrap(), old_ca);
        verify_server(dir, COORDINATOR_CERT, "localhost").unwrap();
        verify_client(dir, WORKER_CERT).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn file_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        init(&opts(tmp.path(), &[])).unwrap();
        for name in ALL_FILES {
            let mode = fs::metadata(tmp.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            let want = if name.ends_with("-key.pem") {
                0o600
            } else {
                0o644
            };
            assert_eq!(mode, want, "{name} has mode {mode:o}");
        }
    }

    #[test]
    fn bad_hosts_are_rejected_by_name() {
        for bad in [
            "bad host!",
            "",
            "a..b",
            "-lead.example",
            "under_score.example",
            "[not-ip]",
            "1.2.3.999",
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("out");
            let err = init(&opts(&dir, &["ok.example", bad])).unwrap_err();
            match &err {
                CertsError::InvalidHost { host, .. } => assert_eq!(host, bad),
                other => panic!("{bad:?}: unexpected error: {other}"),
            }
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "message should name {bad:?}: {err}"
            );
            assert!(!dir.exists(), "{bad:?}: nothing may be created");
        }
    }

    #[test]
    fn zero_days_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let mut o = opts(tmp.path(), &[]);
        o.days = 0;
        assert!(matches!(
            init(&o),
            Err(CertsError::InvalidDays { days: 0, .. })
        ));
        o.days = u32::MAX;
        assert!(matches!(init(&o), Err(CertsError::InvalidDays { .. })));
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn hosts_are_deduplicated_and_typed() {
        let sans =
            coordinator_sans(&["LOCALHOST".into(), "::1".into(), "Coord.Example.".into()]).unwrap();
        assert_eq!(
            sans,
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
                SanType::IpAddress("::1".parse().unwrap()),
                SanType::DnsName("coord.example".try_into().unwrap()),
            ]
        );
    }
}
