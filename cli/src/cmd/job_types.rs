//! `trainyard job-types`: the jobs this binary (or, with `--remote`, the cluster) can run.

use anyhow::Result;
use serde_json::Value;
use trainyard_proto::ListJobTypesRequest;

use crate::args::JobTypesArgs;
use crate::client::{Client, Target};
use crate::error::rpc;
use crate::output::{job_type_json, job_types_text, print_structured};

/// Runs `trainyard job-types`.
pub async fn run(target: &Target, args: JobTypesArgs) -> Result<i32> {
    // The cluster's job types; this binary's own when asked, or when no coordinator answers
    // (so `trainyard job-types` is useful before any cluster exists).
    let types = if args.local {
        trainyard_coordinator::job_types::job_types()
    } else {
        match Client::connect(target).await {
            Ok(mut client) => {
                client
                    .jobs
                    .list_job_types(ListJobTypesRequest {})
                    .await
                    .map_err(rpc)?
                    .into_inner()
                    .job_types
            }
            Err(_) => {
                eprintln!(
                    "note: no coordinator answers at {}; showing the job types built into this binary",
                    crate::client::normalize_url(&target.url)
                );
                trainyard_coordinator::job_types::job_types()
            }
        }
    };
    let value = Value::Array(types.iter().map(job_type_json).collect());
    if !print_structured(args.output.output, &value)? {
        print!("{}", job_types_text(&types));
    }
    Ok(0)
}
