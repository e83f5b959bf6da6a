"""Memory-saving pieces for long contexts: a chunked LM-head + cross-entropy and a sequence-tiled MLP.

* :func:`chunked_lm_head_loss` computes ``logits = hidden @ weight.T`` and the cross-entropy chunk by chunk along
  the sequence and never holds the ``[B, s, V]`` logits: forward keeps one chunk's ``[B, c, V]`` logits at a
  time, backward recomputes them chunk by chunk. It returns the **sum** of token losses and the number of
  labelled tokens, which :func:`ds_burst.training.losses.sequence_parallel_loss_from_sum` turns into the full-sequence
  mean exactly as :func:`ds_burst.training.losses.sequence_parallel_loss` does from logits.
* :func:`tiled_mlp` runs a position-wise module (the SwiGLU MLP) over sequence tiles; only ``x`` is saved and
  backward re-runs the module tile by tile, so the ``[B, s, intermediate]`` activations exist for one tile only.

Both call modules normally (``module(x)``) when given a module, so DeepSpeed ZeRO-3's parameter gather hooks
fire; the parameters' ``ds_grad_is_ready`` flag is cleared for all but the last tile/chunk of the backward so
ZeRO-3 reduces each gradient once, after it has been accumulated over all tiles (as DeepSpeed's own
``TiledMLP`` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _set_grad_ready(params: Sequence[torch.Tensor], ready: bool) -> None:
    # DeepSpeed ZeRO (stage 1/2 and 3) reduces a parameter's gradient from its accumulation hook only when
    # this flag is unset or true: clear it for all but the last tile so the gradient is reduced once, complete.
    for p in params:
        p.ds_grad_is_ready = ready


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed cross-entropy in fp32 (fp64 stays fp64), as
    :func:`ds_burst.training.losses.sequence_parallel_loss` computes it."""
    flat = labels.reshape(-1)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits.reshape(flat.numel(), -1), flat, ignore_index=ignore_index,
                           reduction="sum")


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """Inputs: hidden [B, s, H], weight [V, H] (or None with a ``head`` module), labels [B, s]."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor | None, labels: torch.Tensor,
                head: nn.Module | None, chunk: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = hidden.shape[1]
        total = None
        with torch.no_grad():
            for sl in _chunks(s, chunk):
                h = hidden[:, sl]
                logits = head(h) if head is not None else F.linear(h, weight)
                part = _ce_sum(logits, labels[:, sl], ignore_index)
                total = part if total is None else total + part
                del logits
        assert total is not None
        count = (labels != ignore_index).sum().to(torch.float64)
        ctx.save_for_backward(hidden, weight if weight is not None else hidden.new_empty(0), labels)
        ctx.has_weight = weight is not None
        ctx.head, ctx.chunk, ctx.ignore_index = head, chunk, ignore_index
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, _grad_count: Any) -> tuple[Any, ...]:
        hidden, weight, labels = ctx.saved_tensors
        head: nn.Module | None = ctx.head
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.has_weight and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype in (torch.float16, torch.bfloat16)
                             else weight.dtype, device=weight.device) if need_w else None
        params = [p for p in head.parameters() if p.requires_grad] if head is not None else []
        slices = _chunks(hidden.shape[1], ctx.chunk)
        for i, sl in enumerate(slices):
            h = hidden[:, sl].detach().requires_grad_(need_h)
            lab = labels[:, sl]
            if head is not None:
                _set_grad_ready(params, i == len(slices) - 1)
                with torch.enable_grad():
                    part = _ce_sum(head(h), lab, ctx.ignore_index)
                if part.requires_grad:
                    torch.autograd.backward(part, grad_total)
                if need_h:
                    grad_h[:, sl] = h.grad if h.grad is not None else 0
                continue
            # explicit softmax-minus-one-hot gradient for the functional (weight tensor) path
            with torch.no_grad():
                logits = F.linear(h, weight)
                p = torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
                valid = lab != ctx.ignore_index
                tgt = torch.where(valid, lab, torch.zeros_like(lab))
                p.scatter_add_(-1, tgt[..., None], torch.full_like(p[..., :1], -1.0))
                p.mul_(valid[..., None].to(p.dtype) * grad_total.to(p.dtype))
                g = p.to(hidden.dtype)
                del logits, p
                if need_h:
                    grad_h[:, sl] = g @ weight
                if need_w:
                    grad_w += (g.reshape(-1, g.shape[-1]).t() @ h.reshape(-1, h.shape[-1])).to(grad_w.dtype)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def chunked_lm_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor | nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int,
    ignore_index: int = -100,
    reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden [B, s, H] @ weight.T`` against ``labels [B, s]`` without the ``[B, s, V]`` logits.

    ``weight`` is the ``[V, H]`` LM-head matrix, or the LM-head module itself (any ``[.., H] -> [.., V]``
    module; it is *called*, so ZeRO-3 gathers its parameters, and its parameters' gradients accumulate through
    a nested backward). The sequence is processed ``chunk_tokens`` positions at a time (``B * chunk_tokens``
    tokens); the last chunk may be shorter. Peak extra memory is about two ``[B, chunk_tokens, V]`` fp32
    tensors in forward and backward. Logits are computed in the input dtype and the softmax in fp32, as
    :func:`ds_burst.training.losses.sequence_parallel_loss` does.

    Returns ``(loss, count)``: with ``reduction="sum"`` the summed loss over labelled tokens (fp32/fp64) and the
    number of labelled tokens (float64, no gradient); ``reduction="mean"`` divides by ``max(count, 1)``.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected a positive integer, got {chunk_tokens!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction: expected 'sum' or 'mean', got {reduction!r}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [B, s, H] and labels [B, s], got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    if isinstance(weight, nn.Module):
        total, count = _ChunkedLMHeadLoss.apply(hidden, None, labels, weight, chunk_tokens, ignore_index)
    else:
        total, count = _ChunkedLMHeadLoss.apply(hidden, weight, labels, None, chunk_tokens, ignore_index)
    if reduction == "mean":
        total = total / count.clamp(min=1).to(total.dtype)
    return total, count


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiles: int,
                params: list[torch.Tensor]) -> torch.Tensor:
        ctx.fn, ctx.tiles, ctx.params = fn, tiles, params
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([fn(x[:, sl]) for sl in _tile_slices(x.shape[1], tiles)], dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[1] else None
        slices = _tile_slices(x.shape[1], ctx.tiles)
        for i, sl in enumerate(slices):
            xt = x[:, sl].detach().requires_grad_(grad_x is not None)
            _set_grad_ready(ctx.params, i == len(slices) - 1)
            with torch.enable_grad():
                y = ctx.fn(xt)
            if y.requires_grad:
                torch.autograd.backward(y, grad[:, sl])
            if grad_x is not None:
                grad_x[:, sl] = xt.grad if xt.grad is not None else 0
        return None, grad_x, None, None


def _tile_slices(n: int, tiles: int) -> list[slice]:
    return _chunks(n, max(1, math.ceil(n / tiles)))


def tiled_mlp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiles: int) -> torch.Tensor:
    """``fn(x)`` for a position-wise ``fn`` and ``x [B, s, ...]``, run over ``tiles`` sequence tiles.

    Saves only ``x``; backward re-runs ``fn`` per tile under grad mode and backpropagates it, so the
    intermediate activations of one tile (``[B, s/tiles, intermediate]`` for the SwiGLU MLP) live at a time.
    Parameter gradients accumulate over the tiles. ``fn`` is called normally (``fn(tile)``), so a module's
    ZeRO-3 hooks fire. ``tiles=1`` still saves only ``x`` (recompute of the whole MLP). Without grad mode, or
    when ``x`` does not require grad, this is just ``fn(x)``.
    """
    if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
        raise ValueError(f"tiles: expected a positive integer, got {tiles!r}")
    if not (torch.is_grad_enabled() and x.requires_grad):
        return fn(x)
    params = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, nn.Module) else []
    return _TiledMLP.apply(fn, x, tiles, params)
