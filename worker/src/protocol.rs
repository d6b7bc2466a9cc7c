//! The rank ↔ agent protocol, used by both sides.
//!
//! * **Assignment**: the agent passes the `RankAssignment` to the rank process in the
//!   environment variable [`ASSIGNMENT_ENV`], as lower-case hex of its protobuf encoding
//!   ([`encode_assignment`] / [`decode_assignment`]).
//! * **Events**: the rank process writes one event per line on stdout, as
//!   [`EVENT_PREFIX`] (`\x1e` "record separator" + `trainyard:`) followed by a JSON
//!   [`RankMessage`]. Every other stdout or stderr line is a plain log line. Non-finite
//!   floats are written as the strings `"NaN"`, `"inf"`, `"-inf"`.

use std::collections::BTreeMap;

use prost::Message;
use trainyard_proto::{
    rank_event, Artifact, CheckpointInfo, Claim, LogLine, MetricPoint, Progress, RankAssignment,
    RendezvousEntry, ResultRow, ResultTable,
};

use crate::WorkerError;

/// Environment variable carrying the encoded [`RankAssignment`].
pub const ASSIGNMENT_ENV: &str = "TRAINYARD_ASSIGNMENT";
/// Environment variable with the rank index (informational).
pub const RANK_ENV: &str = "TRAINYARD_RANK";
/// Environment variable with the world size (informational).
pub const WORLD_SIZE_ENV: &str = "TRAINYARD_WORLD_SIZE";
/// Environment variable telling a rank which device to train on: [`DEVICE_CUDA`] when the
/// agent placed it on a real GPU (made visible as the only one, so CUDA device 0), else
/// [`DEVICE_CPU`] (CPU slots and emulated GPUs).
pub const DEVICE_ENV: &str = "TRAINYARD_DEVICE";
/// Environment variable naming the worker's data set cache folder (shared by its ranks;
/// see `trainyard_objects::datasets`).
pub const DATA_CACHE_ENV: &str = "TRAINYARD_DATA_CACHE";
/// [`DEVICE_ENV`] value of a rank on the CPU.
pub const DEVICE_CPU: &str = "cpu";
/// [`DEVICE_ENV`] value of a rank on a real GPU.
pub const DEVICE_CUDA: &str = "cuda";
/// Prefix of an event line on a rank's stdout.
pub const EVENT_PREFIX: &str = "\u{1e}trainyard:";

/// Environment variable with the host name or IP address other ranks reach this worker's
/// ranks at (the worker's `--collective-host`); a rank's TCP ring listener publishes
/// `<host>:<port>`.
pub const COLLECTIVE_HOST_ENV: &str = "TRAINYARD_COLLECTIVE_HOST";
/// First word of a rendezvous line on a rank's stdin.
pub const RENDEZVOUS_PREFIX: &str = "rendezvous";

/// The stdin line (without newline) that hands a rank one rendezvous entry:
/// `rendezvous <key> <value as hex>`.
pub fn rendezvous_line(entry: &RendezvousEntry) -> String {
    format!(
        "{RENDEZVOUS_PREFIX} {} {}",
        entry.key,
        hex::encode(&entry.value)
    )
}

/// Parses a line written by [`rendezvous_line`]; `None` for anything else.
pub fn parse_rendezvous_line(line: &str) -> Option<RendezvousEntry> {
    let mut words = line.split_whitespace();
    if words.next()? != RENDEZVOUS_PREFIX {
        return None;
    }
    let key = words.next()?.to_string();
    let value = hex::decode(words.next().unwrap_or("")).ok()?;
    if words.next().is_some() {
        return None;
    }
    Some(RendezvousEntry { key, value })
}

/// Encodes an assignment for [`ASSIGNMENT_ENV`].
pub fn encode_assignment(assignment: &RankAssignment) -> String {
    hex::encode(assignment.encode_to_vec())
}

/// Decodes the value of [`ASSIGNMENT_ENV`].
pub fn decode_assignment(value: &str) -> Result<RankAssignment, WorkerError> {
    let bytes = hex::decode(value.trim())
        .map_err(|e| WorkerError::Assignment(format!("{ASSIGNMENT_ENV} is not hex: {e}")))?;
    RankAssignment::decode(bytes.as_slice()).map_err(|e| {
        WorkerError::Assignment(format!("{ASSIGNMENT_ENV} is not a RankAssignment: {e}"))
    })
}

/// One structured event a rank reports to its agent.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RankMessage {
    /// A log line from the job's context.
    Log {
        /// The text.
        line: String,
    },
    /// Metric values at a step.
    Metric {
        /// Training step.
        step: u64,
        /// Values by name.
        #[serde(with = "float_map")]
        values: BTreeMap<String, f64>,
    },
    /// Progress of a stage.
    Progress {
        /// What is being done.
        stage: String,
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
    },
    /// A committed checkpoint (its manifest is written).
    Checkpoint {
        /// Job id.
        job_id: String,
        /// Step.
        step: u64,
        /// Folder path in the object store, `jobs/<id>/checkpoints/<step>`.
        path: String,
        /// Commit time.
        created_unix_ms: i64,
        /// Attempt that wrote it.
        attempt: u32,
        /// Metrics at the checkpoint.
        #[serde(with = "float_map")]
        metrics: BTreeMap<String, f64>,
    },
    /// A rendezvous entry for the other ranks of this attempt (see
    /// `trainyard_coordinator::rendezvous`): the coordinator pushes it to every rank of the
    /// attempt, which reads it on stdin ([`rendezvous_line`]).
    Rendezvous {
        /// Key, e.g. `ring/addr/1` or `nccl/id` (no whitespace).
        key: String,
        /// The value's bytes as lower-case hex.
        value_hex: String,
    },
    /// A file stored with the job's results (already written to the object store).
    Artifact {
        /// File name.
        name: String,
        /// Object-store path, `jobs/<id>/results/<name>`.
        path: String,
        /// Its size.
        size_bytes: u64,
    },
    /// The final results table.
    Result {
        /// Title.
        title: String,
        /// Column headers.
        columns: Vec<String>,
        /// Rows of cells.
        rows: Vec<Vec<String>>,
        /// Conclusions.
        notes: Vec<String>,
        /// The paper's claims the job checked.
        #[serde(default)]
        claims: Vec<ClaimMessage>,
    },
    /// A measurement for the worker's `/metrics` endpoint (see `crate::metrics`); the agent
    /// adds it up and does not forward it to the coordinator.
    Telemetry {
        /// What was measured.
        what: Measured,
        /// Seconds the `count` operations took in all.
        seconds: f64,
        /// Bytes they moved in all.
        bytes: u64,
        /// Operations measured.
        count: u64,
    },
}

/// What a [`RankMessage::Telemetry`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measured {
    /// `save_checkpoint`: the time the job was blocked, the checkpoint's bytes.
    CheckpointSave,
    /// A checkpoint upload, from queued to committed (retries included).
    CheckpointUpload,
    /// All-reduce collectives: time in them, bytes of the buffers reduced.
    AllReduce,
}

/// A checked claim in a [`RankMessage::Result`] (see `trainyard_proto::Claim`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClaimMessage {
    /// Experiment within the job.
    pub experiment: String,
    /// The claim in words.
    pub claim: String,
    /// The paper's number(s).
    pub paper: String,
    /// Our treatment's number.
    pub treatment: String,
    /// Our baseline's number.
    pub baseline: String,
    /// Whether it held.
    pub held: bool,
    /// The number behind `treatment`, in `unit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub treatment_value: Option<f64>,
    /// The number behind `baseline`, in `unit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_value: Option<f64>,
    /// Unit of the values.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
}

impl From<&trainyard_jobs::Claim> for ClaimMessage {
    fn from(c: &trainyard_jobs::Claim) -> Self {
        Self {
            experiment: c.experiment.clone(),
            claim: c.claim.clone(),
            paper: c.paper.clone(),
            treatment: c.treatment.clone(),
            baseline: c.baseline.clone(),
            held: c.held,
            treatment_value: finite(c.treatment_value),
            baseline_value: finite(c.baseline_value),
            unit: c.unit.clone(),
        }
    }
}

/// `v` if it is a finite number (JSON has no NaN or infinity).
fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|v| v.is_finite())
}

impl From<ClaimMessage> for Claim {
    fn from(c: ClaimMessage) -> Self {
        Claim {
            experiment: c.experiment,
            claim: c.claim,
            paper: c.paper,
            treatment: c.treatment,
            baseline: c.baseline,
            held: c.held,
            treatment_value: c.treatment_value,
            baseline_value: c.baseline_value,
            unit: c.unit,
        }
    }
}

impl RankMessage {
    /// The event line for this message (without the trailing newline).
    pub fn to_line(&self) -> String {
        // Serialising this enum cannot fail: every key is a string and floats are handled.
        let json = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                r#"{{"type":"log","line":"unencodable event: {}"}}"#,
                e.to_string().replace('"', "'")
            )
        });
        format!("{EVENT_PREFIX}{json}")
    }

    /// The protobuf event kind for rank `rank`; `None` for [`RankMessage::Telemetry`],
    /// which stays on the worker.
    pub fn into_event_kind(self, rank: u32) -> Option<rank_event::Kind> {
        Some(match self {
            RankMessage::Log { line } => rank_event::Kind::Log(LogLine {
                rank,
                stream: "stdout".into(),
                line,
            }),
            RankMessage::Metric { step, values } => rank_event::Kind::Metric(MetricPoint {
                rank,
                step,
                values: values.into_iter().collect(),
            }),
            RankMessage::Progress { stage, done, total } => rank_event::Kind::Progress(Progress {
                rank,
                stage,
                done,
                total,
            }),
            RankMessage::Checkpoint {
                job_id,
                step,
                path,
                created_unix_ms,
                attempt,
                metrics,
            } => rank_event::Kind::Checkpoint(CheckpointInfo {
                job_id,
                step,
                path,
                created_unix_ms,
                attempt,
                metrics: metrics.into_iter().collect(),
            }),
            RankMessage::Artifact {
                name,
                path,
                size_bytes,
            } => rank_event::Kind::Artifact(Artifact {
                name,
                path,
                size_bytes,
                ..Default::default()
            }),
            RankMessage::Rendezvous { key, value_hex } => match hex::decode(&value_hex) {
                Ok(value) => rank_event::Kind::Rendezvous(RendezvousEntry { key, value }),
                Err(e) => rank_event::Kind::Log(LogLine {
                    rank,
                    stream: "stderr".into(),
                    line: format!("[trainyard worker] bad rendezvous entry {key:?}: {e}"),
                }),
            },
            RankMessage::Result {
                title,
                columns,
                rows,
                notes,
                claims,
            } => rank_event::Kind::Result(ResultTable {
                claims: claims.into_iter().map(Claim::from).collect(),
                title,
                columns,
                rows: rows.into_iter().map(|cells| ResultRow { cells }).collect(),
                notes,
            }),
            RankMessage::Telemetry { .. } => return None,
        })
    }
}

/// What one line of a rank's stdout is.
#[derive(Debug, Clone, PartialEq)]
pub enum ParsedLine {
    /// A structured event.
    Event(RankMessage),
    /// A plain log line.
    Log(String),
}

/// Parses one line of a rank's stdout (without the newline) into what it holds: usually one
/// item; two when a library printed text without a newline just before an event line (the
/// text is a log line, the event follows).
pub fn split_line(line: &str) -> Vec<ParsedLine> {
    match line.find(EVENT_PREFIX) {
        Some(i) if i > 0 => vec![
            ParsedLine::Log(line[..i].to_string()),
            parse_line(&line[i..]),
        ],
        _ => vec![parse_line(line)],
    }
}

/// Parses one line of a rank's stdout (without the newline) that is either a plain log
/// line or starts with the event prefix. A line with the event prefix whose JSON cannot be
/// decoded is kept as a log line, so nothing is lost.
pub fn parse_line(line: &str) -> ParsedLine {
    match line.strip_prefix(EVENT_PREFIX) {
        Some(json) => match serde_json::from_str::<RankMessage>(json) {
            Ok(msg) => ParsedLine::Event(msg),
            Err(e) => {
                tracing::warn!(error = %e, "undecodable event line from rank; kept as a log line");
                ParsedLine::Log(json.to_string())
            }
        },
        None => ParsedLine::Log(line.to_string()),
    }
}

/// Serde for `BTreeMap<String, f64>` that survives NaN and infinities (JSON has neither):
/// finite values are numbers, the others the strings `"NaN"`, `"inf"`, `"-inf"`.
pub mod float_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum F {
        Num(f64),
        Str(String),
    }

    /// Serialises the map.
    pub fn serialize<S: Serializer>(map: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
        let m: BTreeMap<&str, F> = map
            .iter()
            .map(|(k, v)| {
                let f = if v.is_finite() {
                    F::Num(*v)
                } else if v.is_nan() {
                    F::Str("NaN".into())
                } else if *v > 0.0 {
                    F::Str("inf".into())
                } else {
                    F::Str("-inf".into())
                };
                (k.as_str(), f)
            })
            .collect();
        m.serialize(s)
    }

    /// Deserialises the map.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
        let m = BTreeMap::<String, F>::deserialize(d)?;
        m.into_iter()
            .map(|(k, f)| {
                let v = match f {
                    F::Num(v) => v,
                    F::Str(s) => match s.as_str() {
                        "NaN" => f64::NAN,
                        "inf" => f64::INFINITY,
                        "-inf" => f64::NEG_INFINITY,
                        other => {
                            return Err(serde::de::Error::custom(format!(
                                "metric {k}: {other:?} is not a number"
                            )))
                        }
                    },
                };
                Ok((k, v))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::RankPlacement;

    #[test]
    fn rendezvous_lines_round_trip_and_reject_junk() {
        let e = RendezvousEntry {
            key: "nccl/id".into(),
            value: vec![0, 1, 254, 255],
        };
        let line = rendezvous_line(&e);
        assert_eq!(line, "rendezvous nccl/id 0001feff");
        assert_eq!(parse_rendezvous_line(&line), Some(e));
        let empty = RendezvousEntry {
            key: "k".into(),
            value: vec![],
        };
        assert_eq!(parse_rendezvous_line(&rendezvous_line(&empty)), Some(empty));
        assert_eq!(parse_rendezvous_line("hello world"), None);
        assert_eq!(parse_rendezvous_line("rendezvous k zz"), None);
        assert_eq!(parse_rendezvous_line("rendezvous k 00 extra"), None);
        assert_eq!(parse_rendezvous_line("rendezvous"), None);
        // The event a rank publishes becomes a rendezvous rank event.
        let msg = RankMessage::Rendezvous {
            key: "ring/addr/1".into(),
            value_hex: hex::encode("127.0.0.1:9"),
        };
        let ParsedLine::Event(parsed) = parse_line(&msg.to_line()) else {
            panic!("not an event");
        };
        assert_eq!(
            parsed.into_event_kind(1),
            Some(rank_event::Kind::Rendezvous(RendezvousEntry {
                key: "ring/addr/1".into(),
                value: b"127.0.0.1:9".to_vec()
            }))
        );
    }

    #[test]
    fn assignment_round_trip() {
        let a = RankAssignment {
            job_id: "j-1".into(),
            attempt: 3,
            rank: 1,
            world_size: 2,
            job: "neural-ode".into(),
            config_json: r#"{"preset":"quick","values":{"lr":0.1}}"#.into(),
            objects_url: "file:///tmp/o".into(),
            resume_from: Some(CheckpointInfo {
                job_id: "j-1".into(),
                step: 40,
                path: "jobs/j-1/checkpoints/40".into(),
                created_unix_ms: 17,
                attempt: 2,
                metrics: [("acc".to_string(), 0.9)].into_iter().collect(),
            }),
            device_index: 5,
            device_kind: "gpu".into(),
            grace_period_s: 3,
            peers: vec![RankPlacement {
                rank: 0,
                worker_id: "w".into(),
                device_index: 0,
            }],
            leader_term: 7,
            checkpoint_policy: Some(trainyard_proto::CheckpointPolicy {
                keep_latest: 2,
                commit_timeout_s: 60,
                ..Default::default()
            }),
        };
        let enc = encode_assignment(&a);
        assert!(enc.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(decode_assignment(&enc).unwrap(), a);
        assert!(decode_assignment("zz").is_err());
        assert!(decode_assignment("ffff").is_err());
    }

    #[test]
    fn event_lines_round_trip() {
        let msgs = vec![
            RankMessage::Log {
                line: "multi\nline \u{1e} \"quoted\"".into(),
            },
            RankMessage::Metric {
                step: 7,
                values: [
                    ("loss".to_string(), 0.5),
                    ("bad".to_string(), f64::INFINITY),
                ]
                .into_iter()
                .collect(),
            },
            RankMessage::Progress {
                stage: "epoch 1/2".into(),
                done: 3,
                total: 10,
            },
            RankMessage::Checkpoint {
                job_id: "j".into(),
                step: 4,
                path: "jobs/j/checkpoints/4".into(),
                created_unix_ms: 99,
                attempt: 1,
                metrics: BTreeMap::new(),
            },
            RankMessage::Result {
                title: "T".into(),
                columns: vec!["a".into(), "b".into()],
                rows: vec![vec!["1".into(), "2".into()]],
                notes: vec!["held".into()],
                claims: vec![ClaimMessage {
                    experiment: "mnist".into(),
                    claim: "c".into(),
                    held: true,
                    ..Default::default()
                }],
            },
        ];
        for m in msgs {
            let line = m.to_line();
            assert!(!line.contains('\n'), "{line:?}");
            assert_eq!(parse_line(&line), ParsedLine::Event(m.clone()));
        }
        let nan = RankMessage::Metric {
            step: 1,
            values: [("x".to_string(), f64::NAN)].into_iter().collect(),
        };
        match parse_line(&nan.to_line()) {
            ParsedLine::Event(RankMessage::Metric { values, .. }) => assert!(values["x"].is_nan()),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_line("plain text"),
            ParsedLine::Log("plain text".into())
        );
        // text printed without a newline before an event
        let glued = format!(
            "progress... {}",
            RankMessage::Log { line: "x".into() }.to_line()
        );
        assert_eq!(
            split_line(&glued),
            vec![
                ParsedLine::Log("progress... ".into()),
                ParsedLine::Event(RankMessage::Log { line: "x".into() })
            ]
        );
        assert_eq!(split_line("plain"), vec![ParsedLine::Log("plain".into())]);
        let broken = format!("{EVENT_PREFIX}{{oops");
        assert_eq!(parse_line(&broken), ParsedLine::Log("{oops".into()));
    }

    #[test]
    fn events_become_proto_kinds() {
        let k = RankMessage::Result {
            title: "T".into(),
            columns: vec!["a".into()],
            rows: vec![vec!["1".into()]],
            notes: vec![],
            claims: vec![ClaimMessage {
                claim: "c".into(),
                held: true,
                ..Default::default()
            }],
        }
        .into_event_kind(2);
        match k {
            Some(rank_event::Kind::Result(t)) => {
                assert_eq!(t.rows[0].cells, vec!["1".to_string()]);
                assert!(t.claims[0].held && t.claims[0].claim == "c");
            }
            other => panic!("{other:?}"),
        }
        match (RankMessage::Log { line: "x".into() }).into_event_kind(4) {
            Some(rank_event::Kind::Log(l)) => {
                assert_eq!((l.rank, l.stream.as_str()), (4, "stdout"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn telemetry_round_trips_and_stays_on_the_worker() {
        let msg = RankMessage::Telemetry {
            what: Measured::AllReduce,
            seconds: 0.25,
            bytes: 1 << 20,
            count: 3,
        };
        let line = msg.to_line();
        assert!(
            line.contains(r#""type":"telemetry","what":"all_reduce""#),
            "{line}"
        );
        assert_eq!(parse_line(&line), ParsedLine::Event(msg.clone()));
        assert_eq!(msg.into_event_kind(0), None);
    }
}
