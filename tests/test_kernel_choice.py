"""``kernel="auto"`` on GPUs: the measured, cached, rank-agreed pick (exercised on CPU with fake timers)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dist_utils import run_ranks, values
from ds_burst.dist.comm import GroupInfo, all_gather_ints
from ds_burst.kernels import choice as kc


def _qk(s: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, s, 4, 16), torch.randn(1, s, 2, 16)


def test_candidates():
    q, _ = _qk()
    assert kc.candidates(q, False, "auto", False) == ["torch"]  # CPU: nothing to measure


def test_measure_scores_the_ring_tile_mix():
    def timer(name, shape, dtype, device, causal):
        if name == "broken":
            raise RuntimeError("unsupported shape")
        return {"a": 1.0, "b": 2.0}[name] * (0.5 if causal else 1.0)

    s = kc.measure(["a", "b", "broken"], (1, 16, 4, 2, 16), torch.float32, torch.device("cpu"), True, 4, timer)
    assert s["a"] == pytest.approx(0.5 + 1.5 * 1.0) and s["b"] == pytest.approx(1.0 + 1.5 * 2.0)
    assert math.isinf(s["broken"])
    s = kc.measure(["a"], (1, 16, 4, 2, 16), torch.float32, torch.device("cpu"), False, 4, timer)
    assert s["a"] == pytest.approx(4.0)


def test_real_tiles_are_timed_on_cpu():
    ms = kc.measure(["torch", "sdpa"], (1, 32, 4, 2, 16), torch.float32, torch.device("cpu"), True, 2)
    assert all(0 < v < math.inf for v in ms.values()), ms


def test_pick_is_cached_in_memory_and_file(tmp_path, monkeypatch):
    path = tmp_path / "choice.json"
    monkeypatch.setenv("DS_BURST_KERNEL_CACHE", str(path))
    kc.clear_memory()
    calls = []

    def timer(name, shape, dtype, device, causal):
        calls.append(name)
        return {"torch": 3.0, "sdpa": 1.0}[name]

    q, k = _qk()
    assert kc.choose(q, k, True, False, "auto", False, 1, None, None, timer, ["torch", "sdpa"]) == "sdpa"
    n = len(calls)
    assert n == 4  # two kernels x (causal, full) tiles
    assert kc.choose(q, k, True, False, "auto", False, 1, None, None, timer, ["torch", "sdpa"]) == "sdpa"
    assert len(calls) == n  # in memory
    kc.clear_memory()
    assert kc.choose(q, k, True, False, "auto", False, 1, None, None, timer, ["torch", "sdpa"]) == "sdpa"
    assert len(calls) == n  # from the file
    data = json.loads(path.read_text())
    (entry,) = data.values()
    assert entry["kernel"] == "sdpa" and entry["ms"]["torch"] > entry["ms"]["sdpa"]
    q2, k2 = _qk(32)  # another shape is measured again
    kc.choose(q2, k2, True, False, "auto", False, 1, None, None, timer, ["torch", "sdpa"])
    assert len(calls) == 2 * n
    path.write_text("{not json")  # a damaged file is ignored and rewritten
    kc.clear_memory()
    assert kc.choose(q, k, True, False, "auto", False, 1, None, None, timer, ["torch", "sdpa"]) == "sdpa"
    assert json.loads(path.read_text())
    monkeypatch.setenv("DS_BURST_KERNEL_CACHE", "0")
    assert kc.cache_path() is None


def _agree_worker(rank: int, world: int, cache: str) -> list[str]:
    import os

    import torch.distributed as dist

    os.environ["DS_BURST_KERNEL_CACHE"] = cache
    faster = ["torch", "sdpa", "sdpa"][rank]  # each rank would pick differently on its own

    def timer(name, shape, dtype, device, causal):
        return 1.0 if name == faster else 2.0

    info = GroupInfo(dist.group.WORLD, rank, world)
    q, k = _qk()
    agree = lambda i: all_gather_ints(info, [i], q.device)[0][0]
    picks = [kc.choose(q, k, True, False, "auto", False, world, info.group, agree, timer, ["torch", "sdpa"])
             for _ in range(3)]
    dist.barrier()  # a rank that issued an extra collective would hang here or above
    return picks


def test_ranks_take_rank0_pick():
    picks = values(run_ranks(_agree_worker, 3, "0", timeout=120))
    assert picks == [["torch"] * 3] * 3
