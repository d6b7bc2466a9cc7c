//! URL and environment parsing, for every scheme, with good and bad inputs; redaction.

use std::collections::HashMap;

use super::*;

const SECRET: &str = "s3cr3t-VALUE-never-shown";

fn parse(url: &str, env: &[(&str, &str)]) -> Result<ObjectsConfig, ObjectsError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ObjectsConfig::parse_with_env(url, &|name| env.get(name).cloned())
}

fn garage_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("TRAINYARD_S3_ENDPOINT", "http://127.0.0.1:39000"),
        ("AWS_ACCESS_KEY_ID", "GK0123456789abcdef"),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_REGION", "garage"),
    ]
}

fn s3_of(config: &ObjectsConfig) -> &S3Config {
    match &config.backend {
        Backend::S3(s3) => s3,
        other => panic!("expected s3, got {other:?}"),
    }
}

/// Asserts an InvalidParameter error naming `param`, whose message contains `needle`.
fn assert_param(result: Result<ObjectsConfig, ObjectsError>, param: &str, needle: &str) {
    let err = result.expect_err("should fail");
    let text = err.to_string();
    match &err {
        ObjectsError::InvalidParameter { param: p, .. } => {
            assert!(
                p.starts_with(param),
                "param {p:?} should name {param:?}: {text}"
            )
        }
        other => panic!("expected InvalidParameter({param}), got {other:?}"),
    }
    assert!(text.contains(needle), "{text:?} should contain {needle:?}");
    assert!(!text.contains(SECRET), "{text}");
}

#[test]
fn file_urls() {
    let c = parse("file:///var/lib/ty/objects", &[]).unwrap();
    assert_eq!(
        c.backend,
        Backend::File {
            root: PathBuf::from("/var/lib/ty/objects")
        }
    );
    assert_eq!(c.prefix, "");
    assert_eq!(c.scheme(), "file");
    let c = parse("file://localhost/tmp/a%20b", &[]).unwrap();
    assert_eq!(
        c.backend,
        Backend::File {
            root: PathBuf::from("/tmp/a b")
        }
    );
    let err = parse("file://relative/path", &[]).unwrap_err();
    assert!(err.to_string().contains("absolute"), "{err}");
    let err = parse("file:///bad%zz", &[]).unwrap_err();
    assert!(err.to_string().contains("percent"), "{err}");
    let err = parse("/no/scheme", &[]).unwrap_err();
    assert!(matches!(err, ObjectsError::InvalidUrl { .. }), "{err}");
    let err = parse("ftp://host/x", &[]).unwrap_err();
    assert!(
        matches!(err, ObjectsError::UnsupportedScheme { ref scheme, .. } if scheme == "ftp"),
        "{err}"
    );
    assert!(err.to_string().contains("s3://"), "{err}");
}

#[test]
fn s3_from_environment_like_scripts_s3_sh() {
    let c = parse("s3://ckpt/team-a/run%201/", &garage_env()).unwrap();
    let s3 = s3_of(&c);
    assert_eq!(s3.bucket, "ckpt");
    assert_eq!(c.prefix, "team-a/run 1");
    assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:39000"));
    assert_eq!(s3.region, "garage");
    assert!(s3.path_style);
    assert!(
        s3.allow_http,
        "loopback http endpoint is allowed by default"
    );
    match &s3.credentials {
        S3Credentials::Static {
            access_key_id,
            secret_access_key,
            session_token,
            source,
        } => {
            assert_eq!(access_key_id, "GK0123456789abcdef");
            assert_eq!(secret_access_key.expose(), SECRET);
            assert!(session_token.is_none());
            assert_eq!(source, &CredentialSource::Environment);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.client, ClientSettings::default());
    assert_eq!(c.url(), "s3://ckpt/team-a/run%201/");
}

#[test]
fn s3_query_parameters_win_over_environment() {
    let c = parse(
        "s3://ckpt?endpoint=http://localhost:9000&region=eu-west-1&path_style=false\
         &connect_timeout=2s&timeout=500ms&max_retries=3&retry_timeout=1m",
        &garage_env(),
    )
    .unwrap();
    let s3 = s3_of(&c);
    assert_eq!(s3.endpoint.as_deref(), Some("http://localhost:9000"));
    assert_eq!(s3.region, "eu-west-1");
    assert!(!s3.path_style);
    assert!(s3.allow_http);
    assert_eq!(c.prefix, "");
    assert_eq!(c.client.connect_timeout, Duration::from_secs(2));
    assert_eq!(c.client.request_timeout, Duration::from_millis(500));
    assert_eq!(c.client.max_retries, 3);
    assert_eq!(c.client.retry_timeout, Duration::from_secs(60));
}

#[test]
fn s3_endpoint_and_region_fallbacks() {
    // AWS itself: no endpoint, region from AWS_DEFAULT_REGION, ambient credentials.
    let c = parse(
        "s3://bucket/p",
        &[
            ("AWS_DEFAULT_REGION", "eu-central-1"),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r"),
        ],
    )
    .unwrap();
    let s3 = s3_of(&c);
    assert_eq!(s3.endpoint, None);
    assert_eq!(s3.region, "eu-central-1");
    assert!(!s3.allow_http);
    match &s3.credentials {
        S3Credentials::Ambient(settings) => {
            assert_eq!(settings["AWS_ROLE_ARN"], "arn:aws:iam::1:role/r")
        }
        other => panic!("{other:?}"),
    }
    // No region at all: us-east-1. AWS_ENDPOINT_URL as the endpoint.
    let c = parse(
        "s3://bucket",
        &[
            ("AWS_ENDPOINT_URL", "https://s3.example.com/"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
        ],
    )
    .unwrap();
    assert_eq!(s3_of(&c).region, "us-east-1");
    assert_eq!(
        s3_of(&c).endpoint.as_deref(),
        Some("https://s3.example.com")
    );
    assert!(!s3_of(&c).allow_http);
}

#[test]
fn s3_bad_inputs_name_the_parameter() {
    let env = garage_env();
    assert_param(parse("s3:///prefix", &env), "bucket", "missing");
    assert_param(
        parse("s3://Bad$Bucket/x", &env),
        "bucket",
        "not a valid name",
    );
    assert_param(parse("s3://b/x/../y", &env), "prefix", "\"..\"");
    assert_param(parse("s3://b?endpoint=ftp://h", &env), "endpoint", "http");
    assert_param(
        parse("s3://b?endpoint=not%20a%20url", &env),
        "endpoint",
        "not a URL",
    );
    assert_param(
        parse("s3://b?endpoint=http://10.1.2.3:3900", &env),
        "endpoint",
        "allow_http=true",
    );
    // ... which allow_http=true allows.
    let c = parse("s3://b?endpoint=http://10.1.2.3:3900&allow_http=true", &env).unwrap();
    assert!(s3_of(&c).allow_http);
    assert_param(
        parse("s3://b?allow_http=false", &env),
        "endpoint (from TRAINYARD_S3_ENDPOINT)",
        "allow_http=false",
    );
    assert_param(
        parse("s3://b?path_style=maybe", &env),
        "path_style",
        "true or false",
    );
    assert_param(
        parse("s3://b?timeout=-3s", &env),
        "timeout",
        "positive duration",
    );
    assert_param(
        parse("s3://b?max_retries=many", &env),
        "max_retries",
        "whole number",
    );
    assert_param(
        parse("s3://b?region=us%20east", &env),
        "region",
        "region name",
    );
    assert_param(
        parse("s3://b?regoin=x", &env),
        "regoin",
        "unknown parameter",
    );
    assert_param(
        parse("s3://b?region=a&region=b", &env),
        "region",
        "more than once",
    );
    assert_param(
        parse("s3://b?credentials_file=relative/creds", &env),
        "credentials_file",
        "absolute",
    );
    let mut bad_env = env.clone();
    bad_env.retain(|(k, _)| *k != "TRAINYARD_S3_ENDPOINT");
    bad_env.push(("AWS_ENDPOINT_URL_S3", "gopher://x"));
    assert_param(
        parse("s3://b", &bad_env),
        "endpoint (from AWS_ENDPOINT_URL_S3)",
        "gopher",
    );
    let mut bad_env = env.clone();
    bad_env.retain(|(k, _)| *k != "AWS_REGION");
    bad_env.push(("AWS_REGION", "no spaces allowed"));
    assert_param(
        parse("s3://b", &bad_env),
        "region (from AWS_REGION)",
        "region name",
    );
    let err = parse("s3://b:9000/x", &env).unwrap_err();
    assert!(err.to_string().contains("endpoint="), "{err}");
}

#[test]
fn s3_credentials_rules() {
    // A key id without its secret (and the reverse).
    let err = parse(
        "s3://b?endpoint=http://127.0.0.1:1",
        &[("AWS_ACCESS_KEY_ID", "k")],
    )
    .unwrap_err();
    assert!(matches!(err, ObjectsError::Credentials { .. }), "{err}");
    assert!(err.to_string().contains("AWS_SECRET_ACCESS_KEY"), "{err}");
    let err = parse("s3://b", &[("AWS_SECRET_ACCESS_KEY", SECRET)]).unwrap_err();
    assert!(err.to_string().contains("AWS_ACCESS_KEY_ID"), "{err}");
    assert!(!err.to_string().contains(SECRET), "{err}");
    // A custom endpoint with no credentials anywhere: an error now, not a hang on instance
    // metadata later.
    let err = parse("s3://b?endpoint=http://127.0.0.1:1", &[]).unwrap_err();
    assert!(matches!(err, ObjectsError::Credentials { .. }), "{err}");
    assert!(err.to_string().contains("credentials_file"), "{err}");
}

#[test]
fn s3_credentials_file_and_profile() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    std::fs::write(
        &file,
        format!(
            "# comment\n[default]\naws_access_key_id = DEFAULTKEY\naws_secret_access_key = {SECRET}\n\n\
             [profile ci]\naws_access_key_id=CIKEY\naws_secret_access_key=ci-{SECRET}\naws_session_token = tok\n\
             [broken]\naws_access_key_id = ONLYKEY\n"
        ),
    )
    .unwrap();
    let url = format!(
        "s3://b?endpoint=http://127.0.0.1:1&credentials_file={}",
        file.display()
    );
    // The URL's file wins over keys in the environment.
    let c = parse(
        &url,
        &[
            ("AWS_ACCESS_KEY_ID", "ENVKEY"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
        ],
    )
    .unwrap();
    match &s3_of(&c).credentials {
        S3Credentials::Static {
            access_key_id,
            secret_access_key,
            source,
            ..
        } => {
            assert_eq!(access_key_id, "DEFAULTKEY");
            assert_eq!(secret_access_key.expose(), SECRET);
            assert_eq!(
                source,
                &CredentialSource::File {
                    path: file.clone(),
                    profile: "default".into()
                }
            );
        }
        other => panic!("{other:?}"),
    }
    let c = parse(&format!("{url}&profile=ci"), &[]).unwrap();
    match &s3_of(&c).credentials {
        S3Credentials::Static {
            access_key_id,
            session_token,
            ..
        } => {
            assert_eq!(access_key_id, "CIKEY");
            assert_eq!(session_token.as_ref().map(Secret::expose), Some("tok"));
        }
        other => panic!("{other:?}"),
    }
    let err = parse(&format!("{url}&profile=broken"), &[]).unwrap_err();
    assert!(err.to_string().contains("[broken]"), "{err}");
    let err = parse(&format!("{url}&profile=absent"), &[]).unwrap_err();
    assert!(err.to_string().contains("[absent]"), "{err}");
    assert!(!err.to_string().contains(SECRET), "{err}");
    // From AWS_SHARED_CREDENTIALS_FILE + AWS_PROFILE, and from ~/.aws/credentials.
    let path = file.display().to_string();
    let c = parse(
        "s3://b?endpoint=http://127.0.0.1:1",
        &[
            ("AWS_SHARED_CREDENTIALS_FILE", &path),
            ("AWS_PROFILE", "ci"),
        ],
    )
    .unwrap();
    assert!(format!("{:?}", s3_of(&c).credentials).contains("CIKE"));
    std::fs::create_dir_all(dir.path().join(".aws")).unwrap();
    std::fs::copy(&file, dir.path().join(".aws/credentials")).unwrap();
    let home = dir.path().display().to_string();
    let c = parse("s3://b?endpoint=http://127.0.0.1:1", &[("HOME", &home)]).unwrap();
    assert!(format!("{:?}", s3_of(&c).credentials).contains("DEFA"));
    // An unreadable file.
    let err = parse(
        "s3://b?endpoint=http://127.0.0.1:1&credentials_file=/nonexistent/creds",
        &[],
    )
    .unwrap_err();
    assert!(matches!(err, ObjectsError::Credentials { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/creds"), "{err}");
}

#[test]
fn secrets_are_refused_in_urls_and_never_printed() {
    for url in [
        format!("s3://AKIA:{SECRET}@bucket/x"),
        format!("s3://bucket/x?secret_access_key={SECRET}"),
        format!("s3://bucket/x?AWS_SECRET_ACCESS_KEY={SECRET}"),
        format!("gs://bucket/x?service_account_key={SECRET}"),
        format!("az://c/x?account=a&sig={SECRET}"),
        format!("az://c/x?account=a&account_key={SECRET}"),
    ] {
        let err = parse(&url, &garage_env()).unwrap_err();
        assert!(
            matches!(err, ObjectsError::Credentials { .. }),
            "{url}: {err}"
        );
        let text = format!("{err} {err:?}");
        assert!(
            !text.contains(SECRET),
            "{url}: the error shows the secret: {text}"
        );
        assert!(text.contains("not accepted in the URL"), "{text}");
    }
    // An endpoint with user-info.
    let err = parse(
        &format!("s3://b?endpoint=http://u:{SECRET}@127.0.0.1:1"),
        &garage_env(),
    )
    .unwrap_err();
    assert!(!format!("{err} {err:?}").contains(SECRET), "{err:?}");
}

#[test]
fn debug_and_display_of_a_config_never_show_secrets() {
    let config = parse("s3://ckpt/p", &garage_env()).unwrap();
    let debug = format!("{config:?}");
    let pretty = format!("{config:#?}");
    let display = config.to_string();
    for text in [&debug, &pretty, &display] {
        assert!(!text.contains(SECRET), "secret leaked: {text}");
        assert!(
            !text.contains("GK0123456789abcdef"),
            "full key id shown: {text}"
        );
    }
    assert!(debug.contains("<redacted>"), "{debug}");
    assert!(debug.contains("GK01…"), "{debug}");
    assert_eq!(display, "s3://ckpt/p");

    let mut env = garage_env();
    env.push(("AWS_SESSION_TOKEN", SECRET));
    let config = parse("s3://ckpt/p", &env).unwrap();
    assert!(!format!("{config:?}").contains(SECRET));

    for (url, env) in [
        ("gs://b/p", vec![("GOOGLE_SERVICE_ACCOUNT_KEY", SECRET)]),
        (
            "az://c/p?account=acct",
            vec![("AZURE_STORAGE_ACCOUNT_KEY", SECRET)],
        ),
        (
            "az://c/p?account=acct",
            vec![("AZURE_STORAGE_SAS_TOKEN", SECRET)],
        ),
        (
            "az://c/p?account=acct",
            vec![
                ("AZURE_CLIENT_SECRET", SECRET),
                ("AZURE_CLIENT_ID", "id"),
                ("AZURE_TENANT_ID", "tenant"),
            ],
        ),
    ] {
        let config = parse(url, &env).unwrap();
        let text = format!("{config:?} {config:#?} {config}");
        assert!(!text.contains(SECRET), "{url}: secret leaked: {text}");
    }
    assert_eq!(format!("{:?}", Secret::new(SECRET)), "Secret(<redacted>)");
    assert_eq!(Secret::new(SECRET).to_string(), "<redacted>");
}

#[test]
fn redact_url_handles_anything() {
    assert_eq!(
        redact_url(&format!(
            "s3://AKIA:{SECRET}@bucket/x?region=r&secret={SECRET}"
        )),
        "s3://<redacted>@bucket/x?region=r&secret=<redacted>"
    );
    assert_eq!(redact_url("s3://bucket/x"), "s3://bucket/x");
    assert_eq!(redact_url("not a url"), "not a url");
    assert_eq!(
        redact_url(&format!("weird?token={SECRET}&a")),
        "weird?token=<redacted>&a"
    );
}

#[test]
fn gcs_urls() {
    let c = parse("gs://my-bucket/runs/a", &[]).unwrap();
    assert_eq!(c.scheme(), "gs");
    assert_eq!(c.prefix, "runs/a");
    match &c.backend {
        Backend::Gcs(g) => {
            assert_eq!(g.bucket, "my-bucket");
            assert_eq!(g.endpoint, None);
            assert!(!g.allow_http);
            assert_eq!(g.credentials, GcsCredentials::Ambient);
        }
        other => panic!("{other:?}"),
    }
    let c = parse(
        "gs://b?service_account=/etc/gcs/key.json&endpoint=http://127.0.0.1:4443",
        &[("GOOGLE_APPLICATION_CREDENTIALS", "/ignored.json")],
    )
    .unwrap();
    match &c.backend {
        Backend::Gcs(g) => {
            assert_eq!(
                g.credentials,
                GcsCredentials::ServiceAccountPath(PathBuf::from("/etc/gcs/key.json"))
            );
            assert_eq!(g.endpoint.as_deref(), Some("http://127.0.0.1:4443"));
            assert!(g.allow_http);
        }
        other => panic!("{other:?}"),
    }
    let c = parse("gs://b", &[("GOOGLE_APPLICATION_CREDENTIALS", "/adc.json")]).unwrap();
    assert!(matches!(
        &c.backend,
        Backend::Gcs(GcsConfig { credentials: GcsCredentials::ApplicationCredentials(p), .. })
            if p == &PathBuf::from("/adc.json")
    ));
    assert_param(
        parse("gs://b?service_account=key.json", &[]),
        "service_account",
        "absolute",
    );
    assert_param(
        parse("gs://b?region=x", &[]),
        "region",
        "unknown parameter for gs://",
    );
    assert_param(parse("gs://", &[]), "bucket", "missing");
    assert_param(
        parse("gs://b?endpoint=http://storage.example.com", &[]),
        "endpoint",
        "allow_http=true",
    );
}

#[test]
fn azure_urls() {
    let c = parse(
        "az://models/team?account=acct1",
        &[("AZURE_STORAGE_ACCOUNT_KEY", SECRET)],
    )
    .unwrap();
    assert_eq!(c.scheme(), "az");
    assert_eq!(c.prefix, "team");
    match &c.backend {
        Backend::Azure(a) => {
            assert_eq!(a.container, "models");
            assert_eq!(a.account, "acct1");
            assert!(!a.use_emulator);
            assert!(!a.allow_http);
            assert_eq!(
                a.credentials,
                AzureCredentials::AccessKey(Secret::new(SECRET))
            );
        }
        other => panic!("{other:?}"),
    }
    // Account from the environment, SAS token, client secret, ambient.
    let c = parse(
        "az://c",
        &[
            ("AZURE_STORAGE_ACCOUNT_NAME", "fromenv"),
            ("AZURE_STORAGE_SAS_TOKEN", "?sv=1&sig=abc"),
        ],
    )
    .unwrap();
    match &c.backend {
        Backend::Azure(a) => {
            assert_eq!(a.account, "fromenv");
            assert_eq!(
                a.credentials,
                AzureCredentials::Sas(Secret::new("sv=1&sig=abc"))
            );
        }
        other => panic!("{other:?}"),
    }
    let err = parse(
        "az://c?account=a",
        &[("AZURE_CLIENT_SECRET", SECRET), ("AZURE_CLIENT_ID", "id")],
    )
    .unwrap_err();
    assert!(err.to_string().contains("AZURE_TENANT_ID"), "{err}");
    // The emulator: default account, plain HTTP allowed.
    let c = parse("az://c?use_emulator=true", &[]).unwrap();
    match &c.backend {
        Backend::Azure(a) => {
            assert_eq!(a.account, "devstoreaccount1");
            assert!(a.use_emulator && a.allow_http);
            assert_eq!(a.credentials, AzureCredentials::Ambient);
        }
        other => panic!("{other:?}"),
    }
    assert_param(
        parse("az://c", &[]),
        "account",
        "AZURE_STORAGE_ACCOUNT_NAME",
    );
    assert_param(
        parse("az://c?account=bad-name!", &[]),
        "account",
        "storage account",
    );
    assert_param(parse("az:///x?account=a", &[]), "container", "missing");
    assert_param(
        parse("az://c?account=a&use_emulator=perhaps", &[]),
        "use_emulator",
        "true or false",
    );
    assert_param(
        parse("az://c?account=a&profile=x", &[]),
        "profile",
        "unknown parameter for az://",
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
    assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
    for bad in ["", "0", "-1s", "abc", "NaNs", "inf"] {
        assert_eq!(parse_duration(bad), None, "{bad:?}");
    }
}
