//! Ring tests: every rank is a thread of this process, on 127.0.0.1 with port-0 listeners.

use super::*;
use candle_core::{DType, Device};

/// Short timeouts: a failing test fails in seconds.
fn quick() -> RingConfig {
    RingConfig {
        connect_timeout: Duration::from_secs(10),
        op_timeout: Duration::from_secs(10),
        // Small segments, so that small buffers are pipelined too.
        segment_bytes: 4096,
        ..RingConfig::default()
    }
}

/// Runs `f(rank, ring)` on `n` ranks (threads), each joining with `attempt(rank)`.
fn world<T: Send>(
    n: usize,
    attempt: impl Fn(usize) -> String + Sync,
    config: RingConfig,
    f: impl Fn(usize, Result<Ring, CollectiveError>) -> T + Sync,
) -> Vec<T> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (addrs, attempt, config, f) = (&addrs, &attempt, config.clone(), &f);
                s.spawn(move || {
                    let ring = Ring::connect(addrs, rank, listener, &attempt(rank), config);
                    f(rank, ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Rank `rank`'s value at `i`: small multiples of 1/2, so that sums are exact in f32.
fn value(rank: usize, i: usize) -> f32 {
    ((i * 7 + rank * 13) % 101) as f32 * 0.5 - 20.0
}

fn data(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| value(rank, i)).collect()
}

#[test]
fn all_reduce_equals_the_reference_sum_and_mean() {
    for n in 1..=5 {
        for len in [0, 1, 7, 1000, 1_000_003] {
            let sum: Vec<f32> = (0..len)
                .map(|i| (0..n).map(|r| value(r, i)).sum())
                .collect();
            let mean: Vec<f32> = sum.iter().map(|s| s / n as f32).collect();
            let results = world(
                n,
                |_| "a1".into(),
                quick(),
                |rank, ring| {
                    let mut ring = ring.unwrap();
                    assert_eq!(
                        (ring.rank(), ring.world_size(), ring.backend()),
                        (rank, n, "ring")
                    );
                    let t = Tensor::from_vec(data(rank, len), len, &Device::Cpu).unwrap();
                    let s = ring
                        .all_reduce(std::slice::from_ref(&t), ReduceOp::Sum)
                        .unwrap();
                    let m = ring.all_reduce(&[t], ReduceOp::Mean).unwrap();
                    (
                        s[0].to_vec1::<f32>().unwrap(),
                        m[0].to_vec1::<f32>().unwrap(),
                    )
                },
            );
            for (rank, (s, m)) in results.into_iter().enumerate() {
                assert!(s == sum, "sum: world {n}, {len} elements, rank {rank}");
                assert!(m == mean, "mean: world {n}, {len} elements, rank {rank}");
            }
        }
    }
}

#[test]
fn several_tensors_are_fused_and_split_again() {
    let shapes: Vec<Vec<usize>> = vec![
        vec![3, 5],
        vec![0],
        vec![1],
        vec![2, 0, 3],
        vec![4099],
        vec![7],
    ];
    let n = 3;
    let results = world(
        n,
        |_| "a".into(),
        quick(),
        |rank, ring| {
            let mut ring = ring.unwrap();
            let mut next = 0;
            let tensors: Vec<Tensor> = shapes
                .iter()
                .map(|shape| {
                    let len: usize = shape.iter().product();
                    let v: Vec<f32> = (next..next + len).map(|i| value(rank, i)).collect();
                    next += len;
                    Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap()
                })
                .collect();
            ring.all_reduce(&tensors, ReduceOp::Sum).unwrap()
        },
    );
    for out in results {
        assert_eq!(out.len(), shapes.len());
        let mut next = 0;
        for (t, shape) in out.iter().zip(&shapes) {
            assert_eq!(t.dims(), shape.as_slice());
            let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want: Vec<f32> = (next..next + got.len())
                .map(|i| (0..n).map(|r| value(r, i)).sum())
                .collect();
            next += got.len();
            assert_eq!(got, want);
        }
    }
}

#[test]
fn broadcast_from_every_root_and_barrier() {
    for n in 1..=4 {
        let results = world(
            n,
            |_| "b".into(),
            quick(),
            |rank, ring| {
                let mut ring = ring.unwrap();
                let mut got = Vec::new();
                for root in 0..n {
                    let a = Tensor::from_vec(data(rank, 5000), (50, 100), &Device::Cpu).unwrap();
                    let b = Tensor::from_vec(data(rank + 1, 3), 3, &Device::Cpu).unwrap();
                    let out = ring.broadcast(&[a, b], root).unwrap();
                    assert_eq!(out[0].dims(), &[50, 100]);
                    got.push((
                        out[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        out[1].to_vec1::<f32>().unwrap(),
                    ));
                    ring.barrier().unwrap();
                }
                assert!(matches!(
                    ring.broadcast(&[], n),
                    Err(CollectiveError::InvalidRoot { .. })
                ));
                got
            },
        );
        for got in results {
            for (root, (a, b)) in got.into_iter().enumerate() {
                assert_eq!(a, data(root, 5000), "world {n}, root {root}");
                assert_eq!(b, data(root + 1, 3), "world {n}, root {root}");
            }
        }
    }
}

#[test]
fn barrier_waits_for_every_rank() {
    let n = 4;
    let start = Instant::now();
    let times = world(
        n,
        |_| "c".into(),
        quick(),
        |rank, ring| {
            let mut ring = ring.unwrap();
            if rank == 2 {
                std::thread::sleep(Duration::from_millis(300));
            }
            ring.barrier().unwrap();
            start.elapsed()
        },
    );
    for t in times {
        assert!(t >= Duration::from_millis(300), "{t:?}");
    }
}

#[test]
fn a_wrong_attempt_or_world_is_refused() {
    let mut cfg = quick();
    cfg.connect_timeout = Duration::from_secs(2);
    let start = Instant::now();
    let results = world(
        2,
        |rank| {
            if rank == 1 {
                "old".into()
            } else {
                "new".into()
            }
        },
        cfg.clone(),
        |_, ring| ring.map(|_| ()),
    );
    assert!(start.elapsed() < Duration::from_secs(6));
    for r in &results {
        let err = r.as_ref().unwrap_err();
        assert!(
            matches!(err, CollectiveError::HandshakeRefused { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("attempt"), "{err}");
    }

    // A stale rank (of a world of 3) dials rank 0 of a world of 2 while rank 0 waits for
    // its left neighbour: refused; the real rank 1 then joins.
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    let (a0, a1) = (addrs.clone(), addrs.clone());
    let rank0 = std::thread::spawn(move || Ring::connect(&a0, 0, l0, "a", quick()));
    let stale_addrs = vec![addrs[0], addrs[1], addrs[0]];
    let l_stale = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = quick();
    c.connect_timeout = Duration::from_secs(2);
    // Rank 2 of 3: its right neighbour is rank 0.
    let err = Ring::connect(&stale_addrs, 2, l_stale, "a", c).unwrap_err();
    assert!(
        matches!(err, CollectiveError::HandshakeRefused { peer: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("world size"), "{err}");
    let rank1 = std::thread::spawn(move || Ring::connect(&a1, 1, l1, "a", quick()));
    let (mut r0, mut r1) = (
        rank0.join().unwrap().unwrap(),
        rank1.join().unwrap().unwrap(),
    );
    let b = std::thread::spawn(move || r1.barrier());
    r0.barrier().unwrap();
    b.join().unwrap().unwrap();
}

#[test]
fn a_peer_that_goes_away_is_an_error_not_a_hang() {
    let mut cfg = quick();
    cfg.op_timeout = Duration::from_secs(3);
    let start = Instant::now();
    let results = world(
        3,
        |_| "d".into(),
        cfg,
        |rank, ring| {
            let mut ring = ring.unwrap();
            let t = Tensor::ones(1_000_000, DType::F32, &Device::Cpu).unwrap();
            ring.all_reduce(std::slice::from_ref(&t), ReduceOp::Sum)
                .unwrap();
            if rank == 1 {
                // Rank 1 dies: its sockets close.
                drop(ring);
                return None;
            }
            let r = ring.all_reduce(std::slice::from_ref(&t), ReduceOp::Sum);
            let err = r.unwrap_err();
            // Later collectives fail at once.
            assert!(ring.barrier().is_err());
            Some(err)
        },
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    for err in results.into_iter().flatten() {
        assert!(
            matches!(
                err,
                CollectiveError::PeerFailed {
                    op: "all_reduce",
                    ..
                } | CollectiveError::PeerTimeout {
                    op: "all_reduce",
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn a_peer_that_never_joins_the_collective_times_out() {
    let mut cfg = quick();
    cfg.op_timeout = Duration::from_millis(500);
    let results = world(
        3,
        |_| "e".into(),
        cfg,
        |rank, ring| {
            let mut ring = ring.unwrap();
            if rank == 0 {
                // Alive, but never calls all_reduce.
                std::thread::sleep(Duration::from_secs(3));
                return None;
            }
            let t = Tensor::ones(100_000, DType::F32, &Device::Cpu).unwrap();
            let start = Instant::now();
            let err = ring.all_reduce(&[t], ReduceOp::Mean).unwrap_err();
            Some((start.elapsed(), err))
        },
    );
    for (elapsed, err) in results.into_iter().flatten() {
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        assert!(
            matches!(
                err,
                CollectiveError::PeerTimeout { .. } | CollectiveError::PeerFailed { .. }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("rank"), "{err}");
    }
}

#[test]
fn ranks_that_disagree_on_the_collective_fail() {
    let results = world(
        2,
        |_| "f".into(),
        quick(),
        |rank, ring| {
            let mut ring = ring.unwrap();
            let t = Tensor::ones(10 + rank, DType::F32, &Device::Cpu).unwrap();
            ring.all_reduce(&[t], ReduceOp::Sum).unwrap_err()
        },
    );
    for err in results {
        assert!(
            err.to_string().contains("disagree") || err.to_string().contains("closed"),
            "{err}"
        );
    }
}

#[test]
fn connect_times_out_without_neighbours() {
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    let mut cfg = quick();
    cfg.connect_timeout = Duration::from_millis(300);
    let start = Instant::now();
    // Rank 1 never runs: its listener accepts nothing.
    let err = Ring::connect(&addrs, 0, l0, "g", cfg).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(
            err,
            CollectiveError::PeerTimeout { .. } | CollectiveError::PeerFailed { .. }
        ),
        "{err}"
    );
    drop(l1);
}

/// Bus bandwidth `2(n-1)/n × bytes / time` of 1, 16 and 64 MiB all-reduces on 2 and 4 ranks
/// (timing, not a check; build with optimisation for meaningful figures:
/// `cargo nextest run --release -p trainyard-collective --run-ignored only --no-capture
/// bus_bandwidth`). `RING_SEGMENT_BYTES` and `RING_SOCKET_BUFFER_BYTES` override the config.
#[test]
#[ignore = "timing"]
fn bus_bandwidth() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    for mib in [1, 16, 64] {
        let len = mib * 1024 * 1024 / 4;
        for n in [2, 4] {
            let mut cfg = RingConfig::default();
            if let Some(b) = env("RING_SEGMENT_BYTES") {
                cfg.segment_bytes = b;
            }
            if let Some(b) = env("RING_SOCKET_BUFFER_BYTES") {
                cfg.socket_buffer_bytes = b;
            }
            let times = world(
                n,
                |_| "h".into(),
                cfg,
                |rank, ring| {
                    let mut ring = ring.unwrap();
                    let t = Tensor::from_vec(data(rank, len), len, &Device::Cpu).unwrap();
                    ring.all_reduce(std::slice::from_ref(&t), ReduceOp::Sum)
                        .unwrap();
                    let iters = 10;
                    ring.barrier().unwrap();
                    let start = Instant::now();
                    for _ in 0..iters {
                        ring.all_reduce(std::slice::from_ref(&t), ReduceOp::Sum)
                            .unwrap();
                    }
                    start.elapsed() / iters
                },
            );
            let t = times.iter().max().unwrap().as_secs_f64();
            let bus = 2.0 * (n - 1) as f64 / n as f64 * (len * 4) as f64 / t / 1e9;
            println!(
                "ring all_reduce {mib} MiB, {n} ranks: {:.2} ms, bus bandwidth {bus:.2} GB/s",
                t * 1e3
            );
        }
    }
}
