"""The autograd function of ``burst_attn_func``: layout moves, the ring forward and the Burst or ring backward.

Saved for backward: q, k, v, out (input dtype, compute layout) and lse (fp32). Nothing O(S^2).

Attention sinks (a per-head logit in the softmax denominator, GPT-OSS) are merged once, after the ring, in the
compute layout: ``lse' = logaddexp(lse, sink)``, ``out' = out * exp(lse - lse')``; the saved ``out``/``lse`` are
the final ones, so every kernel's backward is unchanged, and ``d sink_h = -sum_q exp(sink_h - lse'_q) * delta_q``
(this rank's queries; the sequence-parallel gradient reduction sums the ranks' parts like any replicated weight).
Inside a selective-checkpointing region (:mod:`ds_burst.attention.selective`) the re-run in backward reuses the
output and lse kept from the first run instead of running the ring forward again (all of it or the early half).
A plan whose only tile is the whole local block (one rank; ``CallPlan.whole``, set where the kernel's record has
``attend``/``attend_bwd``: the fused SDPA ops, or the Triton kernels' single Hopper launch: no fp32 state, no
merge, no conversions) calls them, and the ring path where they return ``None``.
"""

from __future__ import annotations

import torch

from ds_burst.attention.call_plan import CallPlan
from ds_burst.attention.selective import active_keep
from ds_burst.dist.comm import GroupInfo, all_gather_ints
from ds_burst.dist.relayout import move_chunks, relayout
from ds_burst.kernels import reference
from ds_burst.ring import ulysses_ring as uly
from ds_burst.ring.engine import burst_backward, kv_ring_backward, ring_forward
from ds_burst.ring.pool import buffer_pool

Saved = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _sink_heads(sinks: torch.Tensor, plan: CallPlan) -> torch.Tensor:
    """The sinks of the heads this rank computes in the compute layout (a slice under Ulysses' head split)."""
    spec = plan.ulysses
    if spec is None or spec.intra.world == 1:
        return sinks
    hl = sinks.shape[0] // spec.intra.world
    return sinks[spec.intra.rank * hl:(spec.intra.rank + 1) * hl]


def fold_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out * exp(lse - lse'), lse')`` with ``lse' = logaddexp(lse, sink)`` per head: the sink logit joins the
    softmax denominator once. ``out [B, S, H, Dv]`` keeps its dtype (scaled in the lse dtype)."""
    sink = sinks.to(lse.dtype).reshape(1, -1, 1)
    new = torch.logaddexp(lse, sink)
    w = torch.exp(lse - new)  # lse = -inf (no key): weight 0, the row is 0 as without sinks; NaN stays NaN
    scaled = out.to(lse.dtype) * w.transpose(1, 2).unsqueeze(-1)
    return scaled.to(out.dtype), new


def sinks_grad(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, plan: CallPlan) -> torch.Tensor:
    """``d sinks`` of this rank's queries: ``-sum_{b,q} exp(sink_h - lse_h,q) * delta_h,q`` (full ``[Hq]``, zeros
    for heads another rank of the node computes under Ulysses)."""
    heads = _sink_heads(sinks, plan).to(lse.dtype).reshape(1, -1, 1)
    part = -(torch.exp(heads - lse) * delta.to(lse.dtype)).sum((0, 2))
    spec = plan.ulysses
    if spec is not None and spec.intra.world > 1:
        full = torch.zeros(sinks.shape[0], dtype=part.dtype, device=part.device)
        hl = sinks.shape[0] // spec.intra.world
        full[spec.intra.rank * hl:(spec.intra.rank + 1) * hl] = part
        part = full
    return part.to(sinks.dtype)


def move_layout(x: torch.Tensor, dim: int, plan: CallPlan, to_compute: bool, phase: str = "relayout") -> torch.Tensor:
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
                 plan: CallPlan, sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Saved]:
    """``(out, lse, saved)``: output and lse in the caller's layout, and what the backward needs."""
    src, dst, spec = plan.user_layout, plan.compute_layout, plan.ulysses
    if src == dst:
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()  # no copies when already dense
    else:
        qc, kc, vc = (move_layout(x.contiguous(), 1, plan, True) for x in (q, k, v))
    if spec is not None:  # heads to the node's ranks, all the node's tokens to each
        qc = uly.to_node(qc, spec, "a2a")
        kc, vc = (uly.to_node(uly.repeat_kv(x, spec.kv_repeat), spec, "a2a") for x in (kc, vc))
    out_c, lse = _forward_with_keep(qc, kc, vc, plan, q.dtype)
    if sinks is not None:
        out_c, lse = fold_sinks(out_c, lse, _sink_heads(sinks, plan))
    saved = (qc, kc, vc, out_c, lse)
    if spec is not None:
        out_c, lse = uly.from_node(out_c, spec, "a2a"), uly.lse_to_shard(lse, spec, "a2a")
    if src == dst:
        return out_c, lse, saved
    return move_layout(out_c, 1, plan, False), move_layout(lse, 2, plan, False), saved


def backward_impl(plan: CallPlan, saved: Saved, dout: torch.Tensor, sinks: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, ...]:
    """Gradients of q, k, v (input dtype, the caller's layout) for the output gradient ``dout``, and of
    ``sinks`` when given (then a 4-tuple)."""
    info, src, dst, spec = plan.info, plan.user_layout, plan.compute_layout, plan.ulysses
    qc, kc, vc, out_c, lse = saved
    if plan.check_finite:
        check_finite_grad(dout, info)
    dout = dout.to(qc.dtype)
    dout_c = dout if src == dst else move_layout(dout.contiguous(), 1, plan, True, "bwd_relayout")
    if spec is not None:
        dout_c = uly.to_node(dout_c, spec, "bwd_a2a")
    kernel = plan.setup.kernel
    dsinks = None
    if sinks is not None:
        dsinks = sinks_grad(sinks, lse, reference.bwd_preprocess(out_c, dout_c), plan)
    if plan.whole is not None:
        op = plan.whole
        got = kernel.attend_bwd(qc, kc, vc, out_c, dout_c, lse, scale=plan.setup.scale,
                                deterministic=plan.setup.deterministic, **plan.setup.mask_args(op))
        if got is not None:
            return got if dsinks is None else (*got, dsinks)
    dout_c = dout_c.contiguous()
    delta = kernel.impl.bwd_preprocess(out_c, dout_c)  # the fused ops' fallback tiles and row chunks need it too
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
    if src != dst:
        dq, dk, dv = (move_layout(g, 1, plan, False, "bwd_relayout") for g in (dq, dk, dv))
    return (dq, dk, dv) if dsinks is None else (dq, dk, dv, dsinks)


class BurstAttnFunction(torch.autograd.Function):
    """Autograd function: ring forward, Burst or ring backward, layout moves on both sides."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan,  # type: ignore[override]
                sinks: torch.Tensor | None = None):
        out, lse, saved = forward_impl(q, k, v, plan, sinks)
        ctx.save_for_backward(*saved, *(() if sinks is None else (sinks,)))
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None):  # type: ignore[override]
        saved = tuple(ctx.saved_tensors)
        sinks = saved[5] if len(saved) > 5 else None
        grads = backward_impl(ctx.plan, saved[:5], dout, sinks)  # type: ignore[arg-type]
        dsinks = grads[3] if sinks is not None else None
        return grads[0], grads[1], grads[2], None, dsinks


def _ring_forward_out(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, plan: CallPlan, dtype: torch.dtype,
                      rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    kernel, whole = plan.setup.kernel, plan.whole
    if rows is None and whole is not None:
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
