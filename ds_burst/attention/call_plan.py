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
from ds_burst.core.step_plan import RingPass, TileOp, ring_passes
from ds_burst.dist.comm import GroupInfo, NodeGroups, all_gather_ints
from ds_burst.kernels import choice
from ds_burst.kernels.registry import kernel_module, resolve_kernel
from ds_burst.ring import ulysses_ring as uly
from ds_burst.ring.engine import RingSetup, needs_out


@dataclass(frozen=True)
class CallPlan:
    """Resolved decisions of one call (identical on every rank)."""

    setup: RingSetup  # the ring; over the inter-node group for ulysses_ring
    info: GroupInfo  # the sequence-parallel group (layout moves)
    user_layout: str
    compute_layout: str
    backward: str  # "burst" or "ring"
    ulysses: uly.UlyssesSpec | None = None  # set: all-to-all over heads inside the node first
    check_finite: bool = False  # backward: raise on every rank when any rank's dO holds NaN/Inf
    whole: TileOp | None = None  # set: the call's only tile is the whole local block (one rank, no ring)
    summary: tuple[int, ...] = ()  # the validated summary of the call (diagnosis of ranks that drift apart)
    chunks: tuple[Assignment, Assignment] | None = None  # set: (caller's, compute) chunk assignments (documents)
    rank_work: tuple[float, ...] = ()  # documents: visible (query, key) pairs of each rank in the compute layout
    # set: (q, k, v) -> (out, lse) through fused ops under torch's own autograd (one rank, sdpa: the whole block,
    # or one diagonal tile per packed document)
    direct: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


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


def _variant_kernel(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: AttnArgs) -> str:
    """``name``, or the kernel that replaces it when it cannot honour this call's softcap / value head dim (never a
    silently wrong result): sdpa's fused ops know neither, so it gives way to Triton (CUDA, when Triton supports the
    inputs) or the PyTorch reference; Triton gives way to the reference where it lacks the feature."""
    variant = a.softcap is not None or v.shape[-1] != q.shape[-1]
    if not variant or name == "torch":
        return name
    on_cuda = q.device.type == "cuda" and resolve_kernel("auto", q.device, q.dtype) == "triton"  # Triton installed
    on_cpu = name == "triton" and q.device.type == "cpu"  # asked for, under TRITON_INTERPRET=1 (validated)
    if (on_cuda or on_cpu) and kernel_module("triton").supports_variant(q, k, v, a.softcap):
        return "triton"
    return "torch"


def _kernel_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: AttnArgs, window: tuple[int, int],
                 deterministic: bool, info: GroupInfo) -> str:
    if a.softcap is not None or v.shape[-1] != q.shape[-1]:
        return _variant_kernel(a.kernel, q, k, v, a)
    if (a.kernel == "auto" and q.device.type == "cuda" and info.world == 1 and _direct_allowed(a, "sdpa", deterministic)
            and kernel_module("sdpa").whole_backend(q, k, v, causal=a.causal, window=window) is not None):
        return "sdpa"  # one rank, one fused call: nothing of ours to beat the fused op with
    if a.kernel == "auto" and q.device.type == "cuda":  # measured once per shape, rank 0's pick everywhere
        def agree(pick: int) -> int:
            return all_gather_ints(info, [pick], q.device)[0][0]

        return choice.choose(q, k, a.causal, window_is_finite(a.causal, window), a.backward, deterministic,
                             info.world, info.group, agree)
    return resolve_kernel(a.kernel, q.device, q.dtype)


def make_plan(
    q: torch.Tensor, k: torch.Tensor, a: AttnArgs, info: GroupInfo, deterministic: bool,
    node_groups: NodeGroups | None = None, summary: tuple[int, ...] = (), v: torch.Tensor | None = None,
) -> CallPlan:
    """Resolve layout, ring passes, schedule, kernel and backward pattern for validated inputs."""
    world, s_local = info.world, q.shape[1]
    window = (int(a.window_size[0]), int(a.window_size[1]))
    if a.causal and window[1] < 0:
        window = (window[0], 0)
    docs = a.cu_seqlens if (a.cu_seqlens is not None and len(a.cu_seqlens) > 2) else None
    chunks, work = None, ()
    if docs is not None and world > 1:
        def hops(assign: Assignment, m: int) -> int:
            tbl = [chunk_segments(assign[r], s_local // m) for r in range(world)]
            return sum(p.steps for p in ring_passes(tbl, a.causal, window, docs=docs))

        m, assign, per_rank = balanced_layout(a.layout, docs, a.causal, window, world, s_local, hops)
        user = layout_assignment(a.layout, world, m) if (m % 2 == 0 or a.layout == "contiguous") else None
        table = [chunk_segments(assign[r], s_local // m) for r in range(world)]
        layout, passes, work = a.layout, ring_passes(table, a.causal, window, docs=docs), tuple(per_rank)
        if assign != user:
            layout, chunks = "documents", (layout_assignment(a.layout, world, m), assign)
    else:
        layout, passes = choose_compute_layout(a.layout, a.causal, window, world, s_local)
        # one rank: both layouts are the same token order; one segment gives one tile (the whole block)
        table = [segments(layout if world > 1 else "contiguous", r, world, s_local) for r in range(world)]
    # Topology-aware schedules visit every block; sliding windows and packed documents keep the flat ring,
    # which stops early and skips the hops no document needs.
    topo_aware = (node_groups is not None and not window_is_finite(a.causal, window) and world > 1
                  and docs is None)
    v = k if v is None else v
    kernel = kernel_module(_kernel_name(q, k, v, a, window, deterministic, info))
    softcap = None if a.softcap is None else float(a.softcap)
    scale = float(a.softmax_scale) if a.softmax_scale is not None else q.shape[-1] ** -0.5
    hq, hkv = q.shape[2], k.shape[2]
    spec = None
    if topo_aware and a.schedule == "ulysses_ring":
        assert node_groups is not None
        n_nodes, per_node = node_groups.nodes, node_groups.per_node
        spec = uly.UlyssesSpec(node_groups.intra, layout, uly.kv_repeat(hkv, per_node))
        hkv = hkv * spec.kv_repeat // per_node
        hq = hq // per_node
        table = [segments(layout, n, n_nodes, s_local * per_node) for n in range(n_nodes)]
        setup = RingSetup(node_groups.inter, table, ring_passes(table, a.causal, window), a.causal, window, scale,
                          kernel, deterministic, softcap=softcap)
    else:
        nodes = node_groups if (topo_aware and a.schedule == "double_ring") else None
        setup = RingSetup(info, table, passes, a.causal, window, scale, kernel, deterministic, nodes, softcap, docs)
    backward = a.backward
    if backward == "auto":
        # kernels whose backward needs the output (fused SDPA ops) keep Q, dO and O at home
        backward = "ring" if needs_out(kernel) else choose_backward(hq, hkv, q.shape[3], q.element_size())
    whole = None
    if world == 1:
        ops = setup.ops(0, 0)
        if len(ops) == 1 and (ops[0].q0, ops[0].q1, ops[0].k0, ops[0].k1) == (0, s_local, 0, s_local):
            whole = ops[0]
    direct = None
    if world == 1 and spec is None:  # the whole block, or one diagonal tile per packed document
        direct = _one_rank_direct(q, k, v, a, window, kernel.__name__.rsplit(".", 1)[-1], deterministic,
                                  setup.ops(0, 0), s_local)
    return CallPlan(setup, info, a.layout, layout, backward, spec, a.check_finite, whole, summary, chunks,
                    work, direct)


def _direct_allowed(a: AttnArgs, kernel: str, deterministic: bool) -> bool:
    """Only the fused SDPA ops have a direct path; not for deterministic runs (cuDNN's backward is not), not with
    the variants the fused ops cannot express (softcap, sinks)."""
    return kernel in ("sdpa", "sdpa_attn") and not deterministic and a.softcap is None and not a.has_sinks


def _one_rank_direct(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: AttnArgs, window: tuple[int, int],
                     kernel: str, deterministic: bool, ops: list[TileOp], s_local: int) -> Callable | None:
    """One rank: the fused op per tile under torch's autograd when the tiles are diagonal blocks that partition
    the queries (the whole block, or one tile per packed document), else ``None`` (see ``CallPlan.direct``)."""
    if not _direct_allowed(a, kernel, deterministic) or not ops:
        return None
    tiles = sorted(ops, key=lambda op: op.q0)
    if tiles[0].q0 != 0 or tiles[-1].q1 != s_local or any(t.q0 != t.k0 or t.q1 != t.k1 for t in tiles) \
            or any(x.q1 != y.q0 for x, y in zip(tiles, tiles[1:])):
        return None
    scale = float(a.softmax_scale) if a.softmax_scale is not None else q.shape[-1] ** -0.5
    sdpa = kernel_module("sdpa")
    if len(tiles) == 1:  # the whole block: the runner's output is the call's, no concatenation
        return sdpa.bind_whole(q, k, v, scale=scale, causal=a.causal, window=window)
    runners = []
    for t in tiles:
        sl = slice(t.q0, t.q1)
        mask = (dict(causal=a.causal, window=window, q_offset=t.q_offset, k_offset=t.k_offset) if t.masked
                else dict(causal=False, window=(-1, -1)))
        run = sdpa.bind_whole(q[:, sl], k[:, sl], v[:, sl], scale=scale, **mask)
        if run is None:
            return None
        runners.append((sl, run))

    def per_tile(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [run(qq[:, sl], kk[:, sl], vv[:, sl]) for sl, run in runners]
        return torch.cat([o for o, _ in parts], 1), torch.cat([lse for _, lse in parts], 2)

    return per_tile


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
