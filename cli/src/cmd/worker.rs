//! `trainyard worker`: the agent that runs ranks for a coordinator, in the foreground.

use std::path::PathBuf;

use anyhow::{Context, Result};
use trainyard_worker::{collective_host_for, parse_device_slots, run_worker, WorkerConfig};

use crate::args::WorkerArgs;
use crate::client::split_urls;
use crate::cluster::{absolute, rank_command, shutdown_signal};
use crate::error::{bad_input, devices_error};

/// This machine's host name (falls back to "worker").
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "worker".to_string())
}

/// Runs `trainyard worker` until Ctrl-C or SIGTERM.
pub async fn run(
    url: &str,
    tls: trainyard_auth::tls::ClientTlsFiles,
    args: WorkerArgs,
) -> Result<i32> {
    let slots = parse_device_slots(args.devices.as_deref(), args.emulate_gpus)
        .map_err(|e| bad_input(devices_error(&e.to_string())))?;
    let name = args.name.unwrap_or_else(hostname);
    let work_dir = args
        .work_dir
        .unwrap_or_else(|| PathBuf::from(".trainyard").join("workers").join(&name));
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating work directory {}", work_dir.display()))?;
    let coordinator_url = split_urls(url).join(",");
    let collective_host = match args.collective_host {
        Some(h) if !h.trim().is_empty() => h.trim().to_string(),
        Some(_) => {
            return Err(bad_input(
                "--collective-host: must not be empty (a host name or IP address)",
            ))
        }
        None => collective_host_for(&coordinator_url),
    };
    let config = WorkerConfig {
        coordinator_url,
        name: name.clone(),
        devices: slots.devices,
        cuda_ordinals: slots.cuda_ordinals,
        work_dir: absolute(&work_dir)?,
        rank_command: rank_command()?,
        collective_host,
        metrics_listen: args.metrics_listen,
        join_token: trainyard_auth::client::token_from(
            args.join_token_file.as_deref(),
            "--join-token-file",
            "TRAINYARD_JOIN_TOKEN",
        )
        .map_err(|e| bad_input(e.to_string()))?,
        tls,
    };
    tracing::info!(%name, coordinator = %config.coordinator_url, devices = config.devices.len(), collective_host = %config.collective_host, "worker starting");
    run_worker(config, shutdown_signal())
        .await
        .context("worker failed")?;
    Ok(0)
}
