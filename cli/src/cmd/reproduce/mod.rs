//! `trainyard reproduce`: submits the paper jobs with one preset, follows them with a
//! progress bar each, and prints one table of the papers' claims: the paper's number, ours
//! for the treatment and the baseline, and whether the claim held. `--markdown FILE` also
//! writes the table (with the date, the machine and the seeds) for `docs/results.md`.
//! `--seeds 0-4` runs every job once per seed and adds a table of each claim over the seeds
//! ([`seeds`]).

mod seeds;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use trainyard_proto::job_event::Kind;
use trainyard_proto::{Claim, GetJobRequest, Job, JobSpec, JobState, WatchJobRequest};

use crate::args::OutputFormat;
use crate::args::ReproduceArgs;
use crate::client::{Client, Target};
use crate::cluster::LocalCluster;
use crate::error::{bad_input, rpc};
use crate::output::{job_state_name, new_table, print_structured};

/// Heartbeat timeout of the local cluster (its workers live in this process).
const LOCAL_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(120);

/// One row of the final table: a claim of one job run.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    /// The job's label (`gm-dgm`, `neural-ode cnf`), without the seed.
    job: String,
    /// The seed `--seeds` gave the run (`None`: the job's own).
    seed: Option<u64>,
    job_id: String,
    state: String,
    /// False for the placeholder row of a job that reported no claim (failed, or none).
    checked: bool,
    claim: Claim,
}

/// Runs `trainyard reproduce`.
pub async fn run(target: &Target, args: ReproduceArgs) -> Result<i32> {
    let registry = trainyard_jobs::registry();
    let names: Vec<String> = if args.jobs.is_empty() {
        registry.names().iter().map(|n| n.to_string()).collect()
    } else {
        args.jobs.clone()
    };
    for name in &names {
        let job = registry.get(name).ok_or_else(|| {
            bad_input(format!(
                "jobs: unknown job {name:?} (known: {})",
                registry.names().join(", ")
            ))
        })?;
        if !job.schema().presets().contains(&args.preset.as_str()) {
            return Err(bad_input(format!(
                "--preset: job {name} has no preset {:?} (it has {})",
                args.preset,
                job.schema().presets().join(", ")
            )));
        }
    }
    let mut overrides = Vec::new();
    for arg in &args.set {
        let (k, v) = crate::spec::parse_set(arg)?;
        let known = names.iter().any(|n| {
            registry
                .get(n)
                .is_some_and(|j| j.schema().key(&k).is_some())
        });
        if !known {
            return Err(bad_input(format!(
                "--set {k}: none of the jobs ({}) has this config key",
                names.join(", ")
            )));
        }
        overrides.push((k, v));
    }
    let seeds = match &args.seeds {
        None => None,
        Some(list) => {
            if overrides.iter().any(|(k, _)| k == SEED_KEY) {
                return Err(bad_input(
                    "--seeds: conflicts with --set seed=...; give the seeds with --seeds alone",
                ));
            }
            if let Some(name) = names.iter().find(|n| {
                registry
                    .get(n)
                    .is_some_and(|j| j.schema().key(SEED_KEY).is_none())
            }) {
                return Err(bad_input(format!(
                    "--seeds: job {name} has no {SEED_KEY} config key"
                )));
            }
            Some(seeds::parse_seeds(list)?)
        }
    };
    let mut local = None;
    let target = if args.local {
        let data_dir = args.data_dir.clone().unwrap_or_else(|| {
            let stamp = chrono_stamp();
            std::path::PathBuf::from(".trainyard/reproduce").join(stamp)
        });
        let mut cluster =
            LocalCluster::start_private(&data_dir, &args.cluster, LOCAL_HEARTBEAT_TIMEOUT).await?;
        cluster.wait_ready().await?;
        eprintln!(
            "local cluster at {} (data: {})",
            cluster.url,
            cluster.data_dir.display()
        );
        let target = Target::plain(&cluster.url);
        local = Some(cluster);
        target
    } else {
        target.clone()
    };
    let outcome = reproduce_on(&target, &names, &overrides, seeds.as_deref(), &args).await;
    if let Some(cluster) = local {
        cluster.stop().await?;
    }
    outcome
}

/// One job run: the job's label, the seed `--seeds` gave it, the job's id.
#[derive(Debug, Clone)]
struct Submitted {
    label: String,
    seed: Option<u64>,
    id: String,
}

impl Submitted {
    /// The label with the seed, for progress bars and messages.
    fn display(&self) -> String {
        match self.seed {
            Some(s) => format!("{} seed {s}", self.label),
            None => self.label.clone(),
        }
    }
}

async fn reproduce_on(
    target: &Target,
    names: &[String],
    overrides: &[(String, String)],
    seeds: Option<&[u64]>,
    args: &ReproduceArgs,
) -> Result<i32> {
    let registry = trainyard_jobs::registry();
    let mut client = Client::connect(target).await?;
    let mut submitted = Vec::new();
    let seed_list: Vec<Option<u64>> = match seeds {
        Some(s) => s.iter().copied().map(Some).collect(),
        None => vec![None],
    };
    for ((name, experiment), seed) in runs(names, overrides)
        .into_iter()
        .flat_map(|run| seed_list.iter().map(move |s| (run.clone(), *s)))
    {
        // Each job takes the overrides of the keys it has, and its experiment.
        let mut config: std::collections::HashMap<String, String> = overrides
            .iter()
            .filter(|(k, _)| {
                registry
                    .get(&name)
                    .is_some_and(|j| j.schema().key(k).is_some())
            })
            .cloned()
            .collect();
        let label = match &experiment {
            Some(e) => {
                config.insert(EXPERIMENT_KEY.to_string(), e.clone());
                format!("{name} {e}")
            }
            None => name.clone(),
        };
        let run = Submitted {
            label,
            seed,
            id: String::new(),
        };
        if let Some(seed) = seed {
            config.insert(SEED_KEY.to_string(), seed.to_string());
        }
        let spec = JobSpec {
            config,
            job: name.clone(),
            name: format!("reproduce {} ({})", run.display(), args.preset),
            preset: args.preset.clone(),
            ranks: args.ranks,
            max_restarts: 2,
            ..Default::default()
        };
        let job = client.submit(spec).await?;
        // Keep stdout to the table (or the JSON/YAML) alone.
        eprintln!("submitted {}: {}", run.display(), job.id);
        submitted.push(Submitted { id: job.id, ..run });
    }
    let multi = MultiProgress::new();
    let mut watches = Vec::new();
    for run in &submitted {
        let bar = multi.add(ProgressBar::new(0));
        bar.set_style(style());
        bar.set_prefix(format!("{:<12}", run.display()));
        bar.set_message("pending");
        bar.enable_steady_tick(Duration::from_millis(200));
        let target = target.clone();
        let run = run.clone();
        watches.push(tokio::spawn(async move {
            let result = watch(&target, &run.id, &bar).await;
            bar.finish();
            (run, result)
        }));
    }
    let mut jobs: Vec<(Submitted, Job)> = Vec::new();
    for w in watches {
        let (run, job) = w.await.context("a watch task failed")?;
        jobs.push((run, job?));
    }
    let _ = multi.clear();
    let rows = rows(&jobs);
    let summaries = seeds.map(|_| seeds::summarise(&rows));
    let failed = jobs
        .iter()
        .filter(|(_, j)| j.state() != JobState::Succeeded)
        .count();
    let runs_json = Value::Array(rows.iter().map(row_json).collect());
    let value = match &summaries {
        None => runs_json,
        Some(s) => json!({
            "runs": runs_json,
            "claims": s.iter().map(seeds::Summary::to_json).collect::<Vec<_>>(),
        }),
    };
    if !print_structured(args.output.output, &value)? {
        println!("{}", table(&rows));
        if let Some(s) = &summaries {
            println!("\nOver the seeds:\n{}", summary_table(s));
        }
        for (run, job) in &jobs {
            if job.state() != JobState::Succeeded {
                println!(
                    "{} ({}) {}: {}",
                    run.display(),
                    job.id,
                    job_state_name(job.state),
                    job.state_reason
                );
            }
        }
    }
    if let Some(path) = &args.markdown {
        write_markdown(path, &args.preset, &jobs, &rows, summaries.as_deref())?;
        if args.output.output == OutputFormat::Table {
            println!("wrote {}", path.display());
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner:.green} {prefix} [{bar:28.cyan/blue}] {pos:>6}/{len:<6} {msg}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// The config key that selects a job's experiment (a choice key, when a job has one).
const EXPERIMENT_KEY: &str = "experiment";

/// The config key of a job's random seed (`--seeds` sets it).
const SEED_KEY: &str = "seed";

/// What to submit: one run per job, or, for a job with an `experiment` choice key that
/// `--set` does not pin, one run per experiment (the whole paper).
fn runs(names: &[String], overrides: &[(String, String)]) -> Vec<(String, Option<String>)> {
    let registry = trainyard_jobs::registry();
    let pinned = overrides.iter().any(|(k, _)| k == EXPERIMENT_KEY);
    let mut out = Vec::new();
    for name in names {
        let experiments = registry
            .get(name)
            .and_then(|j| j.schema().key(EXPERIMENT_KEY).map(|k| k.kind.clone()));
        match experiments {
            Some(trainyard_jobs::ConfigKind::Choice(options)) if !pinned => {
                out.extend(options.iter().map(|e| (name.clone(), Some(e.to_string()))));
            }
            _ => out.push((name.clone(), None)),
        }
    }
    out
}

/// Follows one job until it ends, feeding its bar; returns its final record.
async fn watch(target: &Target, id: &str, bar: &ProgressBar) -> Result<Job> {
    let mut client = Client::connect(target).await?;
    let mut stream = client
        .jobs
        .watch_job(WatchJobRequest {
            id: id.to_string(),
            follow: true,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(rpc)?;
        match ev.kind {
            Some(Kind::Progress(p)) => {
                bar.set_length(p.total);
                bar.set_position(p.done);
                bar.set_message(p.stage);
            }
            Some(Kind::Transition(t)) => bar.set_message(job_state_name(t.to).to_lowercase()),
            _ => {}
        }
    }
    let job = client
        .jobs
        .get_job(GetJobRequest { id: id.to_string() })
        .await
        .map_err(rpc)?
        .into_inner();
    bar.set_message(job_state_name(job.state).to_lowercase());
    Ok(job)
}

/// The claims of every job: its structured claims, else its notes that say HELD / NOT HELD,
/// else one row saying it has none (or why it failed).
fn rows(jobs: &[(Submitted, Job)]) -> Vec<Row> {
    let mut out = Vec::new();
    for (run, job) in jobs {
        let state = job_state_name(job.state).to_string();
        let claims: Vec<Claim> = match &job.result {
            Some(r) if !r.claims.is_empty() => r.claims.clone(),
            Some(r) => r.notes.iter().filter_map(|n| claim_from_note(n)).collect(),
            None => Vec::new(),
        };
        if claims.is_empty() {
            out.push(Row {
                job: run.label.clone(),
                seed: run.seed,
                job_id: job.id.clone(),
                state: state.clone(),
                checked: false,
                claim: Claim {
                    claim: if job.state() == JobState::Succeeded {
                        "(the job reported no claims)".into()
                    } else {
                        format!("(job {})", state.to_lowercase())
                    },
                    ..Default::default()
                },
            });
        }
        for claim in claims {
            out.push(Row {
                job: run.label.clone(),
                seed: run.seed,
                job_id: job.id.clone(),
                state: state.clone(),
                checked: true,
                claim,
            });
        }
    }
    out
}

/// A note such as `paper's claim (ODE-Net within ...): HELD (...)` as a claim.
fn claim_from_note(note: &str) -> Option<Claim> {
    let held = if note.contains("NOT HELD") {
        false
    } else if note.contains("HELD") {
        true
    } else {
        return None;
    };
    let text = note.split(": HELD").next().unwrap_or(note);
    let text = text.split(": NOT HELD").next().unwrap_or(text);
    let detail = note
        .split_once("HELD")
        .map(|(_, rest)| rest.trim().trim_start_matches('(').trim_end_matches(')'))
        .unwrap_or_default();
    Some(Claim {
        claim: text.trim().to_string(),
        treatment: detail.to_string(),
        held,
        ..Default::default()
    })
}

fn verdict(row: &Row) -> &'static str {
    if row.state != "SUCCEEDED" || !row.checked {
        "-"
    } else if row.claim.held {
        "HELD"
    } else {
        "NOT HELD"
    }
}

/// The claim with its experiment, `[cnf/two-moons] CNF NLL below …`.
fn claim_text(experiment: &str, claim: &str) -> String {
    if experiment.is_empty() {
        claim.to_string()
    } else {
        format!("[{experiment}] {claim}")
    }
}

/// The job's label with the run's seed, when `--seeds` gave one.
fn job_text(r: &Row) -> String {
    match r.seed {
        Some(s) => format!("{} (seed {s})", r.job),
        None => r.job.clone(),
    }
}

fn table(rows: &[Row]) -> String {
    let mut t = new_table(["Job", "Claim", "Paper", "Ours", "Baseline", "Held"]);
    for r in rows {
        t.add_row([
            job_text(r),
            claim_text(&r.claim.experiment, &r.claim.claim),
            r.claim.paper.clone(),
            r.claim.treatment.clone(),
            r.claim.baseline.clone(),
            verdict(r).to_string(),
        ]);
    }
    t.to_string()
}

/// Each claim over the seeds: ours and the baseline as mean ± std (each seed's value), and
/// on how many seeds it held.
fn summary_table(summaries: &[seeds::Summary]) -> String {
    let mut t = new_table(["Job", "Claim", "Ours", "Baseline", "Held"]);
    for s in summaries {
        let (held, runs) = s.held();
        t.add_row([
            s.job.clone(),
            claim_text(&s.experiment, &s.claim),
            s.treatment(),
            s.baseline(),
            format!("{held}/{runs}"),
        ]);
    }
    t.to_string()
}

fn row_json(r: &Row) -> Value {
    json!({
        "job": r.job,
        "seed": r.seed,
        "job_id": r.job_id,
        "state": r.state,
        "experiment": r.claim.experiment,
        "claim": r.claim.claim,
        "paper": r.claim.paper,
        "treatment": r.claim.treatment,
        "baseline": r.claim.baseline,
        "held": verdict(r) == "HELD",
        "treatment_value": r.claim.treatment_value,
        "baseline_value": r.claim.baseline_value,
        "unit": r.claim.unit,
    })
}

/// `YYYYmmdd-HHMMSS` of now (UTC).
fn chrono_stamp() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    crate::output::utc_timestamp(ms)
        .replace(['-', ':'], "")
        .replace(' ', "-")
        .chars()
        .take(15)
        .collect()
}

fn machine() -> String {
    let host = crate::cmd::worker::hostname();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    format!("{host}: {os}, {cores} cores")
}

/// The `seed` of a job's resolved config (`?` when it has none).
fn resolved_seed(job: &Job) -> String {
    serde_json::from_str::<Value>(&job.resolved_config_json)
        .ok()
        .and_then(|v| v.get("values").and_then(|v| v.get(SEED_KEY)).cloned())
        .map(|s| s.to_string())
        .unwrap_or_else(|| "?".into())
}

fn write_markdown(
    path: &Path,
    preset: &str,
    jobs: &[(Submitted, Job)],
    rows: &[Row],
    summaries: Option<&[seeds::Summary]>,
) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let mut seeds: Vec<String> = Vec::new();
    for (run, _) in jobs {
        if let Some(s) = run.seed.map(|s| s.to_string()) {
            if !seeds.contains(&s) {
                seeds.push(s);
            }
        }
    }
    let seeds = if seeds.is_empty() {
        String::new()
    } else {
        format!(" --seeds {}", seeds.join(","))
    };
    let mut md = String::new();
    md.push_str(&format!(
        "# Reproduced claims (`{preset}` preset)\n\nWritten by `trainyard reproduce --preset {preset}{seeds} --markdown {}` on {} UTC, on {}.\n\n",
        path.display(),
        crate::output::utc_timestamp(now),
        machine()
    ));
    let cell = |c: &str| c.replace('|', "\\|");
    if let Some(summaries) = summaries {
        md.push_str(
            "Over the seeds (mean ± sample std, then each seed's value in seed order):\n\n\
             | job | claim | ours | baseline | held |\n|---|---|---|---|---|\n",
        );
        for s in summaries {
            let (held, runs) = s.held();
            md.push_str(&format!(
                "| {} | {} | {} | {} | {held}/{runs} |\n",
                cell(&s.job),
                cell(&claim_text(&s.experiment, &s.claim)),
                cell(&s.treatment()),
                cell(&s.baseline()),
            ));
        }
        md.push_str("\nEach run:\n\n");
    }
    md.push_str("| job | claim | paper | ours | baseline | held |\n|---|---|---|---|---|---|\n");
    for r in rows {
        let (job, claim) = (job_text(r), claim_text(&r.claim.experiment, &r.claim.claim));
        let cells = [
            job.as_str(),
            claim.as_str(),
            r.claim.paper.as_str(),
            r.claim.treatment.as_str(),
            r.claim.baseline.as_str(),
            verdict(r),
        ];
        let cells: Vec<String> = cells.iter().map(|c| cell(c)).collect();
        md.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    md.push_str("\nJobs and seeds:\n\n");
    for (run, job) in jobs {
        md.push_str(&format!(
            "- `{}`: job {} ({}), seed {}\n",
            run.label,
            job.id,
            job_state_name(job.state),
            resolved_seed(job)
        ));
    }
    std::fs::write(path, md).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::ResultTable;

    fn job(state: JobState, result: Option<ResultTable>) -> Job {
        Job {
            id: "job-1".into(),
            state: state as i32,
            result,
            resolved_config_json: r#"{"preset":"quick","values":{"seed":7}}"#.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_job_with_experiments_runs_each_unless_one_is_set() {
        let names = vec!["neural-ode".to_string()];
        let all = runs(&names, &[]);
        let experiments: Vec<&str> = all.iter().filter_map(|(_, e)| e.as_deref()).collect();
        assert!(
            experiments.contains(&"mnist") && experiments.contains(&"cnf"),
            "{all:?}"
        );
        assert!(all.iter().all(|(n, _)| n == "neural-ode"));
        let pinned = runs(&names, &[("experiment".into(), "cnf".into())]);
        assert_eq!(pinned, vec![("neural-ode".to_string(), None)]);
    }

    #[test]
    fn claims_come_from_the_table_or_its_notes() {
        let structured = ResultTable {
            claims: vec![Claim {
                experiment: "cnf".into(),
                claim: "CNF NLL below planar".into(),
                paper: "-".into(),
                treatment: "2.1".into(),
                baseline: "2.4".into(),
                held: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let noted = ResultTable {
            notes: vec![
                "width 32".into(),
                "paper's claim (ODE-Net within 0.7 points): HELD (ResNet - ODE-Net = +0.10 points)"
                    .into(),
                "other claim: NOT HELD (x)".into(),
            ],
            ..Default::default()
        };
        let run = |label: &str| Submitted {
            label: label.into(),
            seed: None,
            id: "job-1".into(),
        };
        let jobs = vec![
            (run("a"), job(JobState::Succeeded, Some(structured))),
            (run("b"), job(JobState::Succeeded, Some(noted))),
            (run("c"), job(JobState::Failed, None)),
        ];
        let rows = rows(&jobs);
        assert_eq!(rows.len(), 4);
        assert_eq!(verdict(&rows[0]), "HELD");
        assert_eq!(
            rows[1].claim.claim,
            "paper's claim (ODE-Net within 0.7 points)"
        );
        assert_eq!(rows[1].claim.treatment, "ResNet - ODE-Net = +0.10 points");
        assert_eq!(verdict(&rows[1]), "HELD");
        assert_eq!(verdict(&rows[2]), "NOT HELD");
        assert_eq!(rows[3].claim.claim, "(job failed)");
        let none = super::rows(&[(
            run("d"),
            job(JobState::Succeeded, Some(ResultTable::default())),
        )]);
        assert_eq!(none[0].claim.claim, "(the job reported no claims)");
        assert_eq!(
            verdict(&none[0]),
            "-",
            "nothing checked is not a failed claim"
        );
        assert_eq!(verdict(&rows[3]), "-");
        let text = table(&rows);
        assert!(text.contains("[cnf] CNF NLL below planar"), "{text}");
        assert_eq!(resolved_seed(&jobs[0].1), "7");
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("results.md");
        write_markdown(&md, "quick", &jobs, &rows, None).unwrap();
        let md = std::fs::read_to_string(md).unwrap();
        assert!(
            md.contains("| a | [cnf] CNF NLL below planar | - | 2.1 | 2.4 | HELD |"),
            "{md}"
        );
        assert!(md.contains("seed 7"), "{md}");
    }

    #[test]
    fn seeded_runs_are_labelled_and_summarised_in_markdown() {
        let claim = |t: f64, held: bool| ResultTable {
            claims: vec![Claim {
                claim: "GM-DGM >= 60%".into(),
                paper: "77.2%".into(),
                treatment: format!("GM-DGM {t}%"),
                baseline: "M2 50%".into(),
                held,
                treatment_value: Some(t),
                baseline_value: Some(50.0),
                unit: "%".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let jobs: Vec<(Submitted, Job)> = [(0, 61.0, true), (1, 59.0, false)]
            .into_iter()
            .map(|(seed, t, held)| {
                let run = Submitted {
                    label: "gm-dgm".into(),
                    seed: Some(seed),
                    id: format!("job-{seed}"),
                };
                assert_eq!(run.display(), format!("gm-dgm seed {seed}"));
                (run, job(JobState::Succeeded, Some(claim(t, held))))
            })
            .collect();
        let rows = rows(&jobs);
        assert_eq!(job_text(&rows[1]), "gm-dgm (seed 1)");
        let summaries = seeds::summarise(&rows);
        let text = summary_table(&summaries);
        assert!(text.contains("60.00 ± 1.41 % (61.00, 59.00)"), "{text}");
        assert!(text.contains("1/2"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("results.md");
        write_markdown(&md, "quick", &jobs, &rows, Some(&summaries)).unwrap();
        let md = std::fs::read_to_string(md).unwrap();
        assert!(
            md.contains("| gm-dgm | GM-DGM >= 60% | 60.00 ± 1.41 % (61.00, 59.00) | 50.00 ± 0.00 % (50.00, 50.00) | 1/2 |"),
            "{md}"
        );
        assert!(md.contains("| gm-dgm (seed 1) | GM-DGM >= 60% |"), "{md}");
        assert!(md.contains("--seeds 0,1 --markdown"), "{md}");
    }
}
