//! `trainyard job-types`: the jobs this binary (or, with `--remote`, the cluster) can run.

use anyhow::Result;
use serde_json::Value;
use trainyard_jobs::ConfigKind;
use trainyard_proto::{ConfigKey, JobType, ListJobTypesRequest};

use crate::args::JobTypesArgs;
use crate::client::Client;
use crate::error::rpc;
use crate::output::{job_type_json, job_types_text, print_structured};

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

/// The job types of this binary's registry, in the API's shape.
pub fn local_job_types() -> Vec<JobType> {
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

/// Runs `trainyard job-types`.
pub async fn run(url: &str, args: JobTypesArgs) -> Result<i32> {
    // The cluster's job types; this binary's own when asked, or when no coordinator answers
    // (so `trainyard job-types` is useful before any cluster exists).
    let types = if args.local {
        local_job_types()
    } else {
        match Client::connect(url).await {
            Ok(mut client) => {
                client
                    .jobs
                    .list_job_types(ListJobTypesRequest {})
                    .await
                    .map_err(rpc)?
                    .into_inner()
                    .job_types
            }
            Err(_) => {
                eprintln!(
                    "note: no coordinator answers at {}; showing the job types built into this binary",
                    crate::client::normalize_url(url)
                );
                local_job_types()
            }
        }
    };
    let value = Value::Array(types.iter().map(job_type_json).collect());
    if !print_structured(args.output.output, &value)? {
        print!("{}", job_types_text(&types));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_types_include_neural_ode_with_keys() {
        let types = local_job_types();
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
