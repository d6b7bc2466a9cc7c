//! `trainyard workers`.

use anyhow::Result;
use serde_json::Value;
use trainyard_proto::ListWorkersRequest;

use crate::args::WorkersArgs;
use crate::client::{Client, Target};
use crate::error::rpc;
use crate::output::{print_structured, worker_json, workers_table};

/// Runs `trainyard workers`.
pub async fn run(target: &Target, args: WorkersArgs) -> Result<i32> {
    let mut client = Client::connect(target).await?;
    let workers = client
        .cluster
        .list_workers(ListWorkersRequest {
            include_dead: args.all,
        })
        .await
        .map_err(rpc)?
        .into_inner()
        .workers;
    let value = Value::Array(workers.iter().map(worker_json).collect());
    if !print_structured(args.output.output, &value)? {
        if workers.is_empty() {
            println!(
                "no workers (start one with `trainyard worker --coordinator {}`)",
                target.url
            );
        } else {
            let total: usize = workers.iter().map(|w| w.devices.len()).sum();
            let used: usize = workers.iter().map(|w| w.used.len()).sum();
            println!("{}", workers_table(&workers));
            println!(
                "{} worker(s), {used}/{total} device slots in use",
                workers.len()
            );
        }
    }
    Ok(0)
}
