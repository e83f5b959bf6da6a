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

``return_max_logit`` (:attr:`CallPlan.max_logit`): the kernels raise a ``[B, H, s]`` buffer of each query's largest
visible scaled score in the same pass as the softmax (the contract's ``max_out``); it follows the lse back to the
caller's shard (under Ulysses, and in another compute layout) and is reduced to ``[Hq]`` over the batch and the
caller's queries of this rank. Not differentiable.
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


def forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan, sinks: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, Saved, torch.Tensor | None]:
    """``(out, lse, saved, max_logit)``: output and lse in the caller's layout, what the backward needs, and the
    per-head maximum logit ``[Hq]`` of this rank's queries (``None`` unless the plan asks for it)."""
    src, dst, spec = plan.user_layout, plan.compute_layout, plan.ulysses
    if src == dst:
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()  # no copies when already dense
    else:
        qc, kc, vc = (move_layout(x.contiguous(), 1, plan, True) for x in (q, k, v))
    if spec is not None:  # heads to the node's ranks, all the node's tokens to each
        qc = uly.to_node(qc, spec, "a2a")
        kc, vc = (uly.to_node(uly.repeat_kv(x, spec.kv_repeat), spec, "a2a") for x in (kc, vc))
    out_c, lse, mx = _forward_with_keep(qc, kc, vc, plan, q.dtype)
    if sinks is not None:
        out_c, lse = fold_sinks(out_c, lse, _sink_heads(sinks, plan))
    saved = (qc, kc, vc, out_c, lse)
    if spec is not None:
        out_c, lse = uly.from_node(out_c, spec, "a2a"), uly.lse_to_shard(lse, spec, "a2a")
        mx = None if mx is None else uly.lse_to_shard(mx, spec, "a2a")  # this rank's queries, every head
    if src != dst:  # the caller's queries: the rows go back with the output
        out_c, lse = move_layout(out_c, 1, plan, False), move_layout(lse, 2, plan, False)
        mx = None if mx is None else move_layout(mx, 2, plan, False)
    return out_c, lse, saved, None if mx is None else mx.amax(dim=(0, 2))


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
    got = None
    if plan.whole is not None:  # one call over the whole block (a one-rank plan, or Ulysses' local call)
        got = kernel.attend_bwd(qc, kc, vc, out_c, dout_c, lse, scale=plan.setup.scale,
                                deterministic=plan.setup.deterministic, **plan.setup.mask_args(plan.whole))
    if got is not None:
        dq, dk, dv = got
    else:
        dout_c = dout_c.contiguous()
        delta = kernel.impl.bwd_preprocess(out_c, dout_c)  # the fused ops' fallback tiles and row chunks need it
        if plan.backward == "burst":
            dq, dk, dv = burst_backward(qc, kc, vc, dout_c, lse, delta, plan.setup)
        else:
            dq, dk, dv = kv_ring_backward(qc, kc, vc, dout_c, lse, delta, plan.setup, out_c)
        pool = buffer_pool()  # the accumulators may be pooled: fresh tensors from here on
        acc = qc.dtype if spec is None or spec.kv_repeat == 1 else dk.dtype
        dq, dk, dv = pool.export(dq, qc.dtype), pool.export(dk, acc), pool.export(dv, acc)
    if spec is not None:  # back to the caller's shards; replicated KV heads: their copies summed in fp32 at least
        dq = uly.from_node(dq, spec, "bwd_a2a")
        acc = qc.dtype if spec.kv_repeat == 1 else torch.promote_types(dk.dtype, torch.float32)
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
        out, lse, saved, max_logit = forward_impl(q, k, v, plan, sinks)
        ctx.save_for_backward(*saved, *(() if sinks is None else (sinks,)))
        ctx.plan = plan
        ctx.mark_non_differentiable(lse, *(() if max_logit is None else (max_logit,)))
        return out, lse, max_logit

    @staticmethod
    def backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None, _dmax: torch.Tensor | None = None
                 ):  # type: ignore[override]
        saved = tuple(ctx.saved_tensors)
        sinks = saved[5] if len(saved) > 5 else None
        grads = backward_impl(ctx.plan, saved[:5], dout, sinks)  # type: ignore[arg-type]
        dsinks = grads[3] if sinks is not None else None
        return grads[0], grads[1], grads[2], None, dsinks


Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _ring_forward_out(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, plan: CallPlan, dtype: torch.dtype,
                      rows: int | None = None) -> Rows:
    """``(out, lse, max rows)`` of the first ``rows`` local queries (all: ``None``); max rows only for a plan with
    :attr:`CallPlan.max_logit`."""
    kernel, whole = plan.setup.kernel, plan.whole
    n = qc.shape[1] if rows is None else rows
    mx = None
    if plan.max_logit:
        mx = torch.full((qc.shape[0], qc.shape[2], n), float("-inf"), device=qc.device,
                        dtype=torch.float64 if qc.dtype == torch.float64 else torch.float32)
    extra = {} if mx is None else {"max_out": mx}
    if rows is None and whole is not None:
        got = kernel.attend(qc, kc, vc, scale=plan.setup.scale, **plan.setup.mask_args(whole), **extra)
        if got is not None:
            return got[0], got[1], mx
    out32, lse = ring_forward(qc, kc, vc, plan.setup, rows=rows, max_rows=mx)
    return buffer_pool().export(out32, dtype), lse, mx


def _forward_with_keep(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, plan: CallPlan,
                       dtype: torch.dtype) -> Rows:
    """Ring forward in the compute layout, or its kept result inside a selective-checkpointing region
    (:mod:`ds_burst.attention.selective`): the first run records, the re-run reuses what was kept and computes
    only the rows that were not kept."""
    keep = active_keep()
    kept = keep.replay(tuple(qc.shape)) if keep is not None else None
    if kept is None:
        out_c, lse, mx = _ring_forward_out(qc, kc, vc, plan, dtype)
        if keep is not None and keep.recording:
            keep.record(tuple(qc.shape), out_c, lse, mx)
        return out_c, lse, mx
    if plan.max_logit and kept.mx is None:
        raise RuntimeError("selective checkpointing: the re-run asks for the maximum logit (return_max_logit) but "
                           "the first run did not; the region must make the same attention calls on both runs")
    out_k, lse_k = kept.fetch()
    mx_k = kept.mx if plan.max_logit else None
    if kept.start == 0:
        return out_k, lse_k, mx_k
    out_c, lse, mx = _ring_forward_out(qc, kc, vc, plan, dtype, rows=kept.start)
    mx = None if mx is None or mx_k is None else torch.cat([mx, mx_k], 2)
    return torch.cat([out_c, out_k], 1), torch.cat([lse, lse_k], 2), mx


def returns(out: torch.Tensor, lse: torch.Tensor, max_logit: torch.Tensor | None, return_lse: bool
            ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A call's result in the documented order: ``out``, then ``lse`` and ``max_logit`` where asked for."""
    got = (out,) + ((lse,) if return_lse else ()) + (() if max_logit is None else (max_logit,))
    return got if len(got) > 1 else out


def check_finite_grad(dout: torch.Tensor, info: GroupInfo) -> None:
    """Raise the same ``ValueError`` on every rank when any rank's output gradient holds NaN/Inf."""
    bad = int((~torch.isfinite(dout)).sum())
    rows = all_gather_ints(info, [bad], dout.device)
    for r, (n,) in enumerate(rows):
        if n:
            raise ValueError(f"rank {r}: the output gradient of attention contains {n} NaN/Inf values "
                             "(check_finite=True)")
