//! The job state machine:
//!
//! ```text
//! PENDING ──> SCHEDULED ──> RUNNING ──> SUCCEEDED
//!    │  ^         │  │         │ │
//!    │  └─requeue─┘  │         │ └──> FAILED | CANCELLED
//!    │  ^────────────┼─requeue─┘
//!    └──> FAILED | CANCELLED (from PENDING and SCHEDULED too)
//! ```
//!
//! [`transition`] is the only way the coordinator changes a job's state. It records every
//! change (with a timestamp and a reason) and keeps the counters in step: entering
//! SCHEDULED starts a new attempt (`attempt += 1`), a requeue (SCHEDULED/RUNNING → PENDING)
//! counts a restart (`restarts += 1`) and drops the placement. Terminal states never change.

use trainyard_proto::{Job, JobState, Transition};

/// A refused transition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// The state machine has no edge `from -> to`.
    #[error("illegal job transition {} -> {}", from.short_name(), to.short_name())]
    Illegal {
        /// Current state.
        from: JobState,
        /// Requested state.
        to: JobState,
    },
    /// The job is terminal; it never changes again.
    #[error("job is {} and can no longer change", .0.short_name())]
    Terminal(JobState),
}

/// True if the state machine has an edge `from -> to`.
pub fn is_legal(from: JobState, to: JobState) -> bool {
    use JobState::*;
    matches!(
        (from, to),
        (Pending, Scheduled | Failed | Cancelled)
            | (Scheduled, Running | Pending | Failed | Cancelled)
            | (Running, Succeeded | Failed | Cancelled | Pending)
    )
}

/// Moves `job` to `to`, recording the transition at `now_unix_ms` with `reason`.
///
/// Side effects: `state_reason = reason`; entering SCHEDULED increments `attempt`;
/// a requeue to PENDING increments `restarts` and clears the placement.
pub fn transition(
    job: &mut Job,
    to: JobState,
    reason: &str,
    now_unix_ms: i64,
) -> Result<(), LifecycleError> {
    let from = job.state();
    if from.is_terminal() {
        return Err(LifecycleError::Terminal(from));
    }
    if !is_legal(from, to) {
        return Err(LifecycleError::Illegal { from, to });
    }
    match to {
        JobState::Scheduled => job.attempt += 1,
        JobState::Pending => {
            job.restarts += 1;
            job.placement.clear();
        }
        _ => {}
    }
    job.state = to as i32;
    job.state_reason = reason.to_string();
    job.transitions.push(Transition {
        from: from as i32,
        to: to as i32,
        at_unix_ms: now_unix_ms,
        reason: reason.to_string(),
    });
    Ok(())
}

/// True if the job may be requeued once more (`restarts < spec.max_restarts`).
pub fn can_restart(job: &Job) -> bool {
    let max = job.spec.as_ref().map(|s| s.max_restarts).unwrap_or(0);
    job.restarts < max
}

/// Requeues a SCHEDULED/RUNNING job after a failure if it has restarts left, else fails it.
/// Returns the new state.
pub fn requeue_or_fail(
    job: &mut Job,
    reason: &str,
    now_unix_ms: i64,
) -> Result<JobState, LifecycleError> {
    if can_restart(job) {
        let max = job.spec.as_ref().map(|s| s.max_restarts).unwrap_or(0);
        let why = format!("{reason}; requeued (restart {} of {max})", job.restarts + 1);
        transition(job, JobState::Pending, &why, now_unix_ms)?;
        Ok(JobState::Pending)
    } else {
        let max = job.spec.as_ref().map(|s| s.max_restarts).unwrap_or(0);
        let why = if max == 0 {
            reason.to_string()
        } else {
            format!("{reason}; no restarts left ({max} used)")
        };
        transition(job, JobState::Failed, &why, now_unix_ms)?;
        Ok(JobState::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::{JobSpec, RankPlacement};

    const ALL: [JobState; 7] = [
        JobState::Unspecified,
        JobState::Pending,
        JobState::Scheduled,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    fn job_in(state: JobState) -> Job {
        Job {
            id: "job-x".into(),
            state: state as i32,
            spec: Some(JobSpec {
                max_restarts: 1,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn legal_edges_are_exactly_the_contract() {
        use JobState::*;
        let legal = [
            (Pending, Scheduled),
            (Pending, Failed),
            (Pending, Cancelled),
            (Scheduled, Running),
            (Scheduled, Pending),
            (Scheduled, Failed),
            (Scheduled, Cancelled),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Cancelled),
            (Running, Pending),
        ];
        for from in ALL {
            for to in ALL {
                let expect = legal.contains(&(from, to));
                assert_eq!(is_legal(from, to), expect, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn every_illegal_transition_is_refused_and_changes_nothing() {
        for from in ALL {
            for to in ALL {
                if is_legal(from, to) {
                    continue;
                }
                let mut job = job_in(from);
                let before = job.clone();
                let err = transition(&mut job, to, "x", 5).unwrap_err();
                if from.is_terminal() {
                    assert_eq!(err, LifecycleError::Terminal(from));
                } else {
                    assert_eq!(err, LifecycleError::Illegal { from, to });
                }
                assert_eq!(job, before, "{from:?} -> {to:?} must not touch the job");
            }
        }
    }

    #[test]
    fn transitions_are_recorded_with_time_and_reason() {
        let mut job = job_in(JobState::Pending);
        transition(&mut job, JobState::Scheduled, "placed on w1", 10).unwrap();
        transition(&mut job, JobState::Running, "rank 0 running", 20).unwrap();
        transition(&mut job, JobState::Succeeded, "all ranks succeeded", 30).unwrap();
        assert_eq!(job.state(), JobState::Succeeded);
        assert_eq!(job.state_reason, "all ranks succeeded");
        let t: Vec<(JobState, JobState, i64, &str)> = job
            .transitions
            .iter()
            .map(|t| (t.from(), t.to(), t.at_unix_ms, t.reason.as_str()))
            .collect();
        assert_eq!(
            t,
            [
                (JobState::Pending, JobState::Scheduled, 10, "placed on w1"),
                (JobState::Scheduled, JobState::Running, 20, "rank 0 running"),
                (
                    JobState::Running,
                    JobState::Succeeded,
                    30,
                    "all ranks succeeded"
                ),
            ]
        );
        assert_eq!(job.attempt, 1);
    }

    #[test]
    fn schedule_bumps_attempt_and_requeue_bumps_restarts() {
        let mut job = job_in(JobState::Pending);
        transition(&mut job, JobState::Scheduled, "", 1).unwrap();
        job.placement.push(RankPlacement::default());
        transition(&mut job, JobState::Running, "", 2).unwrap();
        transition(&mut job, JobState::Pending, "worker died", 3).unwrap();
        assert_eq!((job.attempt, job.restarts), (1, 1));
        assert!(job.placement.is_empty());
        transition(&mut job, JobState::Scheduled, "", 4).unwrap();
        assert_eq!(job.attempt, 2);
    }

    #[test]
    fn requeue_or_fail_counts_against_max_restarts() {
        let mut job = job_in(JobState::Running);
        assert_eq!(
            requeue_or_fail(&mut job, "worker w1 died", 1).unwrap(),
            JobState::Pending
        );
        assert_eq!(job.restarts, 1);
        assert!(job.state_reason.contains("worker w1 died"));
        transition(&mut job, JobState::Scheduled, "", 2).unwrap();
        assert_eq!(
            requeue_or_fail(&mut job, "worker w2 died", 3).unwrap(),
            JobState::Failed
        );
        assert!(job.state_reason.contains("no restarts left"));
        assert_eq!(job.restarts, 1);
    }
}
