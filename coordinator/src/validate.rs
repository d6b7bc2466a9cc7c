//! Submit-time validation of a [`JobSpec`] against the jobs registry.
//!
//! Every error names the field it is about (`spec.job`, `spec.config.<key>`, `spec.ranks`,
//! ...) so the CLI can show it as is.

use std::collections::BTreeMap;

use trainyard_jobs::{ConfigError, Registry};
use trainyard_proto::JobSpec;

/// Longest accepted job name.
pub const MAX_NAME_LEN: usize = 128;
/// Most restarts a job may ask for.
pub const MAX_RESTARTS: u32 = 1000;
/// Longest grace period a job may ask for, in seconds.
pub const MAX_GRACE_PERIOD_S: u32 = 3600;

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
