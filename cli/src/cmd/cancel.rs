//! `trainyard cancel`.

use anyhow::Result;
use trainyard_proto::CancelJobRequest;

use crate::args::CancelArgs;
use crate::client::{Client, Target};
use crate::error::rpc;
use crate::output::{job_json, job_state_name, print_structured};

/// Runs `trainyard cancel`.
pub async fn run(target: &Target, args: CancelArgs) -> Result<i32> {
    let mut client = Client::connect(target).await?;
    let request = CancelJobRequest {
        id: args.id.clone(),
        reason: args.reason,
    };
    let resp = client
        .call(|mut c| {
            let request = request.clone();
            async move { c.jobs.cancel_job(request).await }
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let Some(job) = resp.job else {
        println!("cancel requested for job {}", args.id);
        return Ok(0);
    };
    if !print_structured(args.output.output, &job_json(&job))? {
        println!("job {} is {}", job.id, job_state_name(job.state));
    }
    Ok(0)
}
