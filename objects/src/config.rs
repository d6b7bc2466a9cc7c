//! [`ObjectsConfig`]: where the objects live and how to reach them, parsed from a URL plus
//! this process's environment.
//!
//! | URL | store |
//! |---|---|
//! | `file:///abs/path` | a local folder (created if missing) |
//! | `s3://bucket[/prefix][?endpoint=…&region=…&path_style=…&allow_http=…&credentials_file=…&profile=…]` | AWS S3 or an S3-compatible server (Garage, MinIO, Ceph) |
//! | `gs://bucket[/prefix][?service_account=/path/key.json&endpoint=…&allow_http=…]` | Google Cloud Storage |
//! | `az://container[/prefix][?account=…&endpoint=…&use_emulator=…&allow_http=…]` | Azure Blob Storage |
//!
//! Every cloud URL also takes `connect_timeout`, `timeout` (per request), `max_retries` and
//! `retry_timeout` (durations as `500ms`, `30s`, `2m` or plain seconds). Query parameters
//! win over environment variables.
//!
//! **Credentials never appear in a URL**: the URL is sent to every worker and written to
//! logs, so a URL with a user-info part or a secret-looking parameter is rejected. Each
//! process reads its credentials from its own environment (or a credentials file):
//!
//! * S3: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`); else the
//!   shared credentials file (`credentials_file=` in the URL, `AWS_SHARED_CREDENTIALS_FILE`,
//!   or `~/.aws/credentials`), profile `profile=` / `AWS_PROFILE` / `default`; else, for AWS
//!   itself (no endpoint), the ambient chain (web identity, container credentials, instance
//!   metadata). Endpoint: `endpoint=` / `TRAINYARD_S3_ENDPOINT` / `AWS_ENDPOINT_URL_S3` /
//!   `AWS_ENDPOINT_URL` / `AWS_ENDPOINT`; region: `region=` / `AWS_REGION` /
//!   `AWS_DEFAULT_REGION` / `us-east-1`. Requests are path-style
//!   (`endpoint/bucket/key`) unless `path_style=false`.
//! * GCS: `service_account=` / `GOOGLE_SERVICE_ACCOUNT` (a key file),
//!   `GOOGLE_APPLICATION_CREDENTIALS`, or the key JSON in `GOOGLE_SERVICE_ACCOUNT_KEY`; else
//!   the metadata server.
//! * Azure: account `account=` / `AZURE_STORAGE_ACCOUNT_NAME`; `AZURE_STORAGE_ACCOUNT_KEY`,
//!   `AZURE_STORAGE_SAS_TOKEN`, or `AZURE_CLIENT_ID` + `AZURE_CLIENT_SECRET` +
//!   `AZURE_TENANT_ID`; else managed identity.
//!
//! Plain `http://` endpoints are allowed for loopback hosts (a local test server); any
//! other host needs `allow_http=true`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::ObjectsError;

/// Looks up an environment variable (`std::env::var` in production; a map in tests).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// A secret value (a key, a token). Its `Debug` and `Display` never show it; read it with
/// [`Secret::expose`] only where it is handed to the client.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// HTTP client settings of a cloud store: timeouts, and retries with exponential backoff
/// and jitter (object_store's decorrelated jitter: each wait is random between
/// `init_backoff` and twice the previous one, capped at `max_backoff`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSettings {
    /// Time to establish a connection (`connect_timeout`, default 5 s).
    pub connect_timeout: Duration,
    /// Time for one whole request, one multipart part included (`timeout`, default 60 s).
    pub request_timeout: Duration,
    /// Retries of a failed request (`max_retries`, default 10).
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt (`retry_timeout`, default 3 min).
    pub retry_timeout: Duration,
    /// First backoff (100 ms).
    pub init_backoff: Duration,
    /// Longest backoff (15 s).
    pub max_backoff: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            max_retries: 10,
            retry_timeout: Duration::from_secs(180),
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
        }
    }
}

/// Where S3 credentials came from (for messages; never the values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// Environment variables (`AWS_ACCESS_KEY_ID`, ...).
    Environment,
    /// A shared credentials file and profile.
    File {
        /// The file.
        path: PathBuf,
        /// The profile (section) in it.
        profile: String,
    },
}

/// S3 credentials.
#[derive(Clone, PartialEq)]
pub enum S3Credentials {
    /// A fixed key pair.
    Static {
        /// The access key id (`AWS_ACCESS_KEY_ID`); shown shortened in `Debug`.
        access_key_id: String,
        /// The secret access key.
        secret_access_key: Secret,
        /// A session token for temporary credentials.
        session_token: Option<Secret>,
        /// Where they came from.
        source: CredentialSource,
    },
    /// Let the client find credentials itself (web identity, container credentials,
    /// instance metadata), with these `AWS_*` settings from the environment (file paths,
    /// role ARNs, URIs; no secrets).
    Ambient(BTreeMap<String, String>),
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Credentials::Static {
                access_key_id,
                session_token,
                source,
                ..
            } => f
                .debug_struct("Static")
                .field("access_key_id", &shorten(access_key_id))
                .field("secret_access_key", &"<redacted>")
                .field(
                    "session_token",
                    &session_token.as_ref().map(|_| "<redacted>"),
                )
                .field("source", source)
                .finish(),
            S3Credentials::Ambient(settings) => f.debug_tuple("Ambient").field(settings).finish(),
        }
    }
}

/// The first four characters of an identifier and an ellipsis.
fn shorten(id: &str) -> String {
    let head: String = id.chars().take(4).collect();
    format!("{head}…")
}

/// An `s3://` store.
#[derive(Debug, Clone, PartialEq)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// The endpoint of an S3-compatible server (`http://127.0.0.1:39000`); `None` for AWS.
    pub endpoint: Option<String>,
    /// The region (`garage` for Garage; AWS regions such as `eu-west-1`).
    pub region: String,
    /// Path-style requests (`endpoint/bucket/key`) rather than virtual-hosted
    /// (`bucket.endpoint/key`).
    pub path_style: bool,
    /// Whether plain HTTP is allowed.
    pub allow_http: bool,
    /// The credentials.
    pub credentials: S3Credentials,
}

/// Google Cloud Storage credentials.
#[derive(Debug, Clone, PartialEq)]
pub enum GcsCredentials {
    /// A service-account key file.
    ServiceAccountPath(PathBuf),
    /// An application-default-credentials file (`GOOGLE_APPLICATION_CREDENTIALS`).
    ApplicationCredentials(PathBuf),
    /// A service-account key, as JSON.
    ServiceAccountKey(Secret),
    /// The metadata server.
    Ambient,
}

/// A `gs://` store.
#[derive(Debug, Clone, PartialEq)]
pub struct GcsConfig {
    /// The bucket.
    pub bucket: String,
    /// A custom base URL (an emulator); `None` for Google's.
    pub endpoint: Option<String>,
    /// Whether plain HTTP is allowed.
    pub allow_http: bool,
    /// The credentials.
    pub credentials: GcsCredentials,
}

/// Azure Blob Storage credentials.
#[derive(Clone, PartialEq)]
pub enum AzureCredentials {
    /// The storage account's access key.
    AccessKey(Secret),
    /// A shared access signature (the query string of a SAS URL).
    Sas(Secret),
    /// A service principal.
    ClientSecret {
        /// The application (client) id.
        client_id: String,
        /// The tenant id.
        tenant_id: String,
        /// The client secret.
        secret: Secret,
    },
    /// Managed identity / workload identity, or the emulator's well-known key.
    Ambient,
}

impl fmt::Debug for AzureCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AzureCredentials::AccessKey(_) => f.write_str("AccessKey(<redacted>)"),
            AzureCredentials::Sas(_) => f.write_str("Sas(<redacted>)"),
            AzureCredentials::ClientSecret {
                client_id,
                tenant_id,
                ..
            } => f
                .debug_struct("ClientSecret")
                .field("client_id", client_id)
                .field("tenant_id", tenant_id)
                .field("secret", &"<redacted>")
                .finish(),
            AzureCredentials::Ambient => f.write_str("Ambient"),
        }
    }
}

/// An `az://` store.
#[derive(Debug, Clone, PartialEq)]
pub struct AzureConfig {
    /// The container.
    pub container: String,
    /// The storage account.
    pub account: String,
    /// A custom endpoint; `None` for `https://<account>.blob.core.windows.net`.
    pub endpoint: Option<String>,
    /// Talk to the Azurite emulator.
    pub use_emulator: bool,
    /// Whether plain HTTP is allowed.
    pub allow_http: bool,
    /// The credentials.
    pub credentials: AzureCredentials,
}

/// Which kind of store, with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// A local folder.
    File {
        /// The folder (absolute).
        root: PathBuf,
    },
    /// S3 or an S3-compatible server.
    S3(S3Config),
    /// Google Cloud Storage.
    Gcs(GcsConfig),
    /// Azure Blob Storage.
    Azure(AzureConfig),
}

/// An object store's configuration, parsed from its URL and the environment. `Debug` and
/// `Display` never show a secret.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectsConfig {
    /// The URL as given (it never carries secrets: those are rejected).
    url: String,
    /// The store.
    pub backend: Backend,
    /// The key prefix of every object (`a/b` for `s3://bucket/a/b`; empty for `file://`).
    pub prefix: String,
    /// Timeouts and retries (unused by `file://`).
    pub client: ClientSettings,
}

impl fmt::Display for ObjectsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// Query parameters every cloud URL accepts.
const CLIENT_PARAMS: &[&str] = &["connect_timeout", "timeout", "max_retries", "retry_timeout"];
const S3_PARAMS: &[&str] = &[
    "endpoint",
    "region",
    "path_style",
    "allow_http",
    "credentials_file",
    "profile",
];
const GCS_PARAMS: &[&str] = &["endpoint", "allow_http", "service_account"];
const AZURE_PARAMS: &[&str] = &["account", "endpoint", "use_emulator", "allow_http"];

/// Query parameters (and user-info) that would put a secret into the URL.
const SECRET_PARAMS: &[&str] = &[
    "access_key_id",
    "aws_access_key_id",
    "secret_access_key",
    "aws_secret_access_key",
    "secret",
    "secret_key",
    "session_token",
    "aws_session_token",
    "token",
    "password",
    "key",
    "access_key",
    "account_key",
    "sas",
    "sas_token",
    "sig",
    "client_secret",
    "service_account_key",
    "bearer_token",
];

fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.contains(&name.as_str())
}

/// `url` with any user-info (its own, and that of URLs in its query values) and the values
/// of secret-looking query parameters replaced by `<redacted>`: safe to log and to put in
/// error messages, even for malformed input.
pub fn redact_url(url: &str) -> String {
    let (before_query, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = redact_userinfo(before_query);
    if let Some(query) = query {
        out.push('?');
        let parts: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _))
                    if is_secret_param(&percent_decode(k).unwrap_or_default())
                        || is_secret_param(k) =>
                {
                    format!("{k}=<redacted>")
                }
                Some((k, v)) => format!("{k}={}", redact_userinfo(v)),
                None => pair.to_string(),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    out
}

/// `scheme://user:pass@host/...` with the user-info replaced by `<redacted>` (also when
/// percent-encoded as `%40`); anything else unchanged.
fn redact_userinfo(s: &str) -> String {
    let decoded = percent_decode(s).unwrap_or_else(|| s.to_string());
    for candidate in [s, decoded.as_str()] {
        if let Some((scheme, rest)) = candidate.split_once("://") {
            let end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(end);
            if let Some(at) = authority.rfind('@') {
                return format!("{scheme}://<redacted>@{}{path}", &authority[at + 1..]);
            }
        }
    }
    s.to_string()
}

/// One setting's value and where it came from, for messages.
struct Found {
    value: String,
    /// `endpoint` (a query parameter) or `endpoint (from TRAINYARD_S3_ENDPOINT)`.
    name: String,
}

/// Parsing state: the URL, its query parameters (consumed as they are read) and the
/// environment.
struct Parser<'a> {
    url: String,
    params: BTreeMap<String, String>,
    env: EnvLookup<'a>,
}

impl<'a> Parser<'a> {
    fn invalid_param(&self, param: &str, reason: impl Into<String>) -> ObjectsError {
        ObjectsError::InvalidParameter {
            url: self.url.clone(),
            param: param.to_string(),
            reason: reason.into(),
        }
    }

    fn credentials(&self, reason: impl Into<String>) -> ObjectsError {
        ObjectsError::Credentials {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    fn env(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.trim().is_empty())
    }

    /// The query parameter `param`, else the first set variable of `vars`.
    fn setting(&mut self, param: &str, vars: &[&str]) -> Option<Found> {
        if let Some(value) = self.params.remove(param) {
            return Some(Found {
                value,
                name: param.to_string(),
            });
        }
        vars.iter().find_map(|var| {
            self.env(var).map(|value| Found {
                value,
                name: format!("{param} (from {var})"),
            })
        })
    }

    fn bool_param(&mut self, param: &str) -> Result<Option<bool>, ObjectsError> {
        let Some(value) = self.params.remove(param) else {
            return Ok(None);
        };
        match value.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(Some(true)),
            "false" | "0" | "no" | "off" => Ok(Some(false)),
            _ => Err(self.invalid_param(param, format!("{value:?} is not true or false"))),
        }
    }

    fn duration_param(&mut self, param: &str) -> Result<Option<Duration>, ObjectsError> {
        let Some(value) = self.params.remove(param) else {
            return Ok(None);
        };
        parse_duration(&value).map(Some).ok_or_else(|| {
            self.invalid_param(
                param,
                format!("{value:?} is not a positive duration such as 500ms, 30s, 2m or 10"),
            )
        })
    }

    fn client_settings(&mut self) -> Result<ClientSettings, ObjectsError> {
        let mut client = ClientSettings::default();
        if let Some(d) = self.duration_param("connect_timeout")? {
            client.connect_timeout = d;
        }
        if let Some(d) = self.duration_param("timeout")? {
            client.request_timeout = d;
        }
        if let Some(d) = self.duration_param("retry_timeout")? {
            client.retry_timeout = d;
        }
        if let Some(value) = self.params.remove("max_retries") {
            client.max_retries = value
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= 100)
                .ok_or_else(|| {
                    self.invalid_param(
                        "max_retries",
                        format!("{value:?} is not a whole number from 0 to 100"),
                    )
                })?;
        }
        Ok(client)
    }

    /// Checks an endpoint URL; returns it without a trailing slash and whether its host is
    /// a loopback address.
    fn endpoint(&self, found: &Found) -> Result<(String, bool), ObjectsError> {
        let value = found.value.trim().trim_end_matches('/').to_string();
        let parsed = url::Url::parse(&value).map_err(|e| {
            self.invalid_param(
                &found.name,
                format!(
                    "{:?} is not a URL ({e}); expected http(s)://host:port",
                    redact_url(&value)
                ),
            )
        })?;
        if parsed.scheme() != "http" && parsed.scheme() != "https" {
            return Err(self.invalid_param(
                &found.name,
                format!("scheme {:?}: expected http:// or https://", parsed.scheme()),
            ));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(self.credentials(format!(
                "{} must not contain credentials; set them in the environment",
                found.name
            )));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(self.invalid_param(&found.name, "must not have a query or fragment"));
        }
        let loopback = match parsed.host() {
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => return Err(self.invalid_param(&found.name, "has no host")),
        };
        Ok((value, loopback))
    }

    /// `allow_http` from the URL, else true for a plain-HTTP loopback endpoint; an error
    /// for plain HTTP to another host without `allow_http=true`.
    fn allow_http(&mut self, endpoint: Option<(&Found, &str, bool)>) -> Result<bool, ObjectsError> {
        let explicit = self.bool_param("allow_http")?;
        let Some((found, endpoint, loopback)) = endpoint else {
            return Ok(explicit.unwrap_or(false));
        };
        if !endpoint.starts_with("http://") {
            return Ok(explicit.unwrap_or(false));
        }
        match explicit {
            Some(true) => Ok(true),
            Some(false) => Err(self.invalid_param(
                &found.name,
                format!("{endpoint} is plain http:// but allow_http=false"),
            )),
            None if loopback => Ok(true),
            None => Err(self.invalid_param(
                &found.name,
                format!(
                    "{endpoint} is plain http:// to a host that is not loopback: data and \
                     signatures would travel unencrypted; use https://, or add allow_http=true \
                     to the URL to allow it"
                ),
            )),
        }
    }

    fn reject_unknown(&self, scheme: &str, known: &[&str]) -> Result<(), ObjectsError> {
        if let Some(name) = self.params.keys().next() {
            let mut all: Vec<&str> = known.to_vec();
            all.extend_from_slice(CLIENT_PARAMS);
            return Err(self.invalid_param(
                name,
                format!(
                    "unknown parameter for {scheme}:// (known: {})",
                    all.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

/// Parses `500ms`, `30s`, `2m`, `1h` or a plain number of seconds; `None` if not positive.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = number.trim().parse().ok()?;
    let secs = value * scale;
    (secs.is_finite() && secs > 0.0 && secs < 1e9).then(|| Duration::from_secs_f64(secs))
}

/// Decodes `%XX` escapes; `None` on a bad escape or invalid UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Checks a bucket or container name: letters, digits, `.`, `-` and `_`, 1 to 255 of them.
fn check_bucket(
    parser: &Parser<'_>,
    what: &str,
    name: &str,
    example: &str,
) -> Result<(), ObjectsError> {
    if name.is_empty() {
        return Err(parser.invalid_param(what, format!("missing (expected {example})")));
    }
    if name.len() > 255
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(parser.invalid_param(
            what,
            format!("{name:?} is not a valid name (letters, digits, '.', '-', '_')"),
        ));
    }
    Ok(())
}

/// Reads `[profile]` from an AWS shared credentials file.
fn read_credentials_file(
    parser: &Parser<'_>,
    path: &std::path::Path,
    profile: &str,
) -> Result<S3Credentials, ObjectsError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        parser.credentials(format!(
            "cannot read credentials file {}: {e}",
            path.display()
        ))
    })?;
    let mut section = String::new();
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            section = name
                .strip_prefix("profile ")
                .unwrap_or(name)
                .trim()
                .to_string();
            continue;
        }
        if section == profile {
            if let Some((k, v)) = line.split_once('=') {
                values.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    let key = values.remove("aws_access_key_id").filter(|v| !v.is_empty());
    let secret = values
        .remove("aws_secret_access_key")
        .filter(|v| !v.is_empty());
    match (key, secret) {
        (Some(access_key_id), Some(secret)) => Ok(S3Credentials::Static {
            access_key_id,
            secret_access_key: Secret::new(secret),
            session_token: values
                .remove("aws_session_token")
                .filter(|v| !v.is_empty())
                .map(Secret::new),
            source: CredentialSource::File {
                path: path.to_path_buf(),
                profile: profile.to_string(),
            },
        }),
        _ => Err(parser.credentials(format!(
            "credentials file {}: profile [{profile}] lacks aws_access_key_id or \
             aws_secret_access_key",
            path.display()
        ))),
    }
}

/// `AWS_*` variables the ambient credential chain reads (no secrets among them).
const AWS_AMBIENT_VARS: &[&str] = &[
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_ENDPOINT_URL_STS",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_METADATA_ENDPOINT",
];

impl ObjectsConfig {
    /// Parses `url`, reading credentials and defaults from this process's environment.
    pub fn from_url(url: &str) -> Result<Self, ObjectsError> {
        Self::parse_with_env(url, &|name| std::env::var(name).ok())
    }

    /// Parses `url`, reading the environment through `env` (tests pass a map).
    pub fn parse_with_env(url: &str, env: EnvLookup<'_>) -> Result<Self, ObjectsError> {
        let shown = redact_url(url.trim());
        let invalid = |reason: &str| ObjectsError::InvalidUrl {
            url: shown.clone(),
            reason: reason.to_string(),
        };
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid(
                "expected SCHEME://..., for example file:///var/lib/trainyard/objects or \
                 s3://bucket/prefix",
            ));
        };
        let scheme = scheme.to_ascii_lowercase();
        if scheme == "file" {
            return parse_file(&shown, rest);
        }
        if !matches!(scheme.as_str(), "s3" | "gs" | "az") {
            return Err(ObjectsError::UnsupportedScheme { url: shown, scheme });
        }
        let parsed = url::Url::parse(url).map_err(|e| invalid(&format!("malformed URL: {e}")))?;
        let mut parser = Parser {
            url: shown.clone(),
            params: BTreeMap::new(),
            env,
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(parser.credentials(
                "credentials are not accepted in the URL (it is sent to every worker and \
                 written to logs): set them in each process's environment or a credentials file",
            ));
        }
        if parsed.fragment().is_some() {
            return Err(invalid("a URL fragment (#...) is not allowed"));
        }
        for (k, v) in parsed.query_pairs() {
            let k = k.to_string();
            if is_secret_param(&k) {
                return Err(parser.credentials(format!(
                    "parameter {k:?}: credentials are not accepted in the URL (it is sent to \
                     every worker and written to logs): set them in each process's environment \
                     or a credentials file"
                )));
            }
            if parser.params.insert(k.clone(), v.to_string()).is_some() {
                return Err(parser.invalid_param(&k, "given more than once"));
            }
        }
        if parsed.port().is_some() {
            return Err(invalid(
                "a port after the bucket name is not allowed; put the server in endpoint=http(s)://host:port",
            ));
        }
        let bucket = parsed.host_str().unwrap_or("").to_string();
        // The path as written: the URL parser would resolve `..` segments away.
        let after_scheme = &url[url.find("://").map_or(0, |i| i + 3)..];
        let before_query =
            &after_scheme[..after_scheme.find(['?', '#']).unwrap_or(after_scheme.len())];
        let raw_path = &before_query[before_query.find('/').unwrap_or(before_query.len())..];
        let prefix = parse_prefix(&parser, raw_path)?;
        let client = parser.client_settings()?;
        let backend = match scheme.as_str() {
            "s3" => {
                check_bucket(&parser, "bucket", &bucket, "s3://BUCKET/prefix")?;
                Backend::S3(parse_s3(&mut parser, bucket)?)
            }
            "gs" => {
                check_bucket(&parser, "bucket", &bucket, "gs://BUCKET/prefix")?;
                Backend::Gcs(parse_gcs(&mut parser, bucket)?)
            }
            _ => {
                check_bucket(&parser, "container", &bucket, "az://CONTAINER/prefix")?;
                Backend::Azure(parse_azure(&mut parser, bucket)?)
            }
        };
        Ok(ObjectsConfig {
            url: shown,
            backend,
            prefix,
            client,
        })
    }

    /// The URL, as given (it never carries secrets).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL scheme: `file`, `s3`, `gs` or `az`.
    pub fn scheme(&self) -> &'static str {
        match self.backend {
            Backend::File { .. } => "file",
            Backend::S3(_) => "s3",
            Backend::Gcs(_) => "gs",
            Backend::Azure(_) => "az",
        }
    }
}

fn parse_file(shown: &str, rest: &str) -> Result<ObjectsConfig, ObjectsError> {
    let invalid = |reason: &str| ObjectsError::InvalidUrl {
        url: shown.to_string(),
        reason: reason.to_string(),
    };
    // file:///abs/path or file://localhost/abs/path
    let path = rest.strip_prefix("localhost").unwrap_or(rest);
    if !path.starts_with('/') {
        return Err(invalid(
            "a file:// URL needs an absolute path (file:///abs/path)",
        ));
    }
    let path = percent_decode(path).ok_or_else(|| invalid("bad percent-encoding"))?;
    Ok(ObjectsConfig {
        url: shown.to_string(),
        backend: Backend::File {
            root: PathBuf::from(path),
        },
        prefix: String::new(),
        client: ClientSettings::default(),
    })
}

fn parse_prefix(parser: &Parser<'_>, path: &str) -> Result<String, ObjectsError> {
    let decoded = percent_decode(path)
        .ok_or_else(|| parser.invalid_param("prefix", "bad percent-encoding"))?;
    let parts: Vec<&str> = decoded.split('/').filter(|s| !s.is_empty()).collect();
    for part in &parts {
        if *part == "." || *part == ".." {
            return Err(parser.invalid_param("prefix", format!("segment {part:?} is not allowed")));
        }
    }
    let prefix = parts.join("/");
    object_store::path::Path::parse(&prefix)
        .map_err(|e| parser.invalid_param("prefix", e.to_string()))?;
    Ok(prefix)
}

fn parse_s3(parser: &mut Parser<'_>, bucket: String) -> Result<S3Config, ObjectsError> {
    let endpoint_found = parser.setting(
        "endpoint",
        &[
            "TRAINYARD_S3_ENDPOINT",
            "AWS_ENDPOINT_URL_S3",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT",
        ],
    );
    let endpoint = match &endpoint_found {
        Some(found) => Some(parser.endpoint(found)?),
        None => None,
    };
    let allow_http = parser.allow_http(
        endpoint_found
            .as_ref()
            .zip(endpoint.as_ref())
            .map(|(f, (e, loopback))| (f, e.as_str(), *loopback)),
    )?;
    let region = match parser.setting("region", &["AWS_REGION", "AWS_DEFAULT_REGION"]) {
        Some(found) => {
            let region = found.value.trim().to_string();
            if region.is_empty()
                || !region
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(parser.invalid_param(
                    &found.name,
                    format!("{region:?} is not a region name (for example us-east-1, garage)"),
                ));
            }
            region
        }
        None => "us-east-1".to_string(),
    };
    let path_style = parser.bool_param("path_style")?.unwrap_or(true);
    let file_param = parser.params.remove("credentials_file");
    let profile = parser
        .setting("profile", &["AWS_PROFILE"])
        .map(|f| f.value.trim().to_string())
        .unwrap_or_else(|| "default".to_string());
    parser.reject_unknown("s3", S3_PARAMS)?;

    let credentials = if let Some(path) = file_param {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(parser.invalid_param(
                "credentials_file",
                format!("{} is not an absolute path", path.display()),
            ));
        }
        read_credentials_file(parser, &path, &profile)?
    } else if let Some(access_key_id) = parser.env("AWS_ACCESS_KEY_ID") {
        let Some(secret) = parser.env("AWS_SECRET_ACCESS_KEY") else {
            return Err(
                parser.credentials("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not")
            );
        };
        S3Credentials::Static {
            access_key_id: access_key_id.trim().to_string(),
            secret_access_key: Secret::new(secret.trim()),
            session_token: parser.env("AWS_SESSION_TOKEN").map(Secret::new),
            source: CredentialSource::Environment,
        }
    } else if parser.env("AWS_SECRET_ACCESS_KEY").is_some() {
        return Err(parser.credentials("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not"));
    } else if let Some(path) = parser.env("AWS_SHARED_CREDENTIALS_FILE") {
        read_credentials_file(parser, std::path::Path::new(path.trim()), &profile)?
    } else if let Some(path) = parser
        .env("HOME")
        .map(|home| PathBuf::from(home).join(".aws").join("credentials"))
        .filter(|p| p.is_file())
    {
        read_credentials_file(parser, &path, &profile)?
    } else if endpoint.is_some() {
        return Err(parser.credentials(
            "none found for this S3-compatible endpoint: set AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY in this process's environment, or add \
             credentials_file=/abs/path (AWS shared credentials format) to the URL",
        ));
    } else {
        S3Credentials::Ambient(
            AWS_AMBIENT_VARS
                .iter()
                .filter_map(|var| parser.env(var).map(|v| (var.to_string(), v)))
                .collect(),
        )
    };
    Ok(S3Config {
        bucket,
        endpoint: endpoint.map(|(e, _)| e),
        region,
        path_style,
        allow_http,
        credentials,
    })
}

fn parse_gcs(parser: &mut Parser<'_>, bucket: String) -> Result<GcsConfig, ObjectsError> {
    let endpoint_found = parser.setting("endpoint", &[]);
    let endpoint = match &endpoint_found {
        Some(found) => Some(parser.endpoint(found)?),
        None => None,
    };
    let allow_http = parser.allow_http(
        endpoint_found
            .as_ref()
            .zip(endpoint.as_ref())
            .map(|(f, (e, loopback))| (f, e.as_str(), *loopback)),
    )?;
    let account_path = parser.setting(
        "service_account",
        &[
            "GOOGLE_SERVICE_ACCOUNT",
            "GOOGLE_SERVICE_ACCOUNT_PATH",
            "SERVICE_ACCOUNT",
        ],
    );
    parser.reject_unknown("gs", GCS_PARAMS)?;
    let credentials = if let Some(found) = account_path {
        let path = PathBuf::from(found.value.trim());
        if !path.is_absolute() {
            return Err(parser.invalid_param(
                &found.name,
                format!("{} is not an absolute path", path.display()),
            ));
        }
        GcsCredentials::ServiceAccountPath(path)
    } else if let Some(key) = parser.env("GOOGLE_SERVICE_ACCOUNT_KEY") {
        GcsCredentials::ServiceAccountKey(Secret::new(key))
    } else if let Some(path) = parser.env("GOOGLE_APPLICATION_CREDENTIALS") {
        GcsCredentials::ApplicationCredentials(PathBuf::from(path.trim()))
    } else {
        GcsCredentials::Ambient
    };
    Ok(GcsConfig {
        bucket,
        endpoint: endpoint.map(|(e, _)| e),
        allow_http,
        credentials,
    })
}

fn parse_azure(parser: &mut Parser<'_>, container: String) -> Result<AzureConfig, ObjectsError> {
    let use_emulator = parser.bool_param("use_emulator")?.unwrap_or(false);
    let endpoint_found = parser.setting("endpoint", &[]);
    let endpoint = match &endpoint_found {
        Some(found) => Some(parser.endpoint(found)?),
        None => None,
    };
    let allow_http = if use_emulator && endpoint.is_none() {
        // Azurite on 127.0.0.1:10000.
        parser.bool_param("allow_http")?.unwrap_or(true)
    } else {
        parser.allow_http(
            endpoint_found
                .as_ref()
                .zip(endpoint.as_ref())
                .map(|(f, (e, loopback))| (f, e.as_str(), *loopback)),
        )?
    };
    let account = parser.setting(
        "account",
        &["AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT"],
    );
    parser.reject_unknown("az", AZURE_PARAMS)?;
    let account = match account {
        Some(found) => {
            let name = found.value.trim().to_string();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(parser.invalid_param(
                    &found.name,
                    format!("{name:?} is not a storage account name (letters and digits)"),
                ));
            }
            name
        }
        None if use_emulator => "devstoreaccount1".to_string(),
        None => {
            return Err(parser.invalid_param(
                "account",
                "missing: add account=NAME to the URL or set AZURE_STORAGE_ACCOUNT_NAME",
            ))
        }
    };
    let credentials = if let Some(key) = parser
        .env("AZURE_STORAGE_ACCOUNT_KEY")
        .or_else(|| parser.env("AZURE_STORAGE_ACCESS_KEY"))
    {
        AzureCredentials::AccessKey(Secret::new(key.trim()))
    } else if let Some(sas) = parser.env("AZURE_STORAGE_SAS_TOKEN") {
        AzureCredentials::Sas(Secret::new(sas.trim().trim_start_matches('?')))
    } else if let Some(secret) = parser.env("AZURE_CLIENT_SECRET") {
        let (Some(client_id), Some(tenant_id)) =
            (parser.env("AZURE_CLIENT_ID"), parser.env("AZURE_TENANT_ID"))
        else {
            return Err(parser.credentials(
                "AZURE_CLIENT_SECRET is set but AZURE_CLIENT_ID or AZURE_TENANT_ID is not",
            ));
        };
        AzureCredentials::ClientSecret {
            client_id,
            tenant_id,
            secret: Secret::new(secret.trim()),
        }
    } else {
        AzureCredentials::Ambient
    };
    Ok(AzureConfig {
        container,
        account,
        endpoint: endpoint.map(|(e, _)| e),
        use_emulator,
        allow_http,
        credentials,
    })
}

#[cfg(test)]
mod tests;
