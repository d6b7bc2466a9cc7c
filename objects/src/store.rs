//! Building an `object_store` client from an [`ObjectsConfig`], wrapped so that it prints as
//! its URL (never with credentials).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    RetryConfig,
};

use crate::config::{
    AzureCredentials, Backend, ClientSettings, GcsCredentials, ObjectsConfig, S3Credentials,
};
use crate::error::ObjectsError;

/// An object store that displays (and debug-prints) as its URL. Every call goes to the
/// wrapped store unchanged.
pub struct NamedStore {
    name: String,
    inner: Arc<dyn ObjectStore>,
}

impl NamedStore {
    /// Wraps `inner`, to be shown as `name` (a URL without secrets).
    pub fn new(name: impl Into<String>, inner: Arc<dyn ObjectStore>) -> Self {
        NamedStore {
            name: name.into(),
            inner,
        }
    }
}

impl fmt::Display for NamedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for NamedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NamedStore({})", self.name)
    }
}

#[async_trait]
impl ObjectStore for NamedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

fn client_options(settings: &ClientSettings, allow_http: bool) -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(settings.connect_timeout)
        .with_timeout(settings.request_timeout)
        .with_allow_http(allow_http)
}

fn retry_config(settings: &ClientSettings) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: settings.init_backoff,
            max_backoff: settings.max_backoff,
            base: 2.0,
        },
        max_retries: settings.max_retries,
        retry_timeout: settings.retry_timeout,
    }
}

/// Builds the store of `config` (for `file://`, creating the folder). The returned store
/// is rooted at the bucket (or folder); the config's prefix is not applied.
pub(crate) fn build(config: &ObjectsConfig) -> Result<Arc<dyn ObjectStore>, ObjectsError> {
    let url = config.url().to_string();
    let open_err = |source| ObjectsError::Open {
        url: url.clone(),
        source: Box::new(source),
    };
    let client = &config.client;
    let inner: Arc<dyn ObjectStore> = match &config.backend {
        Backend::File { root } => {
            std::fs::create_dir_all(root).map_err(|source| ObjectsError::Io {
                url: url.clone(),
                path: root.display().to_string(),
                source,
            })?;
            Arc::new(LocalFileSystem::new_with_prefix(root).map_err(open_err)?)
        }
        Backend::S3(s3) => {
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(&s3.bucket)
                .with_region(&s3.region)
                .with_virtual_hosted_style_request(!s3.path_style)
                .with_client_options(client_options(client, s3.allow_http))
                .with_retry(retry_config(client));
            if let Some(endpoint) = &s3.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            match &s3.credentials {
                S3Credentials::Static {
                    access_key_id,
                    secret_access_key,
                    session_token,
                    ..
                } => {
                    builder = builder
                        .with_access_key_id(access_key_id)
                        .with_secret_access_key(secret_access_key.expose());
                    if let Some(token) = session_token {
                        builder = builder.with_token(token.expose());
                    }
                }
                S3Credentials::Ambient(settings) => {
                    for (var, value) in settings {
                        if let Ok(key) = var.to_ascii_lowercase().parse() {
                            builder = builder.with_config(key, value);
                        }
                    }
                }
            }
            Arc::new(builder.build().map_err(open_err)?)
        }
        Backend::Gcs(gcs) => {
            let mut builder = GoogleCloudStorageBuilder::new()
                .with_bucket_name(&gcs.bucket)
                .with_client_options(client_options(client, gcs.allow_http))
                .with_retry(retry_config(client));
            if let Some(endpoint) = &gcs.endpoint {
                builder = builder.with_base_url(endpoint);
            }
            builder = match &gcs.credentials {
                GcsCredentials::ServiceAccountPath(p) => {
                    builder.with_service_account_path(p.display().to_string())
                }
                GcsCredentials::ApplicationCredentials(p) => {
                    builder.with_application_credentials(p.display().to_string())
                }
                GcsCredentials::ServiceAccountKey(key) => {
                    builder.with_service_account_key(key.expose())
                }
                GcsCredentials::Ambient => builder,
            };
            Arc::new(builder.build().map_err(open_err)?)
        }
        Backend::Azure(az) => {
            let mut builder = MicrosoftAzureBuilder::new()
                .with_container_name(&az.container)
                .with_account(&az.account)
                .with_use_emulator(az.use_emulator)
                .with_client_options(client_options(client, az.allow_http))
                .with_retry(retry_config(client));
            if let Some(endpoint) = &az.endpoint {
                builder = builder.with_endpoint(endpoint.clone());
            }
            builder = match &az.credentials {
                AzureCredentials::AccessKey(key) => builder.with_access_key(key.expose()),
                AzureCredentials::Sas(sas) => builder.with_sas_authorization(
                    url::form_urlencoded::parse(sas.expose().as_bytes())
                        .map(|(k, v)| (k.into_owned(), v.into_owned()))
                        .collect::<Vec<_>>(),
                ),
                AzureCredentials::ClientSecret {
                    client_id,
                    tenant_id,
                    secret,
                } => {
                    builder.with_client_secret_authorization(client_id, secret.expose(), tenant_id)
                }
                AzureCredentials::Ambient => builder,
            };
            Arc::new(builder.build().map_err(open_err)?)
        }
    };
    Ok(Arc::new(NamedStore::new(url, inner)))
}
