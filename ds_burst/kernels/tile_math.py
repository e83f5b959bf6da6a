"""Kernel arithmetic written once for every dialect: the visible span of a tile (both directions, both kernel
families) and the forward epilogue.

The functions call their elementwise operations through the global ``ops``: plain Python here (checked against
:mod:`ds_burst.core.mask` on the CPU); :func:`in_dialect` binds a copy to ``triton.language`` (``triton.jit``) or
Gluon's ``language`` (``gluon.jit``): Gluon cannot call ``triton.jit`` functions through public API (triton 3.6), so
each dialect compiles its own copy of one source. Capitalised arguments are ``constexpr`` in the kernels.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any

from ds_burst.core.mask import window_bounds

LOG2E = 1.4426950408889634
"""``log2(e)``: the kernels' softmax runs in the log2 domain."""


def softcap_args(scale: float, softcap: float | None) -> tuple[float, float]:
    """``(qk_scale, cap2)``, the logit arguments of every kernel family (``tl`` and Gluon Hopper): the kernels
    multiply ``q.k`` by ``qk_scale``; without softcap that is ``scale * log2(e)`` (log2-domain logits; ``cap2`` 1,
    unused), with it ``scale / softcap``, then ``tanh`` and times ``cap2 = softcap * log2(e)``. ``ValueError`` for a
    softcap that is not a positive finite number."""
    if softcap is None:
        return float(scale) * LOG2E, 1.0
    c = float(softcap)
    if not 0.0 < c < math.inf:
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    return float(scale) / c, c * LOG2E


ops: Any = types.SimpleNamespace(maximum=max, minimum=min, where=lambda c, a, b: a if c else b)
"""The operations the functions below use (``maximum``, ``minimum``, ``where``, ``log``): plain Python here."""


def span(r0, n_rows, n_other, d0, win_l, win_r, HAS_LO: ops.constexpr, HAS_HI: ops.constexpr,
         BWD: ops.constexpr, ALIGN: ops.constexpr, BLOCK_R: ops.constexpr, BLOCK_O: ops.constexpr):
    """The tiles (of ``BLOCK_O``) of the other sequence (length ``n_other``) that rows ``[r0, r0 + BLOCK_R)`` of a
    sequence of length ``n_rows`` see, where query ``i`` sees key ``j`` iff ``-win_l <= j - i - d0 <= win_r`` (each
    side only when ``HAS_LO`` / ``HAS_HI``), ``d0 = q_offset - k_offset``. Forward: rows are queries. Backward
    (``BWD``): rows are keys, and a key tile that overhangs ``n_rows`` is masked throughout. ``ALIGN`` rounds the
    first tile down to a multiple (the Hopper backward's TMA reads of lse / delta). Returns ``(start, n_a, n_b,
    n_c)``: tiles ``start + t * BLOCK_O``, the first ``n_a`` and last ``n_c`` masked, the ``n_b`` between not."""
    # backward: key j sees query i iff -win_r <= i - j + d0 <= win_l, the same bounds mirrored
    LO: ops.constexpr = HAS_HI if BWD else HAS_LO
    HI: ops.constexpr = HAS_LO if BWD else HAS_HI
    w_lo = win_r if BWD else win_l
    w_hi = win_l if BWD else win_r
    r_last = ops.minimum(r0 + BLOCK_R, n_rows) - 1
    lo_any = r0 * 0
    hi_any = lo_any + n_other
    f_lo = lo_any
    f_hi = hi_any
    if LO:
        lo_any = ops.maximum((r0 - d0 if BWD else r0 + d0) - w_lo, 0)
        f_lo = ops.maximum((r_last - d0 if BWD else r_last + d0) - w_lo, 0)
    if HI:
        hi_any = ops.minimum((r_last - d0 if BWD else r_last + d0) + w_hi + 1, n_other)
        f_hi = ops.minimum((r0 - d0 if BWD else r0 + d0) + w_hi + 1, n_other)
    if BWD:
        f_hi = ops.where(r0 + BLOCK_R > n_rows, f_lo, f_hi)
    if ALIGN > 1:
        lo_any = (lo_any // ALIGN) * ALIGN
    # masked tiles below the fully visible range [f_lo, f_hi), mask-free tiles inside it, masked tiles above;
    # the masked ranges may overhang it (the element mask covers that)
    hi_any = ops.maximum(hi_any, lo_any)
    has_full = f_lo < f_hi
    end_a = ops.where(has_full, f_lo, hi_any)
    end_a = ops.maximum(end_a, lo_any)
    n_a = (end_a - lo_any + BLOCK_O - 1) // BLOCK_O
    start_b = lo_any + n_a * BLOCK_O
    n_b = ops.where(has_full, ops.maximum(f_hi - start_b, 0) // BLOCK_O, 0)
    start_c = start_b + n_b * BLOCK_O
    n_c = (ops.maximum(hi_any - start_c, 0) + BLOCK_O - 1) // BLOCK_O
    return lo_any, n_a, n_b, n_c


def finish(acc, l_i, m_i, lse_in, has_prev, m_in):
    """The forward epilogue: ``(out, lse)`` of rows with accumulator ``acc [rows, D]``, softmax sum ``l_i`` and
    max ``m_i`` (log2 domain) that continued a state with ``lse_in`` (natural log; ``has_prev``: finite, ``m_in``:
    ``lse_in`` in log2). Rows that saw no key keep ``lse_in`` bitwise (``lse_in + 0 + log(1)``); rows without any
    key give ``0`` and ``-inf``; a NaN sum counts as keys (non-finite inputs propagate, as in torch SDPA)."""
    has = l_i != 0.0
    l_safe = ops.where(has, l_i, 1.0)
    out = ops.where(has[:, None], acc / l_safe[:, None], 0.0)
    lse_in_s = ops.where(has_prev, lse_in, 0.0)
    m_in_s = ops.where(has_prev, m_in, 0.0)
    lse_prev = lse_in_s + (m_i - m_in_s) * 0.6931471805599453 + ops.log(l_safe)
    lse_new = m_i * 0.6931471805599453 + ops.log(l_safe)
    lse_out = ops.where(has_prev, lse_prev, ops.where(has, lse_new, float("-inf")))
    return out, lse_out


def mask_args(causal: bool, window: tuple[int, int]) -> tuple[bool, bool, int, int]:
    """A launch's mask arguments ``(HAS_LO, HAS_HI, win_l, win_r)`` (:func:`span`'s bounds; ``0`` where
    unbounded) for ``causal`` and the flash-attn style ``window``."""
    lo, hi = window_bounds(causal, window)
    has_lo, has_hi = lo != math.inf, hi != math.inf
    return has_lo, has_hi, int(lo) if has_lo else 0, int(hi) if has_hi else 0


def in_dialect(fn: Callable, dialect: Any) -> Callable:
    """A copy of ``fn`` (one of this module's functions) whose ``ops`` is ``dialect``, for ``triton.jit`` /
    ``gluon.jit`` (they read the source and resolve globals through the function's ``__globals__``)."""
    copy = types.FunctionType(fn.__code__, {**fn.__globals__, "ops": dialect}, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__annotations__ = dict(fn.__annotations__)
    copy.__doc__, copy.__qualname__, copy.__kwdefaults__ = fn.__doc__, fn.__qualname__, fn.__kwdefaults__
    return copy
