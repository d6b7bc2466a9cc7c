//! `trainyard gpu-check`: is this `cuda` build usable on this machine, and how fast?
//!
//! Prints three short tables and ends with one line per failure:
//!
//! 1. the GPUs the CUDA driver reports (name, memory);
//! 2. neural-ode training steps (the `quick` preset's ResNet and ODE-Net) at a few batch
//!    sizes on CUDA and on the CPU, in this one binary: mean step time, speedup, and whether
//!    the loss before the first update agrees across the two devices (same weights, same
//!    batch);
//! 3. a one-rank NCCL all-reduce (sum and mean) and broadcast of 1, 16 and 64 MiB on the GPU:
//!    results checked against the input, algorithm bandwidth in GB/s.
//!
//! Exit code: 0 when every row passed, 1 when one failed, 2 when this binary was built
//! without the `cuda` feature.

use anyhow::Result;

use crate::args::GpuCheckArgs;
use crate::error::bad_input;

/// Exit code of `gpu-check` in a binary without CUDA support.
#[cfg_attr(feature = "cuda", allow(dead_code))]
pub const EXIT_NO_CUDA: i32 = 2;

/// Runs `trainyard gpu-check`.
pub async fn run(args: GpuCheckArgs) -> Result<i32> {
    validate(&args)?;
    tokio::task::spawn_blocking(move || check(&args)).await?
}

fn validate(args: &GpuCheckArgs) -> Result<()> {
    if args.batches.is_empty() || args.batches.contains(&0) {
        return Err(bad_input(
            "--batches: give batch sizes of at least 1, e.g. 32,256",
        ));
    }
    if args.sizes_mib.is_empty() || args.sizes_mib.contains(&0) {
        return Err(bad_input(
            "--sizes-mib: give sizes of at least 1 MiB, e.g. 1,16,64",
        ));
    }
    if args.sizes_mib.iter().any(|m| *m > 4096) {
        return Err(bad_input("--sizes-mib: at most 4096 MiB per buffer"));
    }
    for (flag, n) in [
        ("--steps", args.steps),
        ("--cpu-steps", args.cpu_steps),
        ("--nccl-iters", args.nccl_iters),
    ] {
        if n == 0 {
            return Err(bad_input(format!("{flag}: must be at least 1")));
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn check(_args: &GpuCheckArgs) -> Result<i32> {
    println!(
        "trainyard gpu-check: this binary has no cuda support (it was built without the \
         `cuda` feature; see docs/gpu.md for the cuda build)"
    );
    Ok(EXIT_NO_CUDA)
}

#[cfg(feature = "cuda")]
fn check(args: &GpuCheckArgs) -> Result<i32> {
    cuda::check(args)
}

/// Relative difference allowed between the CUDA and the CPU loss before the first update:
/// the ResNet's only differ by float rounding; the ODE-Net's adaptive solver may take a
/// different step where an error estimate sits at the tolerance, hence a looser bound.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn loss_tolerance(model: &str) -> f64 {
    if model == "odenet" {
        1e-2
    } else {
        1e-3
    }
}

/// True when the first-step losses of the two devices agree within `tolerance` (relative).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn losses_agree(cuda: f64, cpu: f64, tolerance: f64) -> bool {
    cuda.is_finite() && cpu.is_finite() && (cuda - cpu).abs() <= tolerance * cpu.abs().max(1.0)
}

/// Gigabytes (1e9 bytes) per second of moving `bytes` in `seconds`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn gb_per_s(bytes: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / 1e9
    } else {
        f64::INFINITY
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use anyhow::{Context, Result};
    use candle_core::{DType, Device, Tensor};
    use trainyard_collective::nccl::Nccl;
    use trainyard_collective::{Collective, ReduceOp};
    use trainyard_jobs::neural_ode::bench::{time_training_steps, StepTiming};
    use trainyard_jobs::Job;

    use super::{gb_per_s, loss_tolerance, losses_agree};
    use crate::args::GpuCheckArgs;
    use crate::output::new_table;

    fn verdict(
        ok: bool,
        failures: &mut Vec<String>,
        what: impl FnOnce() -> String,
    ) -> &'static str {
        if ok {
            "PASS"
        } else {
            failures.push(what());
            "FAIL"
        }
    }

    pub(super) fn check(args: &GpuCheckArgs) -> Result<i32> {
        let mut failures: Vec<String> = Vec::new();
        let started = Instant::now();

        // 1. GPUs
        println!("GPUs (CUDA driver)");
        let mut t = new_table(["GPU", "Name", "Memory", "Result"]);
        let gpus = match trainyard_worker::devices::detect_gpus() {
            Ok(g) => g,
            Err(e) => {
                println!("FAIL: {e}");
                println!("gpu-check: FAILED (no usable GPU)");
                return Ok(1);
            }
        };
        if gpus.is_empty() {
            println!("FAIL: the CUDA driver reports no GPU");
            println!("gpu-check: FAILED (no usable GPU)");
            return Ok(1);
        }
        for g in &gpus {
            t.add_row(vec![
                g.ordinal.to_string(),
                g.name.clone(),
                format!("{:.1} GiB", g.memory_bytes as f64 / (1u64 << 30) as f64),
                "PASS".to_string(),
            ]);
        }
        println!("{t}");
        let device = match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                println!("FAIL: cannot open CUDA device 0: {e}");
                println!("gpu-check: FAILED (cannot open the GPU)");
                return Ok(1);
            }
        };

        // 2. Training steps, CUDA vs CPU
        if !args.skip_training {
            let config = trainyard_jobs::neural_ode::NeuralOdeJob::new()
                .resolve_config("quick", &BTreeMap::new())
                .context("resolving the neural-ode quick preset")?;
            println!(
                "\nneural-ode training step, quick preset (width {}, solver {}): \
                 CUDA {}+{} steps, CPU {}+{} steps (warm-up+timed), mean time per timed step",
                config.get_usize("width")?,
                config.get_str("solver")?,
                args.warmup,
                args.steps,
                args.cpu_warmup,
                args.cpu_steps
            );
            let mut t = new_table([
                "Model",
                "Batch",
                "CUDA ms/step",
                "CPU ms/step",
                "Speedup",
                "Loss CUDA / CPU",
                "NFE-F",
                "Result",
            ]);
            for model in ["resnet", "odenet"] {
                for &batch in &args.batches {
                    let gpu = time_training_steps(
                        &config,
                        model,
                        batch,
                        args.warmup,
                        args.steps,
                        &device,
                    );
                    let cpu = time_training_steps(
                        &config,
                        model,
                        batch,
                        args.cpu_warmup,
                        args.cpu_steps,
                        &Device::Cpu,
                    );
                    t.add_row(training_row(model, batch, gpu, cpu, &mut failures));
                    // keep the operator informed while the slower rows run
                    eprintln!(
                        "gpu-check: {model} batch {batch} done ({:.0}s)",
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            println!("{t}");
        }

        // 3. NCCL, one rank
        if !args.skip_nccl {
            println!(
                "\nNCCL, 1 rank on cuda:0: all-reduce (sum, mean) and broadcast, {} timed calls \
                 after 2 warm-up calls; GB/s = bytes / time per call (one rank: a device copy)",
                args.nccl_iters
            );
            let mut t = new_table(["Op", "Size", "Max error", "ms/call", "GB/s", "Result"]);
            match Nccl::single(&device) {
                Err(e) => {
                    t.add_row(vec![
                        "init".to_string(),
                        "-".to_string(),
                        e.to_string(),
                        "-".to_string(),
                        "-".to_string(),
                        verdict(false, &mut failures, || format!("NCCL init: {e}")).to_string(),
                    ]);
                }
                Ok(mut comm) => {
                    for &mib in &args.sizes_mib {
                        for op in ["sum", "mean", "broadcast"] {
                            let row = nccl_row(&mut comm, &device, op, mib, args.nccl_iters);
                            t.add_row(match row {
                                Ok((err, secs)) => {
                                    let bytes = mib * (1 << 20);
                                    let ok = err == 0.0;
                                    vec![
                                        op.to_string(),
                                        format!("{mib} MiB"),
                                        format!("{err:e}"),
                                        format!("{:.3}", secs * 1e3),
                                        format!("{:.1}", gb_per_s(bytes, secs)),
                                        verdict(ok, &mut failures, || {
                                            format!("NCCL {op} {mib} MiB: max error {err:e}")
                                        })
                                        .to_string(),
                                    ]
                                }
                                Err(e) => vec![
                                    op.to_string(),
                                    format!("{mib} MiB"),
                                    e.to_string(),
                                    "-".to_string(),
                                    "-".to_string(),
                                    verdict(false, &mut failures, || {
                                        format!("NCCL {op} {mib} MiB: {e}")
                                    })
                                    .to_string(),
                                ],
                            });
                        }
                    }
                    let barrier = comm.barrier();
                    t.add_row(vec![
                        "barrier".to_string(),
                        "-".to_string(),
                        barrier
                            .as_ref()
                            .err()
                            .map(|e| e.to_string())
                            .unwrap_or_else(|| "-".to_string()),
                        "-".to_string(),
                        "-".to_string(),
                        verdict(barrier.is_ok(), &mut failures, || {
                            format!("NCCL barrier: {barrier:?}")
                        })
                        .to_string(),
                    ]);
                }
            }
            println!("{t}");
        }

        println!(
            "\ngpu-check took {:.1}s on {}",
            started.elapsed().as_secs_f64(),
            gpus.iter()
                .map(|g| g.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if failures.is_empty() {
            println!("gpu-check: PASS");
            Ok(0)
        } else {
            for f in &failures {
                println!("FAIL: {f}");
            }
            println!("gpu-check: FAILED ({} failed)", failures.len());
            Ok(1)
        }
    }

    fn training_row(
        model: &str,
        batch: usize,
        gpu: Result<StepTiming, trainyard_jobs::JobError>,
        cpu: Result<StepTiming, trainyard_jobs::JobError>,
        failures: &mut Vec<String>,
    ) -> Vec<String> {
        let name = if model == "odenet" {
            "ODE-Net"
        } else {
            "ResNet"
        };
        let ms = |r: &Result<StepTiming, _>| match r {
            Ok(s) => format!("{:.1}", s.mean_step_s * 1e3),
            Err(_) => "error".to_string(),
        };
        let (speedup, losses, ok, why) = match (&gpu, &cpu) {
            (Ok(g), Ok(c)) => {
                let agree = losses_agree(g.first_loss, c.first_loss, loss_tolerance(model));
                (
                    format!("{:.1}×", c.mean_step_s / g.mean_step_s),
                    format!("{:.5} / {:.5}", g.first_loss, c.first_loss),
                    agree,
                    format!(
                        "{name} batch {batch}: first loss {} on CUDA, {} on CPU",
                        g.first_loss, c.first_loss
                    ),
                )
            }
            (Err(e), _) => (
                "-".into(),
                "-".into(),
                false,
                format!("{name} batch {batch} on CUDA: {e}"),
            ),
            (_, Err(e)) => (
                "-".into(),
                "-".into(),
                false,
                format!("{name} batch {batch} on CPU: {e}"),
            ),
        };
        let nfe = gpu
            .as_ref()
            .ok()
            .and_then(|g| g.nfe_forward)
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into());
        vec![
            name.to_string(),
            batch.to_string(),
            ms(&gpu),
            ms(&cpu),
            speedup,
            losses,
            nfe,
            verdict(ok, failures, || why).to_string(),
        ]
    }

    /// Runs one NCCL check of `mib` MiB: returns the largest absolute error against the
    /// expected values and the mean seconds per call.
    fn nccl_row(
        comm: &mut Nccl,
        device: &Device,
        op: &str,
        mib: usize,
        iters: usize,
    ) -> Result<(f64, f64)> {
        let n = mib * (1 << 20) / std::mem::size_of::<f32>();
        // Exactly representable values (quarters below 2^21 in magnitude), so a one-rank sum,
        // mean or broadcast must return them bit for bit.
        let input = Tensor::arange(0u32, n as u32, device)?
            .to_dtype(DType::F32)?
            .affine(0.25, -(n as f64) * 0.125)?;
        let call = |comm: &mut Nccl| -> Result<Tensor> {
            let mut out = match op {
                "sum" => comm.all_reduce(std::slice::from_ref(&input), ReduceOp::Sum)?,
                "mean" => comm.all_reduce(std::slice::from_ref(&input), ReduceOp::Mean)?,
                _ => comm.broadcast(std::slice::from_ref(&input), 0)?,
            };
            out.pop().context("the collective returned no tensor")
        };
        let out = call(comm)?;
        // One rank: the sum, the mean and the broadcast of one value are that value.
        let err = (&out - &input)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        let _ = call(comm)?;
        device.synchronize()?;
        let start = Instant::now();
        for _ in 0..iters.max(1) {
            let _ = call(comm)?;
        }
        device.synchronize()?;
        let secs = start.elapsed().as_secs_f64() / iters.max(1) as f64;
        Ok((err, secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;

    fn args(extra: &[&str]) -> GpuCheckArgs {
        let mut argv = vec!["trainyard", "gpu-check"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::GpuCheck(a) => a,
            _ => panic!("not gpu-check"),
        }
    }

    #[test]
    fn arguments_are_validated() {
        assert!(validate(&args(&[])).is_ok());
        for bad in [
            &["--batches", "0"][..],
            &["--sizes-mib", "0,1"],
            &["--sizes-mib", "8192"],
            &["--steps", "0"],
            &["--nccl-iters", "0"],
        ] {
            let err = validate(&args(bad)).unwrap_err().to_string();
            assert!(err.starts_with(bad[0]), "{bad:?}: {err}");
        }
    }

    #[test]
    fn loss_agreement_and_bandwidth() {
        let tight = loss_tolerance("resnet");
        assert!(losses_agree(2.3012, 2.3021, tight));
        assert!(!losses_agree(2.30, 2.32, tight));
        assert!(losses_agree(2.30, 2.32, loss_tolerance("odenet")));
        assert!(!losses_agree(2.30, 2.40, loss_tolerance("odenet")));
        assert!(!losses_agree(f64::NAN, 2.3, tight));
        assert!(!losses_agree(2.3, f64::INFINITY, tight));
        assert_eq!(gb_per_s(2_000_000_000, 2.0), 1.0);
        assert!(gb_per_s(1, 0.0).is_infinite());
    }
}
