//! The Trainyard gRPC API, package `trainyard.v1`.
//!
//! The `.proto` files live in `proto/trainyard/v1/`; this crate compiles them with
//! tonic and prost. Every role (CLI, coordinator, worker) talks through these types.

/// Generated messages, clients and servers of `trainyard.v1`.
pub mod v1 {
    tonic::include_proto!("trainyard.v1");

    /// Encoded `FileDescriptorSet` of the whole package, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("trainyard_v1_descriptor");
}

pub use v1::*;

impl JobState {
    /// True for SUCCEEDED, FAILED and CANCELLED: the job will never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Short upper-case name used by the CLI ("RUNNING").
    pub fn short_name(self) -> &'static str {
        match self {
            JobState::Unspecified => "UNSPECIFIED",
            JobState::Pending => "PENDING",
            JobState::Scheduled => "SCHEDULED",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
        }
    }

    /// Parses a state name as the CLI accepts it ("running", "RUNNING", "JOB_STATE_RUNNING").
    pub fn parse_name(s: &str) -> Option<JobState> {
        let up = s.trim().to_ascii_uppercase();
        let up = up.strip_prefix("JOB_STATE_").unwrap_or(&up);
        JobState::from_str_name(&format!("JOB_STATE_{up}")).filter(|s| *s != JobState::Unspecified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for s in [
            JobState::Pending,
            JobState::Scheduled,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(JobState::parse_name(s.short_name()), Some(s));
            assert_eq!(
                JobState::parse_name(&s.short_name().to_lowercase()),
                Some(s)
            );
        }
        assert_eq!(JobState::parse_name("bogus"), None);
        assert_eq!(JobState::parse_name("unspecified"), None);
    }

    #[test]
    fn descriptor_set_is_embedded() {
        assert!(FILE_DESCRIPTOR_SET.len() > 100);
    }
}
