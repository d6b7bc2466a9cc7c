//! `trainyard logs`: a job's log lines, from the beginning (and live with `-f`).

use anyhow::Result;
use tokio_stream::StreamExt;
use trainyard_proto::job_event::Kind;
use trainyard_proto::{GetJobRequest, WatchJobRequest};

use crate::args::LogsArgs;
use crate::client::{Client, Target};
use crate::error::rpc;

/// Runs `trainyard logs`.
pub async fn run(target: &Target, args: LogsArgs) -> Result<i32> {
    let mut client = Client::connect(target).await?;
    // Fails with NotFound (exit 2) for an unknown id before we start streaming.
    let job = client
        .jobs
        .get_job(GetJobRequest {
            id: args.id.clone(),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let multi_rank = job.spec.as_ref().map(|s| s.ranks > 1).unwrap_or(false);
    let mut stream = client
        .jobs
        .watch_job(WatchJobRequest {
            id: args.id,
            follow: args.follow,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            _ = tokio::signal::ctrl_c() => return Ok(130),
        };
        match ev {
            Some(Ok(ev)) => {
                if let Some(Kind::Log(l)) = ev.kind {
                    if args.rank.is_some_and(|r| r != l.rank) {
                        continue;
                    }
                    if multi_rank {
                        println!("[rank {}] {}", l.rank, l.line);
                    } else {
                        println!("{}", l.line);
                    }
                }
            }
            Some(Err(status)) => return Err(rpc(status)),
            None => return Ok(0),
        }
    }
}
