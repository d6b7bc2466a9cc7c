//! Data-parallel scaling of the `neural-ode` job: training samples per second with 1, 2
//! and 4 ranks, and the share of a step spent in collectives.
//!
//! `cargo bench -p trainyard-jobs --bench scaling`. The job trains the `quick` preset's
//! model with a fixed batch per rank (weak scaling, as DDP: the global batch grows with the
//! ranks), its ranks joined by the TCP `Ring` over 127.0.0.1, in two layouts:
//!
//! * `threads`: the ranks are threads of this process, each with its own context;
//! * `processes`: every rank is its own process (this bench re-executed with
//!   `SCALING_CHILD` set), as the worker runs them. The ranks report their listen
//!   addresses on stdout and read everyone's on stdin.
//!
//! Each rank is single-threaded by default (`RAYON_NUM_THREADS=1`, which bounds candle's
//! GEMM, its element-wise thread pool and the im2col loops), so `n` ranks want `n` cores; a
//! reference row trains one rank (a process) with every core, the way a single-rank job
//! runs. The throughput counts training steps only (batch, forward, backward, all-reduce,
//! optimizer), not the final evaluation; it and the communication share are the job's own
//! `samples_per_second` and `comm_share` metrics.
//!
//! candle's CPU backend keeps process-wide thread pools (rayon's, and a pool for large
//! element-wise ops that runs one call at a time), sized once, at their first use, from
//! `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS`. Ranks that are threads of one process share
//! them, so the variable is set before the first tensor operation of this process, and the
//! reference row runs in a process of its own.
//!
//! Settings (environment): `SCALING_RANKS` (default `1,2,4`), `SCALING_MODELS`
//! (`resnet,odenet`), `SCALING_LAYOUTS` (`threads,processes`), `SCALING_BATCH` (`32`, per
//! rank), `SCALING_STEPS` (`20`), `SCALING_THREADS` (`1`, threads per rank), `SCALING_SET`
//! (extra `key=value,...` config overrides, e.g. `width=64`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use trainyard_collective::{Ring, RingConfig};
use trainyard_jobs::neural_ode::bench::{
    data_parallel_throughput, scaling_config, scaling_row, ScalingRow,
};
use trainyard_jobs::neural_ode::NeuralOdeJob;
use trainyard_jobs::testing::MemoryContext;
use trainyard_jobs::Job;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Set in a rank process: `rank,world,model,batch,steps`.
const CHILD_ENV: &str = "SCALING_CHILD";

fn var(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn numbers(key: &str, default: &str) -> anyhow::Result<Vec<usize>> {
    var(key, default)
        .split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| x.trim().parse().map_err(|e| anyhow!("{key}: {x:?}: {e}")))
        .collect()
}

fn overrides() -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for kv in var("SCALING_SET", "").split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("SCALING_SET: {kv:?} is not key=value"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// A rank process: listen, report the address, read everyone's, join the ring, train; rank
/// 0 prints its row as `ROW samples_per_second comm_share steps`.
fn child(spec: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = spec.split(',').collect();
    let [rank, world, model, batch, steps] = parts.as_slice() else {
        bail!("{CHILD_ENV}={spec:?}: expected rank,world,model,batch,steps");
    };
    let (rank, world): (usize, usize) = (rank.parse()?, world.parse()?);
    let (batch, steps): (usize, usize) = (batch.parse()?, steps.parse()?);
    let config = scaling_config(model, world, batch, steps, &overrides()?)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("ADDR {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let addrs = line
        .split_whitespace()
        .map(|a| a.parse::<SocketAddr>())
        .collect::<Result<Vec<_>, _>>()
        .context("addresses on stdin")?;
    let started = Instant::now();
    let ring = Ring::connect(
        &addrs,
        rank,
        listener,
        "scaling-bench",
        RingConfig::default(),
    )?;
    let ctx = MemoryContext::new()
        .with_rank(rank as u32, world as u32)
        .with_communicator(Box::new(ring));
    NeuralOdeJob::new().run(&config, &ctx)?;
    if rank == 0 {
        let row = scaling_row(model, world, batch, &ctx, started.elapsed().as_secs_f64())?;
        println!(
            "ROW {} {} {}",
            row.samples_per_second, row.comm_share, row.steps
        );
    }
    Ok(())
}

/// Runs `ranks` rank processes of this bench, with `threads` threads each, and returns rank
/// 0's row.
fn processes(
    model: &str,
    ranks: usize,
    batch: usize,
    steps: usize,
    threads: usize,
) -> anyhow::Result<ScalingRow> {
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let mut children = Vec::new();
    for rank in 0..ranks {
        let child = Command::new(&exe)
            .env(CHILD_ENV, format!("{rank},{ranks},{model},{batch},{steps}"))
            .env("RAYON_NUM_THREADS", threads.to_string())
            .envs(trainyard_jobs::cpu::pool_env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        children.push(child);
    }
    let mut outputs = Vec::new();
    let mut addrs = Vec::new();
    for child in &mut children {
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let addr = line
            .strip_prefix("ADDR ")
            .ok_or_else(|| anyhow!("a rank said {line:?}, not its address"))?;
        addrs.push(addr.trim().to_string());
        outputs.push(reader);
    }
    let all = addrs.join(" ");
    for child in &mut children {
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        writeln!(stdin, "{all}")?;
    }
    let mut row = None;
    for (rank, (mut child, reader)) in children.into_iter().zip(outputs).enumerate() {
        for line in reader.lines() {
            let line = line?;
            if let Some(rest) = line.strip_prefix("ROW ") {
                let v: Vec<f64> = rest
                    .split_whitespace()
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
                if let [sps, share, steps] = v.as_slice() {
                    row = Some((*sps, *share, *steps as usize));
                }
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("rank {rank} of {ranks} exited with {status}");
        }
    }
    let (samples_per_second, comm_share, steps) =
        row.ok_or_else(|| anyhow!("rank 0 reported no row"))?;
    Ok(ScalingRow {
        model: model.to_string(),
        ranks,
        batch,
        steps,
        samples_per_second,
        comm_share,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

fn main() -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child(&spec);
    }
    let ranks = numbers("SCALING_RANKS", "1,2,4")?;
    let batch = numbers("SCALING_BATCH", "32")?
        .first()
        .copied()
        .unwrap_or(32);
    let steps = numbers("SCALING_STEPS", "20")?
        .first()
        .copied()
        .unwrap_or(20);
    let threads = numbers("SCALING_THREADS", "1")?
        .first()
        .copied()
        .unwrap_or(1);
    let models = var("SCALING_MODELS", "resnet,odenet");
    let layouts = var("SCALING_LAYOUTS", "threads,processes");
    let overrides = overrides()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Before any tensor operation of this process: candle sizes its pools once.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    for (name, value) in trainyard_jobs::cpu::pool_env() {
        std::env::set_var(name, value);
    }
    println!(
        "neural-ode data-parallel scaling: quick preset{}, batch {batch} per rank, {steps} steps, \
         {threads} thread(s) per rank, {cores} CPU(s), ranks joined by the collective Ring (default \
         config) over 127.0.0.1",
        if overrides.is_empty() {
            String::new()
        } else {
            format!(" with {overrides:?}")
        }
    );
    println!(
        "{:<7} {:<9} {:>5} {:>8} {:>12} {:>10} {:>8} {:>9} {:>11} {:>7}",
        "model",
        "layout",
        "ranks",
        "threads",
        "global batch",
        "samples/s",
        "speedup",
        "step ms",
        "comm share",
        "wall s"
    );
    for model in models.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let mut rows: Vec<(&str, usize, ScalingRow)> = Vec::new();
        if threads < cores {
            rows.push(("-", cores, processes(model, 1, batch, steps, cores)?));
        }
        for layout in layouts.split(',').map(str::trim) {
            for &n in &ranks {
                let row = match layout {
                    "threads" => data_parallel_throughput(model, n, batch, steps, &overrides)?,
                    "processes" => processes(model, n, batch, steps, threads)?,
                    other => bail!("SCALING_LAYOUTS: unknown layout {other:?}"),
                };
                rows.push((layout, threads, row));
            }
        }
        let base = rows
            .iter()
            .find(|(_, t, r)| *t == threads && r.ranks == 1)
            .or(rows.first())
            .map_or(1.0, |(_, _, r)| r.samples_per_second);
        for (layout, t, row) in &rows {
            let per_rank = row.samples_per_second / row.ranks as f64;
            println!(
                "{:<7} {:<9} {:>5} {:>8} {:>12} {:>10.1} {:>7.2}x {:>9.1} {:>10.1}% {:>7.1}",
                row.model,
                layout,
                row.ranks,
                t,
                row.batch * row.ranks,
                row.samples_per_second,
                row.samples_per_second / base,
                1000.0 * row.batch as f64 / per_rank,
                100.0 * row.comm_share,
                row.wall_seconds
            );
        }
    }
    println!(
        "speedup: against the first row of one rank of {threads} thread(s); step ms: one rank's \
         step (batch {batch}); comm share: time in collectives / step time, waiting for the \
         slowest rank included"
    );
    Ok(())
}
