"""The local kernels by name: the records (:class:`~ds_burst.kernels.contract.KernelSpec`) of the built-in kernels
(``torch``, ``triton``, ``sdpa``: their modules are imported on first use) and of kernels added with :func:`register`
(on every rank, before the first call that names it: ``burst_attn_func(kernel=<its name>)``). ``"auto"`` is
resolved per call (:func:`resolve`; on GPUs the measured choice of :mod:`ds_burst.kernels.choice`).
"""

from __future__ import annotations

import torch

from ds_burst.core.options import KERNELS
from ds_burst.kernels.contract import KernelSpec

_REGISTERED: dict[str, KernelSpec] = {}


def names() -> tuple[str, ...]:
    """Every value ``kernel=`` accepts: ``"auto"``, the built-in kernels, then the registered ones in order."""
    return KERNELS + tuple(_REGISTERED)


def register(spec: KernelSpec) -> None:
    """Make ``spec`` selectable as ``kernel=spec.name`` in this process (again with the same record: no-op)."""
    if spec.name in KERNELS or _REGISTERED.get(spec.name, spec) is not spec:
        raise ValueError(f"a kernel named {spec.name!r} is already registered")
    _REGISTERED[spec.name] = spec


def unregister(name: str) -> None:
    """Forget the registered kernel ``name`` (plans built with it keep it: ``clear_plans()`` drops them)."""
    _REGISTERED.pop(name, None)


def get(name: str) -> KernelSpec:
    """The record of the concrete kernel ``name`` (not ``"auto"``: :func:`resolve` it first)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name == "torch":
        from ds_burst.kernels import reference

        return reference.KERNEL
    if name == "sdpa":
        from ds_burst.kernels import sdpa_attn

        return sdpa_attn.KERNEL
    if name == "triton":
        try:
            from ds_burst.kernels import triton_attn
        except ImportError as exc:
            raise ValueError("kernel='triton' needs the triton package (pip install triton)") from exc
        return triton_attn.KERNEL
    raise ValueError(f"unknown kernel {name!r}: expected one of {names()[1:]}")


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Concrete kernel for ``name``: ``auto`` is Triton on CUDA (16-bit and fp32 inputs, when installed), torch
    otherwise; other names are already concrete."""
    if name == "auto" and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32):
        try:
            return get("triton").name
        except ValueError:  # not installed
            pass
    return "torch" if name == "auto" else name
