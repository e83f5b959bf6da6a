"""The ring loop's host work decided once: the per-pair kernel arguments (``RingSetup.calls``), the step schedule
(``ring_schedule``), the P2P batch's error text worded only on an error, the group's global ranks asked once.

Each cache is checked against a fresh derivation, and changing any input it depends on must change what it returns
(a stale entry fails here)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from ds_burst.core.layout import segments
from ds_burst.core.step_plan import RingPass
from ds_burst.dist import comm
from ds_burst.kernels import reference
from ds_burst.ring import pool as ring_pool
from ds_burst.ring.engine import PACK_ALIGN, Packing, RingSetup, ring_schedule


def _setup(world: int = 4, s_local: int = 16, layout: str = "zigzag", **kw) -> RingSetup:
    table = [segments(layout, r, world, s_local) for r in range(world)]
    args = dict(info=comm.GroupInfo(None, 0, world), seg_table=table, passes=[RingPass(+1, world - 1)],
                causal=True, window=(-1, 0), scale=0.25, kernel=reference.KERNEL)
    args.update(kw)
    return RingSetup(**args)  # type: ignore[arg-type]


def _fresh_calls(setup: RingSetup, kind: str, i: int, j: int) -> list:
    """What ``calls`` must return, built from nothing cached (a new setup with the same fields)."""
    clone = dataclasses.replace(setup)
    extra = {"scale": clone.scale} | ({"deterministic": clone.deterministic} if kind == "bwd" else {})
    return [(op, {**extra, **clone.mask_args(op)}) for op in clone.ops(i, j)]


VARIANTS = {
    "base": {},
    "full": {"causal": False, "window": (-1, -1)},
    "window": {"window": (5, 0)},
    "scale": {"scale": 0.5},
    "softcap": {"softcap": 3.0},
    "deterministic": {"deterministic": True},
    "docs": {"docs": (0, 7, 40, 64)},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_calls_are_the_tiles_and_their_arguments(name):
    setup = _setup(**VARIANTS[name])
    for kind, i, j in itertools.product(("fwd", "bwd"), range(4), range(4)):
        got = setup.calls(kind, i, j)
        assert got == _fresh_calls(setup, kind, i, j), (name, kind, i, j)
        assert setup.calls(kind, i, j) is got  # built once per pair
    with pytest.raises(ValueError, match="kind"):
        setup.calls("both", 0, 0)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "base"])
def test_a_changed_field_never_sees_the_old_calls(name):
    """``dataclasses.replace`` of a setup whose caches are filled: the new setup's tiles and arguments follow its own
    fields (the caches are not constructor fields, so they are not carried over)."""
    old = _setup()
    before = {(kind, i, j): old.calls(kind, i, j) for kind in ("fwd", "bwd") for i in range(4) for j in range(4)}
    new = dataclasses.replace(old, **VARIANTS[name])
    changed = False
    for (kind, i, j), was in before.items():
        got = new.calls(kind, i, j)
        assert got == _fresh_calls(new, kind, i, j), (name, kind, i, j)
        assert new.ops(i, j) == dataclasses.replace(new).ops(i, j)
        changed |= got != was
    assert changed, name  # each variant changes some tile or argument: the comparison above can fail
    assert old.calls("fwd", 1, 0) == before[("fwd", 1, 0)]  # and the old setup keeps its own


def _schedule_by_rule(rank: int, world: int, passes: list[RingPass]) -> list[tuple]:
    """The step rule of ``run_ring`` written out step by step (as the loop derived it before it was cached)."""
    steps = [(p, t) for p in passes for t in range(1, p.steps + 1)]
    rows = []
    for c in range(-1, len(steps) + 1):
        row: dict[str, object] = dict.fromkeys(
            ("next_first", "recv_from", "send_to", "acc_from", "home_from", "owner", "acc_to"))
        if c + 1 < len(steps):
            p, t = steps[c + 1]
            row.update(next_first=t == 1, recv_from=(rank - p.direction) % world, send_to=(rank + p.direction) % world)
        if 0 <= c < len(steps):
            p, t = steps[c]
            if t >= 2:
                row["acc_from"] = (rank - p.direction) % world
            owner = (rank - p.direction * t) % world
            row.update(owner=owner, acc_to=(rank + p.direction) % world if t < p.steps else owner)
        if c >= 1 and steps[c - 1][1] == steps[c - 1][0].steps:
            p = steps[c - 1][0]
            row["home_from"] = (rank + p.direction * p.steps) % world
        rows.append(tuple(row.values()))
    return rows


def _pass_lists(world: int) -> list[list[RingPass]]:
    lists: list[list[RingPass]] = [[]]
    for a, b in itertools.product(range(world), repeat=2):
        if a + b:
            lists.append([RingPass(+1, a)] * bool(a) + [RingPass(-1, b)] * bool(b))
    return lists


def test_ring_schedule_follows_the_step_rule():
    for world in range(1, 7):
        for rank in range(world):
            for passes in _pass_lists(world):
                got = ring_schedule(rank, world, tuple(passes))
                assert list(got) == _schedule_by_rule(rank, world, passes), (rank, world, passes)
                assert ring_schedule(rank, world, tuple(passes)) is got  # cached


def test_ring_schedule_depends_on_every_input():
    base = (1, 4, (RingPass(+1, 3),))
    got = ring_schedule(*base)
    for other in [(2, 4, base[2]), (1, 5, base[2]), (1, 4, (RingPass(-1, 3),)), (1, 4, (RingPass(+1, 2),)),
                  (1, 4, (RingPass(+1, 2), RingPass(-1, 1)))]:
        assert ring_schedule(*other) != got, other
        assert list(ring_schedule(*other)) == _schedule_by_rule(other[0], other[1], list(other[2]))


def test_p2p_error_text_is_worded_when_needed():
    x = torch.zeros(2, 3)
    send, recv = ("send", x, 1), ("recv", x.double(), 3)
    assert comm.P2PBatch._words(send) == "send of float32[2, 3] to rank 1"
    assert comm.P2PBatch._words(recv) == "receive of float64[2, 3] from rank 3"
    assert comm.P2PBatch._words([recv, send]) == "receive of float64[2, 3] from rank 3; send of float32[2, 3] to rank 1"


def test_global_ranks_asked_once_and_the_info_unchanged(monkeypatch):
    asked = []

    def get_global_rank(group, rank):
        asked.append(rank)
        return 10 + rank

    monkeypatch.setattr(comm.dist, "get_global_rank", get_global_rank)
    group = object()
    info, twin = comm.GroupInfo(group, 1, 4), comm.GroupInfo(group, 1, 4)  # type: ignore[arg-type]
    assert [info.global_rank(r) for r in (0, 2, 0, 2, 3)] == [10, 12, 10, 12, 13]
    assert asked == [0, 2, 3]
    assert info == twin and hash(info) == hash(twin) and repr(info) == repr(twin)
    assert twin.global_rank(2) == 12 and asked == [0, 2, 3, 2]  # its own record
    assert comm.GroupInfo(None, 1, 4).global_rank(3) == 3


# ---------------------------------------------------------------------------------------------
# Packed payloads and accumulators


PAYLOADS = {
    "one": [((4, 3), torch.float32)],
    "same": [((2, 3, 5), torch.float64), ((7,), torch.float64)],  # 7 * 8 bytes: padding after it
    "mixed": [((3, 5), torch.bfloat16), ((1, 2, 3), torch.float32), ((5,), torch.float64)],
}


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_packed_views_are_the_tensors_a_buffer_each_would_be(name):
    like = [torch.zeros(shape, dtype=dt) for shape, dt in PAYLOADS[name]]
    pack = Packing(like)
    assert pack.nbytes == sum(x.nbytes for x in like)
    for pool in (ring_pool.BufferPool(), ring_pool._NO_POOL):  # the pool on, and off
        block = pack.take(pool, like[0])
        views = pack.views(block)
        assert [(v.shape, v.dtype, v.stride()) for v in views] == [(x.shape, x.dtype, x.stride()) for x in like]
        assert all(v.is_contiguous() and (v.data_ptr() - block.data_ptr()) % PACK_ALIGN == 0 for v in views)
        spans = sorted((v.data_ptr(), v.data_ptr() + v.nbytes) for v in views)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlap
        assert spans[-1][1] <= block.data_ptr() + block.nbytes
        zeroed = pack.zeros(pool, like)
        assert all(torch.equal(z, x) for z, x in zip(zeroed, like))
        assert (len(like) == 1) == (getattr(zeroed, "block", None) is None)


ACCUMULATORS = {
    "same": [((2, 3), torch.float32), ((5,), torch.float32)],
    "mixed": [((3,), torch.float32), ((2, 2), torch.float64)],
    "one": [((4,), torch.float32)],
}


def _ring_values(rank: int, shapes: list) -> list[torch.Tensor]:
    return [torch.full(shape, rank * 4.0 + i + 0.5, dtype=dt) for i, (shape, dt) in enumerate(shapes)]


def _part_values(rank: int, owner: int, shapes: list) -> list[torch.Tensor]:
    return [torch.full(shape, (rank + 1) * 10.0 + owner + 100.0 * i, dtype=dt) for i, (shape, dt) in enumerate(shapes)]


def _run_ring_worker(rank: int, world: int) -> dict:
    from ds_burst.dist.comm import COUNTER, resolve_group
    from ds_burst.ring.engine import run_ring

    info = resolve_group(None)
    out = {}
    cases = itertools.product(PAYLOADS, ACCUMULATORS, (True, False),
                              ([RingPass(+1, world - 1)], [RingPass(+1, 1), RingPass(-1, world - 2)]))
    for payload_name, acc_name, own_block, passes in cases:
        shapes = PAYLOADS[payload_name]
        acc_shapes = ACCUMULATORS[acc_name]
        acc_like = [torch.zeros(s, dtype=dt) for s, dt in acc_shapes]
        seen, homes = [], []

        def remote(payload, owner, acc_shapes=acc_shapes, acc_like=acc_like, shapes=shapes, seen=seen,
                   own_block=own_block):
            want = _ring_values(owner, shapes)
            seen.append((owner, all(p.is_contiguous() and p.dtype == w.dtype and torch.equal(p, w)
                                    for p, w in zip(payload, want))))
            parts = _part_values(rank, owner, acc_shapes)
            if own_block:  # views of one block, as the engine's callbacks make them
                got = Packing(acc_like).zeros(ring_pool.buffer_pool(), acc_like)
                for g, p in zip(got, parts):
                    g.copy_(p)
                return got
            return parts  # one tensor each: the ring copies them into a block

        COUNTER.reset()
        run_ring(info, "t", passes, _ring_values(rank, shapes), lambda: None, remote, acc_like,
                 lambda accs, homes=homes: homes.append([a.clone() for a in accs]))
        total = [sum(h[i] for h in homes) for i in range(len(acc_shapes))]
        want_total = [sum(_part_values((rank + p.direction * t) % world, rank, acc_shapes)[i]
                          for p in passes for t in range(1, p.steps + 1)) for i in range(len(acc_shapes))]
        steps = [(p, t) for p in passes for t in range(1, p.steps + 1)]
        n = len(shapes)
        want_msgs = sum(n if t == 1 else 1 for _, t in steps) + len(steps)
        want_bytes = len(steps) * (sum(x.nbytes for x in _ring_values(0, shapes)) + sum(x.nbytes for x in acc_like))
        owners = [(rank - p.direction * t) % world for p, t in steps]
        out[(payload_name, acc_name, own_block, len(passes))] = dict(
            seen_ok=[o for o, _ in seen] == owners and all(ok for _, ok in seen),
            home_ok=all(torch.equal(a, b) for a, b in zip(total, want_total)) and len(homes) == len(passes),
            msgs=(COUNTER.messages["t"], want_msgs), bytes=(COUNTER.bytes["t"], want_bytes))
    return out


def test_run_ring_packs_payloads_and_accumulators():
    """4 gloo ranks, one or two passes: every rank computes on each owner's own tensors (mixed dtypes and sizes that
    need padding), the partials (one block, a block of several dtypes, or one tensor each) come home summed, and a
    several-tensor payload takes one message per hop after a pass's first (bytes as one message per tensor)."""
    from dist_utils import run_ranks, values

    for rank, res in enumerate(values(run_ranks(_run_ring_worker, 4, timeout=180))):
        for case, r in res.items():
            assert r["seen_ok"] and r["home_ok"], (rank, case, r)
            assert r["msgs"][0] == r["msgs"][1] and r["bytes"][0] == r["bytes"][1], (rank, case, r)
