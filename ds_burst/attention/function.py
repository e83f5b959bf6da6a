"""The autograd function of ``burst_attn_func``: layout moves, the ring forward and the Burst or ring backward.

Saved for backward: q, k, v, out (input dtype, compute layout) and lse (fp32). Nothing O(S^2).
Inside a selective-checkpointing region (:mod:`ds_burst.attention.selective`) the re-run in backward reuses the
output and lse kept from the first run instead of running the ring forward again (all of it or the early half).
A plan whose only tile is the whole local block (one rank) calls the kernel's one-call ``attend``/``attend_bwd``
when it has them (the fused SDPA ops: no fp32 state, no merge, no conversions) and the ring path otherwise.
"""

from __future__ import annotations

import torch

from ds_burst.attention.call_plan import CallPlan
from ds_burst.attention.selective import active_keep
from ds_burst.dist.comm import GroupInfo, all_gather_ints
from ds_burst.dist.relayout import move_chunks, relayout
from ds_burst.ring import ulysses_ring as uly
from ds_burst.ring.engine import burst_backward, kv_ring_backward, needs_out, ring_forward
from ds_burst.ring.pool import buffer_pool

Saved = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _move(x: torch.Tensor, dim: int, plan: CallPlan, to_compute: bool, phase: str = "relayout") -> torch.Tensor:
    """``x`` from the caller's layout to the compute layout (or back): half-chunk relayout, or the chunk
    assignment of packed documents (:attr:`CallPlan.chunks`)."""
    src, dst = plan.user_layout, plan.compute_layout
    if plan.chunks is not None:
        a, b = plan.chunks if to_compute else plan.chunks[::-1]
        return move_chunks(x, dim, a, b, plan.info, phase)
    if not to_compute:
        src, dst = dst, src
    return relayout(x, dim, src, dst, plan.info, phase)


def forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 plan: CallPlan) -> tuple[torch.Tensor, torch.Tensor, Saved]:
    """``(out, lse, saved)``: output and lse in the caller's layout, and what the backward needs."""
    src, dst, spec = plan.user_layout, plan.compute_layout, plan.ulysses
    if src == dst:
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()  # no copies when already dense
    else:
        qc, kc, vc = (_move(x.contiguous(), 1, plan, True) for x in (q, k, v))
    if spec is not None:  # heads to the node's ranks, all the node's tokens to each
        qc = uly.to_node(qc, spec, "a2a")
        kc, vc = (uly.to_node(uly.repeat_kv(x, spec.kv_repeat), spec, "a2a") for x in (kc, vc))
    out_c, lse = _forward_with_keep(qc, kc, vc, plan, q.dtype)
    saved = (qc, kc, vc, out_c, lse)
    if spec is not None:
        out_c, lse = uly.from_node(out_c, spec, "a2a"), uly.lse_to_shard(lse, spec, "a2a")
    if src == dst:
        return out_c, lse, saved
    return _move(out_c, 1, plan, False), _move(lse, 2, plan, False), saved


def backward_impl(plan: CallPlan, saved: Saved,
                  dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v (input dtype, the caller's layout) for the output gradient ``dout``."""
    info, src, dst, spec = plan.info, plan.user_layout, plan.compute_layout, plan.ulysses
    qc, kc, vc, out_c, lse = saved
    if plan.check_finite:
        check_finite_grad(dout, info)
    dout = dout.to(qc.dtype)
    dout_c = dout if src == dst else _move(dout.contiguous(), 1, plan, True, "bwd_relayout")
    if spec is not None:
        dout_c = uly.to_node(dout_c, spec, "bwd_a2a")
    kernel = plan.setup.kernel
    if plan.whole is not None and hasattr(kernel, "attend_bwd"):
        op = plan.whole
        got = kernel.attend_bwd(qc, kc, vc, out_c, dout_c, lse, scale=plan.setup.scale,
                                deterministic=plan.setup.deterministic, **plan.setup.mask_args(op))
        if got is not None:
            return got
    dout_c = dout_c.contiguous()
    delta = None if needs_out(kernel) else kernel.bwd_preprocess(out_c, dout_c)
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
    if src == dst:
        return dq, dk, dv
    dq, dk, dv = (_move(g, 1, plan, False, "bwd_relayout") for g in (dq, dk, dv))
    return dq, dk, dv


class BurstAttnFunction(torch.autograd.Function):
    """Autograd function: ring forward, Burst or ring backward, layout moves on both sides."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan):  # type: ignore[override]
        out, lse, saved = forward_impl(q, k, v, plan)
        ctx.save_for_backward(*saved)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None):  # type: ignore[override]
        dq, dk, dv = backward_impl(ctx.plan, tuple(ctx.saved_tensors), dout)  # type: ignore[arg-type]
        return dq, dk, dv, None


def _ring_forward_out(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, plan: CallPlan, dtype: torch.dtype,
                      rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    kernel, whole = plan.setup.kernel, plan.whole
    if rows is None and whole is not None and hasattr(kernel, "attend"):
        got = kernel.attend(qc, kc, vc, scale=plan.setup.scale, **plan.setup.mask_args(whole))
        if got is not None:
            return got
    out32, lse = ring_forward(qc, kc, vc, plan.setup, rows=rows)
    return buffer_pool().export(out32, dtype), lse


def _forward_with_keep(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, plan: CallPlan,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring forward in the compute layout, or its kept result inside a selective-checkpointing region
    (:mod:`ds_burst.attention.selective`): the first run records, the re-run reuses what was kept and computes
    only the rows that were not kept."""
    keep = active_keep()
    kept = keep.replay(tuple(qc.shape)) if keep is not None else None
    if kept is None:
        out_c, lse = _ring_forward_out(qc, kc, vc, plan, dtype)
        if keep is not None and keep.recording:
            keep.record(tuple(qc.shape), out_c, lse)
        return out_c, lse
    out_k, lse_k = kept.fetch()
    if kept.start == 0:
        return out_k, lse_k
    out_c, lse = _ring_forward_out(qc, kc, vc, plan, dtype, rows=kept.start)
    return torch.cat([out_c, out_k], 1), torch.cat([lse, lse_k], 2)


def check_finite_grad(dout: torch.Tensor, info: GroupInfo) -> None:
    """Raise the same ``ValueError`` on every rank when any rank's output gradient holds NaN/Inf."""
    bad = int((~torch.isfinite(dout)).sum())
    rows = all_gather_ints(info, [bad], dout.device)
    for r, (n,) in enumerate(rows):
        if n:
            raise ValueError(f"rank {r}: the output gradient of attention contains {n} NaN/Inf values "
                             "(check_finite=True)")
