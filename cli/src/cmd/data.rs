//! `trainyard data push <dir> <url>` and `trainyard data info <url>`: data sets in object
//! storage (see `trainyard_objects::datasets`).

use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use trainyard_objects::datasets::{self, DatasetError};
use trainyard_objects::ObjectsError;

use crate::args::{DataArgs, DataCommand};
use crate::error::bad_input;

/// Runs `trainyard data ...`.
pub async fn run(args: DataArgs) -> Result<i32> {
    match args.command {
        DataCommand::Push { dir, url } => push(&dir, &url).await,
        DataCommand::Info { url } => info(&url).await,
    }
}

/// Bad URLs, unusable folders and missing data sets are the user's input: exit 2.
fn classify(e: DatasetError) -> anyhow::Error {
    match &e {
        DatasetError::Objects(
            ObjectsError::InvalidUrl { .. }
            | ObjectsError::UnsupportedScheme { .. }
            | ObjectsError::InvalidParameter { .. }
            | ObjectsError::Credentials { .. },
        )
        | DatasetError::Empty { .. }
        | DatasetError::NotFound { .. } => bad_input(e.to_string()),
        DatasetError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            bad_input(e.to_string())
        }
        _ => anyhow::Error::new(e),
    }
}

async fn push(dir: &std::path::Path, url: &str) -> Result<i32> {
    if !dir.is_dir() {
        return Err(bad_input(format!("{}: not a folder", dir.display())));
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("pushing");
    let started = Instant::now();
    let pushed = datasets::push(dir, url, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await
    .map_err(classify)?;
    bar.finish_and_clear();
    println!(
        "pushed {} files, {} bytes to {} in {:.1} s; digest {}",
        pushed.manifest.files.len(),
        pushed.manifest.total_bytes(),
        trainyard_objects::redact_url(url),
        started.elapsed().as_secs_f64(),
        pushed.digest
    );
    println!("use it in a job with: --set dataset={url}");
    Ok(0)
}

async fn info(url: &str) -> Result<i32> {
    let (manifest, digest) = datasets::manifest(url).await.map_err(classify)?;
    println!(
        "{}: {} files, {} bytes, digest {digest}",
        trainyard_objects::redact_url(url),
        manifest.files.len(),
        manifest.total_bytes()
    );
    for f in &manifest.files {
        println!("  {:<40} {:>12}  sha256 {}", f.path, f.size, f.sha256);
    }
    Ok(0)
}
