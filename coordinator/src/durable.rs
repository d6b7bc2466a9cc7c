//! Durable job history in the object store: each job's log lines and metric points, and its
//! final results table, so that `trainyard logs` and `trainyard describe` work after the
//! worker that ran the job is gone and after a coordinator restart.
//!
//! # Layout and format (format 1)
//!
//! Under the object store's prefix:
//!
//! ```text
//! jobs/<job-id>/logs/<seq:010>.jsonl       log lines, in chunks; seq 0, 1, 2, ... in order
//! jobs/<job-id>/metrics/<seq:010>.jsonl    metric points, in chunks, numbered the same way
//! jobs/<job-id>/results.json               the final results table, written after the last chunks
//! ```
//!
//! A chunk is UTF-8 JSON Lines, one record per line, in the order the leader received them;
//! chunks are read in `seq` order. A log record:
//!
//! ```json
//! {"history":"5f0c2a9e41d7b3c8","n":17,"at_unix_ms":1700000000123,"rank":0,"stream":"stdout","line":"epoch 1: loss 0.31"}
//! ```
//!
//! A metric record (non-finite values are the strings `"NaN"`, `"inf"`, `"-inf"`):
//!
//! ```json
//! {"history":"5f0c2a9e41d7b3c8","n":18,"at_unix_ms":1700000000125,"rank":0,"step":120,"values":{"odenet/train_loss":0.31}}
//! ```
//!
//! `history` names the in-memory history (one per coordinator process and job) that wrote
//! the record and `n` is the record's position in it, so a leader that still holds some of
//! a job's events in memory can merge them with the chunks without showing anything twice.
//! Readers ignore unknown fields and skip (and count) lines that do not parse. `results.json`
//! is `{"format_version":1,"job_id":...,"title":...,"columns":[...],"rows":[[...]],"notes":[...]}`.
//!
//! # Writing
//!
//! The leader hands every record to a [`Sink`] (a channel: a rank report never waits for
//! the object store). A background task buffers each job's records and writes a chunk
//! every [`DurableOptions::flush_interval`] while it holds anything, at once when it reaches
//! [`DurableOptions::chunk_bytes`], and everything when the job ends (then `results.json`).
//! A failed write is retried with exponential backoff and jitter (logged at `warn`); while
//! the store fails a job buffers at most [`DurableOptions::max_pending_bytes`], dropping its
//! oldest chunks beyond that (logged). On its first write for a job, a process continues
//! after the highest `seq` it finds. A coordinator that steps down discards what it has not
//! written yet (a deposed leader writes nothing, as with the store fence); a graceful
//! shutdown writes everything first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use trainyard_objects::{Objects, ObjectsError};
use trainyard_proto::{job_event, Claim, JobEvent, LogLine, MetricPoint, ResultRow, ResultTable};

/// Version of the chunk and results format written by this build.
pub const FORMAT_VERSION: u32 = 1;

/// `jobs/<job-id>/logs`: the folder of a job's log chunks.
pub fn logs_dir(job_id: &str) -> String {
    format!("jobs/{job_id}/logs")
}

/// `jobs/<job-id>/metrics`: the folder of a job's metric chunks.
pub fn metrics_dir(job_id: &str) -> String {
    format!("jobs/{job_id}/metrics")
}

/// `<dir>/<seq:010>.jsonl`: one chunk.
pub fn chunk_path(dir: &str, seq: u64) -> String {
    format!("{dir}/{seq:010}.jsonl")
}

/// `jobs/<job-id>/results.json`: a job's final results table.
pub fn results_path(job_id: &str) -> String {
    format!("jobs/{job_id}/results.json")
}

/// The `seq` of a chunk's object path (`.../0000000012.jsonl` -> 12), if it is one.
pub fn chunk_seq(path: &str) -> Option<u64> {
    let name = path.rsplit('/').next()?;
    let digits = name.strip_suffix(".jsonl")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A new history id: 16 random hex digits.
pub fn new_history_id() -> String {
    format!("{:016x}", uuid::Uuid::new_v4().as_u128() as u64)
}

/// One log line of a job, as stored in a log chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The in-memory history that wrote it.
    pub history: String,
    /// Its position in that history.
    pub n: u64,
    /// When the rank emitted it.
    pub at_unix_ms: i64,
    /// The rank.
    pub rank: u32,
    /// `stdout` or `stderr`.
    #[serde(default)]
    pub stream: String,
    /// The line.
    pub line: String,
}

/// One metric point of a job, as stored in a metric chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    /// The in-memory history that wrote it.
    pub history: String,
    /// Its position in that history.
    pub n: u64,
    /// When the rank emitted it.
    pub at_unix_ms: i64,
    /// The rank.
    pub rank: u32,
    /// The training step.
    pub step: u64,
    /// Metric values by name (non-finite values as the strings "NaN", "inf", "-inf").
    #[serde(with = "float_map")]
    pub values: BTreeMap<String, f64>,
}

/// A record of either kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A log line.
    Log(LogRecord),
    /// A metric point.
    Metric(MetricRecord),
}

impl Record {
    /// A log record of history `history` at position `n`.
    pub fn log(history: &str, n: u64, at_unix_ms: i64, l: &LogLine) -> Record {
        Record::Log(LogRecord {
            history: history.to_string(),
            n,
            at_unix_ms,
            rank: l.rank,
            stream: l.stream.clone(),
            line: l.line.clone(),
        })
    }

    /// A metric record of history `history` at position `n`.
    pub fn metric(history: &str, n: u64, at_unix_ms: i64, m: &MetricPoint) -> Record {
        Record::Metric(MetricRecord {
            history: history.to_string(),
            n,
            at_unix_ms,
            rank: m.rank,
            step: m.step,
            values: m.values.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        })
    }

    /// The history that wrote it.
    pub fn history(&self) -> &str {
        match self {
            Record::Log(r) => &r.history,
            Record::Metric(r) => &r.history,
        }
    }

    /// Its position in that history.
    pub fn n(&self) -> u64 {
        match self {
            Record::Log(r) => r.n,
            Record::Metric(r) => r.n,
        }
    }

    /// One JSON line, with its trailing newline.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = match self {
            Record::Log(r) => serde_json::to_vec(r),
            Record::Metric(r) => serde_json::to_vec(r),
        }
        // Serialising these plain structs cannot fail (string keys, no non-finite floats).
        .unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// The job event it came from (with `seq` 0: watches number their events).
    pub fn to_event(&self) -> JobEvent {
        match self {
            Record::Log(r) => JobEvent {
                seq: 0,
                at_unix_ms: r.at_unix_ms,
                kind: Some(job_event::Kind::Log(LogLine {
                    rank: r.rank,
                    stream: r.stream.clone(),
                    line: r.line.clone(),
                })),
            },
            Record::Metric(r) => JobEvent {
                seq: 0,
                at_unix_ms: r.at_unix_ms,
                kind: Some(job_event::Kind::Metric(MetricPoint {
                    rank: r.rank,
                    step: r.step,
                    values: r.values.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                })),
            },
        }
    }
}

/// Parses a chunk: its records in order and how many lines did not parse.
pub fn parse_chunk<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> (Vec<T>, usize) {
    let mut out = Vec::new();
    let mut bad = 0;
    for line in bytes.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<T>(line) {
            Ok(r) => out.push(r),
            Err(_) => bad += 1,
        }
    }
    (out, bad)
}

/// The `results.json` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ResultsFile {
    format_version: u32,
    job_id: String,
    title: String,
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
    #[serde(default)]
    notes: Vec<String>,
    #[serde(default)]
    claims: Vec<ClaimFile>,
}

/// A checked claim in `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ClaimFile {
    experiment: String,
    claim: String,
    paper: String,
    treatment: String,
    baseline: String,
    held: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    treatment_value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    baseline_value: Option<f64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    unit: String,
}

impl From<&Claim> for ClaimFile {
    fn from(c: &Claim) -> Self {
        Self {
            experiment: c.experiment.clone(),
            claim: c.claim.clone(),
            paper: c.paper.clone(),
            treatment: c.treatment.clone(),
            baseline: c.baseline.clone(),
            held: c.held,
            treatment_value: c.treatment_value.filter(|v| v.is_finite()),
            baseline_value: c.baseline_value.filter(|v| v.is_finite()),
            unit: c.unit.clone(),
        }
    }
}

impl From<ClaimFile> for Claim {
    fn from(c: ClaimFile) -> Self {
        Self {
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

/// The `results.json` bytes of a job's results table.
pub fn results_json(job_id: &str, table: &ResultTable) -> Vec<u8> {
    let file = ResultsFile {
        format_version: FORMAT_VERSION,
        job_id: job_id.to_string(),
        title: table.title.clone(),
        columns: table.columns.clone(),
        rows: table.rows.iter().map(|r| r.cells.clone()).collect(),
        notes: table.notes.clone(),
        claims: table.claims.iter().map(ClaimFile::from).collect(),
    };
    let mut out = serde_json::to_vec_pretty(&file).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Parses `results.json`.
pub fn parse_results(bytes: &[u8]) -> Result<ResultTable, String> {
    let file: ResultsFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(ResultTable {
        title: file.title,
        columns: file.columns,
        rows: file
            .rows
            .into_iter()
            .map(|cells| ResultRow { cells })
            .collect(),
        notes: file.notes,
        claims: file.claims.into_iter().map(Claim::from).collect(),
    })
}

/// Serde of a metric map whose non-finite values are strings ("NaN", "inf", "-inf").
mod float_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(f64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(map: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
        let out: BTreeMap<&str, Value> = map
            .iter()
            .map(|(k, v)| {
                let v = if v.is_finite() {
                    Value::Number(*v)
                } else if v.is_nan() {
                    Value::Text("NaN".into())
                } else if *v > 0.0 {
                    Value::Text("inf".into())
                } else {
                    Value::Text("-inf".into())
                };
                (k.as_str(), v)
            })
            .collect();
        out.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
        let raw = BTreeMap::<String, Value>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Number(n) => n,
                    Value::Text(t) => match t.as_str() {
                        "NaN" | "nan" => f64::NAN,
                        "inf" | "+inf" | "Infinity" => f64::INFINITY,
                        "-inf" | "-Infinity" => f64::NEG_INFINITY,
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

/// A job's durable history as read back from the object store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredHistory {
    /// Log records in order.
    pub logs: Vec<LogRecord>,
    /// Metric records in order.
    pub metrics: Vec<MetricRecord>,
    /// Lines that did not parse (skipped).
    pub bad_lines: usize,
}

/// How many chunks are read at the same time.
const READ_CONCURRENCY: usize = 8;

/// The chunks under `dir`, by seq.
async fn list_chunks(objects: &Objects, dir: &str) -> Result<Vec<(u64, String)>, ObjectsError> {
    let mut chunks: Vec<(u64, String)> = objects
        .list(dir)
        .await?
        .into_iter()
        .filter_map(|o| chunk_seq(&o.path).map(|seq| (seq, o.path)))
        .collect();
    chunks.sort();
    Ok(chunks)
}

async fn read_stream<T: serde::de::DeserializeOwned>(
    objects: &Objects,
    dir: &str,
) -> Result<(Vec<T>, usize), ObjectsError> {
    let chunks = list_chunks(objects, dir).await?;
    let mut reads = futures::stream::iter(
        chunks
            .into_iter()
            .map(|(_, path)| async move { objects.get(&path).await.map(|o| (path, o)) }),
    )
    .buffered(READ_CONCURRENCY);
    let mut out = Vec::new();
    let mut bad = 0;
    while let Some(read) = reads.next().await {
        let (path, got) = read?;
        // A chunk listed a moment ago and gone now was deleted with the job: skip it.
        let Some(got) = got else { continue };
        let (records, b) = parse_chunk::<T>(&got.bytes);
        if b > 0 {
            tracing::warn!(chunk = %path, lines = b, "skipping history lines that do not parse");
        }
        bad += b;
        out.extend(records);
    }
    Ok((out, bad))
}

/// Reads a job's log and metric chunks back, each in order.
pub async fn read_history(objects: &Objects, job_id: &str) -> Result<StoredHistory, ObjectsError> {
    let (logs, metrics) = futures::future::join(
        read_stream::<LogRecord>(objects, &logs_dir(job_id)),
        read_stream::<MetricRecord>(objects, &metrics_dir(job_id)),
    )
    .await;
    let (logs, bad_logs) = logs?;
    let (metrics, bad_metrics) = metrics?;
    Ok(StoredHistory {
        logs,
        metrics,
        bad_lines: bad_logs + bad_metrics,
    })
}

/// Reads a job's `results.json`; `Ok(None)` if there is none (or it does not parse, logged).
pub async fn read_results(
    objects: &Objects,
    job_id: &str,
) -> Result<Option<ResultTable>, ObjectsError> {
    let path = results_path(job_id);
    let Some(got) = objects.get(&path).await? else {
        return Ok(None);
    };
    match parse_results(&got.bytes) {
        Ok(t) => Ok(Some(t)),
        Err(e) => {
            tracing::warn!(%path, error = %e, "results.json does not parse; ignoring it");
            Ok(None)
        }
    }
}

/// Tuning of the durable history writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableOptions {
    /// A job's open chunk is written when it is this old (default 3 s).
    pub flush_interval: Duration,
    /// A chunk is written at once when it holds this many bytes (default 1 MiB).
    pub chunk_bytes: usize,
    /// Most unwritten bytes kept per job while the store fails (default 64 MiB).
    pub max_pending_bytes: usize,
    /// First retry delay after a failed write (default 1 s; doubles, with jitter).
    pub retry_min: Duration,
    /// Longest retry delay (default 60 s).
    pub retry_max: Duration,
}

impl Default for DurableOptions {
    fn default() -> Self {
        DurableOptions {
            flush_interval: Duration::from_secs(3),
            chunk_bytes: 1 << 20,
            max_pending_bytes: 64 << 20,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

enum Msg {
    Record(String, Record),
    Result(String, String, ResultTable),
    Finished(String),
    DiscardAll,
    Flush(oneshot::Sender<()>),
}

/// Records durably written (or given up) per (job, history).
type Progress = Arc<Mutex<HashMap<(String, String), u64>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The leader's handle on the durable history writer: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct Sink {
    tx: mpsc::UnboundedSender<Msg>,
    progress: Progress,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Record(j, _) => write!(f, "Record({j})"),
            Msg::Result(j, _, _) => write!(f, "Result({j})"),
            Msg::Finished(j) => write!(f, "Finished({j})"),
            Msg::DiscardAll => write!(f, "DiscardAll"),
            Msg::Flush(_) => write!(f, "Flush"),
        }
    }
}

impl Sink {
    /// Starts the writer task on `objects`; it ends when every [`Sink`] is dropped.
    pub fn start(objects: Objects, options: DurableOptions) -> (Sink, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let progress: Progress = Arc::default();
        let task = tokio::spawn(run(objects, rx, progress.clone(), options));
        (Sink { tx, progress }, task)
    }

    fn send(&self, msg: Msg) {
        if self.tx.send(msg).is_err() {
            tracing::debug!("durable history writer stopped; record not written");
        }
    }

    /// Queues one record of `job_id`.
    pub fn record(&self, job_id: &str, record: Record) {
        self.send(Msg::Record(job_id.to_string(), record));
    }

    /// Queues a job's results table (written as `results.json` once the job has ended and
    /// its chunks are written). Counts as one record of `history`.
    pub fn result(&self, job_id: &str, history: &str, table: ResultTable) {
        self.send(Msg::Result(job_id.to_string(), history.to_string(), table));
    }

    /// The job ended: write everything it has now, then its results.
    pub fn finished(&self, job_id: &str) {
        self.send(Msg::Finished(job_id.to_string()));
    }

    /// Drops everything not written yet and cancels writes in flight (on stepping down).
    pub fn discard_all(&self) {
        self.send(Msg::DiscardAll);
    }

    /// Writes everything buffered now (retrying failures once more at once); returns when
    /// done or after `limit`. Whether everything was written.
    pub async fn flush(&self, limit: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Flush(tx));
        matches!(tokio::time::timeout(limit, rx).await, Ok(Ok(())))
    }

    /// How many records of `history` of `job_id` are written (or were given up).
    pub fn written(&self, job_id: &str, history: &str) -> u64 {
        lock(&self.progress)
            .get(&(job_id.to_string(), history.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Forgets the progress of a job (once its entry is evicted).
    pub fn forget(&self, job_id: &str) {
        lock(&self.progress).retain(|(j, _), _| j != job_id);
    }
}

/// A written-or-not chunk: its bytes, the history its records belong to and how many.
#[derive(Debug, Clone)]
struct Chunk {
    bytes: Bytes,
    history: String,
    records: u64,
}

/// One stream (logs or metrics) of one job.
#[derive(Debug)]
struct StreamBuf {
    dir: String,
    open: Vec<u8>,
    open_history: String,
    open_records: u64,
    opened_at: Option<Instant>,
    sealed: VecDeque<Chunk>,
    next_seq: Option<u64>,
}

impl StreamBuf {
    fn new(dir: String) -> Self {
        StreamBuf {
            dir,
            open: Vec::new(),
            open_history: String::new(),
            open_records: 0,
            opened_at: None,
            sealed: VecDeque::new(),
            next_seq: None,
        }
    }

    fn seal(&mut self) {
        if self.open_records == 0 {
            return;
        }
        self.sealed.push_back(Chunk {
            bytes: Bytes::from(std::mem::take(&mut self.open)),
            history: std::mem::take(&mut self.open_history),
            records: self.open_records,
        });
        self.open_records = 0;
        self.opened_at = None;
    }

    fn push(&mut self, record: &Record, chunk_bytes: usize) {
        if self.open_records > 0 && self.open_history != record.history() {
            // Chunks hold one history's records (progress is counted per history).
            self.seal();
        }
        if self.open_records == 0 {
            self.open_history = record.history().to_string();
            self.opened_at = Some(Instant::now());
        }
        self.open.extend_from_slice(&record.to_line());
        self.open_records += 1;
        if self.open.len() >= chunk_bytes {
            self.seal();
        }
    }

    fn pending_bytes(&self) -> usize {
        self.open.len() + self.sealed.iter().map(|c| c.bytes.len()).sum::<usize>()
    }

    fn is_empty(&self) -> bool {
        self.open_records == 0 && self.sealed.is_empty()
    }
}

/// Everything the writer holds for one job.
#[derive(Debug)]
struct JobBuf {
    logs: StreamBuf,
    metrics: StreamBuf,
    result: Option<(String, Bytes)>,
    finished: bool,
    in_flight: bool,
    failures: u32,
    retry_at: Option<Instant>,
}

impl JobBuf {
    fn new(job_id: &str) -> Self {
        JobBuf {
            logs: StreamBuf::new(logs_dir(job_id)),
            metrics: StreamBuf::new(metrics_dir(job_id)),
            result: None,
            finished: false,
            in_flight: false,
            failures: 0,
            retry_at: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.logs.is_empty() && self.metrics.is_empty() && self.result.is_none()
    }

    /// Seals what is due and says whether a write should start now.
    fn due(&mut self, now: Instant, options: &DurableOptions, flushing: bool) -> bool {
        if self.in_flight || self.retry_at.is_some_and(|t| t > now) {
            return false;
        }
        for s in [&mut self.logs, &mut self.metrics] {
            let old = s
                .opened_at
                .is_some_and(|t| now.duration_since(t) >= options.flush_interval);
            if old || self.finished || flushing {
                s.seal();
            }
        }
        !self.logs.sealed.is_empty()
            || !self.metrics.sealed.is_empty()
            || (self.finished && self.result.is_some())
    }
}

#[derive(Debug)]
struct StreamWork {
    dir: String,
    next_seq: Option<u64>,
    chunks: Vec<Bytes>,
}

#[derive(Debug, Default)]
struct StreamOutcome {
    next_seq: Option<u64>,
    written: usize,
}

#[derive(Debug)]
struct Outcome {
    logs: StreamOutcome,
    metrics: StreamOutcome,
    result_written: bool,
    error: Option<ObjectsError>,
}

/// The highest chunk seq under `dir` plus one (0 when there is none).
async fn next_free_seq(objects: &Objects, dir: &str) -> Result<u64, ObjectsError> {
    Ok(list_chunks(objects, dir)
        .await?
        .last()
        .map(|(seq, _)| seq + 1)
        .unwrap_or(0))
}

async fn write_stream(
    objects: &Objects,
    work: StreamWork,
) -> (StreamOutcome, Option<ObjectsError>) {
    let mut out = StreamOutcome {
        next_seq: work.next_seq,
        written: 0,
    };
    if work.chunks.is_empty() {
        return (out, None);
    }
    let mut seq = match work.next_seq {
        Some(s) => s,
        None => match next_free_seq(objects, &work.dir).await {
            Ok(s) => s,
            Err(e) => return (out, Some(e)),
        },
    };
    out.next_seq = Some(seq);
    for chunk in work.chunks {
        if let Err(e) = objects.put(&chunk_path(&work.dir, seq), chunk).await {
            return (out, Some(e));
        }
        seq += 1;
        out.written += 1;
        out.next_seq = Some(seq);
    }
    (out, None)
}

async fn write_job(
    objects: Objects,
    logs: StreamWork,
    metrics: StreamWork,
    result: Option<(String, Bytes)>,
) -> Outcome {
    let (logs, metrics) = futures::future::join(
        write_stream(&objects, logs),
        write_stream(&objects, metrics),
    )
    .await;
    let error = logs.1.or(metrics.1);
    let mut result_written = false;
    if error.is_none() {
        if let Some((job_id, bytes)) = result {
            match objects.put(&results_path(&job_id), bytes).await {
                Ok(_) => result_written = true,
                Err(e) => {
                    return Outcome {
                        logs: logs.0,
                        metrics: metrics.0,
                        result_written,
                        error: Some(e),
                    }
                }
            }
        }
    }
    Outcome {
        logs: logs.0,
        metrics: metrics.0,
        result_written,
        error,
    }
}

fn backoff(options: &DurableOptions, failures: u32) -> Duration {
    let exp = options
        .retry_min
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(options.retry_max);
    // Jitter: 50% to 100% of the delay.
    let jitter = (uuid::Uuid::new_v4().as_u128() % 1000) as u32;
    exp.mul_f64(0.5 + f64::from(jitter) / 2000.0)
}

type Writes = FuturesUnordered<futures::future::BoxFuture<'static, (String, Outcome)>>;

struct Writer {
    objects: Objects,
    options: DurableOptions,
    progress: Progress,
    jobs: HashMap<String, JobBuf>,
    writes: Writes,
    waiters: Vec<oneshot::Sender<()>>,
}

impl Writer {
    fn add_progress(&self, job_id: &str, history: &str, records: u64) {
        *lock(&self.progress)
            .entry((job_id.to_string(), history.to_string()))
            .or_default() += records;
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Record(job_id, record) => {
                let chunk_bytes = self.options.chunk_bytes;
                let jb = self
                    .jobs
                    .entry(job_id.clone())
                    .or_insert_with(|| JobBuf::new(&job_id));
                match &record {
                    Record::Log(_) => jb.logs.push(&record, chunk_bytes),
                    Record::Metric(_) => jb.metrics.push(&record, chunk_bytes),
                }
                self.bound(&job_id);
            }
            Msg::Result(job_id, history, table) => {
                let bytes = Bytes::from(results_json(&job_id, &table));
                let jb = self
                    .jobs
                    .entry(job_id.clone())
                    .or_insert_with(|| JobBuf::new(&job_id));
                if let Some((old, _)) = jb.result.replace((history, bytes)) {
                    // A replaced table counts as written.
                    self.add_progress(&job_id, &old, 1);
                }
            }
            Msg::Finished(job_id) => {
                if let Some(jb) = self.jobs.get_mut(&job_id) {
                    jb.finished = true;
                    jb.retry_at = None;
                }
            }
            Msg::DiscardAll => {
                let n = self.jobs.len();
                self.jobs.clear();
                self.writes = FuturesUnordered::new();
                // The entries these counted for are gone with the leader's memory.
                lock(&self.progress).clear();
                if n > 0 {
                    tracing::info!(
                        jobs = n,
                        "stepped down: discarding unwritten job history (the new leader writes from now on)"
                    );
                }
            }
            Msg::Flush(done) => {
                for jb in self.jobs.values_mut() {
                    jb.retry_at = None;
                }
                self.waiters.push(done);
            }
        }
    }

    /// Drops a job's oldest unwritten chunks beyond the pending limit. Not while a write is
    /// in flight: it holds the oldest chunks, and its outcome removes them.
    fn bound(&mut self, job_id: &str) {
        let max = self.options.max_pending_bytes;
        let mut dropped: Vec<(String, u64)> = Vec::new();
        if let Some(jb) = self.jobs.get_mut(job_id) {
            while !jb.in_flight && jb.logs.pending_bytes() + jb.metrics.pending_bytes() > max {
                jb.logs.seal();
                jb.metrics.seal();
                let stream = if jb.logs.pending_bytes() >= jb.metrics.pending_bytes() {
                    &mut jb.logs
                } else {
                    &mut jb.metrics
                };
                match stream.sealed.pop_front() {
                    Some(c) => dropped.push((c.history, c.records)),
                    None => break,
                }
            }
        }
        if !dropped.is_empty() {
            let records: u64 = dropped.iter().map(|(_, r)| r).sum();
            tracing::warn!(job_id = %job_id, records, limit_bytes = max, "the object store keeps failing: dropping the oldest unwritten history of the job");
            for (history, r) in dropped {
                self.add_progress(job_id, &history, r);
            }
        }
    }

    fn start_due(&mut self, now: Instant) {
        let flushing = !self.waiters.is_empty();
        for (job_id, jb) in self.jobs.iter_mut() {
            if !jb.due(now, &self.options, flushing) {
                continue;
            }
            let logs = StreamWork {
                dir: jb.logs.dir.clone(),
                next_seq: jb.logs.next_seq,
                chunks: jb.logs.sealed.iter().map(|c| c.bytes.clone()).collect(),
            };
            let metrics = StreamWork {
                dir: jb.metrics.dir.clone(),
                next_seq: jb.metrics.next_seq,
                chunks: jb.metrics.sealed.iter().map(|c| c.bytes.clone()).collect(),
            };
            // results.json goes last: after every chunk of a job that has ended.
            let all_sealed = jb.logs.open_records == 0 && jb.metrics.open_records == 0;
            let result = match (&jb.result, jb.finished && all_sealed) {
                (Some((_, bytes)), true) => Some((job_id.clone(), bytes.clone())),
                _ => None,
            };
            jb.in_flight = true;
            let objects = self.objects.clone();
            let id = job_id.clone();
            self.writes.push(
                async move {
                    let outcome = write_job(objects, logs, metrics, result).await;
                    (id, outcome)
                }
                .boxed(),
            );
        }
    }

    fn apply(&mut self, job_id: String, outcome: Outcome) {
        let Some(jb) = self.jobs.get_mut(&job_id) else {
            return;
        };
        jb.in_flight = false;
        let mut done: Vec<(String, u64)> = Vec::new();
        for (stream, out) in [
            (&mut jb.logs, &outcome.logs),
            (&mut jb.metrics, &outcome.metrics),
        ] {
            if out.next_seq.is_some() {
                stream.next_seq = out.next_seq;
            }
            for _ in 0..out.written {
                if let Some(c) = stream.sealed.pop_front() {
                    done.push((c.history, c.records));
                }
            }
        }
        if outcome.result_written {
            if let Some((history, _)) = jb.result.take() {
                done.push((history, 1));
            }
        }
        match &outcome.error {
            None => {
                jb.failures = 0;
                jb.retry_at = None;
            }
            Some(e) => {
                jb.failures += 1;
                let delay = backoff(&self.options, jb.failures);
                jb.retry_at = Some(Instant::now() + delay);
                tracing::warn!(job_id = %job_id, error = %e, failures = jb.failures, "writing job history to the object store failed; retrying in {delay:.1?}");
            }
        }
        for (history, records) in done {
            self.add_progress(&job_id, &history, records);
        }
    }

    fn settle(&mut self) {
        self.jobs
            .retain(|_, jb| !(jb.finished && jb.is_empty() && !jb.in_flight));
        if !self.waiters.is_empty() && self.jobs.values().all(|jb| jb.is_empty()) {
            for w in self.waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

async fn run(
    objects: Objects,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    progress: Progress,
    options: DurableOptions,
) {
    let mut w = Writer {
        objects,
        options,
        progress,
        jobs: HashMap::new(),
        writes: FuturesUnordered::new(),
        waiters: Vec::new(),
    };
    let period =
        (options.flush_interval / 4).clamp(Duration::from_millis(20), Duration::from_millis(500));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => w.handle(m),
                None => break,
            },
            Some((job_id, outcome)) = w.writes.next(), if !w.writes.is_empty() => w.apply(job_id, outcome),
            _ = tick.tick() => {}
        }
        w.start_due(Instant::now());
        w.settle();
    }
    tracing::debug!("durable history writer stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(history: &str, n: u64, line: &str) -> Record {
        Record::log(
            history,
            n,
            1_700_000_000_000 + n as i64,
            &LogLine {
                rank: 1,
                stream: "stdout".into(),
                line: line.into(),
            },
        )
    }

    #[test]
    fn paths_and_seqs() {
        assert_eq!(logs_dir("job-1"), "jobs/job-1/logs");
        assert_eq!(metrics_dir("job-1"), "jobs/job-1/metrics");
        assert_eq!(
            chunk_path(&logs_dir("job-1"), 12),
            "jobs/job-1/logs/0000000012.jsonl"
        );
        assert_eq!(results_path("job-1"), "jobs/job-1/results.json");
        assert_eq!(chunk_seq("jobs/job-1/logs/0000000012.jsonl"), Some(12));
        assert_eq!(chunk_seq("0000000000.jsonl"), Some(0));
        for bad in [
            "jobs/j/logs/x.jsonl",
            "jobs/j/logs/12.json",
            "jobs/j/logs/.jsonl",
            "a/-1.jsonl",
        ] {
            assert_eq!(chunk_seq(bad), None, "{bad}");
        }
        // Zero-padded names sort like their numbers.
        assert!(chunk_path("d", 9) < chunk_path("d", 10));
        assert_eq!(new_history_id().len(), 16);
        assert_ne!(new_history_id(), new_history_id());
    }

    #[test]
    fn chunk_format_round_trips_in_order_with_non_finite_metrics() {
        let records = vec![
            log("h1", 0, "hello \"world\" ✓"),
            Record::metric(
                "h1",
                1,
                5,
                &MetricPoint {
                    rank: 0,
                    step: 7,
                    values: [
                        ("loss".to_string(), 0.25),
                        ("nan".to_string(), f64::NAN),
                        ("up".to_string(), f64::INFINITY),
                        ("down".to_string(), f64::NEG_INFINITY),
                    ]
                    .into(),
                },
            ),
            log("h1", 2, "line with\ttab"),
        ];
        let mut logs = Vec::new();
        let mut metrics = Vec::new();
        for r in &records {
            let line = r.to_line();
            assert_eq!(
                line.iter().filter(|b| **b == b'\n').count(),
                1,
                "one line each"
            );
            match r {
                Record::Log(_) => logs.extend(line),
                Record::Metric(_) => metrics.extend(line),
            }
        }
        let text = String::from_utf8(logs.clone()).unwrap();
        assert!(text.starts_with(r#"{"history":"h1","n":0,"at_unix_ms":1700000000000,"rank":1,"stream":"stdout","line":"hello \"world\" ✓"}"#), "{text}");
        let (parsed, bad) = parse_chunk::<LogRecord>(&logs);
        assert_eq!(bad, 0);
        assert_eq!(
            parsed.iter().map(|r| r.line.as_str()).collect::<Vec<_>>(),
            ["hello \"world\" ✓", "line with\ttab"]
        );
        let mtext = String::from_utf8(metrics.clone()).unwrap();
        assert!(
            mtext.contains(r#""nan":"NaN""#) && mtext.contains(r#""down":"-inf""#),
            "{mtext}"
        );
        let (parsed, bad) = parse_chunk::<MetricRecord>(&metrics);
        assert_eq!(bad, 0);
        let m = &parsed[0];
        assert_eq!((m.step, m.n, m.rank), (7, 1, 0));
        assert_eq!(m.values["loss"], 0.25);
        assert!(m.values["nan"].is_nan());
        assert_eq!(m.values["up"], f64::INFINITY);
        assert_eq!(m.values["down"], f64::NEG_INFINITY);
        // Back to events.
        match Record::Metric(m.clone()).to_event().kind {
            Some(job_event::Kind::Metric(p)) => assert_eq!(p.step, 7),
            other => panic!("{other:?}"),
        }
        let ev = Record::Log(LogRecord {
            history: "h".into(),
            n: 0,
            at_unix_ms: 9,
            rank: 2,
            stream: "stderr".into(),
            line: "x".into(),
        })
        .to_event();
        assert_eq!(ev.at_unix_ms, 9);
        assert!(matches!(
            ev.kind,
            Some(job_event::Kind::Log(LogLine { rank: 2, .. }))
        ));
    }

    #[test]
    fn bad_lines_are_skipped_and_counted_and_unknown_fields_ignored() {
        let chunk = b"{\"history\":\"h\",\"n\":0,\"at_unix_ms\":1,\"rank\":0,\"stream\":\"stdout\",\"line\":\"a\",\"future\":1}\n\
            not json\n\n{\"history\":\"h\",\"n\":1,\"at_unix_ms\":2,\"rank\":0,\"line\":\"b\"}\n{\"trunc";
        let (records, bad) = parse_chunk::<LogRecord>(chunk);
        assert_eq!(bad, 2);
        assert_eq!(
            records.iter().map(|r| r.line.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(records[1].stream, "", "stream defaults to empty");
    }

    #[test]
    fn results_json_round_trips() {
        let table = ResultTable {
            title: "Neural ODE".into(),
            columns: vec!["Model".into(), "Test acc".into()],
            rows: vec![
                ResultRow {
                    cells: vec!["ResNet".into(), "96.65%".into()],
                },
                ResultRow {
                    cells: vec!["ODE-Net".into(), "96.55%".into()],
                },
            ],
            notes: vec!["claim HELD".into()],
            claims: vec![Claim {
                experiment: "mnist".into(),
                claim: "ODE-Net within 0.7 points".into(),
                paper: "0.42% vs 0.41%".into(),
                treatment: "96.55%".into(),
                baseline: "96.65%".into(),
                held: true,
                treatment_value: Some(96.55),
                baseline_value: Some(96.65),
                unit: "%".into(),
            }],
        };
        let bytes = results_json("job-1", &table);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["format_version"], FORMAT_VERSION);
        assert_eq!(v["job_id"], "job-1");
        assert_eq!(v["rows"][1][0], "ODE-Net");
        assert_eq!(parse_results(&bytes).unwrap(), table);
        assert!(parse_results(b"{}").is_err());
    }

    #[test]
    fn streams_seal_by_size_and_history() {
        let mut s = StreamBuf::new("d".into());
        s.push(&log("h1", 0, "a"), 1 << 20);
        s.push(&log("h1", 1, "b"), 1 << 20);
        assert_eq!((s.open_records, s.sealed.len()), (2, 0));
        // Another history starts a new chunk.
        s.push(&log("h2", 0, "c"), 1 << 20);
        assert_eq!((s.open_records, s.sealed.len()), (1, 1));
        assert_eq!(s.sealed[0].records, 2);
        assert_eq!(s.sealed[0].history, "h1");
        // A full chunk is sealed at once.
        s.push(&log("h2", 1, &"x".repeat(200)), 100);
        assert_eq!((s.open_records, s.sealed.len()), (0, 2));
        assert_eq!(s.sealed[1].records, 2);
        assert!(!s.is_empty());
    }

    fn file_objects() -> (tempfile::TempDir, Objects) {
        let dir = tempfile::tempdir().unwrap();
        let objects =
            trainyard_objects::open_objects(&format!("file://{}", dir.path().display())).unwrap();
        (dir, objects)
    }

    fn quick() -> DurableOptions {
        DurableOptions {
            flush_interval: Duration::from_millis(50),
            chunk_bytes: 200,
            max_pending_bytes: 1 << 20,
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_millis(50),
        }
    }

    #[tokio::test]
    async fn the_writer_appends_chunks_in_order_and_results_last() {
        let (_dir, objects) = file_objects();
        // Chunks from an earlier coordinator: the writer continues after them.
        objects
            .put(
                &chunk_path(&logs_dir("job-1"), 4),
                Bytes::from(log("old", 0, "from before").to_line()),
            )
            .await
            .unwrap();
        let (sink, task) = Sink::start(objects.clone(), quick());
        for n in 0..20 {
            sink.record("job-1", log("h1", n, &format!("line {n}")));
        }
        sink.record(
            "job-1",
            Record::metric(
                "h1",
                20,
                1,
                &MetricPoint {
                    rank: 0,
                    step: 3,
                    values: [("loss".to_string(), 1.5)].into(),
                },
            ),
        );
        sink.result(
            "job-1",
            "h1",
            ResultTable {
                title: "t".into(),
                ..Default::default()
            },
        );
        sink.finished("job-1");
        assert!(sink.flush(Duration::from_secs(10)).await);
        assert_eq!(
            sink.written("job-1", "h1"),
            22,
            "20 logs, 1 metric, 1 result"
        );
        let logs = objects.list(&logs_dir("job-1")).await.unwrap();
        assert!(
            logs.len() > 2,
            "several chunks of at most ~200 bytes: {logs:?}"
        );
        assert_eq!(chunk_seq(&logs[1].path), Some(5), "continues after seq 4");
        let history = read_history(&objects, "job-1").await.unwrap();
        let lines: Vec<&str> = history.logs.iter().map(|r| r.line.as_str()).collect();
        let mut want = vec!["from before".to_string()];
        want.extend((0..20).map(|n| format!("line {n}")));
        assert_eq!(lines, want);
        assert_eq!(history.metrics.len(), 1);
        assert_eq!(history.metrics[0].values["loss"], 1.5);
        assert_eq!(
            read_results(&objects, "job-1")
                .await
                .unwrap()
                .map(|t| t.title),
            Some("t".to_string())
        );
        assert_eq!(read_results(&objects, "job-2").await.unwrap(), None);
        assert_eq!(
            read_history(&objects, "job-2").await.unwrap(),
            StoredHistory::default()
        );
        drop(sink);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn open_chunks_are_written_after_the_flush_interval() {
        let (_dir, objects) = file_objects();
        let (sink, _task) = Sink::start(objects.clone(), quick());
        sink.record("job-1", log("h1", 0, "only line"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.written("job-1", "h1") < 1 {
            assert!(Instant::now() < deadline, "never written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let history = read_history(&objects, "job-1").await.unwrap();
        assert_eq!(history.logs.len(), 1);
    }

    #[tokio::test]
    async fn failed_writes_are_retried_and_discard_drops_everything() {
        let dir = tempfile::tempdir().unwrap();
        // A folder we cannot write into yet: a file stands where `jobs` must be a folder.
        std::fs::write(dir.path().join("jobs"), b"in the way").unwrap();
        let objects =
            trainyard_objects::open_objects(&format!("file://{}", dir.path().display())).unwrap();
        let (sink, _task) = Sink::start(objects.clone(), quick());
        sink.record("job-1", log("h1", 0, "survives a failure"));
        sink.finished("job-1");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(sink.written("job-1", "h1"), 0, "cannot be written yet");
        std::fs::remove_file(dir.path().join("jobs")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.written("job-1", "h1") < 1 {
            assert!(Instant::now() < deadline, "the retry never succeeded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(read_history(&objects, "job-1").await.unwrap().logs.len(), 1);
        sink.forget("job-1");
        assert_eq!(sink.written("job-1", "h1"), 0, "forgotten");

        // Stepping down discards what is not written (and what was counted).
        sink.record("job-3", log("h3", 0, "written"));
        assert!(sink.flush(Duration::from_secs(5)).await);
        assert_eq!(sink.written("job-3", "h3"), 1);
        sink.record("job-2", log("h2", 0, "never written"));
        sink.discard_all();
        assert!(sink.flush(Duration::from_secs(5)).await);
        assert!(read_history(&objects, "job-2")
            .await
            .unwrap()
            .logs
            .is_empty());
        assert_eq!(sink.written("job-3", "h3"), 0);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let o = DurableOptions::default();
        let d1 = backoff(&o, 1);
        assert!(
            d1 >= Duration::from_millis(500) && d1 <= Duration::from_secs(1),
            "{d1:?}"
        );
        let d3 = backoff(&o, 3);
        assert!(
            d3 >= Duration::from_secs(2) && d3 <= Duration::from_secs(4),
            "{d3:?}"
        );
        let big = backoff(&o, 40);
        assert!(big <= o.retry_max && big >= o.retry_max / 2, "{big:?}");
    }
}
