//! An in-process cluster for `trainyard local` and `trainyard run`: a coordinator
//! (`trainyard_coordinator::start`) and N worker agents (`trainyard_worker::run_worker`)
//! in this process, each worker spawning `[this binary, "rank"]` children.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trainyard_coordinator::{CoordinatorConfig, CoordinatorHandle};
use trainyard_proto::{ListWorkersRequest, WorkerState};
use trainyard_worker::{parse_device_slots, run_worker, WorkerConfig};

use crate::args::ClusterArgs;
use crate::client::Client;
use crate::error::{bad_input, devices_error, rpc};

/// How long a local cluster may take until all its workers have registered.
const WORKERS_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running in-process cluster.
pub struct LocalCluster {
    coordinator: CoordinatorHandle,
    workers: Vec<(
        String,
        JoinHandle<Result<(), trainyard_worker::WorkerError>>,
    )>,
    stop: watch::Sender<bool>,
    /// Address the coordinator serves on.
    pub addr: SocketAddr,
    /// `http://` URL of the coordinator.
    pub url: String,
    /// Absolute data directory.
    pub data_dir: PathBuf,
    /// Address of the coordinator's `/metrics` endpoint, when `--metrics-listen` was given.
    pub metrics_addr: Option<SocketAddr>,
}

/// `path` made absolute against the current directory (without requiring it to exist).
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// A `file://` URL for an object-store or state-store location given as a URL or a path.
pub fn location_url(s: &str) -> Result<String> {
    if s.contains("://") {
        return Ok(s.to_string());
    }
    Ok(format!("file://{}", absolute(Path::new(s))?.display()))
}

/// The argv that starts a rank process: this binary with the hidden `rank` subcommand.
pub fn rank_command() -> Result<Vec<std::ffi::OsString>> {
    let exe =
        std::env::current_exe().context("locating the trainyard binary for rank processes")?;
    Ok(vec![exe.into_os_string(), "rank".into()])
}

/// A future that completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The metrics address of local worker `i` when the coordinator's is `coordinator`: the
/// port after it plus `i`, or port 0 (a free one) when the coordinator's port is 0.
pub fn worker_metrics_addr(coordinator: Option<SocketAddr>, i: u32) -> Result<Option<SocketAddr>> {
    let Some(addr) = coordinator else {
        return Ok(None);
    };
    if addr.port() == 0 {
        return Ok(Some(addr));
    }
    let port = u16::try_from(u32::from(addr.port()) + 1 + i).map_err(|_| {
        bad_input(format!(
            "--metrics-listen {addr}: no port left for worker {i}"
        ))
    })?;
    Ok(Some(SocketAddr::new(addr.ip(), port)))
}

impl LocalCluster {
    /// Starts a cluster for one command's own use (`run`, `reproduce --local`): the
    /// coordinator on a free loopback port with its state under `data_dir`, and the
    /// workers (call [`LocalCluster::wait_ready`] before submitting).
    pub async fn start_private(
        data_dir: &Path,
        shape: &ClusterArgs,
        heartbeat_timeout: Duration,
    ) -> Result<Self> {
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start(listen, data_dir, shape, Some(heartbeat_timeout), false).await
    }

    /// Starts a coordinator on `listen` with its state under `data_dir`, and the workers.
    /// `heartbeat_timeout` overrides the coordinator's default when given. A local cluster
    /// has no credentials: a non-loopback `listen` needs `insecure`.
    pub async fn start(
        listen: SocketAddr,
        data_dir: &Path,
        shape: &ClusterArgs,
        heartbeat_timeout: Option<Duration>,
        insecure: bool,
    ) -> Result<Self> {
        if shape.workers == 0 {
            return Err(bad_input(
                "--workers: a local cluster needs at least 1 worker",
            ));
        }
        // Validate the devices before starting anything.
        let slots = parse_device_slots(shape.devices.as_deref(), shape.emulate_gpus)
            .map_err(|e| bad_input(devices_error(&e.to_string())))?;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating data directory {}", data_dir.display()))?;
        let data_dir = absolute(data_dir)?;
        let mut config = CoordinatorConfig::with_data_dir(&data_dir);
        config.listen = listen;
        config.insecure = insecure;
        config.metrics_listen = shape.metrics_listen;
        if let Some(t) = heartbeat_timeout {
            config.heartbeat_timeout = t;
        }
        if let Some(o) = &shape.objects {
            config.objects_url = location_url(o)?;
        }
        if let Some(s) = &shape.store {
            config.store_url = location_url(s)?;
            trainyard_coordinator::store::StoreUrl::parse(&config.store_url)
                .map_err(|e| bad_input(format!("--store: {e}")))?;
        }
        let coordinator = trainyard_coordinator::start(config)
            .await
            .with_context(|| format!("starting the coordinator on {listen}"))?;
        let addr = coordinator.local_addr();
        let metrics_addr = coordinator.metrics_addr();
        let connect_ip = if addr.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            addr.ip()
        };
        let url = format!("http://{}", SocketAddr::new(connect_ip, addr.port()));
        let (stop, stop_rx) = watch::channel(false);
        let rank_command = rank_command()?;
        let mut workers = Vec::new();
        for i in 0..shape.workers {
            let name = format!("local-{i}");
            let work_dir = data_dir.join("workers").join(&name);
            std::fs::create_dir_all(&work_dir)
                .with_context(|| format!("creating {}", work_dir.display()))?;
            let config = WorkerConfig {
                coordinator_url: url.clone(),
                name: name.clone(),
                devices: slots.devices.clone(),
                cuda_ordinals: slots.cuda_ordinals.clone(),
                work_dir,
                rank_command: rank_command.clone(),
                collective_host: connect_ip.to_string(),
                metrics_listen: worker_metrics_addr(shape.metrics_listen, i)?,
                join_token: None,
                tls: Default::default(),
            };
            let mut rx = stop_rx.clone();
            let shutdown = async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            workers.push((name, tokio::spawn(run_worker(config, shutdown))));
        }
        Ok(LocalCluster {
            coordinator,
            workers,
            stop,
            addr,
            url,
            data_dir,
            metrics_addr,
        })
    }

    /// Waits until every worker has registered (jobs are rejected until the cluster can fit them).
    pub async fn wait_ready(&mut self) -> Result<()> {
        let mut client = Client::connect(&crate::client::Target::plain(&self.url)).await?;
        let want = self.workers.len();
        let deadline = Instant::now() + WORKERS_READY_TIMEOUT;
        loop {
            let workers = client
                .cluster
                .list_workers(ListWorkersRequest {
                    include_dead: false,
                })
                .await
                .map_err(rpc)?
                .into_inner()
                .workers;
            let alive = workers
                .iter()
                .filter(|w| w.state == WorkerState::Alive as i32)
                .count();
            if alive >= want {
                return Ok(());
            }
            if let Some((name, _)) = self.workers.iter().find(|(_, h)| h.is_finished()) {
                bail!("worker {name} stopped while the local cluster was starting (see the logs above)");
            }
            if Instant::now() > deadline {
                bail!("only {alive} of {want} workers registered within {WORKERS_READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the workers (they stop their ranks), then the coordinator.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        for (name, handle) in self.workers {
            match tokio::time::timeout(Duration::from_secs(30), handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::warn!(worker = %name, error = %e, "worker ended with an error")
                }
                Ok(Err(e)) => tracing::warn!(worker = %name, error = %e, "worker task failed"),
                Err(_) => tracing::warn!(worker = %name, "worker did not stop within 30 s"),
            }
        }
        self.coordinator
            .shutdown()
            .await
            .context("stopping the coordinator")?;
        Ok(())
    }
}
