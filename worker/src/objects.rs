//! The object store (checkpoints, later logs and results), opened from a URL: the
//! `trainyard-objects` crate, re-exported here so `trainyard_worker::objects::...` keeps
//! working. The worker opens the URL the coordinator sends in each `RankAssignment`, with
//! credentials from its own environment (they never travel over the API).

pub use trainyard_objects::*;
