"""What the Gluon Hopper (sm_90) forward and backward share: Gluon import and switch, the rules a call must meet
(:func:`why_not`), TMA descriptors, ``tanh`` (``tanh_approx``, for softcap) and the Gluon copies of
:mod:`~ds_burst.kernels.tile_math`. Triton 3.6's Gluon.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ds_burst.core import settings
from ds_burst.kernels import tile_math
from ds_burst.kernels.fast_launch import Desc

try:  # Gluon's API moves between Triton releases; written against triton 3.6.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: F401 - the kernels' imports must work
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401 - what Desc.build makes

    AVAILABLE: bool = True
    """Whether the Gluon Hopper modules imported (they do not run under ``TRITON_INTERPRET=1``)."""
except Exception:  # pragma: no cover - older/newer triton without these names
    AVAILABLE = False

ENABLED: bool = AVAILABLE and settings.flag(settings.HOPPER_KERNELS, True) and not settings.triton_interpret()
"""Whether the Hopper kernels may run at all (imported, not the interpreter, ``DS_BURST_HOPPER_KERNELS`` on)."""
SOFTCAP_CHECKED: bool = True
"""Whether the softcap variants of the Hopper kernels have passed the GPU tests (``tests/test_hopper_kernels.py``,
bf16 against float64, forward, backward and the light launch; passed on an H100 with triton 3.6.0 on 2026-12-08).
Set it to ``False`` after changing them until those tests pass again: softcap calls then stay on the ``tl``
kernels."""
_HEAD_DIMS = (64, 128)
_MIN_ROWS = 128  # one query / key tile: the TMA boxes never exceed the tensor

if AVAILABLE:
    span = gluon.jit(tile_math.in_dialect(tile_math.span, gl))
    finish = gluon.jit(tile_math.in_dialect(tile_math.finish, gl))

    @gluon.jit
    def tanh_approx(x):
        """``tanh(x)`` of fp32 ``x`` by the hardware approximation ``tanh.approx.f32`` (one MUFU instruction, sm_75
        and later; relative error at most about ``2**-11``; +-inf give +-1): the softcap of both kernels."""
        return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True,
                                         pack=1)


@functools.cache
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def tma_aligned(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor over ``t``'s first three dims can start at its data and step by its two outer
    strides (16-byte multiples, as TMA requires)."""
    es = t.element_size()
    return t.data_ptr() % 16 == 0 and (t.stride(0) * es) % 16 == 0 and (t.stride(1) * es) % 16 == 0


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float | None) -> str | None:
    """``None`` when the Hopper forward covers this call (the backward adds its own rules), else the reason it
    does not (for logs and tests). ``softcap``: the kernels' ``SOFTCAP`` (``tanh.approx.f32``) once
    :data:`SOFTCAP_CHECKED`."""
    if not ENABLED:
        return "the Gluon Hopper kernels are off (not importable, interpreter, or DS_BURST_HOPPER_KERNELS=0)"
    if softcap is not None and not SOFTCAP_CHECKED:
        return "softcap: the Hopper softcap variants are not yet checked on a GPU (SOFTCAP_CHECKED)"
    if q.device.type != "cuda" or not _is_sm90(q.device.index if q.device.index is not None else 0):
        return "not a compute-capability 9.x GPU"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (fp16/bf16 only)"
    d = q.shape[-1]
    if d not in _HEAD_DIMS or k.shape[-1] != d or v.shape[-1] != d:
        return f"head dims q {d}, k {k.shape[-1]}, v {v.shape[-1]} (equal, one of {_HEAD_DIMS})"
    if q.shape[1] < _MIN_ROWS or k.shape[1] < _MIN_ROWS:
        # tested on H200 from 512 rows up; smaller tiles (short document pieces) stay on the tl kernels
        return f"a tile shorter than {_MIN_ROWS} rows (q {q.shape[1]}, k {k.shape[1]})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1 or t.stride(2) != d:
            return f"{name} heads are not side by side in a row (strides {t.stride()})"
        if not tma_aligned(t):
            return f"{name} is not 16-byte aligned for TMA"
    return None


@functools.cache
def smem_layout(block: tuple[int, ...], dtype: torch.dtype) -> Any:
    """The NVMMA shared layout Gluon picks for a TMA block of ``dtype`` (built once per block shape)."""
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(block), gdt)


def desc_spec(t: torch.Tensor, rows: int, cols: int | None = None) -> Desc:
    """3-D TMA descriptor ``[B, S, H * D]`` over ``t [B, S, H, D]`` (heads side by side), block
    ``[1, rows, cols]`` (``cols`` default ``D``), as the light launch takes it (built only when encoded)."""
    b, s, h, d = t.shape
    cols = d if cols is None else cols
    return Desc(t, (b, s, h * d), (t.stride(0), t.stride(1), 1), (1, rows, cols), smem_layout((1, rows, cols), t.dtype))


def desc(t: torch.Tensor, rows: int, cols: int | None = None) -> Any:
    """:func:`desc_spec` built: the ``TensorDescriptor`` the JIT takes."""
    return desc_spec(t, rows, cols).build()
