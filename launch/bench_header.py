"""Host cost of the per-call header round (``ds_burst.attention.validate.agree``): every call of a group of
several ranks swaps a fixed-size header over the group's CPU channel (gloo). This times that exchange alone on
CPU ranks of one host, for every rank (all-pairs, the default ``check_inputs=True``) and for the two ring
neighbours (``check_inputs=False``), and one whole ``burst_attn_func`` call at a tiny shape for scale.

    python launch/bench_header.py --worlds 2 4 8 --iters 300 --out header.json

Prints a table (microseconds per call, median over the ranks' means) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import free_port  # noqa: E402


def _worker(rank: int, world: int, port: int, iters: int, queue: mp.Queue) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    import ds_burst
    from ds_burst.attention.validate import _HEADER
    from ds_burst.dist.comm import exchange_header, header_channel, resolve_group

    chan = header_channel(resolve_group(None))
    assert chan is not None
    values = list(range(len(_HEADER)))
    out = {}
    for name, neighbours in (("all-pairs", False), ("neighbours", True)):
        for _ in range(20):
            exchange_header(chan, values, neighbours_only=neighbours)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            exchange_header(chan, values, neighbours_only=neighbours)
        out[name] = (time.perf_counter() - t0) / iters * 1e6
    q = torch.randn(1, 16, 2, 8)
    for _ in range(5):
        ds_burst.burst_attn_func(q, q, q, kernel="torch")
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters // 3):
        ds_burst.burst_attn_func(q, q, q, kernel="torch")
    out["whole call (16 tokens/rank)"] = (time.perf_counter() - t0) / (iters // 3) * 1e6
    queue.put((rank, out))
    dist.destroy_process_group()


def measure(world: int, iters: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, iters, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    names = rows[0][1].keys()
    return {n: statistics.median(r[1][n] for r in rows) for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    args = ap.parse_args()
    results = []
    print(f"host: {socket.gethostname()}, {os.cpu_count()} CPUs, torch {torch.__version__}", file=sys.stderr)
    for world in args.worlds:
        got = measure(world, args.iters)
        results.append({"world": world, "us_per_call": got, "cpus": os.cpu_count()})
        print(f"P={world}: " + ", ".join(f"{k} {v:.0f} us" for k, v in got.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"method": "header round on gloo (one host)", "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
