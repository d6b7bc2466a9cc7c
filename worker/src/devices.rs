//! Parsing of the worker's `--devices` and `--emulate-gpus` options into device slots, and
//! detection of the machine's real GPUs (feature `cuda`).
//!
//! Grammar of `--devices`: one or more groups joined by `+`, each `KIND:ARG`:
//!
//! * `cpu:N`: N CPU slots;
//! * `gpu:0,1` (or `cuda:0,1`): the real GPUs with these CUDA ordinals (the numbers
//!   `nvidia-smi` shows), one slot each; `gpu:all` takes every GPU. Needs a binary built with
//!   the `cuda` feature; without it `gpu:` is an error that says so.
//!
//! Slot indexes are assigned 0.. in order. Without `--devices` a worker offers one CPU slot
//! per core and, when built with `cuda`, every GPU the CUDA driver reports. A real GPU slot
//! advertises kind `gpu`, `emulated = false`, and its name and memory in `model`
//! (`NVIDIA H100 80GB HBM3, 79.6 GiB`); the worker keeps its CUDA ordinal
//! ([`DeviceSlots::cuda_ordinals`]) and starts a rank placed on it with
//! `CUDA_VISIBLE_DEVICES=<ordinal>`.

use std::collections::BTreeMap;

use trainyard_proto::Device;

use crate::WorkerError;

const DEVICES_FLAG: &str = "--devices";
const EMULATE_FLAG: &str = "--emulate-gpus";

/// Most slots one worker may advertise (guards against typos like `cpu:40000`).
pub const MAX_SLOTS: u32 = 1024;

/// The device slots a worker advertises, with the CUDA ordinal of each real GPU slot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceSlots {
    /// The slots, in index order, as advertised to the coordinator.
    pub devices: Vec<Device>,
    /// CUDA ordinal of each real (non-emulated) GPU slot, by slot index.
    pub cuda_ordinals: BTreeMap<u32, u32>,
}

/// A GPU the CUDA driver reports on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// CUDA ordinal (as `nvidia-smi` numbers the GPUs, unless `CUDA_VISIBLE_DEVICES` is set).
    pub ordinal: u32,
    /// Device name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total memory in bytes.
    pub memory_bytes: u64,
}

impl GpuInfo {
    /// What a slot on this GPU advertises as its `model`: name and memory.
    pub fn model(&self) -> String {
        format!(
            "{}, {:.1} GiB",
            self.name,
            self.memory_bytes as f64 / (1u64 << 30) as f64
        )
    }
}

/// Why the GPUs could not be listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuDetectError {
    /// The binary has no CUDA support.
    #[error(
        "this trainyard was built without cuda (rebuild with `--features cuda`, see docs/gpu.md)"
    )]
    NotBuilt,
    /// The CUDA driver failed (no driver, no device, ...).
    #[error("the CUDA driver cannot list the GPUs: {0}")]
    Driver(String),
}

/// True when this binary was built with the `cuda` feature.
pub const fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

/// The GPUs of this machine, from the CUDA driver (feature `cuda`).
pub fn detect_gpus() -> Result<Vec<GpuInfo>, GpuDetectError> {
    #[cfg(feature = "cuda")]
    {
        cuda_gpus()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(GpuDetectError::NotBuilt)
    }
}

#[cfg(feature = "cuda")]
fn cuda_gpus() -> Result<Vec<GpuInfo>, GpuDetectError> {
    use candle_core::cuda::cudarc::driver::result;
    let driver = |e: result::DriverError| GpuDetectError::Driver(format!("{e:?}"));
    result::init().map_err(driver)?;
    let count = result::device::get_count().map_err(driver)?;
    let mut gpus = Vec::new();
    for ordinal in 0..count.max(0) {
        let dev = result::device::get(ordinal).map_err(driver)?;
        let name = result::device::get_name(dev).map_err(driver)?;
        // SAFETY: `dev` is a device handle the driver just returned for a valid ordinal.
        let memory = unsafe { result::device::total_mem(dev) }.map_err(driver)?;
        gpus.push(GpuInfo {
            ordinal: ordinal as u32,
            name,
            memory_bytes: memory as u64,
        });
    }
    Ok(gpus)
}

/// Parses the device options of a worker into slots (without GPU ordinals; see
/// [`parse_device_slots`]).
///
/// `spec` is the `--devices` value; `None` means `cpu:<number of cores>` (plus every real
/// GPU in a `cuda` build). `emulate_gpus` N > 0 adds N GPU slots that run on the CPU
/// (`emulated = true`); combined with an explicit `--devices`, the emulated GPUs come after
/// the listed devices, and without one the worker advertises only the emulated GPUs.
pub fn parse_devices(spec: Option<&str>, emulate_gpus: u32) -> Result<Vec<Device>, WorkerError> {
    Ok(parse_device_slots(spec, emulate_gpus)?.devices)
}

/// Parses the device options of a worker into slots, listing real GPUs with
/// [`detect_gpus`] when the spec names them (or, in a `cuda` build, when there is no spec).
pub fn parse_device_slots(
    spec: Option<&str>,
    emulate_gpus: u32,
) -> Result<DeviceSlots, WorkerError> {
    parse_with(spec, emulate_gpus, &detect_gpus)
}

type Probe<'a> = &'a dyn Fn() -> Result<Vec<GpuInfo>, GpuDetectError>;

fn parse_with(
    spec: Option<&str>,
    emulate_gpus: u32,
    probe: Probe<'_>,
) -> Result<DeviceSlots, WorkerError> {
    let mut slots = DeviceSlots::default();
    match spec {
        Some(spec) => parse_spec(spec, &mut slots, probe)?,
        None if emulate_gpus > 0 => {}
        None => {
            push_cpus(&mut slots.devices, default_cpu_count());
            match probe() {
                Ok(gpus) => {
                    for gpu in &gpus {
                        push_gpu(&mut slots, gpu);
                    }
                }
                Err(GpuDetectError::NotBuilt) => {}
                Err(e) => tracing::warn!(error = %e, "no GPUs offered"),
            }
        }
    }
    if emulate_gpus > MAX_SLOTS {
        return Err(WorkerError::InvalidDevices {
            flag: EMULATE_FLAG,
            value: emulate_gpus.to_string(),
            reason: format!("at most {MAX_SLOTS} slots"),
        });
    }
    for _ in 0..emulate_gpus {
        let index = slots.devices.len() as u32;
        slots.devices.push(Device {
            index,
            kind: "gpu".into(),
            emulated: true,
            model: "emulated".into(),
            memory_bytes: 0,
        });
    }
    if slots.devices.len() as u64 > MAX_SLOTS as u64 {
        return Err(WorkerError::InvalidDevices {
            flag: DEVICES_FLAG,
            value: spec.unwrap_or_default().to_string(),
            reason: format!("{} slots in all, at most {MAX_SLOTS}", slots.devices.len()),
        });
    }
    Ok(slots)
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

fn parse_spec(spec: &str, slots: &mut DeviceSlots, probe: Probe<'_>) -> Result<(), WorkerError> {
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
                push_cpus(&mut slots.devices, n);
            }
            "gpu" | "cuda" => {
                let gpus = probe().map_err(|e| match e {
                    GpuDetectError::NotBuilt => invalid(
                        spec,
                        "real GPUs need the `cuda` feature and this binary was built without \
                         cuda; rebuild with `--features cuda` (docs/gpu.md) or use \
                         --emulate-gpus N for GPU slots on the CPU",
                    ),
                    other => invalid(spec, other.to_string()),
                })?;
                for ordinal in gpu_ordinals(spec, arg, &gpus)? {
                    if slots.cuda_ordinals.values().any(|o| *o == ordinal) {
                        return Err(invalid(spec, format!("GPU {ordinal} is listed twice")));
                    }
                    if let Some(gpu) = gpus.iter().find(|g| g.ordinal == ordinal) {
                        push_gpu(slots, gpu);
                    }
                }
            }
            other => {
                return Err(invalid(
                    spec,
                    format!("unknown device kind {other:?} (known: cpu, gpu)"),
                ))
            }
        }
    }
    Ok(())
}

/// The ordinals `arg` names (`all`, or a comma-separated list), each checked against `gpus`.
fn gpu_ordinals(spec: &str, arg: &str, gpus: &[GpuInfo]) -> Result<Vec<u32>, WorkerError> {
    let arg = arg.trim();
    let have = || {
        if gpus.is_empty() {
            "this machine has no GPU".to_string()
        } else {
            let list: Vec<String> = gpus.iter().map(|g| g.ordinal.to_string()).collect();
            format!("this machine has {} GPU(s): {}", gpus.len(), list.join(","))
        }
    };
    if arg.eq_ignore_ascii_case("all") {
        if gpus.is_empty() {
            return Err(invalid(spec, have()));
        }
        return Ok(gpus.iter().map(|g| g.ordinal).collect());
    }
    let mut out = Vec::new();
    for part in arg.split(',') {
        let part = part.trim();
        let ordinal: u32 = part.parse().map_err(|_| {
            invalid(
                spec,
                format!("GPU index {part:?} is not a number (expected for example \"gpu:0,1\" or \"gpu:all\")"),
            )
        })?;
        if !gpus.iter().any(|g| g.ordinal == ordinal) {
            return Err(invalid(spec, format!("no GPU {ordinal}: {}", have())));
        }
        out.push(ordinal);
    }
    Ok(out)
}

fn push_cpus(devices: &mut Vec<Device>, n: u32) {
    for _ in 0..n {
        let index = devices.len() as u32;
        devices.push(Device {
            index,
            kind: "cpu".into(),
            emulated: false,
            model: String::new(),
            memory_bytes: 0,
        });
    }
}

fn push_gpu(slots: &mut DeviceSlots, gpu: &GpuInfo) {
    let index = slots.devices.len() as u32;
    slots.devices.push(Device {
        index,
        kind: "gpu".into(),
        emulated: false,
        model: gpu.model(),
        memory_bytes: gpu.memory_bytes,
    });
    slots.cuda_ordinals.insert(index, gpu.ordinal);
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
        for bad in ["", "cpu", "cpu:x", "cpu:0", "cpu:-1", "tpu:2", "cpu:99999"] {
            let err = parse_devices(Some(bad), 0).unwrap_err().to_string();
            assert!(err.starts_with("--devices"), "{bad}: {err}");
        }
        let err = parse_devices(None, 5000).unwrap_err().to_string();
        assert!(err.starts_with("--emulate-gpus"), "{err}");
        let err = parse_devices(Some("tpu:2"), 0).unwrap_err().to_string();
        assert!(err.contains("tpu"), "{err}");
    }

    fn fake_gpus() -> Result<Vec<GpuInfo>, GpuDetectError> {
        Ok(vec![
            GpuInfo {
                ordinal: 0,
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_bytes: 85_520_809_984,
            },
            GpuInfo {
                ordinal: 1,
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_bytes: 85_520_809_984,
            },
        ])
    }

    #[test]
    fn gpu_without_cuda_names_the_flag_and_the_feature() {
        let not_built = || Err(GpuDetectError::NotBuilt);
        for spec in ["gpu:0", "cuda:0,1", "cpu:1+gpu:all"] {
            let err = parse_with(Some(spec), 0, &not_built)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("--devices"), "{spec}: {err}");
            assert!(err.contains("built without cuda"), "{spec}: {err}");
            assert!(err.contains("--emulate-gpus"), "{spec}: {err}");
        }
        if !cuda_built() {
            let err = parse_devices(Some("gpu:0"), 0).unwrap_err().to_string();
            assert!(err.contains("built without cuda"), "{err}");
            assert_eq!(detect_gpus(), Err(GpuDetectError::NotBuilt));
            // the default stays CPU-only
            let slots = parse_device_slots(None, 0).unwrap();
            assert!(slots.cuda_ordinals.is_empty());
        }
    }

    #[test]
    fn real_gpus_get_slots_models_and_ordinals() {
        let s = parse_with(Some("cpu:2+gpu:1"), 1, &fake_gpus).unwrap();
        let kinds: Vec<(&str, bool)> = s
            .devices
            .iter()
            .map(|d| (d.kind.as_str(), d.emulated))
            .collect();
        assert_eq!(
            kinds,
            [
                ("cpu", false),
                ("cpu", false),
                ("gpu", false),
                ("gpu", true)
            ]
        );
        assert_eq!(s.devices[2].index, 2);
        assert_eq!(s.devices[2].model, "NVIDIA H100 80GB HBM3, 79.6 GiB");
        assert_eq!(s.cuda_ordinals, BTreeMap::from([(2, 1)]));

        let s = parse_with(Some("CUDA: 1, 0"), 0, &fake_gpus).unwrap();
        assert_eq!(s.cuda_ordinals, BTreeMap::from([(0, 1), (1, 0)]));
        let s = parse_with(Some("gpu:all"), 0, &fake_gpus).unwrap();
        assert_eq!(s.devices.len(), 2);
        assert!(s.devices.iter().all(|d| d.kind == "gpu" && !d.emulated));
    }

    #[test]
    fn default_adds_detected_gpus_after_the_cpus() {
        let s = parse_with(None, 0, &fake_gpus).unwrap();
        let cpus = num_cpus::get();
        assert_eq!(s.devices.len(), cpus + 2);
        assert_eq!(s.devices[cpus].kind, "gpu");
        assert_eq!(
            s.cuda_ordinals,
            BTreeMap::from([(cpus as u32, 0), (cpus as u32 + 1, 1)])
        );
        // a driver error leaves the CPU slots
        let broken = || Err(GpuDetectError::Driver("CUDA_ERROR_NO_DEVICE".into()));
        let s = parse_with(None, 0, &broken).unwrap();
        assert_eq!(s.devices.len(), cpus);
        // emulated GPUs alone stay alone
        let s = parse_with(None, 2, &fake_gpus).unwrap();
        assert!(s.devices.iter().all(|d| d.emulated));
        assert!(s.cuda_ordinals.is_empty());
    }

    #[test]
    fn bad_gpu_lists_are_errors_naming_the_flag() {
        for (spec, want) in [
            ("gpu:2", "no GPU 2: this machine has 2 GPU(s): 0,1"),
            ("gpu:x", "not a number"),
            ("gpu:0,0", "listed twice"),
            ("gpu:0+cuda:0", "listed twice"),
            ("gpu:", "not a number"),
        ] {
            let err = parse_with(Some(spec), 0, &fake_gpus)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("--devices"), "{spec}: {err}");
            assert!(err.contains(want), "{spec}: {err}");
        }
        let none = || Ok(Vec::new());
        let err = parse_with(Some("gpu:all"), 0, &none)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no GPU"), "{err}");
        let broken = || Err(GpuDetectError::Driver("CUDA_ERROR_NO_DEVICE".into()));
        let err = parse_with(Some("gpu:0"), 0, &broken)
            .unwrap_err()
            .to_string();
        assert!(err.contains("CUDA_ERROR_NO_DEVICE"), "{err}");
    }
}
