//! `trainyard.v1.WorkerService` (the agent protocol).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};
use trainyard_proto::worker_service_server::WorkerService;
use trainyard_proto::{
    worker_command, HeartbeatRequest, HeartbeatResponse, RankReport, RegisterWorkerRequest,
    RegisterWorkerResponse, ReportRankResponse, StreamCommandsRequest, WorkerCommand,
};

use crate::coordinator::Coordinator;

/// Serves `WorkerService`.
#[derive(Clone)]
pub struct WorkerApi {
    /// The coordinator.
    pub coord: Arc<Coordinator>,
}

/// A worker's command stream.
pub type CommandStream = Pin<Box<dyn Stream<Item = Result<WorkerCommand, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        Ok(Response::new(
            self.coord.register_worker(request.into_inner()).await?,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let known = self
            .coord
            .heartbeat(&request.into_inner().worker_id)
            .await?;
        Ok(Response::new(HeartbeatResponse { known }))
    }

    type StreamCommandsStream = CommandStream;

    async fn stream_commands(
        &self,
        request: Request<StreamCommandsRequest>,
    ) -> Result<Response<Self::StreamCommandsStream>, Status> {
        let rx = self
            .coord
            .stream_commands(&request.into_inner().worker_id)
            .await?;
        // The stream lives within one term: a leader that steps down drops its senders.
        let term = self.coord.require_leader()?;
        let stream = UnboundedReceiverStream::new(rx).map(move |m| m.map(|c| stamp(c, term)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_rank(
        &self,
        request: Request<RankReport>,
    ) -> Result<Response<ReportRankResponse>, Status> {
        let report = request.into_inner();
        self.coord.settings.limits.check_report(&report)?;
        let accepted = self.coord.report_rank(report).await?;
        Ok(Response::new(ReportRankResponse { accepted }))
    }
}

/// Sets the fencing token of a command to the leader's term.
fn stamp(mut command: WorkerCommand, term: u64) -> WorkerCommand {
    match &mut command.command {
        Some(worker_command::Command::Assign(a)) => a.leader_term = term,
        Some(worker_command::Command::Cancel(c)) => c.leader_term = term,
        Some(worker_command::Command::Rendezvous(r)) => r.leader_term = term,
        None => {}
    }
    command
}
