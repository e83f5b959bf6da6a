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
from ds_burst.ring.engine import RingSetup, ring_schedule


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
