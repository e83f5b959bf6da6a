"""The light launch: issue a compiled Gluon kernel without the JIT's per-call work.

``kernel[grid](...)`` binds and specializes every argument, looks the compiled variant up, builds launch metadata,
and expands each TMA descriptor (``cuTensorMapEncodeTiled``) on every call. On one H100 (triton 3.6,
``launch/bench_launch.py``) that is 47 us of host time for the Hopper forward, plus 14 us to build its three
``TensorDescriptor`` objects, against 20 us through the compiled kernel's own launcher with the same arguments.
A ring step issues one such launch per tile, so at the shard sizes of 16-32 GPUs the host, not the GPU, set the
pace.

:class:`Launcher` keeps, per kernel:

* the compiled variant per **specialization key**: every value that decides which variant triton compiles
  (each tensor's dtype and 16-byte alignment; each int's ``== 1``, ``% 16 == 0`` and 32/64-bit class; the
  constexprs; the launch options; each descriptor's dtype and block; the device). The key over-approximates
  triton's own specialization, so a hit is always the variant the JIT would run; a miss goes through the JIT once
  (which compiles or finds the variant and launches it) and records it;
* per variant, the **expanded descriptor arguments** (the encoded ``CUtensorMap`` with its shape and strides) per
  (descriptor slot, base address, shape, strides): values, not references, so a later tensor at the same address
  with the same geometry reuses them correctly. The cache is cleared when it passes :data:`MAX_MAPS`.

A hit then costs one dictionary lookup per descriptor and one call of triton's C launcher.

The launcher internals this reads (``CompiledKernel.run`` is a ``CudaLauncher`` whose ``launch`` wraps the C
launcher and the descriptors' metadata) are triton 3.6's (:data:`WRITTEN_FOR`). The light launch is on only for
the releases in :data:`TRITON_RELEASES`, those where the GPU test (``tests/test_hopper_kernels.py``: the light
launch writes what the JIT launch writes) has passed: 3.6 (an H100, 2026-12-08). Anywhere else, under a launch
hook (profilers), with ``DS_BURST_FAST_LAUNCH=0``, or for a variant that needs scratch memory, every call takes
the JIT path: slower, never different.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ds_burst.core import settings

TRITON_RELEASES: tuple[str, ...] = ("3.6.",)
"""Triton releases (version prefixes) whose launcher internals :class:`Launcher` was checked against on a GPU
(``tests/test_hopper_kernels.py::test_light_launch_is_the_jit_launch``, passed with triton 3.6.0 on an H100 on
2026-12-08). A release enters here only after that test has passed on it; elsewhere every launch takes the JIT
path."""
WRITTEN_FOR: tuple[str, ...] = ("3.6.",)
"""The releases whose launcher layout this module reads (the GPU test turns the light launch on for them)."""
MAX_MAPS = 4096
"""Expanded descriptors kept per compiled variant before the cache is cleared."""
_TensorDescriptor: Any = None  # Gluon's, imported on the first build


def _release_ok() -> bool:
    try:
        import triton
    except ImportError:  # pragma: no cover - the kernels need triton anyway
        return False
    return triton.__version__.startswith(TRITON_RELEASES)


ENABLED: bool = _release_ok() and settings.flag(settings.FAST_LAUNCH, True) and not settings.triton_interpret()
"""Whether the light launch may be used at all (a checked triton release, ``DS_BURST_FAST_LAUNCH`` on, not the
interpreter); read once at import."""


class Desc(NamedTuple):
    """A TMA descriptor argument, built lazily: ``base`` viewed as ``shape`` / ``strides`` (elements), loaded in
    ``block`` boxes laid out in shared memory as ``layout``."""

    base: torch.Tensor
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    block: tuple[int, ...]
    layout: Any

    def build(self) -> Any:
        """The ``TensorDescriptor`` the JIT takes."""
        global _TensorDescriptor
        if _TensorDescriptor is None:
            from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _TensorDescriptor
        return _TensorDescriptor(self.base, list(self.shape), list(self.strides), list(self.block), self.layout)


class _Variant:
    """One compiled variant's C launcher, handles and descriptor cache."""

    __slots__ = ("raw", "function", "coop", "pdl", "packed", "metas", "maps")

    def __init__(self, compiled: Any, n_desc: int) -> None:
        launcher = compiled.run  # a CudaLauncher once the JIT has launched the variant
        if launcher.global_scratch_size or launcher.profile_scratch_size:
            raise LookupError("the variant needs scratch memory allocated per launch")
        inner = launcher.launch
        cells = dict(zip(inner.__code__.co_freevars, (c.cell_contents for c in inner.__closure__ or ()),
                         strict=True))
        metas = cells["tensordesc_meta"]
        if not callable(cells["launcher"]) or len(metas) != n_desc or any(m is None for m in metas):
            raise LookupError("launcher internals differ from the checked release")
        self.raw = cells["launcher"]
        self.function = compiled.function
        self.coop, self.pdl = launcher.launch_cooperative_grid, launcher.launch_pdl
        self.packed = compiled.packed_metadata
        self.metas = list(metas)
        self.maps: dict[tuple, list] = {}

    def expanded(self, slot: int, d: Desc) -> list:
        key = (slot, d.base.data_ptr(), d.shape, d.strides)
        got = self.maps.get(key)
        if got is None:
            from triton.backends.nvidia.driver import make_tensordesc_arg

            if len(self.maps) >= MAX_MAPS:
                self.maps.clear()
            got = self.maps[key] = make_tensordesc_arg(d.build(), self.metas[slot])
        return got


def _hooked() -> bool:
    """Whether a launch hook (a profiler) is set: its calls need the JIT's launch metadata. Triton 3.6 keeps a
    ``HookChain`` there, empty unless a hook was added (a plain callable counts as set)."""
    from triton import knobs

    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


def _stream(device_index: int) -> int:
    """The current CUDA stream's handle (what triton's driver passes)."""
    return torch._C._cuda_getCurrentRawStream(device_index)


def _int_class(x: int) -> int:
    return (x == 1) | ((x % 16 == 0) << 1) | ((not -(2**31) <= x < 2**31) << 2)


def _spec(args: Sequence[Any]) -> tuple:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            out.append(type(a))
        else:
            out.append(_int_class(a))
    return tuple(out)


_LAUNCHERS: list[Launcher] = []


def launch_counts() -> dict[str, dict[str, int]]:
    """Per kernel (its function name), how many launches there were and how many of them went through the JIT:
    benchmarks record it, so that a measurement says whether the light launch ran."""
    out: dict[str, dict[str, int]] = {}
    for la in _LAUNCHERS:
        c = out.setdefault(getattr(la.fn, "__name__", type(la.fn).__name__), {"launches": 0, "jit_launches": 0})
        c["launches"] += la.launches
        c["jit_launches"] += la.jit_launches
    return out


class Launcher:
    """Launches of one ``@gluon.jit`` kernel whose parameters are ``n_desc`` TMA descriptors, then run-time
    arguments, then constexprs (see the module docstring)."""

    def __init__(self, fn: Any, options: dict[str, Any] | None = None) -> None:
        self.fn = fn
        self.options = dict(options or {})
        self._options_key = tuple(sorted(self.options.items()))
        self._variants: dict[tuple, _Variant | None] = {}
        self.launches = 0
        """Every launch of this kernel."""
        self.jit_launches = 0
        """Launches that went through the JIT (first calls of a key, and every call where the light path is off)."""
        _LAUNCHERS.append(self)

    def __call__(self, grid: tuple[int, ...], descs: Sequence[Desc], args: Sequence[Any],
                 constexprs: dict[str, Any]) -> None:
        """Launch ``fn[grid](*descs, *args, **constexprs, **options)``."""
        self.launches += 1
        if not ENABLED or _hooked():
            self._jit(grid, descs, args, constexprs)
            return
        dev = descs[0].base.device.index
        key = (dev, tuple((d.base.dtype, d.block) for d in descs), _spec(args), tuple(constexprs.items()),
               self._options_key)
        v = self._variants.get(key, False)
        if v is False:
            names = list(self.fn.arg_names)
            if len(names) != len(descs) + len(args) + len(constexprs) or names[len(names) - len(constexprs):] != \
                    list(constexprs):
                raise TypeError(f"{names}: expected {len(descs)} descriptors, {len(args)} arguments, then the "
                                f"constexprs {list(constexprs)} in this order")
            compiled = self._jit(grid, descs, args, constexprs)
            try:
                v = _Variant(compiled, len(descs))
            except (LookupError, AttributeError, KeyError, TypeError, ValueError):
                v = None  # this variant always takes the JIT path
            self._variants[key] = v
            return
        if v is None:
            self._jit(grid, descs, args, constexprs)
            return
        expanded: list = []
        for slot, d in enumerate(descs):
            expanded += v.expanded(slot, d)
        g = (*grid, 1, 1)
        v.raw(g[0], g[1], g[2], _stream(dev), v.function, v.coop, v.pdl, None, None,
              v.packed, None, None, None, *expanded, *args, *constexprs.values())

    def _jit(self, grid: tuple[int, ...], descs: Sequence[Desc], args: Sequence[Any],
             constexprs: dict[str, Any]) -> Any:
        self.jit_launches += 1
        return self.fn[grid](*(d.build() for d in descs), *args, **constexprs, **self.options)
