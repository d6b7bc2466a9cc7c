//! `trainyard.v1.JobService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use trainyard_proto::job_service_server::JobService;
use trainyard_proto::{
    CancelJobRequest, CancelJobResponse, GetJobRequest, Job, ListCheckpointsRequest,
    ListCheckpointsResponse, ListJobTypesRequest, ListJobTypesResponse, ListJobsRequest,
    ListJobsResponse, SubmitJobRequest, SubmitJobResponse, WatchJobRequest,
};

use crate::coordinator::{Coordinator, EventStream};

/// Serves `JobService`.
#[derive(Clone)]
pub struct JobApi {
    /// The coordinator.
    pub coord: Arc<Coordinator>,
}

fn require_id(id: &str, field: &str) -> Result<(), Status> {
    if id.is_empty() {
        Err(Status::invalid_argument(format!("{field}: missing")))
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let job = self.coord.submit(request.into_inner().spec).await?;
        Ok(Response::new(SubmitJobResponse { job: Some(job) }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let id = request.into_inner().id;
        require_id(&id, "id")?;
        Ok(Response::new(self.coord.get_job(&id).await?))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Ok(Response::new(
            self.coord.list_jobs(request.into_inner()).await?,
        ))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.id, "id")?;
        let job = self.coord.cancel(&req.id, &req.reason).await?;
        Ok(Response::new(CancelJobResponse { job: Some(job) }))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let req = request.into_inner();
        require_id(&req.id, "id")?;
        Ok(Response::new(self.coord.watch(&req.id, req.follow).await?))
    }

    async fn list_checkpoints(
        &self,
        request: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        let id = request.into_inner().job_id;
        require_id(&id, "job_id")?;
        let checkpoints = self.coord.list_checkpoints(&id).await?;
        Ok(Response::new(ListCheckpointsResponse { checkpoints }))
    }

    async fn list_job_types(
        &self,
        _request: Request<ListJobTypesRequest>,
    ) -> Result<Response<ListJobTypesResponse>, Status> {
        Ok(Response::new(ListJobTypesResponse {
            job_types: self.coord.list_job_types(),
        }))
    }
}
