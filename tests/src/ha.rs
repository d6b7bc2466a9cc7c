//! Highly available test clusters: several coordinators sharing one etcd (a unique key
//! prefix per cluster), and workers pointed at all of them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{free_port, poll, read_listen_addr, run_cli, Output, Proc, CLI_TIMEOUT};

/// The environment variable naming the test etcd's endpoints (`scripts/etcd.sh up`).
pub const ETCD_ENV: &str = "TRAINYARD_ETCD_ENDPOINTS";

/// The etcd endpoints for tests, or `None` (with a notice) when none is configured.
/// Panics when etcd is required: in CI (`CI` set) or with `TRAINYARD_REQUIRE_ETCD=1`.
pub fn etcd_endpoints(test: &str) -> Option<String> {
    match std::env::var(ETCD_ENV) {
        Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
        _ => {
            let required = std::env::var_os("CI").is_some()
                || std::env::var("TRAINYARD_REQUIRE_ETCD").is_ok_and(|v| v == "1");
            if required {
                panic!("{test}: {ETCD_ENV} is not set, and etcd is required here (CI or TRAINYARD_REQUIRE_ETCD=1); start one with `eval \"$(scripts/etcd.sh up)\"`");
            }
            eprintln!("SKIPPED {test}: {ETCD_ENV} is not set (start a test etcd with `eval \"$(scripts/etcd.sh up)\"`)");
            None
        }
    }
}

/// A store URL for `endpoints` (`http://h:p,...`) under a key prefix unique to this call.
pub fn unique_store_url(endpoints: &str) -> String {
    let hosts: Vec<&str> = endpoints
        .split(',')
        .map(|e| e.trim().trim_start_matches("http://").trim_end_matches('/'))
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "etcd://{}/trainyard-test-{}-{nanos}",
        hosts.join(","),
        std::process::id()
    )
}

/// Several coordinators over one etcd, and workers pointed at all of them.
pub struct HaCluster {
    /// Temporary directory: objects, work dirs, logs.
    pub dir: tempfile::TempDir,
    /// The store URL every coordinator uses.
    pub store_url: String,
    /// Coordinator addresses, by index.
    pub addrs: Vec<SocketAddr>,
    /// Coordinator processes, by index.
    pub coordinators: Vec<Proc>,
    /// Worker processes, by index (names `w0`, `w1`, ...).
    pub workers: Vec<Proc>,
}

impl HaCluster {
    /// Starts `coordinators` coordinators on `endpoints` and `workers` workers of one
    /// `cpu:1` slot each; waits until a leader is elected and every worker is alive.
    pub fn start(endpoints: &str, coordinators: usize, workers: usize) -> HaCluster {
        let dir = tempfile::Builder::new()
            .prefix("trainyard-ha-")
            .tempdir()
            .expect("tempdir");
        let mut c = HaCluster {
            store_url: unique_store_url(endpoints),
            dir,
            addrs: Vec::new(),
            coordinators: Vec::new(),
            workers: Vec::new(),
        };
        for i in 0..coordinators {
            c.start_coordinator(i);
        }
        c.wait_for_leader(Duration::from_secs(30));
        for i in 0..workers {
            c.start_worker(i);
        }
        c.wait_for_workers(workers);
        c
    }

    fn start_coordinator(&mut self, i: usize) {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let objects = self.dir.path().join("objects");
        let args: Vec<String> = vec![
            "coordinator".into(),
            "--listen".into(),
            listen.clone(),
            "--advertise".into(),
            listen,
            "--data-dir".into(),
            self.dir.path().join(format!("c{i}")).display().to_string(),
            "--store".into(),
            self.store_url.clone(),
            "--objects".into(),
            format!("file://{}", objects.display()),
            "--heartbeat-timeout".into(),
            crate::HEARTBEAT_TIMEOUT_S.into(),
        ];
        let log = self.dir.path().join(format!("coordinator-c{i}.log"));
        let mut p = Proc::spawn(&format!("coordinator c{i}"), &args, &log, true);
        let addr = read_listen_addr(&mut p, Duration::from_secs(60));
        self.addrs.push(addr);
        self.coordinators.push(p);
    }

    fn start_worker(&mut self, i: usize) {
        let name = format!("w{i}");
        let args: Vec<String> = vec![
            "worker".into(),
            "--coordinator".into(),
            self.urls(),
            "--name".into(),
            name.clone(),
            "--devices".into(),
            "cpu:1".into(),
            "--work-dir".into(),
            self.dir
                .path()
                .join("workers")
                .join(&name)
                .display()
                .to_string(),
        ];
        let log = self.dir.path().join(format!("worker-{name}.log"));
        self.workers
            .push(Proc::spawn(&format!("worker {name}"), &args, &log, false));
    }

    /// Every coordinator's URL, comma-separated (the `--coordinator` value).
    pub fn urls(&self) -> String {
        self.addrs
            .iter()
            .map(|a| format!("http://{a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `trainyard --coordinator <url> <args>` against `url`.
    pub fn cli_at(&self, url: &str, args: &[&str]) -> Output {
        let mut full = vec!["--coordinator", url];
        full.extend_from_slice(args);
        run_cli(&full, &[], CLI_TIMEOUT)
    }

    /// Runs a CLI command against every coordinator (the client finds the leader).
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_at(&self.urls(), args)
    }

    /// The index of the coordinator whose log says it leads now (its latest leadership
    /// line is "became the leader"), if any.
    pub fn leader_index(&self) -> Option<usize> {
        (0..self.coordinators.len()).find(|&i| {
            let pid = self.coordinators[i].pid();
            if pid == 0 || !crate::pid_alive(pid) {
                return false;
            }
            let log = std::fs::read_to_string(&self.coordinators[i].log_path).unwrap_or_default();
            let won = log.rfind("became the leader");
            let lost = log
                .rfind("lost leadership")
                .max(log.rfind("resigning leadership"));
            matches!((won, lost), (Some(w), l) if l.is_none_or(|l| l < w))
        })
    }

    /// Waits until some coordinator leads; returns its index.
    pub fn wait_for_leader(&self, timeout: Duration) -> usize {
        poll("a leader", timeout, Duration::from_millis(50), || {
            self.leader_index()
        })
    }

    /// Waits until at least `n` workers are alive (as the leader sees them).
    pub fn wait_for_workers(&self, n: usize) {
        crate::wait_for_alive_workers(n, |args| self.cli(args));
    }

    /// `describe <id> -o json` through `url`, if it answers.
    pub fn describe_at(&self, url: &str, id: &str) -> Option<Value> {
        let out = self.cli_at(url, &["describe", id, "-o", "json"]);
        (out.code == 0).then(|| out.json())
    }

    /// Polls the job through every coordinator until `pred` holds (panics after `timeout`).
    pub fn wait_job(&self, id: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(job) = self.describe_at(&self.urls(), id) {
                if pred(&job) {
                    return job;
                }
                last = job;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("job {id}: condition not reached within {timeout:?}; last seen:\n{last:#}");
    }

    /// The folder of every process's log.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Prints every process's log tail to stderr.
    pub fn dump_logs(&self) {
        for p in self.coordinators.iter().chain(&self.workers) {
            eprintln!("===== {} (last 60 lines) =====\n{}", p.name, p.log_tail(60));
        }
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for w in &mut self.workers {
            w.kill9();
        }
        for c in &mut self.coordinators {
            c.kill9();
        }
        let needle = crate::hex(self.dir.path().display().to_string().as_bytes());
        for pid in crate::pids_with_assignment_containing(&needle) {
            // SAFETY: plain kill(2) of a rank process this test started.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        // Best effort: remove this cluster's keys from the shared etcd.
        if let Some(prefix) = self.store_url.strip_prefix("etcd://").and_then(|r| {
            r.find('/')
                .map(|i| (r[..i].to_string(), r[i..].to_string()))
        }) {
            let _ = std::process::Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args([
                    "--endpoints",
                    &prefix.0,
                    "del",
                    "--prefix",
                    &format!("{}/", prefix.1),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// A private single-member etcd started by one test (free ports, its own temporary data
/// directory), so that the test can stop and restart it without touching the shared one.
/// Killed on drop.
pub struct EtcdMember {
    /// Data directory and log (kept across restarts).
    pub dir: tempfile::TempDir,
    /// Client endpoint, `http://127.0.0.1:<port>`.
    pub endpoint: String,
    peer_port: u16,
    child: Option<std::process::Child>,
    starts: usize,
}

impl EtcdMember {
    /// Starts a member (the `etcd` binary on the PATH) and waits until it answers.
    pub fn start() -> EtcdMember {
        let dir = tempfile::Builder::new()
            .prefix("trainyard-etcd-")
            .tempdir()
            .expect("tempdir");
        let mut m = EtcdMember {
            endpoint: format!("http://127.0.0.1:{}", free_port()),
            peer_port: free_port(),
            dir,
            child: None,
            starts: 0,
        };
        m.start_again();
        m
    }

    /// (Re)starts the member on the same ports and data directory; waits until healthy.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        self.starts += 1;
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let child = std::process::Command::new("etcd")
            .args([
                "--name",
                "trainyard-e2e",
                "--data-dir",
                &self.dir.path().join("data").display().to_string(),
                "--listen-client-urls",
                &self.endpoint,
                "--advertise-client-urls",
                &self.endpoint,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("trainyard-e2e={peer}"),
                "--initial-cluster-state",
                "new",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("spawning etcd (is it installed? scripts/etcd.sh up installs it): {e}")
            });
        self.child = Some(child);
        poll(
            "the private etcd member to be healthy",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || self.healthy().then_some(()),
        );
    }

    /// True when `etcdctl endpoint health` succeeds.
    pub fn healthy(&self) -> bool {
        std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.endpoint,
                "--dial-timeout=1s",
                "--command-timeout=2s",
                "endpoint",
                "health",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// SIGKILLs the member (its data directory stays) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "===== private etcd (last 30 lines) =====\n{}",
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
        self.kill9();
    }
}
