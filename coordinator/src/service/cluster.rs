//! `trainyard.v1.ClusterService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use trainyard_proto::cluster_service_server::ClusterService;
use trainyard_proto::{ListWorkersRequest, ListWorkersResponse};

use crate::coordinator::Coordinator;

/// Serves `ClusterService`.
#[derive(Clone)]
pub struct ClusterApi {
    /// The coordinator.
    pub coord: Arc<Coordinator>,
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn list_workers(
        &self,
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let workers = self
            .coord
            .list_workers(request.into_inner().include_dead)
            .await?;
        Ok(Response::new(ListWorkersResponse { workers }))
    }
}
