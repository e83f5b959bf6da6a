"""Local attention tiles on PyTorch's own fused attention ops (``kernel="sdpa"``): cuDNN / FlashAttention-2 on
CUDA, the flash-attention CPU kernel on CPU.

Same contract as :mod:`ds_burst.kernels.reference` (layout ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``; fp32
online-softmax state ``out [B, Sq, Hq, D]`` + natural-log ``lse [B, Hq, Sq]`` updated in place; fp32 gradient
accumulators), with one addition: :func:`bwd_step` needs ``out=``, the *final* (global) attention output of the
queries, because the fused backward ops take ``O`` and the log-sum-exp instead of ``delta`` (the record's
``bwd_needs_out``). Softcap and ``Dv != D`` blocks run on the fallback; the record declares neither. The fused ops
do not expose the maximum logit, so a ``fwd_step`` with ``max_out`` runs its whole block on the fallback (which
tracks it in the same pass) and ``attend`` with ``max_out`` returns ``None``.

Ops, in order of preference (the first one that is available, supports the shape and passes a one-time self-check
is used; ``DS_BURST_SDPA_BACKENDS=flash,cudnn`` or :data:`CUDA_BACKENDS` change the CUDA order):

* CUDA, fp16/bf16, head dim a multiple of 8 (<= 256):
  ``torch.ops.aten._scaled_dot_product_cudnn_attention`` (``compute_log_sumexp=True``; lse ``[B, H, Sq, 1]``)
  + ``_scaled_dot_product_cudnn_attention_backward``, then
  ``torch.ops.aten._scaled_dot_product_flash_attention`` (lse ``[B, H, Sq]``)
  + ``_scaled_dot_product_flash_attention_backward``.
  ``torch.backends.cuda.enable_cudnn_sdp(False)`` / ``enable_flash_sdp(False)`` switch a backend off here too.
* CPU, fp32/bf16/fp16/fp64: ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``),
  lse in fp32 (fp64 for fp64 inputs).

All of them return the natural-log log-sum-exp of the *scaled* scores (checked against the reference in the tests and,
at run time, by the self-check). The op signatures used are the same in torch 2.4 ... 2.13.

**Expressible masks.** The ops know only "no mask" and a causal mask with ``Sq == Sk`` (top-left = bottom-right).
A block is split into pieces the ops can run: a FULL block is one piece (``is_causal=False``); a causal block whose
query and key ranges coincide is one piece (``is_causal=True``); a causal block whose ranges are offset
(``q_offset != k_offset``; also a non-causal block with only a right window, which is a causal mask shifted by the
window) becomes up to three pieces: keys before the overlap (FULL), the coincident diagonal (causal) and queries
after it (FULL). Anything that needs an element mask the ops cannot express (a left window that cuts into the
block, e.g. sliding windows) runs on :mod:`~ds_burst.kernels.triton_attn` (CUDA, if importable and its record
takes the call) or :mod:`~ds_burst.kernels.reference` for that block; so do dtypes or head dims no op supports (e.g.
fp32 on CUDA), and any piece whose op raises (the failure is remembered and warned about once).

**GQA.** All three ops take ``Hkv < Hq`` directly (cuDNN's graph is built from the K/V shapes; FlashAttention-2
and the CPU kernel index kv heads): K/V are not repeated. If the self-check finds that an op does not handle
``Hkv != Hq`` in the installed torch, K/V are ``repeat_interleave``-d to ``Hq`` heads for that op, which costs
``(Hq / Hkv - 1) * 2 * Sk * Hkv * D`` extra elements per call (and dK/dV are summed back over the group in fp32).

**Precision.** The op's per-block output ``o_blk`` is rounded to the input dtype (bf16/fp16) before it is merged
into the fp32 state, so a call over several pieces or many ring steps carries one input-dtype rounding per block
(the Triton kernel keeps the partial output in fp32 registers instead). ``lse_blk`` is fp32. The merge is exact:
``lse' = logaddexp(lse, lse_blk)``, ``out' = out * exp(lse - lse') + o_blk * exp(lse_blk - lse')``; rows whose
state has no key yet (``lse = -inf``) take ``o_blk`` as is. In the backward ``P`` and ``dS`` are rounded to the
input dtype for the matmuls (as in FlashAttention) and ``delta`` is recomputed by the op from ``dO`` and the
input-dtype ``out``.

**Memory.** A backward call with more than :data:`BWD_ROWS` query rows (``DS_BURST_SDPA_BWD_ROWS``, default
16384) runs in row chunks, each chunk's mask derived from its own query offset as above: the ops' temporaries (dQ,
its fp32 accumulator, head-major copies) then scale with the chunk, not the block. Partial gradients are added to
the fp32 accumulators in place, without an fp32 copy of the partial on CUDA.

**Backward with global statistics.** Given the *global* ``lse`` and ``O`` of the queries, the fused backward of a
block computes ``P = exp(S - lse)`` (the block's columns of the global softmax), ``dV = P^T dO``,
``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ = dS K * scale``, ``dK = dS^T Q * scale`` - exactly the block's
share of the global gradient, which is what the ring accumulates.

**Determinism.** ``deterministic=True`` skips cuDNN (PyTorch documents its SDPA backward as non-deterministic) and
runs FlashAttention's backward with ``torch.use_deterministic_algorithms(True)`` set for the duration of the call
(process-global flag, restored afterwards). The CPU kernel gives each (batch, head) to one thread and is bitwise
reproducible.

**Self-check.** The first time a (op, device, dtype, head dim) combination is used, a tiny problem (Sq = 64,
Sk = 96, and a causal 128 x 128 one; with Hkv = Hq and with GQA) is run through the op's forward and backward and
compared with fp32 math on the same device; a failing op is not used (a failing GQA check selects the
repeat-K/V mode). This guards against lse layout / convention changes between torch versions. Set
``DS_BURST_SDPA_SELFCHECK=0`` to skip it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from ds_burst.core import settings
from ds_burst.core.mask import BlockKind, classify_block, window_bounds
from ds_burst.kernels import reference
from ds_burst.kernels.contract import KernelSpec, TileKernel

T = TypeVar("T")

#: CUDA backends in order of preference (``"cudnn"``, ``"flash"``); overridable with ``DS_BURST_SDPA_BACKENDS``.
CUDA_BACKENDS: tuple[str, ...] = tuple(
    b.strip() for b in settings.raw(settings.SDPA_BACKENDS, "cudnn,flash").split(",") if b.strip()
)
CPU_BACKENDS: tuple[str, ...] = ("cpu_flash",)
#: Backward blocks with more query rows than this run in row chunks of at most this many rows (``0``: never).
#: The fused ops' temporaries (dQ and its fp32 accumulator, dO/O in head-major layout) grow with the rows of a
#: call, so chunking bounds them; the dK/dV partials of the chunks are summed into the fp32 accumulators.
BWD_ROWS = settings.integer(settings.SDPA_BWD_ROWS, 16384)
SELF_CHECK = settings.flag(settings.SDPA_SELFCHECK, True)

#: Calls per path, e.g. ``STATS[("fwd", "cudnn")]``, ``STATS[("bwd", "fallback:reference")]`` (for tests/profiling).
STATS: Counter = Counter()

_OPS = {
    "cudnn": ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"),
    "flash": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"),
    "cpu_flash": (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
}
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FAILED: set[tuple] = set()

Piece = tuple[int, int, int, int, bool]  # local (q0, q1, k0, k1) and is_causal


# ----------------------------------------------------------------------------------------------------------------
# mask decomposition


def split_block(
    q_offset: int, sq: int, k_offset: int, sk: int, causal: bool, window: tuple[int, int], split: bool = True
) -> list[Piece] | None:
    """Pieces ``(q0, q1, k0, k1, is_causal)`` (local indices) covering exactly the visible pairs of the block, each
    either unmasked or a causal mask on coinciding ranges; ``[]`` for an EMPTY block, ``None`` if not expressible.

    ``split=False`` allows one piece only.
    """
    kind = classify_block(q_offset, sq, k_offset, sk, causal, window)
    if kind is BlockKind.EMPTY:
        return []
    if kind is BlockKind.FULL:
        return [(0, sq, 0, sk, False)]
    lo, hi = window_bounds(causal, window)
    # Only an upper bound kp <= qp + hi may cut into the block; a lower bound must not bite anywhere.
    if hi == math.inf or (q_offset + sq - 1) - k_offset > lo:
        return None
    # kp <= qp + hi  <=>  (kp - hi) <= qp: a causal mask on keys shifted to kb = k_offset - hi.
    kb = k_offset - int(hi)
    qa, qe, ka, ke = q_offset, q_offset + sq, kb, kb + sk
    s, e = max(qa, ka), min(qe, ke)
    if s >= e:  # no overlap: FULL or EMPTY, already handled by classify_block
        return None
    pieces: list[Piece] = []
    if ka < s:  # then s == qa: keys before the first query, seen by every query
        pieces.append((0, sq, 0, s - ka, False))
    pieces.append((s - qa, e - qa, s - ka, e - ka, True))  # coincident diagonal
    if qe > e:  # then e == ke: queries after the last key see every overlapping key
        pieces.append((e - qa, sq, s - ka, e - ka, False))
    if len(pieces) > 1 and not split:
        return None
    return pieces


# ----------------------------------------------------------------------------------------------------------------
# backends


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backends(device: torch.device) -> tuple[str, ...]:
    return CUDA_BACKENDS if device.type == "cuda" else CPU_BACKENDS if device.type == "cpu" else ()


def _op_exists(backend: str) -> bool:
    return all(hasattr(torch.ops.aten, name) for name in _OPS[backend])


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _backend_enabled(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` exists in this torch build and is switched on (static check, no kernel launched)."""
    if backend not in _OPS or not _op_exists(backend):
        return False
    if backend == "cpu_flash":
        return device.type == "cpu"
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if _capability(device.index if device.index is not None else torch.cuda.current_device()) < (8, 0):
        return False
    if backend == "cudnn":
        return (
            torch.backends.cudnn.is_available()
            and (torch.backends.cudnn.version() or 0) >= 90000
            and torch.backends.cuda.cudnn_sdp_enabled()
        )
    flash_built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    return bool(flash_built) and torch.backends.cuda.flash_sdp_enabled()


def _shape_ok(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        return False
    d, sk, hq, hkv = q.shape[-1], k.shape[1], q.shape[2], k.shape[2]
    if v.shape[-1] != d or k.shape[-1] != d or hkv == 0 or hq % hkv != 0:
        return False
    if backend == "cpu_flash":
        return q.dtype in _CPU_DTYPES
    return q.dtype in _LOW_PRECISION and d % 8 == 0 and d <= 256 and (backend != "cudnn" or sk >= 2)


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """``[B, S, H, D]`` -> ``[B, H, S, D]`` view of a dense BSHD tensor (copies only strided slices)."""
    return x.contiguous().transpose(1, 2)


@contextlib.contextmanager
def _deterministic_algorithms(on: bool) -> Iterator[None]:
    """Set ``torch.use_deterministic_algorithms(True)`` (not warn-only) for the block when ``on``."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if not on or (prev and not prev_warn):
        yield
        return
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _run_fwd(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool, repeat: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused forward: ``(o [B, Sq, Hq, D] input dtype, lse [B, Hq, Sq] fp32/fp64, natural log)``."""
    b, sq, hq, _ = q.shape
    g = hq // k.shape[2]
    if repeat:
        k, v = _repeat_kv(k, g), _repeat_kv(v, g)
    qh, kh, vh = _bhsd(q), _bhsd(k), _bhsd(v)
    aten = torch.ops.aten
    if backend == "cudnn":
        res = aten._scaled_dot_product_cudnn_attention(qh, kh, vh, None, True, 0.0, is_causal, False, scale=scale)
    elif backend == "flash":
        res = aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, is_causal, False, scale=scale)
    else:
        res = aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, is_causal, scale=scale)
    o, lse = res[0], res[1]
    return o.transpose(1, 2), lse.reshape(b, hq, sq)  # cuDNN's lse is [B, H, Sq, 1]


def _run_bwd(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    is_causal: bool,
    repeat: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused backward from global ``out``/``lse``: ``(dq [B,Sq,Hq,D], dk, dv [B,Sk,Hkv,D])`` (dk/dv may be fp32)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    if repeat:
        k, v = _repeat_kv(k, g), _repeat_kv(v, g)
    qh, kh, vh, oh, doh = _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), _bhsd(dout)
    lse_c = lse.to(_accum_dtype(q.dtype)).contiguous()  # the ops read lse as dense [B, H, Sq]
    aten = torch.ops.aten
    if backend == "cudnn":
        e = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed/offset: unused without dropout
        grads = aten._scaled_dot_product_cudnn_attention_backward(
            doh, qh, kh, vh, oh, lse_c.unsqueeze(-1), e, e, None, None, None, sq, sk, 0.0, is_causal, scale=scale
        )
    elif backend == "flash":
        e = torch.zeros((), dtype=torch.int64, device=q.device)
        with _deterministic_algorithms(deterministic):
            grads = aten._scaled_dot_product_flash_attention_backward(
                doh, qh, kh, vh, oh, lse_c, None, None, sq, sk, 0.0, is_causal, e, e, scale=scale
            )
    else:
        grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            doh, qh, kh, vh, oh, lse_c, 0.0, is_causal, scale=scale
        )
    dq, dk, dv = (x.transpose(1, 2) for x in grads)
    if repeat and g > 1:
        dk = dk.to(_accum_dtype(q.dtype)).reshape(b, sk, hkv, g, d).sum(3)
        dv = dv.to(_accum_dtype(q.dtype)).reshape(b, sk, hkv, g, d).sum(3)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# self-check


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check_case(
    backend: str, device: torch.device, dtype: torch.dtype, d: int, hq: int, hkv: int, sq: int, sk: int,
    causal: bool, repeat: bool,
) -> bool:
    """Run one tiny problem through the op's forward and backward and compare with the reference's math (autograd,
    fp32 or fp64, on the same device)."""
    gen = torch.Generator().manual_seed(1234 + sq + sk + hkv)
    b, scale = 1, d**-0.5

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v, do = rnd(b, sq, hq, d), rnd(b, sk, hkv, d), rnd(b, sk, hkv, d), rnd(b, sq, hq, d)
    o, lse = _run_fwd(backend, q, k, v, scale, causal, repeat)
    dq, dk, dv = _run_bwd(backend, q, k, v, o, do, lse, scale, causal, repeat, False)
    with torch.enable_grad():
        wide = [x.to(_accum_dtype(dtype)).requires_grad_() for x in (q, k, v)]
        o_ref, lse_ref = reference.naive_attention(*wide, causal=causal, scale=scale)
        dq_ref, dk_ref, dv_ref = torch.autograd.grad(o_ref, wide, do.to(o_ref.dtype))
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4, torch.float64: 1e-9}[dtype]
    lse_err = float((lse.double() - lse_ref.double()).abs().max())
    return (
        tuple(o.shape) == (b, sq, hq, d)
        and tuple(lse.shape) == (b, hq, sq)
        and tuple(dk.shape) == (b, sk, hkv, d)
        and lse_err < max(10 * tol, 1e-6)
        and _rel(o, o_ref) < tol
        and _rel(dq, dq_ref) < 2 * tol
        and _rel(dk, dk_ref) < 2 * tol
        and _rel(dv, dv_ref) < 2 * tol
    )


def _own_saved_tensors(t: torch.Tensor) -> torch.Tensor:
    return t


def _passes(backend: str, device: torch.device, dtype: torch.dtype, d: int, cases: list[tuple]) -> str | None:
    """``None`` if every case passes, else why not.

    The check may run on the first attention call, inside a caller's checkpointed region or activation offload:
    its own autograd graph saves its tensors as they are (the innermost saved-tensor hooks win), so a checkpoint
    does not count them as the region's and a recomputation (which skips the check) still matches the forward."""
    try:
        with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(_own_saved_tensors, _own_saved_tensors):
            for hq, hkv, sq, sk, causal in cases:
                if not _check_case(backend, device, dtype, d, hq, hkv, sq, sk, causal, False):
                    return f"mismatch vs. fp32 math (Hq={hq}, Hkv={hkv}, Sq={sq}, Sk={sk}, causal={causal})"
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


@functools.cache
def _mode(backend: str, device: torch.device, dtype: torch.dtype, d: int) -> str | None:
    """``"native"`` (GQA passed to the op), ``"repeat"`` (K/V repeated for GQA) or ``None`` (op unusable)."""
    if not SELF_CHECK:
        return "native"
    why = _passes(backend, device, dtype, d, [(2, 2, 64, 96, False), (2, 2, 128, 128, True)])
    if why is not None:
        warnings.warn(f"sdpa kernel: {backend} not used on {device} ({dtype}, D={d}): self-check: {why}", stacklevel=4)
        return None
    why = _passes(backend, device, dtype, d, [(4, 2, 64, 96, False), (4, 1, 128, 128, True)])
    return "native" if why is None else "repeat"


# ----------------------------------------------------------------------------------------------------------------
# dispatch


def _usable(
    phase: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, exclude: tuple[str, ...] = ()
) -> Iterator[tuple[str, bool, tuple]]:
    """Yield ``(backend, repeat_kv, failure_key)`` candidates for this piece, best first."""
    for backend in _backends(q.device):
        if backend in exclude or not _backend_enabled(backend, q.device) or not _shape_ok(backend, q, k, v):
            continue
        key = (backend, phase, q.device, q.dtype, q.shape[-1], q.shape[2] != k.shape[2], is_causal)
        if key in _FAILED:
            continue
        mode = _mode(backend, q.device, q.dtype, q.shape[-1])
        if mode is not None:
            yield backend, mode == "repeat" and q.shape[2] != k.shape[2], key


def _record_failure(key: tuple, exc: Exception) -> None:
    _FAILED.add(key)
    warnings.warn(f"sdpa kernel: {key[0]} failed for {key[1:]} ({exc}); using the next option", stacklevel=4)


def _first(phase: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
           run: Callable[..., T], exclude: tuple[str, ...] = ()) -> T | None:
    """``run(backend=, repeat=)`` on the best usable backend for this piece (``repeat``: K/V repeated for GQA); a
    backend whose op raises is remembered and the next one tried; ``None`` when none ran (the caller falls
    back)."""
    for backend, repeat, key in _usable(phase, q, k, v, is_causal, exclude):
        try:
            got = run(backend=backend, repeat=repeat)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            _record_failure(key, exc)
            continue
        STATS[(phase, backend)] += 1
        return got
    return None


def _merge(out: torch.Tensor, lse: torch.Tensor, o_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
    """Merge a normalised block result into the running state ``(out, lse)`` in place (exact in ``out.dtype``).

    Temporaries are ``[B, H, Sq]``-sized; ``out`` is updated in place (no full-size fp32 copy).
    """
    lse_blk = lse_blk.to(lse.dtype)
    new = torch.logaddexp(lse, lse_blk)
    new_safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    w_old = torch.exp(lse - new_safe)  # 0 where the state has no key yet (lse = -inf)
    w_new = torch.exp(lse_blk - new_safe)
    out.mul_(w_old.transpose(1, 2).unsqueeze(-1))
    # also clears garbage in empty rows; a NaN state stays NaN (non-finite inputs propagate as in torch SDPA)
    out.masked_fill_((lse == -math.inf).transpose(1, 2).unsqueeze(-1), 0.0)
    out.addcmul_(o_blk, w_new.transpose(1, 2).unsqueeze(-1))
    lse.copy_(new)


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
    """Continue the online softmax of ``(out, lse)`` over the keys ``k, v``; updates both in place.

    Expressible pieces (see the module docstring) run on the fused op; its per-block output is rounded to the input
    dtype before the exact fp32 merge. Other blocks (and every block with ``softcap`` or ``max_out``, which the
    fused ops do not expose) run on the Triton/reference fallback (``block_k`` is passed to it).
    """
    mask = dict(scale=scale, causal=causal, window=window, softcap=softcap, block_k=block_k)
    sq, sk = q.shape[1], k.shape[1]
    if max_out is not None:  # the fallback tracks the maximum logit in the same pass
        _fallback("fwd", q, k, v, softcap).fwd_step(q, k, v, out, lse, q_offset=q_offset, k_offset=k_offset,
                                                   max_out=max_out, **mask)
        return
    pieces = split_block(q_offset, sq, k_offset, sk, causal, window) if softcap is None else None
    if pieces is None:
        _fallback("fwd", q, k, v, softcap).fwd_step(q, k, v, out, lse, q_offset=q_offset, k_offset=k_offset, **mask)
        return
    for q0, q1, k0, k1, is_causal in pieces:
        qq, kk, vv, o, lse_p = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], out[:, q0:q1], lse[:, :, q0:q1]
        got = _first("fwd", qq, kk, vv, is_causal, functools.partial(
            _run_fwd, q=qq, k=kk, v=vv, scale=float(scale), is_causal=is_causal))
        if got is not None:
            _merge(o, lse_p, *got)
        else:
            _fallback("fwd", qq, kk, vv, softcap).fwd_step(qq, kk, vv, o, lse_p, q_offset=q_offset + q0,
                                                          k_offset=k_offset + k0, **mask)


def bwd_preprocess(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """``delta = rowsum(dO * O)`` as fp32 (fp64 for fp64 inputs), shape ``[B, H, S]`` (used by the fallback only)."""
    return reference.bwd_preprocess(out, dout)


def bwd_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor | None,
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
    """Add this block's gradients to ``dq`` (``[B, Sq, Hq, D]``) and ``dk, dv`` (``[B, Sk, Hkv, D]``).

    ``lse`` and ``delta`` are the global values for these queries (``[B, Hq, Sq]``) and ``out`` is their global
    attention output ``[B, Sq, Hq, Dv]`` (required; cast to the input dtype if needed): the fused ops take ``O`` and
    ``lse`` and recompute ``delta`` themselves. Blocks the ops cannot run use the fallback, which takes ``delta``
    (computed from ``out`` when ``None``).
    """
    if out is None:
        raise ValueError(
            "kernel 'sdpa' needs out= in bwd_step: the global attention output of these queries (the fused backward "
            "ops take O and lse, not delta); see its record's bwd_needs_out"
        )
    if out.shape != dout.shape:
        raise ValueError(f"out must have the shape of dout {tuple(dout.shape)}, got {tuple(out.shape)}")
    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap, deterministic=deterministic,
              block_k=block_k)
    sq, sk = q.shape[1], k.shape[1]
    if 0 < BWD_ROWS < sq:  # bound the ops' per-call temporaries: run the rows in chunks
        for r0 in range(0, sq, BWD_ROWS):
            r = slice(r0, min(sq, r0 + BWD_ROWS))
            bwd_step(q[:, r], k, v, dout[:, r], lse[:, :, r], None if delta is None else delta[:, :, r], dq[:, r],
                     dk, dv, q_offset=q_offset + r0, k_offset=k_offset, out=out[:, r], **kw)
        return
    pieces = split_block(q_offset, sq, k_offset, sk, causal, window) if softcap is None else None
    if pieces is None:
        delta = delta if delta is not None else bwd_preprocess(out, dout)
        _fallback("bwd", q, k, v, softcap).bwd_step(q, k, v, dout, lse, delta, dq, dk, dv, q_offset=q_offset,
                                                   k_offset=k_offset, **kw)
        return
    exclude = ("cudnn",) if deterministic else ()
    if dout.dtype != q.dtype:
        exclude = _backends(q.device)  # the fused ops need dO in the input dtype
    for q0, q1, k0, k1, is_causal in pieces:
        qq, kk, vv, do, o = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], dout[:, q0:q1], out[:, q0:q1]
        got = _first("bwd", qq, kk, vv, is_causal, functools.partial(
            _run_bwd, q=qq, k=kk, v=vv, out=o.to(qq.dtype), dout=do, lse=lse[:, :, q0:q1], scale=float(scale),
            is_causal=is_causal, deterministic=deterministic), exclude)
        if got is not None:
            dq[:, q0:q1].add_(got[0])  # mixed-dtype in-place add: no fp32 copy of the partial on CUDA
            dk[:, k0:k1].add_(got[1])
            dv[:, k0:k1].add_(got[2])
        else:
            d_piece = delta[:, :, q0:q1] if delta is not None else bwd_preprocess(o, do)
            _fallback("bwd", qq, kk, vv, softcap).bwd_step(
                qq, kk, vv, do, lse[:, :, q0:q1], d_piece, dq[:, q0:q1], dk[:, k0:k1], dv[:, k0:k1],
                q_offset=q_offset + q0, k_offset=k_offset + k0, **kw)


def _fallback(phase: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float | None) -> TileKernel:
    """The step functions of blocks the fused ops cannot run (counted in :data:`STATS` as ``fallback:<kernel>``):
    Triton on CUDA where its record takes the call, else the reference."""
    spec = reference.KERNEL
    if q.device.type == "cuda":
        try:
            from ds_burst.kernels import triton_attn
        except ImportError:
            triton_attn = None  # type: ignore[assignment]
        if triton_attn is not None and triton_attn.KERNEL.why_not(q, k, v, softcap=softcap) is None:
            spec = triton_attn.KERNEL
    STATS[(phase, "fallback:" + spec.name)] += 1
    return spec.impl


# ----------------------------------------------------------------------------------------------------------------
# introspection


def available(device: torch.device | str) -> bool:
    """Whether a fused op exists and is enabled for ``device`` (without it every block uses the fallback)."""
    device = torch.device(device)
    return any(_backend_enabled(b, device) for b in _backends(device))


def describe(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> str:
    """Which ops this kernel uses on ``device``; with ``dtype`` and ``head_dim`` also runs/reports the self-check."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    parts = []
    for backend in _backends(device):
        fwd_op = "torch.ops.aten." + _OPS[backend][0]
        if not _backend_enabled(backend, device):
            parts.append(f"{backend} ({fwd_op}): unavailable/disabled")
            continue
        info = f"{backend} ({fwd_op})"
        if backend == "cudnn":
            info += f" cuDNN {torch.backends.cudnn.version()}"
        if dtype is not None and head_dim is not None:
            mode = _mode(backend, device, dtype, head_dim)
            info += ": self-check failed" if mode is None else f": ok, GQA {mode}"
        parts.append(info)
    fb = "triton where it takes the call, else reference" if device.type == "cuda" else "reference"
    return (
        f"sdpa kernel on {device} (torch {torch.__version__}): " + " > ".join(parts or ["no fused op"])
        + f"; fallback for inexpressible masks/dtypes: {fb}"
    )


# ----------------------------------------------------------------------------------------------------------------
# whole-block calls (one rank, no ring): the fused op's own output, no fp32 state and no merge


def _whole_piece(q_offset: int, sq: int, k_offset: int, sk: int, causal: bool, window: tuple[int, int]) -> bool | None:
    """``is_causal`` of the one fused call that covers the whole block, or ``None`` when the mask needs several
    pieces (or none can express it)."""
    pieces = split_block(q_offset, sq, k_offset, sk, causal, window)
    if pieces is None or len(pieces) != 1 or pieces[0][:4] != (0, sq, 0, sk):
        return None
    return pieces[0][4]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
    window: tuple[int, int] = (-1, -1), q_offset: int = 0, k_offset: int = 0, softcap: float | None = None,
    max_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention of the whole block in one fused call: ``(out [B, Sq, Hq, D] input dtype, lse [B, Hq, Sq] fp32)``,
    or ``None`` when the mask needs several pieces, there is a softcap or a ``max_out`` (the fused ops do not
    expose the maximum logit) or no fused op takes the inputs (the caller then runs the general path). Used when a
    call's only tile is the whole local block (one rank)."""
    if max_out is not None:
        return None
    is_causal = _whole_piece(q_offset, q.shape[1], k_offset, k.shape[1], causal, window)
    if is_causal is None or softcap is not None:
        return None
    got = _first("fwd", q, k, v, is_causal, functools.partial(
        _run_fwd, q=q, k=k, v=v, scale=float(scale), is_causal=is_causal))
    return None if got is None else (got[0], got[1].to(_accum_dtype(q.dtype)))


def attend_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, *,
    scale: float, causal: bool = False, window: tuple[int, int] = (-1, -1), q_offset: int = 0, k_offset: int = 0,
    deterministic: bool = False, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Gradients of :func:`attend` in one fused call, in the input dtype, or ``None`` (general path)."""
    if (0 < BWD_ROWS < q.shape[1]) or dout.dtype != q.dtype or softcap is not None:
        return None
    is_causal = _whole_piece(q_offset, q.shape[1], k_offset, k.shape[1], causal, window)
    if is_causal is None:
        return None
    got = _first("bwd", q, k, v, is_causal, functools.partial(
        _run_bwd, q=q, k=k, v=v, out=out, dout=dout, lse=lse, scale=float(scale), is_causal=is_causal,
        deterministic=deterministic), ("cudnn",) if deterministic else ())
    return None if got is None else (got[0], got[1].to(q.dtype), got[2].to(q.dtype))


def bind_whole(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
    window: tuple[int, int] = (-1, -1), q_offset: int = 0, k_offset: int = 0,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """For a call whose only tile is the whole block (one rank): a function ``(q, k, v) -> (out, lse)`` that runs
    one fused op with torch's own autograd (its derivative is the fused backward), chosen once for these shapes:
    no autograd function of ds-burst's, no fp32 state, no merge. ``None`` when the mask needs several pieces, the
    shapes or dtype suit no fused op, or the op's self-check failed (the caller keeps the general path).

    ``out`` is ``[B, Sq, Hq, D]`` in the input dtype, ``lse`` ``[B, Hq, Sq]`` fp32 (not differentiable). The pick
    is made when the plan is built: switching a backend off later (``torch.backends.cuda.enable_*_sdp``) does not
    change plans already built (``ds_burst.attention.call_plan.clear_plans()`` rebuilds them).
    """
    pick = whole_backend(q, k, v, causal=causal, window=window, q_offset=q_offset, k_offset=k_offset)
    if pick is None:
        return None
    backend, repeat, is_causal = pick
    STATS[("bind", backend)] += 1
    groups = q.shape[2] // k.shape[2] if repeat else 1
    return _whole_runner(backend, groups, float(scale), is_causal, (q.shape[0], q.shape[2], q.shape[1]))


def whole_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, window: tuple[int, int] = (-1, -1),
    q_offset: int = 0, k_offset: int = 0,
) -> tuple[str, bool, bool] | None:
    """``(backend, repeat_kv, is_causal)`` that :func:`bind_whole` would bind for these inputs, or ``None``: the
    check alone, binding nothing (the plan's ``kernel="auto"`` choice asks it)."""
    is_causal = _whole_piece(q_offset, q.shape[1], k_offset, k.shape[1], causal, window)
    if q.device.type != "cuda" or is_causal is None:
        return None
    for backend, repeat, _key in _usable("fwd", q, k, v, is_causal):
        if backend != "cpu_flash" and _usable_bwd(backend, q, k, v, is_causal):
            return backend, repeat, is_causal
    return None


def _whole_runner(backend: str, groups: int, scale: float, is_causal: bool,
                  lse_shape: tuple[int, int, int]) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                              tuple[torch.Tensor, torch.Tensor]]:
    aten = torch.ops.aten
    cudnn = backend == "cudnn"
    op = aten._scaled_dot_product_cudnn_attention if cudnn else aten._scaled_dot_product_flash_attention

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if groups > 1:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cudnn:
            res = op(qh, kh, vh, None, True, 0.0, is_causal, False, scale=scale)
        else:
            res = op(qh, kh, vh, 0.0, is_causal, False, scale=scale)
        return res[0].transpose(1, 2), res[1].detach().reshape(lse_shape)

    return run


def _usable_bwd(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> bool:
    """Whether ``backend``'s backward passed its checks for these inputs too (it runs under torch's autograd)."""
    return any(b == backend for b, _, _ in _usable("bwd", q, k, v, is_causal))


KERNEL = KernelSpec(
    "sdpa", sys.modules[__name__],  # type: ignore[arg-type]
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64), devices=("cpu", "cuda"),
    bwd_needs_out=True, whole=True, binds=True,
    tolerance={torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 3e-3),
               torch.bfloat16: (1.5e-2, 2e-2)},
)
"""torch's fused attention ops per tile (the fallback for the rest); the backward needs the output."""
