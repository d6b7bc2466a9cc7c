//! The training-loop bookkeeping the paper jobs share.
//!
//! A job trains its models one after the other, each a *phase* of `epochs` epochs;
//! [`PhaseState`] is where it is (phase, epoch, step, results so far), written into every
//! checkpoint and read back on resume. [`Phase`] does what happens around each step of a
//! phase: the stop check every rank takes together (with a checkpoint first), the metric,
//! progress and log reports, the epoch's mean loss, and the checkpoints every
//! `checkpoint_every` steps. The job keeps its loop explicit and computes the step itself:
//!
//! ```text
//! let mut phase = Phase::new(ctx, dp, &name, cadence, state);
//! while state.epoch < cadence.epochs {
//!     // ... the epoch's batches
//!     while state.step_in_epoch < cadence.steps_per_epoch {
//!         phase.begin_step(state, dp, || checkpoint_tensors(...))?;
//!         // ... forward, backward, all-reduce, averaged metrics, optimizer step
//!         let epoch_done = phase.end_step(state, dp, loss, &metrics, || detail);
//!         phase.checkpoint_if_due(state, loss, || checkpoint_tensors(...))?;
//!         if epoch_done { break; }
//!     }
//! }
//! ```

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::job::{JobContext, JobError};
use crate::train::{load_state, save_state, DataParallel};

/// Version of [`PhaseState`] as stored in checkpoints.
pub const STATE_VERSION: u32 = 1;

/// Checkpoint tensors by name.
pub type Tensors = BTreeMap<String, Tensor>;

fn one_rank() -> u32 {
    1
}

/// The resumable position of a job that trains its models in phases, stored as the
/// checkpoint's JSON state. `R` is the job's result of one finished phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseState<R> {
    /// Always [`STATE_VERSION`].
    pub version: u32,
    /// Index into the model list of the model being trained (or next to train).
    pub phase: usize,
    /// Name of that model.
    pub model: String,
    /// True when the checkpoint holds the weights of a model still training.
    pub in_progress: bool,
    /// Epoch of the next step.
    pub epoch: u64,
    /// Step within `epoch` of the next step.
    pub step_in_epoch: u64,
    /// Steps done so far over all models.
    pub global_step: u64,
    /// Seed of everything random.
    pub seed: u64,
    /// Training seconds spent on the current model so far.
    pub phase_seconds: f64,
    /// Results of finished models.
    pub results: Vec<R>,
    /// Ranks that trained (the epoch and step above count steps of their global batch).
    #[serde(default = "one_rank")]
    pub world_size: u32,
}

impl<R: Serialize + DeserializeOwned> PhaseState<R> {
    /// The state to start from: the checkpoint's, if this attempt resumes one (with its
    /// tensors when it holds a model still training), else the first step of `models[0]`.
    /// A checkpoint of another model list is a [`JobError::Checkpoint`]. Rank 0 reports the
    /// resume.
    pub fn start_or_resume<S: AsRef<str>>(
        ctx: &dyn JobContext,
        device: &Device,
        primary: bool,
        models: &[S],
        seed: u64,
        world: usize,
    ) -> Result<(Self, Option<Tensors>), JobError> {
        let names: Vec<&str> = models.iter().map(AsRef::as_ref).collect();
        let Some(cp) = ctx.restore_checkpoint(device)? else {
            let state = Self {
                version: STATE_VERSION,
                phase: 0,
                model: names.first().copied().unwrap_or_default().to_string(),
                in_progress: false,
                epoch: 0,
                step_in_epoch: 0,
                global_step: 0,
                seed,
                phase_seconds: 0.0,
                results: Vec::new(),
                world_size: world as u32,
            };
            return Ok((state, None));
        };
        let state: Self = load_state(&cp, STATE_VERSION)?;
        if state.phase > names.len()
            || (state.phase < names.len() && names[state.phase] != state.model)
        {
            return Err(JobError::Checkpoint(format!(
                "checkpoint is for model {} (phase {}) but this config trains {}",
                state.model,
                state.phase,
                names.join("+")
            )));
        }
        if primary {
            let msg = format!("resumed from checkpoint at step {}", cp.step);
            tracing::info!("{msg}");
            ctx.log(&msg);
            ctx.metrics(cp.step, &[("resumed_from_step", cp.step as f64)]);
        }
        let tensors = state.in_progress.then_some(cp.tensors);
        Ok((state, tensors))
    }

    /// Marks the current phase as training and reports its model's size: rank 0
    /// (`primary`) logs `training <model>: <params> parameters` when the phase starts
    /// afresh, and reports metric `<model>/params`.
    pub fn begin_phase(&mut self, ctx: &dyn JobContext, primary: bool, params: usize) {
        let name = &self.model;
        if !self.in_progress && primary {
            ctx.log(&format!("training {name}: {params} parameters"));
        }
        self.in_progress = true;
        if primary {
            ctx.metrics(
                self.global_step,
                &[(&format!("{name}/params"), params as f64)],
            );
        }
    }

    /// Records the finished phase's `result` and moves to the first step of the next model
    /// of `models`.
    pub fn finish_phase<S: AsRef<str>>(&mut self, result: R, models: &[S]) {
        self.results.push(result);
        self.phase += 1;
        self.in_progress = false;
        self.epoch = 0;
        self.step_in_epoch = 0;
        self.phase_seconds = 0.0;
        if let Some(next) = models.get(self.phase) {
            self.model = next.as_ref().to_string();
        }
    }

    /// Saves a checkpoint of this state at its global step, with `tensors` and `metrics`.
    pub fn save(
        &self,
        ctx: &dyn JobContext,
        tensors: Tensors,
        metrics: &[(&str, f64)],
    ) -> Result<(), JobError> {
        save_state(ctx, self.global_step, self, tensors, metrics)
    }

    /// Adapts a checkpoint written by another number of ranks to `world` ranks and
    /// `steps_per_epoch` steps: its epoch is kept, and its step where the epoch still has it
    /// (the samples of the rest of the epoch are drawn anew).
    pub fn adopt_world_size(
        &mut self,
        world: usize,
        steps_per_epoch: u64,
        ctx: &dyn JobContext,
        primary: bool,
    ) {
        if self.world_size == world as u32 {
            return;
        }
        if primary {
            ctx.log(&format!(
                "the checkpoint was written by {} rank(s), this attempt runs {world}: resuming \
                 at epoch {} step {} of {steps_per_epoch}",
                self.world_size,
                self.epoch + 1,
                self.step_in_epoch.min(steps_per_epoch)
            ));
        }
        if self.step_in_epoch >= steps_per_epoch {
            self.epoch += 1;
            self.step_in_epoch = 0;
        }
        self.world_size = world as u32;
    }
}

/// How long a phase trains, and how often it logs and saves checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    /// Epochs of the phase.
    pub epochs: u64,
    /// Steps of each epoch (of every rank).
    pub steps_per_epoch: u64,
    /// A checkpoint every this many global steps (0: none within the phase).
    pub checkpoint_every: u64,
    /// A log line every this many global steps, and at the end of each epoch.
    pub log_every: u64,
}

impl Cadence {
    /// Steps of the whole phase.
    pub fn total_steps(&self) -> u64 {
        self.steps_per_epoch * self.epochs
    }
}

/// The step boundaries of one phase of training: see the module docs.
pub struct Phase<'a> {
    ctx: &'a dyn JobContext,
    primary: bool,
    name: String,
    stage: String,
    cadence: Cadence,
    started: Instant,
    base_seconds: f64,
    last_saved: u64,
    loss_sum: f64,
    loss_n: usize,
}

impl<'a> Phase<'a> {
    /// Starts timing the phase of model `name` at `state` (its seconds so far count).
    pub fn new<R>(
        ctx: &'a dyn JobContext,
        dp: &DataParallel,
        name: &str,
        cadence: Cadence,
        state: &PhaseState<R>,
    ) -> Self {
        Self {
            ctx,
            primary: dp.is_primary(),
            name: name.to_string(),
            stage: format!("train {name}"),
            cadence,
            started: Instant::now(),
            base_seconds: state.phase_seconds,
            last_saved: state.global_step,
            loss_sum: 0.0,
            loss_n: 0,
        }
    }

    /// Training seconds of the phase, over all attempts.
    pub fn seconds(&self) -> f64 {
        self.base_seconds + self.started.elapsed().as_secs_f64()
    }

    /// Starts a step: counts the phase's seconds, starts the step's timing, and stops every
    /// rank at this step once any of them was asked to ([`JobError::Stopped`]), rank 0
    /// saving `tensors()` first if steps were taken since the last checkpoint.
    pub fn begin_step<R: Serialize + DeserializeOwned>(
        &mut self,
        state: &mut PhaseState<R>,
        dp: &mut DataParallel,
        tensors: impl FnOnce() -> Result<Tensors, JobError>,
    ) -> Result<(), JobError> {
        state.phase_seconds = self.seconds();
        dp.begin_step();
        let unsaved = state.global_step > self.last_saved;
        stop_if_asked(self.ctx, dp, state.global_step, unsaved, || {
            state.save(self.ctx, tensors()?, &[])
        })
    }

    /// Ends a step (call it after the optimizer step) whose loss, averaged over the ranks,
    /// is `loss`: advances `state`, reports `metrics` and progress, logs
    /// `<name> epoch e/E step s/S <detail()> (<seconds>s)` every `log_every` steps and at
    /// the end of an epoch, and at the end of an epoch moves to the next one and reports
    /// its mean loss (`<name>/epoch_train_loss`). Returns true at the end of an epoch.
    pub fn end_step<R>(
        &mut self,
        state: &mut PhaseState<R>,
        dp: &mut DataParallel,
        loss: f64,
        metrics: &[(String, f64)],
        detail: impl FnOnce() -> String,
    ) -> bool {
        dp.end_step();
        self.loss_sum += loss;
        self.loss_n += 1;
        state.step_in_epoch += 1;
        state.global_step += 1;
        let c = self.cadence;
        let epoch_done = state.step_in_epoch == c.steps_per_epoch;
        if self.primary {
            report(self.ctx, state.global_step, metrics);
            let phase_step = state.epoch * c.steps_per_epoch + state.step_in_epoch;
            self.ctx.progress(&self.stage, phase_step, c.total_steps());
            if state.global_step.is_multiple_of(c.log_every) || epoch_done {
                let line = format!(
                    "{} epoch {}/{} step {}/{} {} ({:.1}s)",
                    self.name,
                    state.epoch + 1,
                    c.epochs,
                    state.step_in_epoch,
                    c.steps_per_epoch,
                    detail(),
                    self.seconds()
                );
                tracing::info!("{line}");
                self.ctx.log(&line);
            }
        }
        if epoch_done {
            state.epoch += 1;
            state.step_in_epoch = 0;
            let mean = self.loss_sum / self.loss_n.max(1) as f64;
            if self.primary {
                self.ctx.metrics(
                    state.global_step,
                    &[(&format!("{}/epoch_train_loss", self.name), mean)],
                );
            }
            self.loss_sum = 0.0;
            self.loss_n = 0;
        }
        epoch_done
    }

    /// After a step (and any evaluation at the end of its epoch): counts the phase's
    /// seconds, and on rank 0 saves a checkpoint of `tensors()` every `checkpoint_every`
    /// steps, with the step's `loss` as `<name>/train_loss`.
    pub fn checkpoint_if_due<R: Serialize + DeserializeOwned>(
        &mut self,
        state: &mut PhaseState<R>,
        loss: f64,
        tensors: impl FnOnce() -> Result<Tensors, JobError>,
    ) -> Result<(), JobError> {
        state.phase_seconds = self.seconds();
        let every = self.cadence.checkpoint_every;
        if self.primary && every > 0 && state.global_step.is_multiple_of(every) {
            state.save(
                self.ctx,
                tensors()?,
                &[(&format!("{}/train_loss", self.name), loss)],
            )?;
            self.last_saved = state.global_step;
        }
        Ok(())
    }
}

/// Stops every rank at this step once any of them was asked to: returns
/// [`JobError::Stopped`] after rank 0 ran `save` (when `unsaved`, steps were taken since the
/// last checkpoint) and logged the stop at `step`; `Ok` when no rank was asked.
pub fn stop_if_asked(
    ctx: &dyn JobContext,
    dp: &mut DataParallel,
    step: u64,
    unsaved: bool,
    save: impl FnOnce() -> Result<(), JobError>,
) -> Result<(), JobError> {
    if !dp.any(ctx.should_stop())? {
        return Ok(());
    }
    if dp.is_primary() {
        if unsaved {
            save()?;
        }
        ctx.log(&format!("stopping at step {step} on request"));
    }
    Err(JobError::Stopped)
}

/// Reports `metrics` (named values) at `step`.
pub fn report(ctx: &dyn JobContext, step: u64, metrics: &[(String, f64)]) {
    let named: Vec<(&str, f64)> = metrics.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    ctx.metrics(step, &named);
}

/// `loss` if it is finite, else the error that ends the attempt:
/// `<what>: training loss is <loss> at step <step><hint>`.
pub fn finite_loss(what: &str, loss: f64, step: u64, hint: &str) -> Result<f64, JobError> {
    if loss.is_finite() {
        Ok(loss)
    } else {
        Err(JobError::Other(format!(
            "{what}: training loss is {loss} at step {step}{hint}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryContext;

    type State = PhaseState<u32>;

    #[test]
    fn phases_save_resume_and_advance() {
        let ctx = MemoryContext::new();
        let dp = DataParallel::new(Box::new(trainyard_collective::Local::new()), &Device::Cpu);
        let models = ["a", "b"];
        let (mut state, tensors) =
            State::start_or_resume(&ctx, &Device::Cpu, true, &models, 7, 1).unwrap();
        assert!(tensors.is_none());
        assert_eq!((state.model.as_str(), state.seed), ("a", 7));
        let mut dp = dp;
        let cadence = Cadence {
            epochs: 2,
            steps_per_epoch: 3,
            checkpoint_every: 4,
            log_every: 100,
        };
        state.in_progress = true;
        let mut phase = Phase::new(&ctx, &dp, "a", cadence, &state);
        let mut ends = Vec::new();
        while state.epoch < cadence.epochs {
            while state.step_in_epoch < cadence.steps_per_epoch {
                phase
                    .begin_step(&mut state, &mut dp, || Ok(Tensors::new()))
                    .unwrap();
                let done = phase.end_step(&mut state, &mut dp, 1.0, &[], String::new);
                phase
                    .checkpoint_if_due(&mut state, 1.0, || Ok(Tensors::new()))
                    .unwrap();
                ends.push(done);
                if done {
                    break;
                }
            }
        }
        assert_eq!(ends, [false, false, true, false, false, true]);
        assert_eq!(
            ctx.metric_values("a/epoch_train_loss"),
            vec![(3, 1.0), (6, 1.0)]
        );
        // one checkpoint at step 4, mid-phase: a restart resumes it with its tensors
        let restart = MemoryContext::resuming_from(ctx.latest_checkpoint().unwrap());
        let (resumed, tensors) =
            State::start_or_resume(&restart, &Device::Cpu, true, &models, 7, 1).unwrap();
        assert_eq!((resumed.epoch, resumed.step_in_epoch), (1, 1));
        assert!(tensors.is_some());
        let err = State::start_or_resume(&restart, &Device::Cpu, true, &["b"], 7, 1).unwrap_err();
        assert!(
            err.to_string().contains("but this config trains b"),
            "{err}"
        );
        state.finish_phase(5, &models);
        assert_eq!(
            (state.phase, state.model.as_str(), state.epoch),
            (1, "b", 0)
        );
        assert!(finite_loss("a", f64::NAN, 3, "; lower").is_err());
    }

    #[test]
    fn another_world_size_keeps_the_epoch() {
        let ctx = MemoryContext::new();
        let (mut state, _) =
            State::start_or_resume(&ctx, &Device::Cpu, true, &["a"], 0, 2).unwrap();
        state.step_in_epoch = 5;
        state.adopt_world_size(1, 10, &ctx, true);
        assert_eq!(
            (state.epoch, state.step_in_epoch, state.world_size),
            (0, 5, 1)
        );
        state.adopt_world_size(4, 3, &ctx, true);
        assert_eq!(
            (state.epoch, state.step_in_epoch, state.world_size),
            (1, 0, 4)
        );
    }
}
