//! The job registry in the API's shape: what `ListJobTypes` answers.

use trainyard_jobs::ConfigKind;
use trainyard_proto::{ConfigKey, JobType};

/// The API's name of a config kind.
fn kind_name(kind: &ConfigKind) -> &'static str {
    match kind {
        ConfigKind::Int { .. } => "int",
        ConfigKind::Float { .. } => "float",
        ConfigKind::Bool => "bool",
        ConfigKind::Str => "string",
        ConfigKind::Choice(_) => "choice",
    }
}

/// The job types of this binary's registry, in the API's shape (`ListJobTypes`, and
/// `trainyard job-types --local`).
pub fn job_types() -> Vec<JobType> {
    trainyard_jobs::registry()
        .iter()
        .map(|job| {
            let schema = job.schema();
            let default_preset = schema.default_preset();
            JobType {
                name: job.name().to_string(),
                description: job.description().to_string(),
                presets: schema.presets().iter().map(|p| p.to_string()).collect(),
                default_preset: default_preset.to_string(),
                keys: schema
                    .keys()
                    .iter()
                    .map(|k| ConfigKey {
                        name: k.name.to_string(),
                        kind: kind_name(&k.kind).to_string(),
                        help: match &k.kind {
                            ConfigKind::Bool | ConfigKind::Str => k.help.to_string(),
                            kind => format!("{} ({kind})", k.help),
                        },
                        default: k.default_for(default_preset).to_string(),
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_types_include_neural_ode_with_keys() {
        let types = job_types();
        let ode = types
            .iter()
            .find(|t| t.name == "neural-ode")
            .expect("neural-ode registered");
        assert!(ode.presets.contains(&"quick".to_string()));
        assert!(ode
            .keys
            .iter()
            .any(|k| k.name == "epochs" && !k.default.is_empty()));
    }
}
