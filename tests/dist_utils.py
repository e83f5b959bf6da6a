"""Spawn real gloo ranks on this machine and collect each rank's return value (or exception)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, outdir: str, backend: str, fn: Callable, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
        result = ("error", (type(exc).__name__, str(exc), traceback.format_exc()))
    with open(os.path.join(outdir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def run_ranks(
    fn: Callable, world: int, *args, timeout: float = 300.0, backend: str = "gloo"
) -> list[tuple[str, object]]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks (gloo on CPU, or nccl with one GPU each).

    Returns one ``("ok", value)`` or ``("error", (type, message, traceback))`` per rank. A rank that does
    not finish within ``timeout`` seconds makes this raise ``TimeoutError`` (a hang is a failure).
    """
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(
            _worker, args=(world, _free_port(), outdir, backend, fn, args), nprocs=world, join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in ctx.processes):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"distributed test did not finish within {timeout:.0f}s (hang?)")
            time.sleep(0.2)
        results = []
        for r, p in enumerate(ctx.processes):
            path = os.path.join(outdir, f"{r}.pkl")
            if not os.path.exists(path):  # died before reporting (a crash): that is the rank's result
                results.append(("error", ("ProcessExited", f"exit code {p.exitcode}", "")))
                continue
            with open(path, "rb") as f:  # a rank that reported, then died in teardown, keeps its report
                results.append(pickle.load(f))
        return results


def values(results: list[tuple[str, object]]) -> list:
    """Return the per-rank values, raising if any rank failed."""
    for r, (status, val) in enumerate(results):
        if status != "ok":
            raise AssertionError(f"rank {r} failed: {val[0]}: {val[1]}\n{val[2]}")  # type: ignore[index]
    return [v for _, v in results]
