//! `trainyard jobs`: list jobs, optionally by state.

use anyhow::Result;
use serde_json::Value;
use trainyard_proto::{JobState, ListJobsRequest};

use crate::args::JobsArgs;
use crate::client::{Client, Target};
use crate::error::{bad_input, rpc};
use crate::output::{job_json, jobs_table, print_structured};

/// Runs `trainyard jobs`.
pub async fn run(target: &Target, args: JobsArgs) -> Result<i32> {
    let mut states = Vec::new();
    for s in &args.states {
        let st = JobState::parse_name(s).ok_or_else(|| {
            bad_input(format!(
                "--state {s:?}: not a job state (pending, scheduled, running, succeeded, failed, cancelled)"
            ))
        })?;
        states.push(st as i32);
    }
    let mut client = Client::connect(target).await?;
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let want = args.limit.saturating_sub(jobs.len() as u32);
        if want == 0 {
            break;
        }
        let resp = client
            .jobs
            .list_jobs(ListJobsRequest {
                states: states.clone(),
                page_size: want.min(1000),
                page_token: page_token.clone(),
                owner: args.user.clone().unwrap_or_default(),
            })
            .await
            .map_err(rpc)?
            .into_inner();
        jobs.extend(resp.jobs);
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    jobs.truncate(args.limit as usize);
    let value = Value::Array(jobs.iter().map(job_json).collect());
    if !print_structured(args.output.output, &value)? {
        if jobs.is_empty() {
            println!("no jobs");
        } else {
            println!("{}", jobs_table(&jobs));
        }
    }
    Ok(0)
}
