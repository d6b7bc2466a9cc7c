//! `trainyard coordinator`: the API server, scheduler and state store, in the foreground.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use trainyard_coordinator::CoordinatorConfig;

use crate::args::{CoordinatorArgs, TlsArgs};
use crate::cluster::{absolute, location_url, shutdown_signal};
use crate::error::bad_input;

/// Builds the coordinator's config from the flags.
pub fn config(args: &CoordinatorArgs, tls: &TlsArgs) -> Result<CoordinatorConfig> {
    let data_dir = absolute(&args.data_dir)?;
    let mut config = CoordinatorConfig::with_data_dir(&data_dir);
    config.listen = args.listen;
    config.metrics_listen = args.metrics_listen;
    config.insecure = args.insecure;
    if let Some(path) = &args.auth_file {
        let creds = trainyard_auth::Credentials::load(path)
            .map_err(|e| bad_input(format!("--auth-file: {e}")))?;
        config.credentials = Some(std::sync::Arc::new(creds));
    }
    if tls.tls_ca.is_some() {
        return Err(bad_input(
            "--tls-ca: is for clients; the coordinator verifies client certificates with \
             --tls-client-ca",
        ));
    }
    config.tls = match (&tls.tls_cert, &tls.tls_key) {
        (Some(cert), Some(key)) => Some(trainyard_auth::tls::ServerTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        }),
        (None, None) if args.tls_client_ca.is_some() => {
            return Err(bad_input(
                "--tls-client-ca: needs TLS on (--tls-cert and --tls-key)",
            ))
        }
        (None, None) => None,
        (Some(_), None) => return Err(bad_input("--tls-key: missing (--tls-cert needs its key)")),
        (None, Some(_)) => {
            return Err(bad_input(
                "--tls-cert: missing (--tls-key needs its certificate)",
            ))
        }
    };
    let l = &args.limits;
    for (flag, v) in [
        ("--max-request-bytes", l.max_request_bytes),
        ("--max-log-line-bytes", l.max_log_line_bytes),
        ("--max-report-events", l.max_report_events),
        ("--max-metric-values", l.max_metric_values),
    ] {
        if v == 0 {
            return Err(bad_input(format!("{flag}: must be at least 1")));
        }
    }
    config.limits = trainyard_coordinator::limits::Limits {
        max_request_bytes: l.max_request_bytes,
        max_log_line_bytes: l.max_log_line_bytes,
        max_report_events: l.max_report_events,
        max_metric_values: l.max_metric_values,
        max_pending_jobs_per_user: l.max_pending_jobs_per_user,
    };
    if let Some(s) = &args.store {
        config.store_url = location_url(s)?;
        trainyard_coordinator::store::StoreUrl::parse(&config.store_url)
            .map_err(|e| bad_input(format!("--store: {e}")))?;
    }
    if let Some(o) = &args.objects {
        config.objects_url = location_url(o)?;
    }
    if let Some(a) = &args.advertise {
        let a = a.trim().trim_start_matches("http://").trim_end_matches('/');
        if a.is_empty() || !a.contains(':') {
            return Err(bad_input(format!(
                "--advertise {a:?}: expected host:port (the address others reach this coordinator at)"
            )));
        }
        config.advertise = Some(a.to_string());
    }
    if let Some(secs) = args.heartbeat_timeout {
        if !(secs.is_finite() && secs > 0.0) {
            return Err(bad_input(format!(
                "--heartbeat-timeout {secs}: must be a positive number of seconds"
            )));
        }
        config.heartbeat_timeout = Duration::from_secs_f64(secs);
        // Keep a few heartbeats inside one timeout.
        if config.heartbeat_interval.as_secs_f64() * 3.0 > secs {
            config.heartbeat_interval = Duration::from_secs_f64(secs / 3.0);
        }
    }
    Ok(config)
}

/// Runs `trainyard coordinator` until Ctrl-C or SIGTERM.
pub async fn run(args: CoordinatorArgs, tls: &TlsArgs) -> Result<i32> {
    let config = config(&args, tls)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let store = trainyard_coordinator::store::redact_url(&config.store_url);
    let objects = config.objects_url.clone();
    let handle = trainyard_coordinator::start(config)
        .await
        .with_context(|| format!("starting the coordinator on {}", args.listen))?;
    let addr = handle.local_addr();
    // The first line of stdout is machine-readable: scripts and tests read the address here.
    println!("trainyard coordinator listening on {addr}");
    if let Some(metrics) = handle.metrics_addr() {
        println!("trainyard coordinator metrics on http://{metrics}/metrics");
    }
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, %store, %objects, "coordinator ready");
    shutdown_signal().await;
    tracing::info!("shutting down");
    handle
        .shutdown()
        .await
        .context("stopping the coordinator")?;
    Ok(0)
}
