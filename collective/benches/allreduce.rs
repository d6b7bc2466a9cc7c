//! All-reduce bus bandwidth of the [`Ring`] backend, every rank its own OS process on
//! loopback, against PyTorch Gloo's figures and the machine's memory-copy bandwidth.
//!
//! `cargo bench -p trainyard-collective --bench allreduce` (or `bench/allreduce/run.sh`,
//! which also measures Gloo and passes its results in `GLOO_RESULTS`). The bench re-executes
//! itself once per rank (`ALLREDUCE_BENCH_RANK` set); the ranks bind port 0, report their
//! addresses on stdout, read everyone's on stdin, join a ring, and time all-reduces (sum,
//! f32, one tensor): per size some warm-up calls, then iterations of a barrier followed by
//! one timed all-reduce. An iteration takes as long as its slowest rank; the figure is the
//! median over the iterations, and bus bandwidth is `2(n-1)/n × bytes / time` (what NCCL
//! and the Gloo script report). The ranks run with the trainyard binary's allocator
//! (mimalloc), as the rank processes do.
//!
//! Settings (environment): `ALLREDUCE_SIZES_MIB` (default `1,16,64`), `ALLREDUCE_RANKS`
//! (`2,4`), `ALLREDUCE_WARMUP` (`3`), `ALLREDUCE_ITERS` (`1:40,16:15,64:8`: iterations per
//! size, 10 for others), `ALLREDUCE_TRANSPORTS` (`auto,tcp`: the default configuration,
//! which takes shared memory between ranks of one host, and the TCP ring alone),
//! `GLOO_RESULTS` (the JSON file `bench/allreduce/gloo.py` writes, as an absolute path:
//! `cargo bench` runs this in the crate's folder). For tuning, `RING_SEGMENT_BYTES` and
//! `RING_SOCKET_BUFFER_BYTES` override the ring's defaults.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use trainyard_collective::{Collective, ReduceOp, Ring, RingConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RANK_ENV: &str = "ALLREDUCE_BENCH_RANK";
const WORLD_ENV: &str = "ALLREDUCE_BENCH_WORLD";
const TRANSPORT_ENV: &str = "ALLREDUCE_BENCH_TRANSPORT";

/// The benchmark's settings, from the environment.
#[derive(Debug, Clone)]
struct Settings {
    sizes_mib: Vec<usize>,
    ranks: Vec<usize>,
    warmup: usize,
    iters: BTreeMap<usize, usize>,
    transports: Vec<String>,
}

impl Settings {
    fn from_env() -> Self {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let list = |s: String| -> Vec<usize> {
            s.split(',')
                .filter(|x| !x.trim().is_empty())
                .map(|x| x.trim().parse().expect("a number"))
                .collect()
        };
        let iters = var("ALLREDUCE_ITERS", "1:40,16:15,64:8")
            .split(',')
            .map(|item| {
                let (k, v) = item.split_once(':').expect("SIZE:ITERS");
                (k.trim().parse().unwrap(), v.trim().parse().unwrap())
            })
            .collect();
        Self {
            sizes_mib: list(var("ALLREDUCE_SIZES_MIB", "1,16,64")),
            ranks: list(var("ALLREDUCE_RANKS", "2,4")),
            warmup: var("ALLREDUCE_WARMUP", "3").parse().unwrap(),
            iters,
            transports: var("ALLREDUCE_TRANSPORTS", "auto,tcp")
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
        }
    }

    fn iters(&self, mib: usize) -> usize {
        self.iters.get(&mib).copied().unwrap_or(10)
    }
}

fn main() {
    if std::env::var_os(RANK_ENV).is_some() {
        rank_main();
    } else {
        parent_main();
    }
}

/// One rank: join the ring, time the all-reduces, print `TIMES <mib> <seconds>...` lines.
fn rank_main() {
    let settings = Settings::from_env();
    let rank: usize = std::env::var(RANK_ENV).unwrap().parse().unwrap();
    let world: usize = std::env::var(WORLD_ENV).unwrap().parse().unwrap();
    let transport = std::env::var(TRANSPORT_ENV).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "ADDR {}", listener.local_addr().unwrap()).unwrap();
    out.flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let addrs: Vec<SocketAddr> = line
        .split_whitespace()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(addrs.len(), world);
    let mut config = RingConfig {
        op_timeout: Duration::from_secs(120),
        shared_memory: transport != "tcp",
        ..RingConfig::default()
    };
    // Tuning knobs (not part of the reported configuration).
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    if let Some(b) = env("RING_SEGMENT_BYTES") {
        config.segment_bytes = b;
    }
    if let Some(b) = env("RING_SOCKET_BUFFER_BYTES") {
        config.socket_buffer_bytes = b;
    }
    let mut ring = Ring::connect(&addrs, rank, listener, "bench", config).unwrap();
    for &mib in &settings.sizes_mib {
        let len = mib * 1024 * 1024 / 4;
        let t = Tensor::full((rank + 1) as f32, len, &Device::Cpu).unwrap();
        let want = (world * (world + 1) / 2) as f32;
        for _ in 0..settings.warmup {
            let r = ring
                .all_reduce(std::slice::from_ref(&t), ReduceOp::Sum)
                .unwrap();
            let v = r[0].to_vec1::<f32>().unwrap();
            let bad: Vec<usize> = (0..v.len()).filter(|&i| v[i] != want).collect();
            assert!(
                bad.is_empty(),
                "wrong all-reduce result: rank {rank}, {} wrong, first {} (= {}), last {}",
                bad.len(),
                bad.first().copied().unwrap_or(0),
                bad.first().map_or(0.0, |&i| v[i]),
                bad.last().copied().unwrap_or(0)
            );
        }
        let mut times = Vec::new();
        for _ in 0..settings.iters(mib) {
            ring.barrier().unwrap();
            let start = Instant::now();
            let r = ring
                .all_reduce(std::slice::from_ref(&t), ReduceOp::Sum)
                .unwrap();
            times.push(start.elapsed().as_secs_f64());
            drop(r);
        }
        let times: Vec<String> = times.iter().map(|t| format!("{t:e}")).collect();
        writeln!(out, "TIMES {mib} {}", times.join(" ")).unwrap();
        out.flush().unwrap();
    }
    ring.barrier().unwrap();
}

/// Per size: the median over iterations of the slowest rank's time, in seconds.
fn run_world(world: usize, transport: &str) -> BTreeMap<usize, f64> {
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .env(RANK_ENV, rank.to_string())
                .env(WORLD_ENV, world.to_string())
                .env(TRANSPORT_ENV, transport)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut readers: Vec<_> = children
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().unwrap()))
        .collect();
    let addrs: Vec<String> = readers
        .iter_mut()
        .map(|r| {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            line.strip_prefix("ADDR ").unwrap().trim().to_string()
        })
        .collect();
    for c in &mut children {
        let mut stdin = c.stdin.take().unwrap();
        writeln!(stdin, "{}", addrs.join(" ")).unwrap();
    }
    // times[mib][iteration] = slowest rank so far.
    let mut times: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for r in &mut readers {
        for line in r.lines() {
            let line = line.unwrap();
            let mut words = line.split_whitespace();
            if words.next() != Some("TIMES") {
                continue;
            }
            let mib: usize = words.next().unwrap().parse().unwrap();
            let ts: Vec<f64> = words.map(|w| w.parse().unwrap()).collect();
            let slot = times.entry(mib).or_insert_with(|| vec![0.0; ts.len()]);
            for (s, t) in slot.iter_mut().zip(ts) {
                *s = s.max(t);
            }
        }
    }
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a rank failed");
    }
    times
        .into_iter()
        .map(|(mib, mut ts)| {
            ts.sort_by(f64::total_cmp);
            (mib, ts[ts.len() / 2])
        })
        .collect()
}

/// Memory-copy bandwidth (bytes copied per second) of a 256 MiB buffer, median of 7.
fn memcpy_gbps() -> f64 {
    let len = 256 * 1024 * 1024 / 4;
    let src: Vec<f32> = (0..len).map(|i| i as f32).collect();
    let mut dst = vec![0f32; len];
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let start = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (len * 4) as f64 / times[3] / 1e9
}

/// Gloo's bus bandwidth by (MiB, ranks), from `bench/allreduce/gloo.py`'s JSON.
fn gloo_results() -> BTreeMap<(usize, usize), f64> {
    let Ok(path) = std::env::var("GLOO_RESULTS") else {
        return BTreeMap::new();
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let u = |k: &str| r[k].as_u64().unwrap() as usize;
            ((u("mib"), u("ranks")), r["bus_gbps"].as_f64().unwrap())
        })
        .collect()
}

fn parent_main() {
    let settings = Settings::from_env();
    let gloo = gloo_results();
    let memcpy_before = memcpy_gbps();
    let mut bus: BTreeMap<(String, usize, usize), f64> = BTreeMap::new();
    for transport in &settings.transports {
        for &n in &settings.ranks {
            for (mib, t) in run_world(n, transport) {
                let gbps = 2.0 * (n - 1) as f64 / n as f64 * (mib << 20) as f64 / t / 1e9;
                eprintln!(
                    "ring ({transport}) all_reduce {mib:>3} MiB, {n} ranks: {:8.2} ms, bus bandwidth {gbps:.2} GB/s",
                    t * 1e3
                );
                bus.insert((transport.clone(), mib, n), gbps);
            }
        }
    }
    let memcpy = (memcpy_before + memcpy_gbps()) / 2.0;
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}×", a / b),
        _ => "-".to_string(),
    };
    println!();
    println!(
        "All-reduce bus bandwidth (GB/s), f32 sum, ranks as processes on loopback; memcpy {memcpy:.1} GB/s"
    );
    println!();
    let mut head = "| size | ranks |".to_string();
    let mut rule = "|---|---|".to_string();
    for t in &settings.transports {
        head += &format!(" ring ({t}) |");
        rule += "---|";
    }
    head += " Gloo |";
    rule += "---|";
    for t in &settings.transports {
        head += &format!(" ({t}) / Gloo | ({t}) / memcpy |");
        rule += "---|---|";
    }
    println!("{head}\n{rule}");
    for &mib in &settings.sizes_mib {
        for &n in &settings.ranks {
            let g = gloo.get(&(mib, n)).copied();
            let mut row = format!("| {mib} MiB | {n} |");
            for t in &settings.transports {
                row += &format!(" {} |", fmt(bus.get(&(t.clone(), mib, n)).copied()));
            }
            row += &format!(" {} |", fmt(g));
            for t in &settings.transports {
                let ours = bus.get(&(t.clone(), mib, n)).copied();
                row += &format!(" {} | {} |", ratio(ours, g), ratio(ours, Some(memcpy)));
            }
            println!("{row}");
        }
    }
}
