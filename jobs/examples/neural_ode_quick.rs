//! Runs the `neural-ode` job in-process with a [`MemoryContext`] and prints the results
//! table and timings. Usage:
//! `cargo run -p trainyard-jobs --example neural_ode_quick -- [preset] [key=value ...]`
//! (default preset `quick`).

use std::collections::BTreeMap;
use std::time::Instant;

use trainyard_jobs::testing::MemoryContext;
use trainyard_jobs::JobContext;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut preset = "quick".to_string();
    let mut overrides = BTreeMap::new();
    for arg in std::env::args().skip(1) {
        match arg.split_once('=') {
            Some((k, v)) => {
                overrides.insert(k.to_string(), v.to_string());
            }
            None => preset = arg,
        }
    }
    let job = trainyard_jobs::registry()
        .get("neural-ode")
        .ok_or_else(|| anyhow::anyhow!("neural-ode is not registered"))?;
    let config = job.resolve_config(&preset, &overrides)?;
    eprintln!("config: {}", config.to_json());
    let ctx = MemoryContext::new().echo_logs(true);
    let started = Instant::now();
    job.run(&config, &ctx)?;
    let wall = started.elapsed().as_secs_f64();
    if let Some(table) = ctx.results_table() {
        println!("{}", table.title);
        println!("{}", table.columns.join(" | "));
        for row in &table.rows {
            println!("{}", row.join(" | "));
        }
        for note in &table.notes {
            println!("note: {note}");
        }
    }
    println!(
        "wall time {wall:.1}s on {} rank(s), {} checkpoints",
        ctx.world_size(),
        ctx.checkpoints().len()
    );
    Ok(())
}
