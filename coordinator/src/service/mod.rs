//! The gRPC services: thin adapters from tonic requests to [`Coordinator`] operations.

mod cluster;
mod jobs;
mod workers;

pub use cluster::ClusterApi;
pub use jobs::JobApi;
pub use workers::WorkerApi;

#[cfg(test)]
mod checkpoint_tests;
#[cfg(test)]
mod ha_tests;
#[cfg(test)]
mod outage_tests;
#[cfg(test)]
mod tests;
