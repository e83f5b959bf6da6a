"""Pure-PyTorch local attention tiles: the CPU path and the reference for the Triton kernels.

Layout everywhere (flash-attn's): ``q [B, Sq, Hq, D]``, ``k [B, Sk, Hkv, D]``, ``v [B, Sk, Hkv, Dv]`` with
``Hq % Hkv == 0``; query head ``h`` uses key/value head ``h // (Hq // Hkv)``. Any strides are accepted. The value
head dim ``Dv`` may differ from ``D`` (MLA); ``out``/``dout`` are then ``[B, Sq, Hq, Dv]``.

``softcap`` (optional): logit softcapping, the score is ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2).

Non-finite inputs propagate as in torch SDPA: a NaN/Inf score makes its rows NaN, never zero.

Running state of the online softmax, carried across ring steps and updated in place:
``out [B, Sq, Hq, D]`` (normalised partial output, fp32 or fp64) and ``lse [B, Hq, Sq]`` (natural-log
log-sum-exp of the keys seen so far, ``-inf`` before any key). Continuing the softmax from ``(out, lse)``
is exact: with ``m = lse`` and ``l = 1`` the state is the usual ``(acc, m, l)`` triple.

Backward takes the *global* ``lse`` and ``delta = rowsum(dO * O)`` (fp32, ``[B, Hq, Sq]``) and adds the
block's contribution to fp32 accumulators ``dq [B, Sq, Hq, D]`` and ``dk, dv [B, Sk, Hkv, D]``.

Memory is O(Sq * block_k) per head: keys are processed in tiles of ``block_k``.
"""

from __future__ import annotations

import math
import sys

import torch

from ds_burst.core.mask import BlockKind, classify_block, window_bounds
from ds_burst.kernels.contract import KernelSpec

DEFAULT_BLOCK_K = 512


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def visible_mask(
    q_start: int, q_len: int, k_start: int, k_len: int, causal: bool, window: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Boolean ``[q_len, k_len]`` mask of visible (query, key) pairs by global position."""
    lo, hi = window_bounds(causal, window)
    qp = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    kp = torch.arange(k_start, k_start + k_len, device=device)[None, :]
    diff = kp - qp
    ok = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if hi != math.inf:
        ok &= diff <= hi
    if lo != math.inf:
        ok &= diff >= -lo
    return ok


def _heads_first(x: torch.Tensor, n_kv: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, S, H, D] -> [B, Hkv, g, S, D]`` in ``dtype``."""
    b, s, h, d = x.shape
    return x.to(dtype).permute(0, 2, 1, 3).reshape(b, n_kv, h // n_kv, s, d)


def _kv_tile(x: torch.Tensor, c0: int, c1: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, Sk, Hkv, D]`` slice -> ``[B, Hkv, 1, Skc, D]`` in ``dtype``."""
    return x[:, c0:c1].to(dtype).permute(0, 2, 1, 3).unsqueeze(2)


def fwd_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    q_offset: int = 0,
    k_offset: int = 0,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float | None = None,
    block_k: int | None = None,
    max_out: torch.Tensor | None = None,
) -> None:
    """Continue the online softmax of ``(out, lse)`` over the keys ``k, v``; updates both in place (keys in tiles
    of ``block_k``, default :data:`DEFAULT_BLOCK_K`). ``max_out [B, Hq, Sq]``: raised to each query's largest
    visible scaled score before softcapping (the contract's maximum logit)."""
    block_k = block_k or DEFAULT_BLOCK_K
    b, sq, hq, _ = q.shape
    dv = v.shape[-1]
    sk, hkv = k.shape[1], k.shape[2]
    kind = classify_block(q_offset, sq, k_offset, sk, causal, window)
    if kind is BlockKind.EMPTY:
        return
    cdt = _compute_dtype(out)
    g = hq // hkv
    qh = _heads_first(q, hkv, cdt)  # [B, Hkv, g, Sq, D]
    m = lse.to(cdt).reshape(b, hkv, g, sq).clone()  # running max, initialised to lse
    l_run = (m != -math.inf).to(cdt)  # running sum: 1 where state holds keys (or NaN), else 0
    acc = _heads_first(out, hkv, cdt) * l_run[..., None]
    mx = None if max_out is None else torch.full_like(m, -math.inf)
    for c0 in range(0, sk, block_k):
        c1 = min(sk, c0 + block_k)
        sub = classify_block(q_offset, sq, k_offset + c0, c1 - c0, causal, window)
        if sub is BlockKind.EMPTY:
            continue
        kc, vc = _kv_tile(k, c0, c1, cdt), _kv_tile(v, c0, c1, cdt)
        s = torch.matmul(qh, kc.transpose(-1, -2)) * scale  # [B, Hkv, g, Sq, Skc]
        ok = None
        if sub is BlockKind.PARTIAL:
            ok = visible_mask(q_offset, sq, k_offset + c0, c1 - c0, causal, window, q.device)
        if mx is not None:
            mx = torch.maximum(mx, (s if ok is None else s.masked_fill(~ok, -math.inf)).amax(-1))
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if ok is not None:
            s = s.masked_fill(~ok, -math.inf)
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        alpha = torch.exp(m - m_safe)
        p = torch.exp(s - m_safe[..., None])
        l_run = l_run * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.matmul(p, vc)
        m = m_new
    has = l_run != 0  # NaN sums count as keys: non-finite inputs propagate, no row is silently zeroed
    l_safe = torch.where(has, l_run, torch.ones_like(l_run))
    new_out = torch.where(has[..., None], acc / l_safe[..., None], torch.zeros_like(acc))
    new_lse = torch.where(has, m + torch.log(l_safe), torch.full_like(m, -math.inf))
    out.copy_(new_out.reshape(b, hq, sq, dv).permute(0, 2, 1, 3))
    lse.copy_(new_lse.reshape(b, hq, sq))
    if mx is not None and max_out is not None:
        torch.maximum(max_out, mx.reshape(b, hq, sq).to(max_out.dtype), out=max_out)


def bwd_preprocess(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """``delta = rowsum(dO * O)`` as fp32 (fp64 for fp64 inputs), shape ``[B, H, S]``."""
    cdt = _compute_dtype(out)
    return (out.to(cdt) * dout.to(cdt)).sum(-1).transpose(1, 2).contiguous()


def bwd_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    *,
    scale: float,
    q_offset: int = 0,
    k_offset: int = 0,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float | None = None,
    deterministic: bool = False,
    out: torch.Tensor | None = None,
    block_k: int | None = None,
) -> None:
    """Add this block's gradients to ``dq`` (``[B, Sq, Hq, D]``), ``dk`` (``[B, Sk, Hkv, D]``), ``dv``
    (``[B, Sk, Hkv, Dv]``).

    ``lse`` and ``delta`` are the global (final) values for these queries, ``[B, Hq, Sq]``. Always bitwise
    reproducible (``deterministic`` changes nothing); ``out`` is not needed.
    """
    del deterministic, out
    block_k = block_k or DEFAULT_BLOCK_K
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if classify_block(q_offset, sq, k_offset, sk, causal, window) is BlockKind.EMPTY:
        return
    cdt = _compute_dtype(dq)
    g = hq // hkv
    qh = _heads_first(q, hkv, cdt)
    doh = _heads_first(dout, hkv, cdt)
    lse_h = lse.to(cdt).reshape(b, hkv, g, sq, 1)
    delta_h = delta.to(cdt).reshape(b, hkv, g, sq, 1)
    dq_acc = torch.zeros_like(qh)
    for c0 in range(0, sk, block_k):
        c1 = min(sk, c0 + block_k)
        sub = classify_block(q_offset, sq, k_offset + c0, c1 - c0, causal, window)
        if sub is BlockKind.EMPTY:
            continue
        kc, vc = _kv_tile(k, c0, c1, cdt), _kv_tile(v, c0, c1, cdt)
        s = torch.matmul(qh, kc.transpose(-1, -2)) * scale
        t = None
        if softcap is not None:
            t = torch.tanh(s / softcap)
            s = t * softcap
        p = torch.exp(s - lse_h)  # [B, Hkv, g, Sq, Skc]
        if sub is BlockKind.PARTIAL:
            ok = visible_mask(q_offset, sq, k_offset + c0, c1 - c0, causal, window, q.device)
            p = p.masked_fill(~ok, 0.0)
        dv_c = torch.matmul(p.transpose(-1, -2), doh).sum(2)  # [B, Hkv, Skc, D]
        dp = torch.matmul(doh, vc.transpose(-1, -2))
        ds = p * (dp - delta_h)
        if t is not None:  # d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
            ds = ds * (1 - t * t)
        dq_acc += torch.matmul(ds, kc) * scale
        dk_c = torch.matmul(ds.transpose(-1, -2), qh).sum(2) * scale
        dk[:, c0:c1] += dk_c.permute(0, 2, 1, 3).to(dk.dtype)
        dv[:, c0:c1] += dv_c.permute(0, 2, 1, 3).to(dv.dtype)
    dq += dq_acc.reshape(b, hq, sq, d).permute(0, 2, 1, 3).to(dq.dtype)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``scale * q.k`` of every (query, key) pair, ``[B, Hq, Sq, Sk]`` in the inputs' dtype (GQA by repetition)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kk = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2).transpose(1, 2)
    return torch.matmul(q.transpose(1, 2), kk.transpose(-1, -2)) * scale


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    scale: float | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain differentiable attention with an explicit mask: ``(out [B,S,Hq,Dv], lse [B,Hq,S])``.

    Computed in the inputs' dtype (use float64 for references). Rows with no visible key give 0 and -inf.
    ``softcap``: scores ``softcap * tanh(s / softcap)``; ``sinks [Hq]``: a per-head logit in the softmax
    denominator (GPT-OSS), included in the returned ``lse``.
    """
    b, sq, hq, _ = q.shape
    sk = k.shape[1]
    vv = v.repeat_interleave(hq // k.shape[2], dim=2).transpose(1, 2)
    s = _scores(q, k, scale)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    ok = visible_mask(q_offset, sq, k_offset, sk, causal, window, q.device)
    s = s.masked_fill(~ok, -math.inf)
    if sinks is not None:
        sink_col = sinks.to(s.dtype).reshape(1, hq, 1, 1).expand(b, hq, sq, 1)
        lse = torch.logsumexp(torch.cat([s, sink_col], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    out = torch.matmul(p, vv).transpose(1, 2)
    return out, lse


def naive_row_max(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    scale: float | None = None,
    q_offset: int = 0,
    k_offset: int = 0,
    docs: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Each query's largest ``scale * q.k`` (before any softcapping) over the keys it sees, ``[B, Hq, Sq]``
    (``docs``: global document boundaries the pairs may not cross), ``-inf`` for a query with no visible key;
    computed in the inputs' dtype (use float64 for references)."""
    sq, sk = q.shape[1], k.shape[1]
    ok = visible_mask(q_offset, sq, k_offset, sk, causal, window, q.device)
    if docs is not None:
        edges = torch.tensor(docs[1:-1], device=q.device)
        dq = torch.bucketize(torch.arange(q_offset, q_offset + sq, device=q.device), edges, right=True)
        dk = torch.bucketize(torch.arange(k_offset, k_offset + sk, device=q.device), edges, right=True)
        ok &= dq[:, None] == dk[None, :]
    return _scores(q, k, scale).masked_fill(~ok, -math.inf).amax(-1)


def naive_max_logit(q: torch.Tensor, k: torch.Tensor, **mask: object) -> torch.Tensor:
    """The maximum logit of plain attention: ``[Hq]``, :func:`naive_row_max` (same keywords) over every batch row
    and query."""
    return naive_row_max(q, k, **mask).amax(dim=(0, 2))  # type: ignore[arg-type]


KERNEL = KernelSpec(
    "torch", sys.modules[__name__],  # type: ignore[arg-type]
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    devices=("cpu", "cuda", "xpu", "mps", "meta"),
    softcap=True, value_dim=True,
    tolerance={torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5)},
)
"""The PyTorch tiles: every dtype and device, every variant (the kernel the others fall back to)."""
