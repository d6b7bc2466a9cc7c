//! Helpers for Trainyard's end-to-end tests (`tests/tests/*.rs`).
//!
//! Everything runs as REAL processes of the `trainyard` binary on loopback: a coordinator
//! (`trainyard coordinator --listen 127.0.0.1:0`, its address read from the first line of
//! its stdout), workers (`trainyard worker`), and CLI commands whose `-o json` output the
//! tests parse. Processes are killed when their handle drops; when a test panics, the
//! logs of every process it started are printed to help debugging.
//!
//! The binary is found through `TRAINYARD_BIN`, else `target/<profile>/trainyard` next to
//! the test executable; build it first with `cargo build --bin trainyard`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod ha;
pub mod s3;

/// Default time limit of one CLI command.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(120);
/// Heartbeat timeout of test coordinators: a killed worker is declared dead this fast.
pub const HEARTBEAT_TIMEOUT_S: &str = "3";

/// Path of the `trainyard` binary under test.
///
/// `TRAINYARD_BIN` if set; else `trainyard` in the directory above the test executable's
/// `deps/` folder (`target/debug/trainyard`). Panics with how to build it when missing.
pub fn trainyard_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TRAINYARD_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "TRAINYARD_BIN={} does not exist", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut candidates = Vec::new();
    // target/debug/deps/e2e-xxxx -> target/debug/trainyard
    if let Some(deps) = exe.parent() {
        if let Some(profile_dir) = deps.parent() {
            candidates.push(profile_dir.join("trainyard"));
        }
        candidates.push(deps.join("trainyard"));
    }
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "the trainyard binary was not found (looked at {candidates:?}); \
         run `cargo build --bin trainyard` first, or set TRAINYARD_BIN"
    );
}

/// A free TCP port on 127.0.0.1 (bound then released; racy only against other binders).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Calls `f` every `interval` until it returns `Some`, or panics after `timeout`
/// saying what it was waiting for.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(interval);
    }
}

/// The result of one CLI command.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub command: String,
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

impl Output {
    /// Panics (showing the output) unless the command exited 0.
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code,
            0,
            "`{}` failed:\n{}",
            self.command,
            self.describe()
        );
        self
    }

    /// Parses stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "`{}`: stdout is not JSON ({e}):\n{}",
                self.command,
                self.describe()
            )
        })
    }

    /// The whole output, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit code {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or(-1)
}

/// Runs `trainyard <args>` with a time limit; returns its output.
pub fn run_cli(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Output {
    let bin = trainyard_bin();
    let command = format!("trainyard {}", args.join(" "));
    let mut cmd = Command::new(&bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("TRAINYARD_COORDINATOR")
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_reader.join().unwrap_or_default();
            let stderr = err_reader.join().unwrap_or_default();
            panic!("`{command}` did not finish within {timeout:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        command,
        code: exit_code(status),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// A background `trainyard` process (coordinator or worker), killed on drop.
pub struct Proc {
    /// Name for messages (`coordinator`, `worker w1`).
    pub name: String,
    child: Option<Child>,
    /// File with its stdout and stderr.
    pub log_path: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, args: &[String], log_path: &Path, pipe_stdout: bool) -> Proc {
        Proc::spawn_with_env(name, args, log_path, pipe_stdout, &[])
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub(crate) fn spawn_with_env(
        name: &str,
        args: &[String],
        log_path: &Path,
        pipe_stdout: bool,
        env: &[(String, String)],
    ) -> Proc {
        let bin = trainyard_bin();
        let log = File::create(log_path).expect("creating a process log file");
        let mut cmd = Command::new(&bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stderr(log.try_clone().expect("cloning a log file handle"))
            .env_remove("TRAINYARD_COORDINATOR")
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        if pipe_stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(log);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log_path: log_path.to_path_buf(),
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILLs the process (no chance to clean up) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for it to exit; returns its exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(exit_code(status));
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Options of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of workers.
    pub workers: usize,
    /// `--devices` of each worker (empty: none given).
    pub devices: String,
    /// `--emulate-gpus` of each worker (0: not given).
    pub emulate_gpus: u32,
    /// `--store` of the coordinator (`None`: the embedded store in its data directory).
    pub store: Option<String>,
    /// Extra environment of every worker process (and so of its ranks), e.g.
    /// `TRAINYARD_TEST_UPLOAD_DELAY_MS`.
    pub worker_env: Vec<(String, String)>,
    /// Extra arguments of every worker process, e.g. `--log-format json`.
    pub worker_args: Vec<String>,
    /// Serve Prometheus metrics: the coordinator and every worker get `--metrics-listen`
    /// on a free loopback port ([`Cluster::coordinator_metrics`], [`Cluster::worker_metrics`]).
    pub metrics: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            workers: 2,
            devices: "cpu:1".into(),
            emulate_gpus: 0,
            store: None,
            worker_env: Vec::new(),
            worker_args: Vec::new(),
            metrics: false,
        }
    }
}

/// A coordinator and workers as real processes, with a temporary data directory.
pub struct Cluster {
    /// Temporary directory holding state, objects, work dirs and logs.
    pub dir: tempfile::TempDir,
    /// Coordinator address.
    pub addr: SocketAddr,
    /// `http://` URL of the coordinator.
    pub url: String,
    /// The coordinator process.
    pub coordinator: Proc,
    /// Worker processes, by index; their names are `w0`, `w1`, ...
    pub workers: Vec<Proc>,
    devices: String,
    emulate_gpus: u32,
    worker_env: Vec<(String, String)>,
    worker_args: Vec<String>,
    /// The coordinator's `/metrics` address, with [`ClusterOptions::metrics`].
    pub coordinator_metrics: Option<SocketAddr>,
    /// Each worker's `/metrics` address (by worker index), with [`ClusterOptions::metrics`].
    pub worker_metrics: Vec<Option<SocketAddr>>,
    metrics: bool,
    /// The coordinator's command line (a restart reuses it: same port, data dir, store).
    coordinator_args: Vec<String>,
    /// How many times the coordinator was restarted (names its log files).
    restarts: usize,
}

impl Cluster {
    /// Starts a coordinator and `workers` workers of one `cpu:1` slot each, and waits
    /// until all workers have registered.
    pub fn start(workers: usize) -> Cluster {
        Cluster::start_with(ClusterOptions {
            workers,
            ..Default::default()
        })
    }

    /// Starts a cluster with the given options and waits until it is ready.
    pub fn start_with(opts: ClusterOptions) -> Cluster {
        Cluster::start_with_objects(opts, None)
    }

    /// Like [`Cluster::start_with`], with the coordinator's `--objects` URL (`None`: the
    /// folder [`Cluster::objects_dir`]). The processes inherit this process's environment
    /// (object-store credentials included).
    pub fn start_with_objects(opts: ClusterOptions, objects_url: Option<&str>) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("trainyard-e2e-")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("coordinator");
        let objects = match objects_url {
            Some(url) => url.to_string(),
            None => format!("file://{}", dir.path().join("objects").display()),
        };
        // A fixed port (not port 0), so that a restarted coordinator comes back on the
        // address its workers and clients know.
        let listen = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = vec![
            "coordinator".into(),
            "--listen".into(),
            listen,
            "--data-dir".into(),
            data.display().to_string(),
            "--objects".into(),
            objects,
            "--heartbeat-timeout".into(),
            HEARTBEAT_TIMEOUT_S.into(),
        ];
        if let Some(store) = &opts.store {
            args.extend(["--store".to_string(), store.clone()]);
        }
        let coordinator_metrics = opts
            .metrics
            .then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        if let Some(m) = coordinator_metrics {
            args.extend(["--metrics-listen".to_string(), m.to_string()]);
        }
        let log_path = dir.path().join("coordinator.log");
        let mut coordinator = Proc::spawn("coordinator", &args, &log_path, true);
        let addr = read_listen_addr(&mut coordinator, Duration::from_secs(60));
        let mut cluster = Cluster {
            url: format!("http://{addr}"),
            addr,
            coordinator,
            workers: Vec::new(),
            devices: opts.devices.clone(),
            emulate_gpus: opts.emulate_gpus,
            worker_env: opts.worker_env.clone(),
            worker_args: opts.worker_args.clone(),
            coordinator_metrics,
            worker_metrics: Vec::new(),
            metrics: opts.metrics,
            coordinator_args: args,
            restarts: 0,
            dir,
        };
        for _ in 0..opts.workers {
            cluster.add_worker();
        }
        cluster.wait_for_workers(opts.workers);
        cluster
    }

    /// Starts the coordinator again with the same command line (same address, data
    /// directory and store) after it was stopped, e.g. with [`Proc::kill9`]; waits until it
    /// listens. Its log goes to `coordinator-restart<n>.log`. Panics if it still runs.
    pub fn restart_coordinator(&mut self) {
        assert!(
            !self.coordinator.is_running(),
            "restart_coordinator: the coordinator still runs; stop it first"
        );
        self.restarts += 1;
        let log_path = self
            .dir
            .path()
            .join(format!("coordinator-restart{}.log", self.restarts));
        let name = format!("coordinator (restart {})", self.restarts);
        // The old listening socket may linger for a moment after SIGKILL: retry the bind.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut p = Proc::spawn(&name, &self.coordinator_args, &log_path, true);
            let got = read_listen_addr_or_exit(&mut p, Duration::from_secs(60));
            match got {
                Some(addr) => {
                    assert_eq!(addr, self.addr, "the restarted coordinator moved");
                    self.coordinator = p;
                    return;
                }
                None if Instant::now() < deadline => {
                    eprintln!(
                        "restart_coordinator: the coordinator exited before listening; retrying:\n{}",
                        p.log_tail(20)
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                None => panic!(
                    "the restarted coordinator did not listen on {}; its log:\n{}",
                    self.addr,
                    p.log_tail(80)
                ),
            }
        }
    }

    /// Starts one more worker (named `w<index>`); does not wait for it to register.
    pub fn add_worker(&mut self) -> usize {
        let i = self.workers.len();
        let name = format!("w{i}");
        let work_dir = self.dir.path().join("workers").join(&name);
        let mut args: Vec<String> = vec![
            "worker".into(),
            "--coordinator".into(),
            self.url.clone(),
            "--name".into(),
            name.clone(),
            "--work-dir".into(),
            work_dir.display().to_string(),
        ];
        if !self.devices.is_empty() {
            args.extend(["--devices".to_string(), self.devices.clone()]);
        }
        if self.emulate_gpus > 0 {
            args.extend(["--emulate-gpus".to_string(), self.emulate_gpus.to_string()]);
        }
        let metrics = self
            .metrics
            .then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        if let Some(m) = metrics {
            args.extend(["--metrics-listen".to_string(), m.to_string()]);
        }
        self.worker_metrics.push(metrics);
        args.extend(self.worker_args.iter().cloned());
        let log_path = self.dir.path().join(format!("worker-{name}.log"));
        self.workers.push(Proc::spawn_with_env(
            &format!("worker {name}"),
            &args,
            &log_path,
            false,
            &self.worker_env,
        ));
        i
    }

    /// Waits until at least `n` workers are alive.
    pub fn wait_for_workers(&self, n: usize) {
        wait_for_alive_workers(n, |args| self.cli(args));
    }

    /// The object-store folder (`file://` objects URL of the coordinator).
    pub fn objects_dir(&self) -> PathBuf {
        self.dir.path().join("objects")
    }

    /// Runs `trainyard --coordinator <url> <args>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut full = vec!["--coordinator", &self.url];
        full.extend_from_slice(args);
        run_cli(&full, &[], CLI_TIMEOUT)
    }

    /// Runs a read command with `-o json`, asserts exit 0, returns the parsed output.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend_from_slice(&["-o", "json"]);
        self.cli(&full).ok().json()
    }

    /// Submits a job (`trainyard submit <args> -o json`); returns its id.
    pub fn submit(&self, args: &[&str]) -> String {
        let mut full = vec!["submit"];
        full.extend_from_slice(args);
        let v = self.cli_json(&full);
        v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("submit output has no id: {v}"))
            .to_string()
    }

    /// `describe <id> -o json`.
    pub fn describe(&self, id: &str) -> Value {
        self.cli_json(&["describe", id])
    }

    /// Polls `describe` until `pred` holds; returns that description.
    pub fn wait_job(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let last = loop {
            let job = self.describe(id);
            if pred(&job) {
                return job;
            }
            let state = job["state"].as_str().unwrap_or("");
            // A terminal job never changes again: fail fast.
            if Instant::now() > deadline || matches!(state, "SUCCEEDED" | "FAILED" | "CANCELLED") {
                break job;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let logs = self.cli(&["logs", id]);
        panic!(
            "job {id}: gave up waiting for {what}; last state {}\n{}\n--- job logs ---\n{}",
            last["state"],
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            logs.stdout
        );
    }

    /// Waits until the job reaches `state` (panics early if it ends in another state).
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        self.wait_job(id, &format!("state {state}"), timeout, |j| {
            j["state"] == state
        })
    }

    /// Ids of all stored jobs (`jobs -o json`).
    pub fn job_ids(&self) -> Vec<String> {
        let v = self.cli_json(&["jobs"]);
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|j| j["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Index of the worker (in `workers`) that runs rank 0 of a job, from its placement.
    pub fn worker_index_of(&self, job: &Value) -> usize {
        let worker_id = job["placement"][0]["worker_id"]
            .as_str()
            .expect("job has a placement");
        let workers = self.cli_json(&["workers", "--all"]);
        let name = workers
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["id"] == worker_id))
            .and_then(|w| w["name"].as_str())
            .unwrap_or_else(|| panic!("worker {worker_id} not listed: {workers}"));
        name.trim_start_matches('w')
            .parse()
            .expect("worker names are w<index>")
    }

    /// Prints every process's log tail to stderr.
    pub fn dump_logs(&self) {
        eprintln!(
            "===== {} (last 80 lines) =====\n{}",
            self.coordinator.name,
            self.coordinator.log_tail(80)
        );
        for w in &self.workers {
            eprintln!("===== {} (last 80 lines) =====\n{}", w.name, w.log_tail(80));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for w in &mut self.workers {
            w.kill9();
        }
        self.coordinator.kill9();
        // Ranks of SIGKILLed workers may outlive them: kill any rank started for this cluster.
        let needle = hex(self.dir.path().display().to_string().as_bytes());
        for pid in pids_with_assignment_containing(&needle) {
            // SAFETY: plain kill(2) of a rank process this test started.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

/// Reads the coordinator's first stdout line (`... listening on ADDR`); the rest of its
/// stdout goes to its log file.
/// Waits until `trainyard workers -o json`, run through `cli`, lists at least `n` alive
/// workers.
pub(crate) fn wait_for_alive_workers(n: usize, cli: impl Fn(&[&str]) -> Output) {
    poll(
        &format!("{n} alive workers"),
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let out = cli(&["workers", "-o", "json"]);
            if out.code != 0 {
                return None;
            }
            let alive = out
                .json()
                .as_array()
                .map(|ws| ws.iter().filter(|w| w["state"] == "ALIVE").count())
                .unwrap_or(0);
            (alive >= n).then_some(())
        },
    );
}

pub fn read_listen_addr(proc: &mut Proc, timeout: Duration) -> SocketAddr {
    read_listen_addr_or_exit(proc, timeout).unwrap_or_else(|| {
        panic!(
            "the coordinator exited without printing its address; its log:\n{}",
            proc.log_tail(80)
        )
    })
}

/// Like [`read_listen_addr`], but `None` when the process closes its stdout (exits)
/// before printing an address. Panics after `timeout`.
pub fn read_listen_addr_or_exit(proc: &mut Proc, timeout: Duration) -> Option<SocketAddr> {
    let stdout = proc
        .child
        .as_mut()
        .and_then(|c| c.stdout.take())
        .expect("piped stdout");
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&proc.log_path)
        .expect("opening the coordinator log");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(log, "{line}");
            if let Some(addr) = line.split("listening on ").nth(1) {
                if let (Some(t), Ok(a)) = (tx.as_ref(), addr.trim().parse::<SocketAddr>()) {
                    let _ = t.send(a);
                    tx = None;
                }
            }
        }
    });
    match rx.recv_timeout(timeout) {
        Ok(addr) => Some(addr),
        Err(mpsc::RecvTimeoutError::Disconnected) => None,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!(
            "the coordinator did not print its address within {timeout:?}; its log:\n{}",
            proc.log_tail(80)
        ),
    }
}

/// Lower-case hex of bytes (how the worker encodes `TRAINYARD_ASSIGNMENT`).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Pids of processes whose `TRAINYARD_ASSIGNMENT` environment variable contains `needle`
/// (hex of the protobuf-encoded assignment: `hex(job_id)` finds a job's ranks).
pub fn pids_with_assignment_containing(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(environ) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let found = environ.split(|b| *b == 0).any(|var| {
            var.strip_prefix(b"TRAINYARD_ASSIGNMENT=")
                .is_some_and(|v| String::from_utf8_lossy(v).contains(needle))
        });
        if found && !is_zombie(pid) {
            out.push(pid);
        }
    }
    out
}

/// True if the process is a zombie (exited, not yet reaped) or gone.
pub fn is_zombie(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // state is the field after the ")" that closes the command name
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .map(|r| r.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => true,
    }
}

/// Pids of the live rank processes of job `job_id`.
pub fn rank_pids(job_id: &str) -> Vec<u32> {
    pids_with_assignment_containing(&hex(job_id.as_bytes()))
}

/// True while process `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    !is_zombie(pid)
}

/// The answer to one plain HTTP/1.1 request.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body as text.
    pub body: String,
}

/// Sends `method path` to `addr` over plain HTTP/1.1 (`Connection: close`) and reads the
/// whole answer; `None` when the connection fails (nothing listens yet).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> Option<HttpResponse> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Decodes a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// Tiny `neural-ode` settings for e2e tests: the job name and `--set` flags that train in
/// seconds. `train_samples` scales how long it lasts (batches of 16); `checkpoint_every`
/// is in steps.
pub fn tiny_neural_ode_args(train_samples: u32, checkpoint_every: u32) -> Vec<String> {
    [
        "neural-ode".to_string(),
        "--preset".into(),
        "quick".into(),
        "--set".into(),
        format!("train_samples={train_samples}"),
        "--set".into(),
        "test_samples=64".into(),
        "--set".into(),
        "eval_batch_size=64".into(),
        "--set".into(),
        "epochs=1".into(),
        "--set".into(),
        "width=4".into(),
        "--set".into(),
        "batch_size=16".into(),
        "--set".into(),
        format!("checkpoint_every={checkpoint_every}"),
        "--set".into(),
        "log_every=1".into(),
    ]
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_matches_the_worker_encoding() {
        assert_eq!(hex(b"j-1"), "6a2d31");
    }

    #[test]
    fn poll_returns_the_first_some() {
        let mut n = 0;
        let v = poll(
            "n == 3",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                (n == 3).then_some(n)
            },
        );
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "timed out")]
    fn poll_times_out() {
        poll::<()>(
            "never",
            Duration::from_millis(30),
            Duration::from_millis(5),
            || None,
        );
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\n").as_deref(),
            Some("hello world")
        );
        assert_eq!(dechunk("zz\r\n"), None);
    }

    #[test]
    fn free_port_is_bindable() {
        let p = free_port();
        assert!(p > 0);
        TcpListener::bind(("127.0.0.1", p)).expect("port is free");
    }

    #[test]
    fn own_process_is_alive_and_not_a_rank() {
        assert!(pid_alive(std::process::id()));
        assert!(!rank_pids("no-such-job-id").contains(&std::process::id()));
    }
}
