//! `trainyard local`: a coordinator and N workers on this machine until Ctrl-C.

use anyhow::Result;

use crate::args::LocalArgs;
use crate::cluster::{shutdown_signal, LocalCluster};

/// Runs `trainyard local`.
pub async fn run(args: LocalArgs) -> Result<i32> {
    let mut cluster = LocalCluster::start(
        args.listen,
        &args.data_dir,
        &args.cluster,
        None,
        args.insecure,
    )
    .await?;
    cluster.wait_ready().await?;
    let url = &cluster.url;
    println!("trainyard local cluster listening on {}", cluster.addr);
    println!("  data:     {}", cluster.data_dir.display());
    if let Some(store) = &args.cluster.store {
        println!(
            "  store:    {}",
            trainyard_coordinator::store::redact_url(store)
        );
    }
    println!("  workers:  {}", args.cluster.workers);
    if let Some(m) = cluster.metrics_addr {
        match m.port() {
            0 => println!("  metrics:  http://{m}/metrics (workers: free ports, in the log)"),
            p => println!(
                "  metrics:  http://{m}/metrics (workers: ports {} to {})",
                p as u32 + 1,
                p as u32 + args.cluster.workers
            ),
        }
    }
    println!();
    println!("Submit a job from another terminal:");
    println!("  export TRAINYARD_COORDINATOR={url}");
    println!("  trainyard submit neural-ode --follow");
    println!("  trainyard jobs | trainyard workers | trainyard job-types");
    println!();
    println!("Press Ctrl-C to stop.");
    shutdown_signal().await;
    println!("stopping the local cluster…");
    cluster.stop().await?;
    Ok(0)
}
