//! Rendering of API objects as tables, JSON and YAML.
//!
//! JSON/YAML use the proto field names (snake_case) and enums as short names
//! (`"state": "RUNNING"`), so scripts can rely on the `.proto` files as their schema.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, CellAlignment, ContentArrangement, Table};
use serde_json::{json, Map, Value};
use trainyard_coordinator::validate::effective_checkpoint_policy;
use trainyard_proto::{
    CheckpointInfo, CheckpointPolicy, ConfigKey, Device, DeviceUse, Job, JobSpec, JobState,
    JobType, RankPlacement, ResultTable, Transition, Worker, WorkerState,
};

use crate::args::OutputFormat;

/// Short name of a job state (`RUNNING`), tolerant of unknown numbers.
pub fn job_state_name(state: i32) -> &'static str {
    JobState::try_from(state)
        .map(JobState::short_name)
        .unwrap_or("UNKNOWN")
}

/// Short name of a worker state (`ALIVE`).
pub fn worker_state_name(state: i32) -> &'static str {
    match WorkerState::try_from(state) {
        Ok(WorkerState::Alive) => "ALIVE",
        Ok(WorkerState::Dead) => "DEAD",
        Ok(WorkerState::Unspecified) => "UNSPECIFIED",
        Err(_) => "UNKNOWN",
    }
}

fn sorted_map<V: Clone + Into<Value>>(m: &HashMap<String, V>) -> Value {
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    let mut out = Map::new();
    for k in keys {
        out.insert(k.clone(), m[k].clone().into());
    }
    Value::Object(out)
}

fn metrics_json(m: &HashMap<String, f64>) -> Value {
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    let mut out = Map::new();
    for k in keys {
        // NaN/inf are not JSON numbers: keep them visible as strings.
        let v = m[k];
        let v = serde_json::Number::from_f64(v)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(v.to_string()));
        out.insert(k.clone(), v);
    }
    Value::Object(out)
}

/// JSON of a checkpoint policy.
pub fn checkpoint_policy_json(p: &CheckpointPolicy) -> Value {
    json!({
        "keep_latest": p.keep_latest,
        "keep_best": p.keep_best,
        "best_metric": p.best_metric,
        "higher_is_better": p.higher_is_better,
        "commit_timeout_s": p.commit_timeout_s,
    })
}

/// JSON of a job spec; `checkpoints` is the policy in effect (defaults filled in).
pub fn spec_json(s: &JobSpec) -> Value {
    json!({
        "job": s.job,
        "name": s.name,
        "preset": s.preset,
        "config": sorted_map(&s.config),
        "ranks": s.ranks,
        "ranks_per_worker": s.ranks_per_worker,
        "priority": s.priority,
        "max_restarts": s.max_restarts,
        "device_kind": s.device_kind,
        "grace_period_s": s.grace_period_s,
        "checkpoints": checkpoint_policy_json(&effective_checkpoint_policy(s)),
        "from_checkpoint": s.from_checkpoint,
    })
}

/// One line saying what a checkpoint policy keeps:
/// `keep latest 3, best 2 by odenet/test_acc (max); commit timeout 600 s`.
pub fn checkpoint_policy_text(p: &CheckpointPolicy) -> String {
    let mut out = format!("keep latest {}", p.keep_latest);
    if p.keep_best > 0 {
        let mode = if p.higher_is_better { "max" } else { "min" };
        out.push_str(&format!(
            ", best {} by {} ({mode})",
            p.keep_best, p.best_metric
        ));
    }
    out.push_str(&format!("; commit timeout {} s", p.commit_timeout_s));
    out
}

/// JSON of a state transition.
pub fn transition_json(t: &Transition) -> Value {
    json!({
        "from": job_state_name(t.from),
        "to": job_state_name(t.to),
        "at_unix_ms": t.at_unix_ms,
        "reason": t.reason,
    })
}

/// JSON of a rank placement.
pub fn placement_json(p: &RankPlacement) -> Value {
    json!({ "rank": p.rank, "worker_id": p.worker_id, "device_index": p.device_index })
}

/// JSON of a checkpoint.
pub fn checkpoint_json(c: &CheckpointInfo) -> Value {
    json!({
        "job_id": c.job_id,
        "step": c.step,
        "path": c.path,
        "created_unix_ms": c.created_unix_ms,
        "attempt": c.attempt,
        "metrics": metrics_json(&c.metrics),
    })
}

/// JSON of a results table.
pub fn result_json(r: &ResultTable) -> Value {
    json!({
        "title": r.title,
        "columns": r.columns,
        "rows": r.rows.iter().map(|row| json!({ "cells": row.cells })).collect::<Vec<_>>(),
        "notes": r.notes,
    })
}

/// JSON of a job, with every field of the proto message.
pub fn job_json(j: &Job) -> Value {
    json!({
        "id": j.id,
        "owner": j.owner,
        "spec": j.spec.as_ref().map(spec_json),
        "state": job_state_name(j.state),
        "state_reason": j.state_reason,
        "transitions": j.transitions.iter().map(transition_json).collect::<Vec<_>>(),
        "created_unix_ms": j.created_unix_ms,
        "attempt": j.attempt,
        "restarts": j.restarts,
        "placement": j.placement.iter().map(placement_json).collect::<Vec<_>>(),
        "latest_metrics": metrics_json(&j.latest_metrics),
        "latest_step": j.latest_step,
        "latest_checkpoint": j.latest_checkpoint.as_ref().map(checkpoint_json),
        "result": j.result.as_ref().map(result_json),
        "artifacts": j.artifacts.iter().map(artifact_json).collect::<Vec<_>>(),
        "resolved_config_json": j.resolved_config_json,
        "revision": j.revision,
        "record_version": j.record_version,
    })
}

fn device_json(d: &Device) -> Value {
    json!({ "index": d.index, "kind": d.kind, "emulated": d.emulated, "model": d.model, "memory_bytes": d.memory_bytes })
}

fn device_use_json(u: &DeviceUse) -> Value {
    json!({ "device_index": u.device_index, "job_id": u.job_id, "rank": u.rank })
}

/// JSON of a worker.
pub fn worker_json(w: &Worker) -> Value {
    json!({
        "id": w.id,
        "name": w.name,
        "hostname": w.hostname,
        "state": worker_state_name(w.state),
        "devices": w.devices.iter().map(device_json).collect::<Vec<_>>(),
        "used": w.used.iter().map(device_use_json).collect::<Vec<_>>(),
        "registered_unix_ms": w.registered_unix_ms,
        "last_heartbeat_unix_ms": w.last_heartbeat_unix_ms,
    })
}

fn config_key_json(k: &ConfigKey) -> Value {
    json!({ "name": k.name, "kind": k.kind, "help": k.help, "default": k.default })
}

/// JSON of a job type.
pub fn job_type_json(t: &JobType) -> Value {
    json!({
        "name": t.name,
        "description": t.description,
        "presets": t.presets,
        "default_preset": t.default_preset,
        "keys": t.keys.iter().map(config_key_json).collect::<Vec<_>>(),
    })
}

/// Prints `value` as JSON or YAML; returns false for table output (the caller draws it).
pub fn print_structured(format: OutputFormat, value: &Value) -> Result<bool> {
    match format {
        OutputFormat::Json => {
            println!("{}", serde_json::to_string_pretty(value)?);
            Ok(true)
        }
        OutputFormat::Yaml => {
            print!("{}", serde_yaml::to_string(value)?);
            Ok(true)
        }
        OutputFormat::Table => Ok(false),
    }
}

/// A table in the house style.
pub fn new_table<I, S>(header: I) -> Table
where
    I: IntoIterator<Item = S>,
    S: Into<Cell>,
{
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    t
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A duration in compact form: `0.4s`, `45s`, `3m12s`, `2h05m`, `3d4h`.
pub fn compact_duration(ms: i64) -> String {
    let ms = ms.max(0);
    let s = ms / 1000;
    match s {
        0..=9 => format!("{:.1}s", ms as f64 / 1000.0),
        10..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// How long ago a timestamp was (`3m12s ago`), or `-` for 0.
pub fn ago(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    format!("{} ago", compact_duration(now_unix_ms() - unix_ms))
}

/// A UTC timestamp `2026-11-27 05:43:48` (no time zone database needed).
pub fn utc_timestamp(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let secs = unix_ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let tod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        tod / 3600,
        (tod % 3600) / 60,
        tod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    // Howard Hinnant's algorithm.
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A metric value for humans: 4 significant digits, integers without decimals.
pub fn fmt_metric(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{}", v as i64)
    } else if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// Metrics sorted by name as `name=value` pairs.
pub fn metric_pairs(m: &HashMap<String, f64>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = m.iter().map(|(k, v)| (k.clone(), fmt_metric(*v))).collect();
    v.sort();
    v
}

/// Cuts `s` to at most `max` characters, with an ellipsis.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// The table of a list of jobs.
pub fn jobs_table(jobs: &[Job]) -> Table {
    let mut t = new_table([
        "ID", "USER", "NAME", "JOB", "STATE", "RANKS", "PRIO", "RESTARTS", "STEP", "AGE", "REASON",
    ]);
    for j in jobs {
        let spec = j.spec.clone().unwrap_or_default();
        t.add_row(vec![
            Cell::new(&j.id),
            Cell::new(if j.owner.is_empty() { "-" } else { &j.owner }),
            Cell::new(&spec.name),
            Cell::new(&spec.job),
            Cell::new(job_state_name(j.state)),
            Cell::new(spec.ranks).set_alignment(CellAlignment::Right),
            Cell::new(spec.priority).set_alignment(CellAlignment::Right),
            Cell::new(format!("{}/{}", j.restarts, spec.max_restarts))
                .set_alignment(CellAlignment::Right),
            Cell::new(j.latest_step).set_alignment(CellAlignment::Right),
            Cell::new(compact_duration(now_unix_ms() - j.created_unix_ms)),
            Cell::new(truncate(&j.state_reason, 48)),
        ]);
    }
    t
}

/// A two-column `KEY  VALUE` table.
pub fn kv_table(rows: &[(&str, String)]) -> Table {
    let mut t = Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic);
    for (k, v) in rows {
        t.add_row(vec![Cell::new(format!("{k}:")), Cell::new(v)]);
    }
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    t
}

/// The human-readable description of one job (`trainyard describe`).
pub fn describe_text(j: &Job) -> String {
    let spec = j.spec.clone().unwrap_or_default();
    let mut out = String::new();
    let mut config: Vec<String> = spec
        .config
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    config.sort();
    let rows = vec![
        ("Id", j.id.clone()),
        (
            "Owner",
            if j.owner.is_empty() {
                "-".into()
            } else {
                j.owner.clone()
            },
        ),
        ("Name", spec.name.clone()),
        ("Job", spec.job.clone()),
        ("Preset", spec.preset.clone()),
        (
            "Overrides",
            if config.is_empty() {
                "-".into()
            } else {
                config.join(" ")
            },
        ),
        ("State", job_state_name(j.state).to_string()),
        (
            "Reason",
            if j.state_reason.is_empty() {
                "-".into()
            } else {
                j.state_reason.clone()
            },
        ),
        (
            "Ranks",
            if spec.ranks_per_worker > 0 {
                format!("{} ({} per worker)", spec.ranks, spec.ranks_per_worker)
            } else {
                spec.ranks.to_string()
            },
        ),
        (
            "Device kind",
            if spec.device_kind.is_empty() {
                "any".into()
            } else {
                spec.device_kind.clone()
            },
        ),
        ("Priority", spec.priority.to_string()),
        ("Attempt", j.attempt.to_string()),
        (
            "Restarts",
            format!("{} of {}", j.restarts, spec.max_restarts),
        ),
        (
            "Created",
            format!(
                "{} UTC ({})",
                utc_timestamp(j.created_unix_ms),
                ago(j.created_unix_ms)
            ),
        ),
        ("Latest step", j.latest_step.to_string()),
        (
            "Checkpoint",
            match &j.latest_checkpoint {
                Some(c) => format!("step {} at {} (attempt {})", c.step, c.path, c.attempt),
                None => "-".into(),
            },
        ),
        (
            "Checkpoint policy",
            checkpoint_policy_text(&effective_checkpoint_policy(&spec)),
        ),
        (
            "From",
            if spec.from_checkpoint.is_empty() {
                "-".into()
            } else {
                format!("checkpoint {}", spec.from_checkpoint)
            },
        ),
    ];
    out.push_str(&kv_table(&rows).trim_fmt());
    out.push('\n');

    if !j.placement.is_empty() {
        let mut t = new_table(["RANK", "WORKER", "DEVICE"]);
        for p in &j.placement {
            t.add_row(vec![
                p.rank.to_string(),
                p.worker_id.clone(),
                p.device_index.to_string(),
            ]);
        }
        out.push_str("\nPlacement:\n");
        out.push_str(&t.to_string());
        out.push('\n');
    }
    if !j.latest_metrics.is_empty() {
        let mut t = new_table(["METRIC", "VALUE"]);
        for (k, v) in metric_pairs(&j.latest_metrics) {
            t.add_row(vec![
                Cell::new(k),
                Cell::new(v).set_alignment(CellAlignment::Right),
            ]);
        }
        out.push_str("\nLatest metrics:\n");
        out.push_str(&t.to_string());
        out.push('\n');
    }
    if !j.transitions.is_empty() {
        let mut t = new_table(["AT (UTC)", "FROM", "TO", "REASON"]);
        for tr in &j.transitions {
            let from = match JobState::try_from(tr.from) {
                Ok(JobState::Unspecified) | Err(_) => "-",
                Ok(s) => s.short_name(),
            };
            t.add_row(vec![
                utc_timestamp(tr.at_unix_ms),
                from.to_string(),
                job_state_name(tr.to).to_string(),
                tr.reason.clone(),
            ]);
        }
        out.push_str("\nHistory:\n");
        out.push_str(&t.to_string());
        out.push('\n');
    }
    if let Some(r) = &j.result {
        out.push('\n');
        out.push_str(&result_text(r));
    }
    out
}

/// A results table with its title and notes.
pub fn result_text(r: &ResultTable) -> String {
    let mut t = new_table(r.columns.iter().map(String::as_str));
    for row in &r.rows {
        t.add_row(row.cells.iter().map(|c| {
            let numeric = c.trim().trim_end_matches('%').parse::<f64>().is_ok();
            let cell = Cell::new(c);
            if numeric {
                cell.set_alignment(CellAlignment::Right)
            } else {
                cell
            }
        }));
    }
    let mut out = String::new();
    if !r.title.is_empty() {
        out.push_str(&r.title);
        out.push('\n');
    }
    out.push_str(&t.to_string());
    out.push('\n');
    for n in &r.notes {
        out.push_str("  • ");
        out.push_str(n);
        out.push('\n');
    }
    out
}

/// A byte count for people: `812 B`, `3.4 KiB`, `12.0 MiB`, `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// JSON of an artifact.
pub fn artifact_json(a: &trainyard_proto::Artifact) -> Value {
    json!({
        "name": a.name,
        "path": a.path,
        "url": a.url,
        "size_bytes": a.size_bytes,
        "created": utc_timestamp(a.created_unix_ms),
    })
}

/// Devices in compact form: `4×cpu`, `2×gpu (emulated)`, `1×gpu (NVIDIA H100 80GB HBM3, 79.6 GiB)`.
pub fn devices_summary(devices: &[Device]) -> String {
    let mut groups: Vec<(String, usize)> = Vec::new();
    for d in devices {
        let label = if d.emulated {
            format!("{} (emulated)", d.kind)
        } else if d.model.is_empty() {
            d.kind.clone()
        } else {
            format!("{} ({})", d.kind, d.model)
        };
        match groups.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += 1,
            None => groups.push((label, 1)),
        }
    }
    groups
        .iter()
        .map(|(l, n)| format!("{n}×{l}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The table of workers.
pub fn workers_table(workers: &[Worker]) -> Table {
    let mut t = new_table([
        "ID",
        "NAME",
        "HOST",
        "STATE",
        "DEVICES",
        "USED",
        "JOBS",
        "HEARTBEAT",
    ]);
    for w in workers {
        let mut jobs: Vec<&str> = w.used.iter().map(|u| u.job_id.as_str()).collect();
        jobs.sort();
        jobs.dedup();
        t.add_row(vec![
            Cell::new(&w.id),
            Cell::new(&w.name),
            Cell::new(&w.hostname),
            Cell::new(worker_state_name(w.state)),
            Cell::new(devices_summary(&w.devices)),
            Cell::new(format!("{}/{}", w.used.len(), w.devices.len()))
                .set_alignment(CellAlignment::Right),
            Cell::new(if jobs.is_empty() {
                "-".into()
            } else {
                jobs.join(", ")
            }),
            Cell::new(ago(w.last_heartbeat_unix_ms)),
        ]);
    }
    t
}

/// The table of checkpoints.
pub fn checkpoints_table(cps: &[CheckpointInfo]) -> Table {
    let mut t = new_table(["STEP", "ATTEMPT", "CREATED (UTC)", "PATH", "METRICS"]);
    for c in cps {
        let metrics = metric_pairs(&c.metrics)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        t.add_row(vec![
            Cell::new(c.step).set_alignment(CellAlignment::Right),
            Cell::new(c.attempt).set_alignment(CellAlignment::Right),
            Cell::new(utc_timestamp(c.created_unix_ms)),
            Cell::new(&c.path),
            Cell::new(truncate(&metrics, 60)),
        ]);
    }
    t
}

/// The text of `trainyard job-types`: one summary table, then each type's keys.
pub fn job_types_text(types: &[JobType]) -> String {
    let mut t = new_table(["JOB", "PRESETS", "DESCRIPTION"]);
    for ty in types {
        let presets = ty
            .presets
            .iter()
            .map(|p| {
                if *p == ty.default_preset {
                    format!("{p}*")
                } else {
                    p.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        t.add_row(vec![ty.name.clone(), presets, ty.description.clone()]);
    }
    let mut out = t.to_string();
    out.push_str("\n(* = default preset)\n");
    for ty in types {
        let mut k = new_table(["KEY", "KIND", "DEFAULT", "HELP"]);
        for key in &ty.keys {
            k.add_row(vec![
                key.name.clone(),
                key.kind.clone(),
                key.default.clone(),
                key.help.clone(),
            ]);
        }
        out.push_str(&format!(
            "\n{} config keys (defaults of preset {:?}; override with --set KEY=VALUE):\n",
            ty.name, ty.default_preset
        ));
        out.push_str(&k.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_job() -> Job {
        Job {
            id: "j-1".into(),
            spec: Some(JobSpec {
                job: "neural-ode".into(),
                name: "n".into(),
                ranks: 1,
                ..Default::default()
            }),
            state: JobState::Running as i32,
            latest_metrics: [("acc".to_string(), 0.5), ("nan".to_string(), f64::NAN)]
                .into_iter()
                .collect(),
            latest_checkpoint: Some(CheckpointInfo {
                job_id: "j-1".into(),
                step: 7,
                path: "jobs/j-1/checkpoints/7".into(),
                ..Default::default()
            }),
            placement: vec![RankPlacement {
                rank: 0,
                worker_id: "w".into(),
                device_index: 1,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn job_json_uses_short_state_names_and_proto_fields() {
        let v = job_json(&sample_job());
        assert_eq!(v["state"], "RUNNING");
        assert_eq!(v["id"], "j-1");
        assert_eq!(v["spec"]["job"], "neural-ode");
        assert_eq!(v["latest_metrics"]["acc"], 0.5);
        assert_eq!(v["latest_metrics"]["nan"], "NaN");
        assert_eq!(v["latest_checkpoint"]["step"], 7);
        assert_eq!(v["placement"][0]["device_index"], 1);
        assert_eq!(v["restarts"], 0);
        assert!(v["transitions"].as_array().unwrap().is_empty());
        assert!(v["result"].is_null());
    }

    #[test]
    fn the_checkpoint_policy_is_shown() {
        let mut j = sample_job();
        if let Some(spec) = j.spec.as_mut() {
            spec.checkpoints = Some(CheckpointPolicy {
                keep_latest: 2,
                keep_best: 1,
                best_metric: "odenet/test_acc".into(),
                higher_is_better: true,
                commit_timeout_s: 0,
            });
            spec.from_checkpoint = "job-a/40".into();
        }
        let d = describe_text(&j);
        assert!(
            d.contains("keep latest 2, best 1 by odenet/test_acc (max); commit timeout 600 s"),
            "{d}"
        );
        assert!(d.contains("checkpoint job-a/40"), "{d}");
        let v = job_json(&j);
        assert_eq!(v["spec"]["checkpoints"]["keep_latest"], 2);
        assert_eq!(v["spec"]["checkpoints"]["best_metric"], "odenet/test_acc");
        assert_eq!(v["spec"]["checkpoints"]["higher_is_better"], true);
        assert_eq!(v["spec"]["checkpoints"]["commit_timeout_s"], 600);
        assert_eq!(v["spec"]["from_checkpoint"], "job-a/40");
    }

    #[test]
    fn yaml_and_json_render() {
        let v = job_json(&sample_job());
        let y = serde_yaml::to_string(&v).unwrap();
        assert!(y.contains("state: RUNNING"), "{y}");
    }

    #[test]
    fn timestamps_and_durations() {
        assert_eq!(utc_timestamp(0), "-");
        assert_eq!(utc_timestamp(1_000), "1970-01-01 00:00:01");
        // 2024-02-29 12:00:00 UTC
        assert_eq!(utc_timestamp(1_709_208_000_000), "2024-02-29 12:00:00");
        assert_eq!(compact_duration(59_000), "59s");
        assert_eq!(compact_duration(400), "0.4s");
        assert_eq!(compact_duration(192_000), "3m12s");
        assert_eq!(compact_duration(7_500_000), "2h05m");
    }

    #[test]
    fn tables_contain_the_data() {
        let j = sample_job();
        let t = jobs_table(std::slice::from_ref(&j)).to_string();
        assert!(t.contains("j-1") && t.contains("RUNNING"), "{t}");
        let d = describe_text(&j);
        assert!(
            d.contains("jobs/j-1/checkpoints/7") && d.contains("acc"),
            "{d}"
        );
        assert!(
            d.contains("keep latest 3; commit timeout 600 s"),
            "the default policy: {d}"
        );
        assert_eq!(fmt_metric(3.0), "3");
        assert_eq!(fmt_metric(0.12345), "0.1235");
        assert_eq!(truncate("abcdef", 4), "abc…");
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(human_bytes(812), "812 B");
        assert_eq!(human_bytes(3 * 1024 + 400), "3.4 KiB");
        assert_eq!(human_bytes(12 << 20), "12.0 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn devices_are_grouped() {
        let d = |i, k: &str, e| Device {
            index: i,
            kind: k.into(),
            emulated: e,
            model: String::new(),
            memory_bytes: 0,
        };
        assert_eq!(
            devices_summary(&[d(0, "cpu", false), d(1, "cpu", false)]),
            "2×cpu"
        );
        assert_eq!(devices_summary(&[d(0, "gpu", true)]), "1×gpu (emulated)");
        let mut h100 = d(1, "gpu", false);
        h100.model = "NVIDIA H100 80GB HBM3, 79.6 GiB".into();
        assert_eq!(
            devices_summary(&[d(0, "cpu", false), h100]),
            "1×cpu, 1×gpu (NVIDIA H100 80GB HBM3, 79.6 GiB)"
        );
    }
}
