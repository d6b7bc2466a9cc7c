//! Submit-time validation of a [`JobSpec`] against the jobs registry.
//!
//! Every error names the field it is about (`spec.job`, `spec.config.<key>`, `spec.ranks`,
//! ...) so the CLI can show it as is.

use std::collections::BTreeMap;

use trainyard_jobs::{ConfigError, Registry};
use trainyard_proto::{CheckpointInfo, CheckpointPolicy, JobSpec};

/// Longest accepted job name.
pub const MAX_NAME_LEN: usize = 128;
/// Most restarts a job may ask for.
pub const MAX_RESTARTS: u32 = 1000;
/// Longest grace period a job may ask for, in seconds.
pub const MAX_GRACE_PERIOD_S: u32 = 3600;

/// Committed checkpoints kept by default (the newest ones).
pub const DEFAULT_KEEP_LATEST: u32 = 3;
/// Default limit, in seconds, of failing checkpoint uploads before an attempt fails.
pub const DEFAULT_COMMIT_TIMEOUT_S: u32 = 600;

/// Most checkpoints `keep_latest` and `keep_best` may each ask for.
pub const MAX_KEEP: u32 = 1000;
/// Longest accepted `best_metric` name.
pub const MAX_METRIC_NAME_LEN: usize = 256;
/// Longest accepted `commit_timeout_s` (7 days).
pub const MAX_COMMIT_TIMEOUT_S: u32 = 7 * 24 * 3600;

/// Checks a checkpoint policy as given (zeros mean the defaults). `Err` names the field:
/// `spec.checkpoints.best_metric: required when keep_best > 0`.
pub fn validate_checkpoint_policy(p: &CheckpointPolicy) -> Result<(), String> {
    if p.keep_latest > MAX_KEEP {
        return Err(format!(
            "spec.checkpoints.keep_latest: {} is too many (at most {MAX_KEEP}; 0 = default {DEFAULT_KEEP_LATEST})",
            p.keep_latest
        ));
    }
    if p.keep_best > MAX_KEEP {
        return Err(format!(
            "spec.checkpoints.keep_best: {} is too many (at most {MAX_KEEP})",
            p.keep_best
        ));
    }
    let metric = p.best_metric.as_str();
    if metric.chars().count() > MAX_METRIC_NAME_LEN {
        return Err(format!(
            "spec.checkpoints.best_metric: too long ({} characters; at most {MAX_METRIC_NAME_LEN})",
            metric.chars().count()
        ));
    }
    if metric.chars().any(char::is_control) || metric.trim() != metric {
        return Err(
            "spec.checkpoints.best_metric: must not contain control characters or surrounding spaces"
                .to_string(),
        );
    }
    if p.keep_best > 0 && metric.is_empty() {
        return Err(format!(
            "spec.checkpoints.best_metric: required when keep_best > 0 (keep_best is {}; name the \
             metric that ranks checkpoints, e.g. --best-metric odenet/test_acc --best-mode max)",
            p.keep_best
        ));
    }
    if p.keep_best == 0 && !metric.is_empty() {
        return Err(format!(
            "spec.checkpoints.keep_best: 0 keeps no best checkpoint by best_metric \"{metric}\"; \
             set keep_best (e.g. 1) or leave best_metric out"
        ));
    }
    if p.commit_timeout_s > MAX_COMMIT_TIMEOUT_S {
        return Err(format!(
            "spec.checkpoints.commit_timeout_s: {} is too long (at most {MAX_COMMIT_TIMEOUT_S}; 0 = default {DEFAULT_COMMIT_TIMEOUT_S})",
            p.commit_timeout_s
        ));
    }
    Ok(())
}

/// Checks `ranks_per_worker` against `ranks` (0 = any split; otherwise it must divide
/// `ranks`, which makes it at most `ranks`). `Err` names the field:
/// `spec.ranks_per_worker: 3 does not divide spec.ranks (8) ...`.
pub fn validate_ranks_per_worker(ranks: u32, ranks_per_worker: u32) -> Result<(), String> {
    if ranks_per_worker == 0 {
        return Ok(());
    }
    if ranks_per_worker > ranks {
        return Err(format!(
            "spec.ranks_per_worker: {ranks_per_worker} is more than spec.ranks ({ranks}); the \
             gang uses ranks / ranks_per_worker workers with ranks_per_worker ranks each \
             (0 = any split)"
        ));
    }
    if !ranks.is_multiple_of(ranks_per_worker) {
        return Err(format!(
            "spec.ranks_per_worker: {ranks_per_worker} does not divide spec.ranks ({ranks}); the \
             gang uses ranks / ranks_per_worker workers with ranks_per_worker ranks each \
             (e.g. 8 ranks with 4 per worker = 2 workers; 0 = any split)"
        ));
    }
    Ok(())
}

/// A committed checkpoint named by `<job-id>/<step>` (`JobSpec.from_checkpoint`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckpointRef {
    /// The job that wrote it.
    pub job_id: String,
    /// Its step.
    pub step: u64,
}

impl CheckpointRef {
    /// Parses `<job-id>/<step>`; `Err` names the field `spec.from_checkpoint`.
    pub fn parse(text: &str) -> Result<CheckpointRef, String> {
        let bad = |why: &str| {
            format!(
                "spec.from_checkpoint: \"{text}\" {why} (expected <job-id>/<step>, e.g. \
                 job-mwykvvix10a2/120; `trainyard checkpoints <job-id>` lists them)"
            )
        };
        let Some((job_id, step)) = text.split_once('/') else {
            return Err(bad("has no '/'"));
        };
        if job_id.is_empty() {
            return Err(bad("names no job"));
        }
        let first_ok = job_id.starts_with(|c: char| c.is_ascii_alphanumeric());
        if !first_ok
            || !job_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(bad("is not a job id"));
        }
        let step = step
            .parse::<u64>()
            .map_err(|_| bad("does not end in a step number"))?;
        Ok(CheckpointRef {
            job_id: job_id.to_string(),
            step,
        })
    }

    /// The object-store folder of the checkpoint: `jobs/<job-id>/checkpoints/<step>`.
    pub fn path(&self) -> String {
        format!("jobs/{}/checkpoints/{}", self.job_id, self.step)
    }

    /// A [`CheckpointInfo`] naming the checkpoint, for `RankAssignment.resume_from`.
    pub fn info(&self) -> CheckpointInfo {
        CheckpointInfo {
            job_id: self.job_id.clone(),
            step: self.step,
            path: self.path(),
            ..Default::default()
        }
    }
}

impl std::fmt::Display for CheckpointRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.job_id, self.step)
    }
}

/// The checkpoint a spec starts from (`from_checkpoint`), if it names one that parses.
pub fn from_checkpoint(spec: &JobSpec) -> Option<CheckpointRef> {
    if spec.from_checkpoint.is_empty() {
        return None;
    }
    CheckpointRef::parse(&spec.from_checkpoint).ok()
}

/// A job's checkpoint policy with the defaults filled in (what workers are sent).
pub fn effective_checkpoint_policy(spec: &JobSpec) -> CheckpointPolicy {
    let mut p = spec.checkpoints.clone().unwrap_or_default();
    if p.keep_latest == 0 {
        p.keep_latest = DEFAULT_KEEP_LATEST;
    }
    if p.commit_timeout_s == 0 {
        p.commit_timeout_s = DEFAULT_COMMIT_TIMEOUT_S;
    }
    p
}

/// A spec that passed validation, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec {
    /// The spec with `name`, `preset` and `ranks` defaulted.
    pub spec: JobSpec,
    /// The resolved config, as JSON.
    pub resolved_config_json: String,
}

/// Validates `spec` and fills in defaults. `Err` is the InvalidArgument message.
pub fn validate_spec(registry: &Registry, spec: Option<JobSpec>) -> Result<ValidSpec, String> {
    let mut spec = spec.ok_or_else(|| "spec: missing".to_string())?;
    let job = registry.get(&spec.job).ok_or_else(|| {
        if spec.job.is_empty() {
            format!("spec.job: missing (known: {})", registry.names().join(", "))
        } else {
            format!(
                "spec.job: unknown job \"{}\" (known: {})",
                spec.job,
                registry.names().join(", ")
            )
        }
    })?;
    if spec.name.is_empty() {
        spec.name = spec.job.clone();
    }
    if spec.name.chars().count() > MAX_NAME_LEN {
        return Err(format!(
            "spec.name: too long ({} characters; at most {MAX_NAME_LEN})",
            spec.name.chars().count()
        ));
    }
    if spec.name.chars().any(char::is_control) {
        return Err("spec.name: must not contain control characters".to_string());
    }
    if spec.preset.is_empty() {
        spec.preset = job.schema().default_preset().to_string();
    }
    let overrides: BTreeMap<String, String> = spec
        .config
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let resolved = job
        .resolve_config(&spec.preset, &overrides)
        .map_err(|e| match &e {
            ConfigError::UnknownPreset { .. } => format!("spec.preset: {e}"),
            ConfigError::UnknownKey { key, .. } => format!("spec.config.{key}: {e}"),
            ConfigError::InvalidValue {
                key, value, reason, ..
            } => format!("spec.config.{key}: invalid value \"{value}\": {reason}"),
        })?;
    // The proto documents 0 as "defaults to 1".
    if spec.ranks == 0 {
        spec.ranks = 1;
    }
    let max = job.max_ranks();
    if spec.ranks > max {
        return Err(format!(
            "spec.ranks: job \"{}\" runs at most {max} rank(s); asked for {}",
            spec.job, spec.ranks
        ));
    }
    validate_ranks_per_worker(spec.ranks, spec.ranks_per_worker)?;
    if !matches!(spec.device_kind.as_str(), "" | "cpu" | "gpu") {
        return Err(format!(
            "spec.device_kind: unknown device kind \"{}\" (expected \"\", \"cpu\" or \"gpu\")",
            spec.device_kind
        ));
    }
    if spec.max_restarts > MAX_RESTARTS {
        return Err(format!(
            "spec.max_restarts: {} is too many (at most {MAX_RESTARTS})",
            spec.max_restarts
        ));
    }
    if spec.grace_period_s > MAX_GRACE_PERIOD_S {
        return Err(format!(
            "spec.grace_period_s: {} is too long (at most {MAX_GRACE_PERIOD_S})",
            spec.grace_period_s
        ));
    }
    if let Some(policy) = &spec.checkpoints {
        validate_checkpoint_policy(policy)?;
    }
    spec.from_checkpoint = spec.from_checkpoint.trim().to_string();
    if !spec.from_checkpoint.is_empty() {
        // Whether the job and its checkpoint exist is the coordinator's check (it needs the
        // store); here only the form.
        CheckpointRef::parse(&spec.from_checkpoint)?;
    }
    Ok(ValidSpec {
        spec,
        resolved_config_json: resolved.to_json(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(job: &str) -> JobSpec {
        JobSpec {
            job: job.to_string(),
            ..Default::default()
        }
    }

    fn err(s: JobSpec) -> String {
        validate_spec(trainyard_jobs::registry(), Some(s)).unwrap_err()
    }

    #[test]
    fn defaults_are_filled_in() {
        let reg = trainyard_jobs::registry();
        let v = validate_spec(reg, Some(spec("neural-ode"))).unwrap();
        assert_eq!(v.spec.name, "neural-ode");
        assert_eq!(v.spec.ranks, 1);
        let job = reg.get("neural-ode").unwrap();
        assert_eq!(v.spec.preset, job.schema().default_preset());
        let json: serde_json::Value = serde_json::from_str(&v.resolved_config_json).unwrap();
        assert!(json.is_object());
    }

    #[test]
    fn bad_fields_are_named() {
        assert!(err(spec("nope")).starts_with("spec.job: unknown job \"nope\" (known: "));
        assert!(err(spec("")).starts_with("spec.job: missing"));
        let mut s = spec("neural-ode");
        s.preset = "huge".into();
        assert!(err(s).starts_with("spec.preset: "));
        let mut s = spec("neural-ode");
        s.config.insert("no_such_key".into(), "1".into());
        assert!(err(s).starts_with("spec.config.no_such_key: "));
        let mut s = spec("neural-ode");
        s.ranks = 1000;
        assert!(err(s).starts_with("spec.ranks: "));
        let mut s = spec("neural-ode");
        s.device_kind = "tpu".into();
        assert!(err(s).starts_with("spec.device_kind: "));
        let mut s = spec("neural-ode");
        s.name = "x".repeat(MAX_NAME_LEN + 1);
        assert!(err(s).starts_with("spec.name: "));
        assert_eq!(
            validate_spec(trainyard_jobs::registry(), None).unwrap_err(),
            "spec: missing"
        );
    }

    #[test]
    fn ranks_per_worker_must_divide_ranks() {
        let reg = trainyard_jobs::registry();
        let max = reg.get("neural-ode").unwrap().max_ranks();
        let with = |ranks, per_worker| {
            let mut s = spec("neural-ode");
            s.ranks = ranks;
            s.ranks_per_worker = per_worker;
            s
        };
        // 0 = any split; a divisor is kept as given.
        assert_eq!(
            validate_spec(reg, Some(with(1, 0)))
                .unwrap()
                .spec
                .ranks_per_worker,
            0
        );
        assert_eq!(
            validate_spec(reg, Some(with(0, 1)))
                .unwrap()
                .spec
                .ranks_per_worker,
            1,
            "ranks 0 defaults to 1 before the check"
        );
        if max >= 4 {
            let v = validate_spec(reg, Some(with(4, 2))).unwrap();
            assert_eq!((v.spec.ranks, v.spec.ranks_per_worker), (4, 2));
        }
        let e = err(with(1, 2));
        assert!(
            e.starts_with("spec.ranks_per_worker: 2 is more than spec.ranks (1)"),
            "{e}"
        );
        // The rule itself, whatever the job's rank limit.
        assert_eq!(validate_ranks_per_worker(8, 4), Ok(()));
        assert_eq!(validate_ranks_per_worker(8, 8), Ok(()));
        assert_eq!(validate_ranks_per_worker(8, 0), Ok(()));
        let e = validate_ranks_per_worker(8, 3).unwrap_err();
        assert!(
            e.starts_with("spec.ranks_per_worker: 3 does not divide spec.ranks (8)"),
            "{e}"
        );
        assert!(validate_ranks_per_worker(4, 8)
            .unwrap_err()
            .starts_with("spec.ranks_per_worker: 8 is more than spec.ranks (4)"));
    }

    fn with_policy(p: CheckpointPolicy) -> JobSpec {
        let mut s = spec("neural-ode");
        s.checkpoints = Some(p);
        s
    }

    #[test]
    fn checkpoint_policies_are_checked_field_by_field() {
        let reg = trainyard_jobs::registry();
        let ok = CheckpointPolicy {
            keep_latest: 2,
            keep_best: 1,
            best_metric: "odenet/test_acc".into(),
            higher_is_better: true,
            commit_timeout_s: 60,
        };
        let v = validate_spec(reg, Some(with_policy(ok.clone()))).unwrap();
        assert_eq!(v.spec.checkpoints, Some(ok.clone()), "kept as given");
        assert!(validate_spec(reg, Some(with_policy(CheckpointPolicy::default()))).is_ok());

        let e = err(with_policy(CheckpointPolicy {
            keep_best: 2,
            ..Default::default()
        }));
        assert!(
            e.starts_with("spec.checkpoints.best_metric: required when keep_best > 0"),
            "{e}"
        );
        let e = err(with_policy(CheckpointPolicy {
            best_metric: "loss".into(),
            ..Default::default()
        }));
        assert!(
            e.starts_with("spec.checkpoints.keep_best: 0 keeps no best"),
            "{e}"
        );
        for (p, field) in [
            (
                CheckpointPolicy {
                    keep_latest: MAX_KEEP + 1,
                    ..Default::default()
                },
                "spec.checkpoints.keep_latest: ",
            ),
            (
                CheckpointPolicy {
                    keep_best: MAX_KEEP + 1,
                    best_metric: "loss".into(),
                    ..Default::default()
                },
                "spec.checkpoints.keep_best: ",
            ),
            (
                CheckpointPolicy {
                    keep_best: 1,
                    best_metric: "x".repeat(MAX_METRIC_NAME_LEN + 1),
                    ..Default::default()
                },
                "spec.checkpoints.best_metric: too long",
            ),
            (
                CheckpointPolicy {
                    keep_best: 1,
                    best_metric: "acc\n".into(),
                    ..Default::default()
                },
                "spec.checkpoints.best_metric: must not",
            ),
            (
                CheckpointPolicy {
                    commit_timeout_s: MAX_COMMIT_TIMEOUT_S + 1,
                    ..Default::default()
                },
                "spec.checkpoints.commit_timeout_s: ",
            ),
        ] {
            let e = err(with_policy(p));
            assert!(e.starts_with(field), "{e}");
        }
        // The bounds themselves are accepted.
        assert!(validate_checkpoint_policy(&CheckpointPolicy {
            keep_latest: MAX_KEEP,
            keep_best: MAX_KEEP,
            best_metric: "m".into(),
            higher_is_better: false,
            commit_timeout_s: MAX_COMMIT_TIMEOUT_S,
        })
        .is_ok());
    }

    #[test]
    fn effective_policy_fills_defaults() {
        let p = effective_checkpoint_policy(&spec("neural-ode"));
        assert_eq!(p.keep_latest, DEFAULT_KEEP_LATEST);
        assert_eq!(p.keep_best, 0);
        assert_eq!(p.commit_timeout_s, DEFAULT_COMMIT_TIMEOUT_S);
        let mut s = with_policy(CheckpointPolicy {
            keep_latest: 1,
            commit_timeout_s: 5,
            ..Default::default()
        });
        let p = effective_checkpoint_policy(&s);
        assert_eq!((p.keep_latest, p.commit_timeout_s), (1, 5));
        s.checkpoints = None;
        assert_eq!(
            effective_checkpoint_policy(&s).keep_latest,
            DEFAULT_KEEP_LATEST
        );
    }

    #[test]
    fn from_checkpoint_references_parse_or_name_the_field() {
        let r = CheckpointRef::parse("job-mwykvvix10a2/120").unwrap();
        assert_eq!(r.job_id, "job-mwykvvix10a2");
        assert_eq!(r.step, 120);
        assert_eq!(r.to_string(), "job-mwykvvix10a2/120");
        assert_eq!(r.path(), "jobs/job-mwykvvix10a2/checkpoints/120");
        let info = r.info();
        assert_eq!((info.job_id.as_str(), info.step), ("job-mwykvvix10a2", 120));
        assert_eq!(info.path, r.path());
        for bad in [
            "job-1",
            "/12",
            "job-1/",
            "job-1/x",
            "job-1/-3",
            "job 1/3",
            "a/b/3",
            "../x/3",
            "../5",
            ".hidden/5",
        ] {
            let e = CheckpointRef::parse(bad).unwrap_err();
            assert!(e.starts_with("spec.from_checkpoint: "), "{bad}: {e}");
        }
        let mut s = spec("neural-ode");
        s.from_checkpoint = "nonsense".into();
        assert!(err(s).starts_with("spec.from_checkpoint: "));
        let mut s = spec("neural-ode");
        s.from_checkpoint = " job-1/7 ".into();
        let v = validate_spec(trainyard_jobs::registry(), Some(s)).unwrap();
        assert_eq!(v.spec.from_checkpoint, "job-1/7", "trimmed");
        assert_eq!(
            from_checkpoint(&v.spec),
            Some(CheckpointRef {
                job_id: "job-1".into(),
                step: 7
            })
        );
        assert_eq!(from_checkpoint(&spec("neural-ode")), None);
    }

    #[test]
    fn a_bad_config_value_names_the_key() {
        let reg = trainyard_jobs::registry();
        let job = reg.get("neural-ode").unwrap();
        // Find a numeric key and give it a non-number.
        let key = job
            .schema()
            .keys()
            .iter()
            .find(|k| {
                matches!(
                    k.kind,
                    trainyard_jobs::ConfigKind::Int { .. }
                        | trainyard_jobs::ConfigKind::Float { .. }
                )
            })
            .expect("neural-ode has a numeric key");
        let mut s = spec("neural-ode");
        s.config.insert(key.name.to_string(), "not-a-number".into());
        let e = err(s);
        assert!(
            e.starts_with(&format!("spec.config.{}: invalid value", key.name)),
            "{e}"
        );
    }
}
