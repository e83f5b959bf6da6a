"""Local kernel selection: which implementation of the per-block tiles a call uses.

Every implementation exposes ``fwd_step``, ``bwd_preprocess`` and ``bwd_step`` with the contract of
:mod:`ds_burst.kernels.reference` (the pure-PyTorch tiles). A kernel whose module sets ``BWD_NEEDS_OUT``
also takes the final output of the queries as ``bwd_step(..., out=...)``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from ds_burst.core.options import KERNELS


def check_kernel(name: str) -> None:
    """Raise ``ValueError`` for an unknown kernel name."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}: expected one of {KERNELS}")


def resolve_kernel(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Concrete kernel for ``name``: ``auto`` is Triton on CUDA (16-bit and fp32 inputs), torch otherwise."""
    check_kernel(name)
    if name != "auto":
        return name
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32) and _triton_available():
        return "triton"
    return "torch"


def kernel_module(name: str) -> ModuleType:
    """The module implementing concrete kernel ``name`` (``torch``, ``triton`` or ``sdpa``).

    ``sdpa`` runs each tile on torch's fused attention ops (cuDNN, FlashAttention; the CPU flash op) where
    the mask is expressible and falls back per tile otherwise; its backward needs the output (``BWD_NEEDS_OUT``),
    so it runs with the K/V-travelling backward.
    """
    if name == "torch":
        return importlib.import_module("ds_burst.kernels.reference")
    if name == "triton":
        if not _triton_available():
            raise ValueError("kernel='triton' needs the triton package (pip install triton)")
        return importlib.import_module("ds_burst.kernels.triton_attn")
    if name == "sdpa":
        return importlib.import_module("ds_burst.kernels.sdpa_attn")
    raise ValueError(f"unknown kernel {name!r}")


def _triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True
