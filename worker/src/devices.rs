//! Parsing of the worker's `--devices` and `--emulate-gpus` options into device slots.
//!
//! Grammar of `--devices`: one or more groups joined by `+`, each `KIND:ARG`. Today the
//! only kind is `cpu:N` (N CPU slots). Real GPUs (`gpu:0,1`, by physical index) will be
//! another arm of the kind table in `parse_spec`; until then `gpu:` is a clear error that
//! points at `--emulate-gpus`. Slot indexes are assigned 0.. in order.

use trainyard_proto::Device;

use crate::WorkerError;

const DEVICES_FLAG: &str = "--devices";
const EMULATE_FLAG: &str = "--emulate-gpus";

/// Most slots one worker may advertise (guards against typos like `cpu:40000`).
pub const MAX_SLOTS: u32 = 1024;

/// Parses the device options of a worker.
///
/// `spec` is the `--devices` value; `None` means `cpu:<number of cores>`. `emulate_gpus`
/// N > 0 adds N GPU slots that run on the CPU (`emulated = true`); combined with an
/// explicit `--devices`, the emulated GPUs come after the listed devices, and without one
/// the worker advertises only the emulated GPUs.
pub fn parse_devices(spec: Option<&str>, emulate_gpus: u32) -> Result<Vec<Device>, WorkerError> {
    let mut devices = Vec::new();
    match spec {
        Some(spec) => parse_spec(spec, &mut devices)?,
        None if emulate_gpus > 0 => {}
        None => push_cpus(&mut devices, default_cpu_count()),
    }
    if emulate_gpus > MAX_SLOTS {
        return Err(WorkerError::InvalidDevices {
            flag: EMULATE_FLAG,
            value: emulate_gpus.to_string(),
            reason: format!("at most {MAX_SLOTS} slots"),
        });
    }
    for _ in 0..emulate_gpus {
        let index = devices.len() as u32;
        devices.push(Device {
            index,
            kind: "gpu".into(),
            emulated: true,
            model: "emulated".into(),
        });
    }
    if devices.len() as u64 > MAX_SLOTS as u64 {
        return Err(WorkerError::InvalidDevices {
            flag: DEVICES_FLAG,
            value: spec.unwrap_or_default().to_string(),
            reason: format!("{} slots in all, at most {MAX_SLOTS}", devices.len()),
        });
    }
    Ok(devices)
}

/// The number of CPU cores, the default CPU slot count.
pub fn default_cpu_count() -> u32 {
    num_cpus::get().max(1) as u32
}

fn invalid(spec: &str, reason: impl Into<String>) -> WorkerError {
    WorkerError::InvalidDevices {
        flag: DEVICES_FLAG,
        value: spec.to_string(),
        reason: reason.into(),
    }
}

fn parse_spec(spec: &str, devices: &mut Vec<Device>) -> Result<(), WorkerError> {
    if spec.trim().is_empty() {
        return Err(invalid(spec, "empty; expected for example \"cpu:4\""));
    }
    for group in spec.split('+') {
        let group = group.trim();
        let Some((kind, arg)) = group.split_once(':') else {
            return Err(invalid(
                spec,
                format!("group {group:?} is not KIND:ARG; expected for example \"cpu:4\""),
            ));
        };
        match kind.trim().to_ascii_lowercase().as_str() {
            "cpu" => {
                let arg = arg.trim();
                let n: u32 = arg.parse().map_err(|_| {
                    invalid(
                        spec,
                        format!("cpu slot count {arg:?} is not a positive integer"),
                    )
                })?;
                if n == 0 {
                    return Err(invalid(spec, "cpu slot count must be at least 1"));
                }
                if n > MAX_SLOTS {
                    return Err(invalid(spec, format!("at most {MAX_SLOTS} slots")));
                }
                push_cpus(devices, n);
            }
            "gpu" => return Err(invalid(
                spec,
                "real GPUs are not supported yet; use --emulate-gpus N for GPU slots on the CPU",
            )),
            other => {
                return Err(invalid(
                    spec,
                    format!("unknown device kind {other:?} (known: cpu)"),
                ))
            }
        }
    }
    Ok(())
}

fn push_cpus(devices: &mut Vec<Device>, n: u32) {
    for _ in 0..n {
        let index = devices.len() as u32;
        devices.push(Device {
            index,
            kind: "cpu".into(),
            emulated: false,
            model: String::new(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_one_cpu_slot_per_core() {
        let d = parse_devices(None, 0).unwrap();
        assert_eq!(d.len(), num_cpus::get());
        assert!(d.iter().all(|d| d.kind == "cpu" && !d.emulated));
        let idx: Vec<u32> = d.iter().map(|d| d.index).collect();
        assert_eq!(idx, (0..d.len() as u32).collect::<Vec<_>>());
    }

    #[test]
    fn explicit_cpu_count() {
        let d = parse_devices(Some("cpu:4"), 0).unwrap();
        assert_eq!(d.len(), 4);
        assert_eq!(d[3].index, 3);
        assert_eq!(d[3].kind, "cpu");
        let d = parse_devices(Some(" CPU:2 + cpu:1 "), 0).unwrap();
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn emulated_gpus() {
        let d = parse_devices(None, 3).unwrap();
        assert_eq!(d.len(), 3);
        assert!(d.iter().all(|d| d.kind == "gpu" && d.emulated));
        let d = parse_devices(Some("cpu:2"), 2).unwrap();
        let kinds: Vec<&str> = d.iter().map(|d| d.kind.as_str()).collect();
        assert_eq!(kinds, ["cpu", "cpu", "gpu", "gpu"]);
        assert_eq!(d[2].index, 2);
        assert!(d[2].emulated && !d[1].emulated);
    }

    #[test]
    fn errors_name_the_flag() {
        for bad in [
            "",
            "cpu",
            "cpu:x",
            "cpu:0",
            "cpu:-1",
            "tpu:2",
            "cpu:99999",
            "gpu:0",
        ] {
            let err = parse_devices(Some(bad), 0).unwrap_err().to_string();
            assert!(err.starts_with("--devices"), "{bad}: {err}");
        }
        let err = parse_devices(None, 5000).unwrap_err().to_string();
        assert!(err.starts_with("--emulate-gpus"), "{err}");
        let err = parse_devices(Some("tpu:2"), 0).unwrap_err().to_string();
        assert!(err.contains("tpu"), "{err}");
    }
}
