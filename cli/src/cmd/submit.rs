//! `trainyard submit`: validate locally, submit, optionally follow.

use anyhow::Result;
use trainyard_proto::JobState;

use crate::args::{OutputFormat, SubmitArgs};
use crate::client::{Client, Target};
use crate::follow::follow_job;
use crate::output::{compact_duration, job_json, job_state_name, print_structured, result_text};

/// Runs `trainyard submit`; returns the process exit code.
pub async fn run(target: &Target, args: SubmitArgs) -> Result<i32> {
    let spec = crate::spec::build_spec(&args.spec)?;
    let mut client = Client::connect(target).await?;
    let job = client.submit(spec).await?;
    let format = args.output.output;
    if !args.follow {
        if !print_structured(format, &job_json(&job))? {
            println!("submitted job {} ({})", job.id, job_state_name(job.state));
            println!("  follow it:   trainyard logs -f {}", job.id);
            println!("  inspect it:  trainyard describe {}", job.id);
        }
        return Ok(0);
    }
    if format != OutputFormat::Table {
        // Structured output: wait silently, then print the final job.
        let followed = follow_job(&mut client, &job.id, true).await?;
        print_structured(format, &job_json(&followed.job))?;
        return Ok(exit_code_of(&followed.job));
    }
    println!("submitted job {}", job.id);
    follow_to_end(&mut client, &job.id, false).await
}

/// 0 if the job succeeded, 1 otherwise.
fn exit_code_of(job: &trainyard_proto::Job) -> i32 {
    if job.state == JobState::Succeeded as i32 {
        0
    } else {
        1
    }
}

/// Follows a job to its end, prints the results and a summary; exit code 0 iff it
/// succeeded, 130 on Ctrl-C (`owns_cluster`: the cluster stops with us, so the job will
/// be cancelled rather than keep running).
pub async fn follow_to_end(client: &mut Client, id: &str, owns_cluster: bool) -> Result<i32> {
    let followed = tokio::select! {
        f = follow_job(client, id, false) => f?,
        _ = crate::cluster::shutdown_signal() => {
            if owns_cluster {
                eprintln!("\ninterrupted: cancelling job {id} and stopping the local cluster");
            } else {
                eprintln!("\nstopped following; job {id} keeps running (`trainyard logs -f {id}`, `trainyard cancel {id}`)");
            }
            return Ok(130);
        }
    };
    if let Some(r) = &followed.result {
        println!();
        print!("{}", result_text(r));
    }
    let job = &followed.job;
    let state = JobState::try_from(job.state).unwrap_or(JobState::Unspecified);
    let took = job
        .transitions
        .last()
        .map(|t| t.at_unix_ms - job.created_unix_ms)
        .unwrap_or(0);
    let reason = if job.state_reason.is_empty() {
        String::new()
    } else {
        format!(": {}", job.state_reason)
    };
    println!(
        "\njob {} {} after {}{reason}",
        job.id,
        state.short_name(),
        compact_duration(took)
    );
    Ok(exit_code_of(job))
}
