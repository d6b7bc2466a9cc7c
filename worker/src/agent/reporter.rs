//! Batches one rank's events into `ReportRank` calls: a batch goes out when it holds
//! [`BATCH_MAX`] events or [`BATCH_WINDOW`] after its first event. Failed calls are retried
//! with backoff; while the coordinator is unreachable, log lines beyond [`PENDING_MAX`]
//! are dropped (and counted) but state changes, checkpoints and results are kept.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use trainyard_proto::{rank_event, LogLine, RankEvent, RankReport, RankState};

use super::session::{Backoff, CALL_TIMEOUT};
use super::{Agent, RankKey, StopReason};
use crate::checkpoint::now_unix_ms;

/// Most events in one `ReportRank`.
pub(crate) const BATCH_MAX: usize = 256;
/// Longest an event waits for its batch to fill.
pub(crate) const BATCH_WINDOW: Duration = Duration::from_millis(200);
/// Most events kept while the coordinator is unreachable.
const PENDING_MAX: usize = 10_000;

struct Pending {
    events: VecDeque<RankEvent>,
    dropped_logs: u64,
    rank: u32,
}

impl Pending {
    fn push(&mut self, event: RankEvent) {
        let is_log = matches!(event.kind, Some(rank_event::Kind::Log(_)));
        if is_log && self.events.len() >= PENDING_MAX {
            self.dropped_logs += 1;
        } else {
            self.events.push_back(event);
        }
    }

    /// The next batch (not yet removed from the queue).
    fn batch(&mut self) -> Vec<RankEvent> {
        if self.dropped_logs > 0 {
            let note = RankEvent {
                at_unix_ms: now_unix_ms(),
                kind: Some(rank_event::Kind::Log(LogLine {
                    rank: self.rank,
                    stream: "stderr".into(),
                    line: format!(
                        "[trainyard worker] {} log lines dropped while the coordinator was unreachable",
                        self.dropped_logs
                    ),
                })),
            };
            self.events.push_front(note);
            self.dropped_logs = 0;
        }
        self.events.iter().take(BATCH_MAX).cloned().collect()
    }
}

/// Sends the events arriving on `rx` for rank `key` until the channel closes and every
/// event is delivered (or the coordinator rejects the attempt as stale).
pub(crate) async fn report_loop(
    agent: Arc<Agent>,
    key: RankKey,
    mut rx: mpsc::UnboundedReceiver<RankEvent>,
) {
    let mut pending = Pending {
        events: VecDeque::new(),
        dropped_logs: 0,
        rank: key.rank,
    };
    let mut closed = false;
    let mut rejected = false;
    let mut backoff = Backoff::new(Duration::from_secs(5));
    let mut failures = 0u32;
    loop {
        if pending.events.is_empty() && pending.dropped_logs == 0 {
            if closed {
                return;
            }
            match rx.recv().await {
                Some(e) => pending.push(e),
                None => return,
            }
            // Fill the batch for up to BATCH_WINDOW.
            let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
            while pending.events.len() < BATCH_MAX && !closed {
                tokio::select! {
                    e = rx.recv() => match e {
                        Some(e) => pending.push(e),
                        None => closed = true,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        if rejected {
            // The coordinator fenced this attempt off (a stale attempt, or a job that ended,
            // e.g. cancelled): discard everything but the rank's exit, which the coordinator
            // still needs to free the rank's device.
            pending.events.retain(is_exit);
            pending.dropped_logs = 0;
            if pending.events.is_empty() {
                continue;
            }
        }
        let batch = pending.batch();
        let n = batch.len();
        let sent_as = agent.worker_id();
        let report = RankReport {
            worker_id: sent_as.clone(),
            job_id: key.job_id.clone(),
            attempt: key.attempt,
            rank: key.rank,
            events: batch,
        };
        let (generation, mut client) = agent.coordinators().current();
        match tokio::time::timeout(CALL_TIMEOUT, client.report_rank(report)).await {
            Ok(Ok(response)) if !response.get_ref().accepted && agent.worker_id() != sent_as => {
                // The worker re-registered (a new leader) while this report was in flight:
                // its refusal says nothing about the rank; send it again under the new id.
                tracing::debug!("report refused under the previous worker id; resending");
            }
            Ok(Ok(response)) => {
                pending.events.drain(..n);
                backoff.reset();
                failures = 0;
                if !response.into_inner().accepted && !rejected {
                    tracing::warn!(
                        "coordinator rejected the report (stale attempt); stopping the rank"
                    );
                    rejected = true;
                    agent.stop_rank(&key, StopReason::Stale);
                }
            }
            Ok(Err(status))
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
                ) =>
            {
                // The coordinator will never take this batch (over one of its limits):
                // resending it would stall the rank's reports for good.
                tracing::error!(error = %status, events = n, "coordinator refused the report; dropping it");
                pending.events.drain(..n);
            }
            Ok(Err(status)) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(error = %status, failures, "report failed; retrying");
                }
                agent.coordinators().on_error(generation, &status);
                wait_and_absorb(&mut backoff, &mut rx, &mut pending, &mut closed).await;
            }
            Err(_) => {
                failures += 1;
                tracing::warn!(failures, "report timed out; retrying");
                wait_and_absorb(&mut backoff, &mut rx, &mut pending, &mut closed).await;
            }
        }
        // Take whatever arrived meanwhile without waiting.
        while !closed {
            match rx.try_recv() {
                Ok(e) => pending.push(e),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
            }
        }
    }
}

/// True for the event that says the rank process has exited (SUCCEEDED, FAILED or CANCELLED).
fn is_exit(event: &RankEvent) -> bool {
    matches!(
        &event.kind,
        Some(rank_event::Kind::State(change)) if matches!(
            change.state(),
            RankState::Succeeded | RankState::Failed | RankState::Cancelled
        )
    )
}

/// Waits out the backoff while still taking in events (so the channel does not grow).
async fn wait_and_absorb(
    backoff: &mut Backoff,
    rx: &mut mpsc::UnboundedReceiver<RankEvent>,
    pending: &mut Pending,
    closed: &mut bool,
) {
    let wait = backoff.wait();
    tokio::pin!(wait);
    loop {
        tokio::select! {
            _ = &mut wait => return,
            e = rx.recv(), if !*closed => match e {
                Some(e) => pending.push(e),
                None => *closed = true,
            },
        }
    }
}
