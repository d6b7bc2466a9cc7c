//! Command-line arguments (clap derive) of the `trainyard` binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default coordinator URL for client commands and workers.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7800";

/// Trainyard: a training cluster for paper reproductions.
#[derive(Debug, Parser)]
#[command(
    name = "trainyard",
    version,
    about = "Trainyard: run ML training jobs on a cluster of workers",
    long_about = "Trainyard: run ML training jobs on a cluster of workers.\n\n\
        Quick start:  trainyard run neural-ode\n\
        A cluster:    trainyard local   (then: trainyard submit neural-ode --follow)",
    propagate_version = true
)]
pub struct Cli {
    /// Coordinator to talk to (client commands and workers).
    #[arg(
        long,
        global = true,
        env = "TRAINYARD_COORDINATOR",
        default_value = DEFAULT_COORDINATOR,
        value_name = "URL"
    )]
    pub coordinator: String,

    /// Format of the logs written to stderr (filter them with RUST_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// File holding your bearer token (client commands); or set TRAINYARD_TOKEN to the
    /// token itself. Created by `trainyard auth add-user` on the coordinator's side.
    #[arg(long, global = true, env = "TRAINYARD_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// TLS and certificates of this process (see `trainyard certs init`).
    #[command(flatten)]
    pub tls: TlsArgs,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The certificate flags every role shares: a client trusts `--tls-ca` and presents
/// `--tls-cert`/`--tls-key` (mutual TLS); the coordinator serves with `--tls-cert`/
/// `--tls-key`.
#[derive(Debug, Clone, Args, Default)]
pub struct TlsArgs {
    /// CA certificate (PEM) to trust for an https:// coordinator (default: the public
    /// web roots).
    #[arg(long, global = true, env = "TRAINYARD_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM): the coordinator's server certificate, or a
    /// worker's or user's client certificate for mutual TLS.
    #[arg(long, global = true, env = "TRAINYARD_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "TRAINYARD_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Verify the coordinator's certificate for NAME rather than the host dialled (for
    /// coordinators reached by pod IP, e.g. `trainyard-coordinator` in Kubernetes).
    #[arg(
        long,
        global = true,
        env = "TRAINYARD_TLS_SERVER_NAME",
        value_name = "NAME"
    )]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The flags as a client's TLS files.
    pub fn client_files(&self) -> trainyard_auth::tls::ClientTlsFiles {
        trainyard_auth::tls::ClientTlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            server_name: self.tls_server_name.clone(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Output format of read commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// Human-readable tables.
    #[default]
    Table,
    /// JSON (snake_case field names, enums as short names).
    Json,
    /// YAML (same shape as JSON).
    Yaml,
}

/// `-o table|json|yaml`.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a coordinator (API server, scheduler, state store) in the foreground.
    Coordinator(CoordinatorArgs),
    /// Run a worker agent that executes ranks for a coordinator.
    Worker(WorkerArgs),
    /// Internal: body of one rank process (started by a worker).
    #[command(hide = true)]
    Rank,
    /// Submit a job to the cluster.
    Submit(SubmitArgs),
    /// List jobs.
    #[command(visible_alias = "ls")]
    Jobs(JobsArgs),
    /// Show one job in detail: state, metrics, placement, checkpoint, history.
    Describe(DescribeArgs),
    /// Print a job's log lines (from the start; `-f` keeps following).
    Logs(LogsArgs),
    /// Cancel a job (its ranks get SIGTERM, then SIGKILL after the grace period).
    Cancel(CancelArgs),
    /// List the cluster's workers and their devices.
    Workers(WorkersArgs),
    /// List a job's committed checkpoints.
    Checkpoints(CheckpointsArgs),
    /// Print a job's results table and the files (plots, JSON) stored with it.
    Results(ResultsArgs),
    /// Run the paper jobs with one preset and print whether each paper's claims held.
    Reproduce(ReproduceArgs),
    /// List the job types the cluster can run, with presets and config keys.
    JobTypes(JobTypesArgs),
    /// Run a coordinator and N workers on this machine until Ctrl-C.
    Local(LocalArgs),
    /// Start a local cluster, run one job to completion with live progress, then stop.
    Run(RunArgs),
    /// Check a `cuda` build on this machine's GPU: GPUs seen, neural-ode training step
    /// time on CUDA vs CPU, a one-rank NCCL all-reduce; exit 1 on a failed check, 2 in a
    /// build without cuda.
    GpuCheck(GpuCheckArgs),
    /// Data sets in object storage: push a folder, show one.
    Data(DataArgs),
    /// Development certificates for TLS: `trainyard certs init`.
    Certs(CertsArgs),
    /// Users and worker join tokens in the coordinator's auth file.
    Auth(AuthArgs),
}

/// `trainyard certs`.
#[derive(Debug, Clone, Args)]
pub struct CertsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// `trainyard certs ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum CertsCommand {
    /// Generate a development CA, a coordinator server certificate, and worker and
    /// client certificates (for a first try; use your own PKI in production).
    Init(CertsInitArgs),
}

/// `trainyard certs init`.
#[derive(Debug, Clone, Args)]
pub struct CertsInitArgs {
    /// Folder to write the PEM files into.
    #[arg(long, default_value = ".trainyard/certs", value_name = "DIR")]
    pub out: PathBuf,
    /// Host names and IP addresses the coordinator is reached at (repeatable);
    /// localhost, 127.0.0.1 and ::1 are always included.
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Days the certificates are valid (the CA: ten times as long).
    #[arg(long, default_value_t = 365, value_name = "N")]
    pub days: u32,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

/// `trainyard auth`.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// The coordinator's auth file.
    #[arg(
        long,
        global = true,
        env = "TRAINYARD_AUTH_FILE",
        default_value = ".trainyard/auth.toml",
        value_name = "FILE"
    )]
    pub auth_file: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: AuthCommand,
}

/// `trainyard auth ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum AuthCommand {
    /// Add a user and print their bearer token (shown once; only its hash is stored).
    AddUser {
        /// The user's name (owner of their jobs).
        name: String,
        /// `user` (own jobs) or `admin` (every job).
        #[arg(long, default_value = "user", value_parser = ["user", "admin"])]
        role: String,
        /// Also write the token to this file (mode 0600), for --token-file.
        #[arg(long, value_name = "FILE")]
        token_out: Option<PathBuf>,
    },
    /// Add a worker join token and print it (shown once; only its hash is stored).
    AddWorker {
        /// A label for the token (a node pool, a site).
        name: String,
        /// Also write the token to this file (mode 0600), for --join-token-file.
        #[arg(long, value_name = "FILE")]
        token_out: Option<PathBuf>,
    },
    /// Remove a user or join token (revoked once the coordinator restarts).
    Remove {
        /// The name.
        name: String,
    },
    /// List users and join tokens (names and roles; never tokens).
    List,
}

/// `trainyard data`.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: DataCommand,
}

/// Subcommands of `trainyard data`.
#[derive(Debug, Clone, Subcommand)]
pub enum DataCommand {
    /// Upload every file under DIR as the data set at URL (files first, manifest last);
    /// jobs then name it with `--set dataset=URL` and workers download it once.
    Push {
        /// The folder to upload.
        dir: PathBuf,
        /// Where: file:///abs/path, s3://bucket/prefix (credentials from the environment).
        url: String,
    },
    /// Show the data set at URL: files, sizes, digests.
    Info {
        /// The data set's URL.
        url: String,
    },
}

/// `trainyard gpu-check`.
#[derive(Debug, Clone, Args)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct GpuCheckArgs {
    /// Batch sizes of the training-step rows (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "32,256",
        value_name = "N,..."
    )]
    pub batches: Vec<usize>,
    /// Warm-up steps on CUDA before timing.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub warmup: usize,
    /// Timed steps on CUDA.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub steps: usize,
    /// Warm-up steps on the CPU before timing.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpu_warmup: usize,
    /// Timed steps on the CPU.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub cpu_steps: usize,
    /// Buffer sizes of the NCCL rows, in MiB (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,16,64",
        value_name = "MIB,..."
    )]
    pub sizes_mib: Vec<usize>,
    /// Timed calls per NCCL row.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub nccl_iters: usize,
    /// Skip the training-step rows.
    #[arg(long)]
    pub skip_training: bool,
    /// Skip the NCCL rows.
    #[arg(long)]
    pub skip_nccl: bool,
}

/// `trainyard coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Address to serve gRPC on (port 0 picks a free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:7800", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Directory for the state store and the object folder (unless --store/--objects say otherwise).
    #[arg(long, default_value = ".trainyard/coordinator", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// State store URL: file:///var/lib/trainyard/state.redb (embedded, the default in the
    /// data dir) or etcd://host1:2379,host2:2379[/prefix] (etcd).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Object store URL for checkpoints, e.g. file:///var/lib/trainyard/objects.
    #[arg(long, value_name = "URL")]
    pub objects: Option<String>,
    /// Seconds without a heartbeat after which a worker is declared dead.
    #[arg(long, value_name = "SECS")]
    pub heartbeat_timeout: Option<f64>,
    /// The address other coordinators, workers and clients reach this one at (host:port),
    /// published in the leader election with an etcd store (default: the listen address).
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// Serve Prometheus metrics on ADDR (`GET /metrics`; recommended port 9460, e.g.
    /// 0.0.0.0:9460; port 0 picks a free one, printed on stdout). Default: not served.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Auth file of users and worker join tokens (see `trainyard auth`); without it the
    /// coordinator serves without authentication, on loopback only unless --insecure.
    #[arg(long, env = "TRAINYARD_AUTH_FILE", value_name = "FILE")]
    pub auth_file: Option<PathBuf>,
    /// CA (PEM) of client certificates: workers must present one that chains to it
    /// (mutual TLS; needs --tls-cert and --tls-key).
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve without authentication on a non-loopback --listen address (warned at every
    /// start).
    #[arg(long)]
    pub insecure: bool,
    /// Request, report and quota limits.
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// `trainyard coordinator`'s limits.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest request message, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024, value_name = "N")]
    pub max_request_bytes: usize,
    /// Longest log line in a worker report, in bytes.
    #[arg(long, default_value_t = 64 * 1024, value_name = "N")]
    pub max_log_line_bytes: usize,
    /// Most events in one worker report.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_report_events: usize,
    /// Most values in one metric point.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_metric_values: usize,
    /// Most pending jobs per user (0: no cap).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub max_pending_jobs_per_user: usize,
}

/// `trainyard worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Worker name shown in `trainyard workers` (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Devices to offer, e.g. `cpu:4`, `gpu:0,1` (real GPUs; `cuda` builds only) or
    /// `cpu:8+gpu:all` (default: one cpu slot per core, plus every GPU in a `cuda` build).
    #[arg(long, value_name = "SPEC")]
    pub devices: Option<String>,
    /// Offer N GPU slots emulated on the CPU instead.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub emulate_gpus: u32,
    /// Scratch directory for the ranks.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Host name or IP address other workers' ranks reach this worker's ranks at, for the
    /// TCP ring all-reduce (default: this machine's address on the route to the
    /// coordinator; in Kubernetes, the pod IP).
    #[arg(long, value_name = "HOST")]
    pub collective_host: Option<String>,
    /// Serve Prometheus metrics on ADDR (`GET /metrics`; recommended port 9461, e.g.
    /// 0.0.0.0:9461; port 0 picks a free one, logged). Default: not served.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// File holding the join token (from `trainyard auth add-worker`); or set
    /// TRAINYARD_JOIN_TOKEN to the token itself.
    #[arg(long, env = "TRAINYARD_JOIN_TOKEN_FILE", value_name = "FILE")]
    pub join_token_file: Option<PathBuf>,
}

/// What a job should run with: the fields of a job spec.
#[derive(Debug, Clone, Args, Default)]
pub struct SpecArgs {
    /// Job type, e.g. `neural-ode` (see `trainyard job-types`); optional with -f.
    #[arg(value_name = "JOB")]
    pub job: Option<String>,
    /// Config preset, e.g. `quick` or `paper` (default: the job's default preset).
    #[arg(long, short = 'p')]
    pub preset: Option<String>,
    /// Override a config key; repeatable (`--set epochs=2 --set lr=0.01`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Spec file (YAML or JSON) with the same fields; flags override it.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Number of ranks (device slots), placed as one gang.
    #[arg(long)]
    pub ranks: Option<u32>,
    /// Ranks on each worker the gang uses (must divide --ranks): 8 ranks with 4 per worker
    /// run on 2 workers x 4 (default 0: any split, packed onto as few workers as possible).
    #[arg(long, value_name = "N")]
    pub ranks_per_worker: Option<u32>,
    /// Priority: higher runs first.
    #[arg(long, allow_hyphen_values = true)]
    pub priority: Option<i32>,
    /// Job name (default: the job type).
    #[arg(long)]
    pub name: Option<String>,
    /// Requeues allowed after a worker death or rank failure.
    #[arg(long)]
    pub max_restarts: Option<u32>,
    /// Device kind every rank needs: cpu or gpu (default: any).
    #[arg(long, value_name = "KIND")]
    pub device_kind: Option<String>,
    /// Seconds a rank gets between SIGTERM and SIGKILL on cancel.
    #[arg(long, value_name = "SECS")]
    pub grace_period: Option<u32>,
    /// Keep the newest N committed checkpoints (default 3; older ones are deleted).
    #[arg(long = "keep-checkpoints", value_name = "N")]
    pub keep_checkpoints: Option<u32>,
    /// Also keep the best M committed checkpoints by --best-metric.
    #[arg(long, value_name = "M")]
    pub keep_best: Option<u32>,
    /// The metric that ranks checkpoints for --keep-best, e.g. odenet/test_acc.
    #[arg(long, value_name = "NAME")]
    pub best_metric: Option<String>,
    /// Whether a higher (max) or lower (min) --best-metric is better (default: min).
    #[arg(long, value_name = "MODE", value_parser = ["max", "min"])]
    pub best_mode: Option<String>,
    /// Fail an attempt when no checkpoint could be committed for this many seconds while
    /// uploads keep failing (default 600).
    #[arg(long = "checkpoint-commit-timeout", value_name = "SECS")]
    pub checkpoint_commit_timeout: Option<u32>,
    /// Start from another job's committed checkpoint: <job-id>/<step>
    /// (`trainyard checkpoints <job-id>` lists them); the job must be of the same type.
    #[arg(long, value_name = "JOB/STEP")]
    pub from_checkpoint: Option<String>,
}

/// `trainyard submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job spec.
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Follow the job after submitting: progress bar, live metrics, results.
    #[arg(long, short = 'F')]
    pub follow: bool,
    /// Output format of the submitted job.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `trainyard jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Only jobs in these states (repeatable): pending, scheduled, running, succeeded, failed, cancelled.
    #[arg(long = "state", short = 's', value_name = "STATE")]
    pub states: Vec<String>,
    /// At most this many jobs.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Only jobs of this user (admins; a user only ever sees their own).
    #[arg(long, short = 'u', value_name = "NAME")]
    pub user: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `trainyard describe`.
#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Job id.
    pub id: String,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `trainyard logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Job id.
    pub id: String,
    /// Keep printing new lines until the job ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only this rank's lines.
    #[arg(long)]
    pub rank: Option<u32>,
}

/// `trainyard cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Job id.
    pub id: String,
    /// Why (recorded in the job's history).
    #[arg(long, default_value = "cancelled by user")]
    pub reason: String,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `trainyard workers`.
#[derive(Debug, Args)]
pub struct WorkersArgs {
    /// Include workers declared dead.
    #[arg(long, short = 'a')]
    pub all: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `trainyard checkpoints`.
#[derive(Debug, Args)]
pub struct CheckpointsArgs {
    /// Job id.
    pub id: String,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `trainyard results`.
#[derive(Debug, Args)]
pub struct ResultsArgs {
    /// Job id.
    pub id: String,
    /// Also download the files stored with the results into this folder.
    #[arg(long, value_name = "DIR")]
    pub download: Option<PathBuf>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `trainyard reproduce`.
#[derive(Debug, Args)]
pub struct ReproduceArgs {
    /// Jobs to run (default: every job this binary knows).
    pub jobs: Vec<String>,
    /// Preset of every job: quick (minutes on a CPU) or paper (the paper's scale, for GPUs).
    #[arg(long, short = 'p', default_value = "quick")]
    pub preset: String,
    /// Ranks of each job.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub ranks: u32,
    /// Override a config key in every job that has it (repeatable), e.g. `--set epochs=1`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Run every job once per seed (`0,1,2`, `0-4`, or a mix) and report each claim's mean
    /// ± std over the seeds and how many seeds it held on (default: each job's own seed).
    #[arg(long, value_name = "LIST")]
    pub seeds: Option<String>,
    /// Start a local cluster for the run (instead of using --coordinator's).
    #[arg(long)]
    pub local: bool,
    /// Data directory of the local cluster (default: .trainyard/reproduce/<timestamp>).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Shape of the local cluster (with --local).
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Also write the table, the date, the machine and the seeds as Markdown to FILE
    /// (e.g. docs/results.md).
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `trainyard job-types`.
#[derive(Debug, Args)]
pub struct JobTypesArgs {
    /// Show this binary's own job types without asking the coordinator.
    #[arg(long)]
    pub local: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Options shared by the commands that start an in-process cluster.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Number of workers to start.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub workers: u32,
    /// Each worker offers N GPU slots emulated on the CPU (default: cpu slots, one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub emulate_gpus: u32,
    /// Devices each worker offers, e.g. `cpu:4` or `gpu:0` (real GPUs; `cuda` builds only).
    #[arg(long, value_name = "SPEC")]
    pub devices: Option<String>,
    /// Object store URL for checkpoints (default: a folder in the data dir).
    #[arg(long, value_name = "URL")]
    pub objects: Option<String>,
    /// State store URL: file:///path/state.redb or etcd://host1:2379,host2:2379[/prefix]
    /// (default: a redb file in the data dir).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Serve Prometheus metrics: the coordinator's on ADDR, worker i's on the port after it
    /// plus i (every one on a free port, logged, when ADDR's port is 0). Default: not served.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// `trainyard local`.
#[derive(Debug, Args)]
pub struct LocalArgs {
    /// Address to serve gRPC on.
    #[arg(long, default_value = "127.0.0.1:7800", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Directory for the state store, objects and worker scratch space.
    #[arg(long, default_value = ".trainyard/local", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Serve on a non-loopback --listen address although a local cluster has no
    /// authentication (warned at start; use `trainyard coordinator --auth-file` instead).
    #[arg(long)]
    pub insecure: bool,
    /// Cluster shape.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `trainyard run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job spec.
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Data directory of this run (default: .trainyard/runs/<job>-<timestamp>).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Cluster shape.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_collects_repeated_sets() {
        let cli = Cli::try_parse_from([
            "trainyard",
            "submit",
            "neural-ode",
            "--set",
            "a=1",
            "--set",
            "b=2",
            "--ranks",
            "2",
            "-o",
            "json",
        ])
        .unwrap();
        let Command::Submit(s) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(s.spec.job.as_deref(), Some("neural-ode"));
        assert_eq!(s.spec.set, vec!["a=1", "b=2"]);
        assert_eq!(s.spec.ranks, Some(2));
        assert_eq!(s.spec.ranks_per_worker, None);
        assert_eq!(s.output.output, OutputFormat::Json);
    }

    #[test]
    fn submit_and_run_take_ranks_per_worker() {
        for cmd in ["submit", "run"] {
            let cli = Cli::try_parse_from([
                "trainyard",
                cmd,
                "neural-ode",
                "--ranks",
                "8",
                "--ranks-per-worker",
                "4",
            ])
            .unwrap();
            let spec = match cli.command {
                Command::Submit(s) => s.spec,
                Command::Run(r) => r.spec,
                _ => panic!("not {cmd}"),
            };
            assert_eq!((spec.ranks, spec.ranks_per_worker), (Some(8), Some(4)));
        }
        assert!(Cli::try_parse_from([
            "trainyard",
            "submit",
            "neural-ode",
            "--ranks-per-worker",
            "-1"
        ])
        .is_err());
    }

    #[test]
    fn gpu_check_defaults_and_lists() {
        let cli = Cli::try_parse_from(["trainyard", "gpu-check"]).unwrap();
        let Command::GpuCheck(g) = cli.command else {
            panic!("not gpu-check")
        };
        assert_eq!(g.batches, vec![32, 256]);
        assert_eq!(g.sizes_mib, vec![1, 16, 64]);
        let cli = Cli::try_parse_from([
            "trainyard",
            "gpu-check",
            "--batches",
            "8,16,64",
            "--sizes-mib",
            "4",
            "--skip-nccl",
        ])
        .unwrap();
        let Command::GpuCheck(g) = cli.command else {
            panic!("not gpu-check")
        };
        assert_eq!(g.batches, vec![8, 16, 64]);
        assert_eq!(g.sizes_mib, vec![4]);
        assert!(g.skip_nccl && !g.skip_training);
    }

    #[test]
    fn global_coordinator_flag_after_subcommand() {
        let cli =
            Cli::try_parse_from(["trainyard", "jobs", "--coordinator", "http://h:1"]).unwrap();
        assert_eq!(cli.coordinator, "http://h:1");
    }
}
