//! Watching a job live: a progress bar fed by Progress events, a live metric line, log
//! lines and state changes printed above the bar, and the results table at the end.
//!
//! When stderr is not a terminal the bars are hidden and the same information is printed
//! as plain lines on stdout (minus the per-step metric updates).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_stream::StreamExt;
use trainyard_proto::job_event::Kind;
use trainyard_proto::{GetJobRequest, Job, JobEvent, JobState, ResultTable, WatchJobRequest};

use crate::client::Client;
use crate::error::rpc;
use crate::output::{fmt_metric, job_state_name, utc_timestamp};

/// How many metrics the live line shows.
const LIVE_METRICS: usize = 6;

/// What a follow session saw.
pub struct Followed {
    /// The job as the coordinator reports it after the stream ended.
    pub job: Job,
    /// The results table, if the job published one.
    pub result: Option<ResultTable>,
}

/// Style of the progress bar once the job reports progress.
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner:.green} {msg:24!} [{bar:32.cyan/blue}] {pos:>6}/{len:<6} {percent:>3}% eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// The live display of one job.
struct Display {
    multi: MultiProgress,
    bar: ProgressBar,
    metrics_line: ProgressBar,
    stage: String,
    metrics: BTreeMap<String, f64>,
    step: u64,
    rank_prefix: bool,
    quiet: bool,
}

impl Display {
    fn new(multi_rank: bool, quiet: bool) -> Display {
        let multi = if quiet {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        } else {
            MultiProgress::new()
        };
        let bar = multi.add(ProgressBar::new(0));
        // A spinner until the job reports its first progress, then a bar.
        bar.set_style(
            ProgressStyle::with_template("{spinner:.green} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message("waiting for the job to start");
        bar.enable_steady_tick(Duration::from_millis(120));
        let metrics_line = multi.add(ProgressBar::new(0));
        metrics_line.set_style(
            ProgressStyle::with_template("  {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Display {
            multi,
            bar,
            metrics_line,
            stage: String::new(),
            metrics: BTreeMap::new(),
            step: 0,
            rank_prefix: multi_rank,
            quiet,
        }
    }

    fn hidden(&self) -> bool {
        self.multi.is_hidden()
    }

    /// Prints a line above the bars (or plainly when there are no bars).
    fn say(&self, line: &str) {
        if self.quiet {
            return;
        }
        if self.hidden() {
            println!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }

    fn event(&mut self, ev: &JobEvent, result: &mut Option<ResultTable>) {
        let Some(kind) = &ev.kind else { return };
        match kind {
            Kind::Transition(t) => {
                // HH:MM:SS of the UTC timestamp.
                let stamp = utc_timestamp(ev.at_unix_ms);
                let time = stamp.split(' ').nth(1).unwrap_or(&stamp);
                let reason = t.reason.lines().next().unwrap_or_default();
                let reason = if reason.is_empty() {
                    String::new()
                } else {
                    format!(" — {reason}")
                };
                let from = match JobState::try_from(t.from) {
                    Ok(JobState::Unspecified) | Err(_) => String::new(),
                    Ok(s) => format!("{} → ", s.short_name()),
                };
                self.say(&format!("[{time}] {from}{}{reason}", job_state_name(t.to)));
            }
            Kind::Log(l) => {
                if self.rank_prefix {
                    self.say(&format!("[rank {}] {}", l.rank, l.line));
                } else {
                    self.say(&l.line);
                }
            }
            Kind::Metric(m) => {
                self.step = self.step.max(m.step);
                for (k, v) in &m.values {
                    self.metrics.insert(k.clone(), *v);
                }
                self.update_metrics_line();
            }
            Kind::Progress(p) => {
                if p.stage != self.stage {
                    if self.stage.is_empty() {
                        self.bar.set_style(bar_style());
                    }
                    self.stage = p.stage.clone();
                    self.bar.reset();
                    self.bar.set_message(p.stage.clone());
                    if self.hidden() && !self.quiet {
                        println!("▸ {}", p.stage);
                    }
                }
                self.bar.set_length(p.total);
                self.bar.set_position(p.done);
            }
            Kind::Checkpoint(c) => {
                self.say(&format!("✓ checkpoint at step {} ({})", c.step, c.path));
            }
            Kind::Artifact(a) => {
                self.say(&format!(
                    "✓ {} saved ({}, {})",
                    a.name,
                    crate::output::human_bytes(a.size_bytes),
                    a.url
                ));
            }
            Kind::Result(r) => *result = Some(r.clone()),
        }
    }

    fn update_metrics_line(&self) {
        if self.hidden() {
            return;
        }
        // Prefer the most informative metrics: losses and accuracies first.
        let mut names: Vec<&String> = self.metrics.keys().collect();
        names.sort_by_key(|n| {
            let rank = if n.contains("loss") {
                0
            } else if n.contains("acc") {
                1
            } else {
                2
            };
            (rank, (*n).clone())
        });
        let parts: Vec<String> = names
            .iter()
            .take(LIVE_METRICS)
            .map(|n| format!("{}={}", n, fmt_metric(self.metrics[*n])))
            .collect();
        let line = format!("step {:<6} {}", self.step, parts.join("  "));
        self.metrics_line.set_message(line);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
        self.metrics_line.finish_and_clear();
        let _ = self.multi.clear();
    }
}

/// Watches job `id` from the start of its history until it ends; returns the final job.
/// `quiet` draws and prints nothing (for `-o json --follow`).
pub async fn follow_job(client: &mut Client, id: &str, quiet: bool) -> Result<Followed> {
    let job = client
        .jobs
        .get_job(GetJobRequest { id: id.to_string() })
        .await
        .map_err(rpc)?
        .into_inner();
    let multi_rank = job.spec.as_ref().map(|s| s.ranks > 1).unwrap_or(false);
    let mut stream = client
        .jobs
        .watch_job(WatchJobRequest {
            id: id.to_string(),
            follow: true,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let mut display = Display::new(multi_rank, quiet);
    let mut result = None;
    let outcome = loop {
        match stream.next().await {
            Some(Ok(ev)) => display.event(&ev, &mut result),
            Some(Err(status)) => break Err(rpc(status)),
            None => break Ok(()),
        }
    };
    display.finish();
    outcome.map_err(|e| anyhow!("lost the watch on job {id}: {e:#}"))?;
    let job = client
        .jobs
        .get_job(GetJobRequest { id: id.to_string() })
        .await
        .map_err(rpc)?
        .into_inner();
    let result = result.or_else(|| job.result.clone());
    Ok(Followed { job, result })
}
