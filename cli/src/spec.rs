//! Building a [`JobSpec`] from a spec file plus command-line flags, and validating it
//! locally against this binary's job registry (so bad input fails before any network call).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::Deserialize;
use trainyard_proto::{CheckpointPolicy, JobSpec};

use crate::args::SpecArgs;
use crate::error::bad_input;

/// A spec file (YAML or JSON): the fields of [`JobSpec`]; unknown fields are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    /// Job type.
    pub job: Option<String>,
    /// Job name.
    pub name: Option<String>,
    /// Config preset.
    pub preset: Option<String>,
    /// Config overrides; scalar values (numbers, booleans, strings).
    pub config: Option<BTreeMap<String, serde_yaml::Value>>,
    /// Number of ranks.
    pub ranks: Option<u32>,
    /// Ranks on each worker (must divide `ranks`; 0 = any split).
    pub ranks_per_worker: Option<u32>,
    /// Priority.
    pub priority: Option<i32>,
    /// Restarts allowed.
    pub max_restarts: Option<u32>,
    /// Device kind.
    pub device_kind: Option<String>,
    /// Cancel grace period in seconds.
    pub grace_period_s: Option<u32>,
    /// Checkpoint retention and upload limits.
    pub checkpoints: Option<CheckpointsFile>,
    /// Start from another job's committed checkpoint, `<job-id>/<step>`.
    pub from_checkpoint: Option<String>,
}

/// The `checkpoints:` section of a spec file (the fields of `CheckpointPolicy`, plus
/// `best_mode: max|min` as on the command line).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointsFile {
    /// Newest committed checkpoints kept.
    pub keep_latest: Option<u32>,
    /// Best committed checkpoints kept, by `best_metric`.
    pub keep_best: Option<u32>,
    /// The metric that ranks checkpoints.
    pub best_metric: Option<String>,
    /// `max` or `min`: whether a higher or a lower `best_metric` is better.
    pub best_mode: Option<String>,
    /// The same as `best_mode`, as a boolean (the API's field).
    pub higher_is_better: Option<bool>,
    /// Seconds of failing uploads before an attempt fails.
    pub commit_timeout_s: Option<u32>,
}

impl SpecFile {
    /// Parses a spec file's text; `name` is used in error messages.
    pub fn parse(name: &str, text: &str) -> Result<SpecFile> {
        let is_json = name.ends_with(".json");
        let parsed = if is_json {
            serde_json::from_str::<SpecFile>(text).map_err(|e| e.to_string())
        } else if text.trim().is_empty() {
            Ok(SpecFile::default())
        } else {
            serde_yaml::from_str::<SpecFile>(text).map_err(|e| e.to_string())
        };
        parsed.map_err(|e| bad_input(format!("spec file {name}: {e}")))
    }

    /// Reads and parses a spec file.
    pub fn load(path: &Path) -> Result<SpecFile> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad_input(format!("spec file {name}: cannot read: {e}")))?;
        SpecFile::parse(&name, &text)
    }
}

fn scalar_to_string(key: &str, v: &serde_yaml::Value) -> Result<String> {
    use serde_yaml::Value;
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Err(bad_input(format!("spec.config.{key}: missing value"))),
        _ => Err(bad_input(format!(
            "spec.config.{key}: expected a number, boolean or string, not a list or map"
        ))),
    }
}

/// Parses one `--set KEY=VALUE`.
pub fn parse_set(arg: &str) -> Result<(String, String)> {
    match arg.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        Some(_) => Err(bad_input(format!(
            "--set {arg:?}: the key before '=' is empty"
        ))),
        None => Err(bad_input(format!(
            "--set {arg:?}: expected KEY=VALUE (for example --set epochs=2)"
        ))),
    }
}

/// Merges the spec file (if any) with the flags (flags win), then validates locally.
pub fn build_spec(args: &SpecArgs) -> Result<JobSpec> {
    let file = match &args.file {
        Some(path) => SpecFile::load(path)?,
        None => SpecFile::default(),
    };
    merge(file, args)
}

/// Merges an already-parsed spec file with the flags and validates the result.
pub fn merge(file: SpecFile, args: &SpecArgs) -> Result<JobSpec> {
    let mut config = BTreeMap::new();
    for (k, v) in file.config.unwrap_or_default() {
        let s = scalar_to_string(&k, &v)?;
        config.insert(k, s);
    }
    for arg in &args.set {
        let (k, v) = parse_set(arg)?;
        config.insert(k, v);
    }
    let job = args.job.clone().or(file.job).ok_or_else(|| {
        bad_input(format!(
            "spec.job: no job given (pass one, e.g. `trainyard submit neural-ode`, or set `job:` \
             in the spec file; known: {})",
            trainyard_jobs::registry().names().join(", ")
        ))
    })?;
    let spec = JobSpec {
        name: args
            .name
            .clone()
            .or(file.name)
            .unwrap_or_else(|| job.clone()),
        preset: args.preset.clone().or(file.preset).unwrap_or_default(),
        job,
        config: config.into_iter().collect(),
        ranks: args.ranks.or(file.ranks).unwrap_or(1),
        ranks_per_worker: args.ranks_per_worker.or(file.ranks_per_worker).unwrap_or(0),
        priority: args.priority.or(file.priority).unwrap_or(0),
        max_restarts: args.max_restarts.or(file.max_restarts).unwrap_or(0),
        device_kind: args
            .device_kind
            .clone()
            .or(file.device_kind)
            .unwrap_or_default(),
        grace_period_s: args.grace_period.or(file.grace_period_s).unwrap_or(0),
        checkpoints: checkpoint_policy(file.checkpoints, args)?,
        from_checkpoint: args
            .from_checkpoint
            .clone()
            .or(file.from_checkpoint)
            .unwrap_or_default()
            .trim()
            .to_string(),
    };
    validate(spec)
}

/// `max` -> higher is better, `min` -> lower is better; `field` names it in the error.
fn parse_best_mode(field: &str, mode: &str) -> Result<bool> {
    match mode.trim().to_ascii_lowercase().as_str() {
        "max" => Ok(true),
        "min" => Ok(false),
        other => Err(bad_input(format!(
            "{field}: {other:?} is not a mode (use max when a higher value is better, min when \
             a lower one is)"
        ))),
    }
}

/// The checkpoint policy of the spec file's `checkpoints:` section and the flags (flags win,
/// field by field); `None` when neither sets anything (the coordinator's defaults).
fn checkpoint_policy(
    file: Option<CheckpointsFile>,
    args: &SpecArgs,
) -> Result<Option<CheckpointPolicy>> {
    let file = file.unwrap_or_default();
    let file_higher = match (&file.best_mode, file.higher_is_better) {
        (Some(mode), higher) => {
            let from_mode = parse_best_mode("spec.checkpoints.best_mode", mode)?;
            if higher.is_some_and(|h| h != from_mode) {
                return Err(bad_input(format!(
                    "spec.checkpoints.best_mode: {mode:?} contradicts higher_is_better: {}",
                    !from_mode
                )));
            }
            Some(from_mode)
        }
        (None, higher) => higher,
    };
    let flag_higher = match &args.best_mode {
        Some(mode) => Some(parse_best_mode("--best-mode", mode)?),
        None => None,
    };
    let keep_latest = args.keep_checkpoints.or(file.keep_latest);
    let keep_best = args.keep_best.or(file.keep_best);
    let best_metric = args.best_metric.clone().or(file.best_metric);
    let higher = flag_higher.or(file_higher);
    let commit_timeout_s = args.checkpoint_commit_timeout.or(file.commit_timeout_s);
    if keep_latest.is_none()
        && keep_best.is_none()
        && best_metric.is_none()
        && higher.is_none()
        && commit_timeout_s.is_none()
    {
        return Ok(None);
    }
    if keep_latest == Some(0) {
        return Err(bad_input(
            "spec.checkpoints.keep_latest: must be at least 1 (the newest committed checkpoint \
             is always kept)",
        ));
    }
    Ok(Some(CheckpointPolicy {
        keep_latest: keep_latest.unwrap_or(0),
        keep_best: keep_best.unwrap_or(0),
        best_metric: best_metric.unwrap_or_default().trim().to_string(),
        higher_is_better: higher.unwrap_or(false),
        commit_timeout_s: commit_timeout_s.unwrap_or(0),
    }))
}

/// Checks a spec against this binary's registry the way the coordinator will, and fills
/// in the default preset. Every error names the field (`spec.config.lr: ...`).
pub fn validate(mut spec: JobSpec) -> Result<JobSpec> {
    let registry = trainyard_jobs::registry();
    let Some(job) = registry.get(&spec.job) else {
        return Err(bad_input(format!(
            "spec.job: unknown job {:?} (known: {}; see `trainyard job-types`)",
            spec.job,
            registry.names().join(", ")
        )));
    };
    if spec.preset.is_empty() {
        spec.preset = job.schema().default_preset().to_string();
    }
    let overrides: BTreeMap<String, String> = spec
        .config
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Err(e) = job.resolve_config(&spec.preset, &overrides) {
        use trainyard_jobs::ConfigError;
        let field = match &e {
            ConfigError::UnknownPreset { .. } => "spec.preset".to_string(),
            ConfigError::UnknownKey { key, .. } => format!("spec.config.{key}"),
            // The message starts with the key already.
            ConfigError::InvalidValue { .. } => "spec.config".to_string(),
        };
        let sep = if matches!(e, ConfigError::InvalidValue { .. }) {
            "."
        } else {
            ": "
        };
        return Err(bad_input(format!("{field}{sep}{e}")));
    }
    if spec.ranks == 0 {
        return Err(bad_input("spec.ranks: must be at least 1"));
    }
    if spec.ranks > job.max_ranks() {
        return Err(bad_input(format!(
            "spec.ranks: {} supports at most {} rank(s), asked for {}",
            spec.job,
            job.max_ranks(),
            spec.ranks
        )));
    }
    // The coordinator's rule (one implementation).
    trainyard_coordinator::validate::validate_ranks_per_worker(spec.ranks, spec.ranks_per_worker)
        .map_err(bad_input)?;
    if !matches!(spec.device_kind.as_str(), "" | "cpu" | "gpu") {
        return Err(bad_input(format!(
            "spec.device_kind: {:?} is not a device kind (use cpu or gpu, or leave it out for any)",
            spec.device_kind
        )));
    }
    // The same checks as the coordinator's (one implementation); whether the job and its
    // checkpoint exist is the coordinator's to say.
    if let Some(policy) = &spec.checkpoints {
        trainyard_coordinator::validate::validate_checkpoint_policy(policy).map_err(bad_input)?;
    }
    if !spec.from_checkpoint.is_empty() {
        trainyard_coordinator::validate::CheckpointRef::parse(&spec.from_checkpoint)
            .map_err(bad_input)?;
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(job: &str, sets: &[&str]) -> SpecArgs {
        SpecArgs {
            job: Some(job.into()),
            set: sets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn msg(r: Result<JobSpec>) -> String {
        let e = r.expect_err("must be rejected");
        assert_eq!(crate::error::exit_code(&e), crate::error::EXIT_BAD_INPUT);
        e.to_string()
    }

    #[test]
    fn flags_build_a_valid_spec() {
        let s = build_spec(&args("neural-ode", &["epochs=1", "width=8"])).unwrap();
        assert_eq!(s.job, "neural-ode");
        assert_eq!(s.name, "neural-ode");
        assert_eq!(s.preset, "quick");
        assert_eq!(s.ranks, 1);
        assert_eq!(s.config.get("epochs").map(String::as_str), Some("1"));
    }

    #[test]
    fn bad_inputs_name_the_field() {
        assert!(msg(build_spec(&args("nope", &[]))).contains("spec.job: unknown job \"nope\""));
        assert!(msg(build_spec(&args("neural-ode", &["epochs"]))).contains("--set \"epochs\""));
        let m = msg(build_spec(&args("neural-ode", &["bogus=1"])));
        assert!(
            m.starts_with("spec.config.bogus: unknown config key"),
            "{m}"
        );
        let m = msg(build_spec(&args("neural-ode", &["epochs=abc"])));
        assert!(m.starts_with("spec.config.epochs: invalid value"), "{m}");
        let mut a = args("neural-ode", &[]);
        a.ranks = Some(99);
        assert!(msg(build_spec(&a)).starts_with("spec.ranks:"));
        a.ranks = Some(1);
        a.preset = Some("huge".into());
        assert!(msg(build_spec(&a)).starts_with("spec.preset: unknown preset"));
    }

    #[test]
    fn spec_file_yaml_with_flag_overrides() {
        let file = SpecFile::parse(
            "s.yaml",
            "job: neural-ode\nname: ode\npriority: 5\nconfig:\n  epochs: 1\n  augment: false\n",
        )
        .unwrap();
        let mut a = SpecArgs {
            set: vec!["epochs=2".into()],
            ..Default::default()
        };
        a.priority = Some(9);
        let s = merge(file, &a).unwrap();
        assert_eq!(s.name, "ode");
        assert_eq!(s.priority, 9);
        assert_eq!(s.config.get("epochs").map(String::as_str), Some("2"));
        assert_eq!(s.config.get("augment").map(String::as_str), Some("false"));
    }

    #[test]
    fn checkpoint_flags_and_file_keys_build_the_policy() {
        // Nothing set: the coordinator's defaults.
        let s = build_spec(&args("neural-ode", &[])).unwrap();
        assert_eq!(s.checkpoints, None);
        assert_eq!(s.from_checkpoint, "");

        let mut a = args("neural-ode", &[]);
        a.keep_checkpoints = Some(2);
        a.keep_best = Some(1);
        a.best_metric = Some("odenet/test_acc".into());
        a.best_mode = Some("max".into());
        a.checkpoint_commit_timeout = Some(120);
        a.from_checkpoint = Some("job-mwykvvix10a2/40".into());
        let s = build_spec(&a).unwrap();
        assert_eq!(
            s.checkpoints,
            Some(CheckpointPolicy {
                keep_latest: 2,
                keep_best: 1,
                best_metric: "odenet/test_acc".into(),
                higher_is_better: true,
                commit_timeout_s: 120,
            })
        );
        assert_eq!(s.from_checkpoint, "job-mwykvvix10a2/40");

        // The file's keys, with a flag winning field by field.
        let file = SpecFile::parse(
            "s.yaml",
            "job: neural-ode\nfrom_checkpoint: job-a/7\ncheckpoints:\n  keep_latest: 4\n  \
             keep_best: 2\n  best_metric: loss\n  best_mode: min\n  commit_timeout_s: 30\n",
        )
        .unwrap();
        let a = SpecArgs {
            keep_best: Some(3),
            ..Default::default()
        };
        let s = merge(file, &a).unwrap();
        let p = s.checkpoints.unwrap();
        assert_eq!(
            (p.keep_latest, p.keep_best, p.best_metric.as_str()),
            (4, 3, "loss")
        );
        assert!(!p.higher_is_better);
        assert_eq!(p.commit_timeout_s, 30);
        assert_eq!(s.from_checkpoint, "job-a/7");
        let file = SpecFile::parse(
            "s.json",
            r#"{"job": "neural-ode", "checkpoints": {"keep_best": 1, "best_metric": "acc", "higher_is_better": true}}"#,
        )
        .unwrap();
        assert!(
            merge(file, &SpecArgs::default())
                .unwrap()
                .checkpoints
                .unwrap()
                .higher_is_better
        );
    }

    #[test]
    fn bad_checkpoint_settings_name_the_field() {
        let mut a = args("neural-ode", &[]);
        a.keep_best = Some(2);
        let m = msg(build_spec(&a));
        assert!(
            m.starts_with("spec.checkpoints.best_metric: required when keep_best > 0"),
            "{m}"
        );
        let mut a = args("neural-ode", &[]);
        a.keep_checkpoints = Some(0);
        assert!(msg(build_spec(&a)).starts_with("spec.checkpoints.keep_latest: "));
        let mut a = args("neural-ode", &[]);
        a.keep_checkpoints = Some(100_000);
        assert!(msg(build_spec(&a)).starts_with("spec.checkpoints.keep_latest: "));
        let mut a = args("neural-ode", &[]);
        a.from_checkpoint = Some("job-a".into());
        assert!(msg(build_spec(&a)).starts_with("spec.from_checkpoint: "));
        let file = SpecFile::parse(
            "s.yaml",
            "job: neural-ode\ncheckpoints:\n  best_mode: biggest\n",
        )
        .unwrap();
        let m = msg(merge(file, &SpecArgs::default()));
        assert!(m.starts_with("spec.checkpoints.best_mode: "), "{m}");
        let file = SpecFile::parse(
            "s.yaml",
            "job: neural-ode\ncheckpoints:\n  best_mode: max\n  higher_is_better: false\n",
        )
        .unwrap();
        let m = msg(merge(file, &SpecArgs::default()));
        assert!(m.contains("contradicts"), "{m}");
        let e = SpecFile::parse(
            "s.yaml",
            "job: neural-ode\ncheckpoints:\n  keep_lastest: 2\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("keep_lastest"), "{e}");
    }

    #[test]
    fn ranks_per_worker_comes_from_the_flag_or_the_spec_file() {
        let s = build_spec(&args("neural-ode", &[])).unwrap();
        assert_eq!(s.ranks_per_worker, 0, "any split by default");
        let mut a = args("neural-ode", &[]);
        a.ranks = Some(4);
        a.ranks_per_worker = Some(2);
        let s = build_spec(&a).unwrap();
        assert_eq!((s.ranks, s.ranks_per_worker), (4, 2));
        let file =
            SpecFile::parse("s.yaml", "job: neural-ode\nranks: 4\nranks_per_worker: 4\n").unwrap();
        assert_eq!(
            merge(file, &SpecArgs::default()).unwrap().ranks_per_worker,
            4
        );
        // The flag wins over the file.
        let file = SpecFile::parse(
            "s.json",
            r#"{"job": "neural-ode", "ranks": 4, "ranks_per_worker": 4}"#,
        )
        .unwrap();
        let a = SpecArgs {
            ranks_per_worker: Some(1),
            ..Default::default()
        };
        assert_eq!(merge(file, &a).unwrap().ranks_per_worker, 1);
    }

    #[test]
    fn bad_ranks_per_worker_names_the_field() {
        let mut a = args("neural-ode", &[]);
        a.ranks = Some(4);
        a.ranks_per_worker = Some(3);
        let m = msg(build_spec(&a));
        assert!(
            m.starts_with("spec.ranks_per_worker: 3 does not divide spec.ranks (4)"),
            "{m}"
        );
        a.ranks_per_worker = Some(8);
        let m = msg(build_spec(&a));
        assert!(
            m.starts_with("spec.ranks_per_worker: 8 is more than spec.ranks (4)"),
            "{m}"
        );
        let file = SpecFile::parse("s.yaml", "job: neural-ode\nranks_per_worker: 2\n").unwrap();
        let m = msg(merge(file, &SpecArgs::default()));
        assert!(
            m.starts_with("spec.ranks_per_worker: 2 is more than spec.ranks (1)"),
            "{m}"
        );
        let e = SpecFile::parse("s.yaml", "job: neural-ode\nranks_per_worker: -2\n").unwrap_err();
        assert!(e.to_string().contains("ranks_per_worker"), "{e}");
    }

    #[test]
    fn spec_file_errors_name_the_field() {
        let e = SpecFile::parse("s.yaml", "job: neural-ode\nrankz: 2\n").unwrap_err();
        assert!(e.to_string().contains("rankz"), "{e}");
        let e = SpecFile::parse("s.json", "{\"job\": \"neural-ode\", \"colour\": 1}").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = SpecFile::parse("s.yaml", "job: [unclosed\n").unwrap_err();
        assert!(e.to_string().starts_with("spec file s.yaml:"), "{e}");
        let file = SpecFile::parse("s.yaml", "job: neural-ode\nconfig:\n  epochs: [1]\n").unwrap();
        let e = merge(file, &SpecArgs::default()).unwrap_err();
        assert!(e.to_string().starts_with("spec.config.epochs:"), "{e}");
    }
}
