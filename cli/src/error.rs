//! Errors the CLI turns into exit codes: 2 for bad input (refused credentials and limits
//! included), 1 for everything else.

use std::fmt;

/// Exit code for a runtime failure (job failed, server unreachable).
pub const EXIT_FAILURE: i32 = 1;
/// Exit code for bad input (unknown job, bad `--set`, malformed spec file, rejected by the server).
pub const EXIT_BAD_INPUT: i32 = 2;

/// The user asked for something invalid; the message names the problem.
#[derive(Debug)]
pub struct BadInput(pub String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// Shorthand: an `anyhow::Error` that exits with code 2.
pub fn bad_input(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(BadInput(message.into()))
}

/// A gRPC call the coordinator answered with an error status.
#[derive(Debug)]
pub struct RpcError {
    /// The gRPC status code.
    pub code: tonic::Code,
    /// The server's message.
    pub message: String,
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            tonic::Code::Unavailable => write!(f, "coordinator unavailable: {}", self.message),
            tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::FailedPrecondition => f.write_str(&self.message),
            code => write!(f, "{} ({:?})", self.message, code),
        }
    }
}

impl std::error::Error for RpcError {}

impl From<tonic::Status> for RpcError {
    fn from(status: tonic::Status) -> Self {
        RpcError {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// Converts a gRPC status into an `anyhow::Error` that keeps its code for [`exit_code`].
pub fn rpc(status: tonic::Status) -> anyhow::Error {
    anyhow::Error::new(RpcError::from(status))
}

/// A `--devices` error message that names the flag exactly once.
pub fn devices_error(message: &str) -> String {
    if message.contains("--devices") {
        message.to_string()
    } else {
        format!("--devices: {message}")
    }
}

/// An error and its causes on one line, skipping causes whose text the line already has
/// (libraries often repeat their source in their own message).
pub fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The process exit code for an error: 2 for bad input (a coordinator configuration
/// error included), 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.downcast_ref::<BadInput>().is_some() {
            return EXIT_BAD_INPUT;
        }
        // A coordinator that cannot start because of its configuration (a bad --objects
        // URL, rejected object-store credentials, a missing bucket).
        if let Some(coord) = cause.downcast_ref::<trainyard_coordinator::CoordinatorError>() {
            if coord.is_config_error() {
                return EXIT_BAD_INPUT;
            }
        }
        if let Some(rpc) = cause.downcast_ref::<RpcError>() {
            return match rpc.code {
                tonic::Code::InvalidArgument
                | tonic::Code::NotFound
                | tonic::Code::FailedPrecondition
                | tonic::Code::AlreadyExists
                | tonic::Code::OutOfRange
                | tonic::Code::ResourceExhausted
                | tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated => EXIT_BAD_INPUT,
                _ => EXIT_FAILURE,
            };
        }
    }
    EXIT_FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_exits_2_even_with_context() {
        let e = bad_input("unknown job \"x\"").context("submitting");
        assert_eq!(exit_code(&e), EXIT_BAD_INPUT);
    }

    #[test]
    fn one_line_skips_repeated_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let e = anyhow::Error::new(io)
            .context("cannot listen: Address already in use")
            .context("starting");
        assert_eq!(
            one_line(&e),
            "starting: cannot listen: Address already in use"
        );
        assert_eq!(
            devices_error("--devices \"x\": bad"),
            "--devices \"x\": bad"
        );
        assert_eq!(devices_error("bad"), "--devices: bad");
    }

    #[test]
    fn rpc_codes_map_to_exit_codes() {
        let e = rpc(tonic::Status::invalid_argument("spec.ranks: too many"));
        assert_eq!(exit_code(&e), EXIT_BAD_INPUT);
        assert_eq!(e.to_string(), "spec.ranks: too many");
        let e = rpc(tonic::Status::not_found("job j-1 not found"));
        assert_eq!(exit_code(&e), EXIT_BAD_INPUT);
        let e = rpc(tonic::Status::permission_denied(
            "job j-1 belongs to \"bob\"",
        ));
        assert_eq!(exit_code(&e), EXIT_BAD_INPUT);
        let e = rpc(tonic::Status::unavailable("connection refused"));
        assert_eq!(exit_code(&e), EXIT_FAILURE);
        assert_eq!(exit_code(&anyhow::anyhow!("job failed")), EXIT_FAILURE);
    }

    #[test]
    fn coordinator_config_errors_exit_2() {
        use trainyard_coordinator::CoordinatorError;
        let e = anyhow::Error::new(CoordinatorError::Config("bad".into())).context("starting");
        assert_eq!(exit_code(&e), EXIT_BAD_INPUT);
        let unsupported = match trainyard_worker::objects::open_objects("ftp://host/x") {
            Err(e) => e,
            Ok(_) => panic!("ftp:// must be refused"),
        };
        let bad_url = CoordinatorError::from(unsupported);
        assert_eq!(
            exit_code(&anyhow::Error::new(bad_url).context("starting")),
            EXIT_BAD_INPUT
        );
        let e = anyhow::Error::new(CoordinatorError::Task("panicked".into()));
        assert_eq!(exit_code(&e), EXIT_FAILURE);
    }
}
