"""``schedule="ulysses"`` (the all-to-all over heads across the whole sequence-parallel group, ds-burst's kernels on
``H/P`` heads over the whole sequence) and the Ulysses x ring hybrid (``init_sequence_parallel(P,
ulysses_degree=U)``) against float64 references: gathered out, lse, dq, dk, dv and the all-reduced d sinks of every
case, and each rank's ``max_logit`` against the maximum over its own queries.

Cases: causal, full and sliding windows; packed documents from ``cu_seqlens`` and from ``position_ids``; GQA with
``Hkv < P`` (KV heads replicated as far as needed), ``Hkv = P`` and ``Hkv = 1``; softcap, sinks, ``Dv != D``; both
layouts, both backward patterns, deterministic; groups given as ``None`` (the world), ``group.WORLD`` and topologies
(one node, and data parallel x Ulysses); ``torch.compile``; heads that cannot be split raise the same ``ValueError``
on every rank, and the group stays usable. Each group size is spawned once; every case runs inside that launch.
"""

from __future__ import annotations

import functools
import itertools
import math
import types

import pytest
import torch

from dist_utils import run_ranks, values
from kernel_utils import rel

D, DV = 8, 4
TOL64 = 1e-10
MASKS = {"causal": (True, None), "full": (False, None), "causal_window": (True, (1.5, 0)),
         "window": (False, (0.7, 1.2))}
DOC_MASKS = {"docs_causal": (True, None), "docs_full": (False, None), "docs_window": (True, (1.25, 0))}
VARIANTS = {  # (softcap, sinks, value head dim)
    "plain": (None, False, D),
    "softcap": (2.0, False, D),
    "sinks": (None, True, D),
    "mla": (None, False, DV),
    "all": (3.0, True, DV),
}


def heads(world: int) -> tuple[int, list[int]]:
    """``(Hq, KV head counts)``: ``Hkv = Hq``, ``Hkv = P`` (or, at P = 4, 2 < P: replicated twice) and 1."""
    hq = 6 if world == 3 else 4
    return hq, [hq, 2 if world == 4 else world, 1]


def cases(world: int, docs_too: bool = True) -> list[tuple]:
    """``(mask, layout, hkv, variant, backward, deterministic, documents as)`` of one group size."""
    hq, kvs = heads(world)
    names = list(VARIANTS)
    got = []
    for i, (mask, layout, hkv) in enumerate(itertools.product(MASKS, ["zigzag", "contiguous"], kvs)):
        got.append((mask, layout, hkv, names[i % len(names)], ("burst", "ring")[i % 2], i % 3 == 0, None))
    if docs_too:
        for i, (mask, layout, given) in enumerate(itertools.product(DOC_MASKS, ["zigzag", "contiguous"],
                                                                    ["cu_seqlens", "position_ids"])):
            got.append((mask, layout, kvs[i % 3], names[(i + 2) % len(names)], ("ring", "burst")[i % 2], i % 4 == 1,
                        given))
    return got


def doc_bounds(s: int) -> tuple[int, ...]:
    """Uneven documents of a sequence of ``s`` tokens, one across the middle."""
    return (0, 3, s // 2 + 1, s - 2, s)


def _inputs(world, idx, hq, hkv, dv, with_sinks, batch=2, per_rank=4, seed=0):
    g = torch.Generator().manual_seed(700 + 31 * idx + world + 1000 * seed)
    s = per_rank * world
    q = torch.randn(batch, s, hq, D, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(batch, s, hkv, D, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(batch, s, hkv, dv, generator=g, dtype=torch.float64)
    do = torch.randn(batch, s, hq, dv, generator=g, dtype=torch.float64)
    sinks = torch.randn(hq, generator=g, dtype=torch.float64) if with_sinks else None
    return q, k, v, do, sinks


def _window(w, s_local):
    return (-1, -1) if w is None else (int(w[0] * s_local), int(w[1] * s_local))


def reference(q, k, v, do, sinks, causal, window, softcap, docs):
    """float64 ``[out, lse, dq, dk, dv, d sinks]`` of the full sequence, document by document (block-diagonal)."""
    from ds_burst.kernels.reference import naive_attention

    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    sf = None if sinks is None else sinks.clone().requires_grad_()
    bounds = docs if docs is not None else (0, q.shape[1])
    parts = [naive_attention(qf[:, a:b], kf[:, a:b], vf[:, a:b], causal=causal, window=window, softcap=softcap,
                             sinks=sf) for a, b in zip(bounds, bounds[1:])]
    out, lse = torch.cat([o for o, _ in parts], 1), torch.cat([m for _, m in parts], 2)
    out.backward(do)
    return [out.detach(), lse.detach(), qf.grad, kf.grad, vf.grad, None if sf is None else sf.grad]


def row_max(q, k, causal, window, docs):
    """float64 ``[B, S, Hq]``: each query's largest visible scaled score (before softcapping)."""
    from ds_burst.kernels.reference import visible_mask

    s, hq = q.shape[1], q.shape[2]
    kk = k.repeat_interleave(hq // k.shape[2], dim=2)
    sc = torch.einsum("bqhd,bkhd->bhqk", q, kk) * q.shape[3] ** -0.5
    ok = visible_mask(0, s, 0, s, causal, window, q.device)
    if docs is not None:
        idx = torch.bucketize(torch.arange(s), torch.tensor(docs[1:-1]), right=True)
        ok &= idx[:, None] == idx[None, :]
    return sc.masked_fill(~ok, -math.inf).amax(-1).transpose(1, 2)


def _positions(docs, batch):
    return torch.cat([torch.arange(e - s) for s, e in zip(docs, docs[1:])]).expand(batch, -1).contiguous()


def run_case(world, idx, case, group=None, schedule="ulysses", per_rank=4, seed=0, kernel="auto"):
    """This rank's call of one case on its shards; ``{name: relative error}`` of the gathered results against the
    float64 reference, and the bytes this rank sent per phase."""
    import torch.distributed as dist

    import ds_burst
    from ds_burst.dist.comm import resolve_group

    mask, layout, hkv, variant, backward, deterministic, given = case
    hq = heads(world)[0]
    softcap, with_sinks, dv = VARIANTS[variant]
    q, k, v, do, sinks = _inputs(world, idx, hq, hkv, dv, with_sinks, per_rank=per_rank, seed=seed)
    s = q.shape[1]
    causal, w = {**MASKS, **DOC_MASKS}[mask]
    window = _window(w, per_rank)
    docs = doc_bounds(s) if given else None
    extra = {}
    if given == "cu_seqlens":
        extra["cu_seqlens"] = torch.tensor(docs) if idx % 2 else list(docs)
    elif given == "position_ids":
        extra["position_ids"] = ds_burst.shard_sequence(_positions(docs, q.shape[0]), 1, group, layout)
    shard = lambda x: ds_burst.shard_sequence(x, 1, group, layout)  # noqa: E731
    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    sl = None if sinks is None else sinks.clone().requires_grad_()
    want_max = idx % 2 == 0
    ds_burst.reset_comm_stats()
    got = ds_burst.burst_attn_func(ql, kl, vl, causal=causal, window_size=window, group=group, layout=layout,
                                   backward=backward, deterministic=deterministic, schedule=schedule, softcap=softcap,
                                   sinks=sl, return_lse=True, return_max_logit=want_max, kernel=kernel, **extra)
    out, lse = got[0], got[1]
    out.backward(shard(do))
    stats = dict(ds_burst.comm_stats())
    with torch.no_grad():
        gathered = [ds_burst.gather_sequence(out, 1, group, layout), ds_burst.gather_sequence(lse, 2, group, layout),
                    *(ds_burst.gather_sequence(t.grad, 1, group, layout) for t in (ql, kl, vl))]
        dsinks = None
        if sl is not None:
            dsinks = sl.grad.clone()
            dist.all_reduce(dsinks, group=resolve_group(group).group)
    ref = reference(q, k, v, do, sinks, causal, window, softcap, docs)
    names = ["out", "lse", "dq", "dk", "dv", "dsinks"]
    errs = {n: rel(a, b) for n, a, b in zip(names, [*gathered, dsinks], ref) if b is not None}
    if want_max:
        mine = ds_burst.shard_sequence(row_max(q, k, causal, window, docs), 1, group, layout).amax(dim=(0, 1))
        errs["max_logit"] = float((got[2] - mine).abs().max())
    return errs, stats


def worker_main(rank, world):
    """Every case on the world; then topologies: ``schedule="ulysses"``, data parallel x Ulysses (4 ranks), and the
    hybrid (4 ranks); then the refusals."""
    import torch.distributed as dist

    import ds_burst
    import ds_burst.ring.ulysses_ring as ur

    calls = [0]
    original = ur.to_node

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    ur.to_node = counting
    res = {}
    for idx, case in enumerate(cases(world)):
        before = calls[0]
        errs, stats = run_case(world, idx, case, group=None if idx % 2 else dist.group.WORLD)
        # Ulysses ran: all-to-alls, no ring hop (a ring of one) and no relayout (every rank holds the whole sequence)
        res[("world",) + case] = (errs, calls[0] > before and stats.get("a2a", 0) > 0 and not stats.get("fwd")
                                  and not stats.get("relayout") and not stats.get("bwd_relayout"))
    # the fused ops' whole-block call (attend / attend_bwd) after the all-to-all: its gradients go back too
    fused = [c[:4] + ("ring", False) + c[6:] for c in cases(world) if c[3] in ("plain", "softcap")
             and c[0] != "window"]  # the fused ops' backward needs the output (backward="ring"), not deterministic
    for idx, case in enumerate(fused):
        errs, stats = run_case(world, idx, case, kernel="sdpa")
        res[("sdpa",) + case] = (errs, stats.get("a2a", 0) > 0 and not stats.get("fwd"))
    topo = ds_burst.init_sequence_parallel(world, gpus_per_node=world, schedule="ulysses")
    assert topo.schedule == "ulysses" and topo.ulysses_degree == world
    for idx, case in enumerate(cases(world, docs_too=False)[:6]):  # the topology's schedule, group=None
        errs, stats = run_case(world, idx, case, schedule=None)
        res[("topology",) + case] = (errs, stats.get("a2a", 0) > 0 and not stats.get("fwd"))
    if world == 2:
        bad = []  # a Ulysses degree that does not divide P, or differs across the ranks: every rank raises
        for degree in (3, 1 + rank):
            try:
                ds_burst.init_sequence_parallel(2, gpus_per_node=2, ulysses_degree=degree)
                bad.append("")
            except ValueError as exc:
                bad.append(str(exc))
        res["init_refusals"] = bad
        # ulysses_ring on a topology without node groups, inside one node: Ulysses over the node
        ds_burst.init_sequence_parallel(2, gpus_per_node=2, schedule="ring")
        for idx, case in enumerate(cases(2, docs_too=False)[:4]):
            errs, stats = run_case(2, idx, case, schedule="ulysses_ring")
            res[("node_ulysses",) + case] = (errs, stats.get("a2a", 0) > 0 and not stats.get("fwd"))
        res["auto_node"] = auto_inside_one_node()
        res["bad_table"] = bad_tile_table(rank)
    if world == 4:
        sp = ds_burst.init_sequence_parallel(2, gpus_per_node=4, schedule="ulysses")  # 2 replicas of 2 ranks
        for idx, case in enumerate(c for c in cases(2, docs_too=False) if c[2] != 1):
            errs, stats = run_case(2, idx, case, schedule=None, seed=sp.dp_rank)
            res[("dp2xsp2",) + case] = (errs, stats.get("a2a", 0) > 0 and not stats.get("fwd"))
        # the hybrid inside one node: all-to-all over 2 ranks, ring over the 2 groups
        hyb = ds_burst.init_sequence_parallel(4, gpus_per_node=4, ulysses_degree=2)
        assert (hyb.schedule, hyb.ulysses_degree, hyb.ulysses_groups.nodes) == ("ulysses_ring", 2, 2)
        for idx, case in enumerate(cases(4)):
            if case[2] == 2 and idx % 2:
                continue
            errs, stats = run_case(4, idx, case, schedule=None)
            ring = stats.get("fwd", 0) > 0 or case[0] not in ("causal", "full")
            res[("hybrid",) + case] = (errs, stats.get("a2a", 0) > 0 and ring)
    res["refusals"] = refusals(world)
    return res


def _table(ring_tflops, whole_tflops):
    """A tile table at this file's head dim whose ring tiles run at ``ring_tflops`` and whose whole call at
    ``whole_tflops``."""
    from ds_burst.core.tile_rates import TileRates

    pt = lambda r: ((1, r, r),)  # noqa: E731 - one point: that rate at every length
    return TileRates("test", D, "float64", (("diag", "torch", pt(ring_tflops)), ("step", "torch", pt(ring_tflops)),
                                            ("whole", "torch", pt(whole_tflops)), ("peer", "cudnn", pt(1.0))))


def auto_inside_one_node():
    """``schedule="auto"`` inside one node with a tile table (as on a GPU that has one): the cost model's pick runs,
    Ulysses where the table makes the ring's tiles slow, the ring where it makes them fast, each exact; without a
    table (CPU) the ring. ``{table: [(errs, ulysses ran, ring ran), ...]}``."""
    import ds_burst
    from ds_burst.attention.call_plan import clear_plans
    from ds_burst.core import cost_model as cm

    ds_burst.init_sequence_parallel(2, gpus_per_node=2)  # schedule "auto", one node
    original = cm.hardware_for
    got = {}
    try:
        for name, table in (("slow_ring", _table(1e-7, 1e3)), ("fast_ring", _table(1e3, 1e-7)), ("none", None)):
            cm.hardware_for = lambda gpu, d, e, t=table: cm.Hardware(tiles=t)
            cm.choose_schedule.cache_clear()
            clear_plans()  # the schedule is part of a cached plan: every rank plans again with this table
            got[name] = []
            every = list(enumerate(cases(2, docs_too=False)))
            for idx, case in (every[0], next(x for x in every if x[1][0] == "full")):  # causal, full
                errs, stats = run_case(2, idx, case, schedule="auto")
                got[name].append((errs, stats.get("a2a", 0) > 0, stats.get("fwd", 0) > 0))
    finally:
        cm.hardware_for = original
        cm.choose_schedule.cache_clear()
    return got


def bad_tile_table(rank):
    """``DS_BURST_TILE_RATES`` names an unreadable file on rank 1 only: ``schedule="auto"`` raises on every rank
    (rank 1's error, carried by the header) instead of leaving rank 0 waiting; with it unset again a call runs.
    ``[(error class, message), shape of the call after]``."""
    import os
    import tempfile

    import ds_burst
    from ds_burst.attention.call_plan import clear_plans
    from ds_burst.core import cost_model as cm
    from ds_burst.core import settings

    ds_burst.init_sequence_parallel(2, gpus_per_node=2)  # schedule "auto", one node

    def fresh():
        cm.hardware_for.cache_clear()
        cm.choose_schedule.cache_clear()
        clear_plans()

    q = torch.randn(1, 4, 2, D)
    with tempfile.TemporaryDirectory() as tmp:
        bad = os.path.join(tmp, "rates.json")
        with open(bad, "w") as f:
            f.write("{not json")
        if rank == 1:
            os.environ[settings.TILE_RATES] = bad
        fresh()
        try:
            ds_burst.burst_attn_func(q, q, q, schedule="auto")
            got = ("no error", "")
        except ValueError as exc:
            got = ("ValueError", str(exc))
        finally:
            os.environ.pop(settings.TILE_RATES, None)
            fresh()
    return got, tuple(ds_burst.burst_attn_func(q, q, q, schedule="auto").shape)


def refusals(world):
    """Heads a Ulysses schedule cannot split: every rank raises; afterwards a good call still runs."""
    import ds_burst

    bad = {2: [(3, 3), (6, 3)], 3: [(4, 4), (6, 2)], 4: [(6, 6), (12, 3)]}[world]
    got = []
    for hq, hkv in bad:
        q, k = torch.randn(1, 4, hq, D), torch.randn(1, 4, hkv, D)
        try:
            ds_burst.burst_attn_func(q, k, k, group=None, schedule="ulysses")
            got.append(("no error", ""))
        except ValueError as exc:
            got.append(("ValueError", str(exc)))
    if world == 4:  # the hybrid of 2 x 2 (the current topology): 3 query heads cannot be split over 2
        q = torch.randn(1, 4, 3, D)
        try:
            ds_burst.burst_attn_func(q, q, q)
            got.append(("no error", ""))
        except ValueError as exc:
            got.append(("ValueError", str(exc)))
    q = torch.randn(1, 4, world, D)
    ok = ds_burst.burst_attn_func(q, q, q, schedule="ulysses", group=None)
    return got, tuple(ok.shape)


@functools.cache
def main_results(world):
    return values(run_ranks(worker_main, world, timeout=600))


def _check(world, which):
    results = main_results(world)
    seen = 0
    for rank, res in enumerate(results):
        for key, val in res.items():
            if isinstance(key, str) or key[0] != which:  # the refusals and the auto picks have their own tests
                continue
            errs, ran = val
            seen += 1
            assert ran, f"the Ulysses schedule did not run: rank {rank}, {key}"
            bad = {n: e for n, e in errs.items() if not e <= TOL64}
            assert not bad, f"rank {rank}, {key}: {bad}"
            assert "dsinks" in errs or not VARIANTS[key[4]][1], f"d sinks not compared: {key}"
    return seen


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ulysses_every_case_matches_float64(world):
    n = _check(world, "world")
    assert n == world * len(cases(world))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ulysses_with_the_fused_whole_block_call(world):
    """kernel="sdpa": Ulysses' local call is one fused op (``attend`` / ``attend_bwd``), whose gradients must make
    the reverse all-to-all like the tiles' (the GPU's whole-block Hopper call takes the same path)."""
    assert _check(world, "sdpa") >= world * 4


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ulysses_on_a_topology(world):
    assert _check(world, "topology") == world * 6


def test_ulysses_ring_inside_one_node_is_ulysses():
    assert _check(2, "node_ulysses") == 2 * 4


def test_ulysses_data_parallel_replicas():
    assert _check(4, "dp2xsp2") > 0


def test_auto_inside_one_node_follows_the_tile_table():
    """``auto`` at one node runs ``ulysses`` where the tile table predicts it faster, else the ring (and the ring
    without a table); both exact against float64 on every rank."""
    for res in main_results(2):
        got = res["auto_node"]
        assert all(len(got[n]) == 2 for n in ("slow_ring", "fast_ring", "none")), got
        for name, (want_a2a, want_ring) in (("slow_ring", (True, False)), ("fast_ring", (False, True)),
                                            ("none", (False, True))):
            for errs, a2a, ring in got[name]:
                assert (a2a, ring) == (want_a2a, want_ring), (name, a2a, ring)
                bad = {n: e for n, e in errs.items() if not e <= TOL64}
                assert not bad, (name, bad)


def test_unreadable_tile_table_on_one_rank_raises_on_every_rank():
    results = main_results(2)
    for rank, res in enumerate(results):
        (kind, msg), shape = res["bad_table"]
        assert kind == "ValueError" and msg.startswith("rank 1: schedule='auto' could not choose: cannot read tile "
                                                       "rates"), (rank, msg)
        assert shape == (1, 4, 2, D)


def test_hybrid_ulysses_2_x_ring_2_inside_one_node():
    assert _check(4, "hybrid") > 4 * len(MASKS) * 2


@pytest.mark.parametrize("world", [2, 3, 4])
def test_heads_that_cannot_be_split_raise_on_every_rank(world):
    results = main_results(world)
    per_rank = [res["refusals"] for res in results]
    first, shape = per_rank[0]
    assert shape == (1, 4, world, D)  # the group is usable after the refusals
    assert len(first) == (3 if world == 4 else 2)
    for got, _ in per_rank[1:]:
        assert got == first  # the same error on every rank
    for i, (kind, msg) in enumerate(first):
        assert kind == "ValueError", msg
        if i == 2:
            assert "schedule 'ulysses_ring' needs Hq divisible by the Ulysses degree 2" in msg and "Hq=3" in msg, msg
        else:
            assert msg.startswith("rank 0: schedule 'ulysses' needs H"), msg
            assert ("Hq=" if i == 0 else "Hkv=") in msg, msg


def test_bad_ulysses_degree_raises_on_every_rank():
    for res in main_results(2):
        not_dividing, differing = res["init_refusals"]
        assert "ulysses_degree must be a positive int dividing sequence_parallel_size=2" in not_dividing
        assert "ulysses_degree differs across ranks: rank 0: 1, rank 1: 2" in differing


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


def worker_compile(rank, world):
    import torch.distributed as dist

    import ds_burst

    out = {}
    hq = 4
    for name, hkv, layout, causal, window, docs in (("gqa_sinks", 1, "zigzag", True, (-1, -1), None),
                                                    ("docs_window", 2, "contiguous", True, (3, 0), doc_bounds(8))):
        q, k, v, do, sinks = _inputs(world, 3, hq, hkv, D, True)
        ql, kl, vl = (ds_burst.shard_sequence(x, 1, layout=layout).requires_grad_() for x in (q, k, v))
        sl = sinks.clone().requires_grad_()
        extra = {} if docs is None else {"cu_seqlens": list(docs)}

        def attn(a, b, c, s, extra=extra, causal=causal, window=window, layout=layout):
            return ds_burst.burst_attn_func(a, b, c, causal=causal, window_size=window, layout=layout,
                                            schedule="ulysses", sinks=s, return_lse=True, return_max_logit=True,
                                            **extra)

        f = torch.compile(attn, backend="aot_eager", fullgraph=True)
        o, lse, mx = f(ql, kl, vl, sl)
        o.backward(ds_burst.shard_sequence(do, 1, layout=layout))
        eager = attn(ql.detach(), kl.detach(), vl.detach(), sl.detach())
        with torch.no_grad():
            got = [ds_burst.gather_sequence(o, 1, layout=layout), ds_burst.gather_sequence(lse, 2, layout=layout),
                   *(ds_burst.gather_sequence(t.grad, 1, layout=layout) for t in (ql, kl, vl))]
            ds = sl.grad.clone()
            dist.all_reduce(ds)
        ref = reference(q, k, v, do, sinks, causal, window, None, docs)
        errs = [rel(a, b) for a, b in zip([*got, ds], ref)]
        mine = ds_burst.shard_sequence(row_max(q, k, causal, window, docs), 1, layout=layout).amax(dim=(0, 1))
        out[name] = (max(errs), float((mx - mine).abs().max()),
                     bool(torch.equal(eager[0], o.detach()) and torch.equal(eager[2], mx)))
    return out


def test_ulysses_under_compile():
    for got in values(run_ranks(worker_compile, 2, timeout=600)):
        assert set(got) == {"gqa_sinks", "docs_window"}
        for name, (err, mx, eager_equal) in got.items():
            assert err <= TOL64 and mx <= TOL64 and eager_equal, (name, err, mx, eager_equal)


# ---------------------------------------------------------------------------------------------------------------
# one process: the schedule names, the Ulysses degree, and auto never picking heads it cannot split


def test_ulysses_is_a_schedule_everywhere():
    from ds_burst.attention.config import BurstConfig
    from ds_burst.attention.validate import SCHEDULES, _decode
    from ds_burst.dist.topology import check_schedule

    assert "ulysses" in SCHEDULES
    assert check_schedule("ulysses", 8, 4) == "ulysses" and check_schedule("ulysses", 4, 8) == "ulysses"
    assert _decode("schedule", [SCHEDULES.index("ulysses")] * 2) == "rank 0: ulysses, rank 1: ulysses"
    assert BurstConfig(schedule="ulysses").schedule == "ulysses"
    assert BurstConfig.from_dict({"ulysses_degree": 2}, 4).ulysses_degree == 2
    for bad in ({"ulysses_degree": 3}, {"ulysses_degree": 2, "schedule": "double_ring"}, {"ulysses_degree": 0}):
        with pytest.raises(ValueError, match="ulysses_degree"):
            BurstConfig.from_dict(bad, 4)


def test_ulysses_degree_picks_the_schedule():
    from ds_burst.dist.topology import ulysses_schedule

    assert ulysses_schedule(8, 8) == "ulysses" and ulysses_schedule(8, 1) == "ring"
    assert ulysses_schedule(8, 2) == "ulysses_ring" == ulysses_schedule(8, 4, "ulysses_ring")
    assert ulysses_schedule(4, 4, "ulysses_ring") == "ulysses"
    for p, u, sched in ((8, 3, "auto"), (8, 0, "auto"), (8, True, "auto"), (8, 2, "double_ring"), (8, 2, "ulysses")):
        with pytest.raises(ValueError, match="ulysses_degree"):
            ulysses_schedule(p, u, sched)


@pytest.mark.parametrize("pick", ["ulysses", "ulysses_ring"])
def test_auto_never_picks_heads_it_cannot_split(monkeypatch, pick):
    """Were the cost model to pick a Ulysses schedule, ``auto`` keeps it only where the heads split (a pure function
    of the call: no collective, the same on every rank)."""
    from ds_burst.attention import schedule as sched
    from ds_burst.dist.comm import GroupInfo, NodeGroups

    monkeypatch.setattr(sched, "choose_schedule", lambda *a: pick)
    nodes = NodeGroups(2, 4, GroupInfo(None, 0, 4), GroupInfo(None, 0, 2))
    topo = types.SimpleNamespace(schedule="auto", node_groups=nodes, gpus_per_node=4)
    info = GroupInfo(None, 0, 8)
    good = torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 8)
    bad = torch.zeros(1, 16, 6, 8), torch.zeros(1, 16, 6, 8)
    assert sched.resolve_schedule("auto", topo, *good, True, (-1, -1), info) == pick
    assert sched.resolve_schedule(None, topo, *bad, True, (-1, -1), info) == "double_ring"
