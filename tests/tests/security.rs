//! Security end to end, over real processes: TLS and mutual TLS with certificates from
//! `trainyard certs init`, bearer and join tokens from `trainyard auth`, job ownership,
//! the worker/user separation, limits, and the loopback-only default without credentials.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use trainyard_proto::worker_service_client::WorkerServiceClient;
use trainyard_proto::{rank_event, HeartbeatRequest, LogLine, RankEvent, RankReport};
use trainyard_tests::{
    free_port, poll, read_listen_addr, read_listen_addr_or_exit, run_cli, tiny_neural_ode_args,
    Output, Proc, HEARTBEAT_TIMEOUT_S,
};

const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the CLI and checks it succeeded.
fn cli_ok(args: &[&str], envs: &[(&str, &str)]) -> Output {
    run_cli(args, envs, CLI_TIMEOUT).ok()
}

/// Checks a refused command: exit code 2, stderr mentions every needle.
fn assert_refused(out: &Output, needles: &[&str]) {
    assert_eq!(
        out.code,
        2,
        "`{}` should exit 2:\n{}",
        out.command,
        out.describe()
    );
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "`{}`: stderr should mention {n:?}:\n{}",
            out.command,
            out.describe()
        );
    }
}

/// Users alice, bob (role user) and root (admin), and join token pool, in `dir/auth.toml`;
/// each token also in `dir/<name>.tok`. Returns the auth file.
fn make_auth_file(dir: &Path) -> PathBuf {
    let file = dir.join("auth.toml");
    let f = file.display().to_string();
    for (name, role) in [("alice", "user"), ("bob", "user"), ("root", "admin")] {
        let tok = dir.join(format!("{name}.tok")).display().to_string();
        let out = cli_ok(
            &[
                "auth",
                "--auth-file",
                &f,
                "add-user",
                name,
                "--role",
                role,
                "--token-out",
                &tok,
            ],
            &[],
        );
        assert!(out.stdout.trim().starts_with("tyu_"), "{}", out.describe());
    }
    let tok = dir.join("pool.tok").display().to_string();
    cli_ok(
        &[
            "auth",
            "--auth-file",
            &f,
            "add-worker",
            "pool",
            "--token-out",
            &tok,
        ],
        &[],
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let alice = token(dir, "alice");
    assert!(
        !text.contains(&alice),
        "the auth file holds a token in clear"
    );
    let listed = cli_ok(&["auth", "--auth-file", &f, "list"], &[]);
    assert!(listed.stdout.contains("root") && listed.stdout.contains("admin"));
    file
}

fn token(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.tok")))
        .unwrap()
        .trim()
        .to_string()
}

/// A coordinator process with extra flags; returns it and its address.
fn start_coordinator(dir: &Path, extra: &[String]) -> (Proc, std::net::SocketAddr) {
    let mut args: Vec<String> = vec![
        "coordinator".into(),
        "--listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--data-dir".into(),
        dir.join("coordinator").display().to_string(),
        "--objects".into(),
        format!("file://{}", dir.join("objects").display()),
        "--heartbeat-timeout".into(),
        HEARTBEAT_TIMEOUT_S.into(),
    ];
    args.extend(extra.iter().cloned());
    let mut proc = Proc::spawn("coordinator", &args, &dir.join("coordinator.log"), true);
    let addr = read_listen_addr(&mut proc, Duration::from_secs(60));
    (proc, addr)
}

fn start_worker(dir: &Path, name: &str, url: &str, extra: &[String]) -> Proc {
    let mut args: Vec<String> = vec![
        "--coordinator".into(),
        url.into(),
        "worker".into(),
        "--name".into(),
        name.into(),
        "--devices".into(),
        "cpu:1".into(),
        "--work-dir".into(),
        dir.join(name).display().to_string(),
    ];
    args.extend(extra.iter().cloned());
    Proc::spawn(
        &format!("worker {name}"),
        &args,
        &dir.join(format!("{name}.log")),
        false,
    )
}

/// `trainyard --coordinator URL --tls-ca CA <args>` as `user` (TRAINYARD_TOKEN).
struct Client {
    url: String,
    ca: String,
    dir: PathBuf,
}

impl Client {
    fn as_user(&self, user: &str, args: &[&str]) -> Output {
        let tok = token(&self.dir, user);
        self.with_token(Some(&tok), args)
    }

    fn with_token(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut all = vec!["--coordinator", &self.url, "--tls-ca", &self.ca];
        all.extend_from_slice(args);
        let envs: Vec<(&str, &str)> = token.map(|t| ("TRAINYARD_TOKEN", t)).into_iter().collect();
        run_cli(&all, &envs, CLI_TIMEOUT)
    }
}

async fn worker_client(url: &str, ca: &Path) -> WorkerServiceClient<tonic::transport::Channel> {
    let ca = std::fs::read(ca).unwrap();
    let channel = Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    WorkerServiceClient::new(channel)
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[test]
fn mutual_tls_tokens_and_job_ownership_end_to_end() {
    let tmp = tempfile::Builder::new()
        .prefix("trainyard-sec-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let certs = dir.join("certs");
    let c = |f: &str| certs.join(f).display().to_string();
    let out = cli_ok(
        &["certs", "init", "--out", &certs.display().to_string()],
        &[],
    );
    assert!(out.stdout.contains("ca.pem"), "{}", out.describe());
    let auth = make_auth_file(dir);

    let (mut coordinator, addr) = start_coordinator(
        dir,
        &[
            "--auth-file".into(),
            auth.display().to_string(),
            "--tls-cert".into(),
            c("coordinator.pem"),
            "--tls-key".into(),
            c("coordinator-key.pem"),
            "--tls-client-ca".into(),
            c("ca.pem"),
        ],
    );
    let url = format!("https://127.0.0.1:{}", addr.port());
    let client = Client {
        url: url.clone(),
        ca: c("ca.pem"),
        dir: dir.to_path_buf(),
    };
    let pool = token(dir, "pool");

    // A worker with the join token but no client certificate is refused (mTLS).
    let mut no_cert = start_worker(
        dir,
        "no-cert",
        &url,
        &[
            "--tls-ca".into(),
            c("ca.pem"),
            "--join-token-file".into(),
            dir.join("pool.tok").display().to_string(),
        ],
    );
    poll(
        "the worker without a certificate to be refused",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            std::fs::read_to_string(&no_cert.log_path)
                .unwrap_or_default()
                .contains("client certificate")
                .then_some(())
        },
    );
    no_cert.kill9();
    // With its certificate and join token it joins, over mutual TLS.
    let _worker = start_worker(
        dir,
        "w0",
        &url,
        &[
            "--tls-ca".into(),
            c("ca.pem"),
            "--tls-cert".into(),
            c("worker.pem"),
            "--tls-key".into(),
            c("worker-key.pem"),
            "--join-token-file".into(),
            dir.join("pool.tok").display().to_string(),
        ],
    );
    poll(
        "worker w0 to register",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let out = client.as_user("root", &["workers", "-o", "json"]);
            (out.code == 0 && out.stdout.contains("\"w0\"")).then_some(())
        },
    );

    // No token, a wrong token, a join token as a user token: refused.
    assert_refused(
        &client.with_token(None, &["jobs"]),
        &["missing bearer token", "Unauthenticated"],
    );
    assert_refused(
        &client.with_token(Some("tyu_0000"), &["jobs"]),
        &["not valid", "Unauthenticated"],
    );
    let ode = tiny_neural_ode_args(64, 1000);
    let mut submit: Vec<&str> = vec!["submit"];
    submit.extend(ode.iter().map(String::as_str));
    assert_refused(
        &client.with_token(Some(&pool), &submit),
        &["join token", "PermissionDenied"],
    );
    // Plain http:// to the TLS port gets nowhere.
    let plain = run_cli(
        &[
            "--coordinator",
            &format!("http://127.0.0.1:{}", addr.port()),
            "jobs",
        ],
        &[("TRAINYARD_TOKEN", &token(dir, "alice"))],
        CLI_TIMEOUT,
    );
    assert_ne!(plain.code, 0, "{}", plain.describe());

    // Alice's job runs on the mTLS worker; bob can neither read nor cancel it.
    let mut submit_json = submit.clone();
    submit_json.extend(["-o", "json"]);
    let out = client.as_user("alice", &submit_json).ok();
    let job: serde_json::Value = out.json();
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["owner"], "alice", "{}", out.stdout);
    assert_refused(
        &client.as_user("bob", &["describe", &id]),
        &["belongs to \"alice\"", "PermissionDenied"],
    );
    assert_refused(
        &client.as_user("bob", &["cancel", &id]),
        &["belongs to \"alice\"", "PermissionDenied"],
    );
    assert_refused(
        &client.as_user("bob", &["logs", &id]),
        &["PermissionDenied"],
    );
    let bobs = client.as_user("bob", &["jobs", "-o", "json"]).ok();
    assert!(
        !bobs.stdout.contains(&id),
        "bob sees alice's job: {}",
        bobs.stdout
    );
    assert_refused(
        &client.as_user("bob", &["jobs", "--user", "alice"]),
        &["own jobs"],
    );
    let done = poll(
        "alice's job to succeed",
        Duration::from_secs(120),
        Duration::from_millis(300),
        || {
            let out = client
                .as_user("alice", &["describe", &id, "-o", "json"])
                .ok();
            let v = out.json();
            match v["state"].as_str() {
                Some("SUCCEEDED") => Some(v),
                Some("FAILED" | "CANCELLED") => panic!("job ended badly: {}", out.stdout),
                _ => None,
            }
        },
    );
    assert_eq!(done["owner"], "alice");
    let admins = client
        .as_user("root", &["jobs", "--user", "alice", "-o", "json"])
        .ok();
    assert!(admins.stdout.contains(&id), "{}", admins.stdout);

    // The admin may cancel anyone's job; alice may cancel her own.
    let long = tiny_neural_ode_args(8000, 1000);
    let mut long_submit: Vec<&str> = vec!["submit"];
    long_submit.extend(long.iter().map(String::as_str));
    long_submit.extend(["--set", "epochs=50", "-o", "json"]);
    let second = client.as_user("alice", &long_submit).ok().json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    client.as_user("root", &["cancel", &second]).ok();
    let third = client.as_user("alice", &long_submit).ok().json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    client.as_user("alice", &["cancel", &third]).ok();

    // The worker protocol refuses user tokens, and wants a client certificate.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut w = worker_client(&url, &certs.join("ca.pem")).await;
        let hb = HeartbeatRequest {
            worker_id: "x".into(),
            ..Default::default()
        };
        let err = w
            .heartbeat(with_token(hb.clone(), &token(dir, "root")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        let err = w.heartbeat(with_token(hb, &pool)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains("client certificate"), "{err:?}");
    });
    coordinator.terminate(Duration::from_secs(10));
}

#[test]
fn limits_are_named_and_the_coordinator_keeps_serving() {
    let tmp = tempfile::Builder::new()
        .prefix("trainyard-limits-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let auth = make_auth_file(dir);
    let (mut coordinator, addr) = start_coordinator(
        dir,
        &[
            "--auth-file".into(),
            auth.display().to_string(),
            "--max-pending-jobs-per-user".into(),
            "2".into(),
            "--max-request-bytes".into(),
            "4096".into(),
            "--max-log-line-bytes".into(),
            "1000".into(),
        ],
    );
    let url = format!("http://{addr}");
    let as_user = |user: &str, args: &[&str]| {
        let mut all = vec!["--coordinator", url.as_str()];
        all.extend_from_slice(args);
        run_cli(&all, &[("TRAINYARD_TOKEN", &token(dir, user))], CLI_TIMEOUT)
    };
    // No workers: submitted jobs stay PENDING.
    let ode = tiny_neural_ode_args(64, 1000);
    let mut submit: Vec<&str> = vec!["submit"];
    submit.extend(ode.iter().map(String::as_str));
    as_user("alice", &submit).ok();
    as_user("alice", &submit).ok();
    assert_refused(
        &as_user("alice", &submit),
        &["max_pending_jobs_per_user", "ResourceExhausted"],
    );
    // Others are not held back by alice's cap.
    as_user("bob", &submit).ok();

    // A request over max_request_bytes.
    let huge = format!("--name={}", "x".repeat(8000));
    let mut big = submit.clone();
    big.push(&huge);
    assert_refused(
        &as_user("bob", &big),
        &["max_request_bytes", "ResourceExhausted"],
    );

    // A worker report with a log line over max_log_line_bytes.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut w = WorkerServiceClient::connect(url.clone()).await.unwrap();
        let report = RankReport {
            worker_id: "w".into(),
            job_id: "j".into(),
            attempt: 1,
            rank: 0,
            events: vec![RankEvent {
                at_unix_ms: 0,
                kind: Some(rank_event::Kind::Log(LogLine {
                    rank: 0,
                    stream: "stdout".into(),
                    line: "y".repeat(2000),
                })),
            }],
        };
        let err = w
            .report_rank(with_token(report, &token(dir, "pool")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("max_log_line_bytes"), "{err:?}");
    });

    // Still serving.
    let jobs = as_user("root", &["jobs", "-o", "json"]).ok();
    assert_eq!(
        jobs.json().as_array().map(Vec::len),
        Some(3),
        "{}",
        jobs.stdout
    );
    coordinator.terminate(Duration::from_secs(10));
}

#[test]
fn without_credentials_the_coordinator_stays_on_loopback_unless_insecure() {
    let tmp = tempfile::Builder::new()
        .prefix("trainyard-open-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let common = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = vec![
            "coordinator".into(),
            "--listen".into(),
            "0.0.0.0:0".into(),
            "--data-dir".into(),
            dir.join("coordinator").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let refused = run_cli(
        &common(&[]).iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        CLI_TIMEOUT,
    );
    assert_refused(&refused, &["--listen", "--insecure", "--auth-file"]);

    let mut open = Proc::spawn(
        "coordinator",
        &common(&["--insecure"]),
        &dir.join("insecure.log"),
        true,
    );
    let addr = read_listen_addr_or_exit(&mut open, Duration::from_secs(60));
    assert!(addr.is_some(), "{}", open.log_tail(40));
    let log = std::fs::read_to_string(&open.log_path).unwrap_or_default();
    assert!(log.contains("WITHOUT authentication"), "{log}");
    open.terminate(Duration::from_secs(10));
}
