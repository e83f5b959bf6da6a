"""Triton local attention tiles for the BurstAttention ring: forward with a carried online-softmax state,
backward with precomputed global ``lse`` and ``delta``.

The tile contract of :mod:`ds_burst.kernels.contract` (semantics: :mod:`ds_burst.kernels.reference`), as the
methods of :class:`Tiles`, whose fields fix the routing (:data:`TILES`, and the module's functions, follow the
settings); the record is :data:`KERNEL`. ``q [B, Sq, Hq, D]``,
``k [B, Sk, Hkv, D]``, ``v [B, Sk, Hkv, Dv]`` with any strides (``Dv`` may differ from ``D``, MLA), GQA by index
arithmetic (K/V are never repeated), masks by *global* positions ``q_offset + i`` / ``k_offset + j`` (causal and
flash-attn style windows, see :mod:`ds_burst.core.mask`), optional logit softcapping ``softcap``.

Design (docs/KERNELS.md has more):

* Scores are computed in the log2 domain (``exp2`` with ``scale * log2(e)`` folded in); ``lse`` is read and
  written in natural log.
* Every program computes, from the offsets, which key (or query) tiles it can see at all and which of those are
  fully visible for every row. The loop runs in three ranges: masked tiles below the fully visible range,
  mask-free tiles, and masked tiles above it. Tiles nobody can see are never visited.
* Forward: one program per (query tile, query head); state ``(out, lse)`` is loaded, continued and stored.
  Rows that see no key in this call are left bitwise unchanged (except ``out`` rows whose ``lse`` is ``-inf``,
  which are set to 0 as in the reference).
* Backward: one program per (key tile, kv head) computes dK, dV, looping over the ``g`` query heads of its kv
  head and over the visible query tiles; dQ either by fp32 atomics from the same kernel
  (``deterministic=False``) or by a second kernel over query tiles (``deterministic=True``, no atomics,
  bitwise reproducible).
* Variants are constexpr flags, so the plain kernels compile as without them: ``SOFTCAP`` (scores
  ``softcap * tanh(s / softcap)``, the backward multiplies dS by ``1 - tanh^2``; libdevice ``tanh`` on GPU, an
  ``exp2`` form in the interpreter), a value head dim ``HEAD_DV`` padded to ``BLOCK_DV`` like ``HEAD_DIM``, and
  ``HAS_MAX`` (the forward also raises ``max_out`` to each row's largest visible logit before the cap, from the
  row maxima the online softmax computes anyway).
* Under ``TRITON_INTERPRET=1`` (CPU) a single small config is used; on GPU the kernels are autotuned over a
  small config list keyed on head dim, mask flags, dtype and a sequence-length bucket.
* On sm_90 (H100, H200) the launchers hand the calls that :mod:`ds_burst.kernels.hopper_attn` covers to its
  Gluon kernels (forward; backward in :mod:`ds_burst.kernels.hopper_attn_bwd`; ``Tiles(hopper=False)``: never;
  softcap too, as ``hopper_common.SOFTCAP_CHECKED`` declares, with the same ``qk_scale`` / ``cap2`` and
  ``tanh.approx.f32``); these ``tl`` kernels stay the portable path (other GPUs, the interpreter, ``Dv != D``,
  other head dims, ``deterministic=True``).
* One rank, the whole block as the only tile: :func:`attend` / :func:`attend_bwd` run it in one Hopper launch
  each way with the outputs written in the input dtype (no fp32 state or gradient buffers for out, dK, dV), or
  return ``None`` where the Hopper kernels do not cover the call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ds_burst.core import settings
from ds_burst.core.mask import BlockKind, classify_block
from ds_burst.kernels import hopper_attn, hopper_attn_bwd, tile_math
from ds_burst.kernels.contract import KernelSpec

__all__ = ["KERNEL", "TILES", "Tiles", "kernel", "fwd_step", "bwd_preprocess", "bwd_step", "attend", "attend_bwd",
           "MAX_HEAD_DIM", "INTERPRET"]

INTERPRET: bool = settings.triton_interpret()
"""True when Triton runs kernels in its interpreter (CPU tensors). Read once, at import."""

_AUTOTUNE: bool = (not INTERPRET) and settings.flag(settings.TRITON_AUTOTUNE, True)

MAX_HEAD_DIM = 256
_LN2 = 0.6931471805599453

# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


_span = triton.jit(tile_math.in_dialect(tile_math.span, tl))
_finish = triton.jit(tile_math.in_dialect(tile_math.finish, tl))


@triton.jit
def _subrange(start, n_a, n_b, R: tl.constexpr, BLOCK: tl.constexpr):
    """First tile row of range ``R`` of a span (:func:`tile_math.span`: 0 masked tiles below, 1 mask-free tiles,
    2 masked tiles above)."""
    if R == 0:
        first = start
    elif R == 1:
        first = start + n_a * BLOCK
    else:
        first = start + n_a * BLOCK + n_b * BLOCK
    return first


@triton.jit
def _tanh(x, LIB_TANH: tl.constexpr):
    """``tanh(x)`` in fp32: libdevice's on GPU; under the interpreter (no libdevice) from ``exp2`` with a series
    near 0 (no cancellation). NaN stays NaN, +-inf gives +-1, as ``torch.tanh``."""
    if LIB_TANH:
        t = libdevice.tanh(x)
    else:
        ax = tl.abs(x)
        e = tl.math.exp2(ax * -2.8853900817779268)  # exp(-2|x|)
        big = (1.0 - e) / (1.0 + e)
        x2 = ax * ax
        small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
        t = tl.where(ax < 0.125, small, big)
        t = tl.where(x < 0, -t, t)
    return t


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, kT_ptrs, v_ptrs, start, n_tiles, offs_m, offs_n, offs_d, offs_dv,
               stride_ks, stride_vs, Sk, delta0, win_l, win_r, qk_scale, cap2, mx,
               MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, EVEN_D: tl.constexpr,
               EVEN_DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr, LIB_TANH: tl.constexpr, HAS_MAX: tl.constexpr):
    """The online softmax over ``n_tiles`` key tiles from ``start``; ``HAS_MAX``: ``mx`` is raised to each row's
    largest visible ``q.k * qk_scale`` (before the tanh with ``SOFTCAP``)."""
    for t in range(n_tiles):
        n = start + t * BLOCK_N
        kn = n + offs_n
        n64 = n.to(tl.int64)
        if MASKED:
            kT = tl.load(kT_ptrs + n64 * stride_ks, mask=(kn[None, :] < Sk) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_ptrs + n64 * stride_vs, mask=(kn[:, None] < Sk) & (offs_dv[None, :] < HEAD_DV), other=0.0)
        else:
            if EVEN_D:
                kT = tl.load(kT_ptrs + n64 * stride_ks)
            else:
                kT = tl.load(kT_ptrs + n64 * stride_ks, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            if EVEN_DV:
                v = tl.load(v_ptrs + n64 * stride_vs)
            else:
                v = tl.load(v_ptrs + n64 * stride_vs, mask=offs_dv[None, :] < HEAD_DV, other=0.0)
        qk = tl.dot(q, kT, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            rel = kn[None, :] - offs_m[:, None] - delta0
            ok = kn[None, :] < Sk
            if HAS_LO:
                ok = ok & (rel >= -win_l)
            if HAS_HI:
                ok = ok & (rel <= win_r)
        if SOFTCAP:  # qk_scale = scale / softcap, cap2 = softcap * log2(e)
            if HAS_MAX:  # the maximum logit is taken before the cap
                if MASKED:
                    mx = tl.maximum(mx, tl.max(tl.where(ok, qk, float("-inf")), 1))
                else:
                    mx = tl.maximum(mx, tl.max(qk, 1))
            qk = _tanh(qk, LIB_TANH) * cap2
        if MASKED:
            qk = tl.where(ok, qk, float("-inf"))
        qk_max = tl.max(qk, 1)
        if HAS_MAX:
            if not SOFTCAP:
                mx = tl.maximum(mx, qk_max)
        m_new = tl.maximum(m_i, qk_max)
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i, mx


@triton.jit(do_not_specialize=["delta0", "win_l", "win_r"])
def _fwd_kernel(
    Q, K, V, Out, Lse, Max,
    sqb, sqs, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    sob, sos, soh, sod,
    slb, slh, sls,
    sxb, sxh, sxs,
    Hq, Sq, Sk, G, delta0, win_l, win_r, qk_scale, cap2, mx_unit, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_DV: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr, LIB_TANH: tl.constexpr, HAS_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (causal) tiles first
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DV
    b64 = b.to(tl.int64)
    m64 = m0.to(tl.int64)

    q_ptrs = Q + b64 * sqb + h.to(tl.int64) * sqh + m64 * sqs + offs_r[:, None] * sqs + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    o_ptrs = Out + b64 * sob + h.to(tl.int64) * soh + m64 * sos + offs_r[:, None] * sos + offs_dv[None, :] * sod
    l_ptrs = Lse + b64 * slb + h.to(tl.int64) * slh + m64 * sls + offs_r * sls
    lse_in = tl.load(l_ptrs, mask=row_ok, other=float("-inf")).to(tl.float32)
    has_prev = lse_in != float("-inf")
    m_in = tl.where(has_prev, lse_in * 1.4426950408889634, float("-inf"))
    o_in = tl.load(o_ptrs, mask=row_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.where(has_prev[:, None], o_in, 0.0)
    l_i = tl.where(has_prev, 1.0, 0.0)
    m_i = m_in
    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)  # HAS_MAX: the rows' maximum logit, in qk units

    kv_off = b64 * skb + hk.to(tl.int64) * skh
    kT_ptrs = K + kv_off + offs_n[None, :] * sks + offs_d[:, None] * skd
    v_ptrs = V + b64 * svb + hk.to(tl.int64) * svh + offs_n[:, None] * svs + offs_dv[None, :] * svd

    start, n_a, n_b, n_c = _span(m0, Sq, Sk, delta0, win_l, win_r, HAS_LO, HAS_HI, False, 1, BLOCK_M, BLOCK_N)
    for r in tl.static_range(3):  # masked key tiles, mask-free key tiles, masked key tiles
        acc, l_i, m_i, mx = _fwd_inner(
            acc, l_i, m_i, q, kT_ptrs, v_ptrs, _subrange(start, n_a, n_b, r, BLOCK_N), (n_a, n_b, n_c)[r], offs_m,
            offs_n, offs_d, offs_dv, sks, svs, Sk, delta0, win_l, win_r, qk_scale, cap2, mx, MASKED=r != 1,
            HAS_LO=HAS_LO, HAS_HI=HAS_HI, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, HEAD_DIM=HEAD_DIM, HEAD_DV=HEAD_DV,
            BLOCK_N=BLOCK_N, DOT_PREC=DOT_PREC, SOFTCAP=SOFTCAP, LIB_TANH=LIB_TANH, HAS_MAX=HAS_MAX)
    out, lse_out = _finish(acc, l_i, m_i, lse_in, has_prev, m_in)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(l_ptrs, lse_out.to(Lse.dtype.element_ty), mask=row_ok)
    if HAS_MAX:  # raise max_out to the rows' maximum logit, in natural units (mx_unit: ln 2, or the softcap)
        x_ptrs = Max + b64 * sxb + h.to(tl.int64) * sxh + m64 * sxs + offs_r * sxs
        x_old = tl.load(x_ptrs, mask=row_ok, other=float("-inf"))
        tl.store(x_ptrs, tl.maximum(x_old, (mx * mx_unit).to(Max.dtype.element_ty)), mask=row_ok)


@triton.jit
def _bwd_pre_kernel(
    Out, DO, Delta,
    sob, sos, soh, sod,
    sdb, sds, sdh, sdd,
    seb, seh, ses,
    H, S,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < S) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m.to(tl.int64)
    o = tl.load(Out + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sds + offs_d[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b * seb + h * seh + rows * ses, delta, mask=offs_m < S)


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, lse_ptrs, dl_ptrs, dq_ptrs, start, n_tiles, offs_n, offs_r,
                  offs_d, offs_dv, sqs, sdos, sls, sdls, sdqs, Sq, Sk, delta0, win_l, win_r, qk_scale, sm_scale, cap2,
                  MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, EVEN_D: tl.constexpr,
                  EVEN_DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                  DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr, SOFTCAP: tl.constexpr, LIB_TANH: tl.constexpr):
    for t in range(n_tiles):
        m = start + t * BLOCK_M
        qm = m + offs_r
        m64 = m.to(tl.int64)
        if MASKED:
            qT = tl.load(qT_ptrs + m64 * sqs, mask=(qm[None, :] < Sq) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            do = tl.load(do_ptrs + m64 * sdos, mask=(qm[:, None] < Sq) & (offs_dv[None, :] < HEAD_DV), other=0.0)
            lse = tl.load(lse_ptrs + m64 * sls, mask=qm < Sq, other=float("-inf"))
            dlt = tl.load(dl_ptrs + m64 * sdls, mask=qm < Sq, other=0.0)
        else:
            if EVEN_D:
                qT = tl.load(qT_ptrs + m64 * sqs)
            else:
                qT = tl.load(qT_ptrs + m64 * sqs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            if EVEN_DV:
                do = tl.load(do_ptrs + m64 * sdos)
            else:
                do = tl.load(do_ptrs + m64 * sdos, mask=offs_dv[None, :] < HEAD_DV, other=0.0)
            lse = tl.load(lse_ptrs + m64 * sls)
            dlt = tl.load(dl_ptrs + m64 * sdls)
        # Rows without any key (lse = -inf) contribute nothing.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        qkT = tl.dot(k, qT, tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), input_precision=DOT_PREC) * qk_scale
        if SOFTCAP:
            tT = _tanh(qkT, LIB_TANH)
            qkT = tT * cap2
        pT = tl.math.exp2(qkT - lse2[None, :])
        if MASKED:
            rel = offs_n[:, None] - qm[None, :] - delta0
            ok = (qm[None, :] < Sq) & (offs_n[:, None] < Sk)
            if HAS_LO:
                ok = ok & (rel >= -win_l)
            if HAS_HI:
                ok = ok & (rel <= win_r)
            pT = tl.where(ok, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), input_precision=DOT_PREC)
        dsT = pT * (dpT - dlt[None, :])
        if SOFTCAP:  # d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PREC)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, tl.zeros([BLOCK_M, k.shape[1]], dtype=tl.float32),
                        input_precision=DOT_PREC)
            dq_mask = (qm[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM)
            tl.atomic_add(dq_ptrs + m64 * sdqs, dq * sm_scale, mask=dq_mask, sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["delta0", "win_l", "win_r"])
def _bwd_kv_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DK, DV,
    sqb, sqs, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    sdob, sdos, sdoh, sdod,
    slb, slh, sls,
    sdlb, sdlh, sdls,
    sdqb, sdqs, sdqh, sdqd,
    sdkb, sdks, sdkh, sdkd,
    sdvb, sdvs, sdvh, sdvd,
    Hkv, Sq, Sk, G, delta0, win_l, win_r, qk_scale, sm_scale, cap2, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_DV: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    SOFTCAP: tl.constexpr, LIB_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    n64 = n0.to(tl.int64)
    k_mask = (offs_n[:, None] < Sk) & (offs_d[None, :] < HEAD_DIM)
    v_mask = (offs_n[:, None] < Sk) & (offs_dv[None, :] < HEAD_DV)
    k = tl.load(K + b64 * skb + hk64 * skh + n64 * sks + offs_c[:, None] * sks + offs_d[None, :] * skd,
                mask=k_mask, other=0.0)
    v = tl.load(V + b64 * svb + hk64 * svh + n64 * svs + offs_c[:, None] * svs + offs_dv[None, :] * svd,
                mask=v_mask, other=0.0)

    start, n_a, n_b, n_c = _span(n0, Sk, Sq, delta0, win_l, win_r, HAS_LO, HAS_HI, True, 1, BLOCK_N, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for hh in range(G):
        h64 = (hk * G + hh).to(tl.int64)
        qT_ptrs = Q + b64 * sqb + h64 * sqh + offs_r[None, :] * sqs + offs_d[:, None] * sqd
        do_ptrs = DO + b64 * sdob + h64 * sdoh + offs_r[:, None] * sdos + offs_dv[None, :] * sdod
        lse_ptrs = Lse + b64 * slb + h64 * slh + offs_r * sls
        dl_ptrs = Delta + b64 * sdlb + h64 * sdlh + offs_r * sdls
        dq_ptrs = DQ + b64 * sdqb + h64 * sdqh + offs_r[:, None] * sdqs + offs_d[None, :] * sdqd
        for r in tl.static_range(3):  # masked query tiles, mask-free query tiles, masked query tiles
            dk, dv = _bwd_kv_inner(
                dk, dv, k, v, qT_ptrs, do_ptrs, lse_ptrs, dl_ptrs, dq_ptrs, _subrange(start, n_a, n_b, r, BLOCK_M),
                (n_a, n_b, n_c)[r], offs_n, offs_r, offs_d, offs_dv, sqs, sdos, sls, sdls, sdqs, Sq, Sk, delta0, win_l,
                win_r, qk_scale, sm_scale, cap2, MASKED=r != 1, HAS_LO=HAS_LO, HAS_HI=HAS_HI, EVEN_D=EVEN_D,
                EVEN_DV=EVEN_DV, HEAD_DIM=HEAD_DIM, HEAD_DV=HEAD_DV, BLOCK_M=BLOCK_M, DOT_PREC=DOT_PREC,
                ATOMIC_DQ=ATOMIC_DQ, SOFTCAP=SOFTCAP, LIB_TANH=LIB_TANH)

    dk_ptrs = DK + b64 * sdkb + hk64 * sdkh + n64 * sdks + offs_c[:, None] * sdks + offs_d[None, :] * sdkd
    dv_ptrs = DV + b64 * sdvb + hk64 * sdvh + n64 * sdvs + offs_c[:, None] * sdvs + offs_dv[None, :] * sdvd
    dk_old = tl.load(dk_ptrs, mask=k_mask, other=0.0)
    tl.store(dk_ptrs, (dk_old + dk * sm_scale).to(DK.dtype.element_ty), mask=k_mask)
    dv_old = tl.load(dv_ptrs, mask=v_mask, other=0.0)
    tl.store(dv_ptrs, (dv_old + dv).to(DV.dtype.element_ty), mask=v_mask)


@triton.jit
def _bwd_q_inner(dq, q, do, lse2, dlt, kT_ptrs, vT_ptrs, start, n_tiles, offs_m, offs_n, offs_d, offs_dv,
                 sks, svs, Sk, delta0, win_l, win_r, qk_scale, cap2,
                 MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, EVEN_D: tl.constexpr,
                 EVEN_DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr, LIB_TANH: tl.constexpr):
    for t in range(n_tiles):
        n = start + t * BLOCK_N
        kn = n + offs_n
        n64 = n.to(tl.int64)
        if MASKED:
            kT = tl.load(kT_ptrs + n64 * sks, mask=(kn[None, :] < Sk) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            vT = tl.load(vT_ptrs + n64 * svs, mask=(kn[None, :] < Sk) & (offs_dv[:, None] < HEAD_DV), other=0.0)
        else:
            if EVEN_D:
                kT = tl.load(kT_ptrs + n64 * sks)
            else:
                kT = tl.load(kT_ptrs + n64 * sks, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            if EVEN_DV:
                vT = tl.load(vT_ptrs + n64 * svs)
            else:
                vT = tl.load(vT_ptrs + n64 * svs, mask=offs_dv[:, None] < HEAD_DV, other=0.0)
        qk = tl.dot(q, kT, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), input_precision=DOT_PREC) * qk_scale
        if SOFTCAP:
            tc = _tanh(qk, LIB_TANH)
            qk = tc * cap2
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED:
            rel = kn[None, :] - offs_m[:, None] - delta0
            ok = kn[None, :] < Sk
            if HAS_LO:
                ok = ok & (rel >= -win_l)
            if HAS_HI:
                ok = ok & (rel <= win_r)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vT, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), input_precision=DOT_PREC)
        ds = p * (dp - dlt[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tc * tc)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["delta0", "win_l", "win_r"])
def _bwd_q_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    sqb, sqs, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    sdob, sdos, sdoh, sdod,
    slb, slh, sls,
    sdlb, sdlh, sdls,
    sdqb, sdqs, sdqh, sdqd,
    Hq, Sq, Sk, G, delta0, win_l, win_r, qk_scale, sm_scale, cap2, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_DV: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr, LIB_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    mask_v = row_ok[:, None] & (offs_dv[None, :] < HEAD_DV)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    m64 = m0.to(tl.int64)
    q = tl.load(Q + b64 * sqb + h64 * sqh + m64 * sqs + offs_r[:, None] * sqs + offs_d[None, :] * sqd,
                mask=mask, other=0.0)
    do = tl.load(DO + b64 * sdob + h64 * sdoh + m64 * sdos + offs_r[:, None] * sdos + offs_dv[None, :] * sdod,
                 mask=mask_v, other=0.0)
    lse = tl.load(Lse + b64 * slb + h64 * slh + m64 * sls + offs_r * sls, mask=row_ok, other=float("-inf"))
    dlt = tl.load(Delta + b64 * sdlb + h64 * sdlh + m64 * sdls + offs_r * sdls, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)

    hk64 = hk.to(tl.int64)
    kT_ptrs = K + b64 * skb + hk64 * skh + offs_n[None, :] * sks + offs_d[:, None] * skd
    vT_ptrs = V + b64 * svb + hk64 * svh + offs_n[None, :] * svs + offs_dv[:, None] * svd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start, n_a, n_b, n_c = _span(m0, Sq, Sk, delta0, win_l, win_r, HAS_LO, HAS_HI, False, 1, BLOCK_M, BLOCK_N)
    for r in tl.static_range(3):  # masked key tiles, mask-free key tiles, masked key tiles
        dq = _bwd_q_inner(
            dq, q, do, lse2, dlt, kT_ptrs, vT_ptrs, _subrange(start, n_a, n_b, r, BLOCK_N), (n_a, n_b, n_c)[r],
            offs_m, offs_n, offs_d, offs_dv, sks, svs, Sk, delta0, win_l, win_r, qk_scale, cap2, MASKED=r != 1,
            HAS_LO=HAS_LO, HAS_HI=HAS_HI, EVEN_D=EVEN_D, EVEN_DV=EVEN_DV, HEAD_DIM=HEAD_DIM, HEAD_DV=HEAD_DV,
            BLOCK_N=BLOCK_N, DOT_PREC=DOT_PREC, SOFTCAP=SOFTCAP, LIB_TANH=LIB_TANH)

    dq_ptrs = DQ + b64 * sdqb + h64 * sdqh + m64 * sdqs + offs_r[:, None] * sdqs + offs_d[None, :] * sdqd
    dq_old = tl.load(dq_ptrs, mask=mask, other=0.0)
    tl.store(dq_ptrs, (dq_old + dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------------------------------


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M tiles queries, BLOCK_N keys, in every kernel.
_FWD_CONFIGS = [
    _cfg(128, 128, 8, 3), _cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2),
    _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3), _cfg(64, 32, 4, 2),
]
_BWD_KV_CONFIGS = [
    _cfg(64, 128, 8, 3), _cfg(32, 128, 4, 3), _cfg(64, 128, 4, 2), _cfg(64, 64, 4, 3),
    _cfg(32, 64, 4, 3), _cfg(16, 64, 4, 2),
]
_BWD_Q_CONFIGS = [
    _cfg(128, 64, 8, 3), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3), _cfg(128, 128, 8, 2),
    _cfg(64, 32, 4, 2), _cfg(32, 64, 4, 2),
]
# Fixed choices when autotuning is switched off (DS_BURST_TRITON_AUTOTUNE=0); indexed by BLOCK_D <= 128.
# The D <= 128 entries are the autotuner's picks on H200 at D = 128 (bf16, S = 8K and 32K, causal and not).
_FIXED = {
    "fwd": ({"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
            {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}),
    "kv": ({"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
           {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}),
    "q": ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
          {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}),
}
_SMEM_LIMIT = 200 * 1024


def _pruner(smem: Callable[[triton.Config, int, int, int], int], big: Callable[[triton.Config], bool]
            ) -> Callable[..., list[triton.Config]]:
    """An ``early_config_prune`` keeping the configs whose shared memory ``smem(config, BLOCK_D, BLOCK_DV, element
    size)`` fits and, at head dims of 256, those ``big`` accepts (else the smallest config)."""

    def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
        bdv = kwargs.get("BLOCK_DV", named_args.get("BLOCK_DV", bd))
        esize = 4 if kwargs.get("DOT_PREC", named_args.get("DOT_PREC", "")) == "ieee" else 2
        keep = [c for c in configs if smem(c, bd, bdv, esize) <= _SMEM_LIMIT and (max(bd, bdv) < 256 or big(c))]
        return keep or [min(configs, key=lambda c: smem(c, bd, bdv, esize))]

    return prune


def _stages(c: triton.Config) -> int:
    return max(c.num_stages - 1, 1)


# forward: a Q tile, then K and V tiles per pipeline stage; backward: q / k tiles by BLOCK_D, dO / v by BLOCK_DV
_prune_fwd = _pruner(lambda c, bd, bdv, es: es * (bd * c.kwargs["BLOCK_M"] + (bd + bdv) * c.kwargs["BLOCK_N"]
                                                 * _stages(c)), lambda c: c.kwargs["BLOCK_N"] <= 64)
_prune_bwd = _pruner(lambda c, bd, bdv, es: es * (bd + bdv) * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"])
                     * (_stages(c) + 1) // 2, lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64)


_KEY = ["BLOCK_D", "BLOCK_DV", "HAS_LO", "HAS_HI", "DOT_PREC", "SOFTCAP", "SEQ_BUCKET"]

if _AUTOTUNE:
    _fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY + ["HAS_MAX"], restore_value=["Out", "Lse", "Max"],
                                 prune_configs_by={"early_config_prune": _prune_fwd})(_fwd_kernel)
    _bwd_kv_tuned = triton.autotune(_BWD_KV_CONFIGS, key=_KEY + ["ATOMIC_DQ"], restore_value=["DQ", "DK", "DV"],
                                    prune_configs_by={"early_config_prune": _prune_bwd})(_bwd_kv_kernel)
    _bwd_q_tuned = triton.autotune(_BWD_Q_CONFIGS, key=_KEY, restore_value=["DQ"],
                                   prune_configs_by={"early_config_prune": _prune_bwd})(_bwd_q_kernel)
else:
    _fwd_tuned = _bwd_kv_tuned = _bwd_q_tuned = None
# kind -> (autotuned kernel or None, kernel, the block its grid tiles)
_KERNELS = {"fwd": (_fwd_tuned, _fwd_kernel, "BLOCK_M"), "kv": (_bwd_kv_tuned, _bwd_kv_kernel, "BLOCK_N"),
            "q": (_bwd_q_tuned, _bwd_q_kernel, "BLOCK_M")}


def _seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: powers of two from 256 to 16384 (coarse)."""
    return min(max(triton.next_power_of_2(max(n, 1)), 256), 16384)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products; for 16-bit inputs the setting has no effect ("tf32" is the default)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _rules(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """The Triton tiles' own rules (``KERNEL.check``): 4-D inputs of one dtype, head dims 1..256, whole GQA groups,
    CUDA or, under ``TRITON_INTERPRET=1``, the CPU without bf16 (the interpreter's bf16 ``tl.dot`` is wrong)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expected 4-D [B, S, H, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} differ"
    d, dv = q.shape[-1], v.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        return f"head dim {d} not supported by the Triton kernels (1..{MAX_HEAD_DIM})"
    if not 1 <= dv <= MAX_HEAD_DIM:
        return f"value head dim {dv} not supported by the Triton kernels (1..{MAX_HEAD_DIM})"
    if k.shape[:3] != v.shape[:3] or k.shape[-1] != d or k.shape[0] != q.shape[0]:
        return f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        return f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}"
    if q.device.type == "cuda":
        return None if q.dtype != torch.bfloat16 or torch.cuda.is_bf16_supported() else "no bf16 on this GPU"
    if not (INTERPRET and settings.triton_interpret()):  # set at import, and still set
        return f"{q.device.type} tensors need TRITON_INTERPRET=1 (the interpreter)"
    return "bf16 under the interpreter (its bf16 dot is wrong)" if q.dtype == torch.bfloat16 else None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    why = KERNEL.why_not(q, k, v)
    if why is not None:
        raise ValueError(f"the Triton tiles cannot run this call: {why}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


@dataclass(frozen=True)
class Tiles:
    """The Triton tiles (the contract's step functions and one-rank entry points), their routing fixed when made:
    :data:`TILES` follows the settings; benchmarks and tests make others (``Tiles(hopper=False)``: the portable
    ``tl`` kernels alone, on any GPU)."""

    # the calls hopper_attn covers (sm_90, fp16/bf16, D = Dv in {64, 128}, softcap once checked, TMA strides;
    # DS_BURST_HOPPER_KERNELS=0: none) run on the Gluon forward
    hopper: bool = True
    # with hopper, the backward too (deterministic=False, TMA-readable lse/delta); on H200 at 32K it matched or beat
    # the tl backward on every ring-step tile kind (docs/BENCHMARKS.md, 2026-12-01); DS_BURST_HOPPER_BWD=0: tl
    hopper_bwd: bool = settings.flag(settings.HOPPER_BWD, True)
    # deterministic=False: dQ by fp32 atomics in the dK/dV kernel instead of the dQ kernel; off: on H200 (S=32K,
    # H=32, D=128, bf16, causal) atomic dQ gave 242 TFLOP/s backward, the dQ kernel 383
    atomic_dq: bool = False
    interpret_blocks: tuple[int, int] = (16, 16)  # (BLOCK_M, BLOCK_N) under the interpreter

    def path(self, q: torch.Tensor, k: torch.Tensor) -> str:
        """Which tiles run a call on ``q``, ``k``: ``tl``, ``hopper-fwd`` or ``hopper-fwd+bwd`` (``KERNEL.path``)."""
        if not (self.hopper and hopper_attn.applicable(q, k, k)):
            return "tl"
        return "hopper-fwd+bwd" if self.hopper_bwd else "hopper-fwd"

    def _launch(self, kind: str, rows: int, programs: int, args: tuple, meta: dict[str, Any]) -> None:
        """Launch kernel ``kind`` (``fwd``, ``kv``, ``q``) over the tiles of ``rows`` times ``programs`` heads:
        autotuned, else the fixed config (the interpreter's blocks under ``TRITON_INTERPRET=1``)."""
        tuned, kernel, tile = _KERNELS[kind]

        def grid(m: dict[str, Any]) -> tuple[int, int]:
            return (triton.cdiv(rows, m[tile]), programs)

        if tuned is not None:
            tuned[grid](*args, **meta)
            return
        fixed = (dict(zip(("BLOCK_M", "BLOCK_N"), self.interpret_blocks)) if INTERPRET
                 else dict(_FIXED[kind][0 if max(meta["BLOCK_D"], meta["BLOCK_DV"]) <= 128 else 1]))
        kernel[grid(fixed)](*args, **meta, **fixed)

    def fwd_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
        scale: float, q_offset: int = 0, k_offset: int = 0, causal: bool = False,
        window: tuple[int, int] = (-1, -1), softcap: float | None = None, block_k: int | None = None,
        max_out: torch.Tensor | None = None,
    ) -> None:
        """Continue the online softmax of ``(out, lse)`` over the keys ``k, v``; updates both in place.

        ``out [B, Sq, Hq, Dv]`` (fp32) is the normalised partial output and ``lse [B, Hq, Sq]`` (fp32, natural
        log, ``-inf`` = no key yet) its log-sum-exp; both may be strided views. ``softcap``: logits
        ``softcap * tanh(s / softcap)``. ``block_k`` is ignored (tiles are chosen by the autotuner).
        ``max_out [B, Hq, Sq]`` (fp32, may be a view): raised in place to each row's largest visible
        ``scale * q.k`` before softcapping, in the same pass.
        """
        del block_k
        _check_inputs(q, k, v)
        b, sq, hq, d = q.shape
        sk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
        _check_shape("out", out, (b, sq, hq, dv))
        _check_shape("lse", lse, (b, hq, sq))
        if max_out is not None:
            _check_shape("max_out", max_out, (b, hq, sq))
        qk_scale, cap2 = tile_math.softcap_args(scale, softcap)
        has_cap = softcap is not None
        if classify_block(q_offset, sq, k_offset, sk, causal, window) is BlockKind.EMPTY:
            return
        if (self.hopper and out.dtype == torch.float32 and lse.dtype == torch.float32
                and (max_out is None or max_out.dtype == torch.float32) and hopper_attn.applicable(q, k, v, softcap)):
            hopper_attn.fwd_step(q, k, v, out, lse, scale=scale, q_offset=q_offset, k_offset=k_offset,
                                 causal=causal, window=window, max_out=max_out, softcap=softcap)
            return
        has_lo, has_hi, win_l, win_r = tile_math.mask_args(causal, window)
        bd, bdv = _block_d(d), _block_d(dv)
        mx = lse if max_out is None else max_out  # a dummy pointer without max_out (never read)
        mx_unit = float(softcap) if has_cap else _LN2  # the kernel's qk units to natural units
        args = (q, k, v, out, lse, mx, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
                *mx.stride(), hq, sq, sk, hq // hkv, q_offset - k_offset, win_l, win_r, qk_scale, cap2, mx_unit,
                _seq_bucket(max(sq, sk)))
        meta = dict(HEAD_DIM=d, BLOCK_D=bd, EVEN_D=bd == d, HEAD_DV=dv, BLOCK_DV=bdv, EVEN_DV=bdv == dv,
                    HAS_LO=has_lo, HAS_HI=has_hi, DOT_PREC=_dot_precision(q.dtype), SOFTCAP=has_cap,
                    LIB_TANH=not INTERPRET, HAS_MAX=max_out is not None)
        self._launch("fwd", sq, b * hq, args, meta)

    @staticmethod
    def bwd_preprocess(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
        """``delta = rowsum(dout * out)`` in fp32, shape ``[B, H, S]`` (contiguous)."""
        if out.shape != dout.shape or out.dim() != 4:
            raise ValueError(f"out {tuple(out.shape)} and dout {tuple(dout.shape)} must be equal 4-D shapes")
        b, s, h, d = out.shape
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"head dim {d} not supported by the Triton kernels (1..{MAX_HEAD_DIM})")
        delta = torch.empty(b, h, s, dtype=torch.float32, device=out.device)
        if b * h * s == 0:
            return delta
        bd = _block_d(d)
        block_m = 16 if INTERPRET else max(16, min(128, 8192 // bd))
        _bwd_pre_kernel[(triton.cdiv(s, block_m), b * h)](
            out, dout, delta, *out.stride(), *dout.stride(), *delta.stride(), h, s,
            HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=block_m, num_warps=4,
        )
        return delta

    def bwd_step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
        delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, *, scale: float,
        q_offset: int = 0, k_offset: int = 0, causal: bool = False, window: tuple[int, int] = (-1, -1),
        softcap: float | None = None, deterministic: bool = False, out: torch.Tensor | None = None,
        block_k: int | None = None,
    ) -> None:
        """Add this block's gradients to ``dq [B, Sq, Hq, D]``, ``dk [B, Sk, Hkv, D]`` and ``dv [B, Sk, Hkv, Dv]``
        (fp32, may be views); ``dout`` is ``[B, Sq, Hq, Dv]``, ``softcap`` as in :meth:`fwd_step`.

        ``lse`` and ``delta`` are the global (final) values for these queries, ``[B, Hq, Sq]`` fp32. With
        ``deterministic=True`` no atomics are used and results are bitwise reproducible; otherwise dQ may be
        accumulated with fp32 atomics. ``out`` and ``block_k`` are ignored.
        """
        del block_k, out
        _check_inputs(q, k, v)
        b, sq, hq, d = q.shape
        sk, hkv, d_v = k.shape[1], k.shape[2], v.shape[-1]
        _check_shape("dout", dout, (b, sq, hq, d_v))
        _check_shape("lse", lse, (b, hq, sq))
        _check_shape("delta", delta, (b, hq, sq))
        _check_shape("dq", dq, (b, sq, hq, d))
        _check_shape("dk", dk, (b, sk, hkv, d))
        _check_shape("dv", dv, (b, sk, hkv, d_v))
        qk_scale, cap2 = tile_math.softcap_args(scale, softcap)
        has_cap = softcap is not None
        if classify_block(q_offset, sq, k_offset, sk, causal, window) is BlockKind.EMPTY:
            return
        if dout.dtype != q.dtype:
            dout = dout.to(q.dtype)
        if self.hopper and self.hopper_bwd and hopper_attn_bwd.applicable(q, k, v, dout, lse, delta, dq, dk, dv,
                                                                           softcap, deterministic):
            hopper_attn_bwd.bwd_step(q, k, v, dout, lse, delta, dq, dk, dv, scale=scale, q_offset=q_offset,
                                     k_offset=k_offset, causal=causal, window=window, softcap=softcap)
            return
        has_lo, has_hi, win_l, win_r = tile_math.mask_args(causal, window)
        bd, bdv = _block_d(d), _block_d(d_v)
        g = hq // hkv
        atomic = (not deterministic) and self.atomic_dq
        common = dict(HEAD_DIM=d, BLOCK_D=bd, EVEN_D=bd == d, HEAD_DV=d_v, BLOCK_DV=bdv, EVEN_DV=bdv == d_v,
                      HAS_LO=has_lo, HAS_HI=has_hi, DOT_PREC=_dot_precision(q.dtype), SOFTCAP=has_cap,
                      LIB_TANH=not INTERPRET)
        tail = (q_offset - k_offset, win_l, win_r, qk_scale, float(scale), cap2, _seq_bucket(max(sq, sk)))

        kv_args = (q, k, v, dout, lse, delta, dq, dk, dv, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
                   *lse.stride(), *delta.stride(), *dq.stride(), *dk.stride(), *dv.stride(), hkv, sq, sk, g, *tail)
        self._launch("kv", sk, b * hkv, kv_args, dict(common, ATOMIC_DQ=atomic))
        if atomic:
            return

        q_args = (q, k, v, dout, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
                  *lse.stride(), *delta.stride(), *dq.stride(), hq, sq, sk, g, *tail)
        self._launch("q", sq, b * hq, q_args, common)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
        window: tuple[int, int] = (-1, -1), q_offset: int = 0, k_offset: int = 0, softcap: float | None = None,
        max_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole block in one Hopper launch (a call's only tile, one rank): ``(out [B, Sq, Hq, D]`` in the
        input dtype, ``lse [B, Hq, Sq]`` fp32), written directly (no fp32 state to zero, read or convert), or
        ``None`` when the Hopper forward does not cover the call (the caller then runs the general path).
        ``max_out``: as in :meth:`fwd_step`, raised by the same launch."""
        _check_inputs(q, k, v)
        if not (self.hopper and hopper_attn.applicable(q, k, v, softcap)):
            return None
        b, sq, hq, _ = q.shape
        if max_out is not None:
            _check_shape("max_out", max_out, (b, hq, sq))
            if max_out.dtype != torch.float32:
                return None
        out = torch.empty(b, sq, hq, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
        hopper_attn.fwd_step(q, k, v, out, lse, scale=scale, q_offset=q_offset, k_offset=k_offset, causal=causal,
                             window=window, fresh=True, max_out=max_out, softcap=softcap)
        return out, lse

    def attend_bwd(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
        lse: torch.Tensor, *, scale: float, causal: bool = False, window: tuple[int, int] = (-1, -1),
        q_offset: int = 0, k_offset: int = 0, deterministic: bool = False, softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Gradients of the whole block (:meth:`attend`) in the input dtype: delta, then one Hopper backward launch
        that writes dK and dV directly (no fp32 buffers for them) and adds dQ into one fp32 buffer; ``None`` when
        the Hopper backward does not cover the call (``deterministic=True`` among others: the general path
        then runs)."""
        if (deterministic or not (self.hopper and self.hopper_bwd) or dout.shape != out.shape
                or not hopper_attn.applicable(q, k, v, softcap)):  # before allocating anything
            return None
        b, sq, hq, d = q.shape
        if dout.dtype != q.dtype:
            dout = dout.to(q.dtype)
        dout = dout.contiguous()
        _check_shape("lse", lse, (b, hq, sq))
        delta = self.bwd_preprocess(out, dout)
        dq = torch.zeros(b, sq, hq, d, dtype=torch.float32, device=q.device)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        if not hopper_attn_bwd.applicable(q, k, v, dout, lse, delta, dq, dk, dv, softcap, deterministic,
                                          kv_out=True):
            return None  # e.g. lse / delta rows TMA cannot read (the general path computes delta again)
        hopper_attn_bwd.bwd_step(q, k, v, dout, lse, delta, dq, dk, dv, scale=scale, q_offset=q_offset,
                                 k_offset=k_offset, causal=causal, window=window, kv_out=True, softcap=softcap)
        return dq.to(q.dtype), dk, dv


def kernel(tiles: Tiles, name: str = "triton") -> KernelSpec:
    """The record of the Triton kernel running ``tiles`` (:data:`KERNEL` for :data:`TILES`; others register)."""
    return KernelSpec(
        name, tiles, dtypes=(torch.float16, torch.bfloat16, torch.float32), devices=("cuda", "cpu"),
        softcap=True, value_dim=True, whole=True, check=_rules, path=tiles.path,
        tolerance={torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 3e-3), torch.bfloat16: (1.5e-2, 2e-2)},
    )


TILES = Tiles()
"""The tiles ``kernel="triton"`` runs, routed as the settings say."""
KERNEL = kernel(TILES)
fwd_step, bwd_step, attend, attend_bwd = TILES.fwd_step, TILES.bwd_step, TILES.attend, TILES.attend_bwd
bwd_preprocess = Tiles.bwd_preprocess
