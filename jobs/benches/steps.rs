//! One training step of every model of the paper jobs, timed on the CPU: the numbers the
//! PyTorch comparison (`bench/steps/run.sh`) divides by PyTorch's.
//!
//! `cargo bench -p trainyard-jobs --bench steps`. Each model is the job's own (its
//! constructors, initialisation, loss and optimizer) at the `quick` preset's sizes and
//! batch; a step is batch, forward, loss, backward, optimizer update and the loss read back.
//! After a warm-up, every sample times `group` consecutive steps (3 for the latent-ODE
//! models, whose observation count cycles 30, 50, 100) and the table gives the median, the
//! minimum and the spread of the per-step times.
//!
//! | model        | job / experiment       | step                                          |
//! |--------------|------------------------|-----------------------------------------------|
//! | `resnet`     | neural-ode `mnist`     | 6 ResBlocks, CE, SGD momentum, batch 32       |
//! | `odenet`     | neural-ode `mnist`     | ODE block, dopri5 tol 0.1 (backprop), batch 32|
//! | `cnf`        | neural-ode `cnf`       | CNF, dopri5 tol 1e-3 on [10, 0], Adam, 256    |
//! | `planar`     | neural-ode `cnf`       | 32 planar layers, Adam, 256                   |
//! | `latent_ode` | neural-ode `latent-ode`| -ELBO, RK4 over 150 points, Adam, 300 spirals |
//! | `rnn`        | neural-ode `latent-ode`| teacher-forced RNN, Adam, 300 spirals         |
//! | `gmdgm`, `m2`| gm-dgm                 | 100 + 100 images, n_y 15, Adam                |
//! | `cnn`, `dbvae`| db-vae                | 64 images (32 positives), Adam                |
//!
//! Threads: candle's GEMM, its element-wise pool and our im2col loops follow
//! `RAYON_NUM_THREADS` (set it; the run script sets it like PyTorch's `set_num_threads`).
//!
//! Settings (environment): `STEPS_MODELS` (comma-separated, default all), `STEPS_WARMUP`
//! (3), `STEPS_ITERS` (samples, 15), `STEPS_BUDGET_S` (stop sampling a model after this
//! many seconds once it has 5 samples; 20), `STEPS_JSON` (a path: also write one JSON line
//! per model there).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use anyhow::{anyhow, Context};
use candle_core::Device;
use trainyard_jobs::db_vae::bench::DbVaeStep;
use trainyard_jobs::db_vae::DbVaeJob;
use trainyard_jobs::gm_dgm::bench::GmDgmStep;
use trainyard_jobs::gm_dgm::GmDgmJob;
use trainyard_jobs::neural_ode::bench::{CnfStep, LatentStep, MnistStep};
use trainyard_jobs::neural_ode::NeuralOdeJob;
use trainyard_jobs::Job;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ALL: [&str; 10] = [
    "resnet",
    "odenet",
    "cnf",
    "planar",
    "latent_ode",
    "rnn",
    "gmdgm",
    "m2",
    "cnn",
    "dbvae",
];

fn var(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn num(key: &str, default: &str) -> anyhow::Result<f64> {
    let v = var(key, default);
    v.trim().parse().map_err(|e| anyhow!("{key}={v:?}: {e}"))
}

/// A model ready to step: batch, steps per sample, the step (returns the loss), and the
/// forward NFE of the last step where there is a solver with a step-size control.
struct Bench {
    batch: usize,
    group: usize,
    step: Box<dyn FnMut() -> anyhow::Result<f64>>,
    nfe: Box<dyn Fn() -> Option<usize>>,
    /// gm-dgm: the pixels kept (`n_x`), which the PyTorch side needs.
    n_x: Option<usize>,
}

fn quick(job: &dyn Job) -> anyhow::Result<trainyard_jobs::config::ResolvedConfig> {
    Ok(job.resolve_config("quick", &BTreeMap::new())?)
}

fn bench(model: &str) -> anyhow::Result<Bench> {
    use std::cell::RefCell;
    use std::rc::Rc;
    let node = quick(&NeuralOdeJob::new())?;
    Ok(match model {
        "resnet" | "odenet" => {
            let batch = node.get_usize("batch_size")?;
            let s = Rc::new(RefCell::new(MnistStep::new(
                &node,
                model,
                batch,
                &Device::Cpu,
            )?));
            let s2 = s.clone();
            Bench {
                batch,
                group: 1,
                step: Box::new(move || Ok(s.borrow_mut().step()?)),
                nfe: Box::new(move || s2.borrow().nfe_forward()),
                n_x: None,
            }
        }
        "cnf" | "planar" => {
            let s = Rc::new(RefCell::new(CnfStep::new(&node, model)?));
            let (s2, batch) = (s.clone(), s.borrow().batch());
            Bench {
                batch,
                group: 1,
                step: Box::new(move || Ok(s.borrow_mut().step()?)),
                nfe: Box::new(move || s2.borrow().nfe_forward()),
                n_x: None,
            }
        }
        "latent_ode" | "rnn" => {
            let mut s = LatentStep::new(&node, model)?;
            Bench {
                batch: s.batch(),
                group: 3,
                step: Box::new(move || Ok(s.step()?)),
                nfe: Box::new(|| None),
                n_x: None,
            }
        }
        "gmdgm" | "m2" => {
            let mut s = GmDgmStep::new(&quick(&GmDgmJob::new())?, model)?;
            let n_x = Some(s.dims().x);
            Bench {
                batch: s.batch(),
                group: 1,
                step: Box::new(move || Ok(s.step()?)),
                nfe: Box::new(|| None),
                n_x,
            }
        }
        "cnn" | "dbvae" => {
            let mut s = DbVaeStep::new(&quick(&DbVaeJob::new())?, model)?;
            Bench {
                batch: s.batch(),
                group: 1,
                step: Box::new(move || Ok(s.step()?)),
                nfe: Box::new(|| None),
                n_x: None,
            }
        }
        other => return Err(anyhow!("unknown model {other}; known: {}", ALL.join(","))),
    })
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing to parse.
    // The pools as a rank process gets them (before candle starts any).
    for (name, value) in trainyard_jobs::cpu::pool_env() {
        std::env::set_var(name, value);
    }
    let threads = var("RAYON_NUM_THREADS", "");
    let threads: usize = match threads.parse() {
        Ok(n) if n > 0 => n,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let models: Vec<String> = var("STEPS_MODELS", &ALL.join(","))
        .split(',')
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    let warmup = num("STEPS_WARMUP", "3")? as usize;
    let iters = (num("STEPS_ITERS", "15")? as usize).max(1);
    let budget = num("STEPS_BUDGET_S", "20")?;
    let mut json = match std::env::var("STEPS_JSON") {
        Ok(p) if !p.is_empty() => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("STEPS_JSON={p}"))?,
        ),
        _ => None,
    };
    println!(
        "{:<11} {:>6} {:>7} {:>10} {:>10} {:>10} {:>8} {:>5}",
        "model", "batch", "threads", "median ms", "min ms", "max ms", "samples", "NFE"
    );
    for model in &models {
        let mut b = bench(model)?;
        for i in 0..warmup * b.group {
            let loss = (b.step)()?;
            if !loss.is_finite() {
                return Err(anyhow!("{model}: loss {loss} at warm-up step {i}"));
            }
        }
        let mut ms = Vec::new();
        let mut nfe = Vec::new();
        let started = Instant::now();
        while ms.len() < iters && (ms.len() < 5 || started.elapsed().as_secs_f64() < budget) {
            let t = Instant::now();
            for _ in 0..b.group {
                let loss = (b.step)()?;
                if !loss.is_finite() {
                    return Err(anyhow!("{model}: loss {loss}"));
                }
                nfe.extend((b.nfe)());
            }
            ms.push(t.elapsed().as_secs_f64() * 1e3 / b.group as f64);
        }
        let mut sorted = ms.clone();
        sorted.sort_by(f64::total_cmp);
        let median = if sorted.len() % 2 == 1 {
            sorted[sorted.len() / 2]
        } else {
            0.5 * (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2])
        };
        let mean_nfe =
            (!nfe.is_empty()).then(|| nfe.iter().sum::<usize>() as f64 / nfe.len() as f64);
        println!(
            "{:<11} {:>6} {:>7} {:>10.2} {:>10.2} {:>10.2} {:>8} {:>5}",
            model,
            b.batch,
            threads,
            median,
            sorted[0],
            sorted[sorted.len() - 1],
            sorted.len(),
            mean_nfe.map_or("-".to_string(), |n| format!("{n:.1}"))
        );
        if let Some(f) = json.as_mut() {
            let line = serde_json::json!({
                "impl": "candle",
                "model": model,
                "batch": b.batch,
                "threads": threads,
                "median_ms": median,
                "min_ms": sorted[0],
                "samples": sorted.len(),
                "nfe": mean_nfe,
                "n_x": b.n_x,
            });
            writeln!(f, "{line}")?;
        }
    }
    Ok(())
}
