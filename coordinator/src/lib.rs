//! Trainyard's coordinator: the gRPC API server (JobService, WorkerService, ClusterService,
//! gRPC health and server reflection on one port), the scheduler and the state store.
//!
//! Layout (Ballista style — scheduling logic is pure, state sits behind a narrow trait):
//! - [`store`]: the [`store::StateStore`] trait (etcd semantics), its embedded redb and etcd
//!   backends, and [`store::open`], which picks one from the store URL;
//! - [`lifecycle`]: the job state machine;
//! - [`scheduler::placement`]: placement as a pure function; [`scheduler`]: the loop;
//! - [`coordinator`]: the operations behind the services; [`service`]: the tonic adapters;
//! - [`retention`]: which checkpoints a job keeps, and the task that deletes the others;
//! - [`durable`]: job logs, metrics and results in the object store;
//! - [`metrics`]: Prometheus metrics and the `/metrics` endpoint;
//! - [`auth`]: who may call what (tokens, roles, job ownership); [`limits`]: request
//!   size, report and pending-job limits.
//!
//! ```no_run
//! # async fn demo() -> Result<(), trainyard_coordinator::CoordinatorError> {
//! let config = trainyard_coordinator::CoordinatorConfig::with_data_dir(std::path::Path::new("/tmp/ty"));
//! let handle = trainyard_coordinator::start(config).await?;
//! println!("listening on {}", handle.local_addr());
//! handle.shutdown().await
//! # }
//! ```

#![warn(missing_docs)]

pub mod auth;
pub mod coordinator;
pub mod durable;
pub mod job_types;
pub mod leader;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod rendezvous;
pub mod retention;
pub mod scheduler;
pub mod service;
pub mod state;
pub mod store;
pub mod validate;

#[cfg(test)]
mod objects_tests;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use trainyard_proto::cluster_service_server::ClusterServiceServer;
use trainyard_proto::job_service_server::JobServiceServer;
use trainyard_proto::worker_service_server::WorkerServiceServer;

use crate::coordinator::{Coordinator, Settings};
use crate::service::{ClusterApi, JobApi, WorkerApi};
use crate::store::StoreError;

/// How the coordinator runs.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    /// Address to serve on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// State store URL (see [`store::open`]): `file:///abs/path/state.redb` (embedded redb)
    /// or `etcd://host1:2379,host2:2379[/prefix]` (etcd).
    pub store_url: String,
    /// Object store for checkpoints: `file:///abs/path/objects`, `s3://bucket/prefix`,
    /// `gs://...` or `az://...` (see `trainyard_objects::config`). Probed at start; sent
    /// to workers as is (credentials stay in each process's environment).
    pub objects_url: String,
    /// How often workers heartbeat (default 1 s).
    pub heartbeat_interval: Duration,
    /// A worker silent this long is dead (default 5 s).
    pub heartbeat_timeout: Duration,
    /// The address other coordinators, workers and clients reach this one at (`host:port`),
    /// published in the leader election; default: the bound listen address.
    pub advertise: Option<String>,
    /// Age after which a checkpoint folder without a manifest (outside the index, not of
    /// the job's current attempt) is deleted (default 1 h).
    pub orphan_checkpoint_age: Duration,
    /// How long a finished job's events stay in memory once written to the object store
    /// (default 60 s).
    pub finished_history_kept: Duration,
    /// How job logs and metrics are written to the object store.
    pub durable: durable::DurableOptions,
    /// Where to serve Prometheus metrics (`GET /metrics`, see [`metrics`]); port 0 picks a
    /// free one ([`CoordinatorHandle::metrics_addr`]). `None` (the default): not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Who may call (see [`auth`]). `None`: everyone is the anonymous admin, which
    /// [`start`] allows only on a loopback address unless [`CoordinatorConfig::insecure`].
    pub credentials: Option<Arc<trainyard_auth::Credentials>>,
    /// TLS on the gRPC port (with a client CA: mutual TLS for workers); `None`: plaintext.
    pub tls: Option<trainyard_auth::tls::ServerTlsFiles>,
    /// Serve without credentials on a non-loopback address anyway (logged as a warning
    /// at every start).
    pub insecure: bool,
    /// Request, report and pending-job limits.
    pub limits: limits::Limits,
}

impl CoordinatorConfig {
    /// Defaults with the store and the objects under `dir`; listens on 127.0.0.1:7800.
    pub fn with_data_dir(dir: &Path) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7800)),
            store_url: format!("file://{}", dir.join("state.redb").display()),
            objects_url: format!("file://{}", dir.join("objects").display()),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            advertise: None,
            orphan_checkpoint_age: retention::ORPHAN_CHECKPOINT_AGE,
            finished_history_kept: coordinator::FINISHED_HISTORY_KEPT,
            durable: durable::DurableOptions::default(),
            metrics_listen: None,
            credentials: None,
            tls: None,
            insecure: false,
            limits: limits::Limits::default(),
        }
    }
}

/// Why the coordinator could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The configuration is unusable.
    #[error("invalid coordinator config: {0}")]
    Config(String),
    /// The object store cannot be used: a bad URL, missing or rejected credentials, a
    /// missing bucket, an unreachable endpoint (the start-up probe failed).
    #[error(transparent)]
    Objects(#[from] trainyard_objects::ObjectsError),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server error: {0}")]
    Server(#[from] tonic::transport::Error),
    /// A background task panicked or was aborted.
    #[error("coordinator task failed: {0}")]
    Task(String),
}

impl CoordinatorError {
    /// Whether the error is the configuration's fault (a bad setting or URL, rejected
    /// credentials, a missing bucket): the CLI exits with code 2 for these.
    pub fn is_config_error(&self) -> bool {
        match self {
            CoordinatorError::Config(_) => true,
            CoordinatorError::Objects(e) => e.is_config_error(),
            _ => false,
        }
    }
}

/// A running coordinator. Dropping the handle without [`CoordinatorHandle::wait`] or
/// [`CoordinatorHandle::shutdown`] also stops the server (gracefully, in the background).
pub struct CoordinatorHandle {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    scheduler: JoinHandle<()>,
    elector: Option<leader::Elector>,
    durable: durable::Sink,
    durable_task: JoinHandle<()>,
    retention_task: JoinHandle<()>,
    metrics_addr: Option<SocketAddr>,
    metrics_task: Option<JoinHandle<std::io::Result<()>>>,
    #[cfg_attr(not(test), allow(dead_code))]
    coord: Arc<Coordinator>,
}

impl std::fmt::Debug for CoordinatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorHandle")
            .field("local_addr", &self.local_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

/// How long a graceful shutdown waits for the server to drain.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl CoordinatorHandle {
    /// The address the server listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the `/metrics` endpoint (with the real port when 0 was asked for),
    /// if [`CoordinatorConfig::metrics_listen`] was set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The coordinator behind the server (for in-process tests).
    #[cfg(test)]
    pub(crate) fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coord
    }

    /// Stops the server and the scheduler gracefully: open streams end, in-flight calls finish.
    pub async fn shutdown(self) -> Result<(), CoordinatorError> {
        let _ = self.shutdown.send(true);
        self.wait().await
    }

    /// Waits until the server ends (after [`CoordinatorHandle::shutdown`] or a fatal error).
    pub async fn wait(self) -> Result<(), CoordinatorError> {
        let mut server = self.server;
        let served = if *self.shutdown.borrow() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!("server did not drain in time; aborting it");
                    server.abort();
                    Ok(Ok(()))
                }
            }
        } else {
            (&mut server).await
        };
        let _ = self.shutdown.send(true);
        if let Some(elector) = self.elector {
            elector.stop().await;
        }
        let sched = self.scheduler.await;
        let _ = self.retention_task.await;
        if let Some(task) = self.metrics_task {
            match tokio::time::timeout(SHUTDOWN_GRACE, task).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "metrics endpoint failed"),
                Ok(_) => {}
                Err(_) => tracing::warn!("metrics endpoint did not stop in time"),
            }
        }
        // Job history accepted so far goes to the object store before we stop.
        if !self.durable.flush(SHUTDOWN_GRACE).await {
            tracing::warn!("not all job history reached the object store before shutdown");
        }
        self.durable_task.abort();
        served.map_err(|e| CoordinatorError::Task(e.to_string()))??;
        sched.map_err(|e| CoordinatorError::Task(e.to_string()))?;
        Ok(())
    }
}

/// Opens the object store through `trainyard-objects` (creating the folder of a `file://`
/// URL) and probes it: a small object written, read back and deleted, so wrong
/// credentials or a missing bucket fail the start, not a job an hour later.
async fn prepare_objects(url: &str) -> Result<trainyard_objects::Objects, CoordinatorError> {
    let objects = trainyard_objects::open_and_probe(url).await?;
    tracing::info!(objects = %objects.url(), "object store probe passed");
    Ok(objects)
}

/// Opens the store (waiting for etcd while it is unreachable), recovers unfinished jobs,
/// binds the port and serves every service.
pub async fn start(config: CoordinatorConfig) -> Result<CoordinatorHandle, CoordinatorError> {
    if config.heartbeat_timeout.is_zero() || config.heartbeat_interval.is_zero() {
        return Err(CoordinatorError::Config(
            "heartbeat_interval and heartbeat_timeout must be > 0".into(),
        ));
    }
    if config.heartbeat_timeout <= config.heartbeat_interval {
        return Err(CoordinatorError::Config(
            "heartbeat_timeout must be longer than heartbeat_interval".into(),
        ));
    }
    check_exposure(&config)?;
    trainyard_auth::install_crypto_provider();
    // Read the TLS files before anything else starts, so a bad file fails the start.
    let tls = match &config.tls {
        Some(files) => Some(
            files
                .load()
                .map_err(|e| CoordinatorError::Config(e.to_string()))?,
        ),
        None => None,
    };
    let objects = prepare_objects(&config.objects_url).await?;
    let (store, etcd) = match store::StoreUrl::parse(&config.store_url)? {
        store::StoreUrl::Etcd(cfg) => {
            let etcd = store::EtcdStore::connect(cfg).await?;
            let election = (etcd.client().clone(), format!("{}leader", etcd.root()));
            (Arc::new(etcd) as Arc<dyn store::StateStore>, Some(election))
        }
        store::StoreUrl::Embedded(_) => (store::open(&config.store_url).await?, None),
    };

    let metrics_listener = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| CoordinatorError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| CoordinatorError::Bind { addr, source })?;
            Some((listener, bound))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| CoordinatorError::Bind {
            addr: config.listen,
            source,
        })?;

    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| local_addr.to_string());
    let (elector, leadership) = match etcd {
        Some((client, name)) => {
            let elector = leader::Elector::start(client, name, advertise.clone());
            let watch = elector.watch();
            (Some(elector), watch)
        }
        None => (None, leader::single_node(&advertise)),
    };
    let (sink, durable_task) = durable::Sink::start(objects.clone(), config.durable);
    let (retention_queue, retention_rx) = retention::RetentionQueue::new();
    let coord = Arc::new(
        Coordinator::new(
            store,
            Settings {
                heartbeat_interval: config.heartbeat_interval,
                heartbeat_timeout: config.heartbeat_timeout,
                objects_url: config.objects_url.clone(),
                orphan_checkpoint_age: config.orphan_checkpoint_age,
                finished_history_kept: config.finished_history_kept,
                limits: config.limits,
            },
        )
        .with_leadership(leadership.clone())
        .with_objects(objects, sink.clone(), retention_queue),
    );
    // A single node leads from the start: reconcile before serving. An elected leader
    // reconciles in the scheduler loop when it wins.
    let leading = coord.leadership.borrow().is_leader;
    if leading {
        coord.recover().await?;
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    set_service_health(&health, &leadership.borrow().clone()).await;
    tokio::spawn(follow_health(health.clone(), leadership));
    health
        .set_serving::<ClusterServiceServer<ClusterApi>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(trainyard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::Config(format!("reflection: {e}")))?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let scheduler = tokio::spawn(scheduler::run(coord.clone(), shutdown_rx.clone(), leading));
    let retention_task = tokio::spawn(retention::run(
        coord.clone(),
        retention_rx,
        shutdown_rx.clone(),
    ));

    let credentials = config.credentials.clone();
    let mtls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    let users = auth::Guard::new(credentials.clone(), auth::Audience::Users, false);
    let workers = auth::Guard::new(credentials, auth::Audience::Workers, mtls);
    let max = config.limits.max_request_bytes;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .layer(tower::util::MapResponseLayer::new(
            limits::name_request_size_limit::<tonic::body::Body>
                as fn(
                    tonic::codegen::http::Response<tonic::body::Body>,
                ) -> tonic::codegen::http::Response<tonic::body::Body>,
        ))
        // Health stays open: Kubernetes probes and load balancers carry no token.
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection, users.clone()))
        .add_service(InterceptedService::new(
            JobServiceServer::new(JobApi {
                coord: coord.clone(),
            })
            .max_decoding_message_size(max),
            users.clone(),
        ))
        .add_service(InterceptedService::new(
            WorkerServiceServer::new(WorkerApi {
                coord: coord.clone(),
            })
            .max_decoding_message_size(max),
            workers,
        ))
        .add_service(InterceptedService::new(
            ClusterServiceServer::new(ClusterApi {
                coord: coord.clone(),
            })
            .max_decoding_message_size(max),
            users,
        ));
    let (metrics_addr, metrics_task) = match metrics_listener {
        Some((listener, bound)) => {
            tracing::info!(addr = %bound, "metrics endpoint listening (GET /metrics)");
            let task = tokio::spawn(metrics::serve(listener, coord.clone(), shutdown_rx.clone()));
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    let mut stop = shutdown_rx;
    let handle_coord = coord.clone();
    let server = tokio::spawn(async move {
        let signal = async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            // End the long-lived streams so the graceful shutdown can finish.
            coord.close_streams().await;
        };
        server
            .serve_with_incoming_shutdown(
                // Without TCP_NODELAY, Nagle's algorithm and delayed ACKs add ~40 ms to
                // every unary call.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                signal,
            )
            .await
    });
    tracing::info!(addr = %local_addr, store = %store::redact_url(&config.store_url), "coordinator listening");
    Ok(CoordinatorHandle {
        local_addr,
        shutdown: shutdown_tx,
        server,
        scheduler,
        elector,
        durable: sink,
        durable_task,
        retention_task,
        metrics_addr,
        metrics_task,
        coord: handle_coord,
    })
}

/// Refuses to serve without credentials on an address others can reach, unless
/// `insecure`; says how the coordinator is exposed either way.
fn check_exposure(config: &CoordinatorConfig) -> Result<(), CoordinatorError> {
    let loopback = config.listen.ip().is_loopback();
    match (&config.credentials, loopback, config.insecure) {
        (Some(creds), _, _) => {
            let (users, workers) = creds.counts();
            tracing::info!(
                users,
                join_tokens = workers,
                tls = config.tls.is_some(),
                "authentication on: every call needs a token"
            );
            if config.tls.is_none() && !loopback {
                tracing::warn!(
                    "serving tokens over plaintext gRPC on a non-loopback address: anyone on \
                     the network path can read them; set --tls-cert and --tls-key"
                );
            }
        }
        (None, true, _) => tracing::info!(
            "no --auth-file: serving without authentication, on loopback only ({})",
            config.listen
        ),
        (None, false, true) => tracing::warn!(
            "--insecure: serving WITHOUT authentication on {}: anyone who can reach it can \
             submit and cancel jobs and join as a worker",
            config.listen
        ),
        (None, false, false) => {
            return Err(CoordinatorError::Config(format!(
                "--listen: {} is not a loopback address and no --auth-file is set, so anyone \
                 who can reach it could submit and cancel jobs and join as a worker; create \
                 an auth file with `trainyard auth add-user`, or pass --insecure to serve \
                 without authentication anyway",
                config.listen
            )))
        }
    }
    Ok(())
}

/// JobService is SERVING while the store answers (followers serve reads); WorkerService
/// only on the leader while the store answers, so probes and load balancers route workers
/// there. While etcd is unreachable both are NOT_SERVING.
async fn set_service_health(
    health: &tonic_health::server::HealthReporter,
    leadership: &leader::Leadership,
) {
    if leadership.store_reachable {
        health.set_serving::<JobServiceServer<JobApi>>().await;
    } else {
        health.set_not_serving::<JobServiceServer<JobApi>>().await;
    }
    if leadership.is_leader && leadership.store_reachable {
        health.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    } else {
        health
            .set_not_serving::<WorkerServiceServer<WorkerApi>>()
            .await;
    }
}

/// Keeps the JobService and WorkerService health in step with the leadership watch
/// ("" and ClusterService stay SERVING on every coordinator).
async fn follow_health(
    health: tonic_health::server::HealthReporter,
    mut leadership: watch::Receiver<leader::Leadership>,
) {
    let mut last: Option<(bool, bool)> = None;
    loop {
        let l = leadership.borrow_and_update().clone();
        let now = (l.is_leader, l.store_reachable);
        if last != Some(now) {
            if !l.store_reachable {
                tracing::warn!("the state store is unreachable: reporting NOT_SERVING");
            } else if last.is_some_and(|(_, reachable)| !reachable) {
                tracing::info!("the state store answers again: reporting SERVING");
            }
            set_service_health(&health, &l).await;
            last = Some(now);
        }
        if leadership.changed().await.is_err() {
            break;
        }
    }
}
