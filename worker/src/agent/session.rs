//! Registration, heartbeats and the command stream.

use std::sync::Arc;
use std::time::Duration;

use trainyard_proto::{
    worker_command, HeartbeatRequest, RegisterWorkerRequest, StreamCommandsRequest,
};

use super::{hostname, Agent};

/// Timeout of one unary call to the coordinator.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Exponential backoff between retries.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Self {
        Backoff {
            next: BACKOFF_START,
            max,
        }
    }

    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_START;
    }
}

/// Registers, then heartbeats and follows the command stream until the coordinator no
/// longer knows this worker; then registers again. Never returns.
pub(crate) async fn run_sessions(agent: Arc<Agent>) {
    loop {
        let heartbeat = register(&agent).await;
        tokio::select! {
            _ = heartbeat_loop(&agent, heartbeat) => {}
            _ = command_loop(&agent) => {}
        }
        tracing::info!("coordinator does not know this worker any more; registering again");
    }
}

/// Registers with backoff until it succeeds; returns the heartbeat interval.
async fn register(agent: &Arc<Agent>) -> Duration {
    let mut backoff = Backoff::new(BACKOFF_MAX);
    let mut failures = 0u32;
    loop {
        let request = RegisterWorkerRequest {
            name: agent.config.name.clone(),
            hostname: hostname(),
            devices: agent.config.devices.clone(),
            running: agent.running(),
            pid: std::process::id(),
        };
        let (generation, mut client) = agent.coordinators().current();
        let result = tokio::time::timeout(CALL_TIMEOUT, client.register_worker(request)).await;
        match result {
            Ok(Ok(response)) => {
                let r = response.into_inner();
                let interval = match r.heartbeat_interval_ms {
                    0 => Duration::from_secs(1),
                    ms => Duration::from_millis(ms as u64),
                };
                tracing::info!(
                    worker_id = %r.worker_id,
                    heartbeat_ms = interval.as_millis() as u64,
                    objects = %r.objects_url,
                    "registered with the coordinator"
                );
                agent.worker_id.send_replace(r.worker_id);
                return interval;
            }
            Ok(Err(status)) => {
                log_retry(&mut failures, "register", &status.to_string());
                agent.coordinators().on_error(generation, &status);
            }
            Err(_) => {
                log_retry(&mut failures, "register", "timed out");
                agent.coordinators().next(generation);
            }
        }
        backoff.wait().await;
    }
}

fn log_retry(failures: &mut u32, what: &str, error: &str) {
    *failures += 1;
    // First failure and then every 10th at warn level, the rest at debug.
    if *failures == 1 || failures.is_multiple_of(10) {
        tracing::warn!(failures = *failures, error, "{what} failed; retrying");
    } else {
        tracing::debug!(failures = *failures, error, "{what} failed; retrying");
    }
}

/// Heartbeats every `interval`; returns when the coordinator says it does not know us.
async fn heartbeat_loop(agent: &Arc<Agent>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        ticker.tick().await;
        let request = HeartbeatRequest {
            worker_id: agent.worker_id(),
            running: agent.running(),
        };
        let (generation, mut client) = agent.coordinators().current();
        match tokio::time::timeout(CALL_TIMEOUT, client.heartbeat(request)).await {
            Ok(Ok(response)) => {
                failures = 0;
                if !response.into_inner().known {
                    return;
                }
            }
            Ok(Err(status)) if is_unknown_worker(&status) => return,
            Ok(Err(status)) => {
                log_retry(&mut failures, "heartbeat", &status.to_string());
                agent.coordinators().on_error(generation, &status);
            }
            Err(_) => {
                log_retry(&mut failures, "heartbeat", "timed out");
                agent.coordinators().next(generation);
            }
        }
    }
}

/// Status codes with which the coordinator says it does not know this worker.
fn is_unknown_worker(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::NotFound | tonic::Code::FailedPrecondition | tonic::Code::Unauthenticated
    )
}

/// Follows the command stream, reopening it on errors; returns when the coordinator
/// rejects the stream because it does not know this worker.
async fn command_loop(agent: &Arc<Agent>) {
    let mut backoff = Backoff::new(BACKOFF_MAX);
    let mut failures = 0u32;
    loop {
        let request = StreamCommandsRequest {
            worker_id: agent.worker_id(),
        };
        let (generation, mut client) = agent.coordinators().current();
        match client.stream_commands(request).await {
            Ok(response) => {
                tracing::debug!("command stream open");
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(command)) => {
                            backoff.reset();
                            failures = 0;
                            match command.command {
                                Some(worker_command::Command::Assign(a)) => agent.assign(a),
                                Some(worker_command::Command::Cancel(c)) => agent.cancel(&c),
                                Some(worker_command::Command::Rendezvous(r)) => agent.rendezvous(r),
                                None => tracing::debug!("empty worker command"),
                            }
                        }
                        Ok(None) => {
                            tracing::debug!("command stream ended; reopening");
                            break;
                        }
                        Err(status) if is_unknown_worker(&status) => return,
                        Err(status) => {
                            log_retry(&mut failures, "command stream", &status.to_string());
                            agent.coordinators().on_error(generation, &status);
                            break;
                        }
                    }
                }
            }
            Err(status) if is_unknown_worker(&status) => return,
            Err(status) => {
                log_retry(
                    &mut failures,
                    "opening the command stream",
                    &status.to_string(),
                );
                agent.coordinators().on_error(generation, &status);
            }
        }
        backoff.wait().await;
    }
}
