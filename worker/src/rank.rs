//! The rank-process side: the body of the hidden `trainyard rank` subcommand.
//!
//! A rank process reads its [`RankAssignment`] from the environment, resolves the job's
//! config, runs the job with a [`RankContext`], and reports everything through event lines
//! on stdout (see [`crate::protocol`]). SIGTERM and SIGINT make `should_stop()` true.
//!
//! Exit codes: 0 success, 1 job error (message on stderr), 2 bad assignment, 143 stopped
//! on request.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use trainyard_jobs::{Checkpoint, JobContext, JobError, ResolvedConfig, ResultsTable};
use trainyard_proto::RankAssignment;

use crate::checkpoint;
use crate::objects::{open_objects, Objects};
use crate::protocol::{decode_assignment, RankMessage, ASSIGNMENT_ENV};

/// Exit code of a rank that finished its job.
pub const EXIT_OK: i32 = 0;
/// Exit code of a rank whose job failed.
pub const EXIT_JOB_ERROR: i32 = 1;
/// Exit code of a rank whose assignment could not be used.
pub const EXIT_BAD_ASSIGNMENT: i32 = 2;
/// Exit code of a rank that stopped on request (128 + SIGTERM).
pub const EXIT_STOPPED: i32 = 143;

/// Set by the SIGTERM/SIGINT handler.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

fn install_stop_handlers() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic; the sigaction struct is zeroed and
        // then filled in as sigaction(2) requires.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!(signal, "cannot install stop handler");
            }
        }
    }
}

/// Runs a rank process: reads `TRAINYARD_ASSIGNMENT`, runs the job, and returns the exit
/// code (0 success, 1 job error, 2 bad assignment, 143 stopped on request).
pub fn run_rank_process() -> i32 {
    install_stop_handlers();
    let encoded = std::env::var(ASSIGNMENT_ENV).ok();
    run_rank(
        encoded.as_deref(),
        Box::new(std::io::stdout()),
        &STOP_REQUESTED,
    )
}

/// [`run_rank_process`] with its inputs made explicit (for tests).
pub(crate) fn run_rank(
    encoded: Option<&str>,
    out: Box<dyn Write + Send>,
    stop: &'static AtomicBool,
) -> i32 {
    let Some(encoded) = encoded else {
        eprintln!(
            "trainyard rank: {ASSIGNMENT_ENV} is not set (rank processes are started by a worker)"
        );
        return EXIT_BAD_ASSIGNMENT;
    };
    let assignment = match decode_assignment(encoded) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("trainyard rank: {e}");
            return EXIT_BAD_ASSIGNMENT;
        }
    };
    let config = match ResolvedConfig::from_json(&assignment.config_json) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trainyard rank: config of job {}: {e}", assignment.job_id);
            return EXIT_BAD_ASSIGNMENT;
        }
    };
    let registry = trainyard_jobs::registry();
    let Some(job) = registry.get(&assignment.job) else {
        eprintln!(
            "trainyard rank: unknown job {:?} (known: {})",
            assignment.job,
            registry.names().join(", ")
        );
        return EXIT_BAD_ASSIGNMENT;
    };
    let ctx = match RankContext::new(assignment, out, stop) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("trainyard rank: {e}");
            return EXIT_BAD_ASSIGNMENT;
        }
    };
    tracing::info!(
        job = job.name(),
        job_id = %ctx.assignment.job_id,
        attempt = ctx.assignment.attempt,
        rank = ctx.assignment.rank,
        "rank starting"
    );
    let result = job.run(&config, &ctx);
    ctx.flush();
    match result {
        Ok(()) => EXIT_OK,
        Err(JobError::Stopped) => {
            eprintln!("trainyard rank: stopped on request");
            EXIT_STOPPED
        }
        Err(e) => {
            eprintln!("trainyard rank: job {} failed: {e}", ctx.assignment.job);
            EXIT_JOB_ERROR
        }
    }
}

/// The [`JobContext`] of a rank process: events go to the agent as event lines on `out`
/// (stdout), checkpoints go to the object store.
pub struct RankContext {
    assignment: RankAssignment,
    objects: Option<Objects>,
    runtime: tokio::runtime::Runtime,
    out: Mutex<Box<dyn Write + Send>>,
    stop: &'static AtomicBool,
}

impl RankContext {
    /// A context for `assignment`, writing event lines to `out`, stopping when `stop` is set.
    pub fn new(
        assignment: RankAssignment,
        out: Box<dyn Write + Send>,
        stop: &'static AtomicBool,
    ) -> Result<Self, crate::WorkerError> {
        let objects = if assignment.objects_url.is_empty() {
            None
        } else {
            Some(open_objects(&assignment.objects_url)?)
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(RankContext {
            assignment,
            objects,
            runtime,
            out: Mutex::new(out),
            stop,
        })
    }

    /// Writes one event line. A broken stdout (the agent is gone) is ignored: the
    /// parent-death signal ends this process soon after.
    fn emit(&self, msg: RankMessage) {
        let line = msg.to_line();
        let mut out = match self.out.lock() {
            Ok(o) => o,
            Err(poisoned) => poisoned.into_inner(),
        };
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    fn flush(&self) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.flush();
        }
    }

    fn objects(&self) -> Result<&Objects, JobError> {
        self.objects.as_ref().ok_or_else(|| {
            JobError::Checkpoint(
                "the assignment has no objects_url: checkpoints are unavailable".into(),
            )
        })
    }
}

impl JobContext for RankContext {
    fn rank(&self) -> u32 {
        self.assignment.rank
    }

    fn world_size(&self) -> u32 {
        self.assignment.world_size.max(1)
    }

    fn log(&self, line: &str) {
        self.emit(RankMessage::Log {
            line: line.to_string(),
        });
    }

    fn metrics(&self, step: u64, values: &[(&str, f64)]) {
        self.emit(RankMessage::Metric {
            step,
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        });
    }

    fn progress(&self, stage: &str, done: u64, total: u64) {
        self.emit(RankMessage::Progress {
            stage: stage.to_string(),
            done,
            total,
        });
    }

    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn save_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), JobError> {
        let objects = self.objects()?;
        let (path, manifest) = self
            .runtime
            .block_on(checkpoint::save_checkpoint(
                objects,
                &self.assignment.job_id,
                self.assignment.attempt,
                checkpoint,
            ))
            .map_err(|e| JobError::Checkpoint(e.to_string()))?;
        self.emit(RankMessage::Checkpoint {
            job_id: manifest.job_id,
            step: manifest.step,
            path,
            created_unix_ms: manifest.created_unix_ms,
            attempt: manifest.attempt,
            metrics: manifest.metrics,
        });
        Ok(())
    }

    fn restore_checkpoint(
        &self,
        device: &candle_core::Device,
    ) -> Result<Option<Checkpoint>, JobError> {
        let Some(info) = self.assignment.resume_from.as_ref() else {
            return Ok(None);
        };
        let objects = self.objects()?;
        match self
            .runtime
            .block_on(checkpoint::load_checkpoint(objects, &info.path, device))
        {
            Ok(Some((_, checkpoint))) => Ok(Some(checkpoint)),
            Ok(None) => Err(JobError::Checkpoint(format!(
                "checkpoint {} has no manifest",
                info.path
            ))),
            Err(e) => Err(JobError::Checkpoint(e.to_string())),
        }
    }

    fn results(&self, table: &ResultsTable) {
        self.emit(RankMessage::Result {
            title: table.title.clone(),
            columns: table.columns.clone(),
            rows: table.rows.clone(),
            notes: table.notes.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_assignment, parse_line, ParsedLine};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    /// A `Write` whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn events(&self) -> Vec<RankMessage> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|l| match parse_line(l) {
                    ParsedLine::Event(m) => m,
                    ParsedLine::Log(l) => panic!("plain line {l:?}"),
                })
                .collect()
        }
    }

    fn leak_flag() -> &'static AtomicBool {
        Box::leak(Box::new(AtomicBool::new(false)))
    }

    fn assignment(objects_url: String) -> RankAssignment {
        RankAssignment {
            job_id: "job-7".into(),
            attempt: 2,
            rank: 0,
            world_size: 1,
            job: "neural-ode".into(),
            objects_url,
            ..Default::default()
        }
    }

    #[test]
    fn context_reports_events_and_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/objects", dir.path().display());
        let cap = Capture::default();
        let stop = leak_flag();
        let ctx = RankContext::new(assignment(url.clone()), Box::new(cap.clone()), stop).unwrap();
        ctx.log("hello");
        ctx.metrics(3, &[("loss", 0.5)]);
        ctx.progress("epoch 1/1", 1, 2);
        assert!(!ctx.should_stop());
        stop.store(true, Ordering::SeqCst);
        assert!(ctx.should_stop());
        assert!(ctx
            .restore_checkpoint(&candle_core::Device::Cpu)
            .unwrap()
            .is_none());

        let mut tensors = BTreeMap::new();
        tensors.insert(
            "w".to_string(),
            candle_core::Tensor::new(&[1f32, 2., 3.], &candle_core::Device::Cpu).unwrap(),
        );
        let ck = Checkpoint {
            step: 11,
            tensors,
            state: serde_json::json!({"epoch": 1}),
            metrics: [("acc".to_string(), 0.75)].into_iter().collect(),
        };
        ctx.save_checkpoint(&ck).unwrap();
        assert!(dir
            .path()
            .join("objects/jobs/job-7/checkpoints/11/manifest.json")
            .is_file());
        ctx.results(&ResultsTable {
            title: "T".into(),
            columns: vec!["c".into()],
            rows: vec![vec!["v".into()]],
            notes: vec![],
        });

        let events = cap.events();
        assert_eq!(events.len(), 5, "{events:?}");
        assert_eq!(
            events[0],
            RankMessage::Log {
                line: "hello".into()
            }
        );
        match &events[3] {
            RankMessage::Checkpoint {
                job_id,
                step,
                path,
                attempt,
                metrics,
                ..
            } => {
                assert_eq!((job_id.as_str(), *step, *attempt), ("job-7", 11, 2));
                assert_eq!(path, "jobs/job-7/checkpoints/11");
                assert_eq!(metrics["acc"], 0.75);
            }
            other => panic!("{other:?}"),
        }

        // A restarted attempt restores what the first one saved.
        let mut resumed = assignment(url);
        resumed.attempt = 3;
        resumed.resume_from = Some(trainyard_proto::CheckpointInfo {
            job_id: "job-7".into(),
            step: 11,
            path: "jobs/job-7/checkpoints/11".into(),
            ..Default::default()
        });
        let ctx2 = RankContext::new(resumed, Box::new(Capture::default()), leak_flag()).unwrap();
        let back = ctx2
            .restore_checkpoint(&candle_core::Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(back.step, 11);
        assert_eq!(
            back.tensors["w"].to_vec1::<f32>().unwrap(),
            vec![1., 2., 3.]
        );
    }

    #[test]
    fn bad_assignments_exit_2() {
        let out = || Box::new(Capture::default()) as Box<dyn Write + Send>;
        assert_eq!(run_rank(None, out(), leak_flag()), EXIT_BAD_ASSIGNMENT);
        assert_eq!(
            run_rank(Some("not hex"), out(), leak_flag()),
            EXIT_BAD_ASSIGNMENT
        );
        let mut a = assignment(String::new());
        a.config_json = "{broken".into();
        assert_eq!(
            run_rank(Some(&encode_assignment(&a)), out(), leak_flag()),
            EXIT_BAD_ASSIGNMENT
        );
        // an unknown job, with a config that does resolve
        let job = trainyard_jobs::registry()
            .get("neural-ode")
            .expect("neural-ode registered");
        let config = job.resolve_config("quick", &BTreeMap::new()).unwrap();
        a.config_json = config.to_json();
        a.job = "no-such-job".into();
        assert_eq!(
            run_rank(Some(&encode_assignment(&a)), out(), leak_flag()),
            EXIT_BAD_ASSIGNMENT
        );
    }
}
