//! `trainyard.v1.JobService`. Every call comes through the users' [`crate::auth::Guard`];
//! a job is read, watched and cancelled only by its owner or an admin.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use trainyard_proto::job_service_server::JobService;
use trainyard_proto::{
    CancelJobRequest, CancelJobResponse, GetJobRequest, Job, ListCheckpointsRequest,
    ListCheckpointsResponse, ListJobTypesRequest, ListJobTypesResponse, ListJobsRequest,
    ListJobsResponse, SubmitJobRequest, SubmitJobResponse, WatchJobRequest,
};

use crate::auth::{caller, check_job_access};
use crate::coordinator::{Coordinator, EventStream};
use crate::validate::CheckpointRef;

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

impl JobApi {
    /// The job, if the caller may read it (`PERMISSION_DENIED` otherwise).
    async fn accessible_job<T>(&self, request: &Request<T>, id: &str) -> Result<Job, Status> {
        let who = caller(request)?;
        let job = self.coord.get_job(id).await?;
        check_job_access(&who, id, &job.owner)?;
        Ok(job)
    }
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let who = caller(&request)?;
        let spec = request.into_inner().spec;
        // Resuming from a checkpoint reads another job's state: only a job the caller
        // may read.
        if let Some(from) = spec.as_ref().map(|s| s.from_checkpoint.as_str()) {
            if !from.is_empty() {
                let from = CheckpointRef::parse(from).map_err(Status::invalid_argument)?;
                if let Ok(job) = self.coord.get_job(&from.job_id).await {
                    check_job_access(&who, &from.job_id, &job.owner)?;
                }
            }
        }
        let job = self.coord.submit(spec, &who.name).await?;
        Ok(Response::new(SubmitJobResponse { job: Some(job) }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let id = request.get_ref().id.clone();
        require_id(&id, "id")?;
        Ok(Response::new(self.accessible_job(&request, &id).await?))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let who = caller(&request)?;
        let mut req = request.into_inner();
        if who.role != trainyard_auth::Role::Admin {
            if !req.owner.is_empty() && req.owner != who.name {
                return Err(Status::permission_denied(format!(
                    "owner: user {:?} may only list their own jobs (the admin role may list \
                     anyone's)",
                    who.name
                )));
            }
            req.owner = who.name;
        }
        Ok(Response::new(self.coord.list_jobs(req).await?))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let (id, reason) = (
            request.get_ref().id.clone(),
            request.get_ref().reason.clone(),
        );
        require_id(&id, "id")?;
        self.accessible_job(&request, &id).await?;
        let job = self.coord.cancel(&id, &reason).await?;
        Ok(Response::new(CancelJobResponse { job: Some(job) }))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let (id, follow) = (request.get_ref().id.clone(), request.get_ref().follow);
        require_id(&id, "id")?;
        self.accessible_job(&request, &id).await?;
        Ok(Response::new(self.coord.watch(&id, follow).await?))
    }

    async fn list_checkpoints(
        &self,
        request: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        let id = request.get_ref().job_id.clone();
        require_id(&id, "job_id")?;
        self.accessible_job(&request, &id).await?;
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
