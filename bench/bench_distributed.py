"""Measures the block engine's distributed modes on CPU (gloo): step time, bytes sent, peak memory per rank.

    python bench/bench_distributed.py --world 2 --rows 8192 16384 --dim 128 --out bench/results/distributed_cpu.json

For each global size M (rows of the similarity: NT-Xent with M/2 samples × 2 views) and each mode
(local = one rank's own rows only, gather, ring), a fresh world of ``--world`` processes runs one
warm-up and ``--repeats`` timed forward+backward steps of ``fastcl.functional.nt_xent`` on the torch
backend (one thread per rank). Per rank it records the median step time, the bytes this rank handed to
``all_gather`` / ``reduce_scatter`` / point-to-point sends during one step (its share of a collective:
(W−1)/W of the all-gathered buffer) next to :func:`fastcl.distributed.scaling_model`, and the growth of
the process's peak RSS from just before the first step (inputs allocated) to after the last
(``ru_maxrss``: loss buffers, tiles and autograd state together; allocator caching and page granularity
make it a coarse upper bound of what the loss holds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _SentBytes:
    """Counts what this rank sends: p2p sends, and its (W−1)/W share of all_gather / reduce_scatter."""

    def __init__(self):
        from fastcl import distributed as fdist

        self.total, world = 0, dist.get_world_size()
        share = (world - 1) / world
        gather, isend, scatter = dist.all_gather, dist.P2POp, fdist._reduce_scatter

        def all_gather(outputs, tensor, *args, **kwargs):
            self.total += int(share * tensor.numel() * tensor.element_size() * world)
            return gather(outputs, tensor, *args, **kwargs)

        def reduce_scatter(output, tensor, *args, **kwargs):
            self.total += int(share * tensor.numel() * tensor.element_size())
            return scatter(output, tensor, *args, **kwargs)

        def p2p(op, tensor, peer, *args, **kwargs):
            if op is dist.isend:
                self.total += tensor.numel() * tensor.element_size()
            return isend(op, tensor, peer, *args, **kwargs)

        dist.all_gather, dist.P2POp, fdist._reduce_scatter = all_gather, p2p, reduce_scatter


def _rank(rank: int, world: int, port: int, rows: int, dim: int, mode: str, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from fastcl import functional

    n = rows // 2 // world  # samples per rank: R = 2n rows
    gen = torch.Generator().manual_seed(rank)
    z1 = torch.randn(n, dim, generator=gen).requires_grad_()
    z2 = torch.randn(n, dim, generator=gen).requires_grad_()

    def step():
        functional.nt_xent(z1, z2, 0.5, backend="torch", distributed=mode).backward()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    counter = _SentBytes()
    times = []
    for _ in range(repeats):
        counter.total = 0
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "step_s": statistics.median(times),
        "sent_bytes": counter.total,
        "peak_rss_growth_bytes": (rss_after - rss_before) * 1024,
    }
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, rows: int, dim: int, mode: str, repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _rank, args=(world, _free_port(), rows, dim, mode, repeats, out), nprocs=world, start_method="spawn"
        )
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[8192, 16384], help="global similarity rows M")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    from fastcl.distributed import scaling_model

    results = []
    for rows in args.rows:
        model = scaling_model(rows, args.world, args.dim, element_bytes=4, grad_bytes=4)
        for mode in ("local", "gather", "ring"):
            ranks = measure(args.world, rows, args.dim, mode, args.repeats)
            row = {
                "rows": rows,
                "world": args.world,
                "dim": args.dim,
                "mode": mode,
                "step_s": max(r["step_s"] for r in ranks),
                "sent_bytes": max(r["sent_bytes"] for r in ranks),
                "model_sent_bytes": model.get(mode, {}).get("sent_bytes", 0),
                "model_held_bytes": model.get(mode, {}).get("held_bytes", 0),
                "peak_rss_growth_bytes": max(r["peak_rss_growth_bytes"] for r in ranks),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"torch": torch.__version__, "threads_per_rank": 1, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
