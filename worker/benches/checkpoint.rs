//! Checkpoint benchmark against a real S3 server (Garage from `scripts/s3.sh up`):
//!
//! 1. For checkpoints of 64 MiB and 512 MiB (four f32 tensors each), in the same run:
//!    (a) the time training is blocked by `save` (copy to host memory + queueing),
//!    (b) the time until the checkpoint is committed (manifest written), and
//!    (c) the raw time for `object_store` to put the same bytes as one multipart upload
//!    (same part size and concurrency) to the same server.
//!    Prints (b)/(c) and (a)/(b); targets: (a) <= 5% of (b), (b) <= 1.25 x (c).
//! 2. The training-step overhead of checkpointing every epoch on the neural-ode job (quick
//!    preset, ResNet, a small sample): time per epoch with and without checkpoints, in
//!    the rank's real context (`RankContext`), alternating runs. Target: < 5%.
//!
//! ```sh
//! eval "$(scripts/s3.sh up)"
//! cargo bench -p trainyard-worker --bench checkpoint            # both parts
//! cargo bench -p trainyard-worker --bench checkpoint -- --reps 5 --sizes 64,512 --epoch-runs 3
//! cargo bench -p trainyard-worker --bench checkpoint -- --no-epochs   # only part 1
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::{Device, Tensor};
use object_store::{PutMultipartOptions, WriteMultipart};
use trainyard_jobs::{Checkpoint, JobContext};
use trainyard_objects::testing::unique_prefix;
use trainyard_objects::{open_objects, Objects, UploadOptions};
use trainyard_proto::RankAssignment;
use trainyard_worker::checkpoint::{prepare_checkpoint, prepare_checkpoint_with};
use trainyard_worker::protocol::{parse_line, ParsedLine, RankMessage};
use trainyard_worker::rank::RankContext;
use trainyard_worker::uploader::{CheckpointUploader, UploaderOptions};

struct Args {
    sizes_mib: Vec<usize>,
    reps: usize,
    epochs: bool,
    epoch_runs: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        sizes_mib: vec![64, 512],
        reps: 3,
        epochs: true,
        epoch_runs: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sizes" => {
                if let Some(v) = it.next() {
                    args.sizes_mib = v.split(',').filter_map(|s| s.trim().parse().ok()).collect();
                }
            }
            "--reps" => args.reps = it.next().and_then(|v| v.parse().ok()).unwrap_or(3),
            "--epoch-runs" => args.epoch_runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(3),
            "--no-epochs" => args.epochs = false,
            // cargo bench passes --bench; ignore anything else.
            _ => {}
        }
    }
    args
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// A checkpoint of about `mib` MiB: four f32 tensors of random-ish values.
fn checkpoint_of(mib: usize, step: u64) -> Checkpoint {
    let per = (mib << 20) / 4 / 4;
    let mut tensors = BTreeMap::new();
    for i in 0..4 {
        let t = Tensor::rand(-1f32, 1f32, per, &Device::Cpu).expect("random tensor");
        tensors.insert(format!("layer{i}.weight"), t);
    }
    Checkpoint {
        step,
        tensors,
        state: serde_json::json!({ "step": step }),
        metrics: BTreeMap::new(),
    }
}

/// Bytes of the tensors of `ck` (the safetensors file is a few hundred bytes larger).
fn checkpoint_bytes(ck: &Checkpoint) -> usize {
    ck.tensors
        .values()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
}

/// (c): one multipart upload of `bytes` with object_store, as `Objects::put` does it.
async fn raw_put(objects: &Objects, relative: &str, bytes: Bytes) -> Duration {
    let options = UploadOptions::default();
    let path = objects.path(relative);
    let started = Instant::now();
    let upload = objects
        .store
        .put_multipart_opts(&path, PutMultipartOptions::default())
        .await
        .expect("starting the multipart upload");
    let mut writer = WriteMultipart::new_with_chunk_size(upload, options.part_size);
    let mut rest = bytes;
    while !rest.is_empty() {
        let chunk = rest.split_to(rest.len().min(options.part_size));
        writer
            .wait_for_capacity(options.max_concurrency)
            .await
            .expect("uploading a part");
        writer.put(chunk);
    }
    writer.finish().await.expect("completing the upload");
    started.elapsed()
}

fn bench_saves(url: &str, args: &Args) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let objects = open_objects(url).expect("opening the store");
    let (tx, rx) = mpsc::channel::<(u64, Instant)>();
    let tx = Mutex::new(tx);
    let uploader = CheckpointUploader::new(
        runtime.handle(),
        objects.clone(),
        UploaderOptions::default(),
        Box::new(move |c| {
            let _ = tx.lock().map(|t| t.send((c.manifest.step, Instant::now())));
        }),
        Box::new(|e| eprintln!("uploader gave up: {e}")),
    );
    println!("checkpoint save to {url} (load average {})", load_average());
    println!(
        "{:>8} {:>5} {:>12} {:>12} {:>12} {:>8} {:>8}",
        "size", "rep", "(a) blocked", "(b) commit", "(c) raw put", "(b)/(c)", "(a)/(b)"
    );
    let mut step = 0u64;
    for &mib in &args.sizes_mib {
        let checkpoint = checkpoint_of(mib, 0);
        let (mut a_all, mut b_all, mut c_all) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..args.reps.max(1) {
            step += 1;
            let mut ck = checkpoint.clone();
            ck.step = step;
            let raw_bytes = Bytes::from(
                prepare_checkpoint("bench", 1, &ck)
                    .expect("serialising")
                    .files[0]
                    .bytes
                    .to_vec(),
            );
            let raw_path = format!("raw/{step}/model.safetensors");
            let run_raw = |bytes: Bytes| runtime.block_on(raw_put(&objects, &raw_path, bytes));
            let run_save = || {
                let started = Instant::now();
                let prepared =
                    prepare_checkpoint_with("bench", 1, &ck, Some(uploader.buffer_pool()))
                        .expect("serialising");
                uploader.submit(prepared).expect("submitting");
                let blocked = started.elapsed();
                let (got, at) = rx.recv().expect("a commit");
                assert_eq!(got, step);
                uploader.wait_idle(None).expect("committed");
                (blocked, at - started)
            };
            // Alternate the order so neither always runs on a warmer server.
            let (c, (a, b)) = if rep % 2 == 0 {
                let c = run_raw(raw_bytes);
                (c, run_save())
            } else {
                let ab = run_save();
                (run_raw(raw_bytes), ab)
            };
            let (a, b, c) = (a.as_secs_f64(), b.as_secs_f64(), c.as_secs_f64());
            println!(
                "{:>5}MiB {:>5} {:>10.1}ms {:>11.3}s {:>11.3}s {:>8.3} {:>7.2}%",
                mib,
                rep + 1,
                a * 1e3,
                b,
                c,
                b / c,
                100.0 * a / b
            );
            a_all.push(a);
            b_all.push(b);
            c_all.push(c);
            runtime.block_on(async {
                let _ = objects.delete_prefix("raw").await;
                let _ = objects.delete_prefix("jobs/bench").await;
            });
        }
        // A job's second save, halfway through the upload of its first: a fresh uploader
        // (empty pool), whose first upload maps a second buffer ahead.
        let fresh = CheckpointUploader::new(
            runtime.handle(),
            objects.clone(),
            UploaderOptions::default(),
            Box::new(|_| {}),
            Box::new(|e| eprintln!("uploader gave up: {e}")),
        );
        let mut first = checkpoint.clone();
        step += 1;
        first.step = step;
        let mut second = checkpoint.clone();
        step += 1;
        second.step = step;
        let pool = fresh.buffer_pool();
        let started = Instant::now();
        fresh
            .submit(prepare_checkpoint_with("bench", 1, &first, Some(pool)).expect("serialising"))
            .expect("submitting");
        let cold = started.elapsed();
        let halfway = Duration::from_secs_f64(median(&mut b_all.clone()) / 2.0);
        std::thread::sleep(halfway);
        let mapped = pool.pooled_capacity() >= checkpoint_bytes(&second);
        let started = Instant::now();
        fresh
            .submit(prepare_checkpoint_with("bench", 1, &second, Some(pool)).expect("serialising"))
            .expect("submitting");
        let overlapped = started.elapsed();
        fresh.wait_idle(None).expect("committed");
        println!(
            "{:>5}MiB   job {:>10.1}ms (first save, fresh memory), {:.1} ms (second save, {:.2} s into the first upload; buffer mapped ahead: {})",
            mib,
            cold.as_secs_f64() * 1e3,
            overlapped.as_secs_f64() * 1e3,
            halfway.as_secs_f64(),
            if mapped { "yes" } else { "not yet" }
        );
        runtime.block_on(async {
            let _ = objects.delete_prefix("jobs/bench").await;
        });
        let (a, b, c) = (median(&mut a_all), median(&mut b_all), median(&mut c_all));
        println!(
            "{:>5}MiB {:>5} {:>10.1}ms {:>11.3}s {:>11.3}s {:>8.3} {:>7.2}%   <- median; targets (b)/(c) <= 1.25, (a)/(b) <= 5%: {}",
            mib,
            "med",
            a * 1e3,
            b,
            c,
            b / c,
            100.0 * a / b,
            if b / c <= 1.25 && a / b <= 0.05 {
                "MET"
            } else {
                "NOT MET"
            }
        );
    }
}

/// Discards event lines except the train-seconds metric, which it keeps.
#[derive(Clone, Default)]
struct TrainSeconds(Arc<Mutex<(Vec<u8>, Option<f64>)>>);

impl Write for TrainSeconds {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut g = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        g.0.extend_from_slice(buf);
        while let Some(i) = g.0.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = g.0.drain(..=i).collect();
            if let ParsedLine::Event(RankMessage::Metric { values, .. }) =
                parse_line(String::from_utf8_lossy(&line).trim_end())
            {
                if let Some(v) = values.get("resnet/train_seconds") {
                    g.1 = Some(*v);
                }
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Trains the neural-ode ResNet (quick preset, small sample) in a rank context writing
/// checkpoints to `url`; returns (seconds per epoch, checkpoints committed).
fn train_once(url: &str, epochs: u64, checkpoint_every: u64, run: usize) -> (f64, u64) {
    let job = trainyard_jobs::registry()
        .get("neural-ode")
        .expect("neural-ode is registered");
    let overrides: BTreeMap<String, String> = [
        ("models", "resnet".to_string()),
        ("train_samples", "1024".into()),
        ("test_samples", "100".into()),
        ("eval_batch_size", "100".into()),
        ("epochs", epochs.to_string()),
        ("checkpoint_every", checkpoint_every.to_string()),
        ("log_every", "1000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = job
        .resolve_config("quick", &overrides)
        .expect("bench config");
    let assignment = RankAssignment {
        job_id: format!("bench-epochs-{run}-{checkpoint_every}"),
        attempt: 1,
        rank: 0,
        world_size: 1,
        job: "neural-ode".into(),
        config_json: config.to_json(),
        objects_url: url.to_string(),
        ..Default::default()
    };
    let out = TrainSeconds::default();
    let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let ctx = RankContext::new(assignment, Box::new(out.clone()), stop).expect("rank context");
    job.run(&config, &ctx as &dyn JobContext).expect("training");
    ctx.wait_for_uploads(None).expect("uploads");
    let committed = ctx.upload_stats().map(|s| s.committed).unwrap_or(0);
    let secs = out
        .0
        .lock()
        .ok()
        .and_then(|g| g.1)
        .expect("train_seconds metric");
    (secs / epochs as f64, committed)
}

fn bench_epochs(url: &str, args: &Args) {
    const EPOCHS: u64 = 3;
    // 1024 images in batches of 32: 32 steps per epoch.
    const STEPS_PER_EPOCH: u64 = 32;
    println!(
        "\nneural-ode (quick preset, ResNet width 32, 1024 images, {EPOCHS} epochs) per-epoch time, \
         checkpoints to {url} (load average {})",
        load_average()
    );
    let (mut with, mut without) = (Vec::new(), Vec::new());
    // One warm-up run (data set load, allocator) not counted.
    let _ = train_once(url, 1, 0, 0);
    for run in 0..args.epoch_runs.max(1) {
        let order: [u64; 2] = if run % 2 == 0 {
            [0, STEPS_PER_EPOCH]
        } else {
            [STEPS_PER_EPOCH, 0]
        };
        for every in order {
            let (per_epoch, committed) = train_once(url, EPOCHS, every, run + 1);
            println!(
                "  run {} {:<28} {:>8.3} s/epoch ({} checkpoints committed)",
                run + 1,
                if every == 0 {
                    "without checkpoints:"
                } else {
                    "checkpoint every epoch:"
                },
                per_epoch,
                committed
            );
            if every == 0 {
                without.push(per_epoch);
            } else {
                with.push(per_epoch);
            }
        }
    }
    let (w, wo) = (median(&mut with), median(&mut without));
    println!(
        "  median: {w:.3} s/epoch with, {wo:.3} s/epoch without: overhead {:+.2}% (target < 5%: {})",
        100.0 * (w / wo - 1.0),
        if w / wo - 1.0 < 0.05 { "MET" } else { "NOT MET" }
    );
    let objects = open_objects(url).expect("opening the store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _ = rt.block_on(objects.delete_prefix("jobs"));
}

fn main() {
    let args = parse_args();
    let Some(env) = trainyard_objects::testing::s3_test_env() else {
        eprintln!("the checkpoint benchmark needs the S3 server: eval \"$(scripts/s3.sh up)\"");
        return;
    };
    let url = env.url(&unique_prefix("bench-checkpoint"));
    if !args.sizes_mib.is_empty() {
        bench_saves(&url, &args);
    }
    if args.epochs {
        bench_epochs(&url, &args);
    }
}
