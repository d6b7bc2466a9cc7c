//! `experiment=mnist`: trains the ResNet and/or the ODE-Net on MNIST-10k, with
//! checkpoints every `checkpoint_every` steps and at each model boundary, and exact
//! resume (the batch order and augmentation are derived from `(seed, epoch, step)`).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder, VarMap};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::models::{OdeNet, ResNet};
use super::schema::milestones;
use crate::config::ResolvedConfig;
use crate::data::{
    batches, derived_rng, epoch_order, make_batch, mnist_10k, mnist_from_dir, ImageDataset,
};
use crate::job::{device_name, Checkpoint, JobContext, JobError, ResultsTable};
use crate::ode::{Dopri5Options, SolveStats, Solver};
use crate::train::{
    count_params, evaluate, init_pytorch_style, named_vars, Optimizer, PiecewiseLr,
};

const STATE_VERSION: u32 = 1;
/// Random-crop padding (torchvision `RandomCrop(28, padding=4)`).
const CROP_PAD: usize = 4;

/// Settings read from the resolved config.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) dataset: String,
    pub(super) models: Vec<String>,
    pub(super) solver: Solver,
    pub(super) solver_name: String,
    pub(super) width: usize,
    pub(super) groups: usize,
    pub(super) epochs: u64,
    pub(super) batch_size: usize,
    pub(super) lr: f64,
    pub(super) milestones: Vec<f64>,
    pub(super) lr_decay: f64,
    pub(super) optimizer: String,
    pub(super) momentum: f64,
    pub(super) weight_decay: f64,
    pub(super) augment: bool,
    pub(super) train_samples: usize,
    pub(super) test_samples: usize,
    pub(super) eval_batch_size: usize,
    pub(super) eval_each_epoch: bool,
    pub(super) seed: u64,
    pub(super) checkpoint_every: u64,
    pub(super) log_every: u64,
}

impl Settings {
    pub(super) fn from_config(c: &ResolvedConfig) -> Result<Self, JobError> {
        let models = match c.get_str("models")? {
            "both" => vec!["resnet".to_string(), "odenet".to_string()],
            one => vec![one.to_string()],
        };
        let solver_name = c.get_str("solver")?.to_string();
        let solver = match solver_name.as_str() {
            "rk4" => Solver::Rk4 {
                steps: c.get_usize("rk4_steps")?,
            },
            _ => Solver::Dopri5(Dopri5Options::new(c.get_f64("rtol")?, c.get_f64("atol")?)),
        };
        Ok(Self {
            dataset: c.get_str("dataset")?.to_string(),
            models,
            solver,
            solver_name,
            width: c.get_usize("width")?,
            groups: c.get_usize("groups")?,
            epochs: c.get_u64("epochs")?,
            batch_size: c.get_usize("batch_size")?,
            lr: c.get_f64("lr")?,
            milestones: milestones(c)?,
            lr_decay: c.get_f64("lr_decay")?,
            optimizer: c.get_str("optimizer")?.to_string(),
            momentum: c.get_f64("momentum")?,
            weight_decay: c.get_f64("weight_decay")?,
            augment: c.get_bool("augment")?,
            train_samples: c.get_usize("train_samples")?,
            test_samples: c.get_usize("test_samples")?,
            eval_batch_size: c.get_usize("eval_batch_size")?,
            eval_each_epoch: c.get_bool("eval_each_epoch")?,
            seed: c.get_u64("seed")?,
            checkpoint_every: c.get_u64("checkpoint_every")?,
            log_every: c.get_u64("log_every")?,
        })
    }
}

/// Final numbers of one trained model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelResult {
    /// `resnet` or `odenet`.
    pub model: String,
    /// Test accuracy in `[0, 1]`.
    pub test_acc: f64,
    /// Mean test cross-entropy.
    pub test_loss: f64,
    /// Trainable parameters.
    pub params: usize,
    /// Mean forward NFE per test batch (ODE-Net only).
    pub nfe_forward: Option<f64>,
    /// Mean backward NFE per test batch: evaluations a backward pass would traverse.
    pub nfe_backward: Option<f64>,
    /// Mean forward NFE per training batch over the last epoch (ODE-Net only).
    pub train_nfe_forward: Option<f64>,
    /// Training wall time in seconds (summed over resumed attempts).
    pub train_seconds: f64,
}

/// The job's resumable state, stored as the checkpoint's JSON state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct State {
    version: u32,
    /// Index into the model list of the model being trained (or next to train).
    phase: usize,
    /// Name of that model.
    model: String,
    /// True when the checkpoint holds the weights of a model still training.
    in_progress: bool,
    /// Epoch of the next step.
    epoch: u64,
    /// Step within `epoch` of the next step.
    step_in_epoch: u64,
    /// Steps done so far over all models.
    global_step: u64,
    /// Seed of init, shuffling and augmentation.
    seed: u64,
    /// Training seconds spent on the current model so far.
    phase_seconds: f64,
    /// Results of finished models.
    results: Vec<ModelResult>,
}

pub(super) enum Model {
    Res(Box<ResNet>),
    Ode(Box<OdeNet>),
}

impl Model {
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Model::Res(m) => m.forward(x),
            Model::Ode(m) => m.forward(x),
        }
    }

    pub(super) fn stats(&self) -> Option<SolveStats> {
        match self {
            Model::Res(_) => None,
            Model::Ode(m) => Some(m.last_stats()),
        }
    }
}

pub(super) fn build_model(
    name: &str,
    s: &Settings,
    device: &Device,
) -> Result<(Model, VarMap), JobError> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = match name {
        "resnet" => Model::Res(Box::new(ResNet::new(s.width, s.groups, vb)?)),
        "odenet" => Model::Ode(Box::new(OdeNet::new(s.width, s.groups, s.solver, vb)?)),
        other => return Err(JobError::Other(format!("unknown model {other}"))),
    };
    Ok((model, varmap))
}

fn ckpt_err(e: impl std::fmt::Display) -> JobError {
    JobError::Checkpoint(e.to_string())
}

/// Runs the MNIST experiment.
pub fn run(config: &ResolvedConfig, ctx: &dyn JobContext) -> Result<(), JobError> {
    let s = Settings::from_config(config)?;
    let device = ctx.device()?;
    let (train_all, test_all) = if s.dataset == super::schema::BUILTIN_MNIST {
        mnist_10k()
    } else {
        let dir = ctx.dataset(&s.dataset)?;
        ctx.log(&format!("data set {} in {}", s.dataset, dir.display()));
        mnist_from_dir(&dir, 10)
    }
    .map_err(|e| JobError::Data(format!("{}: {e}", s.dataset)))?;
    let train = train_all.take(s.train_samples);
    let test = test_all.take(s.test_samples);
    ctx.log(&format!(
        "neural-ode mnist: preset {}, models {}, width {}, {} epochs, batch {}, solver {} ({:?}), \
         {} train / {} test images, on {}",
        config.preset(),
        s.models.join("+"),
        s.width,
        s.epochs,
        s.batch_size,
        s.solver_name,
        s.solver,
        train.len(),
        test.len(),
        device_name(&device)
    ));

    let mut state = State {
        version: STATE_VERSION,
        phase: 0,
        model: s.models[0].clone(),
        in_progress: false,
        epoch: 0,
        step_in_epoch: 0,
        global_step: 0,
        seed: s.seed,
        phase_seconds: 0.0,
        results: Vec::new(),
    };
    let mut restored: Option<BTreeMap<String, Tensor>> = None;
    if let Some(cp) = ctx.restore_checkpoint(&device)? {
        let st: State = serde_json::from_value(cp.state.clone()).map_err(ckpt_err)?;
        if st.version != STATE_VERSION {
            return Err(ckpt_err(format!(
                "unsupported state version {}",
                st.version
            )));
        }
        if st.phase > s.models.len()
            || (st.phase < s.models.len() && s.models[st.phase] != st.model)
        {
            return Err(ckpt_err(format!(
                "checkpoint is for model {} (phase {}) but this config trains {}",
                st.model,
                st.phase,
                s.models.join("+")
            )));
        }
        let msg = format!("resumed from checkpoint at step {}", cp.step);
        tracing::info!("{msg}");
        ctx.log(&msg);
        ctx.metrics(cp.step, &[("resumed_from_step", cp.step as f64)]);
        if st.in_progress {
            restored = Some(cp.tensors);
        }
        state = st;
    }

    while state.phase < s.models.len() {
        let result = train_model(&s, &train, &test, &device, &mut state, restored.take(), ctx)?;
        state.results.push(result);
        state.phase += 1;
        state.in_progress = false;
        state.epoch = 0;
        state.step_in_epoch = 0;
        state.phase_seconds = 0.0;
        if let Some(next) = s.models.get(state.phase) {
            state.model = next.clone();
        }
        // Boundary checkpoint: the finished model's results are in the state.
        save(ctx, &state, BTreeMap::new(), &[])?;
    }

    let table = results_table(&s, &state.results);
    for note in &table.notes {
        ctx.log(note);
    }
    ctx.results(&table);
    Ok(())
}

fn save(
    ctx: &dyn JobContext,
    state: &State,
    tensors: BTreeMap<String, Tensor>,
    metrics: &[(&str, f64)],
) -> Result<(), JobError> {
    let cp = Checkpoint {
        step: state.global_step,
        tensors,
        state: serde_json::to_value(state).map_err(ckpt_err)?,
        metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    };
    ctx.save_checkpoint(&cp)?;
    tracing::debug!(step = state.global_step, "checkpoint saved");
    Ok(())
}

fn model_tensors(
    vars: &[(String, candle_core::Var)],
    opt: &Optimizer,
) -> Result<BTreeMap<String, Tensor>, JobError> {
    let mut out: BTreeMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (format!("model.{n}"), v.as_tensor().clone()))
        .collect();
    for (n, t) in opt.state_tensors()? {
        out.insert(format!("optimizer.{n}"), t);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn train_model(
    s: &Settings,
    train: &ImageDataset,
    test: &ImageDataset,
    device: &Device,
    state: &mut State,
    restored: Option<BTreeMap<String, Tensor>>,
    ctx: &dyn JobContext,
) -> Result<ModelResult, JobError> {
    let name = state.model.clone();
    let (model, varmap) = build_model(&name, s, device)?;
    let phase_seed = s.seed.wrapping_add(state.phase as u64);
    init_pytorch_style(&varmap, derived_rng(phase_seed, 3, 0, 0).next_u64())?;
    let vars = named_vars(&varmap);
    let params = count_params(&varmap);
    let mut opt = Optimizer::by_name(&s.optimizer, vars.clone(), s.lr, s.momentum, s.weight_decay)?;
    if let Some(tensors) = restored {
        for (n, v) in &vars {
            let t = tensors
                .get(&format!("model.{n}"))
                .ok_or_else(|| ckpt_err(format!("checkpoint lacks tensor model.{n}")))?;
            if t.dims() != v.dims() {
                return Err(ckpt_err(format!(
                    "tensor model.{n} has shape {:?}, the model needs {:?}",
                    t.dims(),
                    v.dims()
                )));
            }
            v.set(&t.to_dtype(v.dtype())?)?;
        }
        let opt_state: BTreeMap<String, Tensor> = tensors
            .iter()
            .filter_map(|(k, t)| {
                k.strip_prefix("optimizer.")
                    .map(|n| (n.to_string(), t.clone()))
            })
            .collect();
        opt.load_state(&opt_state).map_err(ckpt_err)?;
    }
    if !state.in_progress {
        ctx.log(&format!("training {name}: {params} parameters"));
    }
    state.in_progress = true;
    ctx.metrics(
        state.global_step,
        &[(&format!("{name}/params"), params as f64)],
    );

    let order0 = epoch_order(train.len(), phase_seed, 0);
    let steps_per_epoch = batches(&order0, s.batch_size, true).len() as u64;
    let total_steps = steps_per_epoch * s.epochs;
    let schedule = PiecewiseLr::from_fractions(s.lr, &s.milestones, total_steps, s.lr_decay);
    let started = Instant::now();
    let base_seconds = state.phase_seconds;
    let mut last_saved = state.global_step;
    let mut train_nfe: Vec<usize> = Vec::new();
    let stage = format!("train {name}");

    while state.epoch < s.epochs {
        let order = epoch_order(train.len(), phase_seed, state.epoch);
        let epoch_batches = batches(&order, s.batch_size, true);
        // keep only the current (in the end: the last) epoch's training NFE
        train_nfe.clear();
        let mut loss_sum = 0.0;
        let mut loss_n = 0usize;
        while state.step_in_epoch < steps_per_epoch {
            state.phase_seconds = base_seconds + started.elapsed().as_secs_f64();
            if ctx.should_stop() {
                if state.global_step > last_saved {
                    save(ctx, state, model_tensors(&vars, &opt)?, &[])?;
                }
                ctx.log(&format!(
                    "stopping at step {} on request",
                    state.global_step
                ));
                return Err(JobError::Stopped);
            }
            let phase_step = state.epoch * steps_per_epoch + state.step_in_epoch;
            let lr = schedule.lr_at(phase_step);
            opt.set_lr(lr);
            let idx = &epoch_batches[state.step_in_epoch as usize];
            let mut rng = derived_rng(phase_seed, 2, state.epoch, state.step_in_epoch);
            let augment = s.augment.then_some((CROP_PAD, &mut rng));
            let (x, y) = make_batch(train, idx, augment, device)?;
            let logits = model.forward(&x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let loss_v = loss.to_scalar::<f32>()? as f64;
            if !loss_v.is_finite() {
                return Err(JobError::Other(format!(
                    "{name}: training loss is {loss_v} at step {} (lr {lr}); try a lower lr",
                    state.global_step
                )));
            }
            let grads = loss.backward()?;
            opt.step(&grads)?;
            loss_sum += loss_v;
            loss_n += 1;

            state.step_in_epoch += 1;
            state.global_step += 1;
            let mut m: Vec<(String, f64)> = vec![
                (format!("{name}/train_loss"), loss_v),
                (format!("{name}/lr"), lr),
            ];
            let stats = model.stats();
            if let Some(st) = stats {
                train_nfe.push(st.nfe_forward);
                m.push((format!("{name}/nfe_forward"), st.nfe_forward as f64));
                m.push((format!("{name}/nfe_backward"), st.nfe_backward as f64));
            }
            let m_ref: Vec<(&str, f64)> = m.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            ctx.metrics(state.global_step, &m_ref);
            ctx.progress(&stage, phase_step + 1, total_steps);
            if state.global_step.is_multiple_of(s.log_every)
                || state.step_in_epoch == steps_per_epoch
            {
                let nfe = stats
                    .map(|st| format!(" nfe {}/{}", st.nfe_forward, st.nfe_backward))
                    .unwrap_or_default();
                let line = format!(
                    "{name} epoch {}/{} step {}/{} loss {:.4} lr {:.4}{nfe} ({:.1}s)",
                    state.epoch + 1,
                    s.epochs,
                    state.step_in_epoch,
                    steps_per_epoch,
                    loss_v,
                    lr,
                    base_seconds + started.elapsed().as_secs_f64()
                );
                tracing::info!("{line}");
                ctx.log(&line);
            }
            if state.step_in_epoch == steps_per_epoch {
                state.epoch += 1;
                state.step_in_epoch = 0;
                let mean = loss_sum / loss_n.max(1) as f64;
                ctx.metrics(
                    state.global_step,
                    &[(&format!("{name}/epoch_train_loss"), mean)],
                );
                if s.eval_each_epoch && state.epoch < s.epochs {
                    let r = evaluate(
                        test,
                        s.eval_batch_size,
                        device,
                        |x| model.forward(x),
                        |_, _| {},
                    )?;
                    ctx.metrics(
                        state.global_step,
                        &[(&format!("{name}/test_acc"), r.accuracy)],
                    );
                    ctx.log(&format!(
                        "{name} epoch {} test accuracy {:.2}%",
                        state.epoch,
                        100.0 * r.accuracy
                    ));
                }
            }
            state.phase_seconds = base_seconds + started.elapsed().as_secs_f64();
            if s.checkpoint_every > 0 && state.global_step.is_multiple_of(s.checkpoint_every) {
                save(
                    ctx,
                    state,
                    model_tensors(&vars, &opt)?,
                    &[(&format!("{name}/train_loss"), loss_v)],
                )?;
                last_saved = state.global_step;
            }
            if state.step_in_epoch == 0 {
                break; // epoch finished
            }
        }
    }
    let train_seconds = base_seconds + started.elapsed().as_secs_f64();

    // Final evaluation, with NFE per test batch.
    let eval_stage = format!("evaluate {name}");
    let mut nfe_f = Vec::new();
    let mut nfe_b = Vec::new();
    let r = evaluate(
        test,
        s.eval_batch_size,
        device,
        |x| {
            let out = model.forward(x)?;
            if let Some(st) = model.stats() {
                nfe_f.push(st.nfe_forward as f64);
                nfe_b.push(st.nfe_backward as f64);
            }
            Ok(out)
        },
        |done, total| ctx.progress(&eval_stage, done as u64, total as u64),
    )?;
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let result = ModelResult {
        model: name.clone(),
        test_acc: r.accuracy,
        test_loss: r.loss,
        params,
        nfe_forward: mean(&nfe_f),
        nfe_backward: mean(&nfe_b),
        train_nfe_forward: mean(&train_nfe.iter().map(|n| *n as f64).collect::<Vec<_>>()),
        train_seconds,
    };
    let mut m = vec![
        (format!("{name}/test_acc"), r.accuracy),
        (format!("{name}/test_loss"), r.loss),
        (format!("{name}/train_seconds"), train_seconds),
    ];
    if let (Some(f), Some(b)) = (result.nfe_forward, result.nfe_backward) {
        m.push((format!("{name}/test_nfe_forward"), f));
        m.push((format!("{name}/test_nfe_backward"), b));
    }
    let m_ref: Vec<(&str, f64)> = m.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    ctx.metrics(state.global_step, &m_ref);
    ctx.log(&format!(
        "{name} done: test accuracy {:.2}%, {} parameters, {:.1}s training{}",
        100.0 * r.accuracy,
        params,
        train_seconds,
        result
            .nfe_forward
            .map(|f| format!(", NFE-F {f:.1} per test batch"))
            .unwrap_or_default()
    ));
    Ok(result)
}

fn display_name(model: &str) -> &str {
    match model {
        "resnet" => "ResNet",
        "odenet" => "ODE-Net",
        other => other,
    }
}

fn results_table(s: &Settings, results: &[ModelResult]) -> ResultsTable {
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let rows = results
        .iter()
        .map(|r| {
            vec![
                display_name(&r.model).to_string(),
                format!("{:.2}%", 100.0 * r.test_acc),
                format!("{:.2}%", 100.0 * (1.0 - r.test_acc)),
                r.params.to_string(),
                opt(r.nfe_forward),
                opt(r.nfe_backward),
                format!("{:.1}", r.train_seconds),
            ]
        })
        .collect();
    let mut notes = vec![format!(
        "width {}, {} epochs, batch {}, solver {}; NFE per test batch of {} (NFE-B: f evaluations \
         a backward pass through the solver traverses)",
        s.width, s.epochs, s.batch_size, s.solver_name, s.eval_batch_size
    )];
    let find = |m: &str| results.iter().find(|r| r.model == m);
    match (find("resnet"), find("odenet")) {
        (Some(res), Some(ode)) => {
            let ratio = ode.params as f64 / res.params as f64;
            let gap = 100.0 * (res.test_acc - ode.test_acc);
            notes.push(format!(
                "parameter ratio ODE-Net/ResNet: {ratio:.3} ({} vs {})",
                ode.params, res.params
            ));
            let held = gap <= 0.7 && ratio < 0.45;
            notes.push(format!(
                "paper's claim (ODE-Net within 0.7 points of ResNet with about a third of the \
                 parameters): {} (ResNet - ODE-Net = {gap:+.2} points, ratio {ratio:.2})",
                if held { "HELD" } else { "NOT HELD" }
            ));
        }
        _ => notes
            .push("only one model trained; the paper's comparison needs models=both".to_string()),
    }
    ResultsTable {
        title: "Neural ODE: MNIST-10k, ODE-Net vs ResNet".to_string(),
        columns: [
            "Model",
            "Test acc",
            "Test error",
            "Params",
            "NFE-F",
            "NFE-B",
            "Train s",
        ]
        .iter()
        .map(|c| c.to_string())
        .collect(),
        rows,
        notes,
    }
}
