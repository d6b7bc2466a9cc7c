//! `trainyard describe`: one job in detail.

use anyhow::Result;
use trainyard_proto::GetJobRequest;

use crate::args::DescribeArgs;
use crate::client::{Client, Target};
use crate::error::rpc;
use crate::output::{describe_text, job_json, print_structured};

/// Runs `trainyard describe`.
pub async fn run(target: &Target, args: DescribeArgs) -> Result<i32> {
    let mut client = Client::connect(target).await?;
    let job = client
        .jobs
        .get_job(GetJobRequest { id: args.id })
        .await
        .map_err(rpc)?
        .into_inner();
    if !print_structured(args.output.output, &job_json(&job))? {
        print!("{}", describe_text(&job));
    }
    Ok(0)
}
