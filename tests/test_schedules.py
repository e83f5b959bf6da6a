"""Topology-aware schedules (double ring, Ulysses inside + ring across) on gloo ranks acting as several
nodes (2x2, 2x3, 3x2): every case's gathered output and gradients against the float64 full-sequence
reference, and a check that the schedule really ran. (``schedule="ulysses"`` and ``ulysses_degree``:
tests/test_ulysses_schedule.py.)"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from dist_utils import run_ranks, values

NODE_SHAPES = [(2, 2), (2, 3), (3, 2)]  # (nodes, gpus per node)
HQ = 6
CASES = {
    "double_ring": list(itertools.product(["causal", "full", "causal_window", "window"], ["zigzag", "contiguous"],
                                          ["burst", "ring"], [HQ, 1])),
    # KV heads 1 are replicated to the node size; windows run on the node-level ring (it stops early)
    "ulysses_ring": list(itertools.product(["causal", "full"], ["zigzag", "contiguous"], ["burst", "ring"],
                                           [HQ, 1]))
    + list(itertools.product(["causal_window", "window"], ["zigzag", "contiguous"], ["burst"], [1])),
    # the cost model picks per call; correctness only
    "auto": list(itertools.product(["causal", "full"], ["zigzag"], ["auto"], [HQ, 1])),
}


def _mask(mask: str, s_local: int):
    return {
        "causal": (True, (-1, -1)),
        "full": (False, (-1, -1)),
        "causal_window": (True, (s_local + 3, 0)),
        "window": (False, (s_local // 2, s_local + 1)),
    }[mask]


def worker_schedule(rank, world, per_node, schedule):
    import ds_burst
    import ds_burst.ring.double_ring as dr
    import ds_burst.ring.ulysses_ring as ur
    from ds_burst.kernels.reference import naive_attention

    calls = [0]
    if schedule != "auto":
        module, name = (dr, "run_double_ring") if schedule == "double_ring" else (ur, "to_node")
        original = getattr(module, name)

        def counting(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        setattr(module, name, counting)
    topo = ds_burst.init_sequence_parallel(world, gpus_per_node=per_node, schedule=schedule)
    assert topo.schedule == schedule and topo.node_groups is not None
    errs = {}
    if schedule == "ulysses_ring":  # heads that cannot be split over the node: a clear error on every rank
        bad = torch.randn(1, 4, per_node + 1, 8)
        try:
            ds_burst.burst_attn_func(bad, bad, bad, group=topo)
            errs["bad_heads"] = ""
        except ValueError as exc:
            errs["bad_heads"] = str(exc)
    for idx, (mask, layout, backward, hkv) in enumerate(CASES[schedule]):
        g = torch.Generator().manual_seed(idx)
        s = 4 * world
        q, k, v, do = (torch.randn(2, s, h, 16, generator=g, dtype=torch.float64) for h in (HQ, hkv, hkv, HQ))
        causal, window = _mask(mask, s // world)
        qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
        ref, _ = naive_attention(qf, kf, vf, causal=causal, window=window)
        ref.backward(do)
        ql, kl, vl = (ds_burst.shard_sequence(x, 1, topo, layout).requires_grad_() for x in (q, k, v))
        before = calls[0]
        out = ds_burst.burst_attn_func(ql, kl, vl, causal=causal, window_size=window, group=topo, layout=layout,
                                       backward=backward)
        out.backward(ds_burst.shard_sequence(do, 1, topo, layout))
        used = calls[0] > before or schedule == "auto"
        got = [ds_burst.gather_sequence(t.detach(), 1, topo, layout) for t in (out, ql.grad, kl.grad, vl.grad)]
        err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, [ref.detach(), qf.grad, kf.grad, vf.grad]))
        errs[(mask, layout, backward, hkv)] = (err, used)
    return errs


def worker_all(rank, world, per_node):
    """Every schedule's cases, one after the other, in one launch of this node shape."""
    return {schedule: worker_schedule(rank, world, per_node, schedule) for schedule in CASES}


@functools.cache
def _launch(nodes: int, per_node: int):
    return values(run_ranks(worker_all, nodes * per_node, per_node, timeout=900))


def _results(nodes: int, per_node: int, schedule: str):
    return [res[schedule] for res in _launch(nodes, per_node)]


PARAMS = [(sched, shape, case) for sched in CASES for shape in NODE_SHAPES for case in CASES[sched]]


@pytest.mark.parametrize("shape", NODE_SHAPES, ids=str)
def test_ulysses_ring_rejects_heads_it_cannot_split(shape):
    for rank_errs in _results(*shape, "ulysses_ring"):
        assert "needs Hq divisible by the Ulysses degree" in rank_errs["bad_heads"]


@pytest.mark.parametrize("schedule,shape,case", PARAMS, ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple)
                         else str(x))
def test_schedule_matches_reference(schedule, shape, case):
    for rank_errs in _results(*shape, schedule):
        err, used = rank_errs[case]
        assert err < 1e-10, err
        # full attention runs the topology-aware schedule; sliding windows keep the flat ring (stops early) on the
        # double ring and run on the node-level ring of ulysses_ring
        assert used == (case[0] in ("causal", "full") or schedule == "ulysses_ring")
