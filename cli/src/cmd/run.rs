//! `trainyard run`: start a throw-away local cluster, run one job to its end with live
//! progress, print its results, stop the cluster. Exit code 0 iff the job succeeded.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use trainyard_proto::CancelJobRequest;

use crate::args::RunArgs;
use crate::client::Client;
use crate::cluster::LocalCluster;
use crate::cmd::submit::follow_to_end;
use crate::output::{now_unix_ms, utc_timestamp};

/// Heartbeat timeout of the throw-away cluster of `trainyard run`.
const RUN_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(60);

/// Default data directory of a run: `.trainyard/runs/<job>-<YYYYmmdd-HHMMSS>`.
pub fn default_data_dir(job: &str) -> PathBuf {
    let stamp = utc_timestamp(now_unix_ms())
        .replace(['-', ':'], "")
        .replace(' ', "-");
    PathBuf::from(".trainyard")
        .join("runs")
        .join(format!("{job}-{stamp}"))
}

/// Runs `trainyard run`.
pub async fn run(args: RunArgs) -> Result<i32> {
    // Bad input fails before anything starts.
    let spec = crate::spec::build_spec(&args.spec)?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| default_data_dir(&spec.job));
    // The workers live in this process and cannot die without it: a generous heartbeat
    // timeout keeps a busy machine (training on every core) from declaring them dead.
    let mut cluster =
        LocalCluster::start_private(&data_dir, &args.cluster, RUN_HEARTBEAT_TIMEOUT).await?;
    println!(
        "local cluster at {} (data: {})",
        cluster.url,
        cluster.data_dir.display()
    );
    let outcome = run_on(&mut cluster, spec).await;
    let stopped = cluster.stop().await;
    let code = outcome?;
    stopped?;
    Ok(code)
}

async fn run_on(cluster: &mut LocalCluster, spec: trainyard_proto::JobSpec) -> Result<i32> {
    cluster.wait_ready().await?;
    let mut client = Client::connect(&crate::client::Target::plain(&cluster.url)).await?;
    let summary = format!(
        "{} (preset {}{})",
        spec.job,
        spec.preset,
        if spec.config.is_empty() {
            String::new()
        } else {
            let mut kv: Vec<String> = spec
                .config
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            kv.sort();
            format!(", {}", kv.join(" "))
        }
    );
    let job = client.submit(spec).await?;
    println!("running job {} — {summary}", job.id);
    let code = follow_to_end(&mut client, &job.id, true).await?;
    if code == 130 {
        // Ctrl-C: the cluster goes away with us, so cancel the job cleanly first.
        let _ = client
            .jobs
            .cancel_job(CancelJobRequest {
                id: job.id.clone(),
                reason: "interrupted (Ctrl-C)".into(),
            })
            .await;
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_data_dir_is_per_job_and_timestamped() {
        let d = default_data_dir("neural-ode");
        let name = d.file_name().unwrap().to_str().unwrap().to_string();
        assert!(d.starts_with(".trainyard/runs"), "{d:?}");
        // neural-ode-YYYYmmdd-HHMMSS
        let stamp = name.strip_prefix("neural-ode-").unwrap();
        assert_eq!(stamp.len(), 15, "{name}");
        assert!(
            stamp.chars().all(|c| c.is_ascii_digit() || c == '-'),
            "{name}"
        );
    }
}
