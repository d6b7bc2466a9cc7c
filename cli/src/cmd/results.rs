//! `trainyard results`: a job's results table and the files it stored with it (plots, JSON),
//! optionally downloaded.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;
use trainyard_proto::{Artifact, GetJobRequest};

use crate::args::ResultsArgs;
use crate::client::{Client, Target};
use crate::error::{bad_input, rpc};
use crate::output::{
    artifact_json, human_bytes, job_state_name, print_structured, result_json, result_text,
};

/// Runs `trainyard results`.
pub async fn run(target: &Target, args: ResultsArgs) -> Result<i32> {
    let mut client = Client::connect(target).await?;
    let job = client
        .jobs
        .get_job(GetJobRequest {
            id: args.id.clone(),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let mut downloaded = Vec::new();
    if let Some(dir) = &args.download {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating --download folder {}", dir.display()))?;
        for a in &job.artifacts {
            let to = dir.join(&a.name);
            download(a, &to).await?;
            downloaded.push(to);
        }
    }
    let value = json!({
        "id": job.id,
        "state": job_state_name(job.state),
        "result": job.result.as_ref().map(result_json),
        "artifacts": job.artifacts.iter().map(artifact_json).collect::<Vec<_>>(),
    });
    if print_structured(args.output.output, &value)? {
        return Ok(0);
    }
    match &job.result {
        Some(r) => {
            if !r.title.is_empty() {
                println!("{}", r.title);
            }
            println!("{}", result_text(r));
        }
        None => println!(
            "job {} has no results table yet (state {})",
            job.id,
            job_state_name(job.state)
        ),
    }
    if job.artifacts.is_empty() {
        println!("no files stored with the results");
    } else {
        println!("files stored with the results:");
        for a in &job.artifacts {
            println!(
                "  {:<32} {:>10}  {}",
                a.name,
                human_bytes(a.size_bytes),
                a.url
            );
        }
    }
    for path in &downloaded {
        println!("downloaded {}", path.display());
    }
    Ok(0)
}

/// The objects URL an artifact's URL is under: the URL without its `/<path>` suffix.
fn base_url(a: &Artifact) -> Option<&str> {
    a.url
        .strip_suffix(&a.path)
        .map(|base| base.trim_end_matches('/'))
        .filter(|base| !base.is_empty())
}

async fn download(a: &Artifact, to: &Path) -> Result<()> {
    trainyard_jobs::check_artifact_name(&a.name).map_err(|e| bad_input(e.to_string()))?;
    let base = base_url(a).with_context(|| {
        format!(
            "{}: the coordinator did not give its full URL (url {:?}, path {:?})",
            a.name, a.url, a.path
        )
    })?;
    let objects = trainyard_objects::open_objects(base)
        .with_context(|| format!("opening {}", trainyard_objects::redact_url(base)))?;
    let got = objects
        .get(&a.path)
        .await
        .with_context(|| format!("downloading {}", a.url))?
        .with_context(|| format!("{} is gone from the object store", a.url))?;
    std::fs::write(to, &got.bytes).with_context(|| format!("writing {}", to.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_url_is_the_url_without_the_path() {
        let a = Artifact {
            name: "p.png".into(),
            path: "jobs/j/results/p.png".into(),
            url: "s3://bucket/pre/jobs/j/results/p.png".into(),
            ..Default::default()
        };
        assert_eq!(base_url(&a), Some("s3://bucket/pre"));
        let relative = Artifact {
            url: "jobs/j/results/p.png".into(),
            ..a
        };
        assert_eq!(base_url(&relative), None);
    }
}
