"""The call plan: everything a ``burst_attn_func`` call decides from shapes, dtype, device, options and group,
built once per key and reused (the ring loop does no planning).

A plan holds the compute layout (zigzag for causal attention, contiguous for sliding windows, the caller's
layout otherwise), the ring setup with its step plan and tile lists, the concrete kernel, the backward pattern,
the schedule and, when the call's only tile is the whole local block (one rank), that tile for the kernels'
one-call fast path. With packed documents (``cu_seqlens``) the compute layout is the chunk assignment that
balances the ranks' work from the document lengths (:func:`ds_burst.core.documents.balanced_layout`) and the
step plan pairs only tiles of the same document. :class:`PlanCache` keeps plans per key in a bounded LRU whose
evictions depend only on the sequence of keys, so it stays in step on every rank that sees the same calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from ds_burst.attention.validate import AttnArgs
from ds_burst.core.cost import choose_backward
from ds_burst.core.documents import Assignment, balanced_layout, chunk_segments, layout_assignment
from ds_burst.core.layout import segments
from ds_burst.core.mask import window_is_finite
from ds_burst.core.options import ULYSSES_SCHEDULES
from ds_burst.core.step_plan import RingPass, TileOp, ring_passes
from ds_burst.dist.comm import GroupInfo, NodeGroups, all_gather_ints
from ds_burst.kernels import choice, registry
from ds_burst.kernels.contract import KernelSpec, OneRank, diagonal_tiles, whole_tile
from ds_burst.ring import ulysses_ring as uly
from ds_burst.ring.engine import RingSetup


@dataclass(frozen=True)
class CallPlan:
    """Resolved decisions of one call (identical on every rank)."""

    setup: RingSetup  # the ring; over the Ulysses groups (one rank for schedule="ulysses") for the Ulysses schedules
    info: GroupInfo  # the sequence-parallel group (layout moves)
    user_layout: str
    compute_layout: str
    backward: str  # "burst" or "ring"
    ulysses: uly.UlyssesSpec | None = None  # set: all-to-all over heads inside the Ulysses group first
    check_finite: bool = False  # backward: raise on every rank when any rank's dO holds NaN/Inf
    whole: TileOp | None = None  # set: the call's only tile is the whole local block (one rank, no ring)
    summary: tuple[int, ...] = ()  # the validated summary of the call (diagnosis of ranks that drift apart)
    chunks: tuple[Assignment, Assignment] | None = None  # set: (caller's, compute) chunk assignments (documents)
    rank_work: tuple[float, ...] = ()  # documents: visible (query, key) pairs of each rank in the compute layout
    # set: (q, k, v) -> (out, lse) through fused ops under torch's own autograd (one rank, sdpa: the whole block,
    # or one diagonal tile per packed document)
    direct: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    max_logit: bool = False  # the forward also tracks each query's largest visible scaled score


def choose_compute_layout(
    user_layout: str, causal: bool, window: tuple[int, int], world: int, s_local: int
) -> tuple[str, list[RingPass]]:
    """Pick the layout the ring runs in, and its ring passes.

    Windows run on contiguous shards (the ring then stops after about ``window / S_local`` hops);
    causal attention runs zigzag (every hop costs the same) when ``S_local`` is even.
    """

    def passes(layout: str) -> list[RingPass]:
        table = [segments(layout, r, world, s_local) for r in range(world)]
        return ring_passes(table, causal, window)

    if world == 1:
        return user_layout, []
    if window_is_finite(causal, window):
        contiguous = passes("contiguous")
        if not (causal and s_local % 2 == 0 and sum(p.steps for p in contiguous) >= world - 1):
            return "contiguous", contiguous
    if causal and s_local % 2 == 0:
        return "zigzag", passes("zigzag")
    if causal:
        return "contiguous", passes("contiguous")
    return user_layout, passes(user_layout)


def choose_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: AttnArgs, window: tuple[int, int],
                  deterministic: bool, info: GroupInfo) -> KernelSpec:
    """The kernel a call runs on: ``auto`` on CUDA without a variant or ``return_max_logit`` is the fused SDPA op
    bound once at one rank or the measured pick agreed over the group (:mod:`ds_burst.kernels.choice`); otherwise
    the named kernel or, where its record says it cannot run the call, the device's default, else the PyTorch
    reference (it runs everything)."""
    variant = a.softcap is not None or v.shape[-1] != q.shape[-1]
    # the maximum logit: the fused ops do not expose it, the Triton tiles track it in the same pass
    if a.kernel == "auto" and q.device.type == "cuda" and not variant and not a.max_logit:
        sdpa = registry.get("sdpa")
        if info.world == 1 and sdpa.can_bind(q, k, v, deterministic=deterministic, softcap=a.softcap,
                                             sinks=a.has_sinks, causal=a.causal, window=window):
            return sdpa

        def agree(pick: int) -> int:  # rank 0's pick everywhere
            return all_gather_ints(info, [pick], q.device)[0][0]

        return registry.get(choice.choose(q, k, a.causal, window_is_finite(a.causal, window), a.backward,
                                          deterministic, info.world, info.group, agree))
    for name in (a.kernel, "auto", "torch"):
        spec = registry.get(registry.resolve(name, q.device, q.dtype))
        if spec.why_not(q, k, v, softcap=a.softcap, deterministic=deterministic) is None:
            return spec
    raise AssertionError("the PyTorch reference runs every call")


def _layout(a: AttnArgs, window: tuple[int, int], docs: tuple[int, ...] | None, world: int, s_local: int
            ) -> tuple[str, list, list[RingPass], tuple[Assignment, Assignment] | None, tuple[float, ...]]:
    """``(compute layout, segment table, ring passes, chunk assignments, rank work)``: packed documents balance
    the ranks' work by chunk assignment (:func:`balanced_layout`); otherwise :func:`choose_compute_layout`."""
    if docs is None or world == 1:
        layout, passes = choose_compute_layout(a.layout, a.causal, window, world, s_local)
        # one rank: both layouts are the same token order; one segment gives one tile (the whole block)
        table = [segments(layout if world > 1 else "contiguous", r, world, s_local) for r in range(world)]
        return layout, table, passes, None, ()

    def hops(assign: Assignment, m: int) -> int:
        tbl = [chunk_segments(assign[r], s_local // m) for r in range(world)]
        return sum(p.steps for p in ring_passes(tbl, a.causal, window, docs=docs))

    m, assign, per_rank = balanced_layout(a.layout, docs, a.causal, window, world, s_local, hops)
    user = layout_assignment(a.layout, world, m) if (m % 2 == 0 or a.layout == "contiguous") else None
    table = [chunk_segments(assign[r], s_local // m) for r in range(world)]
    passes = ring_passes(table, a.causal, window, docs=docs)
    if assign == user:
        return a.layout, table, passes, None, tuple(per_rank)
    return "documents", table, passes, (layout_assignment(a.layout, world, m), assign), tuple(per_rank)


def make_plan(
    q: torch.Tensor, k: torch.Tensor, a: AttnArgs, info: GroupInfo, deterministic: bool,
    node_groups: NodeGroups | None = None, summary: tuple[int, ...] = (), v: torch.Tensor | None = None,
    ulysses: NodeGroups | None = None,
) -> CallPlan:
    """Resolve layout, ring passes, schedule, kernel and backward pattern for validated inputs. ``ulysses``: the
    all-to-all group and the ring across of a Ulysses schedule (:func:`ds_burst.attention.schedule.ulysses_groups`)."""
    world, s_local = info.world, q.shape[1]
    v = k if v is None else v
    window = (int(a.window_size[0]), int(a.window_size[1]))
    if a.causal and window[1] < 0:
        window = (window[0], 0)
    docs = a.cu_seqlens if (a.cu_seqlens is not None and len(a.cu_seqlens) > 2) else None
    kernel = choose_kernel(q, k, v, a, window, deterministic, info)
    scale = float(a.softmax_scale) if a.softmax_scale is not None else q.shape[-1] ** -0.5
    whole, direct, chunks, work = None, None, None, ()
    if ulysses is not None and world > 1 and a.schedule in ULYSSES_SCHEDULES:
        layout, setup, spec, hq, hkv, whole = _ulysses(q, k, a, info, deterministic, ulysses, window, docs, kernel,
                                                       scale)
    else:
        layout, table, passes, chunks, work = _layout(a, window, docs, world, s_local)
        setup = _ring(a, info, deterministic, node_groups, window, docs, table, passes, kernel, scale)
        spec, hq, hkv = None, q.shape[2], k.shape[2]
    backward = a.backward
    if backward == "auto":  # kernels whose backward needs the output keep Q, dO and O at home
        backward = "ring" if kernel.bwd_needs_out else choose_backward(hq, hkv, q.shape[3], q.element_size())
    if world == 1:
        whole, direct = _one_rank(kernel, q, k, v, a, window, deterministic, setup.ops(0, 0), s_local, scale)
    return CallPlan(setup, info, a.layout, layout, backward, spec, a.check_finite, whole, summary, chunks, work,
                    direct, a.max_logit)


def _ring(a: AttnArgs, info: GroupInfo, deterministic: bool, node_groups: NodeGroups | None, window: tuple[int, int],
          docs: tuple[int, ...] | None, table: list, passes: list[RingPass], kernel: KernelSpec, scale: float
          ) -> RingSetup:
    """The flat ring, or the double ring over the topology's nodes; windows and documents keep the flat ring (it
    stops early, skips needless hops)."""
    softcap = None if a.softcap is None else float(a.softcap)
    topo_aware = node_groups is not None and not window_is_finite(a.causal, window) and info.world > 1 and docs is None
    nodes = node_groups if (topo_aware and a.schedule == "double_ring") else None
    return RingSetup(info, table, passes, a.causal, window, scale, kernel, deterministic, nodes, softcap, docs)


def _ulysses(q: torch.Tensor, k: torch.Tensor, a: AttnArgs, info: GroupInfo, deterministic: bool,
             groups: NodeGroups, window: tuple[int, int], docs: tuple[int, ...] | None, kernel: KernelSpec,
             scale: float) -> tuple[str, RingSetup, uly.UlyssesSpec, int, int, TileOp | None]:
    """``(compute layout, ring setup, Ulysses spec, query heads, kv heads per rank, whole tile)`` of a Ulysses
    schedule: the all-to-all over heads inside ``groups.intra`` (``U`` ranks), then the ring over the ``N`` groups
    (``groups.inter``) on group-level blocks of ``U * S_local`` tokens that keep the layout at group granularity,
    with the call's window and documents (tiles and hops no document needs are skipped).

    ``N = 1`` (``schedule="ulysses"``, or Ulysses over the one node): every rank holds the whole sequence in its
    natural order for its heads whatever the caller's layout, so nothing is moved before the all-to-all, and the
    ring of one runs the one-rank plan (its whole-block kernel call where the kernel has one)."""
    s_local, hkv = q.shape[1], k.shape[2]
    n, u = groups.nodes, groups.per_node
    softcap = None if a.softcap is None else float(a.softcap)
    if n == 1:
        layout, table, passes = a.layout, [segments("contiguous", 0, 1, s_local * u)], []
    else:
        layout, _ = choose_compute_layout(a.layout, a.causal, window, info.world, s_local)
        table = [segments(layout, r, n, s_local * u) for r in range(n)]
        passes = ring_passes(table, a.causal, window, docs=docs)
    spec = uly.UlyssesSpec(groups.intra, layout, uly.kv_repeat(hkv, u))
    setup = RingSetup(groups.inter, table, passes, a.causal, window, scale, kernel, deterministic, softcap=softcap,
                      docs=docs)
    whole = whole_tile(setup.ops(0, 0), s_local * u) if (n == 1 and kernel.whole) else None
    return layout, setup, spec, q.shape[2] // u, hkv * spec.kv_repeat // u, whole


def _one_rank(kernel: KernelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: AttnArgs,
              window: tuple[int, int], deterministic: bool, ops: list[TileOp], s_local: int, scale: float
              ) -> tuple[TileOp | None, Callable | None]:
    """``(CallPlan.whole, CallPlan.direct)`` of a one-rank call as its record decides (:meth:`KernelSpec.one_rank`):
    fused ops bound per diagonal tile (outputs concatenated), ``attend`` on the whole block, or the ring of one."""
    path = kernel.one_rank(ops, s_local, deterministic=deterministic, softcap=a.softcap, sinks=a.has_sinks,
                           max_logit=a.max_logit)
    if path is OneRank.RING:
        return None, None
    whole = whole_tile(ops, s_local) if kernel.whole else None
    if path is OneRank.WHOLE:
        return whole, None
    runners = []
    for t in diagonal_tiles(ops, s_local) or []:
        sl = slice(t.q0, t.q1)
        mask = (dict(causal=a.causal, window=window, q_offset=t.q_offset, k_offset=t.k_offset) if t.masked
                else dict(causal=False, window=(-1, -1)))
        run = kernel.bind(q[:, sl], k[:, sl], v[:, sl], scale=scale, **mask)
        if run is None:
            return whole, None
        runners.append((sl, run))
    if len(runners) == 1:  # the whole block: the runner's output is the call's, no concatenation
        return whole, runners[0][1]

    def per_tile(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [run(qq[:, sl], kk[:, sl], vv[:, sl]) for sl, run in runners]
        return torch.cat([o for o, _ in parts], 1), torch.cat([lse for _, lse in parts], 2)

    return whole, per_tile


class PlanCache:
    """Plans per call key, least recently used first out (``capacity`` entries)."""

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._plans: OrderedDict[Hashable, CallPlan] = OrderedDict()
        self.misses = 0

    def get(self, key: Hashable) -> CallPlan | None:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def put(self, key: Hashable, build: Callable[[], CallPlan]) -> CallPlan:
        plan = build()
        self.misses += 1
        self._plans[key] = plan
        if len(self._plans) > self.capacity:
            self._plans.popitem(last=False)
        return plan

    def last(self) -> CallPlan | None:
        """The plan of the most recently looked-up or built key (``None`` when empty): what the last call ran."""
        return next(reversed(self._plans.values()), None)

    def clear(self) -> None:
        self._plans.clear()
        self.misses = 0

    def __len__(self) -> int:
        return len(self._plans)


PLANS = PlanCache()


def clear_plans() -> None:
    """Forget every cached call plan of this process (the next call of each key validates again on every rank:
    call it on every rank of a group, or on none)."""
    PLANS.clear()
