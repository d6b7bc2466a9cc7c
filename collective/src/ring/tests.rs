//! Ring tests: every rank is a thread of this process, on 127.0.0.1 with port-0 listeners.

use super::*;
use candle_core::{DType, Device};

/// Short timeouts: a failing test fails in seconds.
fn quick() -> RingConfig {
    RingConfig {
        connect_timeout: Duration::from_secs(10),
        op_timeout: Duration::from_secs(10),
        // Small pieces, so that small buffers are pipelined too.
        segment_bytes: 4096,
        ..RingConfig::default()
    }
}

/// `quick()` over TCP only.
fn quick_tcp() -> RingConfig {
    RingConfig {
        shared_memory: false,
        ..quick()
    }
}

/// Both transports of `all_reduce`: shared memory (the default on one host) and TCP.
fn transports() -> [(&'static str, RingConfig); 2] {
    [("shm", quick()), ("tcp", quick_tcp())]
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
    for (transport, config) in transports() {
        all_reduce_matches(transport, config);
    }
}

fn all_reduce_matches(transport: &str, config: RingConfig) {
    for n in 1..=5 {
        // 1,000,003 elements span several shared-memory windows, the last one short.
        for len in [0, 1, 7, 1000, 1_000_003] {
            let sum: Vec<f32> = (0..len)
                .map(|i| (0..n).map(|r| value(r, i)).sum())
                .collect();
            let mean: Vec<f32> = sum.iter().map(|s| s / n as f32).collect();
            let results = world(
                n,
                |_| "a1".into(),
                config.clone(),
                |rank, ring| {
                    let mut ring = ring.unwrap();
                    assert_eq!(
                        (ring.rank(), ring.world_size(), ring.backend()),
                        (rank, n, "ring")
                    );
                    assert_eq!(ring.uses_shared_memory(), transport == "shm" && n > 1);
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
                assert!(
                    s == sum,
                    "{transport} sum: world {n}, {len} elements, rank {rank}"
                );
                assert!(
                    m == mean,
                    "{transport} mean: world {n}, {len} elements, rank {rank}"
                );
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
    for (transport, config) in transports() {
        for n in [2, 3] {
            fused_tensors_match(transport, config.clone(), n, &shapes);
        }
    }
}

fn fused_tensors_match(transport: &str, config: RingConfig, n: usize, shapes: &[Vec<usize>]) {
    let results = world(
        n,
        |_| "a".into(),
        config,
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
        for (t, shape) in out.iter().zip(shapes) {
            assert_eq!(t.dims(), shape.as_slice());
            let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want: Vec<f32> = (next..next + got.len())
                .map(|i| (0..n).map(|r| value(r, i)).sum())
                .collect();
            next += got.len();
            assert_eq!(got, want, "{transport}, world {n}");
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
    for (_, mut cfg) in transports() {
        cfg.op_timeout = Duration::from_secs(3);
        peer_goes_away(cfg);
    }
}

fn peer_goes_away(cfg: RingConfig) {
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
    for (_, mut cfg) in transports() {
        cfg.op_timeout = Duration::from_millis(500);
        peer_never_joins(cfg);
    }
}

fn peer_never_joins(cfg: RingConfig) {
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
        // Over TCP rank 2 waits for rank 1, which waits for rank 0; in shared memory both
        // wait for rank 0 (or see rank 1 give up first).
        if let CollectiveError::PeerTimeout { peer, .. } = err {
            assert!(peer == 0 || peer == 1, "{err}");
        }
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
    for (_, cfg) in transports() {
        ranks_disagree(cfg);
    }
}

fn ranks_disagree(cfg: RingConfig) {
    let results = world(
        2,
        |_| "f".into(),
        cfg,
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
fn views_and_non_contiguous_tensors_are_reduced() {
    for (transport, config) in transports() {
        let make = |rank: usize| {
            let base = Tensor::from_vec(data(rank, 24), (4, 6), &Device::Cpu).unwrap();
            vec![
                base.t().unwrap(),             // not contiguous: copied out
                base.narrow(0, 1, 2).unwrap(), // contiguous at an offset: borrowed
                base.narrow(1, 2, 3).unwrap(), // not contiguous
                Tensor::new(&[1.5f32], &Device::Cpu)
                    .unwrap()
                    .reshape(())
                    .unwrap(), // scalar
            ]
        };
        let n = 3;
        let results = world(
            n,
            |_| "v".into(),
            config,
            |rank, ring| {
                ring.unwrap()
                    .all_reduce(&make(rank), ReduceOp::Sum)
                    .unwrap()
            },
        );
        let inputs: Vec<Vec<Tensor>> = (0..n).map(make).collect();
        for out in results {
            for (i, t) in out.iter().enumerate() {
                assert_eq!(t.dims(), inputs[0][i].dims(), "{transport}");
                let want = (1..n).fold(inputs[0][i].clone(), |acc, r| {
                    (acc + &inputs[r][i]).unwrap()
                });
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(flat(t), flat(&want), "{transport}, tensor {i}");
            }
        }
    }
}

#[test]
fn shared_memory_is_chosen_only_when_every_rank_allows_it_and_leaves_no_file() {
    let ours = |name: &str| name.starts_with(&format!("trainyard-ring-{}-", std::process::id()));
    let leftovers = || {
        std::fs::read_dir("/dev/shm")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| ours(&e.file_name().to_string_lossy()))
                    .count()
            })
            .unwrap_or(0)
    };
    let used = world(
        3,
        |_| "s".into(),
        quick(),
        |_, ring| ring.unwrap().uses_shared_memory(),
    );
    assert!(used.iter().all(|&u| u == cfg!(target_os = "linux")));
    for off in [0, 2] {
        let listeners: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let used: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let addrs = &addrs;
                    s.spawn(move || {
                        let cfg = if rank == off { quick_tcp() } else { quick() };
                        let mut ring = Ring::connect(addrs, rank, l, "s", cfg).unwrap();
                        let t = Tensor::ones(5000, DType::F32, &Device::Cpu).unwrap();
                        let r = ring.all_reduce(&[t], ReduceOp::Sum).unwrap();
                        assert_eq!(r[0].to_vec1::<f32>().unwrap(), vec![3.0; 5000]);
                        ring.uses_shared_memory()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(used, vec![false; 3], "rank {off} has shared memory off");
    }
    assert_eq!(
        leftovers(),
        0,
        "a shared-memory segment was left in /dev/shm"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn a_killed_peer_is_noticed_in_shared_memory_before_the_timeout() {
    // A killed process cannot raise the abort flag; the kernel closes its sockets, which the
    // waiting ranks watch.
    let mut cfg = quick();
    cfg.op_timeout = Duration::from_secs(20);
    let results = world(
        3,
        |_| "k".into(),
        cfg,
        |rank, ring| {
            let mut ring = ring.unwrap();
            assert!(ring.uses_shared_memory());
            let t = Tensor::ones(300_000, DType::F32, &Device::Cpu).unwrap();
            ring.all_reduce(std::slice::from_ref(&t), ReduceOp::Sum)
                .unwrap();
            if rank == 2 {
                std::thread::sleep(Duration::from_millis(100));
                // "Killed": the sockets close, the segment stays mapped and silent.
                std::mem::forget(ring.shm.take());
                drop(ring);
                return None;
            }
            let start = Instant::now();
            let err = ring
                .all_reduce(std::slice::from_ref(&t), ReduceOp::Sum)
                .unwrap_err();
            Some((start.elapsed(), err))
        },
    );
    for (elapsed, err) in results.into_iter().flatten() {
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}: {err}");
        assert!(
            matches!(
                err,
                CollectiveError::PeerFailed {
                    op: "all_reduce",
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn a_tcp_collective_against_a_shared_memory_all_reduce_fails_fast() {
    let results = world(
        3,
        |_| "m".into(),
        quick(),
        |rank, ring| {
            let mut ring = ring.unwrap();
            let start = Instant::now();
            let err = if rank == 1 {
                ring.barrier().unwrap_err()
            } else {
                let t = Tensor::ones(1000, DType::F32, &Device::Cpu).unwrap();
                ring.all_reduce(&[t], ReduceOp::Sum).unwrap_err()
            };
            (start.elapsed(), err)
        },
    );
    for (elapsed, err) in results {
        // Well before the 10 s timeout.
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains("disagree") || msg.contains("closed") || msg.contains("failed or left"),
            "{msg}"
        );
    }
}

#[test]
fn many_small_collectives_in_a_row() {
    // Sequence numbers, barriers and buffer parities stay in step over many operations of
    // varying sizes, mixed with broadcasts and barriers.
    for (transport, config) in transports() {
        let n = 4;
        let results = world(
            n,
            |_| "r".into(),
            config,
            |rank, ring| {
                let mut ring = ring.unwrap();
                for i in 0..60usize {
                    let len = (i * 7919) % 300_000;
                    let t = Tensor::from_vec(data(rank + i, len), len, &Device::Cpu).unwrap();
                    let op = if i % 2 == 0 {
                        ReduceOp::Sum
                    } else {
                        ReduceOp::Mean
                    };
                    let got = ring.all_reduce(&[t], op).unwrap()[0]
                        .to_vec1::<f32>()
                        .unwrap();
                    let want: Vec<f32> = (0..len)
                        .map(|j| {
                            let s: f32 = (0..n).map(|r| value(r + i, j)).sum();
                            if op == ReduceOp::Mean {
                                s / n as f32
                            } else {
                                s
                            }
                        })
                        .collect();
                    assert!(got == want, "{transport}: op {i}, rank {rank}");
                    if i % 10 == 0 {
                        ring.barrier().unwrap();
                        let b = Tensor::from_vec(data(rank, 100), 100, &Device::Cpu).unwrap();
                        let out = ring.broadcast(&[b], i % n).unwrap();
                        assert_eq!(out[0].to_vec1::<f32>().unwrap(), data(i % n, 100));
                    }
                }
            },
        );
        assert_eq!(results.len(), n);
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
/// bus_bandwidth`). `RING_SEGMENT_BYTES` and `RING_SOCKET_BUFFER_BYTES` override the config,
/// `RING_SHARED_MEMORY=0` measures the TCP ring alone. Ranks are threads here; the
/// benchmark `cargo bench -p trainyard-collective --bench allreduce` runs them as processes.
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
            if env("RING_SHARED_MEMORY") == Some(0) {
                cfg.shared_memory = false;
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

#[test]
fn small_socket_buffers_and_writes_that_end_inside_an_element() {
    // Small kernel buffers make most writes partial, at any byte; several tensors make the
    // first send block span several input slices.
    let cfg = RingConfig {
        shared_memory: false,
        socket_buffer_bytes: 64 * 1024,
        // Odd: every piece ends inside an element.
        segment_bytes: 100_001,
        ..quick()
    };
    for n in [2, 3] {
        let lens = [654_321, 3, 0, 345_679];
        let results = world(
            n,
            |_| "p".into(),
            cfg.clone(),
            |rank, ring| {
                let mut ring = ring.unwrap();
                let mut next = 0;
                let tensors: Vec<Tensor> = lens
                    .iter()
                    .map(|&len| {
                        let v: Vec<f32> = (next..next + len).map(|i| value(rank, i)).collect();
                        next += len;
                        Tensor::from_vec(v, len, &Device::Cpu).unwrap()
                    })
                    .collect();
                (0..3)
                    .map(|_| {
                        let out = ring.all_reduce(&tensors, ReduceOp::Sum).unwrap();
                        out.iter()
                            .flat_map(|t| t.to_vec1::<f32>().unwrap())
                            .collect::<Vec<f32>>()
                    })
                    .collect::<Vec<_>>()
            },
        );
        let total: usize = lens.iter().sum();
        let want: Vec<f32> = (0..total)
            .map(|i| (0..n).map(|r| value(r, i)).sum())
            .collect();
        for (rank, outs) in results.into_iter().enumerate() {
            for (k, got) in outs.into_iter().enumerate() {
                assert!(got == want, "world {n}, rank {rank}, operation {k}");
            }
        }
    }
}
