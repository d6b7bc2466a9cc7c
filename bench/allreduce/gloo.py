#!/usr/bin/env python3
"""All-reduce bus bandwidth of PyTorch's Gloo backend (torch.distributed, CPU) on loopback.

The reference that `cargo bench -p trainyard-collective --bench allreduce` compares the
Trainyard ring with: the same sizes, rank counts, warm-up and iteration counts, and the
same timing method. Every rank is its own process (torch.multiprocessing, "spawn"); each
iteration is a barrier, then one all-reduce (sum, f32, in place) timed on every rank; an
iteration's time is the slowest rank's, and the figure is the median over the iterations.
Bus bandwidth is 2(n-1)/n x bytes / time.

Usage: gloo.py OUT.json [--sizes-mib 1,16,64] [--ranks 2,4] [--warmup 3]
                        [--iters 1:40,16:15,64:8]
Writes {"results": [{"mib", "ranks", "median_s", "bus_gbps", "iters"}], "torch": ...}.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iterations_for(spec: str, mib: int) -> int:
    """Iterations for a size from a spec like "1:40,16:15,64:8" (10 when not listed)."""
    table = dict(tuple(int(x) for x in item.split(":")) for item in spec.split(","))
    return table.get(mib, 10)


def rank_main(rank, world, port, sizes, warmup, iters_spec, queue):
    import torch
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    out = []
    for mib in sizes:
        n = mib * 1024 * 1024 // 4
        t = torch.full((n,), float(rank + 1), dtype=torch.float32)
        for _ in range(warmup):
            dist.all_reduce(t)
        iters = iterations_for(iters_spec, mib)
        times = torch.zeros(iters, dtype=torch.float64)
        for i in range(iters):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            times[i] = time.perf_counter() - start
        # An iteration takes as long as its slowest rank.
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        if rank == 0:
            out.append((mib, times.tolist()))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        queue.put(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--sizes-mib", default="1,16,64")
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", default="1:40,16:15,64:8")
    a = p.parse_args()
    sizes = [int(x) for x in a.sizes_mib.split(",")]

    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = []
    for world in (int(x) for x in a.ranks.split(",")):
        port = free_port()
        queue = ctx.Queue()
        procs = [
            ctx.Process(
                target=rank_main,
                args=(r, world, port, sizes, a.warmup, a.iters, queue),
            )
            for r in range(world)
        ]
        for pr in procs:
            pr.start()
        out = queue.get(timeout=1800)
        for pr in procs:
            pr.join(timeout=60)
            if pr.exitcode != 0:
                print(f"gloo rank exited with {pr.exitcode}", file=sys.stderr)
                return 1
        for mib, times in out:
            med = statistics.median(times)
            bus = 2 * (world - 1) / world * mib * 1024 * 1024 / med / 1e9
            results.append(
                {
                    "mib": mib,
                    "ranks": world,
                    "median_s": med,
                    "bus_gbps": bus,
                    "iters": len(times),
                }
            )
            print(
                f"gloo all_reduce {mib:>3} MiB, {world} ranks: {med * 1e3:8.2f} ms, "
                f"bus bandwidth {bus:.2f} GB/s",
                flush=True,
            )
    with open(a.out, "w") as f:
        json.dump({"torch": torch.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
