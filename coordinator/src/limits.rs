//! Limits on what one caller can make the coordinator hold: request size, log line and
//! metric batch sizes in worker reports, and pending jobs per user. A request over a limit
//! is refused with the limit's name (`RESOURCE_EXHAUSTED` for sizes and quotas,
//! `INVALID_ARGUMENT` for a malformed report), and the coordinator goes on serving others.

use tonic::codegen::http;
use tonic::Status;
use trainyard_proto::{rank_event, RankReport};

/// The limits, with their `trainyard coordinator` flag names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request message in bytes (`--max-request-bytes`).
    pub max_request_bytes: usize,
    /// Longest log line in one worker report, in bytes (`--max-log-line-bytes`); workers
    /// cut longer lines at 64 KiB before sending.
    pub max_log_line_bytes: usize,
    /// Most events in one worker report (`--max-report-events`); workers send batches of
    /// at most 256.
    pub max_report_events: usize,
    /// Most values in one metric point (`--max-metric-values`).
    pub max_metric_values: usize,
    /// Most PENDING jobs one user may have (`--max-pending-jobs-per-user`; 0 = no cap).
    pub max_pending_jobs_per_user: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 4 * 1024 * 1024,
            max_log_line_bytes: 64 * 1024,
            max_report_events: 1024,
            max_metric_values: 1024,
            max_pending_jobs_per_user: 1000,
        }
    }
}

impl Limits {
    /// Checks a worker's report against the log line and batch limits.
    pub fn check_report(&self, report: &RankReport) -> Result<(), Status> {
        if report.events.len() > self.max_report_events {
            return Err(Status::invalid_argument(format!(
                "events: {} events in one report, over the max_report_events limit of {}",
                report.events.len(),
                self.max_report_events
            )));
        }
        for (i, event) in report.events.iter().enumerate() {
            match &event.kind {
                Some(rank_event::Kind::Log(line)) if line.line.len() > self.max_log_line_bytes => {
                    return Err(Status::invalid_argument(format!(
                        "events[{i}].log.line: {} bytes, over the max_log_line_bytes limit of {}",
                        line.line.len(),
                        self.max_log_line_bytes
                    )));
                }
                Some(rank_event::Kind::Metric(point))
                    if point.values.len() > self.max_metric_values =>
                {
                    return Err(Status::invalid_argument(format!(
                        "events[{i}].metric.values: {} values, over the max_metric_values \
                         limit of {}",
                        point.values.len(),
                        self.max_metric_values
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Why a submission over the pending-jobs cap is refused (`RESOURCE_EXHAUSTED`).
    pub fn pending_cap_error(&self, owner: &str, pending: usize) -> String {
        let who = if owner.is_empty() {
            "this coordinator's anonymous user".to_string()
        } else {
            format!("user {owner:?}")
        };
        format!(
            "{who} has {pending} pending jobs, the max_pending_jobs_per_user limit is {}; \
             wait for some to start or cancel some",
            self.max_pending_jobs_per_user
        )
    }
}

/// Rewrites tonic's refusal of an over-size request (`OUT_OF_RANGE`, "decoded message
/// length too large") as `RESOURCE_EXHAUSTED` naming `max_request_bytes`, as gRPC
/// servers conventionally answer. The refusal is a trailers-only response, so the status
/// is in the headers.
pub fn name_request_size_limit<B>(mut response: http::Response<B>) -> http::Response<B> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() != tonic::Code::OutOfRange
        || !status
            .message()
            .contains("decoded message length too large")
    {
        return response;
    }
    // tonic's text: "... found {len} bytes, the limit is: {limit} bytes".
    let number_after = |key: &str| {
        status
            .message()
            .split(key)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    let text = match (number_after("found "), number_after("limit is: ")) {
        (Some(found), Some(limit)) => format!(
            "request message of {found} bytes is over the max_request_bytes limit of {limit} bytes"
        ),
        _ => "request message is over the max_request_bytes limit".to_string(),
    };
    // add_header replaces grpc-status and grpc-message (percent-encoding the message).
    if Status::resource_exhausted(text)
        .add_header(response.headers_mut())
        .is_err()
    {
        tracing::warn!("could not rewrite an over-size refusal");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::{LogLine, MetricPoint, RankEvent};

    fn log(n: usize) -> RankEvent {
        RankEvent {
            at_unix_ms: 0,
            kind: Some(rank_event::Kind::Log(LogLine {
                rank: 0,
                stream: "stdout".into(),
                line: "x".repeat(n),
            })),
        }
    }

    #[test]
    fn reports_over_a_limit_name_it() {
        let limits = Limits {
            max_log_line_bytes: 10,
            max_report_events: 3,
            max_metric_values: 2,
            ..Limits::default()
        };
        let ok = RankReport {
            events: vec![log(10), log(1)],
            ..Default::default()
        };
        assert!(limits.check_report(&ok).is_ok());
        let long = RankReport {
            events: vec![log(1), log(11)],
            ..Default::default()
        };
        let err = limits.check_report(&long).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("max_log_line_bytes"), "{err}");
        let many = RankReport {
            events: vec![log(1); 4],
            ..Default::default()
        };
        assert!(limits
            .check_report(&many)
            .unwrap_err()
            .message()
            .contains("max_report_events"));
        let metric = RankEvent {
            at_unix_ms: 0,
            kind: Some(rank_event::Kind::Metric(MetricPoint {
                rank: 0,
                step: 1,
                values: [("a".to_string(), 1.0), ("b".into(), 2.0), ("c".into(), 3.0)].into(),
            })),
        };
        let wide = RankReport {
            events: vec![metric],
            ..Default::default()
        };
        assert!(limits
            .check_report(&wide)
            .unwrap_err()
            .message()
            .contains("max_metric_values"));
    }

    #[test]
    fn tonic_size_refusal_becomes_resource_exhausted() {
        let status = Status::out_of_range(
            "Error, decoded message length too large: found 5000 bytes, the limit is: 4096 bytes",
        );
        let response = name_request_size_limit(status.into_http::<()>());
        let back = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(back.code(), tonic::Code::ResourceExhausted);
        assert!(back.message().contains("max_request_bytes"), "{back:?}");
        assert!(back.message().contains("5000"), "{back:?}");
        let other = Status::out_of_range("page past the end").into_http::<()>();
        let back = Status::from_header_map(name_request_size_limit(other).headers()).unwrap();
        assert_eq!(back.code(), tonic::Code::OutOfRange);
    }
}
