"""Shared helpers of the benchmark scripts: FLOP counts, timing, table/JSON/plot output."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for a rendezvous of ranks this script starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_tokens(text: str) -> int:
    """A token count written ``131072``, ``128K`` (x 1024) or ``1M`` (x 1024^2); ``ValueError`` otherwise."""
    mult = {"K": 1024, "M": 1024 * 1024}.get(text[-1:].upper(), 1)
    return int(text[:-1] if mult > 1 else text) * mult


def attn_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, window: int = -1) -> float:
    """Forward FLOPs of attention: ``4*B*H*S^2*D``, halved when causal (window: keys per query)."""
    if window >= 0:
        keys = min(seq, window + 1)
        pairs = seq * keys - keys * (keys - 1) / 2
        return 4.0 * batch * heads * pairs * head_dim
    return 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)


def cuda_time_ms(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> float:
    """Median wall time of ``fn`` in ms, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def host_us(fn: Callable[[], object], calls: int = 50, warmup: int = 3) -> float:
    """CPU microseconds per call of ``fn`` issued ``calls`` times back to back without a sync, after ``warmup``
    calls, from an idle device: what the host spends per call while the GPU runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def dist_time_ms(fn: Callable[[], object], warmup: int = 1, iters: int = 4) -> float:
    """Median over iterations of the slowest rank's wall time (barrier before each), in ms."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    vals = sorted(t.tolist())
    return vals[len(vals) // 2]


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print ``rows`` as a fixed-width table with ``columns``."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns), flush=True)


def _fmt(x: object) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    """Write ``{"meta": meta, "rows": rows}`` to ``path`` (creating its folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def device_meta() -> dict:
    """GPU name, count and library versions for the JSON header."""
    meta = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
        meta["gpus"] = torch.cuda.device_count()
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    return meta


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` without matplotlib (plots are
    optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def tl_kernel() -> str:
    """The name of a kernel (registered on first use) that runs the Triton tiles on their portable ``tl`` kernels
    alone, the Gluon Hopper kernels off: ``burst_attn_func(kernel=tl_kernel())`` times them beside
    ``kernel="triton"`` on the same GPU."""
    from ds_burst.kernels import registry
    from ds_burst.kernels import triton_attn as ta

    if "triton-tl" not in registry.names():
        registry.register(ta.kernel(ta.Tiles(hopper=False), "triton-tl"))
    return "triton-tl"

