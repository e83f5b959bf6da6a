"""Public entry point ``burst_attn_func`` and its autograd function.

The function validates its input on every rank, picks a *compute layout* (zigzag for causal attention,
contiguous for sliding windows, the caller's layout otherwise), moves q/k/v there with one exchange when
it differs from the caller's layout, runs the ring forward, and moves the output back. Backward mirrors
it with the Burst pattern (Q, dO, lse, delta travel) or the ring pattern (K, V travel).
Saved for backward: q, k, v, out (input dtype, compute layout) and lse (fp32). Nothing O(S^2).
Inside a selective-checkpointing region (:mod:`ds_burst.selective`) the re-run in backward reuses the output
and lse kept from the first run instead of running the ring forward again (all of it or the early half).
Scratch buffers of the ring come from :mod:`ds_burst.pool`; outputs and gradients are always fresh tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import GroupInfo, NodeGroups, all_gather_ints, resolve_group
from .cost import choose_backward
from .kernels.mask import window_is_finite
from .layout import segments
from .ops import kernel_module, resolve_kernel
from .pool import buffer_pool
from .relayout import relayout
from .schedules import ulysses_ring as uly
from .schedules.ring import RingSetup, burst_backward, kv_ring_backward, needs_out, ring_forward
from .selective import active_keep
from .step_plan import RingPass, ring_passes
from .validate import AttnArgs, validate


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


def make_plan(
    q: torch.Tensor, k: torch.Tensor, a: AttnArgs, info: GroupInfo, deterministic: bool,
    node_groups: NodeGroups | None = None,
) -> CallPlan:
    """Resolve layout, ring passes, schedule, kernel and backward pattern for validated inputs."""
    world, s_local = info.world, q.shape[1]
    window = (int(a.window_size[0]), int(a.window_size[1]))
    if a.causal and window[1] < 0:
        window = (window[0], 0)
    layout, passes = choose_compute_layout(a.layout, a.causal, window, world, s_local)
    # Topology-aware schedules visit every block; sliding windows keep the flat ring, which stops early.
    topo_aware = node_groups is not None and not window_is_finite(a.causal, window) and world > 1
    if a.kernel == "auto" and q.device.type == "cuda":  # measured once per shape, rank 0's pick everywhere
        from .kernel_choice import choose

        kernel_name = choose(q, k, a.causal, window_is_finite(a.causal, window), a.backward, deterministic, info)
    else:
        kernel_name = resolve_kernel(a.kernel, q.device, q.dtype)
    kernel = kernel_module(kernel_name)
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
        ring_info = node_groups.inter
        setup = RingSetup(ring_info, table, ring_passes(table, a.causal, window), a.causal, window, scale, kernel,
                          deterministic)
    else:
        nodes = node_groups if (topo_aware and a.schedule == "double_ring") else None
        table = [segments(layout, r, world, s_local) for r in range(world)]
        setup = RingSetup(info, table, passes, a.causal, window, scale, kernel, deterministic, nodes)
    backward = a.backward
    if backward == "auto":
        # kernels whose backward needs the output (fused SDPA ops) keep Q, dO and O at home
        backward = "ring" if needs_out(kernel) else choose_backward(hq, hkv, q.shape[3], q.element_size())
    return CallPlan(setup, info, a.layout, layout, backward, spec, a.check_finite)


class BurstAttnFunction(torch.autograd.Function):
    """Autograd function: ring forward, Burst or ring backward, layout moves on both sides."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan):  # type: ignore[override]
        info, src, dst, spec = plan.info, plan.user_layout, plan.compute_layout, plan.ulysses
        qc, kc, vc = (relayout(x.contiguous(), 1, src, dst, info) for x in (q, k, v))
        if spec is not None:  # heads to the node's ranks, all the node's tokens to each
            qc = uly.to_node(qc, spec, "a2a")
            kc, vc = (uly.to_node(uly.repeat_kv(x, spec.kv_repeat), spec, "a2a") for x in (kc, vc))
        out_c, lse = _forward_with_keep(qc, kc, vc, plan.setup, q.dtype)
        ctx.save_for_backward(qc, kc, vc, out_c, lse)
        ctx.plan = plan
        if spec is not None:
            out_c, lse = uly.from_node(out_c, spec, "a2a"), uly.lse_to_shard(lse, spec, "a2a")
        out = relayout(out_c, 1, dst, src, info)
        lse_user = relayout(lse, 2, dst, src, info)  # fp32 (fp64 for fp64 inputs)
        ctx.mark_non_differentiable(lse_user)
        return out, lse_user

    @staticmethod
    def backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None):  # type: ignore[override]
        plan: CallPlan = ctx.plan
        info, src, dst, spec = plan.info, plan.user_layout, plan.compute_layout, plan.ulysses
        qc, kc, vc, out_c, lse = ctx.saved_tensors
        if plan.check_finite:
            check_finite_grad(dout, info)
        dout_c = relayout(dout.to(qc.dtype).contiguous(), 1, src, dst, info, "bwd_relayout")
        if spec is not None:
            dout_c = uly.to_node(dout_c, spec, "bwd_a2a")
        delta = plan.setup.kernel.bwd_preprocess(out_c, dout_c)
        if plan.backward == "burst":
            dq, dk, dv = burst_backward(qc, kc, vc, dout_c, lse, delta, plan.setup)
        else:
            dq, dk, dv = kv_ring_backward(qc, kc, vc, dout_c, lse, delta, plan.setup, out_c)
        pool = buffer_pool()  # the accumulators may be pooled: fresh tensors from here on
        acc = qc.dtype if spec is None or spec.kv_repeat == 1 else dk.dtype
        dq, dk, dv = pool.export(dq, qc.dtype), pool.export(dk, acc), pool.export(dv, acc)
        if spec is not None:  # replicated KV heads: sum their copies in fp32 before rounding
            dq = uly.from_node(dq, spec, "bwd_a2a")
            acc = qc.dtype if spec.kv_repeat == 1 else dk.dtype
            dk, dv = (uly.sum_repeated(uly.from_node(g.to(acc), spec, "bwd_a2a"), spec.kv_repeat) for g in (dk, dv))
        dk, dv = dk.to(qc.dtype), dv.to(qc.dtype)
        grads = (relayout(g, 1, dst, src, info, "bwd_relayout") for g in (dq, dk, dv))
        return (*grads, None)


def _forward_with_keep(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, setup: RingSetup,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring forward in the compute layout, or its kept result inside a selective-checkpointing region
    (:mod:`ds_burst.selective`): the first run records, the re-run reuses what was kept and computes only
    the rows that were not kept."""
    keep = active_keep()
    kept = keep.replay(tuple(qc.shape)) if keep is not None else None
    pool = buffer_pool()
    if kept is None:
        out32, lse = ring_forward(qc, kc, vc, setup)
        out_c = pool.export(out32, dtype)
        if keep is not None and keep.recording:
            keep.record(tuple(qc.shape), out_c, lse)
        return out_c, lse
    out_k, lse_k = kept.fetch()
    if kept.start == 0:
        return out_k, lse_k
    out32, lse = ring_forward(qc, kc, vc, setup, rows=kept.start)
    return torch.cat([pool.export(out32, dtype), out_k], 1), torch.cat([lse, lse_k], 2)


def check_finite_grad(dout: torch.Tensor, info: GroupInfo) -> None:
    """Raise the same ``ValueError`` on every rank when any rank's output gradient holds NaN/Inf."""
    bad = int((~torch.isfinite(dout)).sum())
    rows = all_gather_ints(info, [bad], dout.device)
    for r, (n,) in enumerate(rows):
        if n:
            raise ValueError(f"rank {r}: the output gradient of attention contains {n} NaN/Inf values "
                             "(check_finite=True)")


def _auto_schedule(q: object, k: object, causal: bool, window: object, info: GroupInfo,
                   node_groups: NodeGroups | None) -> str:
    """``schedule="auto"``: the cost model's pick across nodes, the flat ring otherwise (and for windows)."""
    if node_groups is None or not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
        return "ring"  # bad input is reported by validation, the same on every rank
    if q.dim() != 4 or k.dim() != 4 or not isinstance(window, (tuple, list)) or len(window) != 2:
        return "ring"
    if window_is_finite(causal, tuple(window)):  # type: ignore[arg-type]
        return "ring"  # sliding windows: the flat ring stops early
    from .plan import choose_schedule  # lazily: keeps `python -m ds_burst.plan` free of a runpy warning

    sched = choose_schedule(q.shape[1] * info.world, node_groups.nodes, node_groups.per_node, q.shape[2],
                            k.shape[2], q.shape[3], q.element_size(), bool(causal))
    if sched == "ulysses_ring" and uly.check_heads(q.shape[2], k.shape[2], node_groups.per_node):
        return "double_ring"
    return sched


def burst_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    group: object = None,
    layout: str = "zigzag",
    backward: str = "auto",
    kernel: str = "auto",
    return_lse: bool = False,
    deterministic: bool = False,
    check_inputs: bool = True,
    schedule: str | None = None,
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence split across the ranks of ``group``.

    Args:
        q: ``[B, S_local, Hq, D]`` queries of this rank's tokens.
        k, v: ``[B, S_local, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA/MQA without repeating K/V).
        causal: causal mask by *global* positions.
        softmax_scale: defaults to ``D ** -0.5``.
        window_size: ``(left, right)`` sliding window as in flash-attn, ``-1`` unbounded. Out-of-reach
            blocks and whole ring hops are skipped.
        group: process group, DeepSpeed ``mpu``/topology object, or ``None`` (world; single process
            when torch.distributed is not initialised).
        layout: how the caller split the sequence, ``"contiguous"`` or ``"zigzag"``.
        backward: ``"burst"`` (Q, dO, lse, delta and dQ travel), ``"ring"`` (K, V, dK, dV travel) or
            ``"auto"`` (the one that sends fewer bytes for these head counts).
        kernel: ``"torch"``, ``"triton"``, ``"sdpa"`` (torch's fused cuDNN/flash ops per tile where the mask
            allows, per-block outputs rounded to the input dtype; uses the ring backward) or ``"auto"``
            (on CUDA the faster of Triton and sdpa for this shape, measured on first use, cached and agreed
            across ranks: :mod:`ds_burst.kernel_choice`; torch on CPU).
        return_lse: also return the natural-log log-sum-exp ``[B, Hq, S_local]`` (fp32, not differentiable).
        deterministic: bitwise-reproducible backward (no atomics in the kernels).
        check_inputs: validate on every rank with one small all-gather (raises the same error everywhere).
        schedule: ``"ring"`` (flat), ``"double_ring"`` or ``"ulysses_ring"`` (both need ``group`` to be the
            topology from :func:`ds_burst.init_sequence_parallel` made with that schedule; a double ring
            inside one node is the flat ring) or ``"auto"``; ``None`` takes the topology's schedule (flat
            ring for a plain process group).
            Sliding windows always use the flat ring, which stops early.
        check_finite: raise ``ValueError`` on every rank when any rank's q, k or v (forward) or output
            gradient (backward) holds NaN/Inf, naming the rank and tensor (implies the collective check).

    Returns:
        ``out [B, S_local, Hq, D]`` in the input dtype (and ``lse`` when ``return_lse``).
    """
    info = resolve_group(group)
    node_groups = getattr(group, "node_groups", None)
    sched = schedule if schedule is not None else getattr(group, "schedule", "ring")
    if sched == "auto":
        sched = _auto_schedule(q, k, causal, window_size, info, node_groups)
    if sched == "double_ring" and node_groups is None and hasattr(group, "schedule"):
        sched = "ring"  # a topology inside one node: the double ring is the flat ring
    if sched == "ulysses_ring" and node_groups is None and hasattr(group, "schedule"):
        sched = "ring"  # not made for ulysses_ring: no node subgroups
    args = AttnArgs(bool(causal), softmax_scale, tuple(window_size), layout, backward, kernel,  # type: ignore[arg-type]
                    bool(return_lse), sched, node_groups is not None,
                    node_groups.per_node if node_groups is not None else 0, bool(check_finite))
    validate(q, k, v, args, info, collective=check_inputs or bool(check_finite))
    plan = make_plan(q, k, args, info, deterministic, node_groups)
    out, lse = BurstAttnFunction.apply(q, k, v, plan)
    return (out, lse) if return_lse else out
