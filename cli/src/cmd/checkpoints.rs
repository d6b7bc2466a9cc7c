//! `trainyard checkpoints`.

use anyhow::Result;
use serde_json::Value;
use trainyard_proto::ListCheckpointsRequest;

use crate::args::CheckpointsArgs;
use crate::client::{Client, Target};
use crate::error::rpc;
use crate::output::{checkpoint_json, checkpoints_table, print_structured};

/// Runs `trainyard checkpoints`.
pub async fn run(target: &Target, args: CheckpointsArgs) -> Result<i32> {
    let mut client = Client::connect(target).await?;
    let mut cps = client
        .jobs
        .list_checkpoints(ListCheckpointsRequest {
            job_id: args.id.clone(),
        })
        .await
        .map_err(rpc)?
        .into_inner()
        .checkpoints;
    cps.sort_by_key(|c| (c.attempt, c.step));
    let value = Value::Array(cps.iter().map(checkpoint_json).collect());
    if !print_structured(args.output.output, &value)? {
        if cps.is_empty() {
            println!("job {} has no checkpoints yet", args.id);
        } else {
            println!("{}", checkpoints_table(&cps));
        }
    }
    Ok(0)
}
