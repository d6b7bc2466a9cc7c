//! `trainyard`: one binary for every role: coordinator, worker, rank process and the CLI.

mod args;
mod client;
mod cluster;
mod cmd;
mod error;
mod follow;
mod output;
mod spec;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use args::{Cli, Command, LogFormat};

// candle allocates a fresh buffer per op; mimalloc cut training step time ~3x here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Our crates log at info by default, everything else at warn (override with RUST_LOG).
const DEFAULT_FILTER: &str = "warn,trainyard=info,trainyard_cli=info,trainyard_coordinator=info,\
                              trainyard_worker=info,trainyard_jobs=info";

/// Default filter of commands that draw progress bars: only warnings.
const QUIET_FILTER: &str = "warn";

fn init_logging(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Rank = cli.command {
        // The rank process owns its runtime and reporting; its exit code is the rank's.
        // stdout carries events to the worker, so logs go to stderr, where the worker
        // captures them as the job's log lines: keep them to warnings unless RUST_LOG asks.
        init_logging(cli.log_format, QUIET_FILTER);
        let code = trainyard_worker::run_rank_process();
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let default_filter = match &cli.command {
        // `run` draws a progress bar: the in-process cluster's info logs would bury it.
        Command::Run(_) => QUIET_FILTER,
        // gpu-check prints tables on stdout; only warnings on stderr.
        Command::GpuCheck(_) => QUIET_FILTER,
        _ => DEFAULT_FILTER,
    };
    init_logging(cli.log_format, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(error::EXIT_FAILURE as u8);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(err) => {
            eprintln!("error: {}", error::one_line(&err));
            ExitCode::from(error::exit_code(&err) as u8)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let url = cli.coordinator.as_str();
    let target = || client::Target::new(url, cli.token_file.as_deref(), &cli.tls.client_files());
    let target = &match cli.command {
        Command::Submit(_)
        | Command::Jobs(_)
        | Command::Describe(_)
        | Command::Logs(_)
        | Command::Cancel(_)
        | Command::Workers(_)
        | Command::Checkpoints(_)
        | Command::Results(_)
        | Command::Reproduce(_)
        | Command::JobTypes(_) => target()?,
        _ => client::Target::plain(url),
    };
    match cli.command {
        Command::Coordinator(a) => cmd::coordinator::run(a, &cli.tls).await,
        Command::Worker(a) => cmd::worker::run(url, cli.tls.client_files(), a).await,
        Command::Rank => anyhow::bail!("internal: `rank` runs before the async runtime starts"),
        Command::Submit(a) => cmd::submit::run(target, a).await,
        Command::Jobs(a) => cmd::jobs::run(target, a).await,
        Command::Describe(a) => cmd::describe::run(target, a).await,
        Command::Logs(a) => cmd::logs::run(target, a).await,
        Command::Cancel(a) => cmd::cancel::run(target, a).await,
        Command::Workers(a) => cmd::workers::run(target, a).await,
        Command::Checkpoints(a) => cmd::checkpoints::run(target, a).await,
        Command::Results(a) => cmd::results::run(target, a).await,
        Command::Reproduce(a) => cmd::reproduce::run(target, a).await,
        Command::JobTypes(a) => cmd::job_types::run(target, a).await,
        Command::Local(a) => cmd::local::run(a).await,
        Command::Run(a) => cmd::run::run(a).await,
        Command::GpuCheck(a) => cmd::gpu_check::run(a).await,
        Command::Data(a) => cmd::data::run(a).await,
        Command::Certs(a) => cmd::certs::run(a),
        Command::Auth(a) => cmd::auth::run(a),
    }
}
